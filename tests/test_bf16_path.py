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


def _init_from_body(rank, job, root: str) -> dict:
    from benchmarks.bench_step import synthetic_global_batch, training_step
    from model.checkpoint_io import save_weights
    from pretrain.trainer import build_training, open_stage, start_distributed

    info, dp_size = start_distributed(job)

    def params(chunks):
        return [p.detach().float().clone() for c in chunks for p in c.parameters()]

    # The previous stage's weights: this initialisation moved well away (bf16 weights, fp32 main copies).
    chunks, previous, _ = build_training(job, torch.bfloat16)
    with torch.no_grad():
        for chunk in chunks:
            for p in chunk.parameters():
                p.add_(torch.randn_like(p, dtype=torch.float32).to(p.dtype) * 0.05)
    save_weights(f"{root}/previous", previous)
    loaded = params(chunks)

    job.stage.init_from = f"{root}/previous"
    run = open_stage(job, info, dp_size, total_steps=1)
    out = {"origin": run.origin, "equal_after_load": all(torch.equal(a, b) for a, b in zip(loaded, params(run.chunks)))}
    batches = synthetic_global_batch(run.tokenizer, 256, 1, 1, image_side=64)
    training_step(run.model, run.optimizer, batches)
    after = params(run.chunks)
    out["moved_from_loaded"] = max((a - b).abs().max().item() for a, b in zip(after, loaded))
    out["loaded_from_fresh"] = max((a - b).abs().max().item() for a, b in zip(loaded, params(build_training(
        job, torch.bfloat16)[0])))
    return out


def test_a_stage_in_bf16_trains_on_from_its_init_from_weights(tmp_path):
    """stage.init_from loads weights into a model whose bf16 optimizer already holds fp32 main copies of
    the random initialisation: they must be refreshed, or the first step writes the initialisation back
    (every GPU stage hand-over: S0 -> S1 -> ... -> SFT -> RL)."""
    from benchmarks.bench_step import bench_tokenizer, compose_job, fit_model_to_tokenizer

    tokenizer = bench_tokenizer(tmp_path / "tokenizer")
    job = compose_job("tiny_dense", "single", seq_length=256, overrides=[
        "train.precision=bf16", "stage.optimizer.lr=1e-5", "stage.optimizer.min_lr=1e-5",
        "stage.optimizer.warmup_steps=0",
        f"data.tokenizer={tmp_path / 'tokenizer'}", f"train.run_root={tmp_path}"])
    fit_model_to_tokenizer(job, tokenizer)
    out = run_ranks(_init_from_body, 1, job, str(tmp_path))[0]
    assert out["origin"] == f"weights from {tmp_path}/previous" and out["equal_after_load"], out
    # One step of lr 1e-5 moves a weight by about 1e-5 (bf16 rounding: a few 1e-3 at most); going back to
    # the initialisation moves some by whole units (measured without the refresh: 5.4).
    assert out["loaded_from_fresh"] > 0.1 and out["moved_from_loaded"] < 0.01, out
