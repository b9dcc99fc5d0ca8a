"""Media of one sample: read each file once, validate it, name it, and turn the sample into tar members.

Used by every ``data_tools.kinds`` module, so all builds check media the same way:

* images: :func:`common.media.decode.load_image` (exists, decodes fully, bomb/size/aspect rules), then
  either the original bytes, or a ``smart_resize`` downscale when ``--downscale-pixels`` asks for it;
* videos: :func:`common.media.decode.probe_video` (decord, PyAV fallback), at least one frame at
  ``--video-sample-fps``, frames held to the image side and aspect rules, and the middle and last
  sampled frames and the video's last frame must decode too.

Duplicates are detected on the sha256 of the SOURCE file bytes (``source_digests``); the build driver
rejects a line whose media repeat an earlier accepted line's.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass

from PIL import Image

from data_tools.config import BuildConfig
from data_tools.schema import Media, Sample, media_part_name, sample_to_json
from data_tools.validation import Rejected
from common.media.decode import (
    MediaError,
    VideoInfo,
    check_video_frame_size,
    frame_indices_at_fps,
    load_image,
    probe_image,
    probe_video,
    read_video_frames,
)
from common.media.resize import FACTOR, TEMPORAL_PATCH_SIZE, smart_resize

#: PIL format -> file extension of stored images.
IMAGE_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
#: Video file extensions kept as they are; anything else is stored as ".video" (the bytes decide).
VIDEO_EXTENSIONS = {"mp4", "m4v", "mov", "mkv", "webm", "avi", "flv", "mpg", "mpeg", "ts", "wmv", "3gp", "ogv"}


@dataclass(frozen=True)
class LineContext:
    """What a kind module needs to know about the manifest line it turns into samples."""

    line: int  # 1-based
    manifest_name: str  # the manifest's file name, recorded in each sample's source
    base_dir: str  # folder that relative media paths are relative to
    config: BuildConfig
    # Media an importer read from its input container (a tar member, a parquet cell), by the reference
    # its record uses in place of a path; looked up before any file (SampleMedia.read).
    media: Mapping[str, bytes] | None = None


@dataclass
class PreparedSample:
    """One sample ready for a shard: its key and tar members ``[(part name, bytes)]``, ``json`` first."""

    key: str
    members: list[tuple[str, bytes]]

    @property
    def num_bytes(self) -> int:
        return sum(len(data) for _, data in self.members)


@dataclass
class LineSamples:
    """What a kind makes of one manifest line (``data_tools.kinds``): its samples, in order; the sha256
    of every source medium (for duplicate detection); and ``dropped_clips``, the clips cut from its
    video that were left out (with neither a text nor a caption in their span, the sample encoder
    would skip them at every epoch), counted in the build's totals."""

    samples: list[PreparedSample]
    digests: list[str]
    dropped_clips: int = 0


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _media_rejection(e: MediaError, where: str, given: str) -> Rejected:
    return Rejected(e.reason, f"{where} {given!r}: {e.detail}")


def validate_video(data: bytes, where: str, given: str, sample_fps: float) -> VideoInfo:
    """Probe a video and prove it decodes at ``sample_fps`` and in training. Raises Rejected.

    Rules: at least one frame at ``sample_fps`` and one temporal patch of frames; frame sides and
    aspect ratio as for images (:func:`common.media.decode.check_video_frame_size`: "image_too_small",
    "aspect_ratio"); the frames of :func:`decode_check_frames` decode ("video_decode_error" if not).
    """
    try:
        info = probe_video(data)
        indices = frame_indices_at_fps(info.num_frames, info.fps, sample_fps)
        if not indices:
            raise Rejected("no_usable_frames", f"{where} {given!r}: no frame when sampled at {sample_fps} fps")
        if info.num_frames < TEMPORAL_PATCH_SIZE:  # the model's smallest video: one temporal patch of frames
            raise Rejected("no_usable_frames", f"{where} {given!r}: {info.num_frames} frame, a video needs at "
                                               f"least {TEMPORAL_PATCH_SIZE}")
        check_video_frame_size(info.width, info.height)
    except MediaError as e:
        raise _media_rejection(e, where, given) from None
    frames = decode_check_frames(info, indices)
    try:
        read_video_frames(data, frames)
    except MediaError as e:
        # The container lists frames that do not decode: a file cut short or damaged (its index, read
        # by the probe, survived). Training would fail on it at every epoch.
        raise Rejected("video_decode_error", f"{where} {given!r}: the container lists {info.num_frames} frames "
                                             f"but not all of them decode (a truncated or damaged file): {e.detail}") from None
    return info


