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
import multiprocessing
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
    ratios = [("train", split[0]), ("val", split[1]), ("test", split[2])]
    # Energon's prepare forks its index workers (it sets the "fork" start method itself). Forked from a
    # process that runs threads of its own (progress bars, a process pool's manager, a loader's watchdog),
    # a worker can inherit a lock held at that moment and hang for ever (seen in the test suite); a fresh
    # spawned process, with none, forks them instead.
    process = multiprocessing.get_context("spawn").Process(
        target=_prepare, args=(str(out), list(shard_names), ratios, max(1, min(workers, len(shard_names)))))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"indexing {out} with energon's prepare failed (exit status {process.exitcode}; "
                           "its error is above)")
    path = out / META_DIR / DATASET_YAML
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        yaml.dump(dataset_definition(kind), f, sort_keys=False)
    os.replace(tmp, path)


def _prepare(out: str, shard_names: list[str], ratios: list[tuple[str, float]], workers: int) -> None:
    from megatron.energon.flavors import BaseWebdatasetFactory

    with contextlib.redirect_stdout(io.StringIO()):
        BaseWebdatasetFactory.prepare_dataset(Path(out), shard_names, split_parts_ratio=ratios, shuffle_seed=None,
                                              workers=workers)
