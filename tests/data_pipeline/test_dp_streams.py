"""Data streams across data-parallel layouts: a stage's global batches do not depend on the layout it
resumes in (pretrain/data/loader.py, "Data streams"), and the fallback when they cannot continue."""

from __future__ import annotations

import pickle

import pytest

from pretrain.data.loader import StreamPlan, build_train_loader, plan_data_resume
from tests.data_pipeline.pipeline_helpers import data_config

GLOBAL_BATCH = 4  # packed sequences per step, micro-batch size 1


def _loader(sets, tokenizer, *, dp_rank, dp_size, num_streams=None):
    return build_train_loader(
        data_config(sets, packing_buffer_size=32), {"loss_normalization": "token"}, seq_length=256,
        micro_batch_size=1, dp_rank=dp_rank, dp_size=dp_size, seed=5, tokenizer=tokenizer,
        global_batch_size=GLOBAL_BATCH, num_streams=num_streams)


def _steps(loaders, steps):
    """The global batches (doc ids of each micro-batch, in rank order) of ``steps`` steps."""
    per_rank = GLOBAL_BATCH // len(loaders)
    return [[next(loader)["doc_ids"] for loader in loaders for _ in range(per_rank)] for _ in range(steps)]


@pytest.mark.parametrize("saved_dp, resumed_dp", [(2, 1), (1, 2)], ids=["dp2 -> dp1", "dp1 -> dp2"])
def test_global_batches_continue_exactly_in_another_data_parallel_size(shard_sets, tokenizer, saved_dp, resumed_dp):
    sets = {k: shard_sets[k] for k in ("image_text", "interleaved")}
    straight = [_loader(sets, tokenizer, dp_rank=r, dp_size=saved_dp) for r in range(saved_dp)]
    expected = _steps(straight, 3)

    interrupted = [_loader(sets, tokenizer, dp_rank=r, dp_size=saved_dp) for r in range(saved_dp)]
    assert _steps(interrupted, 1) == expected[:1]
    # The checkpoint: one state per stream, from the first rank that draws from it.
    saved = {}
    for loader in interrupted:
        saved.update({i: s for i, s in loader.save_state().items() if loader.plan.writes(i)})
    saved = pickle.loads(pickle.dumps(saved))
    assert sorted(saved) == list(range(saved_dp))

    resumed = [_loader(sets, tokenizer, dp_rank=r, dp_size=resumed_dp, num_streams=saved_dp)
               for r in range(resumed_dp)]
    for loader in resumed:
        loader.restore_state({i: saved[i] for i in loader.streams})
    got = _steps(resumed, 2)
    assert got == expected[1:]
    assert got[0] != expected[0]  # not the start again


def test_stream_plan_splits_global_batches():
    # 2 streams of 3 micro-batches per global batch over 3 ranks of 2: rank 1 takes the last of
    # stream 0 and the first of stream 1.
    plans = [StreamPlan.of(dp_rank=r, dp_size=3, num_streams=2, micro_batches_per_step=6) for r in range(3)]
    assert [p.streams for p in plans] == [[0], [0, 1], [1]]
    assert [[list(p.kept(i)) for i in p.streams] for p in plans] == [[[0, 1]], [[2], [0]], [[1, 2]]]
    assert [[i for i in range(2) if p.writes(i)] for p in plans] == [[0], [1], []]
    with pytest.raises(ValueError, match="does not split evenly over num_streams=4"):
        StreamPlan.of(dp_rank=0, dp_size=2, num_streams=4, micro_batches_per_step=6)


def test_without_stream_states_the_new_streams_skip_the_consumed_sequences(shard_sets, tokenizer):
    exact = plan_data_resume(saved_streams=2, consumed_samples=8, global_batch_size=4, micro_batch_size=1,
                             dp_size=1)
    assert exact.restore and exact.num_streams == 2 and exact.warning is None
    fresh = plan_data_resume(saved_streams=None, consumed_samples=0, global_batch_size=4, micro_batch_size=1,
                             dp_size=2)
    assert not fresh.restore and fresh.num_streams == 2 and fresh.skip == 0 and fresh.warning is None
    for saved_streams, global_batch, why in [(0, 4, "no data stream states"),
                                             (3, 4, "4 micro-batches does not split over its 3 data streams")]:
        plan = plan_data_resume(saved_streams=saved_streams, consumed_samples=8, global_batch_size=global_batch,
                                micro_batch_size=1, dp_size=2)
        assert not plan.restore and plan.num_streams == 2 and plan.skip == 4
        assert why in plan.warning and "not what the uninterrupted run would have seen" in plan.warning

    # The fast-forward is deterministic: the new streams continue where an uninterrupted run of this
    # layout would be after the same number of sequences.
    sets = {"image_text": shard_sets["image_text"]}
    straight = [_loader(sets, tokenizer, dp_rank=r, dp_size=2) for r in range(2)]
    expected = _steps(straight, 3)
    skipped = [_loader(sets, tokenizer, dp_rank=r, dp_size=2) for r in range(2)]
    for loader in skipped:
        loader.skip(4)  # 8 sequences over 2 ranks
    assert _steps(skipped, 1) == expected[2:]
