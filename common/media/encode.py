"""Video encoding: RGB frames -> MP4 bytes (clip cutting in data_tools, synthetic corpora, tests).

Decoding lives in :mod:`common.media.decode`; the two share no code, so a training job that only
reads media never touches an encoder.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable
from fractions import Fraction

import numpy as np

#: Smallest side of an encoded frame in pixels: 4:2:0 chroma has half the luma's sides.
MIN_ENCODED_SIDE = 2


class EncodeError(ValueError):
    """Frames the encoder cannot take: none, a side below ``MIN_ENCODED_SIDE`` pixels, a size that
    changes between frames, or FFmpeg's encoder or muxer failing on them. A caller that encodes frames
    decoded from an input (data_tools' clips) turns it into a rejection of that input."""


def _encoder_name() -> str:
    import av

    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    raise RuntimeError("the FFmpeg inside PyAV has neither a libx264 nor an mpeg4 encoder")


def encode_video(frames: Iterable[np.ndarray], fps: float, *, codec: str | None = None, crf: int = 18) -> bytes:
    """Encode RGB uint8 frames ``(H, W, 3)`` into MP4 bytes at ``fps`` frames per second.

    Deterministic: the same frames give the same bytes (single-threaded encoder, no timestamps in the
    container metadata, and x264's macroblock-tree rate control off: with it, identical frames gave
    different bytes from run to run). ``codec`` defaults to libx264 (mpeg4 when the FFmpeg build lacks
    it); AV1 is possible with ``codec="libsvtav1"``. Sides are cropped to even numbers of pixels (4:2:0
    chroma needs them even). Frames are consumed one at a time, and all must have the first one's size.
    Raises EncodeError (a ValueError) when there is no frame, a side is below ``MIN_ENCODED_SIDE``
    pixels, the size changes, or FFmpeg fails on the frames; an error of the ``frames`` iterable itself
    (a decoder's) passes through as it is.
    """
    import av

    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise EncodeError("encode_video needs at least one frame")
    if min(first.shape[:2]) < MIN_ENCODED_SIDE:  # cropped to even sides, a 1-pixel side would become 0
        raise EncodeError(f"frames of {first.shape[1]}x{first.shape[0]} pixels: the encoder needs both sides "
                          f"of at least {MIN_ENCODED_SIDE} pixels")
    height, width = first.shape[0] // 2 * 2, first.shape[1] // 2 * 2
    codec = codec or _encoder_name()
    rate = Fraction(fps).limit_denominator(1001)
    out = io.BytesIO()
    try:
        _encode_into(out, itertools.chain([first], iterator), first.shape, rate, width, height, codec, crf)
    except av.error.FFmpegError as e:
        raise EncodeError(f"the {codec} encoder failed: {type(e).__name__}: {e}") from None
    return out.getvalue()


def _encode_into(out: io.BytesIO, frames: Iterable[np.ndarray], shape: tuple, rate: Fraction, width: int, height: int,
                 codec: str, crf: int) -> None:
    """Encode ``frames`` (all of ``shape``, cropped to ``width`` x ``height``) as MP4 into ``out``."""
    import av

    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = 1 / rate
        if codec == "libx264":
            stream.options = {"threads": "1", "crf": str(crf), "preset": "medium", "x264-params": "mbtree=0"}
        elif codec == "libsvtav1":
            stream.options = {"preset": "8"}
        else:
            stream.codec_context.thread_count = 1
            stream.options = {"qscale": "2"} if codec == "mpeg4" else {}
        for pts, array in enumerate(frames):
            if array.shape[:2] != shape[:2]:  # a smaller frame would be encoded at another size, or not at all
                raise EncodeError(f"frame {pts} is {array.shape[1]}x{array.shape[0]} pixels, the first one "
                                  f"{shape[1]}x{shape[0]}: a video's frames must all have one size")
            array = np.ascontiguousarray(array[:height, :width, :3], dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = pts  # in the stream's time base, 1 / fps (setting frame.time_base too breaks muxing)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
