"""Images and video frames -> Qwen3-VL vision-encoder inputs (``pixel_values`` and ``grid_thw``).

Steps, as the reference processors do them:

1. Resize with :mod:`common.media.resize` (both sides multiples of ``patch_size * merge_size`` = 32 px;
   images bounded per image, videos by a budget over all their sampled frames).
   Images use PIL bicubic (transformers' ``Qwen2VLImageProcessorPil``); video frames use PyTorch's
   antialiased bicubic on uint8 tensors, which is what transformers' torchvision-based
   ``Qwen3VLVideoProcessor`` runs on CPU.
2. Rescale to [0, 1] and normalise with ``mean``/``std`` (Qwen3-VL: 0.5 / 0.5, so values lie in [-1, 1]).
3. Cut into patches of ``temporal_patch_size x patch_size x patch_size`` pixels (2 x 16 x 16): an image
   is its own frame repeated twice; a video with an odd frame count repeats its last frame. Patches are
   ordered so that the ``merge_size x merge_size`` patches merged into one LLM token are consecutive.

``pixel_values`` is float32 ``(grid_t * grid_h * grid_w, 3 * temporal_patch_size * patch_size**2)``
(1536 columns for Qwen3-VL); ``grid_thw`` counts patches along time, height and width. The LLM sees
``grid_t * grid_h * grid_w / merge_size**2`` tokens for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from common.media import resize


@dataclass(frozen=True)
class VisionInputConfig:
    """Qwen3-VL vision preprocessing settings (defaults are Qwen3-VL's published ones).

    Pixel counts are pixels (height x width); for videos they bound all sampled frames of one video
    together. ``video_cap_pixels_per_frame`` enables qwen-vl-utils' per-frame cap of
    ``video_max_tokens_per_frame`` LLM tokens per frame (off in transformers 5.24, as here by default).
    """

    patch_size: int = resize.PATCH_SIZE
    temporal_patch_size: int = resize.TEMPORAL_PATCH_SIZE
    merge_size: int = resize.MERGE_SIZE
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_min_pixels: int = resize.IMAGE_MIN_PIXELS
    image_max_pixels: int = resize.IMAGE_MAX_PIXELS
    video_min_pixels: int = resize.VIDEO_MIN_PIXELS
    video_max_pixels: int = resize.VIDEO_MAX_PIXELS
    video_cap_pixels_per_frame: bool = False
    video_max_tokens_per_frame: int = resize.VIDEO_MAX_TOKENS_PER_FRAME

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size", "image_min_pixels", "video_min_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"VisionInputConfig.{name} must be positive, got {getattr(self, name)}")
        if self.image_min_pixels > self.image_max_pixels:
            raise ValueError(f"image_min_pixels {self.image_min_pixels} exceeds image_max_pixels {self.image_max_pixels}")
        if self.video_min_pixels > self.video_max_pixels:
            raise ValueError(f"video_min_pixels {self.video_min_pixels} exceeds video_max_pixels {self.video_max_pixels}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError("image_mean and image_std need 3 values each, std positive")

    @property
    def factor(self) -> int:
        """Pixels per merged token side: resized sides are multiples of it (32)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Columns of ``pixel_values``: 3 channels x temporal x patch x patch (1536)."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclass
class VisualPatches:
    """Vision-encoder input of one image or one video.

    pixel_values: float32 tensor (num_patches, patch_dim), normalised pixels; None for the sizes alone
        (:func:`image_patch_sizes`, :func:`video_patch_sizes`: the pixels were not decoded).
    grid_thw: (t, h, w) patches along time, height, width; num_patches = t * h * w.
    """

    pixel_values: torch.Tensor | None
    grid_thw: tuple[int, int, int]
    merge_size: int = resize.MERGE_SIZE

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return int(t * h * w)

    @property
    def num_tokens(self) -> int:
        """LLM placeholder tokens: one per merged block of ``merge_size**2`` patches."""
        return resize.visual_tokens(*self.grid_thw, merge_size=self.merge_size)

    @property
    def tokens_per_frame_group(self) -> int:
        """LLM tokens of one temporal group (a video is announced group by group)."""
        return self.grid_thw[1] * self.grid_thw[2] // (self.merge_size * self.merge_size)


def image_target_size(height: int, width: int, config: VisionInputConfig = VisionInputConfig()) -> tuple[int, int]:
    """(height, width) in pixels an image of ``height`` x ``width`` pixels is resized to."""
    return resize.smart_resize(height, width, config.factor, config.image_min_pixels, config.image_max_pixels)


def video_target_size(
    num_frames: int, height: int, width: int, config: VisionInputConfig = VisionInputConfig()
) -> tuple[int, int]:
    """(height, width) in pixels every frame of a ``num_frames``-frame video is resized to."""
    max_pixels = config.video_max_pixels
    if config.video_cap_pixels_per_frame:
        max_pixels = resize.capped_video_max_pixels(
            num_frames, config.video_min_pixels, max_pixels, config.video_max_tokens_per_frame, config.factor
        )
    return resize.smart_resize_video(
        num_frames, height, width, config.temporal_patch_size, config.factor, config.video_min_pixels, max_pixels
    )


def image_grid(height: int, width: int, config: VisionInputConfig = VisionInputConfig()) -> tuple[int, int, int]:
    """(t, h, w) patches of an image of ``height`` x ``width`` pixels, as :func:`process_image` cuts it."""
    new_h, new_w = image_target_size(height, width, config)
    return 1, new_h // config.patch_size, new_w // config.patch_size  # one frame: one temporal patch


def video_grid(num_frames: int, height: int, width: int, config: VisionInputConfig = VisionInputConfig()) -> tuple[int, int, int]:
    """(t, h, w) patches of ``num_frames`` sampled frames of ``height`` x ``width`` pixels, as
    :func:`process_video` cuts them."""
    new_h, new_w = video_target_size(num_frames, height, width, config)
    return -(-num_frames // config.temporal_patch_size), new_h // config.patch_size, new_w // config.patch_size


def image_patch_sizes(height: int, width: int, config: VisionInputConfig = VisionInputConfig()) -> VisualPatches:
    """:func:`process_image`'s result for an image of this size, without its pixels (``pixel_values`` None)."""
    return VisualPatches(None, image_grid(height, width, config), config.merge_size)


def video_patch_sizes(num_frames: int, height: int, width: int, config: VisionInputConfig = VisionInputConfig()) -> VisualPatches:
    """:func:`process_video`'s result for these frames, without their pixels (``pixel_values`` None)."""
    return VisualPatches(None, video_grid(num_frames, height, width, config), config.merge_size)


def normalize(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 (..., 3, H, W) -> float32 ``(pixels / 255 - mean) / std`` per channel.

    The division by 255 runs in float64 and is rounded to float32 before the normalisation in
    float32, exactly as transformers' PIL image processor does.
    """
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    shape = (3, 1, 1)
    return (scaled - np.asarray(mean, np.float32).reshape(shape)) / np.asarray(std, np.float32).reshape(shape)


def patchify(frames: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float32 (T, 3, H, W) -> (patches (t*h*w, 3*tp*p*p), (t, h, w)) in the merge-friendly order.

    T is padded to a multiple of ``temporal_patch_size`` by repeating the last frame. Row order: time
    group, merged-block row, merged-block column, then the ``merge_size x merge_size`` patches of the
    block; column order: channel, frame in group, pixel row, pixel column.
    """
    num_frames, channels, height, width = frames.shape
    if height % (patch_size * merge_size) or width % (patch_size * merge_size):
        raise ValueError(f"frame size {height}x{width} is not a multiple of {patch_size * merge_size} pixels")
    if pad := -num_frames % temporal_patch_size:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
    grid_t = frames.shape[0] // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    blocks = frames.reshape(
        grid_t, temporal_patch_size, channels,
        grid_h // merge_size, merge_size, patch_size,
        grid_w // merge_size, merge_size, patch_size,
    )
    # -> (t, block row, block col, row in block, col in block, channel, frame in group, pixel row, pixel col)
    blocks = blocks.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = blocks.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return np.ascontiguousarray(patches), (grid_t, grid_h, grid_w)


def process_image(image: PIL.Image.Image, config: VisionInputConfig = VisionInputConfig()) -> VisualPatches:
    """Resize (PIL bicubic), normalise and patchify one RGB image."""
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if image.mode != "RGB":
        raise ValueError(f"image must be RGB (decode it with common.media.decode.load_image), got mode {image.mode}")
    height, width = image.height, image.width
    new_h, new_w = image_target_size(height, width, config)
    if (new_h, new_w) != (height, width):
        image = image.resize((new_w, new_h), resample=PIL.Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)[None]  # (1, 3, H, W)
    frames = normalize(pixels, config.image_mean, config.image_std)
    # An image fills every frame of its temporal patch (the encoder's Conv3d sees it twice).
    patches, grid = patchify(frames, config.patch_size, config.temporal_patch_size, config.merge_size)
    return VisualPatches(torch.from_numpy(patches), grid, config.merge_size)


def resize_video_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (T, H, W, 3) -> uint8 (T, 3, height, width) with antialiased bicubic interpolation.

    Runs PyTorch's native uint8 kernel, as torchvision's ``resize`` does for uint8 tensors on CPU.
    """
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()
    if video.shape[-2:] != (height, width):
        video = F.interpolate(video, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return video.numpy()


def process_video(frames: np.ndarray, config: VisionInputConfig = VisionInputConfig()) -> VisualPatches:
    """Resize, normalise and patchify the sampled frames of one video: uint8 (T, H, W, 3), RGB."""
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            "video frames must be a uint8 numpy array (T, H, W, 3), got "
            f"{type(frames).__name__} {getattr(frames, 'shape', '')} {getattr(frames, 'dtype', '')}"
        )
    num_frames, height, width, _ = frames.shape
    new_h, new_w = video_target_size(num_frames, height, width, config)
    resized = resize_video_frames(frames, new_h, new_w)
    normalized = normalize(resized, config.image_mean, config.image_std)
    patches, grid = patchify(normalized, config.patch_size, config.temporal_patch_size, config.merge_size)
    return VisualPatches(torch.from_numpy(patches), grid, config.merge_size)
