"""The one media decoding module: images (PIL) and videos (decord first, PyAV as the fallback).

Everything that turns image or video bytes into pixels goes through here: the offline shard builder
(``data_tools``), the training loader and the sample encoder. Every failure is a :class:`MediaError`
whose message names the input (a path, or ``<N bytes in memory>``) and the reason, and whose ``reason``
attribute is a short machine-readable code (see ``REASONS``), so batch tools can count rejections.

Units: sizes in pixels, times in seconds, frame indices 0-based in presentation order.

Video backends: decord is fast and seeks well, but its bundled FFmpeg has no AV1 decoder and it fails
on some containers; PyAV (the system FFmpeg of the ``av`` wheel, with dav1d) is the fallback. Both
backends count frames the same way for ordinary files; :attr:`VideoInfo.backend` says which one
answered, and :func:`read_video_frames` tries them in the same order.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.media.resize import MAX_ASPECT_RATIO

#: Smallest accepted image side in pixels (Qwen's processors reject images below 28 px); video frames
#: are held to it too (:func:`check_video_frame_size`).
MIN_IMAGE_SIDE = 28
#: Default decompression-bomb limit: images with more pixels than this are rejected from the header,
#: before any pixel is decoded. 40 megapixels covers every photo camera and most scans.
DEFAULT_MAX_PIXELS = 40_000_000

#: Reason codes carried by :class:`MediaError` (``MediaError.reason``).
REASONS = (
    "missing_file",  # the path does not exist
    "unreadable_file",  # exists but cannot be read (directory, permissions, I/O error)
    "image_decode_error",  # not an image, truncated or corrupt pixel data
    "decompression_bomb",  # more pixels than allowed (checked before decoding)
    "image_too_small",  # an image or video frame side below MIN_IMAGE_SIDE
    "aspect_ratio",  # long side / short side above MAX_ASPECT_RATIO (images and video frames)
    "video_decode_error",  # neither decord nor PyAV can open or decode it
    "no_usable_frames",  # opens, but has no frame (or the requested frames do not exist)
    "invalid_media",  # anything else (default of hand-made errors)
)

MediaSource = str | os.PathLike | bytes


class MediaError(ValueError):
    """An image or video that cannot be used. ``str(error)`` names the input and the reason.

    Attributes:
        reason: one of ``REASONS``.
        source: a description of the input (its path, or ``<N bytes in memory>``).
        detail: the reason in words, without the source.
    """

    def __init__(self, message: str, *, reason: str = "invalid_media", source: str = "", detail: str = ""):
        super().__init__(message)
        self.reason = reason
        self.source = source
        self.detail = detail or message


def _fail(source: str, reason: str, detail: str) -> MediaError:
    return MediaError(f"{source}: {detail}", reason=reason, source=source, detail=detail)


def describe_source(src: MediaSource) -> str:
    """How error messages name an input: its path, or ``<N bytes in memory>``."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes in memory>"
    return os.fspath(src)


def _check_path(src: MediaSource, source: str) -> None:
    """Turn a missing or unreadable path into the right MediaError before any decoder sees it."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return
    path = os.fspath(src)
    if not os.path.exists(path):
        raise _fail(source, "missing_file", "file does not exist")
    if not os.path.isfile(path):
        raise _fail(source, "unreadable_file", "not a regular file")
    if not os.access(path, os.R_OK):
        raise _fail(source, "unreadable_file", "file is not readable (permissions)")


# ----------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    """What an image header says, without decoding pixels. ``format`` is PIL's name ("JPEG", "PNG")."""

    format: str
    width: int
    height: int


def recorded_max_pixels(width: int, height: int) -> int:
    """The decompression-bomb limit for decoding an image a shard set recorded as ``width`` x ``height``
    pixels: the default, or the image's own size where the build allowed more (``--max-pixels``). The
    build checked the image and its sha256 pins the bytes: a reader must not reject what it accepted."""
    return max(DEFAULT_MAX_PIXELS, int(width) * int(height))


