"""Context parallelism: which tokens of a packed sequence each context-parallel rank holds.

Megatron's load-balanced layout, per document: every document of a packed row is cut into ``2 * cp``
chunks and rank ``r`` holds chunks ``r`` and ``2 * cp - 1 - r`` of it. With causal attention the
work of a chunk grows with its place in its document, so pairing an early chunk with a late one gives
every rank the same attention work for every document, whatever the mix of lengths in the pack (a cut
of the whole pack into ``2 * cp`` chunks would not: a pack of one long document and many short ones
puts most of the long document's late, expensive queries on a few ranks). Attention is exact whatever
the cut: each rank attends with the keys and values of the whole sequence (:mod:`model.attention`).

Chunks of a document have ``L // (2 * cp)`` tokens; the ``L % (2 * cp)`` tokens left over are given
one per chunk to the ranks that hold the fewest tokens so far (ties: the lower rank), so every rank
ends with exactly ``S / cp`` tokens and no padding is inserted. A row of one document whose length is a
multiple of ``2 * cp`` (and a row without document ids) gets exactly Megatron's layout for one
sequence. ``S`` must be a multiple of ``2 * cp``; :func:`check_sequence_length` says so in one line.

A rank's tokens stay in sequence order. The layout of a micro-batch depends on its document ids only:
every rank computes the same one; it is cached on the document-id tensor, so the model, its attention
layers and the loss (:func:`split_on_this_rank`) cut the same way from one computation.

Functions take the CP size and rank explicitly (``cp_size``/``cp_rank``); the ``*_on_this_rank``
helpers read them from Megatron's parallel state.
"""

from __future__ import annotations

import torch


def check_sequence_length(seq_length: int, cp_size: int, what: str = "sequence length") -> None:
    """Raise ValueError unless ``seq_length`` splits into ``2 * cp_size`` equal chunks."""
    if cp_size > 1 and seq_length % (2 * cp_size):
        raise ValueError(f"{what} {seq_length} is not divisible by 2*cp = {2 * cp_size}: context parallelism "
                         f"cuts each sequence into 2*cp equal chunks (pad or pack to a multiple of {2 * cp_size})")


def document_lengths(segment_ids: list[int]) -> list[int]:
    """Lengths of the runs of equal values (the documents of a packed row), in order."""
    lengths, start = [], 0
    for i in range(1, len(segment_ids) + 1):
        if i == len(segment_ids) or segment_ids[i] != segment_ids[start]:
            lengths.append(i - start)
            start = i
    return lengths


def chunk_sizes(lengths: list[int], cp_size: int) -> list[list[int]]:
    """Per document, the sizes of its ``2 * cp_size`` chunks (chunk ``j`` goes to rank
    ``min(j, 2 * cp_size - 1 - j)``): ``L // (2 * cp)`` each, the remainder given one token per chunk to
    the ranks holding the fewest tokens so far (first their early chunk, then their late one)."""
    chunks = 2 * cp_size
    held = [0] * cp_size  # tokens each rank holds so far
    sizes = []
    for length in lengths:
        base, extra = divmod(length, chunks)
        doc = [base] * chunks
        for late in (False, True):
            count = min(extra, cp_size)
            extra -= count
            for rank in sorted(range(cp_size), key=lambda r: (held[r], r))[:count]:
                doc[chunks - 1 - rank if late else rank] += 1
                held[rank] += 1
        for rank in range(cp_size):
            held[rank] += 2 * base
        sizes.append(doc)
    return sizes


