"""common.media.decode: image validation and decoding, video probing and frame reading (decord and PyAV)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from common.media import decode as media

from common.media.encode import encode_video
from common.media.decode import MediaError


def png_bytes(width: int, height: int, mode: str = "RGB", color=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels but whose data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def reason(fn, *args, **kwargs) -> str:
    with pytest.raises(MediaError) as info:
        fn(*args, **kwargs)
    assert str(info.value)  # the message is never empty
    return info.value.reason


def test_load_image_rgb_and_alpha_on_white(tmp_path):
    transparent = png_bytes(64, 40, "RGBA", (255, 0, 0, 0))
    image = media.load_image(transparent)
    assert image.mode == "RGB" and image.size == (64, 40)
    assert image.getpixel((5, 5)) == (255, 255, 255)  # transparent -> white, not black
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(50, 30))
    assert media.load_image(path).getpixel((0, 0)) == (10, 200, 30)
    assert media.load_image(str(path)).size == (50, 30)


def _saved(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=options.pop("format", "PNG"), **options)
    return out.getvalue()


def test_load_image_scales_deep_greys_and_honours_colour_key_transparency():
    # 16-bit (and 32-bit integer) greys: mid-grey stays mid-grey (convert("RGB") clipped it to white).
    grey16 = Image.fromarray(np.full((32, 32), 32768, np.uint16))
    assert grey16.mode.startswith("I;16")
    assert media.load_image(_saved(grey16)).getpixel((3, 3)) == (128, 128, 128)
    grey32 = Image.fromarray(np.full((32, 32), 32768, np.int32))
    assert media.load_image(_saved(grey32, format="TIFF")).getpixel((3, 3)) == (128, 128, 128)
    # A tRNS colour key on an RGB or grey PNG is transparency: white, as with an alpha band.
    for mode, key, fill in (("RGB", (0, 0, 0), (0, 0, 0)), ("L", 0, 0)):
        image = Image.new(mode, (32, 32), fill)
        image.putpixel((0, 0), (9, 9, 9) if mode == "RGB" else 9)
        loaded = media.load_image(_saved(image, transparency=key))
        assert loaded.getpixel((3, 3)) == (255, 255, 255) and loaded.getpixel((0, 0)) == (9, 9, 9), mode


def test_load_image_applies_exif_orientation():
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (80, 40), (0, 0, 255)).save(buffer, format="JPEG", exif=exif)
    assert media.load_image(buffer.getvalue()).size == (40, 80)


def test_load_image_rejections(tmp_path):
    full = png_bytes(100, 100)
    assert reason(media.load_image, full[: len(full) // 2]) == "image_decode_error"
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    assert reason(media.load_image, jpeg.getvalue()[:-400]) == "image_decode_error"
    assert reason(media.load_image, b"not an image at all") == "image_decode_error"
    assert reason(media.load_image, png_bytes(20, 100)) == "image_too_small"
    assert reason(media.load_image, png_bytes(29, 6000)) == "aspect_ratio"
    assert reason(media.load_image, full, max_pixels=9_999) == "decompression_bomb"
    assert reason(media.load_image, tmp_path / "missing.png") == "missing_file"
    assert reason(media.load_image, tmp_path) == "unreadable_file"


def test_decompression_bomb_is_rejected_from_the_header_before_decoding():
    bomb = png_header_only(10_000, 5_000)  # 50 megapixels claimed, 60 bytes of data
    assert len(bomb) < 100
    with pytest.raises(MediaError) as info:
        media.load_image(bomb)
    assert info.value.reason == "decompression_bomb"
    assert "50000000 pixels" in str(info.value)
    assert media.probe_image(bomb) == media.ImageInfo("PNG", 10_000, 5_000)


def moving_frames(n: int = 24, h: int = 48, w: int = 64) -> list[np.ndarray]:
    """Frame i: grey level 8*i with a white bar at column 2*i (so frames are identifiable)."""
    frames = []
    for i in range(n):
        frame = np.full((h, w, 3), 8 * i, np.uint8)
        frame[:, 2 * i : 2 * i + 4] = 255
        frames.append(frame)
    return frames


def bar_column(frame: np.ndarray) -> int:
    return int(np.argmax(frame[:, :, 0].mean(axis=0) > 200))


def test_decord_probe_and_frames_in_requested_order(tmp_path):
    data = encode_video(moving_frames(), fps=12)
    info = media.probe_video(data)
    assert info == media.VideoInfo(num_frames=24, fps=12.0, duration=2.0, width=64, height=48, backend="decord")
    frames = media.read_video_frames(data, [10, 0, 10, 23])
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
    assert [bar_column(f) for f in frames] == [20, 0, 20, 46]
    path = tmp_path / "v.mp4"
    path.write_bytes(data)
    assert media.probe_video(path) == info
    streamed = list(media.iter_video_frames(path, 5, 21))
    assert len(streamed) == 16 and bar_column(streamed[0]) == 10 and bar_column(streamed[-1]) == 40


def test_pyav_fallback_on_av1_that_decord_cannot_open():
    """The fallback runs for real: an AV1 file (SVT-AV1 via PyAV); decord's FFmpeg has no AV1 decoder."""
    import av
    import decord

    try:
        av.codec.Codec("libsvtav1", "w")
    except Exception:
        pytest.skip("this PyAV build has no AV1 encoder (libsvtav1)")
    data = encode_video(moving_frames(), fps=12, codec="libsvtav1")
    with pytest.raises(Exception):
        decord.VideoReader(io.BytesIO(data))  # precondition: decord really cannot open it
    info = media.probe_video(data)
    assert info.backend == "pyav"
    assert (info.num_frames, info.fps, info.width, info.height) == (24, 12.0, 64, 48)
    frames = media.read_video_frames(data, [23, 3])
    assert frames.shape == (2, 48, 64, 3) and [bar_column(f) for f in frames] == [46, 6]
    assert [bar_column(f) for f in media.iter_video_frames(data, 20, 24)] == [40, 42, 44, 46]


def test_video_rejections(tmp_path):
    data = encode_video(moving_frames(6), fps=6)
    assert reason(media.probe_video, b"\x00\x01garbage" * 300) == "video_decode_error"
    assert reason(media.probe_video, data[: len(data) // 3]) == "video_decode_error"
    assert reason(media.probe_video, tmp_path / "nope.mp4") == "missing_file"
    assert reason(media.read_video_frames, data, [6]) == "no_usable_frames"
    assert reason(media.read_video_frames, data, [-1]) == "no_usable_frames"


def test_encode_video_is_deterministic_for_still_then_moving_frames():
    # A clip that stays still then moves: x264's mb-tree rate control made these bytes vary run to run.
    frames = [moving_frames(1)[0]] * 8 + moving_frames(12)
    first = encode_video(frames, fps=8)
    assert all(encode_video(frames, fps=8) == first for _ in range(5))
    assert media.probe_video(first).num_frames == 20


def test_frame_indices_at_fps():
    assert media.frame_indices_at_fps(24, 12.0, 2.0) == [0, 6, 12, 18]
    assert media.frame_indices_at_fps(1, 30.0, 2.0) == [0]
    assert media.frame_indices_at_fps(10, 1.0, 2.0) == list(range(10))  # no repeats when sampling above the rate
    assert media.frame_indices_at_fps(24, 12.0, 2.0, start=0.25, end=1.3) == [3, 9, 15]  # times 0.25, 0.75, 1.25 s
    assert media.frame_indices_at_fps(0, 12.0) == []
