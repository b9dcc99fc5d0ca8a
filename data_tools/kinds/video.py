"""Videos with an optional description and timestamped captions.

Manifest line: ``{"video": path, "text"?: str, "captions"?: [{"start": s, "end": s, "text": str}], "id"?: str}``
(times in seconds from the start of the video). A video needs a text or at least one caption.

Caption times must lie inside the video: ``0 <= start <= end``, ``start`` before the end of the video
and ``end`` at most one frame period (``1 / fps``) past it (container durations are rounded; such an
end is clamped to the duration).

With ``--max-clip-seconds L`` a video longer than ``L`` seconds is cut at frame boundaries into clips
``[kL, (k+1)L)`` (the last one shorter), each re-encoded to H.264 MP4 at the source frame rate and
stored as its own sample. A variable-frame-rate source (a phone in low light, a screen recording: its
frames' presentation times stray from ``i / fps``) is cut into those windows of its time (a frame
held across a cut, a still screen, shows in both clips), and each clip is
re-encoded at its average frame rate showing, at every frame time, the source frame shown then (a
constant-rate clip: training's ``i / fps`` timing of it is its real one), with key ``<line>_<clip>``; captions overlapping a clip are cut to it and
re-timed to the clip's start, and the video's ``text`` is repeated on every clip. A clip left with
neither (a video without ``text`` whose captions miss its span) is not written, since the sample
encoder would skip it at every epoch: the clips kept are numbered ``0, 1, ...`` in time order (keys
and ``Clip.index``/``count``; ``Clip.start``/``end`` say which part of the source each one shows) and
the build counts the ones left out (``dropped_clips`` in index.json's totals). A clip that cannot be
re-encoded rejects the line (``invalid_media``). Duplicate detection uses the source video's bytes.

Any top-level key other than ``video``, ``text``, ``captions`` and ``id`` is rejected (a misspelt
``"caption"`` must not silently drop the captions).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from data_tools.sample_media import LineContext, LineSamples, PreparedSample, SampleMedia, prepare, validate_video
from data_tools.schema import Caption, Clip, Source, VideoSample, sample_key
from data_tools.validation import Rejected, check_keys, check_text, check_total_text, field, number, objects, source_id
from common.media.decode import MediaError, VideoInfo, iter_video_frames, video_frame_times
from common.media.encode import EncodeError, encode_video
from common.media.frame_sampling import variable_frame_times
from common.media.resize import TEMPORAL_PATCH_SIZE

#: The keys of a manifest line.
KEYS = ("id", "video", "text", "captions")


def _parse_captions(record: dict) -> list[Caption]:
    raw = field(record, "captions", list, optional=True) or []
    captions = []
    for _, where, c in objects(raw, "captions"):
        start, end = number(c, "start", where), number(c, "end", where)
        text = check_text(field(c, "text", str, where), f"{where}.text")
        if start < 0 or end < start:
            raise Rejected("caption_out_of_range", f"{where} has start {start} s and end {end} s (need 0 <= start <= end)")
        captions.append(Caption(start, end, text))
    return captions


#: How long a variable-frame-rate video's last frame is shown: the median of the gaps between its last
#: frames, this many gaps (as long as the frames before it were shown; a screen recording's last frame
#: after a 27 s pause, timed by that gap, made 27 s more of clips holding that frame alone).
LAST_FRAME_GAPS = 5


@dataclass(frozen=True)
class SourceTiming:
    """When a source video's frames are shown: ``frame_times`` (seconds, float64, one per frame) for a
    variable frame rate, None when frame ``i`` is shown at ``i / fps``; ``duration`` in seconds (for a
    variable rate the last frame's time plus how long it is shown, see ``LAST_FRAME_GAPS``: the probe's
    ``num_frames / fps`` divides by an average rate containers estimate differently)."""

    num_frames: int
    fps: float
    duration: float
    frame_times: np.ndarray | None = None

    @staticmethod
    def of(data: bytes, info: VideoInfo) -> "SourceTiming":
        times = variable_frame_times(info.num_frames, info.fps, video_frame_times(data))
        if times is None or len(times) < 2:
            return SourceTiming(info.num_frames, info.fps, info.duration)
        last_frame_seconds = float(np.median(np.diff(times[-LAST_FRAME_GAPS - 1:])))
        return SourceTiming(info.num_frames, info.fps, float(times[-1]) + last_frame_seconds, times)

    def time_of(self, frame: int) -> float:
        """Seconds at which frame ``frame`` is first shown (``num_frames``: the end of the video)."""
        if frame >= self.num_frames:
            return self.duration
        return float(self.frame_times[frame]) if self.frame_times is not None else frame / self.fps


def _fit_captions(captions: list[Caption], timing: SourceTiming) -> list[Caption]:
    """Check caption times against the video; clamp ends within one frame period of its end."""
    slack = 1.0 / timing.fps
    fitted = []
    for i, c in enumerate(captions):
        if c.start >= timing.duration or c.end > timing.duration + slack:
            raise Rejected(
                "caption_out_of_range",
                f"captions[{i}] spans {c.start}-{c.end} s but the video lasts {timing.duration:.3f} s",
            )
        fitted.append(Caption(c.start, min(c.end, timing.duration), c.text))
    return fitted


def clip_frame_ranges(num_frames: int, fps: float, max_seconds: float) -> list[tuple[int, int]]:
    """Frame ranges ``[lo, hi)`` of consecutive clips of at most ``max_seconds``, each of at least one
    temporal patch of frames (``TEMPORAL_PATCH_SIZE``: the model takes no shorter video); a shorter last
    piece joins the clip before it (that clip is then up to a frame longer than ``max_seconds``).
    Frame ``i`` is at ``i / fps`` (a variable frame rate is cut by :func:`clip_windows`)."""
    ranges, lo, k = [], 0, 1
    while lo < num_frames:
        hi = min(num_frames, max(lo + TEMPORAL_PATCH_SIZE, math.floor(k * max_seconds * fps + 1e-6)))
        ranges.append((lo, hi))
        lo, k = hi, k + 1
    if len(ranges) > 1 and ranges[-1][1] - ranges[-1][0] < TEMPORAL_PATCH_SIZE:
        ranges[-2:] = [(ranges[-2][0], ranges[-1][1])]
    return ranges


def clip_windows(frame_times: np.ndarray, duration: float, fps: float,
                 max_seconds: float) -> list[tuple[int, int, float, float]]:
    """The clips of a variable-frame-rate video, by time: the windows ``[k max_seconds, (k+1) max_seconds)``
    of its ``duration`` seconds (the last one ending at ``duration``; one too short for a temporal patch
    of frames at ``fps`` joins the one before), each as ``(lo, hi, start, end)``: the source frames
    ``[lo, hi)`` it shows (``lo`` is the frame shown at ``start``, held from before it when no frame
    begins there) and its seconds. ``frame_times``: the frames' presentation times (seconds, from 0).

    Cutting at the first frame of each window instead let a frame held past a window's end (a still
    screen in a screen recording) stretch its clip to the next frame: 10 s under ``max_seconds=3``,
    then clips of two frames while the window count caught up."""
    times = np.asarray(frame_times, dtype=np.float64)
    bounds = [k * max_seconds for k in range(max(1, math.ceil(duration / max_seconds - 1e-9)))] + [duration]
    if len(bounds) > 2 and round((bounds[-1] - bounds[-2]) * fps) < TEMPORAL_PATCH_SIZE:
        del bounds[-2]
    windows = []
    for start, end in zip(bounds, bounds[1:]):
        lo = max(0, int(np.searchsorted(times, start + 1e-9, side="right")) - 1)
        hi = max(lo + 1, int(np.searchsorted(times, end - 1e-9, side="left")))
        windows.append((lo, hi, start, end))
    return windows


def retime_captions(captions: list[Caption], start: float, end: float) -> list[Caption]:
    """Captions overlapping ``[start, end)`` seconds, cut to it and shifted so that ``start`` becomes 0."""
    out = []
    for c in captions:
        overlaps = c.start < end and c.end > start
        instant_inside = c.start == c.end and start <= c.start < end
        if overlaps or instant_inside:
            out.append(Caption(round(max(c.start, start) - start, 6), round(min(c.end, end) - start, 6), c.text))
    return out


@dataclass(frozen=True)
class ClipPlan:
    """One clip to write: source frames ``[lo, hi)``, source seconds ``[start, end)``, its re-timed captions."""

    lo: int
    hi: int
    start: float
    end: float
    captions: tuple[Caption, ...]


def plan_clips(timing: SourceTiming, max_seconds: float, text: str | None,
               captions: list[Caption]) -> tuple[list[ClipPlan], int]:
    """The clips of a video cut at ``max_seconds`` (:func:`clip_frame_ranges`, or :func:`clip_windows`
    for a variable frame rate) that are worth writing, in time order, and the number left out: without
    the video's ``text``, a clip whose span no caption overlaps would be a sample with no text at all,
    which the sample encoder skips."""
    if timing.frame_times is None:
        spans = [(lo, hi, timing.time_of(lo), timing.time_of(hi))
                 for lo, hi in clip_frame_ranges(timing.num_frames, timing.fps, max_seconds)]
    else:
        spans = clip_windows(timing.frame_times, timing.duration, timing.fps, max_seconds)
    plans = []
    for lo, hi, start, end in spans:
        start, end = round(start, 6), round(end, 6)
        plans.append(ClipPlan(lo, hi, start, end, tuple(retime_captions(captions, start, end))))
    kept = [p for p in plans if text is not None or p.captions]
    return kept, len(plans) - len(kept)


def frames_shown_at(frames: Iterator[np.ndarray], frame_times: Sequence[float],
                    times: Sequence[float]) -> Iterator[np.ndarray]:
    """For each of ``times`` (seconds, ascending), the frame of ``frames`` shown then: the last one whose
    presentation time (``frame_times``, ascending, one per frame) is at most that time (the first frame
    before it). Frames are consumed one at a time: a frame held longer than a step repeats, frames
    shown between two times are skipped."""
    current, upcoming, k = next(frames), next(frames, None), 1
    for t in times:
        while upcoming is not None and frame_times[k] <= t + 1e-9:
            current, upcoming, k = upcoming, next(frames, None), k + 1
        yield current


def encode_clip(data: bytes, plan: ClipPlan, timing: SourceTiming, label: str) -> bytes:
    """MP4 bytes of the clip ``plan`` of the video ``data``, at the source's (average) frame rate: its
    frames as they are, or, for a variable frame rate, the frame shown at each ``start + j / fps``.
    Raises Rejected: a frame that does not decode (its MediaError reason), or frames the encoder
    refuses ("invalid_media")."""
    frames = iter_video_frames(data, plan.lo, plan.hi)
    if timing.frame_times is not None:
        count = max(TEMPORAL_PATCH_SIZE, round((plan.end - plan.start) * timing.fps))
        frames = frames_shown_at(frames, timing.frame_times[plan.lo:plan.hi],
                                 [plan.start + j / timing.fps for j in range(count)])
    try:
        return encode_video(frames, timing.fps)
    except MediaError as e:
        raise Rejected(e.reason, f"{label}: {e.detail}") from None
    except EncodeError as e:
        raise Rejected("invalid_media", f"{label} cannot be re-encoded: {e}") from None


def make_samples(record: dict, ctx: LineContext) -> LineSamples:
    """One sample, or one per clip worth writing (with the count of the others). Raises Rejected."""
    check_keys(record, KEYS, "a video line")
    ident = source_id(record)
    text = record.get("text")
    if text is not None:
        text = check_text(text, "text")
    captions = _parse_captions(record)
    if text is None and not captions:
        raise Rejected("empty_text", "a video needs a 'text' or at least one caption")
    check_total_text(([text] if text else []) + [c.text for c in captions], ctx.config.max_text_chars)
    source = Source(ctx.line, ctx.manifest_name, ident)
    media = SampleMedia(ctx)
    given, data, digest, info = media.read_video(field(record, "video", str), "video")
    max_clip = ctx.config.max_clip_seconds
    timing = SourceTiming.of(data, info)
    captions = _fit_captions(captions, timing)
    if max_clip is None or timing.duration <= max_clip + 1e-9:
        name = media.add_video(given, data, digest, info)
        sample = VideoSample(sample_key(ctx.line), source, tuple(media.infos), video=name, text=text, captions=tuple(captions))
        return LineSamples([prepare(sample, media.members)], [digest])
    plans, dropped = plan_clips(timing, max_clip, text, captions)
    if not plans:  # only when caption times round away at the video's very end: nothing would train
        raise Rejected("empty_text", f"the video has no 'text' and no clip of {max_clip} s holds a caption")
    samples = [_clip_sample(ctx, source, given, data, digest, timing, text, plan, index, len(plans))
               for index, plan in enumerate(plans)]
    return LineSamples(samples, [digest], dropped_clips=dropped)


def _clip_sample(ctx: LineContext, source: Source, given: str, data: bytes, digest: str, timing: SourceTiming,
                 text: str | None, plan: ClipPlan, index: int, count: int) -> PreparedSample:
    """Clip ``index`` of the ``count`` kept from the video ``data``, re-encoded and validated. Raises Rejected."""
    label = f"video {given!r}, clip {index} (frames {plan.lo}-{plan.hi - 1})"
    clip_bytes = encode_clip(data, plan, timing, label)
    clip_info = validate_video(clip_bytes, f"video {given!r} clip", str(index), ctx.config.video_sample_fps)
    clip_media = SampleMedia(ctx)
    name = clip_media.add_video(given, clip_bytes, digest, clip_info, ext="mp4")
    sample = VideoSample(
        sample_key(ctx.line, index), source, tuple(clip_media.infos), video=name, text=text,
        captions=plan.captions, clip=Clip(index, count, plan.start, plan.end),
    )
    return prepare(sample, clip_media.members)
