"""A non-finite step leaves the parameters untouched and is reported as skipped."""

from __future__ import annotations

from functools import partial

import torch

from tests.multirank import run_ranks


def _nan_step_body(rank):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from common.distributed.parallel import initialize_distributed
    from pretrain.step import setup_optimizer, token_loss, train_step, wrap_with_ddp
    from tests import tiny_gpt

    initialize_distributed({"tp": 2})
    model = wrap_with_ddp([tiny_gpt.build(tiny_gpt.TINY_DENSE, for_training=True)],
                          DistributedDataParallelConfig(use_distributed_optimizer=True))
    optimizer = setup_optimizer(model, OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0,
                                                       use_distributed_optimizer=True))

    def forward_step(poison, data_iterator, module):
        batch = next(data_iterator)
        losses = module(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
        return losses * poison, partial(token_loss, batch["loss_mask"])

    def params():
        return [p.detach().clone() for p in model[0].parameters()]

    batch = tiny_gpt.fixed_batch()
    before = params()
    skipped = train_step(model, optimizer, partial(forward_step, float("nan")), iter([batch]), 1, tiny_gpt.SEQ, 2)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, params()))
    ok = train_step(model, optimizer, partial(forward_step, 1.0), iter([batch]), 1, tiny_gpt.SEQ, 2)
    changed = not all(torch.equal(a, b) for a, b in zip(before, params()))
    return skipped.skipped, unchanged, ok.skipped, changed, ok.loss


def test_non_finite_step_is_skipped():
    for skipped, unchanged, ok_skipped, changed, loss in run_ranks(_nan_step_body, 2):
        assert skipped and unchanged
        assert not ok_skipped and changed and loss == loss  # the next finite step trains
