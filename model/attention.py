"""Packed-document attention without transformer-engine, on CPU and CUDA, with context parallelism.

:class:`DocumentAttention` is a Megatron-Core core-attention module (the ``core_attention`` of a
``SelfAttention`` spec). Instead of an ``[s, s]`` mask it takes, as its ``attention_mask`` argument, the
**segment ids** of the full sequence: an integer tensor ``[b, S]`` (``S`` = the whole sequence before
any context-parallel split) whose runs of equal values are the documents of a packed sequence (the
decoder, causal within each document) or the frames of the vision encoder (bidirectional within each).
``None`` means one segment per row.

Each document is attended separately with PyTorch's ``scaled_dot_product_attention`` (flash kernels on
CPU and CUDA, grouped-query attention without repeating keys), so memory grows linearly with the
sequence: nothing ``s x s`` is ever built or kept. A run of queries that starts inside a document (with
context parallelism: every rank's chunks but the first) sees the keys from the document's start up to
its own positions, a causal mask aligned to the lower right. On CUDA that is PyTorch's
``causal_lower_right`` bias, which its flash and memory-efficient kernels apply without a mask. On CPU
the queries go in blocks of at most :data:`MASK_ELEMENTS` / keys rows with an explicit mask, each
block recomputed in the backward pass (``torch.utils.checkpoint``) because PyTorch's CPU kernel saves
the mask, as floats, for its backward: kept for every block it would grow with queries x keys, 16K x
256K x 4 bytes = 16 GB per layer for a late chunk of one 256K-token document at cp = 8. Blocks of at
most :data:`SMALL_MASK` entries (the chunks of short documents) keep theirs instead.

On CUDA in half precision (training under ``Float16Module``), without dropout, all pieces of all rows go
to one call of PyTorch's variable-length flash attention (``torch.nn.attention.varlen``, torch >= 2.9)
instead of one ``scaled_dot_product_attention`` per piece: a pack of many short documents (SFT
conversations) then costs one kernel launch per layer, not two per document. Its causal mask is the
lower-right one a piece needs. Before its first use on a device and dtype the varlen kernel is checked
against the per-piece path on a small case (two documents, a lower-right piece, grouped-query heads); if
it disagrees or fails (its signature changed between torch releases), a warning says so and the
per-piece path stays in use. :data:`USE_VARLEN` False turns it off.

Context parallelism (``cp > 1``): the rank's queries are its tokens in the layout of
:mod:`model.context_parallel`; keys and values are all-gathered inside the CP group (autograd-aware:
their gradients are reduce-scattered back) and put in sequence order, so every query sees exactly the
keys it would see without CP.

Padding (segment ids < 0) attends within blocks of :data:`PADDING_BLOCK` tokens: its outputs feed no loss
and reach no real token, and as one causal segment it would cost attention quadratic in its length.

The segment ids of one forward pass are the same tensor for every layer; the document plan derived from
them is cached with that tensor (:func:`model.segments.tensor_cache`, which activation recomputation's
detached aliases find too), so it is computed once per forward, not once per layer.

Generation (:class:`model.kv_cache.KVCache`, set as ``kv_cache`` on the decoder layers' modules by the
model for the length of a forward): the prefill stores every layer's keys and values of the prompts, and a
decoding step's one query per row attends to its prompt's and its response's cached keys
(:meth:`model.kv_cache.KVCache.attend`).
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache, partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from model.context_parallel import document_bounds, gathered_order, layout
from model.kv_cache import KVCache
from model.segments import segment_boundaries, tensor_cache

# CPU, queries that start inside a document: rows x keys of one masked block, at most (a bool mask and the
# kernel's float copy: 5 bytes each, transient), and its rows at most / at least.
MASK_ELEMENTS = 1 << 24
QUERY_BLOCK, MIN_QUERY_BLOCK = 1024, 64
# A block with at most this many mask entries keeps its mask (at most 256 KB, < 1 KB per query row of a
# short document's chunk) rather than computing it twice: the chunks of short documents are many.
SMALL_MASK = 1 << 16
# Padding (segment id < 0: a pack's tail, the RL micro-batches' fill-up) attends within blocks of at most
# this many tokens: nothing reads its outputs, and as one causal document its attention would grow with
# the square of its length (half of an RL micro-batch can be padding under pipeline parallelism).
PADDING_BLOCK = 128
# CUDA, half precision: one variable-length flash attention call per layer (see the module docstring).
USE_VARLEN = True


def thd_packed_seq_params(document_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                          max_seqlen: int | None = None) -> PackedSeqParams:
    """Megatron's THD parameters (transformer-engine's packed attention) of a pack's ``document_ids``
    [1, s]: one segment per document (and per run of padding). ``cu_seqlens`` / ``max_seqlen``, when the
    data loader computed them already (:func:`segment_boundaries`), are used as they are."""
    if document_ids.dim() != 2 or document_ids.shape[0] != 1:
        # Megatron's THD layout is one row of concatenated documents; a pack already holds many.
        raise ValueError(f"document_ids {tuple(document_ids.shape)}: the transformer-engine packed (THD) "
                         "path takes one row (train.micro_batch_size=1); pack longer sequences instead")
    if cu_seqlens is None:
        cu_seqlens, max_seqlen = segment_boundaries(document_ids)
    cu = cu_seqlens.to(device=document_ids.device, dtype=torch.int32, non_blocking=True)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen))


def padding_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """True where a token is padding: document (segment) id < 0, the rule of packs' tails, RL rows'
    fill-up and rollouts' left padding. The model's ``padding_mask`` argument (left out of the MoE
    routers) is this of the ``document_ids``."""
    return document_ids < 0


@dataclass(frozen=True)
class AttentionPiece:
    """Local query rows ``[q_start, q_end)`` attend to keys ``[k_start, k_end)`` (sequence order).

    ``causal_offset`` None: every key is visible. Otherwise query row ``q_start + i`` sees keys
    ``k_start .. k_start + causal_offset + i`` (``causal_offset`` 0 is the ordinary causal square).
    """

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    causal_offset: int | None


def attention_pieces(segment_ids, causal: bool, positions=None) -> list[AttentionPiece]:
    """The pieces of one row: this rank's query rows, run by run, in local order.

    ``segment_ids`` (a list or a 1-D CPU tensor) cover the full sequence (``S`` tokens); ``positions``
    (likewise) are the global positions of this rank's tokens in its order (context parallelism,
    :func:`model.context_parallel.rank_positions`), None for all ``S``. Keys are in sequence order. A
    piece is a run of consecutive positions inside one segment. A run of padding (ids < 0) is cut into
    segments of :data:`PADDING_BLOCK` tokens.
    """
    seg = torch.as_tensor(segment_ids)
    padding = padding_mask(seg)
    if bool(padding.any()):  # block k of the sequence's padding positions gets id -1 - k
        seg = torch.where(padding, -1 - torch.arange(seg.numel()) // PADDING_BLOCK, seg)
    starts, ends = document_bounds(seg)  # each position's segment: [start, end)
    pos = torch.arange(starts.numel()) if positions is None else torch.as_tensor(positions)
    breaks = torch.ones(pos.numel() + 1, dtype=torch.bool)  # where a run of the local order begins
    breaks[1:-1] = (pos[1:] != pos[:-1] + 1) | (starts[pos[1:]] != starts[pos[:-1]])
    edges = torch.nonzero(breaks).flatten().tolist()
    pieces = []
    for l0, l1 in zip(edges[:-1], edges[1:]):
        g0 = int(pos[l0])
        d0, d1 = int(starts[g0]), int(ends[g0])
        if causal:
            pieces.append(AttentionPiece(l0, l1, d0, g0 + l1 - l0, g0 - d0))
        else:
            pieces.append(AttentionPiece(l0, l1, d0, d1, None))
    return pieces


def _plan(segment_ids: torch.Tensor | None, batch: int, seq: int, causal: bool, cp_size: int, cp_rank: int):
    """Pieces per batch row, cached on the ``segment_ids`` tensor (shared by every layer of a forward)."""
    key = (causal, cp_size, cp_rank, seq)

    def positions() -> torch.Tensor | list[None]:  # this rank's global positions, per row
        if cp_size == 1:
            return [None] * batch
        return layout(segment_ids, batch, seq, cp_size)[:, cp_rank]

    if segment_ids is not None:
        cache = tensor_cache(segment_ids, "attention_plans")
        if key not in cache:
            if segment_ids.dim() != 2 or segment_ids.shape != (batch, seq):
                raise ValueError(f"segment ids must be [batch, full sequence] = [{batch}, {seq}], "
                                 f"got {tuple(segment_ids.shape)}")
            cache[key] = [attention_pieces(row, causal, local)
                          for row, local in zip(segment_ids.cpu(), positions())]
        return cache[key]
    return [attention_pieces(torch.zeros(seq, dtype=torch.long), causal, positions()[0])] * batch


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal_offset: int | None, scale: float,
            dropout_p: float) -> torch.Tensor:
    """q ``[hq, lq, d]``, k/v ``[hk, lk, d]`` -> ``[hq, lq, d]``; with ``causal_offset`` (0 <= offset,
    ``lk = offset + lq``) query ``i`` sees keys ``0 .. offset + i``."""
    gqa = q.shape[0] != k.shape[0]
    if gqa and q.is_cuda and q.dtype == torch.float32:
        # CUDA float32 (generation, evaluation, parity): flash takes grouped heads but not float32, the
        # memory-efficient kernel float32 but not grouped heads (torch 2.11), so SDPA would fall back to its
        # math kernel and build the [hq, lq, lk] scores. Repeated heads (what enable_gqa means) let the
        # memory-efficient kernel run, in memory linear in the length.
        group = q.shape[0] // k.shape[0]
        k, v, gqa = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0), False
    q, k, v = q[None], k[None], v[None]
    if causal_offset is None or (causal_offset == 0 and q.shape[2] == k.shape[2]):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal_offset == 0, scale=scale,
                                             dropout_p=dropout_p, enable_gqa=gqa)
        return out[0]
    if q.is_cuda:
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(q.shape[2], k.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, dropout_p=dropout_p,
                                              enable_gqa=gqa)[0]
    rows = max(MIN_QUERY_BLOCK, min(QUERY_BLOCK, MASK_ELEMENTS // k.shape[2]))
    blocks = []
    for b0 in range(0, q.shape[2], rows):
        b1 = min(b0 + rows, q.shape[2])
        visible = causal_offset + b1  # keys 0 .. causal_offset + (b1 - 1)
        part = partial(_masked_block, offset=causal_offset + b0, scale=scale, dropout_p=dropout_p, gqa=gqa)
        args = (q[:, :, b0:b1], k[:, :, :visible], v[:, :, :visible])
        if torch.is_grad_enabled() and any(t.requires_grad for t in args) and (b1 - b0) * visible > SMALL_MASK:
            blocks.append(checkpoint(part, *args, use_reentrant=False))
        else:
            blocks.append(part(*args))
    return torch.cat(blocks, dim=2)[0]


def _masked_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int, scale: float,
                  dropout_p: float, gqa: bool) -> torch.Tensor:
    """Query rows ``offset + i`` (``q [1, hq, rows, d]``) over keys ``0 .. offset + i``."""
    rows = torch.arange(q.shape[2], device=q.device)[:, None] + offset
    mask = torch.arange(k.shape[2], device=q.device)[None, :] <= rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p,
                                          enable_gqa=gqa)


def _varlen_call(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float,
                 repeat_kv: bool = False) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn`` on ``q [Tq, hq, d]``, ``k/v [Tk, hk, d]`` (pieces back to back,
    ``cu_*`` int32 offsets), asked for a lower-right causal mask, the scale and grouped-query heads in the
    words of the installed torch (2.9: ``is_causal``; 2.10+: ``window_size``, ``scale``; 2.12+: ``enable_gqa``).
    Before 2.12 the flash kernel takes fewer key/value heads as they are (it has no flag for it); only
    ``repeat_kv`` (a build that refuses them, see :func:`varlen_mode`) repeats them to the query heads, at the
    cost of K/V copies the backward keeps (``hq / hk`` times their size)."""
    varlen_attn, params = _varlen_kernel()
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    elif causal:
        kwargs["is_causal"] = True
    if "scale" in params:
        kwargs["scale"] = scale
    elif not math.isclose(scale, q.shape[-1] ** -0.5):
        raise TypeError("this torch's varlen_attn takes no softmax scale")
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        elif repeat_kv:  # query head i uses key head i // group, as scaled_dot_product_attention's enable_gqa
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


