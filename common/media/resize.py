"""The one image/video resize rule of Qwen3-VL (``smart_resize``), shared by data tools, loader and tests.

Qwen3-VL's ViT cuts images into 16x16 pixel patches and its merger joins 2x2 patches into one LLM token,
so every resized side is a multiple of ``factor = patch_size * merge_size = 32`` pixels. The rule keeps
the aspect ratio as closely as possible while bringing the pixel count into ``[min_pixels, max_pixels]``.
"""

from __future__ import annotations

import math

PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 32 pixels
MAX_ASPECT_RATIO = 200

# Qwen3-VL defaults (not the Qwen2-VL class defaults): pixels of one image.
IMAGE_MIN_PIXELS = 65_536
IMAGE_MAX_PIXELS = 16_777_216


def _check_aspect_ratio(height: int, width: int) -> None:
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width):.1f} ({height}x{width} pixels)"
        )


def smart_resize(
    height: int,
    width: int,
    factor: int = FACTOR,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
) -> tuple[int, int]:
    """Return the (height, width) in pixels an image of ``height`` x ``width`` pixels is resized to.

    Both sides become multiples of ``factor``; the area lies in ``[min_pixels, max_pixels]`` (up to the
    rounding to ``factor``). Raises ``ValueError`` for an aspect ratio above 200 or a non-positive side.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image side must be positive, got {height}x{width} pixels")
    _check_aspect_ratio(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def visual_tokens(grid_t: int, grid_h: int, grid_w: int, merge_size: int = MERGE_SIZE) -> int:
    """LLM tokens of one image or video given its patch grid (t, h, w): one token per merged block."""
    return grid_t * grid_h * grid_w // (merge_size * merge_size)


# Qwen3-VL video defaults: pixels of ALL sampled frames of one video together (the per-video budget).
VIDEO_MIN_PIXELS = 4_096
VIDEO_MAX_PIXELS = 25_165_824  # 768 frames x 32,768 pixels
VIDEO_MAX_TOKENS_PER_FRAME = 768


def smart_resize_video(
    num_frames: int,
    height: int,
    width: int,
    temporal_factor: int = TEMPORAL_PATCH_SIZE,
    factor: int = FACTOR,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
) -> tuple[int, int]:
    """Return the (height, width) in pixels every frame of a ``num_frames``-frame video is resized to.

    The video variant of :func:`smart_resize` (Qwen3-VL's video processor): ``min_pixels`` and
    ``max_pixels`` bound the pixels of all frames together, with the frame count rounded to the
    temporal patch (``round(num_frames / temporal_factor) * temporal_factor``) in the comparison and the
    exact count in the scale; frames with a side below ``factor`` are first scaled up so that side is
    ``factor``. Raises ``ValueError`` for fewer than ``temporal_factor`` frames, a non-positive side or an
    aspect ratio above 200.
    """
    if num_frames < temporal_factor:
        raise ValueError(f"a video needs at least {temporal_factor} frames, got {num_frames}")
    if height <= 0 or width <= 0:
        raise ValueError(f"video frame side must be positive, got {height}x{width} pixels")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    _check_aspect_ratio(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def capped_video_max_pixels(
    num_frames: int,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    max_tokens_per_frame: int = VIDEO_MAX_TOKENS_PER_FRAME,
    factor: int = FACTOR,
) -> int:
    """The per-video ``max_pixels`` with qwen-vl-utils' per-frame cap (transformers' ``cap_pixels_per_frame``).

    Each frame gets at most ``max_tokens_per_frame`` merged tokens' worth of pixels and at most its even
    share of ``max_pixels``, but never less than ``1.05 * min_pixels``; the result is that per-frame
    budget times ``num_frames``. Without the cap a short clip spends the whole video budget on few frames.
    """
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    per_frame = max(min(max_tokens_per_frame * factor * factor, max_pixels // num_frames), int(min_pixels * 1.05))
    return per_frame * num_frames
