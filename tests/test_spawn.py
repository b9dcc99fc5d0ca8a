"""spawn_ranks (the ranks the tools and the multi-rank tests start): a rank that dies is reported at once."""

from __future__ import annotations

import os
import signal
import time

import pytest

from common.distributed.spawn import RankDied, spawn_ranks
from tests.multirank import _rank_context


def _dies_body(rank, how):
    """Rank 1 ends without a result; rank 0 waits, as it would in a collective with rank 1."""
    if rank == 1:
        if how == "killed":
            os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's out-of-memory killer does
        os._exit(3)
    time.sleep(300)
    return rank


@pytest.mark.parametrize("how, message", [
    ("killed", "rank 1 died (signal 9, e.g. out of memory) without reporting a result"),
    ("exit", "rank 1 exited with status 3 without reporting a result"),
])
def test_a_rank_that_dies_without_a_result_is_reported_within_seconds(how, message):
    """The tools' ranks wait up to an hour for results: a rank killed for memory left model.convert
    hanging that long (the other rank waits for it in a collective)."""
    started = time.monotonic()
    with pytest.raises(RankDied) as info:
        spawn_ranks(_dies_body, 2, how, timeout=600, threads_per_rank=1, context=_rank_context())
    assert str(info.value) == message
    assert time.monotonic() - started < 30  # the poll, the grace for a result in flight, stopping rank 0
