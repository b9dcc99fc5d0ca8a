"""Context parallelism: which tokens of a sequence each context-parallel rank holds.

Megatron's load-balanced layout: a sequence of ``S`` tokens is cut into ``2 * cp`` equal chunks and rank
``r`` holds chunks ``r`` and ``2 * cp - 1 - r`` (in that order), so with causal attention every rank
has the same amount of work (an early chunk with little to attend to, a late one with much). The cut
is over the whole packed sequence: attention is exact whatever the cut (each rank attends with the
keys and values of the whole sequence, see :mod:`model.attention`), and over a pack of many documents
the pairing balances the work as it does for one long document. ``S`` must be a multiple of
``2 * cp``; :func:`check_sequence_length` says so in one line.

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


def local_token_positions(seq_length: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """int64 ``(seq_length / cp_size,)``: the global positions of rank ``cp_rank``'s tokens, in its order."""
    check_sequence_length(seq_length, cp_size)
    chunk = seq_length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    last_index = 2 * cp_size - 1 - cp_rank
    second = torch.arange(last_index * chunk, (last_index + 1) * chunk, device=device)
    return torch.cat([first, second])


def gathered_to_global_order(seq_length: int, cp_size: int, device=None) -> torch.Tensor:
    """int64 ``(seq_length,)``: index into the rank-major all-gather of every rank's tokens (rank 0's,
    then rank 1's, ...) that puts them back in sequence order."""
    gathered = torch.cat([local_token_positions(seq_length, cp_size, r, device) for r in range(cp_size)])
    return torch.argsort(gathered)


def split_sequence(t: torch.Tensor, seq_dim: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """The tokens of ``t`` (full sequence along ``seq_dim``) that rank ``cp_rank`` holds."""
    if cp_size == 1:
        return t
    positions = local_token_positions(t.shape[seq_dim], cp_size, cp_rank, device=t.device)
    return t.index_select(seq_dim, positions)


def cp_size_and_rank() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()


def split_on_this_rank(t: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """:func:`split_sequence` for this process' context-parallel rank (a no-op at cp = 1)."""
    return split_sequence(t, seq_dim, *cp_size_and_rank())


def gather_on_this_rank(t: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """The full sequence from every context-parallel rank's part ``t`` (inverse of
    :func:`split_on_this_rank`; forward only, for outputs such as logits). A no-op at cp = 1."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    cp_size = parallel_state.get_context_parallel_world_size()
    if cp_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(cp_size)]
    dist.all_gather(parts, t.contiguous(), group=parallel_state.get_context_parallel_group())
    gathered = torch.cat(parts, dim=seq_dim)
    order = gathered_to_global_order(gathered.shape[seq_dim], cp_size, device=t.device)
    return gathered.index_select(seq_dim, order)
