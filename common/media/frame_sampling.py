"""Which frames of a video Qwen3-VL sees, and at what time: frame sampling and frame-group timestamps.

Qwen3-VL samples a video uniformly at ``fps`` frames per second (default 2), clamped to
``[min_frames, max_frames]`` and to the frames the video has; pairs of consecutive sampled frames
(the temporal patch, 2) become one frame group, announced in the text by ``<t seconds>`` where ``t`` is
the mean time of the group's two frames. These rules mirror transformers' ``Qwen3VLVideoProcessor.
sample_frames`` and ``Qwen3VLProcessor._calculate_timestamps``, which take frame ``i`` to be shown at
``i / fps`` (``fps`` the average frame rate). A variable-frame-rate video (a phone in low light, a
screen recording) breaks that: its frames are sampled evenly in *time* instead, and timed by their
presentation timestamps (:func:`sample_frames`); a constant-rate video gets exactly the reference's
frames and times.

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


#: A video's frames count as evenly spaced (frame ``i`` at ``i / fps``) while every presentation timestamp
#: lies within this many seconds of that grid: half the 0.1 s resolution of the ``<t seconds>`` text, so
#: a constant-rate video's timestamp jitter (a 1/1000 s time base) never counts as variable.
UNIFORM_TIMING_TOLERANCE_S = 0.05


def num_sampled_frames(total_frames: int, video_fps: float, config: FrameSamplingConfig = FrameSamplingConfig()) -> int:
    """Number of frames sampled from ``total_frames`` frames recorded at ``video_fps`` frames per second."""
    if not video_fps > 0:
        raise ValueError(f"video frame rate must be positive, got {video_fps}")
    return _sample_count(total_frames / video_fps, total_frames, config)


def _sample_count(seconds: float, total_frames: int, config: FrameSamplingConfig) -> int:
    """Frames sampled from ``seconds`` of video holding ``total_frames`` frames (the reference's rule)."""
    if total_frames <= 0:
        raise ValueError(f"video has no frames (total_frames={total_frames})")
    wanted = int(seconds * config.fps)
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


def variable_frame_times(total_frames: int, video_fps: float, frame_times: Sequence[float] | None) -> np.ndarray | None:
    """``frame_times`` (seconds of every frame, the first at 0: ``decode.video_frame_times``) as float64
    when they stray from the even grid ``i / video_fps`` by more than ``UNIFORM_TIMING_TOLERANCE_S``;
    None when the grid describes the video, or when the times are missing or do not count
    ``total_frames`` frames (then the grid is all there is)."""
    if frame_times is None:
        return None
    times = np.asarray(frame_times, dtype=np.float64)
    if times.shape != (total_frames,):
        return None
    grid = np.arange(total_frames, dtype=np.float64) / video_fps
    return times if np.abs(times - grid).max(initial=0.0) > UNIFORM_TIMING_TOLERANCE_S else None


def _nearest_frames(times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Index of the frame whose time in ``times`` (non-decreasing) is nearest to each target (ties: earlier)."""
    after = np.clip(np.searchsorted(times, targets, side="left"), 1, len(times) - 1)
    before = after - 1
    return np.where(times[after] - targets < targets - times[before], after, before).astype(np.int64)


def sample_frames(
    total_frames: int,
    video_fps: float,
    config: FrameSamplingConfig = FrameSamplingConfig(),
    *,
    frame_times: Sequence[float] | None = None,
    start: float | None = None,
    end: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The frames to decode from a video (optionally only those in ``[start, end)`` seconds) and their
    times: (int64 indices, ascending; float64 seconds from ``start``, 0 for a whole video).

    ``frame_times``: the presentation time of every frame (``decode.video_frame_times``), or None.
    Evenly spaced frames (:func:`variable_frame_times` is None) follow the reference: indices spread
    evenly over the frames, frame ``i`` at ``i / video_fps``. A variable frame rate is sampled evenly
    in time: ``count`` target times from the first to the last frame in range, each taking the nearest
    frame and its own time (a frame held longer than the sampling step may be taken twice). ``count``
    is the reference's, from the span's seconds.
    """
    times = variable_frame_times(total_frames, video_fps, frame_times)
    offset = float(start or 0.0)
    if times is None:
        if start is None and end is None:
            indices = sample_frame_indices(total_frames, video_fps, config)
        else:
            first, last = clip_frame_range(total_frames, video_fps, start, end)
            count = num_sampled_frames(last - first + 1, video_fps, config)
            indices = first + np.linspace(0, last - first, count).round().astype(np.int64)
        return indices, sampled_frame_times(indices, video_fps, offset)
    first = 0 if start is None else int(np.searchsorted(times, start - 1e-6, side="left"))
    stop = total_frames if end is None else int(np.searchsorted(times, end - 1e-6, side="left"))
    if stop <= first:
        raise ValueError(f"no frame lies in [{start}, {end}) seconds of a {total_frames}-frame video")
    # The span lasts from its first frame to the end of its last (one average frame period).
    seconds = times[stop - 1] - times[first] + 1.0 / video_fps
    count = _sample_count(seconds, stop - first, config)
    targets = np.linspace(times[first], times[stop - 1], count)
    indices = first + _nearest_frames(times[first:stop], targets) if stop - first > 1 else np.full(count, first)
    return indices.astype(np.int64), np.maximum(times[indices] - offset, 0.0)


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
    indices, times = sample_frames(info.num_frames, info.fps, config, frame_times=media.video_frame_times(src),
                                   start=start, end=end)
    return VideoClip(frames=media.read_video_frames(src, indices.tolist()), frame_times=times)


def video_clip_size(info, config: FrameSamplingConfig = FrameSamplingConfig(), frame_times: Sequence[float] | None = None
                    ) -> VideoClipSize:
    """What :func:`load_video_clip` returns for a whole video, without decoding it: the frames it samples
    from a video described by ``info`` (anything with ``num_frames``, ``fps``, ``width`` and ``height``:
    a probe's ``VideoInfo``, or a shard's media record, which holds the build time's probe) whose frames
    are shown at ``frame_times`` (``decode.video_frame_times`` of the same video; None: evenly spaced).
    The same ``frame_times`` as :func:`load_video_clip` reads give the same frame times, so the same text."""
    _, times = sample_frames(info.num_frames, info.fps, config, frame_times=frame_times)
    return VideoClipSize(times, int(info.height), int(info.width))
