"""Megatron-Core on CPU with gloo: tensor, pipeline, expert and sequence parallelism, real multi-rank."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.multirank import run_ranks


def _reinit(parallel: dict) -> None:
    from megatron.core import parallel_state

    from common.distributed.parallel import initialize_distributed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    initialize_distributed(parallel)


def _save(model, path) -> None:
    from megatron.core import dist_checkpointing

    path.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(path))


def _load(model, path) -> None:
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), str(path))
    model.load_state_dict(state)


def _logits_after_reshard(rank, cfg_name, src_layout, dst_layout, ckpt_dir):
    """Logits of one set of weights in layout ``src_layout`` and, through a checkpoint, ``dst_layout``."""
    from tests import tiny_gpt

    cfg = getattr(tiny_gpt, cfg_name)
    batch = tiny_gpt.fixed_batch()
    _reinit(src_layout)
    src = tiny_gpt.build(cfg, sequence_parallel=src_layout.get("sequence_parallel", False))
    src.eval()
    before = tiny_gpt.logits(src, batch)
    _save(src, ckpt_dir)
    _reinit(dst_layout)
    dst = tiny_gpt.build(cfg, sequence_parallel=dst_layout.get("sequence_parallel", False), seed=99)
    dst.eval()
    fresh = tiny_gpt.logits(dst, batch)
    _load(dst, ckpt_dir)
    after = tiny_gpt.logits(dst, batch)
    return before, after, fresh


def _assert_same_function(results, tol=1e-5):
    for before, after, fresh in results:
        assert before.shape == after.shape == (2, 16, 128)
        # The freshly built model differs: the comparison below is not vacuous.
        assert (before - fresh).abs().max() > 1e-3
        assert (before - after).abs().max() <= tol, (before - after).abs().max()


def test_tp2_logits_equal_tp1(tmp_path):
    results = run_ranks(_logits_after_reshard, 2, "TINY_DENSE", {"tp": 1}, {"tp": 2}, tmp_path / "ckpt")
    _assert_same_function(results)


def test_checkpoint_saved_at_tp2_loads_at_tp1(tmp_path):
    results = run_ranks(_logits_after_reshard, 2, "TINY_DENSE", {"tp": 2}, {"tp": 1}, tmp_path / "ckpt")
    _assert_same_function(results)


def test_moe_tp2_ep2_sequence_parallel_equals_single_layout(tmp_path):
    layout = {"tp": 2, "ep": 2, "etp": 1, "sequence_parallel": True}
    results = run_ranks(_logits_after_reshard, 2, "TINY_MOE", {"tp": 1}, layout, tmp_path / "ckpt")
    _assert_same_function(results)


def _train_layouts(rank, cfg_name, layouts, steps, ckpt_dir):
    """Train the same initial weights for ``steps`` steps in each layout; return each loss trajectory.

    The first layout builds the weights and saves them; the others load them through the distributed
    checkpoint. Every step's global batch is the same 4 sequences, split over data-parallel ranks and
    1-sequence micro-batches, so the per-token mean loss must not depend on the layout.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from pretrain.step import setup_optimizer, train_step, wrap_with_ddp
    from tests import tiny_gpt

    cfg = getattr(tiny_gpt, cfg_name)
    global_batch = 4
    sequences = tiny_gpt.fixed_batch(batch=global_batch, seed=3)
    trajectories = []
    for i, layout in enumerate(layouts):
        _reinit(layout)
        module = tiny_gpt.build(cfg, sequence_parallel=layout.get("sequence_parallel", False),
                                for_training=True)
        if i == 0:
            _save(module, ckpt_dir)
        else:
            _load(module, ckpt_dir)
        model = wrap_with_ddp([module], DistributedDataParallelConfig(
            use_distributed_optimizer=True, grad_reduce_in_fp32=True))
        optimizer = setup_optimizer(model, OptimizerConfig(
            optimizer="adam", lr=3e-3, weight_decay=0.0, clip_grad=1.0,
            use_distributed_optimizer=True, params_dtype=torch.float32))
        dp_size = parallel_state.get_data_parallel_world_size()
        dp_rank = parallel_state.get_data_parallel_rank()
        per_rank = global_batch // dp_size
        micro_batches = [{k: v[j:j + 1] for k, v in sequences.items()}
                         for j in range(dp_rank * per_rank, (dp_rank + 1) * per_rank)]
        steps_done = []
        for _ in range(steps):
            r = train_step(model, optimizer, tiny_gpt.forward_step, iter(micro_batches),
                           num_microbatches=per_rank, seq_length=tiny_gpt.SEQ, micro_batch_size=1)
            steps_done.append((r.loss, r.grad_norm, r.skipped, r.num_tokens))
        trajectories.append(steps_done)
    return trajectories


def _assert_same_training_in_every_layout(results, layouts):
    for trajectories in results:
        reference = trajectories[0]
        losses = [loss for loss, *_ in reference]
        # It learns (the 4 sequences are memorised) ...
        assert losses[0] == pytest.approx(torch.log(torch.tensor(128.0)).item(), rel=0.1)
        assert losses[-1] < 0.7 * losses[0], losses
        for layout, steps in zip(layouts, trajectories):
            assert all(not skipped and tokens == 64 for _, _, skipped, tokens in steps), layout
            # ... and every layout computes the same losses and gradient norms, step by step.
            assert [l for l, *_ in steps] == pytest.approx(losses, rel=1e-4), layout
            assert [g for _, g, *_ in steps] == pytest.approx([g for _, g, *_ in reference], rel=1e-3), layout
    # Every rank reports the same global loss.
    assert results[0] == results[1] or all(
        [s[0] for s in a] == pytest.approx([s[0] for s in b], rel=1e-6) for a, b in zip(*results))