@lru_cache(maxsize=1)
def _varlen_kernel():
    """The installed torch's ``varlen_attn`` and the names of its parameters (ImportError before torch 2.9)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


_VARLEN_CHECKED: dict[tuple, str | None] = {}


def _varlen_key(device, dtype, head_dim: int, hq: int, hk: int, scale: float) -> tuple:
    """The key of :data:`_VARLEN_CHECKED`: what the kernel check depends on."""
    return str(device), dtype, head_dim, hq, hk, scale


def varlen_ready(device: torch.device, dtype: torch.dtype, head_dim: int, hq: int, hk: int, scale: float) -> bool:
    """Whether the varlen kernel serves this device, dtype and head layout (:func:`varlen_mode`)."""
    return varlen_mode(device, dtype, head_dim, hq, hk, scale) is not None


def varlen_mode(device: torch.device, dtype: torch.dtype, head_dim: int, hq: int, hk: int, scale: float) -> str | None:
    """How the varlen kernel serves this device, dtype and head layout, checked once per process and key
    against the per-piece path on two documents and a lower-right piece, forward and backward (see the
    module docstring): ``"heads"`` (grouped-query key/value heads passed as they are), ``"repeat"`` (this
    build refuses or miscomputes them: repeated to the query heads), None (unusable: per-piece path)."""
    key = _varlen_key(device, dtype, head_dim, hq, hk, scale)
    if key not in _VARLEN_CHECKED:
        modes = ("heads", "repeat") if hq != hk else ("heads",)
        problems = []
        _VARLEN_CHECKED[key] = None
        for mode in modes:
            problem = _varlen_problem(device, dtype, head_dim, hq, hk, scale, repeat_kv=mode == "repeat")
            if problem is None:
                _VARLEN_CHECKED[key] = mode
                break
            problems.append(problem)
        if _VARLEN_CHECKED[key] != modes[0]:
            warnings.warn(f"torch {torch.__version__}'s varlen attention {'; '.join(problems)}; "
                          + ("repeating key/value heads" if _VARLEN_CHECKED[key] else "using per-document attention"))
    return _VARLEN_CHECKED[key]


def _varlen_problem(device, dtype, head_dim: int, hq: int, hk: int, scale: float, repeat_kv: bool) -> str | None:
    """What is wrong with the varlen kernel on a small case (None: nothing)."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        lengths_q, lengths_k, offsets = [5, 11, 3], [5, 11, 9], [0, 0, 6]  # the last: 3 queries after 6 keys
        tq, tk = sum(lengths_q), sum(lengths_k)
        q = torch.randn(tq, hq, head_dim, device=device, dtype=dtype, generator=g).requires_grad_()
        k, v = (torch.randn(tk, hk, head_dim, device=device, dtype=dtype, generator=g).requires_grad_()
                for _ in range(2))
        cu_q = torch.tensor([0, 5, 16, 19], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, 5, 16, 25], dtype=torch.int32, device=device)
        got = _varlen_call(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), True, scale, repeat_kv)
        got.float().sum().backward()  # the backward too: a kernel may take grouped heads forward only
        if k.grad is None or k.grad.shape != k.shape:
            return "gives no key gradient of the keys' shape"
        with torch.no_grad():
            want = []
            for i, off in enumerate(offsets):
                qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
                want.append(_attend(q[qs].transpose(0, 1), k[ks].transpose(0, 1), v[ks].transpose(0, 1), off,
                                    scale, 0.0).transpose(0, 1))
            error = float((got.float() - torch.cat(want).float()).abs().max())
        if error >= 0.05:  # bf16 rounding is ~1e-2 here; a wrong mask is off by ~0.5
            return f"disagrees with per-document attention (max difference {error:.3f})"
    except Exception as exc:  # noqa: BLE001 - an unusable kernel (old torch, other signature, unsupported GPU)
        first_line = (str(exc).splitlines() or [""])[0][:200]  # dispatcher errors run to pages
        return f"is not usable ({type(exc).__name__}: {first_line})"
    return None


