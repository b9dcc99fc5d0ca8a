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
every rank computes the same one; it is cached with the document-id tensor, so the model, its attention
layers and the loss (:func:`split_on_this_rank`) cut the same way from one computation.

The vision encoder runs before the cut, and its work is shared: each image and video frame of the
micro-batch is encoded by one rank of the CP group, balanced by patch count, and the features are
all-gathered (:func:`encode_over_cp`), so every rank holds the visual embeddings of the whole pack
while computing and storing the ViT's activations for about ``1 / cp`` of its patches.

Functions take the CP size and rank explicitly (``cp_size``/``cp_rank``); the ``*_on_this_rank``
helpers read them from Megatron's parallel state.
"""

from __future__ import annotations

import torch

from model.segments import tensor_cache


def check_sequence_length(seq_length: int, cp_size: int, what: str = "sequence length") -> None:
    """Raise ValueError unless ``seq_length`` splits into ``2 * cp_size`` equal chunks."""
    if cp_size > 1 and seq_length % (2 * cp_size):
        raise ValueError(f"{what} {seq_length} is not divisible by 2*cp = {2 * cp_size}: context parallelism "
                         f"cuts each sequence into 2*cp equal chunks (pad or pack to a multiple of {2 * cp_size})")


def document_lengths(segment_ids) -> list[int]:
    """Lengths of the runs of equal values (the documents of a packed row), in order."""
    return torch.unique_consecutive(torch.as_tensor(segment_ids), return_counts=True)[1].tolist()


def document_bounds(segment_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 ``(starts, ends)``, each ``[S]``: the ``[start, end)`` of the run of equal values (the
    document) that each position of one row of ``segment_ids`` belongs to."""
    seg = torch.as_tensor(segment_ids)
    seq = seg.numel()
    index = torch.arange(seq, device=seg.device)
    first = torch.ones(seq, dtype=torch.bool, device=seg.device)
    first[1:] = seg[1:] != seg[:-1]
    last = torch.ones_like(first)
    last[:-1] = first[1:]
    starts = torch.cummax(torch.where(first, index, 0), 0).values
    ends = torch.cummin(torch.where(last, index + 1, seq).flip(0), 0).values.flip(0)
    return starts, ends


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


def rank_positions(segment_ids, seq_length: int, cp_size: int) -> torch.Tensor:
    """int64 ``[cp_size, seq_length / cp_size]``: the global positions each rank holds (sorted), for one
    row whose documents are the runs of ``segment_ids`` (a list or a 1-D tensor; None: one document)."""
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


