"""Vocab-parallel forward KL(teacher || student) equals PyTorch's KL on the gathered logits, in TP1 and
TP2 (2 gloo ranks), for the values and the gradients wrt the student logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.posttrain.distill import vocab_parallel_forward_kl
from tests.multirank import run_ranks

S, B, V = 5, 3, 24
TEMPERATURE = 2.0


def _inputs():
    """Full-vocabulary logits [s, b, V] (a spread that makes the softmax far from uniform), a mask and
    per-token weights standing in for the upstream gradient of whatever reduction follows."""
    g = torch.Generator().manual_seed(0)
    student = 3 * torch.randn(S, B, V, generator=g, dtype=torch.float64)
    teacher = 3 * torch.randn(S, B, V, generator=g, dtype=torch.float64)
    mask = torch.rand(S, B, generator=g) > 0.25
    weights = torch.rand(S, B, generator=g, dtype=torch.float64)
    return student, teacher, mask, weights


def _reference(student, teacher, mask, weights):
    """Plain PyTorch: F.kl_div(log q, log p) = sum p (log p - log q), on the whole vocabulary."""
    student = student.clone().requires_grad_(True)
    log_ps = torch.log_softmax(student / TEMPERATURE, -1)
    log_pt = torch.log_softmax(teacher / TEMPERATURE, -1)
    kl = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1) * mask
    (kl * weights).sum().backward()
    return kl.detach(), student.grad


def _sharded(tp_rank, tp, student, teacher, mask, weights):
    """This rank's contiguous vocabulary slice [k V/tp, (k+1) V/tp), as Megatron's output layer holds it."""
    part = V // tp
    shard = student[..., tp_rank * part:(tp_rank + 1) * part].clone().requires_grad_(True)
    teacher_shard = teacher[..., tp_rank * part:(tp_rank + 1) * part]
    kl = vocab_parallel_forward_kl(shard, teacher_shard, mask, temperature=TEMPERATURE)
    (kl * weights).sum().backward()
    return kl.detach(), shard.grad


def test_tp1_matches_pytorch_kl():
    inputs = _inputs()
    kl, grad = _sharded(0, 1, *inputs)
    ref_kl, ref_grad = _reference(*inputs)
    torch.testing.assert_close(kl, ref_kl.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert (kl[~inputs[2]] == 0).all() and (grad[~inputs[2]] == 0).all()


def test_the_teacher_is_a_constant():
    student, teacher, mask, _ = _inputs()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    vocab_parallel_forward_kl(student, teacher, mask).sum().backward()
    assert teacher.grad is None and student.grad is not None


def test_low_precision_student_gets_its_own_dtype_back():
    student, teacher, mask, weights = _inputs()
    shard = student.to(torch.bfloat16).requires_grad_(True)
    kl = vocab_parallel_forward_kl(shard, teacher.to(torch.bfloat16), mask, temperature=TEMPERATURE)
    kl.sum().backward()
    assert kl.dtype == torch.float32 and shard.grad.dtype == torch.bfloat16


def _tp2_body(rank):
    from megatron.core import parallel_state

    from common.distributed.parallel import initialize_distributed

    initialize_distributed({"tp": 2})
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    return tp_rank, *_sharded(tp_rank, 2, *_inputs())


def test_tp2_matches_pytorch_kl_without_gathering_the_vocabulary():
    results = sorted(run_ranks(_tp2_body, 2), key=lambda r: r[0])
    ref_kl, ref_grad = _reference(*_inputs())
    for _, kl, _ in results:  # every TP rank ends with the full per-token KL
        torch.testing.assert_close(kl, ref_kl.float(), rtol=1e-5, atol=1e-6)
    grad = torch.cat([g for _, _, g in results], dim=-1)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_shape_mismatch_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"must have the same shape \(same vocabulary split\)"):
        vocab_parallel_forward_kl(torch.zeros(2, 1, 8), torch.zeros(2, 1, 4))
    with pytest.raises(ValueError, match="temperature=0 must be > 0"):
        vocab_parallel_forward_kl(torch.zeros(2, 1, 8), torch.zeros(2, 1, 8), temperature=0)