def _varlen_plan(plans, seq: int, order, device, cache: dict | None, key: tuple):
    """Offsets and key indices of all pieces of all rows, back to back, as the varlen kernel takes them:
    (cu_q, cu_k int32, max_q, max_k, key_index or None). Queries are the rows' local tokens in order; keys
    are each piece's key range in sequence order, gathered from ``[b * S]`` by ``key_index`` unless every
    piece's keys are its own queries (no ``order``, cp = 1: a piece is a whole document or frame, or a
    causal document's own prefix). Kept in ``cache`` under ``key``."""
    if cache is not None and key in cache:
        return cache[key]
    lengths_q, lengths_k, index = [], [], []
    for b, pieces in enumerate(plans):
        for p in pieces:
            lengths_q.append(p.q_end - p.q_start)
            lengths_k.append(p.k_end - p.k_start)
            if order is not None:
                index.append(order[b, p.k_start:p.k_end] + b * seq)
    cu_q = torch.tensor([0] + lengths_q).cumsum(0).to(device=device, dtype=torch.int32)
    cu_k = torch.tensor([0] + lengths_k).cumsum(0).to(device=device, dtype=torch.int32)
    key_index = torch.cat(index).to(device) if index else None
    out = (cu_q, cu_k, max(lengths_q), max(lengths_k), key_index)
    if cache is not None:
        cache[key] = out
    return out