def test_dense_training_same_in_dp2_pp2_tp2(tmp_path):
    # Megatron DDP + distributed optimizer; PP=2 runs the schedule's pipelined forward/backward.
    layouts = [{"tp": 1}, {"pp": 2}, {"tp": 2}, {"tp": 2, "sequence_parallel": True}]
    results = run_ranks(_train_layouts, 2, "TINY_DENSE", layouts, 8, tmp_path / "ckpt")
    _assert_same_training_in_every_layout(results, layouts)


def test_moe_training_same_with_ep2_and_tp2_ep2_sequence_parallel(tmp_path):
    # EP=2: each rank holds 2 of the 4 experts, alltoall dispatch, distributed optimizer.
    # TP=2+EP=2 needs sequence parallel; its norm gradients must be all-reduced over TP ranks.
    layouts = [{"tp": 1}, {"ep": 2}, {"tp": 2, "ep": 2, "etp": 1, "sequence_parallel": True}]
    results = run_ranks(_train_layouts, 2, "TINY_MOE", layouts, 8, tmp_path / "ckpt")
    _assert_same_training_in_every_layout(results, layouts)


def _load_balancing_grads(rank, layouts, ckpt_dir):
    """The routers' gradients from the load-balancing loss alone (the language-model loss times 0) of the
    same weights and global batch (4 sequences over the data-parallel ranks) in each layout."""
    from functools import partial

    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from pretrain.step import setup_optimizer, token_loss, wrap_with_ddp
    from tests import tiny_gpt

    sequences = tiny_gpt.fixed_batch(batch=4, seed=3)
    grads = []
    for i, layout in enumerate(layouts):
        _reinit(layout)
        module = tiny_gpt.build(tiny_gpt.TINY_MOE, sequence_parallel=layout.get("sequence_parallel", False),
                                for_training=True)
        (_save if i == 0 else _load)(module, ckpt_dir)
        model = wrap_with_ddp([module], DistributedDataParallelConfig(grad_reduce_in_fp32=True))
        setup_optimizer(model, OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.0))
        per_rank = 4 // parallel_state.get_data_parallel_world_size()
        first = parallel_state.get_data_parallel_rank() * per_rank
        micro_batches = [{k: v[j:j + 1] for k, v in sequences.items()} for j in range(first, first + per_rank)]

        def forward_step(data_iterator, m):
            batch = next(data_iterator)
            losses = m(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
            return losses * 0.0, partial(token_loss, batch["loss_mask"])

        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro_batches),
                                    model=model, num_microbatches=per_rank, seq_length=tiny_gpt.SEQ,
                                    micro_batch_size=1, forward_only=False)
        grads.append([m.weight.main_grad.clone() for n, m in module.named_modules() if n.endswith("mlp.router")])
    return grads


def test_moe_load_balancing_gradient_is_the_same_in_every_layout(tmp_path):
    """Under sequence parallelism each rank's load-balancing loss is its tokens' share and the shares'
    gradients add up over the TP group: with per-token losses and no router padding mask (as here)
    Megatron scaled each share by the rank's own tokens, and the total came out 1/tp of the unsplit one
    (0.5 here; common.megatron_fixes). The Qwen3-VL model's masked path: tests/test_layouts_train_same.py."""
    layouts = [{"tp": 1}, {"ep": 2}, {"tp": 2, "ep": 2, "etp": 1, "sequence_parallel": True}]
    for reference, *others in run_ranks(_load_balancing_grads, 2, layouts, tmp_path / "ckpt"):
        assert all(g.abs().max() > 0 for g in reference)
        for layout, grads in zip(layouts[1:], others):
            for got, want in zip(grads, reference):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9, msg=lambda m: f"{layout}: {m}")


def test_moe_routing_runs_without_transformer_engine_where_the_cpu_runtime_is_not_installed():
    """On a GPU without transformer-engine (no CPU runtime there) Megatron's router gating asked for a
    name only TE's import defines: every MoE forward raised NameError. A fresh process without the CPU
    runtime shows the bug, then routes after the fixes (which the model's build applies)."""
    import subprocess
    import sys

    code = """
import torch
from megatron.core.transformer.moe import moe_utils
from common.distributed.cpu_runtime import cpu_runtime_active
from common.megatron_fixes import apply_megatron_fixes
assert not cpu_runtime_active()
x, w = torch.randn(5, 8), torch.randn(4, 8)
try:
    moe_utils.router_gating_linear(x, w, None, torch.float32)
    print("routed before the fixes")
except NameError as exc:
    print("NameError:", exc)
apply_megatron_fixes()
out = moe_utils.router_gating_linear(x, w, None, torch.float32)
print("routed after the fixes:", torch.allclose(out, x @ w.t()))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["NameError: name 'te_general_gemm' is not defined",
                                        "routed after the fixes: True"], done.stdout
