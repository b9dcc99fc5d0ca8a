"""Run a test body on N gloo ranks in fresh processes (the way torchrun would start them)."""

from __future__ import annotations

from typing import Any, Callable

from common.distributed.spawn import RankError, spawn_ranks


def run_ranks(fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout: float = 600) -> list[Any]:
    """Call ``fn(rank, *args)`` in ``world_size`` spawned processes (one thread each, as on the 2-core
    CI machine); return the results by rank. A rank's exception fails the test with its traceback."""
    try:
        return spawn_ranks(fn, world_size, *args, timeout=timeout, threads_per_rank=1)
    except RankError as exc:
        raise AssertionError(f"{exc}\n{exc.rank_traceback}") from None
