"""Command-line composition of the Hydra config tree in ``conf/``, shared by every entry point.

``python -m pretrain.train [group=option ...] [key=value ...] [--cfg job]``: Hydra's override grammar
composes ``conf/config.yaml`` with the chosen group options; :func:`load_job` validates the result.
Composition and validation errors are printed as one ``config error: ...`` line (exit code 2),
never as a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from pretrain.config import CONF_DIR, SECTION_SCHEMAS, ConfigError, JobConfig, validate_job_config


_PLAIN_OVERRIDE = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)=(.*)$", re.DOTALL)


def _schema_field(path: str) -> bool:
    """Whether ``path`` (``stage.optimizer.weight_decay``) names a field of the typed config sections
    (``pretrain.config.SECTION_SCHEMAS``), walking nested dataclasses."""
    section, *names = path.split(".")
    schema = SECTION_SCHEMAS.get(section)
    for name in names:
        if schema is None or not dataclasses.is_dataclass(schema):
            return False
        hints = typing.get_type_hints(schema)
        if name not in hints:
            return False
        schema = hints[name]
    return True


def schema_overrides(overrides: Sequence[str]) -> list[str]:
    """``key=value`` overrides of schema fields that no YAML of the tree sets (``stage.optimizer.clip_grad``,
    ``cluster.max_requeues``) as ``++key=value``: Hydra refuses a plain override of a key the composed YAML
    lacks, though the schema has it and gives it a default. Other overrides are left as they are."""
    out = []
    for override in overrides:
        match = _PLAIN_OVERRIDE.match(override)
        out.append(f"++{override}" if match and _schema_field(match.group(1)) else override)
    return out


def compose(overrides: Sequence[str]) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides (``stage=s1_pretrain``, ``train.seed=3``); a
    plain override of any schema field works, whether or not a YAML of the tree sets it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=schema_overrides(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        message = " ".join(str(exc).split())
        # Hydra appends its search path to "not found" errors: noise for a user.
        message = message.split(" Config search path:")[0]
        if message.startswith("Could not override"):
            message += " (no such key; see --cfg job for the keys)"
        raise ConfigError(message) from None
    return cfg


def load_job(overrides: Sequence[str]) -> tuple[DictConfig, JobConfig]:
    """Compose and validate; returns the composed config and its typed form."""
    cfg = compose(overrides)
    return cfg, validate_job_config(cfg)


def parse_args(argv: Sequence[str], prog: str, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        epilog="Overrides use Hydra's grammar: group=option (stage=s2_long_32k) or key=value "
               "(train.global_batch_size=512, parallel.tp=2). Groups: "
               + ", ".join(sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())),
    )
    parser.add_argument("--cfg", choices=["job"], help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    return parser.parse_args(list(argv))


def job_from_argv(argv: Sequence[str], prog: str, description: str) -> tuple[argparse.Namespace, DictConfig, JobConfig]:
    """Parse, compose and validate; on a config error print it and exit with status 2."""
    args = parse_args(argv, prog, description)
    try:
        cfg, job = load_job(args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.cfg == "job":
        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        raise SystemExit(0)
    return args, cfg, job
