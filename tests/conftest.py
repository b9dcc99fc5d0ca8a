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


#: Presentation times (seconds) of the frames of ``vfr_mp4``: 2 s at 30 fps, then 4 s at 5 fps, as a phone
#: drops its frame rate when the light does (80 frames over 6 s: 14.5 fps on average).
VFR_FRAME_TIMES = tuple([i / 30 for i in range(60)] + [2 + i / 5 for i in range(20)])


def variable_frame_rate_mp4(frame_times, *, rate: int = 30, b_frames: int = 2) -> bytes:
    """A real variable-frame-rate H.264 MP4 written by PyAV with its frames at ``frame_times`` seconds (the
    container's nominal ``rate``; with B-frames, packets reach the muxer out of presentation order); frame
    ``i``'s pixels are all ``3 * i`` (64x48)."""
    import io
    from fractions import Fraction

    import av
    import numpy as np

    time_base = Fraction(1, 90_000)
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.time_base = stream.codec_context.time_base = time_base
        stream.options = {"threads": "1", "bf": str(b_frames)}
        for i, seconds in enumerate(frame_times):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 3 * i, np.uint8), format="rgb24")
            frame.pts = round(seconds / time_base)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


@pytest.fixture(scope="session")
def vfr_mp4() -> bytes:
    """:func:`variable_frame_rate_mp4` of ``VFR_FRAME_TIMES`` (B-frames on)."""
    return variable_frame_rate_mp4(VFR_FRAME_TIMES)
