"""``EncodedSample``: one training sample after tokenisation and vision preprocessing, ready for packing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
SAMPLE_KINDS = ("image_text", "interleaved", "video", "sft", "text")


@dataclass
class EncodedSample:
    """One sample (one document or one conversation). L = tokens, P = patches.

    input_ids: int64 [L] token ids, including ``<|image_pad|>`` / ``<|video_pad|>`` placeholders (one
        per merged 2x2 block of patches).
    labels: int64 [L], aligned with ``input_ids`` (Hugging Face convention, *not* shifted):
        ``labels[i] == input_ids[i]`` where token ``i`` is a prediction target, ``-100`` elsewhere. The
        model predicts token ``i`` from the logits at ``i - 1``. Targets: every text token except the
        first of the sample for pretraining kinds (visual placeholders never); only assistant-turn tokens
        up to and including their ``<|im_end|>`` for ``sft``. ``labels[0]`` is always ``-100``, so
        shifting after concatenating samples never makes a target across a document boundary.
    position_ids: int64 [3, L] MRoPE positions (time, height, width), restarting at 0 in every sample.
    mm_token_type_ids: int64 [L]: 0 text, 1 image placeholder, 2 video placeholder.
    pixel_values: float32 [P_img, 1536] normalised image patches of all images, in order (1536 =
        3 channels x 2 frames x 16 x 16 pixels); shape [0, 1536] without images.
    image_grid_thw: int64 [n_images, 3] patches (t=1, h, w) of each image.
    pixel_values_videos: float32 [P_vid, 1536] patches of all videos, in order.
    video_grid_thw: int64 [n_videos, 3] patches (t = frame groups, h, w) of each video.
    kind: "image_text" | "interleaved" | "video" | "sft" | "text".
    sample_id: the source id, for error messages and provenance.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    kind: str = "text"
    sample_id: str | None = None

    def __post_init__(self):
        length = self.input_ids.shape[0]
        checks = [
            (self.input_ids.dtype == torch.int64 and self.input_ids.dim() == 1, "input_ids must be int64 [L]"),
            (self.labels.shape == (length,) and self.labels.dtype == torch.int64, "labels must be int64 [L]"),
            (self.position_ids.shape == (3, length) and self.position_ids.dtype == torch.int64,
             "position_ids must be int64 [3, L]"),
            (self.mm_token_type_ids.shape == (length,), "mm_token_type_ids must be [L]"),
            (self.pixel_values.dim() == 2 and self.pixel_values.dtype == torch.float32, "pixel_values must be float32 [P, D]"),
            (self.pixel_values_videos.dim() == 2 and self.pixel_values_videos.dtype == torch.float32,
             "pixel_values_videos must be float32 [P, D]"),
            (int(self.image_grid_thw.prod(-1).sum()) == self.pixel_values.shape[0], "image_grid_thw does not match pixel_values"),
            (int(self.video_grid_thw.prod(-1).sum()) == self.pixel_values_videos.shape[0],
             "video_grid_thw does not match pixel_values_videos"),
            (self.kind in SAMPLE_KINDS, f"kind must be one of {SAMPLE_KINDS}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"EncodedSample {self.sample_id or ''}: {message}")

    @property
    def num_tokens(self) -> int:
        """Sequence length L."""
        return int(self.input_ids.shape[0])

    @property
    def num_text_tokens(self) -> int:
        """Tokens that are not visual placeholders (text, timestamps, special markers)."""
        return int((self.mm_token_type_ids == 0).sum())

    @property
    def num_visual_tokens(self) -> int:
        """Visual placeholder tokens (image + video) in the LLM sequence."""
        return int((self.mm_token_type_ids != 0).sum())

    @property
    def num_image_patches(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def num_video_patches(self) -> int:
        return int(self.pixel_values_videos.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        """Tokens with a label (prediction targets)."""
        return int((self.labels != IGNORE_INDEX).sum())

    def counts(self) -> dict[str, int]:
        """Sizes for logs and batching: tokens, text tokens, visual tokens, patches, targets."""
        return {
            "tokens": self.num_tokens,
            "text_tokens": self.num_text_tokens,
            "visual_tokens": self.num_visual_tokens,
            "image_patches": self.num_image_patches,
            "video_patches": self.num_video_patches,
            "loss_tokens": self.num_loss_tokens,
        }
