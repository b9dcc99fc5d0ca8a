"""Collectives on small host values (flags, counters, loss sums) that work with any backend.

NCCL moves only CUDA tensors and gloo only CPU tensors; a value built on the CPU and all-reduced over
an NCCL group fails (or hangs) on the first GPU step. Every collective of this project that is not
Megatron-Core's own goes through :func:`communication_device`, so the tensor is on the device the
group's backend moves. The results come back as Python values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def communication_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device of the tensors ``group``'s backend moves: the current CUDA device for NCCL, else CPU."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_values(values: Sequence[float], group: dist.ProcessGroup | None = None,
                      op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
    """``values`` reduced element-wise over ``group`` (float64, so token counts stay exact); the values
    themselves when torch.distributed is not initialised."""
    t = torch.tensor(list(values), dtype=torch.float64)
    if dist.is_initialized():
        t = t.to(communication_device(group))
        dist.all_reduce(t, op=op, group=group)
    return t.cpu().tolist()


def broadcast_flag(flag: bool, src: int = 0, group: dist.ProcessGroup | None = None) -> bool:
    """Rank ``src``'s value of ``flag`` on every rank of ``group``."""
    t = torch.tensor([int(flag)])
    if dist.is_initialized():
        t = t.to(communication_device(group))
        dist.broadcast(t, src=src, group=group)
    return bool(t.item())
