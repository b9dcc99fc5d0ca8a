"""pixel_values / grid_thw of images and videos against transformers' Qwen3-VL image and video processors."""

from __future__ import annotations

import importlib
import random

import numpy as np
import PIL.Image
import pytest
import torch

from common.media import resize
from common.media.vision_inputs import (
    VisionInputConfig,
    image_target_size,
    patchify,
    process_image,
    process_video,
    video_target_size,
)


def _image(rng, height, width):
    # Smooth gradients plus noise: realistic enough for resampling, varied enough to catch layout errors.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], -1)
    noisy = base + rng.normal(0, 20, base.shape)
    return PIL.Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(224, 224), (100, 150), (37, 400), (1000, 700), (300, 64), (513, 257)])
def test_image_matches_reference(reference_processor, size):
    rng = np.random.default_rng(sum(size))
    image = _image(rng, *size)
    expected = reference_processor.image_processor(images=[image], return_tensors="np")
    ours = process_image(image)
    assert ours.grid_thw == tuple(expected["image_grid_thw"][0])
    assert ours.pixel_values.dtype == torch.float32
    np.testing.assert_array_equal(ours.pixel_values.numpy(), expected["pixel_values"])  # bit-exact
    assert ours.num_tokens == expected["pixel_values"].shape[0] // 4


def test_image_custom_pixel_bounds_match_reference(reference_processor):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = VisionInputConfig(image_min_pixels=32 * 32 * 4, image_max_pixels=32 * 32 * 16)
    ref = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3, min_pixels=cfg.image_min_pixels, max_pixels=cfg.image_max_pixels)
    rng = np.random.default_rng(3)
    for size in [(40, 40), (600, 900), (50, 1200)]:
        image = _image(rng, *size)
        expected = ref(images=[image], return_tensors="np")
        ours = process_image(image, cfg)
        assert ours.grid_thw == tuple(expected["image_grid_thw"][0])
        np.testing.assert_array_equal(ours.pixel_values.numpy(), expected["pixel_values"])
        # The budget holds unless a side is already at its 32-pixel floor (the reference rule too).
        assert ours.num_tokens <= 16 or min(ours.grid_thw[1:]) == 2


def test_image_target_size_is_smart_resize():
    random.seed(0)
    for _ in range(200):
        h, w = random.randint(28, 5000), random.randint(28, 5000)
        if max(h, w) / min(h, w) <= 200:
            assert image_target_size(h, w) == resize.smart_resize(h, w)


def _video(rng, frames, height, width):
    t = np.arange(frames)[:, None, None, None]
    y, x = np.mgrid[0:height, 0:width][..., None]
    channels = [(x * 3 + t * 11) % 256, (y * 5 + t * 7) % 256, (x + y + 0 * t) % 256]
    base = np.concatenate(channels, -1).astype(float)
    return np.clip(base + rng.normal(0, 10, (frames, height, width, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "frames, height, width, cap",
    [(8, 64, 96, False), (5, 120, 90, False), (4, 30, 500, False), (6, 360, 640, True), (3, 50, 50, True)],
)
def test_video_matches_reference(reference_processor, frames, height, width, cap):
    """Same pre-sampled frames through transformers' Qwen3VLVideoProcessor and ours."""
    rng = np.random.default_rng(frames * height)
    video = _video(rng, frames, height, width)
    expected = reference_processor.video_processor(
        videos=[video], do_sample_frames=False, cap_pixels_per_frame=cap, return_tensors="pt"
    )
    cfg = VisionInputConfig(video_cap_pixels_per_frame=cap)
    ours = process_video(video, cfg)
    assert ours.grid_thw == tuple(expected["video_grid_thw"][0].tolist())
    assert ours.grid_thw[0] == (frames + 1) // 2
    # The reference normalises with the fused (x - 127.5) / 127.5 in float32, we with the image
    # processor's (x / 255 - 0.5) / 0.5: equal up to float32 rounding.
    torch.testing.assert_close(ours.pixel_values, expected["pixel_values_videos"], rtol=0, atol=2e-7)
    assert ours.tokens_per_frame_group * ours.grid_thw[0] == ours.num_tokens


def test_video_target_size_matches_reference_rule():
    module = importlib.import_module("transformers.models.qwen3_vl.video_processing_qwen3_vl")
    rng = random.Random(0)
    for _ in range(300):
        frames, h, w = rng.randint(2, 800), rng.randint(1, 2000), rng.randint(1, 2000)
        if max(h, w) / min(h, w) > 150:
            continue
        assert video_target_size(frames, h, w) == module.smart_resize(frames, h, w, 2, 32, 4_096, 25_165_824)


def test_patchify_layout():
    """Each row is one 2x16x16 patch; rows of one merged 2x2 block are consecutive."""
    frames = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    patches, grid = patchify(frames, 16, 2, 2)
    assert grid == (1, 4, 4) and patches.shape == (16, 3 * 2 * 16 * 16)
    # Row 1 is the patch right of row 0 (same merged block), row 2 the patch below row 0.
    row = patches.reshape(16, 3, 2, 16, 16)
    np.testing.assert_array_equal(row[0, :, 1], frames[1, :, 0:16, 0:16])
    np.testing.assert_array_equal(row[1, :, 0], frames[0, :, 0:16, 16:32])
    np.testing.assert_array_equal(row[2, :, 0], frames[0, :, 16:32, 0:16])
    np.testing.assert_array_equal(row[4, :, 0], frames[0, :, 0:16, 32:48])  # next merged block
    # Odd frame count: the last frame is repeated to fill the temporal patch.
    patches3, grid3 = patchify(np.random.default_rng(1).random((3, 3, 32, 32), dtype=np.float32), 16, 2, 2)
    assert grid3 == (2, 2, 2)
    last = patches3.reshape(8, 3, 2, 16, 16)[4:]
    np.testing.assert_array_equal(last[:, :, 0], last[:, :, 1])


def test_bad_vision_inputs():
    with pytest.raises(ValueError, match="must be RGB"):
        process_image(PIL.Image.new("L", (64, 64)))
    with pytest.raises(TypeError, match="PIL.Image"):
        process_image(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="aspect ratio"):
        process_image(PIL.Image.new("RGB", (6400, 30)))
    with pytest.raises(ValueError, match="uint8 numpy array"):
        process_video(np.zeros((4, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="at least 2 frames"):
        process_video(np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="exceeds"):
        VisionInputConfig(image_min_pixels=10, image_max_pixels=5)
    with pytest.raises(ValueError, match="multiple of 32"):
        patchify(np.zeros((2, 3, 40, 64), np.float32), 16, 2, 2)
