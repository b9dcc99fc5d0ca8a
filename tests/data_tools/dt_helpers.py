"""Helpers of the data_tools tests (a uniquely named module: spawned build workers import the test
modules, and a bare ``conftest`` would resolve to another test folder's)."""

from __future__ import annotations

import json
from pathlib import Path

from data_tools.build import run_build
from data_tools.config import BuildConfig

KIND_MANIFESTS = {"image_text": "image_text.jsonl", "interleaved": "interleaved.jsonl", "video": "video.jsonl", "sft": "sft.jsonl",
                  "rl": "rl.jsonl"}
SMALL_CORPUS = dict(seed=7, images=24, videos=6, docs=8, sft=15, eval=8, rl=8)


def build(kind: str, manifest: Path, out: Path, **options):
    """Run a build in this process (``workers`` defaults to 0) and return its summary."""
    options.setdefault("workers", 0)
    config = BuildConfig(kind=kind, manifest=str(manifest), out=str(out), progress=False, **options)
    return run_build(config)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
