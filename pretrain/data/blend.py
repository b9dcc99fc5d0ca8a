"""Blending shard sets: the weights of ``data.sources`` and ``stage.data_weights`` -> an energon metadataset.

Effective weight of a source = ``data.sources[i].weight`` x ``stage.data_weights[name]``. A stage that
lists ``data_weights`` trains only on the sources it names (an unnamed source gets 0); a stage without
``data_weights`` uses every source with its own weight. Sources of weight 0 are left out.

The blend itself is energon's: :func:`metadataset_config` writes a ``MetadatasetV2`` (as the dict that
``megatron.energon.load_dataset`` accepts) whose ``blend`` draws every sample from source ``i`` with
probability ``w_i / sum(w)``, each source repeating forever. Each entry adds the subflavor
``source: <name>`` next to the set's own ``kind`` (written by ``data_tools``), so every sample knows where
it came from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

META_DIR = ".nv-meta"


class BlendError(ValueError):
    """A data source that cannot be used; the message names the source and the reason."""


@dataclass(frozen=True)
class BlendSource:
    """One shard set in the blend: its name, absolute path, effective weight and sample kind."""

    name: str
    path: str
    weight: float
    kind: str

    def has_split(self, split_part: str) -> bool:
        """Whether the set's energon split assigns any shard to ``split_part`` ("train", "val", "test")."""
        return bool(_split_parts(Path(self.path)).get(split_part))


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _split_parts(path: Path) -> dict:
    split = path / META_DIR / "split.yaml"
    try:
        with open(split) as f:
            return (yaml.safe_load(f) or {}).get("split_parts", {}) or {}
    except OSError as e:
        raise BlendError(f"{path}: cannot read {split}: {e}") from None


def _set_kind(name: str, path: Path) -> str:
    meta = path / META_DIR / "dataset.yaml"
    if not meta.is_file():
        raise BlendError(
            f"data source {name!r}: {path} is not a prepared shard set (no {META_DIR}/dataset.yaml); "
            "build it with `python -m data_tools build-<kind>`"
        )
    with open(meta) as f:
        definition = yaml.safe_load(f) or {}
    kind = (definition.get("subflavors") or {}).get("kind")
    if definition.get("__class__") != "CrudeWebdataset" or not kind:
        raise BlendError(
            f"data source {name!r}: {meta} does not describe a data_tools shard set "
            "(expected a CrudeWebdataset with subflavors.kind)"
        )
    if kind == "rl":  # prompts without answers to learn from: they belong to an RL stage's stage.rl.prompts
        raise BlendError(f"data source {name!r}: {path} is an RL prompt set (build-rl); use it as stage.rl.prompts "
                         "of an rl_* stage, not as training data")
    return str(kind)


def _check_shard_files(name: str, path: Path) -> None:
    """Fail fast on a set whose shard files are missing, truncated or replaced since the build.

    A corrupt *sample* is skipped at training time, but energon cannot read past a truncated tar, so
    such a file must stop the job before it starts (data_tools' index.json records every shard's size;
    ``python -m data_tools verify`` checks the hashes).
    """
    index = path / "index.json"
    try:
        shards = json.loads(index.read_text())["shards"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BlendError(f"data source {name!r}: {index} is missing or unreadable ({e}); the build of {path} "
                         "did not finish (rerun it with --resume)") from None
    for shard in shards:
        file = path / shard["name"]
        size = file.stat().st_size if file.is_file() else None
        if size != shard["bytes"]:
            found = "is missing" if size is None else f"has {size} bytes"
            raise BlendError(f"data source {name!r}: shard {file} {found}, index.json says {shard['bytes']}: "
                             "the file was truncated or replaced; rebuild the set or restore the file")


def resolve_blend(sources: Iterable[Any], data_weights: Mapping[str, float] | None = None) -> list[BlendSource]:
    """The sources to train on with their effective weights (see module docstring), in config order.

    ``sources``: ``data.sources`` entries (objects or mappings with ``name``, ``path``, ``weight``);
    relative paths are taken relative to the current directory. Raises :class:`BlendError` for a
    missing or unprepared set, a shard file whose size differs from the build's index.json, a negative
    weight, a duplicate name, a weight for an unknown source, or an empty blend.
    """
    data_weights = dict(data_weights or {})
    entries = list(sources)
    names = [str(_field(s, "name")) for s in entries]
    if len(set(names)) != len(names):
        raise BlendError(f"data source names must be unique, got {names}")
    unknown = sorted(set(data_weights) - set(names))
    if unknown:
        raise BlendError(f"stage.data_weights names unknown source(s) {unknown}; sources are {names}")
    blend = []
    for entry, name in zip(entries, names):
        weight = float(_field(entry, "weight", 1.0))
        stage_weight = float(data_weights.get(name, 1.0 if not data_weights else 0.0))
        if weight < 0 or stage_weight < 0:
            raise BlendError(f"data source {name!r}: weights must be >= 0, got {weight} x {stage_weight}")
        if weight * stage_weight == 0:
            continue
        path = Path(os.path.abspath(os.path.expanduser(str(_field(entry, "path")))))
        if not path.is_dir():
            raise BlendError(f"data source {name!r}: {path} does not exist")
        kind = _set_kind(name, path)
        _check_shard_files(name, path)
        blend.append(BlendSource(name, str(path), weight * stage_weight, kind))
    if not blend:
        raise BlendError(f"no data source has a positive weight (sources {names}, stage weights {data_weights})")
    return blend


def metadataset_config(sources: Iterable[BlendSource], split_part: str = "train") -> dict:
    """An energon ``MetadatasetV2`` (as a dict for ``load_dataset``) blending ``sources`` by weight for
    ``split_part``. Sources with no shard in that split are left out; none left raises BlendError."""
    entries = [
        {"path": s.path, "weight": s.weight, "subflavors": {"source": s.name}}
        for s in sources
        if s.has_split(split_part)
    ]
    if not entries:
        raise BlendError(f"no data source has shards in split {split_part!r}")
    return {
        "__module__": "megatron.energon",
        "__class__": "MetadatasetV2",
        "splits": {split_part: {"blend": entries}},
    }
