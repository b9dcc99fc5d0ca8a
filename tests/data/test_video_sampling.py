"""Frame sampling and frame-group timestamps against transformers' Qwen3-VL video processor and processor."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import numpy as np
import pytest

from common.media.frame_sampling import (
    FrameSamplingConfig,
    VideoClip,
    clip_frame_range,
    format_timestamp,
    frame_group_timestamps,
    load_video_clip,
    sample_frame_indices,
)


def _reference_indices(total, fps, cfg):
    from transformers.video_utils import VideoMetadata

    module = importlib.import_module("transformers.models.qwen3_vl.video_processing_qwen3_vl")
    fake = SimpleNamespace(fps=cfg.fps, min_frames=cfg.min_frames, max_frames=cfg.max_frames)
    return module.Qwen3VLVideoProcessor.sample_frames(fake, VideoMetadata(total_num_frames=total, fps=fps), fps=cfg.fps)


@pytest.mark.parametrize("cfg", [FrameSamplingConfig(), FrameSamplingConfig(fps=1.0, min_frames=2, max_frames=16)])
def test_sample_frame_indices_match_reference(cfg):
    rng = np.random.default_rng(0)
    cases = [(1, 30.0), (3, 30.0), (4, 25.0), (60, 30.0), (61, 29.97), (7200, 24.0), (100000, 60.0)]
    cases += [(int(rng.integers(2, 5000)), float(rng.choice([8.0, 12.5, 23.976, 30.0, 59.94]))) for _ in range(200)]
    for total, fps in cases:
        ours = sample_frame_indices(total, fps, cfg)
        assert ours.dtype == np.int64
        np.testing.assert_array_equal(ours, _reference_indices(total, fps, cfg), err_msg=f"{total} frames @ {fps}")


def test_group_timestamps_match_reference_processor():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    rng = np.random.default_rng(1)
    for _ in range(100):
        total, fps = int(rng.integers(1, 3000)), float(rng.choice([10.0, 24.0, 29.97, 30.0]))
        indices = sample_frame_indices(total, fps)
        expected = Qwen3VLProcessor._calculate_timestamps(None, indices.tolist(), fps, 2)
        assert frame_group_timestamps(indices / fps) == expected
        assert VideoClip.from_indices(np.zeros((len(indices), 2, 2, 3), np.uint8), indices, fps).group_timestamps() == expected
    assert format_timestamp(1.45) == "<1.4 seconds>" and format_timestamp(0.25) == "<0.2 seconds>"  # as f"{t:.1f}"


def test_odd_frame_count_repeats_last_time():
    assert frame_group_timestamps([0.0, 0.5, 1.0]) == [0.25, 1.0]


def test_clip_frame_range():
    assert clip_frame_range(100, 10.0, None, None) == (0, 99)
    assert clip_frame_range(100, 10.0, 2.0, 5.0) == (20, 49)
    assert clip_frame_range(100, 10.0, 2.05, None) == (21, 99)
    with pytest.raises(ValueError, match="no frame"):
        clip_frame_range(100, 10.0, 20.0, 30.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(frames=np.zeros((2, 4, 4), np.uint8), frame_times=[0, 1]), "must be \\(T, H, W, 3\\)"),
        (dict(frames=np.zeros((2, 4, 4, 3), np.float32), frame_times=[0, 1]), "uint8"),
        (dict(frames=np.zeros((0, 4, 4, 3), np.uint8), frame_times=[]), "no frames"),
        (dict(frames=np.zeros((2, 4, 4, 3), np.uint8), frame_times=[0]), "frame times"),
        (dict(frames=np.zeros((2, 4, 4, 3), np.uint8), frame_times=[1, 0]), "non-decreasing"),
    ],
)
def test_video_clip_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VideoClip(**kwargs)


def test_bad_sampling_inputs():
    with pytest.raises(ValueError, match="no frames"):
        sample_frame_indices(0, 30.0)
    with pytest.raises(ValueError, match="frame rate"):
        sample_frame_indices(10, 0.0)
    with pytest.raises(ValueError, match="min_frames"):
        FrameSamplingConfig(min_frames=10, max_frames=4)


def test_load_video_clip_from_real_mp4():
    """A real MP4 written by media.encode_video: sampled at 2 fps, frames and times as decoded."""
    from common.media import decode as media
    from common.media.encode import encode_video

    frames = np.zeros((25, 64, 96, 3), np.uint8)
    for i in range(25):
        frames[i, :, :, 0] = i * 10  # the red channel encodes the frame index
    data = encode_video(list(frames), fps=10.0)
    clip = load_video_clip(data, FrameSamplingConfig(fps=2.0))
    expected = sample_frame_indices(25, 10.0)  # 2.5 s at 2 fps -> 5 frames
    assert clip.num_frames == len(expected) == 5
    np.testing.assert_allclose(clip.frame_times, expected / 10.0)
    red = clip.frames[:, 32, 48, 0].astype(int)
    np.testing.assert_allclose(red, expected * 10, atol=6)  # lossy codec
    part = load_video_clip(data, FrameSamplingConfig(fps=2.0, min_frames=2), start=1.0, end=2.0)
    assert part.frame_times[0] == 0.0 and part.frame_times[-1] <= 1.0
    np.testing.assert_allclose(part.frames[:, 32, 48, 0].astype(int), [100, 190], atol=6)


def test_variable_frame_rate_video_is_sampled_and_timed_by_its_timestamps(vfr_mp4):
    """A VFR video (2 s at 30 fps, then 4 s at 5 fps) is not shown at i / average fps: frames are taken
    evenly in time and carry their presentation times; sizing it from its record and timestamps (how packs
    are planned) gives the same times, so the same "<t seconds>" text."""
    from types import SimpleNamespace

    from common.media import decode as media
    from common.media.frame_sampling import video_clip_size
    from tests.conftest import VFR_FRAME_TIMES

    info = media.probe_video(vfr_mp4)
    assert info.num_frames == 80 and info.fps < 15  # the average rate: 30 fps and 5 fps mixed
    np.testing.assert_allclose(media.video_frame_times(vfr_mp4), VFR_FRAME_TIMES, atol=1e-9)
    clip = load_video_clip(vfr_mp4, FrameSamplingConfig(fps=2.0))
    indices = np.rint(clip.frames[:, 24, 32, 0] / 3).astype(int)  # the pixels say which frame was decoded
    np.testing.assert_allclose(clip.frame_times, np.asarray(VFR_FRAME_TIMES)[indices], atol=1e-9)
    assert clip.num_frames == 11 and np.diff(clip.frame_times).max() < 0.7  # evenly in time: 0.58 s apart
    # The uniform rule timed frame 60 (2.0 s) at 4.1 s and spent 8 of 11 samples on the first 2 s.
    assert clip.frame_times[4] == pytest.approx(2.4) and clip.group_timestamps()[-1] == pytest.approx(5.8)
    record = SimpleNamespace(num_frames=info.num_frames, fps=info.fps, width=info.width, height=info.height)
    sized = video_clip_size(record, FrameSamplingConfig(fps=2.0), frame_times=media.video_frame_times(vfr_mp4))
    np.testing.assert_array_equal(sized.frame_times, clip.frame_times)
    part = load_video_clip(vfr_mp4, FrameSamplingConfig(fps=2.0, min_frames=2), start=2.0, end=4.0)
    assert part.frame_times[0] == 0.0 and part.frame_times[-1] == pytest.approx(1.8)  # frames at 2.0 .. 3.8 s


def test_constant_frame_rate_timestamps_keep_the_reference_rule():
    """A constant-rate MP4's timestamps are the grid i / fps: the reference's indices and times, unchanged."""
    from common.media import decode as media
    from common.media.encode import encode_video
    from common.media.frame_sampling import sample_frames, variable_frame_times

    data = encode_video([np.zeros((32, 32, 3), np.uint8)] * 31, fps=30000 / 1001)
    info = media.probe_video(data)
    times = media.video_frame_times(data)
    assert times.shape == (31,) and variable_frame_times(info.num_frames, info.fps, times) is None
    indices, seconds = sample_frames(info.num_frames, info.fps, frame_times=times)
    np.testing.assert_array_equal(indices, sample_frame_indices(info.num_frames, info.fps))
    np.testing.assert_array_equal(seconds, indices / info.fps)
    assert variable_frame_times(31, info.fps, times[:-1]) is None  # a count that disagrees: the grid
