"""One optimizer step on Megatron-Core: DDP wrapping, the optimizer, and the pipelined forward/backward.

Losses are per-token: each micro-batch's loss function returns the *sum* of its token losses and its
token count, Megatron's ``finalize_model_grads`` all-reduces the token count over data-parallel ranks
and divides the gradients by it, so a step's gradient is the mean over every loss token of the global
batch, whatever the micro-batch split or parallel layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.router import Router

from common.distributed.comm import all_reduce_values
from common.megatron_fixes import apply_megatron_fixes

LOSS_KEY = "lm loss"


@dataclass
class StepResult:
    """What one optimizer step did. ``loss`` is the mean per-token loss of the global batch."""

    loss: float
    num_tokens: int  # loss tokens in the global batch
    grad_norm: float | None  # before clipping; None when the step was skipped early
    skipped: bool  # True when the loss or gradient was not finite: parameters were left unchanged


def wrap_with_ddp(
    model_chunks: list[MegatronModule], ddp_config: DistributedDataParallelConfig
) -> list[DistributedDataParallel]:
    """Wrap each model chunk (one per virtual pipeline stage) in Megatron's DDP.

    Switches the chunks' configs to per-token losses first: DDP fixes its gradient scaling from
    ``calculate_per_token_loss`` when it is built (no 1/dp pre-scaling; the token count divides). MoE
    routers copied the flag when the model was built; they get it too, as they scale their load-balancing
    loss by the micro-batch's tokens with it (without it the token count would divide that loss's
    gradient too: ~8,000 times too small at S1's 8K tokens per micro-batch).
    """
    apply_megatron_fixes()  # among them the load-balancing loss's scale under per-token losses
    for chunk in model_chunks:
        chunk.config.calculate_per_token_loss = True
        for module in chunk.modules():
            if isinstance(module, Router):
                module.calculate_per_token_loss = True
    return [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=i > 0)
        for i, chunk in enumerate(model_chunks)
    ]


def setup_optimizer(
    model: list[DistributedDataParallel], optimizer_config: OptimizerConfig
) -> MegatronOptimizer:
    """Build Megatron's optimizer for the DDP-wrapped chunks and wire the model config to it."""
    optimizer = get_megatron_optimizer(optimizer_config, model)
    for chunk in model:
        cfg = chunk.config
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.grad_scale_func = optimizer.scale_loss
    if len(model) == 1:
        model[0].config.no_sync_func = model[0].no_sync
    else:
        model[0].config.no_sync_func = [chunk.no_sync for chunk in model]
    return optimizer


def token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Loss function for the schedule: (sum of masked token losses, token count, logging dict).

    ``output_tensor`` holds per-token losses [b, s] (Megatron models return them when given labels).
    """
    losses = output_tensor.float()
    mask = loss_mask.float()
    loss_sum = (losses * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {LOSS_KEY: report}


def _global_loss(losses_reduced: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """Mean loss over the global batch, seen identically by every rank."""
    total = [0.0, 0.0]
    for entry in losses_reduced:
        loss_sum, tokens = entry[LOSS_KEY].double().tolist()
        total = [total[0] + loss_sum, total[1] + tokens]
    if dist.is_initialized():
        # Only last-stage ranks hold losses: sum over the whole world, then divide by the tensor-parallel
        # size (TP peers hold the same values; context-parallel peers hold disjoint tokens).
        tp = parallel_state.get_tensor_model_parallel_world_size()
        total = [v / tp for v in all_reduce_values(total)]
    loss_sum, tokens = total
    return loss_sum / max(tokens, 1.0), int(round(tokens))


def train_step(
    model: list[DistributedDataParallel],
    optimizer: MegatronOptimizer,
    forward_step_func: Callable[[Iterator[Any], torch.nn.Module], Any],
    data_iterator: Iterator[Any] | list[Iterator[Any]],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> StepResult:
    """Forward and backward over ``num_microbatches`` micro-batches, then one optimizer step.

    A step whose loss or gradient norm is not finite leaves the parameters unchanged (skipped=True);
    every rank takes the same decision because the norm is all-reduced over the model-parallel group.
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses_reduced = get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    loss, num_tokens = _global_loss(losses_reduced)

    grad_norm, stepped = _checked_optimizer_step(optimizer, loss_is_finite=math.isfinite(loss))
    return StepResult(loss=loss, num_tokens=num_tokens, grad_norm=grad_norm, skipped=not stepped)


def _checked_optimizer_step(optimizer: MegatronOptimizer, loss_is_finite: bool) -> tuple[float | None, bool]:
    """``optimizer.step()`` in Megatron's ChainedOptimizer order, except that the parameters are left
    unchanged when the loss or the gradient norm is not finite.

    Returns (gradient norm before clipping, or None when the loss scaler found an overflow; whether
    the parameters were updated).
    """
    if optimizer.prepare_grads():
        return None, False
    grad_norm = float(optimizer.get_grad_norm())
    if not (loss_is_finite and math.isfinite(grad_norm)):
        return grad_norm, False
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if opt.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(
                params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    return grad_norm, bool(optimizer.step_with_ready_grads())
