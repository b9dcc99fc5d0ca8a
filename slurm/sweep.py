"""Sweeps: ``--sweep stage.optimizer.lr=1e-4,3e-4 model=qwen3vl_2b,qwen3vl_4b`` -> one job per combination.

Each ``--sweep`` override uses Hydra's sweep syntax (``a,b,c``, ``range(1,4)``, ``choice(...)``, quoted
values with commas) and is expanded by Hydra's own override parser. The jobs are the cartesian product
of the swept values, the first override varying slowest. Every combination runs in its own folder:
``<train.run_dir as composed>/<label>``, the label naming the swept values (``lr-0.0001_model-qwen3vl_2b``),
so that checkpoints and metrics of two combinations never mix.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from pretrain.config import ConfigError
from slurm.chain import override_key

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Combination:
    """One job of a sweep: its folder name and the overrides (``key=value``) that select it."""

    label: str
    overrides: list[str]


def _axes(sweep: Sequence[str]) -> list[tuple[str, str, list[str]]]:
    """(config key, override key as written, values) of each ``--sweep`` override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    axes = []
    for item in sweep:
        try:
            (override,) = parser.parse_overrides([item])
        except HydraException as exc:
            raise ConfigError(f"--sweep {item!r}: {str(exc).splitlines()[0]}") from None
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [
            override.get_value_element_as_str()]
        if not values:
            raise ConfigError(f"--sweep {item!r}: no value")
        axes.append((override_key(item), override.get_key_element(), values))
    keys = [key for key, _, _ in axes]
    repeated = sorted(k for k, n in Counter(keys).items() if n > 1)
    if repeated:
        raise ConfigError(f"--sweep: {', '.join(repeated)} swept twice; list all its values in one override")
    return axes


def _short_names(keys: list[str]) -> list[str]:
    """The last part of each key (``stage.optimizer.lr`` -> ``lr``), or the whole key where two would clash."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return [short if last.count(short) == 1 else key for short, key in zip(last, keys)]


def sweep_combinations(sweep: Sequence[str], fixed: Sequence[str] = ()) -> list[Combination]:
    """Every combination of the ``--sweep`` overrides (see the module docstring). ``fixed``: the other
    overrides of the submission; one that sets a swept key is refused (which value would win?).
    Raises ConfigError."""
    axes = _axes(sweep)
    swept = {key for key, _, _ in axes}
    for item in fixed:
        if override_key(item) in swept:
            raise ConfigError(f"override {item!r}: {override_key(item)} is swept by --sweep; drop one of them")
    names = _short_names([key for key, _, _ in axes])
    combinations = []
    for values in itertools.product(*(values for _, _, values in axes)):
        label = "_".join(f"{name}-{_UNSAFE.sub('-', value).strip('-') or 'empty'}" for name, value in zip(names, values))
        overrides = [f"{written}={value}" for (_, written, _), value in zip(axes, values)]
        combinations.append(Combination(label, overrides))
    counts = Counter(c.label for c in combinations)
    if len(counts) < len(combinations):  # values that differ only in characters a folder name drops
        combinations = [Combination(f"{c.label}-{i}" if counts[c.label] > 1 else c.label, c.overrides)
                        for i, c in enumerate(combinations)]
    return combinations


def format_table(rows: list[tuple[str, str, list[str]]]) -> str:
    """The sweep's jobs as a table: job id, run folder, the overrides of the combination."""
    header = ("job id", "run dir", "overrides")
    cells = [(job_id, run_dir, " ".join(overrides)) for job_id, run_dir, overrides in rows]
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in [header, *cells])
