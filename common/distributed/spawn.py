"""Start N ranks of a function in fresh processes, the way torchrun would, and collect their results.

Used by the tools that start their own ranks (``model.convert``, ``model.check_parity``) and by the
multi-rank tests. Each rank gets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in its environment, then calls ``fn(rank, *args)``; whatever it returns comes back to
the caller (it must be picklable). A rank that raises fails the whole call with a :class:`RankError`
carrying that rank's exception and traceback, a rank whose process ends without a result (killed by
the out-of-memory killer, say) with a :class:`RankDied` within seconds; the other ranks are stopped
(they would otherwise wait in a collective for the failed one). Ranks print no traceback themselves:
the caller decides, e.g. one line for a user error (:func:`user_error_message`), the rank's traceback
(chained as the RankError's cause) for anything else.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_module
import signal
import socket
import sys
import time
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


class RankDied(RuntimeError):
    """A spawned rank's process ended without reporting a result: ``exitcode`` is its exit status
    (negative: the signal that killed it)."""

    def __init__(self, rank: int, exitcode: int):
        if exitcode < 0:
            how = f"died (signal {-exitcode}{', e.g. out of memory' if -exitcode == signal.SIGKILL else ''})"
        else:
            how = f"exited with status {exitcode}"
        super().__init__(f"rank {rank} {how} without reporting a result")
        self.rank, self.exitcode = rank, exitcode


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
    :class:`RankError` for the first rank that fails, :class:`RankDied` within seconds when a rank's
    process ends without reporting (killed, e.g. by the out-of-memory killer), and ``TimeoutError`` when
    no rank reports within ``timeout`` seconds.
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
    failure: BaseException | None = None
    try:
        out = _collect(results, procs, timeout)
    except (RankError, RankDied) as exc:
        failure = exc
    finally:
        # Every rank reported: let them finish (tear down their process groups). Otherwise the others
        # may wait in a collective for the failed one: stopped after a short while.
        for p in procs:
            p.join(timeout=timeout if len(out) == world_size else 5)
            if p.is_alive():
                p.kill()
                p.join()
    if isinstance(failure, RankError):
        raise failure from _RankTraceback(failure.rank_traceback)
    if failure is not None:
        raise failure
    return [out[r] for r in range(world_size)]


# How often the waiting parent looks for ranks that died, and how long it gives a dead rank's result,
# already on its way through the queue's pipe, to arrive (a rank that exits normally has flushed it).
_POLL_S = 0.5
_GRACE_S = 2.0


def _collect(results, procs: list, timeout: float) -> dict[int, Any]:
    """The ranks' results by rank, read from ``results`` while watching ``procs``: raises the first
    failed rank's :class:`RankError`, :class:`RankDied` for a process that ended without a result, and
    ``TimeoutError`` when no rank reports for ``timeout`` seconds."""
    out: dict[int, Any] = {}
    silent_since = time.monotonic()  # the last report
    ended_at: dict[int, float] = {}  # rank -> when its process was first seen ended without a result
    while len(out) < len(procs):
        try:
            rank, ok, payload, text = results.get(timeout=_POLL_S)
        except queue_module.Empty:
            now = time.monotonic()
            for r, p in enumerate(procs):
                if r not in out and p.exitcode is not None:
                    if now - ended_at.setdefault(r, now) >= _GRACE_S:
                        raise RankDied(r, p.exitcode) from None
            if now - silent_since >= timeout:
                raise TimeoutError(f"no rank of {len(procs)} reported within {timeout:.0f} s") from None
            continue
        if not ok:
            raise RankError(rank, payload, text)
        out[rank] = pickle.loads(payload)
        silent_since = time.monotonic()
    return out
