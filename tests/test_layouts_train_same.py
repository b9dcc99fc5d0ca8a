"""Every parallel layout trains the tiny Qwen3-VL (dense and MoE) the same, on packed multimodal data.

The real pieces, end to end: micro-batches built by the data path (``SampleEncoder`` ->
``pack_documents`` -> ``collate_micro_batch`` -> ``token_loss_weights``, then the trainer's
``normalize_loss_weights``), the full model (``build_qwen3vl``: ViT, DeepStack, interleaved MRoPE), the
real step (``wrap_with_ddp`` with Megatron's DDP, ``setup_optimizer`` with the distributed optimizer,
``train_step`` with ``qwen3vl_forward_step``).

Reference: ONE process (world size 1: no data split, no collective), not the 2-rank "DP2" layout, so
that data parallelism is itself under test (the DP split of the micro-batches, the all-reduced loss
normaliser, the gradient reduce-scatter of the distributed optimizer). It saves its initial weights
and every layout loads them (``model.checkpoint_io``, resharded by ``dist_checkpointing``), so all runs
start from the same function. Every step sees the same global batch: 4 packs in micro-batches of 2
(b > 1 matters: the MoE router's ``view`` failed on decoder inputs left in [b, s] memory order by the
visual-embedding merge in ``model/qwen3vl.py``, which b = 1 hides); the one process
runs both micro-batches, a layout with data-parallel size 2 (dp2, ep2) gives each rank one. fp32.

What must match, step by step, over 3 optimizer steps: the global weighted loss, the gradient norm
(before clipping; it includes the MoE load-balancing loss's gradient), the loss-token count, and no
skipped step. The losses after step 1 depend on the previous updates, so equal losses mean equal updates.

MoE routing could flip on a near-tie of two experts' scores between layouts (rounding differs); with
these weights and data it does not (a flip would move the loss by far more than the 6.6e-8 measured).
If a change of data or config makes one flip, pick another seed rather than loosening the tolerance.
"""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch

from common.distributed.parallel import ParallelConfig
from model.plan import held_chunks
from tests.multimodal_packs import MICRO_BATCH_SIZE, tiny_config
from tests.multirank import run_ranks

STEPS = 3

# Measured, max relative difference to the one-process run over every layout, rank and step: losses
# 6.6e-8, gradient norms 7e-7 (2.2e-6 with context parallelism, at step 3: rounding differences grow
# through two Adam updates). For comparison, leaving the sequence-parallel norm gradients un-reduced
# over the TP ranks moves the losses by 5e-5 and the norms by 4e-4; a per-rank instead of global loss
# normaliser with dp=2 moves them by 3e-4 and 1e-2; halving the MoE load-balancing loss by ~1e-4.
LOSS_RTOL = 2e-6
GRAD_NORM_RTOL = 2e-5

LAYOUTS = {
    "dp2": {},
    "tp2_sp": {"tp": 2, "sequence_parallel": True},
    "pp2": {"pp": 2},
    # The interleaved schedule: each rank holds layers 1 and 3, or 2 and 4; 4 micro-batches of one pack
    # (its steady state, where activations and gradients cross in one exchange).
    "pp2_vpp2": {"pp": 2, "vpp": 2},
    "ep2": {"ep": 2},
    "tp2_ep2_sp": {"tp": 2, "ep": 2, "etp": 1, "sequence_parallel": True},
    "cp2": {"cp": 2},
    "cp2_ep2": {"cp": 2, "ep": 2},
}
DENSE_LAYOUTS = ("dp2", "tp2_sp", "pp2", "pp2_vpp2", "cp2")
MOE_LAYOUTS = ("dp2", "tp2_sp", "pp2", "pp2_vpp2", "ep2", "tp2_ep2_sp", "cp2_ep2")


# ----------------------------------------------------------------------------------------------------
# The rank body


