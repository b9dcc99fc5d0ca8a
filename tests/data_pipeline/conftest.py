"""Fixtures of the data pipeline tests: a small tokenizer, built shard sets, and a copy with corrupt samples.

Everything is made by the tests (``data_tools.synth`` + the real shard builders), once per session.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest

from data_tools.build import run_build
from data_tools.config import BuildConfig
from data_tools.synth import SynthConfig, generate
from common.tokens.tokenizer import Tokenizer, train_byte_level_bpe
from tests.data_pipeline.pipeline_helpers import overwrite_member

KINDS = {kind: f"{kind}.jsonl" for kind in ("image_text", "interleaved", "video", "sft")}
CORPUS = dict(seed=11, images=40, videos=4, docs=10, sft=24, eval=2)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    words = "red green blue yellow purple orange pink brown circle square triangle star moves left right up down " \
            "on a the background picture there is of what colour shape which way does white black gray".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(400)]
    return Tokenizer.from_file(train_byte_level_bpe(texts, 400, tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="session")
def shard_sets(tmp_path_factory) -> dict[str, Path]:
    """The four sample kinds built by data_tools from a small synthetic corpus (10 samples per shard)."""
    root = tmp_path_factory.mktemp("pipeline_data")
    generate(SynthConfig(out=str(root / "corpus"), **CORPUS), progress=False)
    sets = {}
    for kind, manifest in KINDS.items():
        out = root / kind
        run_build(BuildConfig(kind=kind, manifest=str(root / "corpus" / manifest), out=str(out),
                              max_samples_per_shard=10, workers=0, progress=False))
        sets[kind] = out
    return sets


@pytest.fixture(scope="session")
def corrupt_set(shard_sets, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A copy of the image_text set in which two samples are broken after the build, as a disk or a
    bad copy would break them: one image's bytes are garbage, one sample's JSON is truncated.
    Returns the set and {key: shard name} of the broken samples."""
    out = tmp_path_factory.mktemp("corrupt") / "image_text"
    shutil.copytree(shard_sets["image_text"], out)
    shard = out / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    image = next(m for m in members if ".img0." in m.name)
    overwrite_member(shard, image.name, b"\x00garbage" * (image.size // 8) + b"\x00" * (image.size % 8))
    jsons = [m for m in members if m.name.endswith(".json")]
    bad_json = next(m for m in jsons if m.name.split(".")[0] != image.name.split(".")[0])
    overwrite_member(shard, bad_json.name, b"{" + b" " * (bad_json.size - 1))
    broken = {image.name.split(".")[0]: shard.name, bad_json.name.split(".")[0]: shard.name}
    return out, broken


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run the pipeline single-threaded, as energon's worker processes do: on the 2-core CI machine
    torch's intra-op thread pool makes small tensor copies ~100x slower under load."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