def layout(document_ids: torch.Tensor | None, batch: int, seq_length: int, cp_size: int,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 ``[batch, cp_size, seq_length / cp_size]`` on ``device``: rank ``r``'s global positions in
    row ``b`` are ``layout[b, r]``. Cached on ``document_ids`` (``[batch, seq_length]`` or None), per
    device: computed once per micro-batch, copied to the GPU once."""
    if document_ids is None:
        return rank_positions(None, seq_length, cp_size).to(device).expand(batch, -1, -1)
    if tuple(document_ids.shape) != (batch, seq_length):
        raise ValueError(f"document ids {tuple(document_ids.shape)} do not match the sequence "
                         f"[{batch}, {seq_length}]")
    cache = tensor_cache(document_ids, "cp_layouts")
    device = torch.device(device)
    if (cp_size, "cpu") not in cache:
        cache[cp_size, "cpu"] = torch.stack([rank_positions(row, seq_length, cp_size) for row in document_ids.cpu()])
    if (cp_size, str(device)) not in cache:
        cache[cp_size, str(device)] = cache[cp_size, "cpu"].to(device)
    return cache[cp_size, str(device)]


def _take(t: torch.Tensor, seq_dim: int, batch_dim: int, index: torch.Tensor) -> torch.Tensor:
    """``t`` with its sequence dimension re-indexed per row: row ``b`` takes ``index[b]`` (on ``t``'s
    device)."""
    if index.shape[0] == 1 or index.stride(0) == 0:  # one row, or the same index for every row
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
    positions = layout(document_ids, t.shape[batch_dim], t.shape[seq_dim], cp_size, t.device)[:, cp_rank]
    return _take(t, seq_dim, batch_dim, positions)


def gathered_order(document_ids: torch.Tensor | None, batch: int, seq_length: int, cp_size: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 ``[batch, seq_length]`` on ``device``: per row, the index into the rank-major all-gather of
    every rank's tokens (rank 0's, then rank 1's, ...) that puts them back in sequence order (cached
    with the layout)."""
    rank_major = layout(document_ids, batch, seq_length, cp_size, device).reshape(batch, seq_length)
    if document_ids is None:
        return torch.argsort(rank_major, dim=1)
    cache = tensor_cache(document_ids, "cp_layouts")
    key = (cp_size, str(torch.device(device)), "order")
    if key not in cache:
        cache[key] = torch.argsort(rank_major, dim=1)
    return cache[key]


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
    order = gathered_order(document_ids, gathered.shape[batch_dim], gathered.shape[seq_dim], cp_size, t.device)
    return _take(gathered, seq_dim, batch_dim, order)


# ----------------------------------------------------------------------------------------------------
# The vision encoder's work shared over the CP group


def image_owners(patches: list[int], cp_size: int) -> list[int]:
    """The context-parallel rank that encodes each image or frame (``patches``: ViT patches of each):
    the largest first, each to the rank with the fewest patches so far (ties: the lower rank)."""
    load = [0] * cp_size
    owners = [0] * len(patches)
    for i in sorted(range(len(patches)), key=lambda i: (-patches[i], i)):
        rank = min(range(cp_size), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += patches[i]
    return owners


def encode_over_cp(encode: torch.nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor, merge: int, width: int,
                   num_deepstack: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``encode(pixels, grid_thw) -> (embeds, [deepstack features])`` (the ViT) over the images and
    video frames of a micro-batch, each encoded by one rank of the context-parallel group
    (:func:`image_owners`), the results all-gathered so that every rank returns what ``encode`` of all
    of them would: embeds ``[tokens, width]`` and ``num_deepstack`` DeepStack features of the same
    shape, in order (``merge``: patches per token along each side).

    Exact: the ViT attends within an image or a video's frame (temporal patch), whose position
    embeddings and rotary angles are those of an image of its size, so a frame's features do not
    depend on the others. Gradients: each rank's part of the gathered features gets the gradient of
    every rank's tokens (the gather's backward is a reduce-scatter), so a frame's ViT gradient is
    whole on its owner, and Megatron's reduction over data x context parallel ranks sums them as it
    summed the partial gradients of a ViT run on every rank. A rank that encodes nothing contributes an
    empty part of ``encode``'s parameter dtype that requires a gradient where ``encode`` would make one
    (every rank takes part in the backward's reduce-scatter, or none does).
    """
    from megatron.core import parallel_state, tensor_parallel

    cp_size, cp_rank = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    grid = torch.as_tensor(grid_thw).reshape(-1, 3).cpu()
    if cp_size == 1 or grid.shape[0] == 0:
        return encode(pixels, grid_thw)
    # The units of work: frames (a video's temporal patches are attended separately, with the same
    # position embeddings and rotary angles as an image of their size), in the order of their patches.
    grid = torch.repeat_interleave(torch.cat([torch.ones_like(grid[:, :1]), grid[:, 1:]], dim=1), grid[:, 0], dim=0)
    patches = grid.prod(-1).tolist()
    tokens = [p // merge ** 2 for p in patches]
    owners = image_owners(patches, cp_size)
    mine = [i for i, owner in enumerate(owners) if owner == cp_rank]
    features = (1 + num_deepstack) * width
    if mine:
        starts = [0]
        for p in patches:
            starts.append(starts[-1] + p)
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in mine]).to(pixels.device)
        embeds, deep = encode(pixels.index_select(0, rows), grid[mine])
        local = torch.cat([embeds, *deep], dim=-1)
    else:
        params = list(encode.parameters())
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        local = torch.zeros(0, features, dtype=params[0].dtype, device=pixels.device, requires_grad=trains)
    # Megatron's all-gather (reduce-scatter in the backward pass) takes equal parts: pad to the busiest.
    held = [sum(tokens[i] for i, owner in enumerate(owners) if owner == r) for r in range(cp_size)]
    longest = max(held)
    local = torch.nn.functional.pad(local, (0, 0, 0, longest - local.shape[0]))
    gathered = tensor_parallel.gather_from_sequence_parallel_region(local, True,
                                                                    parallel_state.get_context_parallel_group())
    # Rank r's rows hold its frames in order; put every frame's tokens back in order.
    offset, first = [r * longest for r in range(cp_size)], []
    for i, owner in enumerate(owners):
        first.append(offset[owner])
        offset[owner] += tokens[i]
    order = torch.cat([torch.arange(first[i], first[i] + tokens[i]) for i in range(len(tokens))])
    out = gathered.index_select(0, order.to(gathered.device)).split(width, dim=-1)
    return out[0], list(out[1:])
