"""Per-token loss weights of a packed micro-batch: the loss normalisation of a training stage.

Every mode weights the target tokens of a document ``d`` with ``n_d ** -p``, where ``n_d`` is the number
of targets (``loss_mask`` ones) of that document, and the training objective of a step is

    J = sum_t w_t * loss_t / sum_t w_t        (sums over every target token of the GLOBAL batch)

The trainer computes ``sum_t w_t * loss_t`` per micro-batch, all-reduces ``sum_t w_t`` over the
data-parallel ranks and the micro-batches of the step, and divides. Hence the weights returned here are
deliberately un-normalised:

* ``"token"`` (p = 0): every target token counts once; J is the mean token loss of the global batch.
  Long documents dominate (this is Megatron's per-token loss).
* ``"sample"`` (p = 1): every document counts once whatever its length; ``sum_t w_t`` is the number of
  documents with targets, and J is the mean over documents of each document's mean token loss.
* ``"square_root"`` (p = 1/2): the square-root reweighting of the Qwen3-VL technical report
  (arXiv 2511.21631, Sec. 1, Introduction: "To balance text-only and multimodal learning objectives, we
  apply square-root reweighting, which boosts multimodal performance without compromising text
  capabilities"). That passage gives no formula; we implement a square-root-normalised per-token loss
  in the form InternVL 2.5 (arXiv 2412.05271) calls "square averaging": a document of ``n`` targets
  contributes weight ``sqrt(n)`` in total (``1/sqrt(n)`` per token), between per-token (``n``) and per-sample (``1``).

A "document" is one packed sample (a caption pair, an interleaved document, a video, a conversation),
identified by ``document_ids`` within its row.
"""

from __future__ import annotations

import torch

LOSS_NORMALIZATIONS = {"token": 0.0, "sample": 1.0, "square_root": 0.5}


def document_target_counts(loss_mask: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """float32 [b, s]: at every position, the number of targets of the document it belongs to (0 on padding)."""
    if loss_mask.shape != document_ids.shape or loss_mask.dim() != 2:
        raise ValueError(
            f"loss_mask {tuple(loss_mask.shape)} and document_ids {tuple(document_ids.shape)} must both be [b, s]"
        )
    b, s = document_ids.shape
    # Documents are numbered 0.. within a row; give every (row, document) its own slot, padding the last.
    slots = document_ids.max().clamp(min=0).item() + 2
    index = torch.where(document_ids >= 0, document_ids, torch.full_like(document_ids, slots - 1))
    index = index + torch.arange(b).unsqueeze(1) * slots
    counts = torch.zeros(b * slots, dtype=torch.float32).index_add_(0, index.flatten(), loss_mask.float().flatten())
    per_token = counts[index]
    return torch.where(document_ids >= 0, per_token, torch.zeros_like(per_token))


def token_loss_weights(loss_mask: torch.Tensor, document_ids: torch.Tensor, mode: str) -> torch.Tensor:
    """Un-normalised per-token weights float32 [b, s] for loss normalisation ``mode`` (see module doc).

    Zero wherever ``loss_mask`` is zero. Raises ``ValueError`` for an unknown mode.
    """
    if mode not in LOSS_NORMALIZATIONS:
        raise ValueError(f"loss normalisation {mode!r} is not one of {sorted(LOSS_NORMALIZATIONS)}")
    mask = loss_mask.float()
    power = LOSS_NORMALIZATIONS[mode]
    if power == 0.0:
        return mask
    counts = document_target_counts(mask, document_ids)
    return mask * counts.clamp(min=1.0).pow(-power)
