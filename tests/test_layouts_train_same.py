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

import dataclasses
import os
from functools import partial

import pytest
import torch

from tests.multirank import run_ranks

STEPS = 3
MICRO_BATCH_SIZE = 2  # the global batch is the 4 packs of _packs: 2 micro-batches

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
    "ep2": {"ep": 2},
    "tp2_ep2_sp": {"tp": 2, "ep": 2, "etp": 1, "sequence_parallel": True},
    "cp2": {"cp": 2},
    "cp2_ep2": {"cp": 2, "ep": 2},
}
DENSE_LAYOUTS = ("dp2", "tp2_sp", "pp2", "cp2")
MOE_LAYOUTS = ("dp2", "tp2_sp", "pp2", "ep2", "tp2_ep2_sp", "cp2_ep2")


# ----------------------------------------------------------------------------------------------------
# Data and model config (built once per session, in the test process)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from common.tokens.tokenizer import Tokenizer, train_byte_level_bpe

    words = "red green blue yellow purple orange pink circle square triangle star moves left right up down " \
            "on a the background there is which way does white black".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(300)]
    return Tokenizer.from_file(train_byte_level_bpe(texts, 400, tmp_path_factory.mktemp("layout_tok")))


def _packs(tokenizer) -> list:
    """4 packed rows; every one holds a text document, an image document and a video document
    (plus, in two rows, an interleaved document with two images), and some padding."""
    import numpy as np
    import PIL.Image

    from common.media.frame_sampling import VideoClip
    from common.media.vision_inputs import VisionInputConfig
    from pretrain.data.encoding import EncodingConfig, SampleEncoder
    from pretrain.data.packing import pack_documents

    rng = np.random.default_rng(0)

    def image(w, h):
        return PIL.Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    def clip(frames, w, h):
        return VideoClip(rng.integers(0, 255, (frames, h, w, 3), dtype=np.uint8), np.arange(frames) / 2.0)

    # Small media: a 32x32 image is one merged visual token, a 64x32 one two.
    vision = VisionInputConfig(image_min_pixels=1024, image_max_pixels=4096,
                               video_min_pixels=1024, video_max_pixels=8192)
    enc = SampleEncoder(tokenizer, EncodingConfig(vision=vision))
    rows = [
        [enc.encode_image_text(image(64, 32), "a red circle on a white background"),
         enc.encode_text("a green star moves up"),
         enc.encode_video(clip(4, 64, 32), text="the yellow triangle moves left")],
        [enc.encode_video(clip(4, 32, 64), text="which way does the blue square move"),
         enc.encode_interleaved(["there is", image(32, 64), "a blue square and", image(64, 64), "a star"]),
         enc.encode_text("the orange circle moves right on a black background")],
        [enc.encode_text("pink square"),
         enc.encode_image_text(image(32, 32), "a purple star"),
         enc.encode_video(clip(2, 64, 64), text="a white circle moves down")],
        [enc.encode_interleaved(["a", image(64, 32), "and a", image(32, 32), "on the background"]),
         enc.encode_video(clip(4, 32, 32), text="the red triangle moves up"),
         enc.encode_text("there is a green square")],
    ]
    longest = max(sum(d.num_tokens for d in row) for row in rows)
    # Padding in every row; a multiple of 4 so that sequence parallelism (tp = 2) and context
    # parallelism (2 * cp = 4 chunks) can cut it.
    seq_length = longest + 1 + (-(longest + 1) % 4)
    return [pack_documents(row, seq_length, tokenizer.pad_id) for row in rows]


@pytest.fixture(scope="session")
def global_batch(tokenizer) -> list[dict]:
    """The micro-batches of one step's global batch, as the task encoder emits them (un-normalised
    square-root loss weights)."""
    from pretrain.data.loss_weights import token_loss_weights
    from pretrain.data.micro_batch import collate_micro_batch

    packs = _packs(tokenizer)
    micro_batches = []
    for i in range(0, len(packs), MICRO_BATCH_SIZE):
        batch = collate_micro_batch(packs[i:i + MICRO_BATCH_SIZE])
        batch["loss_weights"] = token_loss_weights(batch["loss_mask"], batch["document_ids"], "square_root")
        micro_batches.append(batch)
    # Not vacuous: every micro-batch has several documents, images, a video and padding.
    for batch in micro_batches:
        assert batch["num_documents"] >= 6
        assert batch["image_grid_thw"].shape[0] >= 2 and batch["video_grid_thw"].shape[0] == 2
        assert batch["num_real_tokens"] < batch["tokens"].numel()
    return micro_batches


