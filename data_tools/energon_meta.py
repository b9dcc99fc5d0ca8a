"""Energon metadata of a built shard set, written by megatron-energon's own ``prepare`` code.

``energon prepare DIR`` does two things that we reproduce by calling the same code:
``BaseWebdatasetFactory.prepare_dataset`` (writes ``<shard>.tar.idx`` next to each shard and
``.nv-meta/{index.sqlite, index.uuid, .info.json, split.yaml}``), then a ``.nv-meta/dataset.yaml``.
For a ``CrudeWebdataset`` the CLI writes ``{__module__: megatron.energon, __class__: CrudeWebdataset}``;
we add ``subflavors: {kind: <kind>}`` so the trainer's cooker can tell the kinds apart.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import yaml

DATASET_YAML = "dataset.yaml"
META_DIR = ".nv-meta"


def dataset_definition(kind: str) -> dict:
    return {"__module__": "megatron.energon", "__class__": "CrudeWebdataset", "subflavors": {"kind": kind}}


def write_energon_metadata(
    out: Path, shard_names: list[str], kind: str, split: tuple[float, float, float], workers: int
) -> None:
    """Index ``shard_names`` (relative to ``out``) with energon's prepare code and write dataset.yaml.

    Shards are split into train/val/test by ``split`` (ratios over shards, in shard order: no shuffle,
    so the split is reproducible). Energon's own progress prints are swallowed.
    """
    from megatron.energon.flavors import BaseWebdatasetFactory

    ratios = [("train", split[0]), ("val", split[1]), ("test", split[2])]
    with contextlib.redirect_stdout(io.StringIO()):
        BaseWebdatasetFactory.prepare_dataset(
            out,
            list(shard_names),
            split_parts_ratio=ratios,
            shuffle_seed=None,
            workers=max(1, min(workers, len(shard_names))),
        )
    path = out / META_DIR / DATASET_YAML
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        yaml.dump(dataset_definition(kind), f, sort_keys=False)
    os.replace(tmp, path)
