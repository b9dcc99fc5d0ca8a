"""Start N ranks of a function in fresh processes, the way torchrun would, and collect their results.

Used by the tools that start their own ranks (``model.convert``, ``model.check_parity``) and by the
multi-rank tests. Each rank gets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in its environment, then calls ``fn(rank, *args)``; whatever it returns comes back to
the caller (it must be picklable). A rank that raises fails the whole call with a :class:`RankError`
carrying that rank's exception and traceback; the other ranks are stopped (they would otherwise wait
in a collective for the failed one). Ranks print no traceback themselves: the caller decides, e.g. one
line for a user error (:func:`user_error_message`), the rank's traceback (chained as the RankError's
cause) for anything else.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_module
import socket
import sys
import traceback
from typing import Any, Callable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankError(RuntimeError):
    """A spawned rank raised: ``error`` is its exception (re-created here), ``rank_traceback`` its text."""

    def __init__(self, rank: int, error: BaseException, rank_traceback: str):
        super().__init__(f"rank {rank} failed: {type(error).__name__}: {error}")
        self.rank, self.error, self.rank_traceback = rank, error, rank_traceback


class _RankTraceback(Exception):
    """The failed rank's traceback text, as the cause of its :class:`RankError` (printed above it)."""

    def __str__(self) -> str:
        return self.args[0]


# What the tools report as bad input (a config, a layout, a checkpoint's files) rather than as a bug: the
# model's ConfigError and ParallelConfigError are ValueErrors, a KeyError names a missing tensor.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError, FileExistsError)


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of ``exc`` when it is a user error (:data:`USER_ERRORS`) raised in this
    process or, for a :class:`RankError`, by a rank; None for anything else, which should propagate
    with its traceback. Command-line tools print it as ``error: <message>`` and exit 2."""
    error = exc.error if isinstance(exc, RankError) else exc
    if not isinstance(error, USER_ERRORS):
        return None
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])  # str(KeyError) would quote the message
    return str(error)


def call_reporting_user_errors(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` for a command-line tool: a user error (:func:`user_error_message`) is
    printed as one line, ``error: <message>``, and ends the process with exit status 2; anything else
    propagates with its traceback."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        message = user_error_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _entry(fn: Callable, rank: int, world_size: int, port: int, threads: int, args: tuple, results,
           environ: dict[str, str]) -> None:
    # The caller's environment as it is now: a forkserver's children would otherwise inherit the one the
    # server started with.
    os.environ.clear()
    os.environ.update(environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        import torch

        torch.set_num_threads(threads)
        # Pickled here, by value: a tensor put on the queue as it is would travel as a shared-memory
        # handle that dies with this process, which may exit before the parent reads it.
        results.put((rank, True, pickle.dumps(fn(rank, *args)), ""))
    except BaseException as exc:  # report any failure, asserts included, to the parent
        results.put((rank, False, _portable(exc), traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def spawn_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 3600,
                threads_per_rank: int | None = None, context: mp.context.BaseContext | None = None) -> list[Any]:
    """Call ``fn(rank, *args)`` in ``world_size`` spawned processes; return the results by rank.

    ``fn`` must be importable (a module-level function). ``threads_per_rank`` defaults to the CPU
    cores shared evenly (at least one). ``context``: the multiprocessing start method, "spawn" by
    default (a fresh interpreter per rank); a caller that starts ranks many times (the test suite) may
    pass a forkserver context that has imported torch and Megatron-Core once. Raises
    :class:`RankError` for the first rank that fails, and ``TimeoutError`` when no rank reports within
    ``timeout`` seconds.
    """
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    ctx = context or mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, threads, args, results, dict(os.environ)))
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    failure: RankError | None = None
    try:
        for _ in range(world_size):
            try:
                rank, ok, payload, text = results.get(timeout=timeout)
            except queue_module.Empty:
                raise TimeoutError(f"no rank of {world_size} reported within {timeout:.0f} s") from None
            if not ok:
                failure = RankError(rank, payload, text)
                break
            out[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5 if failure else timeout)
            if p.is_alive():
                p.kill()
                p.join()
    if failure is not None:
        raise failure from _RankTraceback(failure.rank_traceback)
    dead = [r for r, p in enumerate(procs) if p.exitcode not in (0, None) and r not in out]
    if dead:
        raise RuntimeError(f"rank(s) {dead} exited without a result (exit codes {[procs[r].exitcode for r in dead]})")
    return [out[r] for r in range(world_size)]
