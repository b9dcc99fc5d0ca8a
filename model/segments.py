"""Document segments of packed token rows, in the layout of Megatron's THD (packed) attention.

Imports nothing but torch: the data loader's workers use it too.
"""

from __future__ import annotations

import torch


def segment_boundaries(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 on ``document_ids``' device, max_seqlen) of the flattened [b, s] ids: a segment
    starts at every change of document id and at every row start, so documents and each row's padding
    are separate segments."""
    b, s = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    positions = torch.nonzero(starts.flatten()).flatten()
    cu = torch.cat([positions, positions.new_tensor([b * s])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())
