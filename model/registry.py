"""Named model configs: ``conf/model/<name>.yaml`` -> :class:`model.config.Qwen3VLConfig`.

The YAML files are also Hydra config-group files (``python -m pretrain.train model=qwen3vl_30b_a3b``);
a trainer that already holds the composed ``model`` node calls :meth:`Qwen3VLConfig.from_mapping` on it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from model.config import ConfigError, Qwen3VLConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "model"

# The six published sizes, smallest first (the names of their YAML files).
PUBLISHED = ("qwen3vl_2b", "qwen3vl_4b", "qwen3vl_8b", "qwen3vl_32b", "qwen3vl_30b_a3b", "qwen3vl_235b_a22b")


def list_configs() -> list[str]:
    """Names of every config in ``conf/model``: the published sizes first, then the others sorted."""
    names = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
    return [n for n in PUBLISHED if n in names] + [n for n in names if n not in PUBLISHED]


def get_config(name: str) -> Qwen3VLConfig:
    """The named config; a missing name raises ``ConfigError`` listing the known ones."""
    path = CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no model config named {name!r} in {CONF_DIR}; known: {list_configs()}")
    with path.open() as f:
        values = yaml.safe_load(f)
    try:
        return Qwen3VLConfig.from_mapping(values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