def rank_positions(segment_ids: list[int] | None, seq_length: int, cp_size: int) -> torch.Tensor:
    """int64 ``[cp_size, seq_length / cp_size]``: the global positions each rank holds (sorted), for one
    row whose documents are the runs of ``segment_ids`` (None: one document)."""
    check_sequence_length(seq_length, cp_size)
    lengths = [seq_length] if segment_ids is None else document_lengths(segment_ids)
    if sum(lengths) != seq_length:
        raise ValueError(f"segment ids cover {sum(lengths)} tokens, the sequence has {seq_length}")
    owner = []  # the rank of each chunk, in sequence order
    sizes = []
    for doc in chunk_sizes(lengths, cp_size):
        for j, size in enumerate(doc):
            owner.append(min(j, 2 * cp_size - 1 - j))
            sizes.append(size)
    token_owner = torch.repeat_interleave(torch.tensor(owner), torch.tensor(sizes))
    positions = torch.argsort(token_owner, stable=True)  # rank-major, in sequence order within each rank
    return positions.view(cp_size, seq_length // cp_size)


def layout(document_ids: torch.Tensor | None, batch: int, seq_length: int, cp_size: int) -> torch.Tensor:
    """int64 ``[batch, cp_size, seq_length / cp_size]`` (CPU): rank ``r``'s global positions in row
    ``b`` are ``layout[b, r]``. Cached on ``document_ids`` (``[batch, seq_length]`` or None)."""
    if document_ids is None:
        return rank_positions(None, seq_length, cp_size).expand(batch, -1, -1)
    if tuple(document_ids.shape) != (batch, seq_length):
        raise ValueError(f"document ids {tuple(document_ids.shape)} do not match the sequence "
                         f"[{batch}, {seq_length}]")
    cache = getattr(document_ids, "_cp_layouts", None)
    if cache is None:
        cache = document_ids._cp_layouts = {}
    if cp_size not in cache:
        cache[cp_size] = torch.stack([rank_positions(row, seq_length, cp_size) for row in document_ids.tolist()])
    return cache[cp_size]


def _take(t: torch.Tensor, seq_dim: int, batch_dim: int, index: torch.Tensor) -> torch.Tensor:
    """``t`` with its sequence dimension re-indexed per row: row ``b`` takes ``index[b]``."""
    index = index.to(t.device)
    if index.shape[0] == 1 or bool((index == index[:1]).all()):
        return t.index_select(seq_dim, index[0])
    rows = [t.select(batch_dim, b).index_select(seq_dim - (batch_dim < seq_dim), index[b])
            for b in range(index.shape[0])]
    return torch.stack(rows, dim=batch_dim)


def split_sequence(t: torch.Tensor, seq_dim: int, cp_size: int, cp_rank: int,
                   document_ids: torch.Tensor | None = None, batch_dim: int | None = None) -> torch.Tensor:
    """The tokens of ``t`` (full sequence along ``seq_dim``, rows along ``batch_dim``; default: the other
    of dimensions 0 and 1) that rank ``cp_rank`` holds, for the documents of ``document_ids``."""
    if cp_size == 1:
        return t
    batch_dim = (1 - seq_dim if seq_dim < 2 else 0) if batch_dim is None else batch_dim
    positions = layout(document_ids, t.shape[batch_dim], t.shape[seq_dim], cp_size)[:, cp_rank]
    return _take(t, seq_dim, batch_dim, positions)


def gathered_order(document_ids: torch.Tensor | None, batch: int, seq_length: int, cp_size: int) -> torch.Tensor:
    """int64 ``[batch, seq_length]``: per row, the index into the rank-major all-gather of every rank's
    tokens (rank 0's, then rank 1's, ...) that puts them back in sequence order."""
    rank_major = layout(document_ids, batch, seq_length, cp_size).reshape(batch, seq_length)
    return torch.argsort(rank_major, dim=1)


def cp_size_and_rank() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()


def split_on_this_rank(t: torch.Tensor, seq_dim: int, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`split_sequence` for this process' context-parallel rank (a no-op at cp = 1)."""
    return split_sequence(t, seq_dim, *cp_size_and_rank(), document_ids=document_ids)


def gather_on_this_rank(t: torch.Tensor, seq_dim: int, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The full sequence from every context-parallel rank's part ``t`` (inverse of
    :func:`split_on_this_rank` with the same ``document_ids``; forward only, for outputs such as
    logits). A no-op at cp = 1."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    cp_size = parallel_state.get_context_parallel_world_size()
    if cp_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(cp_size)]
    dist.all_gather(parts, t.contiguous(), group=parallel_state.get_context_parallel_group())
    gathered = torch.cat(parts, dim=seq_dim)
    batch_dim = 1 - seq_dim if seq_dim < 2 else 0
    order = gathered_order(document_ids, gathered.shape[batch_dim], gathered.shape[seq_dim], cp_size)
    return _take(gathered, seq_dim, batch_dim, order)