def attend_packed(query, key, value, plans, order, causal: bool, scale: float, dropout_p: float = 0.0, *,
                  cache: dict | None = None, plan_key: tuple = (), varlen: bool | None = None) -> torch.Tensor:
    """The attention of this rank's queries ``[sq, b, hq, d]`` over keys/values ``[S, b, hk, d]`` by the
    pieces of each row (``plans``, from :func:`_plan`) -> ``[sq, b, hq * d]``. ``order`` ``[b, S]``: where each
    sequence position's key is in ``key`` (context parallelism's gathered order), None when keys are in
    sequence order. ``varlen``: None chooses (see the module docstring), False: one SDPA per piece, True:
    the varlen kernel (CUDA, half precision). ``cache``/``plan_key``: where the varlen offsets are kept."""
    sq, batch, hq, head_dim = query.shape
    hk = key.shape[2]
    if varlen is None:
        varlen = (USE_VARLEN and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and dropout_p == 0
                  and head_dim % 8 == 0 and head_dim <= 256 and hq % hk == 0
                  and varlen_ready(query.device, query.dtype, head_dim, hq, hk, scale))
    if varlen:
        repeat_kv = _VARLEN_CHECKED.get(_varlen_key(query.device, query.dtype, head_dim, hq, hk, scale)) == "repeat"
        seq = key.shape[0]
        cu_q, cu_k, max_q, max_k, key_index = _varlen_plan(plans, seq, order, query.device, cache,
                                                           ("varlen", *plan_key))
        q = query.transpose(0, 1).reshape(batch * sq, hq, head_dim)
        k, v = (t.transpose(0, 1).reshape(batch * seq, hk, head_dim) for t in (key, value))
        if key_index is not None:
            k, v = k.index_select(0, key_index), v.index_select(0, key_index)
        out = _varlen_call(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, repeat_kv)
        return out.view(batch, sq, hq * head_dim).transpose(0, 1).contiguous()
    rows = []
    for b, pieces in enumerate(plans):
        q, k, v = (t[:, b] for t in (query, key, value))
        if order is not None:  # keys and values of every rank, back in sequence order
            k, v = k.index_select(0, order[b]), v.index_select(0, order[b])
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [heads, s, d]
        parts = [_attend(q[:, p.q_start:p.q_end], k[:, p.k_start:p.k_end], v[:, p.k_start:p.k_end],
                         p.causal_offset, scale, dropout_p) for p in pieces]
        rows.append(torch.cat(parts, dim=1))  # [hq, sq, d]
    out = torch.stack(rows, dim=0)  # [b, hq, sq, d]
    return out.permute(2, 0, 1, 3).reshape(sq, batch, -1)


