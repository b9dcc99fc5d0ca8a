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


def _aux_loss_grad_body(rank, flag_before_build: bool):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from common.distributed.parallel import initialize_distributed
    from pretrain.step import setup_optimizer, token_loss, wrap_with_ddp
    from tests import tiny_gpt

    initialize_distributed({})
    torch.manual_seed(7)
    config = tiny_gpt.TINY_MOE.transformer_config()
    config.calculate_per_token_loss = flag_before_build  # Megatron-LM sets it before building the model
    gpt = tiny_gpt.build_language_model(tiny_gpt.TINY_MOE, config, max_sequence_length=tiny_gpt.SEQ)
    model = wrap_with_ddp([gpt], DistributedDataParallelConfig(use_distributed_optimizer=False))
    setup_optimizer(model, OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.0))
    routers = [m for n, m in gpt.named_modules() if n.endswith("mlp.router")]

    def forward_step(data_iterator, module):  # the language-model loss times 0: the aux loss's gradient alone
        batch = next(data_iterator)
        losses = module(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
        return losses * 0.0, partial(token_loss, batch["loss_mask"])

    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([tiny_gpt.fixed_batch()]),
                                model=model, num_microbatches=1, seq_length=tiny_gpt.SEQ, micro_batch_size=2,
                                forward_only=False)
    return [r.weight.main_grad.clone() for r in routers]


def test_moe_load_balancing_loss_gradient_is_megatrons_per_token_one():
    """Routers copy ``calculate_per_token_loss`` when built, and wrap_with_ddp turns it on afterwards: the
    load-balancing loss's gradient must be what Megatron gives with the flag set before the build (the
    router multiplies that loss by the micro-batch's tokens, as finalize_model_grads divides every
    gradient by the global token count). It was 1/tokens of it (measured here: 1/32)."""
    ours, = run_ranks(_aux_loss_grad_body, 1, False)
    reference, = run_ranks(_aux_loss_grad_body, 1, True)
    assert len(ours) == len(reference) > 0
    for got, want in zip(ours, reference):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
