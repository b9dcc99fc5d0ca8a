"""Strong-to-weak distillation: forward KL(teacher || student) on vocab-parallel logits.

Per token (position s, sequence b), with p = softmax(z / temperature) over the full vocabulary V:

    KL(p_teacher || p_student) = sum_v p_t(v) * (log p_t(v) - log p_s(v))

The logits are Megatron's output-layer shards [s, b, V/tp]: tensor-parallel rank k holds the
contiguous vocabulary slice [k*V/tp, (k+1)*V/tp). The vocabulary is never gathered; like
``megatron.core.tensor_parallel.cross_entropy._VocabParallelCrossEntropy`` this takes three
all-reduces of [s, b] values over the tensor-parallel group: the max of each logit set (MAX), the sums
of exp for both log-normalisers (one SUM of the stacked pair), and the partial KL sums (SUM).

Gradient (student logits only; the teacher is a constant): d KL / d z_s(v) = (p_s(v) - p_t(v)) / temperature,
local to each shard, so the backward needs no communication. No temperature**2 factor is applied
(Hinton et al. scale by it to keep gradient sizes comparable across temperatures): multiply the loss
by it yourself if you want it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _default_tp_group() -> dist.ProcessGroup | None:
    """Megatron's tensor-parallel group when it is set up, else None (the whole vocabulary is here)."""
    if dist.is_available() and dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            return parallel_state.get_tensor_model_parallel_group()
    return None


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)


class _VocabParallelForwardKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                group: dist.ProcessGroup | None) -> torch.Tensor:
        # float32 copies, scaled by the temperature (the inputs are left untouched)
        zs = student.float() / temperature
        zt = teacher.float() / temperature

        # log-normalisers over the full vocabulary: global max, then global sum of exp(z - max)
        maxes = torch.stack([zs.max(dim=-1).values, zt.max(dim=-1).values])
        _all_reduce(maxes, dist.ReduceOp.MAX, group)
        zs -= maxes[0].unsqueeze(-1)
        zt -= maxes[1].unsqueeze(-1)
        sums = torch.stack([zs.exp().sum(dim=-1), zt.exp().sum(dim=-1)])
        _all_reduce(sums, dist.ReduceOp.SUM, group)
        log_ps = zs.sub_(sums[0].log().unsqueeze(-1))  # in place: zs is now log p_s of this shard
        log_pt = zt.sub_(sums[1].log().unsqueeze(-1))
        pt = log_pt.exp()

        # p_t log(p_t / p_s); 0 where p_t = 0 (also for a -inf teacher logit, where 0 * -inf is NaN)
        terms = torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt))
        kl = terms.sum(dim=-1)
        _all_reduce(kl, dist.ReduceOp.SUM, group)

        ctx.save_for_backward(log_ps.exp_().sub_(pt))  # p_s - p_t of this shard, reusing log_ps
        ctx.temperature, ctx.student_dtype = temperature, student.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor):
        (ps_minus_pt,) = ctx.saved_tensors
        # out of place: a second backward (retain_graph) must find the saved tensor unchanged
        grad = ps_minus_pt * (grad_kl.unsqueeze(-1) / ctx.temperature)
        return grad.to(ctx.student_dtype), None, None, None


def vocab_parallel_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Per-token KL(teacher || student) [s, b] (float32), 0 where ``loss_mask`` is 0.

    ``student_logits`` and ``teacher_logits``: this rank's vocabulary shard [s, b, V/tp] (any float
    dtype; the maths runs in float32). Only the student gets a gradient. ``tp_group``: the group the
    vocabulary is split over; None means Megatron's tensor-parallel group when model parallelism is
    initialised, else no split. Reduce it as the training step wants (e.g. sum and count of the mask,
    like the pretraining token loss).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must have the same shape (same vocabulary split)"
        )
    if student_logits.dim() < 2:
        raise ValueError(f"logits must be [..., V/tp], got shape {tuple(student_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"distillation temperature={temperature!r} must be > 0")
    if loss_mask is not None and loss_mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"loss_mask {tuple(loss_mask.shape)} must match the logits' {tuple(student_logits.shape[:-1])}"
        )
    group = tp_group if tp_group is not None else _default_tp_group()
    kl = _VocabParallelForwardKL.apply(student_logits, teacher_logits.detach(), float(temperature), group)
    if loss_mask is not None:
        kl = torch.where(loss_mask.bool(), kl, torch.zeros_like(kl))
    return kl
