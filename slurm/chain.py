"""Stage chains: the Hydra overrides of each stage of ``--chain s0_align,s1_pretrain,...``.

Every stage gets the shared overrides, ``stage=<name>``, the overrides addressed to it with a
``<stage>:`` prefix (``s3_long_256k:cluster.nodes=32``), its own run directory
``<train.run_root>/<stage>`` and, after the first, ``stage.init_from`` set to the previous stage's
checkpoints folder (the trainer loads the newest checkpoint there, weights only). The first stage
keeps its configured ``init_from`` unless a ``<first stage>:stage.init_from=...`` override sets it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from pretrain.cli import load_job
from pretrain.config import ConfigError, JobConfig


@dataclass
class StageJob:
    """One stage of a submission: its name, the overrides that compose it, the validated job, and for a
    job of a sweep the label of its combination (slurm.sweep)."""

    name: str
    overrides: list[str]
    job: JobConfig
    label: str = ""


def override_key(override: str) -> str:
    """The config key an override sets: ``+train.x=1`` -> ``train.x``, ``stage=sft`` -> ``stage``."""
    return override.split("=", 1)[0].lstrip("+~").strip()


def path_override(key: str, path: str) -> str:
    """``key=path`` as Hydra's override grammar reads it back exactly, whatever the path holds: as it is
    where Hydra reads it so (``runs/exp/sft``), else quoted (``(``, ``,``, ``=``, ``'``, spaces:
    unquoted, Hydra fails on them or sweeps over a comma), its quotes and the backslashes before a quote
    or at the end escaped."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = f"{key}={path}"
    if re.fullmatch(r"[\w/.\-+@%~]+", path):
        try:
            if OverridesParser.create().parse_overrides([plain])[0].value() == path:
                return plain
        except Exception:  # noqa: BLE001 - Hydra's parse errors: quote it
            pass
    escaped = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), path)
    return f"{key}='{escaped}'"


def split_stage_overrides(stages: Sequence[str], overrides: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Shared overrides, and per-stage ones given as ``<stage>:<override>``."""
    shared: list[str] = []
    per_stage: dict[str, list[str]] = {s: [] for s in stages}
    for item in overrides:
        head = item.split("=", 1)[0]
        if ":" in head:
            stage, rest = item.split(":", 1)
            if stage not in per_stage:
                raise ConfigError(f"override {item!r}: {stage!r} is not a stage of the chain {list(stages)}")
            per_stage[stage].append(rest)
        else:
            shared.append(item)
    return shared, per_stage


def chain_stage_jobs(stages: Sequence[str], overrides: Sequence[str]) -> list[StageJob]:
    """Compose and validate every stage of a chain (see the module docstring); raise ConfigError."""
    stages = [s.strip() for s in stages if s.strip()]
    if not stages:
        raise ConfigError("--chain: no stage names given (e.g. --chain s0_align,s1_pretrain)")
    if len(set(stages)) != len(stages):
        raise ConfigError(f"--chain {','.join(stages)}: a stage appears twice (their run folders would collide)")
    shared, per_stage = split_stage_overrides(stages, overrides)
    for item in shared:
        key = override_key(item)
        if key == "stage":
            raise ConfigError(f"override {item!r}: --chain sets the stage of each job; drop it")
        if key == "train.run_dir":
            raise ConfigError(f"override {item!r}: with --chain every stage runs in <train.run_root>/<stage>; "
                              "set train.run_root instead")
        if key == "stage.init_from":
            raise ConfigError(f"override {item!r}: with --chain each stage starts from the previous one; "
                              f"for the first stage write {stages[0]}:stage.init_from=...")
    for name, items in per_stage.items():
        for item in items:
            key = override_key(item)
            if key in ("stage", "train.run_dir") or (key == "stage.init_from" and name != stages[0]):
                raise ConfigError(f"override {name}:{item}: --chain sets {key} of this stage itself")

    result: list[StageJob] = []
    previous_run_dir: str | None = None
    for name in stages:
        base = [*shared, f"stage={name}", *per_stage[name]]
        _, draft = load_job(base)
        run_dir = f"{draft.train.run_root.rstrip('/')}/{name}"
        final = [*base, path_override("train.run_dir", run_dir)]
        if previous_run_dir is not None:
            final.append(path_override("stage.init_from", f"{previous_run_dir}/checkpoints"))
        _, job = load_job(final)
        result.append(StageJob(name, final, job))
        previous_run_dir = run_dir
    return result