def _model_config(kind: str, tokenizer):
    """The tiny config of ``conf/model`` on the test tokenizer's vocabulary and special ids.

    Dense: three DeepStack features over four decoder layers, so with pp=2 the third one travels to
    the second stage (forward) and its gradient back (backward). MoE: layer 1 is a dense MLP among
    expert layers, so dense and expert gradients are reduced over different data-parallel groups; the
    load-balancing loss weighs 0.1, not Qwen3's 1e-3: at 1e-3 dropping it altogether moves the losses
    by < 1e-6 and the norms by < 6e-6 relative, within the tolerances, so a layout that got it wrong
    would pass; at 0.1 halving it moves the step-2 and step-3 losses and norms by ~1e-4.
    """
    from model.registry import get_config

    cfg = get_config(f"tiny_{kind}")
    vocab = tokenizer.vocab_size + (-tokenizer.vocab_size % 64)
    text = dataclasses.replace(cfg.text, vocab_size=vocab)
    vision = cfg.vision
    if kind == "dense":
        vision = dataclasses.replace(vision, deepstack_visual_indexes=(0, 1, 2))
    else:
        text = dataclasses.replace(text, mlp_only_layers=(1,), router_aux_loss_coef=0.1)
    return dataclasses.replace(
        cfg, text=text, vision=vision, image_token_id=tokenizer.image_pad_id,
        video_token_id=tokenizer.video_pad_id, vision_start_token_id=tokenizer.vision_start_id,
        vision_end_token_id=tokenizer.vision_end_id)


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
    module = build_qwen3vl(cfg, sequence_parallel=layout.get("sequence_parallel", False))
    model = wrap_with_ddp([module], DistributedDataParallelConfig(
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
    steps = []
    for _ in range(STEPS):
        micro_batches = [dict(b) for b in mine]
        normalize_loss_weights(micro_batches)
        r = train_step(model, optimizer, forward_step, iter(micro_batches), num_microbatches=per_rank,
                       seq_length=seq_length, micro_batch_size=MICRO_BATCH_SIZE)
        steps.append((r.loss, r.grad_norm, r.skipped, r.num_tokens))
    return {"steps": steps, "local_params": sum(p.numel() for p in module.parameters())}


# ----------------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tokenizer, global_batch):
    """``reference(kind)`` -> (config, initial weights dir, result of the one-process run), run once."""
    runs = {}

    def get(kind: str):
        if kind not in runs:
            cfg = _model_config(kind, tokenizer)
            weights = tmp_path_factory.mktemp(f"layouts_{kind}") / "initial"
            result = run_ranks(_train, 1, cfg, {}, global_batch, str(weights), True)[0]
            _check_reference(result["steps"], global_batch)
            runs[kind] = (cfg, str(weights), result)
        return runs[kind]

    return get


def _check_reference(steps, global_batch):
    tokens = sum(int(b["loss_mask"].sum()) for b in global_batch)
    assert all(not skipped and n == tokens for _, _, skipped, n in steps), steps
    losses = [loss for loss, *_ in steps]
    # It learns: every update lowers the loss by far more than the tolerance, so equal losses after
    # step 1 are equal updates, not unchanged weights.
    assert all(b < a - 0.01 for a, b in zip(losses, losses[1:])), losses


def _assert_trains_like_one_process(kind: str, layout_name: str, reference, global_batch):
    cfg, weights, ref = reference(kind)
    layout = LAYOUTS[layout_name]
    results = run_ranks(_train, 2, cfg, layout, global_batch, weights, False)
    ref_steps = ref["steps"]
    for rank, result in enumerate(results):
        where = f"{kind} {layout_name}, rank {rank}"
        # The layout is real: any model parallelism leaves each rank a part of the model.
        model_parallel = any(layout.get(k, 1) > 1 for k in ("tp", "pp", "ep"))
        assert (result["local_params"] < ref["local_params"]) == model_parallel, where
        steps = result["steps"]
        assert [(s, n) for _, _, s, n in steps] == [(s, n) for _, _, s, n in ref_steps], where
        assert [loss for loss, *_ in steps] == pytest.approx([loss for loss, *_ in ref_steps],
                                                            rel=LOSS_RTOL, abs=0), where
        assert [norm for _, norm, *_ in steps] == pytest.approx([norm for _, norm, *_ in ref_steps],
                                                               rel=GRAD_NORM_RTOL, abs=0), where


@pytest.mark.parametrize("layout_name", DENSE_LAYOUTS)
def test_dense_layout_trains_like_one_process(layout_name, reference, global_batch):
    _assert_trains_like_one_process("dense", layout_name, reference, global_batch)


@pytest.mark.parametrize("layout_name", MOE_LAYOUTS)
def test_moe_layout_trains_like_one_process(layout_name, reference, global_batch):
    _assert_trains_like_one_process("moe", layout_name, reference, global_batch)
