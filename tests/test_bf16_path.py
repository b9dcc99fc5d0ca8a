"""The bf16 path (Megatron's Float16Module, as the trainer uses on GPU) run on CPU: rotary angles stay
float32 whatever the parameter dtype, and the bf16 model's logits follow the float32 model's."""

from __future__ import annotations

import pytest
import torch

from tests.multirank import run_ranks

LONG = 8192  # positions: S1's sequence length


def _bf16_vs_fp32(rank):
    from megatron.core.transformer.module import Float16Module

    from common.distributed.parallel import initialize_distributed
    from model.check_parity import parity_inputs
    from model.qwen3vl import build_qwen3vl
    from model.registry import get_config
    from model.rope import rope_inv_freq

    initialize_distributed({})
    cfg = get_config("tiny_dense")
    torch.manual_seed(0)
    fp32 = build_qwen3vl(cfg, parallel_output=False).eval()
    torch.manual_seed(0)
    bf16 = build_qwen3vl(cfg, parallel_output=False, params_dtype=torch.bfloat16)
    bf16.load_state_dict({k: v if v is None else v.to(torch.bfloat16) for k, v in fp32.state_dict().items()})
    wrapped = Float16Module(bf16.config, bf16).eval()

    positions = torch.arange(LONG).view(1, 1, LONG).expand(3, 1, LONG)
    angles = {"fp32": fp32.rotary_pos_emb(positions), "bf16": wrapped.module.rotary_pos_emb(positions)}
    # What bf16 frequencies would give: the error this test exists to catch.
    t = cfg.text
    bf16_freq = rope_inv_freq(t.head_dim, t.rope_theta).to(torch.bfloat16).float()
    rounded = (torch.arange(LONG, dtype=torch.float32)[:, None] * bf16_freq)

    logits = {}
    with torch.no_grad():
        for x in parity_inputs(cfg, seed=0):
            logits[x.name] = (fp32(x.input_ids, **x.model_kwargs()).float(),
                              wrapped(x.input_ids, **x.model_kwargs()).float())
    return angles, rounded, logits


@pytest.fixture(scope="module")
def bf16_run():
    return run_ranks(_bf16_vs_fp32, 1)[0]


def test_rotary_angles_are_float32_under_float16_module(bf16_run):
    angles, rounded, _ = bf16_run
    assert angles["bf16"].dtype == torch.float32
    assert torch.equal(angles["bf16"], angles["fp32"])
    half = angles["fp32"].shape[-1] // 2
    reference = angles["fp32"][:, 0, 0, :half]
    # bf16 frequencies would put angles off by tenths of a radian at the end of an 8K sequence.
    assert (rounded - reference).abs().max() > 0.5


def test_bf16_logits_follow_fp32(bf16_run):
    _, _, logits = bf16_run
    for name, (ref, ours) in logits.items():
        assert ours.dtype == torch.float32 and ours.shape == ref.shape
        scale = ref.abs().max().item()
        diff = (ours - ref).abs().max().item()
        # bf16 keeps 8 mantissa bits (relative 4e-3 per rounding); a few layers stay within 5 %.
        assert diff <= 0.05 * scale, f"{name}: max |bf16 - fp32| {diff:.3e} vs max |logit| {scale:.3e}"
        agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
        assert agree >= 0.9, f"{name}: greedy tokens agree on {agree:.0%}"