def check_image_size(width: int, height: int, *, max_pixels: int = DEFAULT_MAX_PIXELS, source: str = "image") -> None:
    """Raise MediaError unless ``width`` x ``height`` pixels is an acceptable image size.

    Rules: at most ``max_pixels`` pixels (decompression bomb), both sides at least ``MIN_IMAGE_SIDE``,
    long side / short side at most ``MAX_ASPECT_RATIO``.
    """
    if width * height > max_pixels:
        raise _fail(
            source,
            "decompression_bomb",
            f"{width}x{height} = {width * height} pixels is above the limit of {max_pixels} pixels",
        )
    _check_sides(width, height, source)


def check_video_frame_size(width: int, height: int, *, source: str = "video") -> None:
    """Raise MediaError unless video frames of ``width`` x ``height`` pixels are usable: the side and
    aspect-ratio rules of :func:`check_image_size` (reasons "image_too_small", "aspect_ratio"), so that
    a frame is held to the rules of a still image. No pixel limit: a video frame is not a
    decompression bomb (its decoder allocates what the stream header says, frame by frame)."""
    _check_sides(width, height, source)


def _check_sides(width: int, height: int, source: str) -> None:
    """Both sides at least ``MIN_IMAGE_SIDE``, long side / short side at most ``MAX_ASPECT_RATIO``."""
    if min(width, height) < MIN_IMAGE_SIDE:
        raise _fail(source, "image_too_small", f"{width}x{height} pixels has a side below {MIN_IMAGE_SIDE} px")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise _fail(
            source,
            "aspect_ratio",
            f"{width}x{height} pixels has aspect ratio {max(width, height) / min(width, height):.1f} "
            f"(above {MAX_ASPECT_RATIO})",
        )


def _open_image(src: MediaSource, source: str) -> Image.Image:
    _check_path(src, source)
    fp = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src)
    try:
        with warnings.catch_warnings():
            # We enforce our own (lower) limit from the header; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except Image.DecompressionBombError as e:
        raise _fail(source, "decompression_bomb", f"PIL refuses to open it: {e}") from None
    except UnidentifiedImageError:
        raise _fail(source, "image_decode_error", "not a recognised image format") from None
    except OSError as e:
        raise _fail(source, "unreadable_file", f"cannot be read: {e}") from None
    except Exception as e:  # PIL raises many types for corrupt headers (SyntaxError, ValueError, ...)
        raise _fail(source, "image_decode_error", f"corrupt image header: {type(e).__name__}: {e}") from None