def _train(rank, cfg, layout: dict, global_batch: list[dict], weights_dir: str, save: bool) -> dict:
    """``STEPS`` optimizer steps of ``cfg`` in ``layout``. ``save``: write the initial weights to
    ``weights_dir``; else load them from there.

    Returns ``steps``: (loss, grad norm, skipped, loss tokens) per step, and ``local_params``: the
    number of parameter elements this rank holds (a sharded layout holds fewer than the whole model).
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from common.distributed.parallel import initialize_distributed
    from model.checkpoint_io import load_weights, save_weights
    from model.qwen3vl import build_qwen3vl
    from pretrain.forward import qwen3vl_forward_step
    from pretrain.step import setup_optimizer, train_step, wrap_with_ddp
    from pretrain.trainer import normalize_loss_weights

    initialize_distributed(layout)
    vpp = layout.get("vpp")
    chunks = [build_qwen3vl(cfg, sequence_parallel=layout.get("sequence_parallel", False),
                            vp_stage=stage if vpp else None) for stage in range(vpp or 1)]
    model = wrap_with_ddp(chunks, DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True))
    optimizer = setup_optimizer(model, OptimizerConfig(
        optimizer="adam", lr=3e-3, weight_decay=0.01, clip_grad=1.0,
        use_distributed_optimizer=True, params_dtype=torch.float32))
    if save:
        os.makedirs(weights_dir)
        save_weights(weights_dir, model)
    else:
        load_weights(weights_dir, model)

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    per_rank = len(global_batch) // dp_size
    mine = global_batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    seq_length = int(mine[0]["tokens"].shape[1])
    forward_step = partial(qwen3vl_forward_step, use_packed_seq_params=False)
    vision_held = _count_held_vision_forwards(chunks[0])
    steps = []
    for _ in range(STEPS):
        micro_batches = [dict(b) for b in mine]
        normalize_loss_weights(micro_batches)
        data = [iter(micro_batches) for _ in chunks] if vpp else iter(micro_batches)  # one per model chunk
        r = train_step(model, optimizer, forward_step, data, num_microbatches=per_rank,
                       seq_length=seq_length, micro_batch_size=int(mine[0]["tokens"].shape[0]))
        steps.append((r.loss, r.grad_norm, r.skipped, r.num_tokens))
    layers = [layer.layer_number for chunk in chunks for layer in chunk.decoder.layers]
    return {"steps": steps, "local_params": sum(p.numel() for chunk in chunks for p in chunk.parameters()),
            "layers": layers, "vision_held": vision_held["peak"], "micro_batches": per_rank}


def _count_held_vision_forwards(chunk) -> dict:
    """The most micro-batches whose forward pass through ``chunk`` (the model chunk with the ViT) has run
    and whose backward pass has not, at any time: the micro-batches whose ViT activations the schedule
    keeps (what the capacity planner counts), under ``peak``."""
    count = {"now": 0, "peak": 0}
    if getattr(chunk, "vision", None) is None:
        return count

    def released(grad):
        count["now"] -= 1

    def forward_done(module, args, output):
        count["now"] += 1
        count["peak"] = max(count["peak"], count["now"])
        output.register_hook(released)

    chunk.register_forward_hook(forward_done)
    return count


# ----------------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="session")
def reference(tmp_path_factory, layout_tokenizer, layout_batch):
    """``reference(kind)`` -> (config, initial weights dir, result of the one-process run), run once."""
    runs = {}

    def get(kind: str, global_batch: list[dict] | None = None):
        """The one-process run of ``global_batch`` (default: the micro-batches of two packs). Another split
        into micro-batches is a run of its own for MoE: the load-balancing loss is a micro-batch's."""
        global_batch = layout_batch if global_batch is None else global_batch
        key = (kind, len(global_batch))
        if key not in runs:
            cfg = tiny_config(kind, layout_tokenizer)
            weights = tmp_path_factory.mktemp(f"layouts_{kind}") / "initial"
            result = run_ranks(_train, 1, cfg, {}, global_batch, str(weights), True)[0]
            _check_reference(result["steps"], global_batch)
            runs[key] = (cfg, str(weights), result)
        return runs[key]

    return get


def _check_reference(steps, global_batch):
    tokens = sum(int(b["loss_mask"].sum()) for b in global_batch)
    assert all(not skipped and n == tokens for _, _, skipped, n in steps), steps
    losses = [loss for loss, *_ in steps]
    # It learns: every update lowers the loss by far more than the tolerance, so equal losses after
    # step 1 are equal updates, not unchanged weights.
    assert all(b < a - 0.01 for a, b in zip(losses, losses[1:])), losses


def _assert_trains_like_one_process(kind: str, layout_name: str, reference, global_batch, batch_of_ones):
    layout = LAYOUTS[layout_name]
    if layout.get("vpp"):
        global_batch = batch_of_ones
    cfg, weights, ref = reference(kind, global_batch)
    results = run_ranks(_train, 2, cfg, layout, global_batch, weights, False)
    ref_steps = ref["steps"]
    for rank, result in enumerate(results):
        where = f"{kind} {layout_name}, rank {rank}"
        # The layout is real: any model parallelism leaves each rank a part of the model.
        model_parallel = any(layout.get(k, 1) > 1 for k in ("tp", "pp", "ep"))
        assert (result["local_params"] < ref["local_params"]) == model_parallel, where
        if layout.get("vpp"):  # chunk c of rank r holds block c * pp + r of the decoder's layers
            assert result["layers"] == [1 + rank, 3 + rank], where
        if rank == 0:  # the ViT activations the schedule holds are the capacity planner's
            assert result["vision_held"] == held_chunks(ParallelConfig.from_mapping(layout),
                                                        result["micro_batches"], 0)[1][0], where
        steps = result["steps"]
        assert [(s, n) for _, _, s, n in steps] == [(s, n) for _, _, s, n in ref_steps], where
        assert [loss for loss, *_ in steps] == pytest.approx([loss for loss, *_ in ref_steps],
                                                            rel=LOSS_RTOL, abs=0), where
        assert [norm for _, norm, *_ in steps] == pytest.approx([norm for _, norm, *_ in ref_steps],
                                                               rel=GRAD_NORM_RTOL, abs=0), where


@pytest.mark.parametrize("layout_name", DENSE_LAYOUTS)
def test_dense_layout_trains_like_one_process(layout_name, reference, layout_batch, layout_batch_of_ones):
    _assert_trains_like_one_process("dense", layout_name, reference, layout_batch, layout_batch_of_ones)


@pytest.mark.parametrize("layout_name", MOE_LAYOUTS)
def test_moe_layout_trains_like_one_process(layout_name, reference, layout_batch, layout_batch_of_ones):
    _assert_trains_like_one_process("moe", layout_name, reference, layout_batch, layout_batch_of_ones)
