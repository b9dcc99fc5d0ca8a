"""Helpers of the data pipeline tests (plain functions; the fixtures live in conftest.py)."""

from __future__ import annotations

import tarfile
from pathlib import Path

# Small images keep the tests fast: 64..160 px synth images become 4..25 merged tokens.
DATA_OPTIONS = dict(image_min_pixels=4096, image_max_pixels=16384, video_fps=2.0)


def data_config(sets: dict[str, Path], weights: dict[str, float] | None = None, **options) -> dict:
    """A ``data`` config section (as a mapping) over ``sets``."""
    weights = weights or {name: 1.0 for name in sets}
    return {
        "sources": [
            {"name": name, "path": str(path), "weight": weights[name]} for name, path in sets.items() if name in weights
        ],
        **DATA_OPTIONS,
        **options,
    }


def all_keys(shard_set: Path) -> set[str]:
    """Every sample key of a built set (from its shards)."""
    keys = set()
    for shard in sorted(shard_set.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            keys.update(m.name.split(".")[0] for m in tar.getmembers())
    return keys


def overwrite_member(shard: Path, member_name: str, data: bytes) -> None:
    """Replace the bytes of one tar member in place, keeping its size (energon's index stays valid), as a
    disk or a bad copy would change them."""
    with tarfile.open(shard) as tar:
        info = tar.getmember(member_name)
    if len(data) != info.size:
        raise ValueError(f"replacement for {member_name} must have {info.size} bytes, got {len(data)}")
    with open(shard, "r+b") as f:
        f.seek(info.offset_data)
        f.write(data)