def probe_image(src: MediaSource) -> ImageInfo:
    """Read only the header of an image: its format and size in pixels. Raises MediaError."""
    source = describe_source(src)
    with _open_image(src, source) as im:
        return ImageInfo(format=str(im.format or "unknown"), width=im.size[0], height=im.size[1])


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB copy of ``im``; transparent pixels (an alpha band, or a palette's or a colour key's ``tRNS``)
    are composited onto white (not black, as convert() does); 16-bit and 32-bit integer greys are scaled
    to 8 bits (convert() clips them: mid-grey came out white), as are float greys in [0, 1]."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        grey = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and grey.max(initial=0) > 255):
            grey = grey / 257.0  # 0..65535 -> 0..255 (32-bit integer greys above 255: taken as 16-bit)
        elif im.mode == "F" and grey.max(initial=0) <= 1.0:
            grey = grey * 255.0
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = "A" in im.getbands() or im.info.get("transparency") is not None
    if im.mode == "RGB" and not has_alpha:
        return im
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(src: MediaSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image fully and return it as an RGB ``PIL.Image`` (EXIF orientation applied).

    ``src`` is a path or the encoded bytes. Validation, in this order: the file exists and is
    readable; the header is an image; size rules of :func:`check_image_size` (checked from the header,
    BEFORE decoding, so a decompression bomb never allocates its pixels); then every pixel is decoded,
    so a truncated or corrupt file fails here rather than in a training step. (PIL's global
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False, its default, for truncation to be detected.)
    The size rules are checked again after EXIF rotation (a rotation swaps width and height only).
    Animated images yield their first frame. Raises MediaError.
    """
    source = describe_source(src)
    with _open_image(src, source) as im:
        width, height = im.size
        check_image_size(width, height, max_pixels=max_pixels, source=source)
        try:
            im.load()
            rgb = _to_rgb(ImageOps.exif_transpose(im))
            rgb.load()
        except Exception as e:
            raise _fail(source, "image_decode_error", f"pixel data cannot be decoded: {type(e).__name__}: {e}") from None
    return rgb


# ----------------------------------------------------------------------------------------------------
# Videos
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """What a video is, as seen by the backend that opened it.

    ``num_frames``: decodable frames (container count, or demuxed packets when the container has none);
    ``fps``: average frames per second; ``duration``: ``num_frames / fps`` seconds (so that frame ``i``
    lives at ``i / fps`` seconds and every frame lies inside ``[0, duration)``); ``width``/``height``:
    pixels; ``backend``: "decord" or "pyav".
    """

    num_frames: int
    fps: float
    duration: float
    width: int
    height: int
    backend: str


@contextlib.contextmanager
def _silenced_stderr():
    """Send file descriptor 2 to /dev/null for a moment.

    decord logs "ERROR opening: <uri>" from C++ when it cannot open a video, and for an in-memory
    source the uri IS the video bytes: a corrupt 100 MB upload would be dumped into the logs. The
    Python exception still carries the reason. (fd 2 is process-wide: other threads' stderr output
    during the open is lost too, which is why this is only used around decord's open of bytes.)
    """
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (some daemons): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _decord_reader(src: MediaSource):
    import decord  # lazy: decord loads its own FFmpeg

    if isinstance(src, (bytes, bytearray, memoryview)):
        with _silenced_stderr():
            return decord.VideoReader(io.BytesIO(bytes(src)), ctx=decord.cpu(0), num_threads=1)
    return decord.VideoReader(os.fspath(src), ctx=decord.cpu(0), num_threads=1)


def _decord_to_numpy(batch) -> np.ndarray:
    # decord's bridge may have been switched to torch by someone else; accept every bridge.
    if hasattr(batch, "asnumpy"):
        return batch.asnumpy()
    if hasattr(batch, "numpy"):
        return batch.numpy()
    return np.asarray(batch)


def _pyav_open(src: MediaSource):
    import av

    fp = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src)
    return av.open(fp, mode="r")


def _probe_decord(src: MediaSource) -> VideoInfo:
    vr = _decord_reader(src)
    num_frames = len(vr)
    fps = float(vr.get_avg_fps())
    if num_frames <= 0 or not math.isfinite(fps) or fps <= 0:
        raise RuntimeError(f"decord reports {num_frames} frames at {fps} fps")
    first = _decord_to_numpy(vr.get_batch([0]))  # decodes one frame: proves the stream decodes
    height, width = int(first.shape[1]), int(first.shape[2])
    return VideoInfo(num_frames, fps, num_frames / fps, width, height, "decord")


def _probe_pyav(src: MediaSource) -> VideoInfo:
    with _pyav_open(src) as container:
        if not container.streams.video:
            raise RuntimeError("the container has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        num_frames = int(stream.frames or 0)
        if num_frames <= 0:  # e.g. Matroska/WebM store no frame count: count the packets instead
            num_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
        fps = float(rate) if rate else 0.0
        if fps <= 0 and stream.duration and stream.time_base and num_frames > 0:
            fps = num_frames / float(stream.duration * stream.time_base)
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
    if num_frames <= 0 or not math.isfinite(fps) or fps <= 0:
        raise RuntimeError(f"PyAV reports {num_frames} frames at {fps} fps")
    with _pyav_open(src) as container:  # decode one frame: proves a decoder exists and works
        stream = container.streams.video[0]
        frame = next(iter(container.decode(stream)), None)
        if frame is None:
            raise RuntimeError("no frame could be decoded")
        width, height = frame.width, frame.height
    return VideoInfo(num_frames, fps, num_frames / fps, width, height, "pyav")


def probe_video(src: MediaSource) -> VideoInfo:
    """Frame count, fps, duration (s) and size (px) of a video, decoding only its first frame.

    decord first, PyAV when decord cannot open or decode it (e.g. AV1). Raises MediaError
    ("missing_file", "unreadable_file", "video_decode_error" when neither backend can decode it).
    """
    source = describe_source(src)
    _check_path(src, source)
    errors = []
    for backend, probe in (("decord", _probe_decord), ("pyav", _probe_pyav)):
        try:
            return probe(src)
        except Exception as e:  # both libraries raise assorted RuntimeError/OSError/ValueError types
            errors.append(f"{backend}: {_short(e)}")
    raise _fail(source, "video_decode_error", "cannot decode the video (" + "; ".join(errors) + ")")


def _frame_times_decord(src: MediaSource) -> np.ndarray:
    vr = _decord_reader(src)
    return np.asarray(vr.get_frame_timestamp(list(range(len(vr)))), dtype=np.float64).reshape(-1, 2)[:, 0]


def _frame_times_pyav(src: MediaSource) -> np.ndarray:
    with _pyav_open(src) as container:
        stream = container.streams.video[0]
        # Discarded packets (an edit list cutting the start, as `ffmpeg -ss ... -c copy` leaves) are not shown.
        pts = [packet.pts for packet in container.demux(stream) if packet.size > 0 and not packet.is_discard]
        if any(p is None for p in pts):
            raise RuntimeError("a packet has no presentation timestamp")
        # Packets come in decode order (B-frames reorder): sorted, they are the frames in presentation order.
        return np.sort(np.asarray(pts, dtype=np.float64)) * float(stream.time_base)


def video_frame_times(src: MediaSource) -> np.ndarray | None:
    """Presentation time in seconds of every frame of a video, from its first frame (which is at 0.0):
    float64 ``(num_frames,)``, increasing, frame ``i`` in the order :func:`read_video_frames` counts.

    Read from the container's timestamps, without decoding a frame (a demux pass: ~20 ms for a 5 MB
    clip); PyAV first (exact: the packets' integer pts times the stream's time base; decord rounds its
    times to float32), decord as the fallback. A variable-frame-rate video (phones in low light, screen
    recordings) does not show frame ``i`` at ``i / fps``: these are its true times. None when neither
    backend gives usable times (missing or non-finite timestamps): the caller then assumes even spacing.
    A caller checks that they count the frames it decodes (``frame_sampling.variable_frame_times``).
    """
    source = describe_source(src)
    _check_path(src, source)
    for read in (_frame_times_pyav, _frame_times_decord):
        try:
            times = read(src)
        except Exception:  # an unreadable video fails in probe_video / read_video_frames, with its reason
            continue
        # Strictly increasing: decord gives every frame of some AVI files one (finite) sentinel time.
        if times.size and np.all(np.isfinite(times)) and np.all(np.diff(times) > 0):
            return times - times[0]
    return None


def _short(e: Exception, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _read_frames_pyav(src: MediaSource, indices: Sequence[int]) -> np.ndarray:
    wanted = set(indices)
    last = max(wanted)
    found: dict[int, np.ndarray] = {}
    decoded = 0  # frames decoded so far: all of the file's when one is missing (the loop ran to its end)
    with _pyav_open(src) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            decoded = i + 1
            if i in wanted:
                found[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    missing = sorted(wanted - found.keys())
    if missing:
        raise IndexError(f"frame index {missing[0]} is beyond the {decoded} decodable frames")
    return np.stack([found[i] for i in indices])


def read_video_frames(src: MediaSource, indices: Sequence[int]) -> np.ndarray:
    """Decode the frames at ``indices`` (0-based, any order, repeats allowed).

    Returns a ``(N, H, W, 3)`` uint8 RGB array in the order of ``indices``. decord first, PyAV as the
    fallback. Raises MediaError ("no_usable_frames" for an index past the end, "video_decode_error"
    when neither backend decodes the frames).
    """
    source = describe_source(src)
    indices = [int(i) for i in indices]
    if not indices:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    if min(indices) < 0:
        raise _fail(source, "no_usable_frames", f"negative frame index {min(indices)}")
    _check_path(src, source)
    errors = []
    try:
        vr = _decord_reader(src)
        if max(indices) >= len(vr):
            raise _fail(source, "no_usable_frames", f"frame index {max(indices)} is past the last frame ({len(vr) - 1})")
        return _decord_to_numpy(vr.get_batch(indices)).astype(np.uint8, copy=False)
    except MediaError:
        raise
    except Exception as e:
        errors.append(f"decord: {_short(e)}")
    try:
        return _read_frames_pyav(src, indices)
    except IndexError as e:
        raise _fail(source, "no_usable_frames", str(e)) from None
    except Exception as e:
        errors.append(f"pyav: {_short(e)}")
    raise _fail(source, "video_decode_error", "cannot decode the frames (" + "; ".join(errors) + ")")


def iter_video_frames(src: MediaSource, start: int, stop: int, *, chunk: int = 16) -> Iterator[np.ndarray]:
    """Yield the frames ``start <= i < stop`` one at a time as ``(H, W, 3)`` uint8 RGB arrays.

    Streams (``chunk`` frames in memory at most), so long clips can be re-encoded without holding them.
    decord first, PyAV as the fallback (chosen before the first frame is yielded). Raises MediaError.
    """
    source = describe_source(src)
    _check_path(src, source)
    if not 0 <= start <= stop:
        raise _fail(source, "no_usable_frames", f"bad frame range [{start}, {stop})")
    try:
        vr = _decord_reader(src)
        if stop > len(vr):
            raise _fail(source, "no_usable_frames", f"frame range [{start}, {stop}) is past the last frame ({len(vr) - 1})")
        first = _decord_to_numpy(vr.get_batch(list(range(start, min(stop, start + chunk)))))
    except MediaError:
        raise
    except Exception:
        yield from _iter_frames_pyav(src, source, start, stop)
        return
    yield from first
    for lo in range(start + chunk, stop, chunk):
        try:
            batch = _decord_to_numpy(vr.get_batch(list(range(lo, min(stop, lo + chunk)))))
        except Exception as e:
            raise _fail(source, "video_decode_error", f"cannot decode frames from {lo}: {_short(e)}") from None
        yield from batch


def _iter_frames_pyav(src: MediaSource, source: str, start: int, stop: int) -> Iterator[np.ndarray]:
    try:
        container = _pyav_open(src)
    except Exception as e:
        raise _fail(source, "video_decode_error", f"cannot open the video: {_short(e)}") from None
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        i = -1
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i >= stop:
                    break
                if i >= start:
                    yield frame.to_ndarray(format="rgb24")
        except Exception as e:
            raise _fail(source, "video_decode_error", f"cannot decode frame {i + 1}: {_short(e)}") from None
    if i + 1 < stop:
        raise _fail(source, "no_usable_frames", f"only {i + 1} frames decode, needed frames up to {stop - 1}")


def frame_indices_at_fps(
    num_frames: int, video_fps: float, target_fps: float = 2.0, start: float = 0.0, end: float | None = None
) -> list[int]:
    """Indices of the frames seen when sampling ``target_fps`` frames per second within [start, end) s.

    Sample times are ``start + k / target_fps``; each maps to the frame shown at that time,
    ``floor(t * video_fps)`` (frame ``i`` covers ``[i / fps, (i + 1) / fps)``). ``end`` defaults to the
    video's duration ``num_frames / video_fps``. Sorted, without repeats; empty when no frame is in range.
    """
    if num_frames <= 0 or video_fps <= 0 or target_fps <= 0:
        return []
    duration = num_frames / video_fps
    end = duration if end is None else min(end, duration)
    indices: list[int] = []
    k = 0
    while True:
        t = start + k / target_fps
        if t >= end - 1e-9:
            break
        i = min(int(math.floor(t * video_fps + 1e-6)), num_frames - 1)
        if not indices or indices[-1] != i:
            indices.append(i)
        k += 1
    return indices
