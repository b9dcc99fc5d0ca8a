"""Fixtures of the data_tools tests: a small synthetic corpus and its five built sets, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from dt_helpers import KIND_MANIFESTS, SMALL_CORPUS, build

from data_tools.synth import SynthConfig, generate


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    generate(SynthConfig(out=str(out), **SMALL_CORPUS), progress=False)
    return out


@pytest.fixture(scope="session")
def built_sets(corpus, tmp_path_factory) -> dict[str, Path]:
    """The five kinds built from the small corpus (image_text with 2 worker processes, the rest in-process)."""
    root = tmp_path_factory.mktemp("sets")
    sets = {}
    for kind, manifest in KIND_MANIFESTS.items():
        sets[kind] = root / kind
        build(kind, corpus / manifest, sets[kind], workers=2 if kind == "image_text" else 0, max_samples_per_shard=10)
    return sets