def decode_check_frames(info: VideoInfo, sampled: list[int]) -> list[int]:
    """The frames (0-based indices, sorted) whose decoding proves a video usable, beyond frame 0 that
    the probe decoded: the middle and the last of ``sampled`` (its frames at ``--video-sample-fps``),
    and the video's last frame ``num_frames - 1``, which training's sampler always reads
    (:func:`common.media.frame_sampling.sample_frame_indices` spans the whole video). A file whose end
    is cut off while its index at the front survives passes the probe and fails only there."""
    return sorted({sampled[len(sampled) // 2], sampled[-1], info.num_frames - 1})


class SampleMedia:
    """Collects the media of one sample in order of first reference and names them ``img0.jpg``, ``vid0.mp4``..."""

    def __init__(self, ctx: LineContext):
        self.ctx = ctx
        self.members: list[tuple[str, bytes]] = []
        self.infos: list[Media] = []
        self.source_digests: list[str] = []
        self._name_by_digest: dict[str, str] = {}
        self._count = {"image": 0, "video": 0}

    def read(self, value: object, where: str) -> tuple[str, bytes]:
        """Read the medium named by manifest value ``value``: (the path as given, its bytes), from the
        line's in-memory media when it names one, else from the file. Raises Rejected."""
        if self.ctx.media and isinstance(value, str) and value in self.ctx.media:
            return value, self.ctx.media[value]
        if not isinstance(value, str) or not value.strip():
            raise Rejected("invalid_fields", f"{where} must be a non-empty path string, got {value!r}")
        if "\x00" in value:
            raise Rejected("invalid_fields", f"{where} path contains a NUL character")
        path = value if os.path.isabs(value) else os.path.join(self.ctx.base_dir, value)
        try:
            with open(path, "rb") as f:
                return value, f.read()
        except FileNotFoundError:
            raise Rejected("missing_file", f"{where} {value!r}: file does not exist") from None
        except IsADirectoryError:
            raise Rejected("unreadable_file", f"{where} {value!r}: is a directory") from None
        except OSError as e:
            raise Rejected("unreadable_file", f"{where} {value!r}: {e.strerror or e}") from None

    def _add(self, media_type: str, ext: str, data: bytes, digest: str, **info) -> str:
        name = media_part_name(media_type, self._count[media_type], ext)
        self._count[media_type] += 1
        self.members.append((name, data))
        self.infos.append(Media(name=name, type=media_type, sha256=sha256_hex(data), bytes=len(data), **info))
        self._name_by_digest[digest] = name
        self.source_digests.append(digest)
        return name

    def image(self, value: object, where: str) -> str:
        """Validate the image file ``value``, store it, return its part name. Raises Rejected."""
        given, data = self.read(value, where)
        digest = sha256_hex(data)
        if digest in self._name_by_digest and self._name_by_digest[digest].startswith("img"):
            return self._name_by_digest[digest]
        config = self.ctx.config
        try:
            image = load_image(data, max_pixels=config.max_pixels)
            header = probe_image(data)
        except MediaError as e:
            raise _media_rejection(e, where, given) from None
        width, height = image.size
        fmt = header.format.upper()
        ext = IMAGE_EXTENSIONS.get(fmt) or (fmt.lower() if fmt.isalnum() else "img")
        stored, original = data, {}
        if config.downscale_pixels is not None and width * height > config.downscale_pixels:
            new_h, new_w = smart_resize(height, width, min_pixels=FACTOR * FACTOR, max_pixels=config.downscale_pixels)
            resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            if fmt in ("JPEG", "MPO"):
                resized.save(buffer, format="JPEG", quality=95)
                fmt, ext = "JPEG", "jpg"
            else:
                resized.save(buffer, format="PNG")
                fmt, ext = "PNG", "png"
            stored, original = buffer.getvalue(), {"original_width": width, "original_height": height}
            width, height = new_w, new_h
        return self._add("image", ext, stored, digest, format=fmt.lower(), width=width, height=height, source=given, **original)

    def read_video(self, value: object, where: str) -> tuple[str, bytes, str, VideoInfo]:
        """Read and validate a video without storing it: (path as given, bytes, sha256, info). Raises Rejected."""
        given, data = self.read(value, where)
        info = validate_video(data, where, given, self.ctx.config.video_sample_fps)
        return given, data, sha256_hex(data), info

    def add_video(self, given: str, data: bytes, digest: str, info: VideoInfo, *, ext: str | None = None) -> str:
        """Store video bytes described by ``info``; ``digest`` is the SOURCE's sha256 (for duplicates)."""
        if digest in self._name_by_digest and self._name_by_digest[digest].startswith("vid"):
            return self._name_by_digest[digest]
        if ext is None:
            suffix = os.path.splitext(given)[1].lstrip(".").lower()
            ext = suffix if suffix in VIDEO_EXTENSIONS else "video"
        return self._add(
            "video", ext, data, digest, format=ext, width=info.width, height=info.height, source=given,
            num_frames=info.num_frames, fps=info.fps, duration=info.duration, backend=info.backend,
        )

    def video(self, value: object, where: str) -> str:
        """Validate the video file ``value``, store its original bytes, return its part name. Raises Rejected."""
        given, data, digest, info = self.read_video(value, where)
        return self.add_video(given, data, digest, info)


def prepare(sample: Sample, members: list[tuple[str, bytes]]) -> PreparedSample:
    """The tar members of ``sample``: its JSON first, then the media members in order."""
    return PreparedSample(key=sample.key, members=[("json", sample_to_json(sample)), *members])
