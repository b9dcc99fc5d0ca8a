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
    chroma needs them even). Frames are consumed one at a time. Raises ValueError when there is none.
    """
    import av

    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise ValueError("encode_video needs at least one frame")
    height, width = first.shape[0] // 2 * 2, first.shape[1] // 2 * 2
    codec = codec or _encoder_name()
    rate = Fraction(fps).limit_denominator(1001)
    out = io.BytesIO()
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
        for pts, array in enumerate(itertools.chain([first], iterator)):
            array = np.ascontiguousarray(array[:height, :width, :3], dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = pts  # in the stream's time base, 1 / fps (setting frame.time_base too breaks muxing)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()
