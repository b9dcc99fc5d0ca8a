"""Videos a build accepted but training could not use: a file cut short behind an intact index, clips
with no text, frames below the model's smallest side (and the clip writer's encoding errors)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from dt_helpers import build, read_jsonl
from test_dt_media import bar_column, moving_frames
from test_dt_resume import _crash_after, shard_bytes

from data_tools.build import EXIT_INTERNAL_ERROR, run_build_command
from data_tools.config import BuildConfig
from data_tools.kinds.video import ClipPlan, SourceTiming, encode_clip
from data_tools.sample_media import PreparedSample
from data_tools.schema import sample_from_json, sample_to_json
from data_tools.shards import ShardWriter, iter_shard
from data_tools.validation import Rejected
from data_tools.verify import verify
from common.media import decode as media
from common.media.encode import EncodeError, encode_video
from common.media.frame_sampling import sample_frame_indices


def samples_of(out: Path) -> list:
    index = json.loads((out / "index.json").read_text())
    return [sample_from_json(parts["json"]) for s in index["shards"] for _, parts in iter_shard(out / s["name"])]


def samples_of_bytes(out: Path, key: str) -> bytes:
    """The video bytes of sample ``key`` of the set ``out``."""
    index = json.loads((out / "index.json").read_text())
    return next(parts["vid0.mp4"] for s in index["shards"] for k, parts in iter_shard(out / s["name"]) if k == key)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------------------------------
# A video whose last frames are cut off
# ----------------------------------------------------------------------------------------------------


def faststart_noise_video(path: Path, frames: int = 60, fps: int = 30) -> bytes:
    """An MP4 with its index (moov) at the front and every frame a keyframe of noise (so each frame is
    about the same size, and decodes alone): cutting its end leaves a file that probes as whole."""
    rng = np.random.default_rng(0)
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.options = {"g": "1", "threads": "1"}
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.read_bytes()


@pytest.fixture(scope="module")
def tail_cut(tmp_path_factory) -> tuple[Path, bytes, bytes]:
    """(folder, whole video, the same with its last ~10 % cut off), both written to the folder."""
    root = tmp_path_factory.mktemp("tail_cut")
    whole = faststart_noise_video(root / "whole.mp4")
    cut = whole[: int(len(whole) * 0.9)]
    (root / "cut.mp4").write_bytes(cut)
    return root, whole, cut


def test_a_video_whose_last_frames_are_cut_off_is_rejected(tail_cut):
    root, _, cut = tail_cut
    # Preconditions: it probes as 60 frames, its frames at 2 fps decode (what the build checked), but
    # the last frame, which training's sampler always reads, does not.
    info = media.probe_video(cut)
    assert info.num_frames == 60
    media.read_video_frames(cut, media.frame_indices_at_fps(info.num_frames, info.fps, 2.0))
    assert sample_frame_indices(info.num_frames, info.fps)[-1] == 59
    with pytest.raises(media.MediaError, match="frame index 59 is beyond the"):
        media.read_video_frames(cut, [59])

    manifest = write_jsonl(root / "v.jsonl", [{"video": "cut.mp4", "text": "noise"}, {"video": "whole.mp4", "text": "noise"}])
    build("video", manifest, root / "video")
    (rejected,) = read_jsonl(root / "video" / "rejected.jsonl")
    assert (rejected["line"], rejected["reason"]) == (1, "video_decode_error")
    assert "lists 60 frames but not all of them decode" in rejected["detail"] and "frame index 59" in rejected["detail"]
    assert [s.source.line for s in samples_of(root / "video")] == [2]

    # An RL prompt set runs the same check (its stage would crash on the prompt).
    prompt = {"role": "user", "content": [{"type": "video", "video": "cut.mp4"}, {"type": "text", "text": "What is it?"}]}
    build("rl", write_jsonl(root / "rl.jsonl", [{"messages": [prompt], "answer": "noise"}]), root / "rl")
    assert [(r["line"], r["reason"]) for r in read_jsonl(root / "rl" / "rejected.jsonl")] == [(1, "video_decode_error")]


def swap_video(out: Path, data: bytes) -> None:
    """Put ``data`` in place of the video of the one-sample set ``out``, its JSON, shard and index.json
    updated to match: a consistent set holding a video that an earlier build let through."""
    index = json.loads((out / "index.json").read_text())
    (shard,) = index["shards"]
    ((key, parts),) = list(iter_shard(out / shard["name"]))
    sample = sample_from_json(parts["json"])
    (m,) = sample.media
    swapped = dataclasses.replace(m, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    sample = dataclasses.replace(sample, media=(swapped,))
    (out / "tmp").mkdir()
    writer = ShardWriter(out / shard["name"], out / "tmp")
    writer.add(PreparedSample(key, [("json", sample_to_json(sample)), (m.name, data)]))
    written = writer.commit()
    shard.update(bytes=written.bytes, sha256=written.sha256)
    index["totals"]["bytes"] = written.bytes
    (out / "index.json").write_text(json.dumps(index, indent=2))


def test_verify_decode_reads_the_last_frame(tail_cut, tmp_path):
    root, _, cut = tail_cut
    build("video", write_jsonl(root / "one.jsonl", [{"video": "whole.mp4", "text": "noise"}]), tmp_path / "set")
    assert verify(tmp_path / "set", decode=True)[0] == []
    swap_video(tmp_path / "set", cut)
    assert verify(tmp_path / "set")[0] == []  # the set itself is consistent
    problems, _ = verify(tmp_path / "set", decode=True)
    assert len(problems) == 1 and "vid0.mp4 does not decode: frame index 59 is beyond the" in problems[0], problems


# ----------------------------------------------------------------------------------------------------
# Clips without text
# ----------------------------------------------------------------------------------------------------


def bar_frames(n: int) -> list[np.ndarray]:
    """Frame i: a dark grey with a white bar at column 2*i (``bar_column`` finds it), 48 x (2n + 8) pixels."""
    frames = []
    for i in range(n):
        frame = np.full((48, 2 * n + 8, 3), 3 * i, np.uint8)
        frame[:, 2 * i : 2 * i + 4] = 255
        frames.append(frame)
    return frames


@pytest.fixture(scope="module")
def clip_manifest(tmp_path_factory) -> Path:
    """Cut at 2 s. Line 1: no text, one caption in the first of 3 clips; line 2: a text, every clip kept;
    line 3 (6.1 s: clips of 2, 2 and 2.1 s): no text, captions in the first clip and in the last frame."""
    root = tmp_path_factory.mktemp("clips")
    (root / "a.mp4").write_bytes(encode_video(moving_frames(24), fps=4))
    (root / "b.mp4").write_bytes(encode_video(moving_frames(30)[6:], fps=4))
    (root / "c.mp4").write_bytes(encode_video(bar_frames(61), fps=10))
    return write_jsonl(root / "v.jsonl", [
        {"id": "start-only", "video": "a.mp4", "captions": [{"start": 0.0, "end": 1.0, "text": "it starts"}]},
        {"id": "text", "video": "b.mp4", "text": "a bar moves right"},
        {"id": "ends", "video": "c.mp4", "captions": [{"start": 0.5, "end": 1.0, "text": "at first"},
                                                      {"start": 5.95, "end": 6.1, "text": "the last frame"}]},
    ])


def test_clips_with_neither_text_nor_caption_are_left_out_and_counted(clip_manifest, tmp_path, capsys):
    config = BuildConfig(kind="video", manifest=str(clip_manifest), out=str(tmp_path / "out"), workers=0, progress=False,
                         max_clip_seconds=2.0)
    assert run_build_command(config, "build-video") == 0
    assert "3 clips left out: neither the video's text nor a caption falls in their span" in capsys.readouterr().out
    samples = samples_of(tmp_path / "out")
    # The clips kept are numbered from 0 in time order; Clip.start/end say where each one lies in its source.
    assert [s.key for s in samples] == ["000000001_0000", "000000002_0000", "000000002_0001", "000000002_0002",
                                        "000000003_0000", "000000003_0001"]
    assert [(s.clip.index, s.clip.count, s.clip.start, s.clip.end) for s in samples] == [
        (0, 1, 0.0, 2.0), (0, 3, 0.0, 2.0), (1, 3, 2.0, 4.0), (2, 3, 4.0, 6.0), (0, 2, 0.0, 2.0), (1, 2, 4.0, 6.1)]
    assert [(c.start, c.end, c.text) for c in samples[-1].captions] == [(1.95, 2.1, "the last frame")]
    assert all(s.text or s.captions for s in samples)  # nothing the sample encoder would skip
    frames = media.read_video_frames(samples_of_bytes(tmp_path / "out", "000000003_0001"), [0])
    assert bar_column(frames[0]) == 80  # source frame 40: the clip shows 4.0-6.1 s
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    totals = index["totals"]
    assert (totals["accepted_lines"], totals["samples"], totals["dropped_clips"]) == (3, 6, 3)
    assert verify(tmp_path / "out", decode=True)[0] == []


def test_left_out_clips_keep_builds_identical_across_workers_and_resume(clip_manifest, tmp_path):
    options = dict(max_clip_seconds=2.0, max_samples_per_shard=1)
    build("video", clip_manifest, tmp_path / "reference", **options)
    build("video", clip_manifest, tmp_path / "workers", workers=2, **options)
    names = ["index.json", "rejected.jsonl", *(f"shard-{i:06d}.tar" for i in range(6))]
    for name in names:
        assert (tmp_path / "workers" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    out = tmp_path / "crashed"
    build("video", clip_manifest, out, **options)
    _crash_after(out, keep_shards=5)  # in line 3, between its two clips: its count went with the first
    build("video", clip_manifest, out, resume=True, **options)
    assert shard_bytes(out) == shard_bytes(tmp_path / "reference")
    totals = json.loads((out / "index.json").read_text())["totals"]
    assert totals == json.loads((tmp_path / "reference" / "index.json").read_text())["totals"]
    assert totals["dropped_clips"] == 3


# ----------------------------------------------------------------------------------------------------
# Frames below the model's smallest side; encoding errors
# ----------------------------------------------------------------------------------------------------


def lossless_video(path: Path, width: int, height: int, frames: int = 20, fps: int = 4) -> None:
    """PNG frames in a MOV: any size, odd or 1 pixel included (H.264 needs sides of 2 pixels or more)."""
    with av.open(str(path), "w", format="mov") as container:
        stream = container.add_stream("png", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), i * 10, np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def narrow_videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("narrow")
    for name, (width, height) in {"w1": (1, 100), "w3": (3, 101), "h1": (120, 1), "w20": (20, 64), "ok": (28, 40)}.items():
        lossless_video(root / f"{name}.mov", width, height)
    return write_jsonl(root / "v.jsonl", [{"video": f"{name}.mov", "text": f"{name} video"}
                                          for name in ("w1", "w3", "h1", "w20", "ok")])


@pytest.mark.parametrize("clip_seconds", [None, 2.0])
def test_video_frames_below_the_smallest_image_side_are_rejected(narrow_videos, tmp_path, clip_seconds, capsys):
    config = BuildConfig(kind="video", manifest=str(narrow_videos), out=str(tmp_path / "out"), workers=0, progress=False,
                         max_clip_seconds=clip_seconds)
    assert run_build_command(config, "build-video") != EXIT_INTERNAL_ERROR, capsys.readouterr()
    assert not (tmp_path / "out" / "internal_errors.jsonl").exists()
    rejected = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert [(r["line"], r["reason"]) for r in rejected] == [(n, "image_too_small") for n in (1, 2, 3, 4)]
    assert rejected[0]["detail"] == "video 'w1.mov': 1x100 pixels has a side below 28 px"
    assert {s.source.line for s in samples_of(tmp_path / "out")} == {5}


def test_encode_video_refuses_frames_it_cannot_encode_with_encode_error():
    with pytest.raises(EncodeError, match="1x64 pixels"):
        encode_video([np.zeros((64, 1, 3), np.uint8)] * 4, fps=4)
    with pytest.raises(EncodeError, match="must all have one size"):
        encode_video([np.zeros((64, 64, 3), np.uint8)] * 3 + [np.zeros((32, 64, 3), np.uint8)], fps=4)
    with pytest.raises(EncodeError, match="at least one frame"):
        encode_video([], fps=4)
    assert issubclass(EncodeError, ValueError)  # what it raised before for no frame


def test_the_clip_writer_turns_an_encoding_error_into_a_rejection(narrow_videos):
    data = (narrow_videos.parent / "w1.mov").read_bytes()  # validate_video rejects it first in a build
    with pytest.raises(Rejected) as info:
        encode_clip(data, ClipPlan(0, 8, 0.0, 2.0, ()), SourceTiming(8, 4.0, 2.0), "video 'w1.mov', clip 0 (frames 0-7)")
    assert info.value.reason == "invalid_media"
    assert info.value.detail.startswith("video 'w1.mov', clip 0 (frames 0-7) cannot be re-encoded: frames of 1x100")


def test_a_variable_frame_rate_video_is_cut_and_timed_by_its_frames_timestamps(tmp_path, vfr_mp4):
    """A phone-like clip (2 s at 30 fps, then 4 s at 5 fps; frame i's pixels are 3 i) cut at 3 s: the
    clips split at the frame shown at 3.0 s, not at frame 3 * the average rate (which put 1.4 s of
    video in a clip said to last 3 s), captions keep their place, and each clip is re-encoded at
    constant rate showing at j / fps the source frame shown then."""
    from tests.conftest import VFR_FRAME_TIMES

    (tmp_path / "phone.mp4").write_bytes(vfr_mp4)
    manifest = tmp_path / "v.jsonl"
    manifest.write_text(json.dumps({"video": "phone.mp4", "captions": [
        {"start": 0.5, "end": 1.0, "text": "fast"}, {"start": 2.5, "end": 2.9, "text": "slow"},
        {"start": 5.5, "end": 5.9, "text": "end"}]}) + "\n")
    build("video", manifest, tmp_path / "out", max_clip_seconds=3.0, max_samples_per_shard=4)
    clips = samples_of(tmp_path / "out")
    assert [(c.clip.start, c.clip.end) for c in clips] == [(0.0, 3.0), (3.0, 6.0)]
    assert [[(c.start, c.end, c.text) for c in s.captions] for s in clips] == [
        [(0.5, 1.0, "fast"), (2.5, 2.9, "slow")], [(2.5, 2.9, "end")]]
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    members = {key: parts for s in index["shards"] for key, parts in iter_shard(tmp_path / "out" / s["name"])}
    times = np.asarray(VFR_FRAME_TIMES)
    for sample in clips:
        data = members[sample.key][sample.media[0].name]
        info = media.probe_video(data)
        assert media.video_frame_times(data) is not None
        assert info.num_frames == round(3.0 * info.fps)  # 3 s of video at its constant rate
        for j in (0, info.num_frames // 2, info.num_frames - 1):
            shown = int(np.searchsorted(times, sample.clip.start + j / info.fps + 1e-9, side="right")) - 1
            pixel = int(media.read_video_frames(data, [j])[0].mean().round())
            assert abs(pixel - 3 * shown) <= 2, (sample.key, j, pixel, shown)
    assert verify(tmp_path / "out", decode=True)[0] == []


def test_a_frame_held_past_a_cut_shows_in_both_clips_and_no_clip_outgrows_the_limit(tmp_path):
    """A screen recording: 1 s at 10 fps, a still screen (no new frame) until 10 s, then 2 s at 10 fps,
    cut at 3 s. Cut at each window's first frame, the still frame stretched clip 0 to 10 s, then clips of
    0.2 s followed while the window count caught up; cut by time, every clip is [3k, 3k + 3) and shows
    at each instant the frame shown then (the still frame, 9, in clips 0-3)."""
    from tests.conftest import variable_frame_rate_mp4

    times = [i / 10 for i in range(10)] + [10 + i / 10 for i in range(20)]
    (tmp_path / "screen.mp4").write_bytes(variable_frame_rate_mp4(times, rate=10))
    manifest = write_jsonl(tmp_path / "v.jsonl", [{"video": "screen.mp4", "text": "a screen recording"}])
    build("video", manifest, tmp_path / "out", max_clip_seconds=3.0)
    clips = samples_of(tmp_path / "out")
    assert [(c.clip.start, c.clip.end) for c in clips] == [(0.0, 3.0), (3.0, 6.0), (6.0, 9.0), (9.0, 12.0)]
    for sample in clips:
        data = samples_of_bytes(tmp_path / "out", sample.key)
        fps = media.probe_video(data).fps
        for j in (0, round(1.5 * fps), round(2.9 * fps)):
            shown = int(np.searchsorted(times, sample.clip.start + j / fps + 1e-9, side="right")) - 1
            pixel = int(media.read_video_frames(data, [j])[0].mean().round())
            assert abs(pixel - 3 * shown) <= 2, (sample.key, j, pixel, shown)


def test_a_last_frame_after_a_long_pause_does_not_lengthen_the_video(tmp_path):
    """A screen recording: 3 s at 10 fps, then nothing until one last frame at 30 s. The video ends one
    frame period after that frame: cut at 5 s it is six clips up to 30.1 s, and a caption at 40-55 s is
    past its end. (Timed by the last frame's time plus its predecessor's gap, it lasted 57 s: six more
    clips of the last frame alone, and that caption was accepted.)"""
    from tests.conftest import variable_frame_rate_mp4

    (tmp_path / "screen.mp4").write_bytes(variable_frame_rate_mp4([i / 10 for i in range(30)] + [30.0], rate=10))
    lines = [{"video": "screen.mp4", "text": "a screen recording"},
             {"video": "screen.mp4", "id": "late", "captions": [{"start": 40.0, "end": 55.0, "text": "after the end"}]}]
    build("video", write_jsonl(tmp_path / "v.jsonl", lines), tmp_path / "out", max_clip_seconds=5.0)
    clips = samples_of(tmp_path / "out")
    assert [(c.clip.start, c.clip.end) for c in clips] == [(5.0 * k, 5.0 * k + 5) for k in range(5)] + [(25.0, 30.1)]
    (rejected,) = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert rejected["reason"] == "caption_out_of_range" and "lasts 30.100 s" in rejected["detail"]
