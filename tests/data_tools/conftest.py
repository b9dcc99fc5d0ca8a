"""Fixtures of the data_tools tests: a small synthetic corpus and its four built sets, made once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_tools.build import run_build
from data_tools.config import BuildConfig
from data_tools.synth import SynthConfig, generate

KIND_MANIFESTS = {"image_text": "image_text.jsonl", "interleaved": "interleaved.jsonl", "video": "video.jsonl", "sft": "sft.jsonl"}
SMALL_CORPUS = dict(seed=7, images=24, videos=6, docs=8, sft=15, eval=8)


def build(kind: str, manifest: Path, out: Path, **options):
    """Run a build in this process (``workers`` defaults to 0) and return its summary."""
    options.setdefault("workers", 0)
    config = BuildConfig(kind=kind, manifest=str(manifest), out=str(out), progress=False, **options)
    return run_build(config)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    generate(SynthConfig(out=str(out), **SMALL_CORPUS), progress=False)
    return out


@pytest.fixture(scope="session")
def built_sets(corpus, tmp_path_factory) -> dict[str, Path]:
    """The four kinds built from the small corpus (image_text with 2 worker processes, the rest in-process)."""
    root = tmp_path_factory.mktemp("sets")
    sets = {}
    for kind, manifest in KIND_MANIFESTS.items():
        sets[kind] = root / kind
        build(kind, corpus / manifest, sets[kind], workers=2 if kind == "image_text" else 0, max_samples_per_shard=10)
    return sets
