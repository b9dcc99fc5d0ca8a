"""Document segments of packed token rows, in the layout of Megatron's THD (packed) attention, and the
caches of what the model derives from them.

Imports nothing but torch: the data loader's workers use it too.
"""

from __future__ import annotations

import weakref

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


# Per-tensor caches, found again from a detached alias (see :func:`tensor_cache`): (device, data_ptr, dtype,
# shape, stride) -> (a weak reference to the tensor that owns the caches, its version then, the caches).
_CACHE_OWNERS: dict[tuple, tuple] = {}


def tensor_cache(t: torch.Tensor, name: str) -> dict:
    """A dict cache (``name``: what it caches) that belongs to the values of ``t``: the same dict for ``t``
    and for every detached alias of it, for as long as ``t`` lives unmodified.

    The model derives plans from its segment ids (attention pieces, context-parallel layouts) once per
    forward and keeps them with the tensor that every layer receives. Activation recomputation hands each
    layer's recomputed forward a *detached* alias of its inputs (Megatron's ``CheckpointFunction``): a new
    tensor object without the attributes of the one the forward saw, which rebuilt the plans once per
    layer in the backward pass (at 256K tokens a host copy, a plan and a device upload per layer). An
    alias is recognised by where its values are: while the owner lives its memory cannot be reused, and an
    in-place change of ``t`` or of an alias (the version counter they share) starts new caches.
    """
    version, caches = getattr(t, "_tensor_caches", (None, None))
    if version != t._version:  # first use, or ``t`` itself changed in place since: its plans are stale
        key = (str(t.device), t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        owner, version, caches = _CACHE_OWNERS.get(key, (None, None, None))
        if owner is None or owner() is None or version != t._version:
            for gone in [k for k, (ref, _, _) in _CACHE_OWNERS.items() if ref() is None]:
                del _CACHE_OWNERS[gone]
            caches = {}
            _CACHE_OWNERS[key] = (weakref.ref(t), t._version, caches)
        t._tensor_caches = (t._version, caches)
    return caches.setdefault(name, {})
