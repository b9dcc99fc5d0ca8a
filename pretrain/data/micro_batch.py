"""Packed sequences -> one micro-batch (a dict of tensors), the input contract of the trainer.

``collate_micro_batch(packs)`` stacks ``b`` :class:`PackedSequence` of ``s`` tokens each:

==========================  ====================  =====================================================
key                         dtype, shape          meaning
==========================  ====================  =====================================================
tokens                      int64 [b, s]          input ids (padding: ``pad_id``)
labels                      int64 [b, s]          next-token targets (Megatron: ``labels[i]`` is predicted
                                                  at position ``i``), never across a document boundary;
                                                  ``pad_id`` where ``loss_mask`` is 0
loss_mask                   float32 [b, s]        1 where ``labels`` is a target
position_ids                int64 [3, b, s]       MRoPE (t, h, w) positions, restarting at 0 per document
document_ids                int64 [b, s]          document index within its row, -1 on padding
mm_token_type_ids           int64 [b, s]          0 text, 1 image placeholder, 2 video placeholder
cu_seqlens                  int32 [n + 1]         segment boundaries over the flattened ``b * s`` tokens:
                                                  every document, and each row's padding tail, is one
                                                  segment (THD layout for transformer-engine)
max_seqlen                  int                   longest segment
pixel_values                float32 [P, 1536]     image patches of the whole micro-batch, token order
image_grid_thw              int64 [n_img, 3]
pixel_values_videos         float32 [P_v, 1536]   video patches, token order
video_grid_thw              int64 [n_vid, 3]
==========================  ====================  =====================================================

Counters (Python ints / dicts, for logs): ``num_documents``, ``num_real_tokens`` (non-padding),
``num_loss_tokens``, ``num_image_patches``, ``num_video_patches``, ``num_visual_patches``,
``documents_per_kind``, ``documents_per_source``, ``num_truncated`` and ``skipped`` (the samples this
micro-batch's packs passed over: a list of :class:`SkipRecord`-like dicts) with ``num_skipped``;
``doc_ids`` lists every document's sample id by row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from model.segments import segment_boundaries
from pretrain.data.packing import PackedSequence


def collate_micro_batch(
    packs: Sequence[PackedSequence],
    *,
    skipped: Sequence[dict] = (),
    num_truncated: int = 0,
) -> dict[str, Any]:
    """Stack packs of equal length into the micro-batch dict described in the module docstring."""
    if not packs:
        raise ValueError("a micro-batch needs at least one pack")
    lengths = {p.seq_length for p in packs}
    if len(lengths) != 1:
        raise ValueError(f"packs of one micro-batch must have the same length, got {sorted(lengths)}")
    document_ids = torch.stack([p.document_ids for p in packs])
    cu_seqlens, max_seqlen = segment_boundaries(document_ids)
    batch: dict[str, Any] = {
        "tokens": torch.stack([p.tokens for p in packs]),
        "labels": torch.stack([p.labels for p in packs]),
        "loss_mask": torch.stack([p.loss_mask for p in packs]),
        "position_ids": torch.stack([p.position_ids for p in packs], dim=1),
        "document_ids": document_ids,
        "mm_token_type_ids": torch.stack([p.mm_token_type_ids for p in packs]),
        "cu_seqlens": cu_seqlens,
        "max_seqlen": max_seqlen,
        "pixel_values": torch.cat([p.pixel_values for p in packs]),
        "image_grid_thw": torch.cat([p.image_grid_thw for p in packs]),
        "pixel_values_videos": torch.cat([p.pixel_values_videos for p in packs]),
        "video_grid_thw": torch.cat([p.video_grid_thw for p in packs]),
    }
    image_patches = int(batch["pixel_values"].shape[0])
    video_patches = int(batch["pixel_values_videos"].shape[0])
    batch.update(
        num_documents=sum(len(p.doc_lengths) for p in packs),
        num_real_tokens=sum(p.num_real_tokens for p in packs),
        num_loss_tokens=int(batch["loss_mask"].sum()),
        num_image_patches=image_patches,
        num_video_patches=video_patches,
        num_visual_patches=image_patches + video_patches,
        documents_per_kind=dict(Counter(k for p in packs for k in p.doc_kinds)),
        documents_per_source=dict(Counter(s for p in packs for s in p.doc_sources)),
        doc_ids=[list(p.doc_ids) for p in packs],
        num_truncated=num_truncated,
        skipped=list(skipped),
        num_skipped=len(skipped),
    )
    return batch
