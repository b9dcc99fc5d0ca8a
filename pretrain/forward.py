"""The forward step of Qwen3-VL for Megatron's pipeline schedules, with weighted per-token losses.

A micro-batch (see ``pretrain/data/loader.py``) carries ``loss_weights`` [b, s]: the stage's loss
normalisation, already scaled by the trainer so that, over the whole global batch, the weights sum to
the number of loss tokens. Megatron divides the summed weighted loss by that token count (per-token
mode), so the step minimises ``sum(w * loss) / sum(w)`` over the global batch whatever the
normalisation, the micro-batch split or the parallel layout.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from model.attention import padding_mask, thd_packed_seq_params
from model.context_parallel import split_on_this_rank
from pretrain.step import LOSS_KEY

MODEL_INPUTS = ("pixel_values", "image_grid_thw", "image_index", "pixel_values_videos", "video_grid_thw",
                "video_index")


def weighted_token_loss(loss_weights: torch.Tensor, loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """(sum of weighted token losses, loss-token count, logging) for Megatron's per-token reduction."""
    losses = output_tensor.float()
    weighted = (losses * loss_weights.float()).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    report = torch.stack([weighted.detach(), num_tokens.detach().float()])
    return weighted, num_tokens, {LOSS_KEY: report}


def packed_seq_params(batch: dict) -> PackedSeqParams | None:
    """THD layout for transformer-engine attention on GPU (b == 1): the document boundaries of the pack,
    as the loader computed them (``cu_seqlens``, ``max_seqlen``)."""
    if "cu_seqlens" not in batch or not torch.cuda.is_available():
        return None
    return thd_packed_seq_params(batch["document_ids"].cuda(non_blocking=True), batch["cu_seqlens"],
                                 batch["max_seqlen"])


def to_device(batch: dict) -> dict:
    """The tensors of ``batch`` on the current CUDA device when there is one (inputs are built on the CPU)."""
    if not torch.cuda.is_available():
        return batch
    return {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def media_inputs(batch: dict) -> dict:
    """The micro-batch's images and videos as model keyword arguments (absent kinds left out; the
    optional ``image_index`` / ``video_index`` of media shared by several rows come along)."""
    media = {k: batch[k] for k in MODEL_INPUTS if k in batch and batch[k] is not None and batch[k].numel()}
    for pixels, others in (("pixel_values", ("image_grid_thw", "image_index")),
                           ("pixel_values_videos", ("video_grid_thw", "video_index"))):
        if pixels not in media:
            for key in others:
                media.pop(key, None)
    return media


def model_inputs(batch: dict, model, use_packed_seq_params: bool | None = None) -> dict:
    """Keyword arguments of the model for a packed micro-batch (on the device): positions, the document
    boundaries (``packed_seq_params`` (THD) on the transformer-engine backend, ``document_ids``
    otherwise; ``use_packed_seq_params`` None decides from the model's backend), the padding
    (``padding_mask``: document id -1, left out of the MoE routers' statistics) and the media."""
    from megatron.core.utils import get_attr_wrapped_model

    if use_packed_seq_params is None:
        use_packed_seq_params = get_attr_wrapped_model(model, "attention") == "te"
    thd = packed_seq_params(batch) if use_packed_seq_params else None
    return dict(position_ids=batch["position_ids"], document_ids=None if thd is not None else batch["document_ids"],
                packed_seq_params=thd, padding_mask=padding_mask(batch["document_ids"]), **media_inputs(batch))


def qwen3vl_forward_step(data_iterator, model, use_packed_seq_params: bool | None = None):
    """Schedule forward step: every pipeline stage reads the same micro-batch and uses what it needs
    (inputs: :func:`model_inputs`). With context parallelism the model returns this rank's token
    losses, so the weights are cut to match."""
    batch = to_device(next(data_iterator))
    # Positions without a target hold -100; their loss is weighted 0, any valid id will do.
    output = model(batch["tokens"], labels=batch["labels"].clamp(min=0),
                   **model_inputs(batch, model, use_packed_seq_params))
    loss_weights = split_on_this_rank(batch["loss_weights"], 1, batch["document_ids"])
    loss_mask = split_on_this_rank(batch["loss_mask"], 1, batch["document_ids"])
    return output, partial(weighted_token_loss, loss_weights, loss_mask)
