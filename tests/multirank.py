"""Run a test body on N gloo ranks in fresh processes (the way torchrun would start them)."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any, Callable

from common.distributed.spawn import RankError, spawn_ranks

# Ranks are forked from one server process that imported these once per test session (importing
# torch and Megatron-Core takes ~5 s per process on the 2-core CI machine, and the suite starts ranks
# about a hundred times). Of ours the server imports only `common` (first: it installs the warning
# filters every process of the project has before Megatron), so each rank still starts with the state a
# fresh interpreter would have: no process group, no parallel state, no test's module globals.
_PRELOAD = ["common", "torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt",
            "megatron.core.optimizer", "megatron.core.dist_checkpointing", "transformers"]
_context: mp.context.BaseContext | None = None


def _rank_context() -> mp.context.BaseContext:
    """The forkserver on CPU; on a CUDA machine a fresh interpreter per rank ("spawn"), as there a
    preloaded module that touched the CUDA driver would leave every forked rank unable to use it."""
    global _context
    if _context is None:
        import torch

        if torch.cuda.is_available():
            _context = mp.get_context("spawn")
        else:
            _context = mp.get_context("forkserver")
            _context.set_forkserver_preload(_PRELOAD)
    return _context


def run_ranks(fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout: float = 600) -> list[Any]:
    """Call ``fn(rank, *args)`` in ``world_size`` new processes (one thread each, as on the 2-core CI
    machine); return the results by rank. A rank's exception fails the test with its traceback."""
    try:
        return spawn_ranks(fn, world_size, *args, timeout=timeout, threads_per_rank=1, context=_rank_context())
    except RankError as exc:
        raise AssertionError(f"{exc}\n{exc.rank_traceback}") from None