class DocumentAttention(MegatronModule):
    """Core attention over the documents (or frames) of packed sequences; see the module docstring.

    ``forward(query [sq, b, hq, d], key/value [sq, b, hk, d], attention_mask=segment ids [b, S] or None)
    -> [sq, b, hq * d]`` with ``sq = S / cp``. Causal for ``AttnMaskType.causal``, bidirectional
    within segments otherwise.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.layer_number = layer_number  # the decoder layer's (global) number: the KV cache's key
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.kv_cache: KVCache | None = None  # set by the model for a generation's forward

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("DocumentAttention takes segment ids as attention_mask, not packed_seq_params "
                             "or an attention bias")
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            raise ValueError("DocumentAttention takes integer segment ids [b, S], not a boolean mask")
        cache = self.kv_cache
        if cache is not None and cache.decoding:
            return cache.attend(self.layer_number, query, key, value, self.softmax_scale)
        if cache is not None:
            cache.store_prompts(self.layer_number, key, value)
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        # From the config, not the parallel state: the ViT attends within frames, with cp = 1 in its config.
        cp_size = self.config.context_parallel_size
        cp_rank = parallel_state.get_context_parallel_rank() if cp_size > 1 else 0
        sq, batch = query.shape[:2]
        seq = sq * cp_size
        if cp_size > 1:
            group = parallel_state.get_context_parallel_group()
            order = gathered_order(attention_mask, batch, seq, cp_size, key.device)  # [b, S]
            key = tensor_parallel.gather_from_sequence_parallel_region(key, True, group)
            value = tensor_parallel.gather_from_sequence_parallel_region(value, True, group)
        plans = _plan(attention_mask, batch, seq, causal, cp_size, cp_rank)
        dropout_p = self.dropout if self.training else 0.0
        return attend_packed(query, key, value, plans, order if cp_size > 1 else None, causal, self.softmax_scale,
                             dropout_p, cache=None if attention_mask is None else tensor_cache(attention_mask, "attention_plans"),
                             plan_key=(causal, cp_size, cp_rank, seq))
