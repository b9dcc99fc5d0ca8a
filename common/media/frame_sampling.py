"""Which frames of a video Qwen3-VL sees, and at what time: frame sampling and frame-group timestamps.

Qwen3-VL samples a video uniformly at ``fps`` frames per second (default 2), clamped to
``[min_frames, max_frames]`` and to the frames the video has; pairs of consecutive sampled frames
(the temporal patch, 2) become one frame group, announced in the text by ``<t seconds>`` where ``t`` is
the mean time of the group's two frames. These rules mirror transformers' ``Qwen3VLVideoProcessor.
sample_frames`` and ``Qwen3VLProcessor._calculate_timestamps``.

Decoding is not done here: :func:`load_video_clip` asks ``common.media.decode`` (the one media module);
:func:`video_clip_size` gives the same clip's frame times and size from a video's probe (or its shard
record) without opening it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.media.resize import TEMPORAL_PATCH_SIZE


@dataclass(frozen=True)
class FrameSamplingConfig:
    """How many frames to take from a video.

    fps: sampled frames per second of video time.
    min_frames, max_frames: bounds on the number of sampled frames (a video with fewer frames than
        ``min_frames`` gives all of its frames).
    """

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768

    def __post_init__(self):
        if not self.fps > 0:
            raise ValueError(f"FrameSamplingConfig.fps must be positive, got {self.fps}")
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(
                f"FrameSamplingConfig needs 1 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}"
            )


def num_sampled_frames(total_frames: int, video_fps: float, config: FrameSamplingConfig = FrameSamplingConfig()) -> int:
    """Number of frames sampled from ``total_frames`` frames recorded at ``video_fps`` frames per second."""
    if total_frames <= 0:
        raise ValueError(f"video has no frames (total_frames={total_frames})")
    if not video_fps > 0:
        raise ValueError(f"video frame rate must be positive, got {video_fps}")
    wanted = int(total_frames / video_fps * config.fps)
    return min(max(wanted, config.min_frames), config.max_frames, total_frames)


def sample_frame_indices(
    total_frames: int, video_fps: float, config: FrameSamplingConfig = FrameSamplingConfig()
) -> np.ndarray:
    """0-based indices (int64, ascending) of the frames to decode: uniform over the whole video."""
    count = num_sampled_frames(total_frames, video_fps, config)
    return np.linspace(0, total_frames - 1, count).round().astype(np.int64)


def frame_group_timestamps(frame_times: Sequence[float], temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> list[float]:
    """Seconds of each frame group: the mean of its first and last frame's time.

    ``frame_times`` are the sampled frames' times in seconds. An incomplete last group is completed by
    repeating the last frame, as the vision encoder does with the pixels.
    """
    times = [float(t) for t in frame_times]
    if not times:
        raise ValueError("a video needs at least one frame time")
    if len(times) % temporal_patch_size:
        times.extend([times[-1]] * (temporal_patch_size - len(times) % temporal_patch_size))
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def format_timestamp(seconds: float) -> str:
    """The text announcing a frame group: ``<{seconds:.1f} seconds>``, as Qwen3-VL writes it."""
    return f"<{seconds:.1f} seconds>"


# One timed caption line of a video sample; fields ``start``, ``end`` (seconds from the clip start), ``text``.
CAPTION_FORMAT = "<{start:.1f} - {end:.1f} seconds> {text}"


@dataclass
class VideoClip:
    """Decoded, sampled frames of one video (or one clip of it), ready for the vision encoder.

    frames: uint8 array (T, H, W, 3), RGB.
    frame_times: float64 array (T,), seconds from the clip start of each frame, non-decreasing.
    """

    frames: np.ndarray
    frame_times: np.ndarray

    def __post_init__(self):
        frames = np.asarray(self.frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"video frames must be (T, H, W, 3), got shape {frames.shape}")
        if frames.dtype != np.uint8:
            raise ValueError(f"video frames must be uint8, got {frames.dtype}")
        if frames.shape[0] == 0:
            raise ValueError("video clip has no frames")
        times = np.asarray(self.frame_times, dtype=np.float64)
        if times.shape != (frames.shape[0],):
            raise ValueError(f"{frames.shape[0]} frames but {times.shape} frame times")
        if not np.all(np.isfinite(times)) or np.any(np.diff(times) < 0) or times[0] < 0:
            raise ValueError("frame times must be finite, non-negative and non-decreasing seconds")
        self.frames, self.frame_times = frames, times

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    def group_timestamps(self, temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> list[float]:
        return frame_group_timestamps(self.frame_times, temporal_patch_size)

    @classmethod
    def from_indices(cls, frames: np.ndarray, indices: Sequence[int], video_fps: float, start: float = 0.0) -> "VideoClip":
        """Frames decoded at ``indices`` of a video recorded at ``video_fps``; times relative to ``start`` s."""
        return cls(frames=frames, frame_times=sampled_frame_times(indices, video_fps, start))


@dataclass(frozen=True)
class VideoClipSize:
    """What :func:`load_video_clip` would return, without decoding the frames: their times (seconds from
    the clip start, as :attr:`VideoClip.frame_times`) and their size in pixels. Enough to count a
    clip's patches and tokens (``common.media.vision_inputs.video_grid``)."""

    frame_times: np.ndarray
    height: int
    width: int

    @property
    def num_frames(self) -> int:
        return int(len(self.frame_times))

    def group_timestamps(self, temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> list[float]:
        return frame_group_timestamps(self.frame_times, temporal_patch_size)


def sampled_frame_times(indices: Sequence[int], video_fps: float, start: float = 0.0) -> np.ndarray:
    """Seconds from ``start`` of the frames at ``indices`` of a video recorded at ``video_fps`` (>= 0)."""
    if not video_fps > 0:
        raise ValueError(f"video frame rate must be positive, got {video_fps}")
    return np.maximum(np.asarray(indices, dtype=np.float64) / video_fps - start, 0.0)


def clip_frame_range(total_frames: int, video_fps: float, start: float | None, end: float | None) -> tuple[int, int]:
    """First and last (inclusive) frame index whose time ``index / video_fps`` lies in ``[start, end)`` seconds."""
    first = 0 if start is None else max(0, math.ceil(start * video_fps - 1e-6))
    last = total_frames - 1 if end is None else min(total_frames - 1, math.ceil(end * video_fps - 1e-6) - 1)
    if last < first:
        raise ValueError(f"no frame lies in [{start}, {end}) seconds of a {total_frames}-frame {video_fps} fps video")
    return first, last


def load_video_clip(
    src: str | os.PathLike | bytes,
    config: FrameSamplingConfig = FrameSamplingConfig(),
    *,
    start: float | None = None,
    end: float | None = None,
) -> VideoClip:
    """Probe ``src``, sample its frames (optionally only those in ``[start, end)`` seconds) and decode them.

    Frame times are relative to ``start`` (0 for a whole video), so timestamps in the text match captions
    re-timed to the clip. Raises ``common.media.decode.MediaError`` (a ``ValueError``) for bad videos.
    """
    from common.media import decode as media  # the one decoding module; imported here so sampling has no decoder deps

    info = media.probe_video(src)
    if start is None and end is None:
        indices = sample_frame_indices(info.num_frames, info.fps, config)
        offset = 0.0
    else:
        first, last = clip_frame_range(info.num_frames, info.fps, start, end)
        count = num_sampled_frames(last - first + 1, info.fps, config)
        indices = first + np.linspace(0, last - first, count).round().astype(np.int64)
        offset = float(start or 0.0)
    frames = media.read_video_frames(src, indices.tolist())
    return VideoClip.from_indices(frames, indices, info.fps, start=offset)


def video_clip_size(info, config: FrameSamplingConfig = FrameSamplingConfig()) -> VideoClipSize:
    """What :func:`load_video_clip` returns for a whole video, without opening it: the frames it samples
    from a video described by ``info`` (anything with ``num_frames``, ``fps``, ``width`` and ``height``:
    a probe's ``VideoInfo``, or a shard's media record, which holds the build time's probe)."""
    indices = sample_frame_indices(info.num_frames, info.fps, config)
    return VideoClipSize(sampled_frame_times(indices, info.fps), int(info.height), int(info.width))
