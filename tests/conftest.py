"""Fixtures shared by the end-to-end tests: a small synthetic corpus built into shard sets."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pretrain.demo import BUILDS, model_overrides


@dataclass(frozen=True)
class SynthData:
    raw: Path
    shards: Path
    tokenizer: Path
    overrides: tuple[str, ...]  # data + model overrides for pretrain.train


def _run(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "data_tools", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> SynthData:
    """synth (small counts) -> the four shard builders -> a demo tokenizer, once per test session."""
    root = tmp_path_factory.mktemp("synth")
    raw, shards, tokenizer = root / "raw", root / "shards", root / "tokenizer"
    _run(["synth", "--out", str(raw), "--images", "60", "--videos", "10", "--docs", "16", "--sft", "40",
          "--eval", "8"])
    for command, name in BUILDS:
        _run([command, "--manifest", str(raw / f"{name}.jsonl"), "--out", str(shards / name), "--no-progress"])
    _run(["train-tokenizer", *[a for _, name in BUILDS for a in ("--manifest", str(raw / f"{name}.jsonl"))],
          "--vocab-size", "1024", "--out", str(tokenizer)])
    overrides = ("model=tiny_moe", "data=synth", f"data.root={shards}", f"data.tokenizer={tokenizer}",
                 *model_overrides(tokenizer))
    return SynthData(raw, shards, tokenizer, overrides)


@pytest.fixture(scope="session")
def layout_tokenizer(tmp_path_factory):
    """The tokenizer of the multimodal packs that layout tests train on (tests/multimodal_packs.py)."""
    from tests.multimodal_packs import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("layout_tok"))


@pytest.fixture(scope="session")
def layout_batch(layout_tokenizer) -> list[dict]:
    """The micro-batches of one step's global batch of those packs (un-normalised loss weights)."""
    from tests.multimodal_packs import global_batch

    return global_batch(layout_tokenizer)


@pytest.fixture(scope="session")
def layout_batch_of_ones(layout_tokenizer) -> list[dict]:
    """The same global batch in micro-batches of one pack each (4: the interleaved pipeline schedule's
    steady state needs more micro-batches than pipeline stages)."""
    from tests.multimodal_packs import global_batch

    return global_batch(layout_tokenizer, micro_batch_size=1)
