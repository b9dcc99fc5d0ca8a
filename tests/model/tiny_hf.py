"""Tiny random Qwen3-VL checkpoints saved by the transformers reference, and the rank bodies of the
multi-rank model tests (importable by spawned processes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

_VISION = dict(hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, num_position_embeddings=64,
               initializer_range=0.05)
_TOKENS = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)

# Dense, tied embeddings; 3 DeepStack features over 4 decoder layers, so with pp=2 the third one has to
# travel to the second stage.
DENSE = dict(
    text_config=dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                     initializer_range=0.05,
                     rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                                      "mrope_interleaved": True}),
    vision_config=dict(depth=3, deepstack_visual_indexes=[0, 1, 2], **_VISION),
    tie_word_embeddings=True, **_TOKENS,
)
# MoE with one dense layer (mlp_only_layers), 4 experts top-2, expert width 48 != hidden 64 (the published
# expert layout is distinguishable by shape).
MOE = dict(
    text_config=dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                     initializer_range=0.05, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                     mlp_only_layers=[1],
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 2, 2],
                                      "mrope_interleaved": True}),
    vision_config=dict(depth=3, deepstack_visual_indexes=[0, 2], **_VISION),
    tie_word_embeddings=False, **_TOKENS,
)
# MoE whose expert work splits unevenly: 6 experts top-3, so with ep=2 and etp=2 the token counts the
# expert-tensor-parallel ranks exchange differ per rank (uneven all-gather / reduce-scatter).
MOE_UNEVEN = dict(MOE, text_config=dict(MOE["text_config"], num_experts=6, num_experts_per_tok=3))
_CONFIGS = {"dense": DENSE, "moe": MOE, "moe_uneven": MOE_UNEVEN}


def save_reference(kind: str, path: Path, seed: int = 0) -> Path:
    """Build the reference model of ``kind`` ('dense' / 'moe' / 'moe_uneven') with random weights and
    save_pretrained it."""
    import transformers

    torch.manual_seed(seed)
    config = _CONFIGS[kind]
    if "num_experts" in config["text_config"]:
        model = transformers.Qwen3VLMoeForConditionalGeneration(transformers.Qwen3VLMoeConfig(**config))
    else:
        model = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**config))
    model.save_pretrained(path)
    return path


def reference_model(path: Path):
    import transformers

    kind = json.loads((Path(path) / "config.json").read_text())["model_type"]
    cls = (transformers.Qwen3VLMoeForConditionalGeneration if kind == "qwen3_vl_moe"
           else transformers.Qwen3VLForConditionalGeneration)
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def shifted_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets for our model (position t predicts token t+1; the last target is unused)."""
    return torch.roll(input_ids, -1, dims=1)


# ----------------------------------------------------------------------------------------------------
# The reference


GRADS_INPUT = "interleaved"  # the parity input whose loss gradients are compared (text, images and a video)
TRAIN_INPUT = "two_images"  # the input of the training steps: the same length whatever the padding


def pad_multiple(layout: dict) -> int:
    """Inputs are padded to a multiple of tp under sequence parallelism (as ``model.check_parity`` does)."""
    return layout.get("tp", 1) if layout.get("sequence_parallel") else 1


def reference_outputs(path: Path, pad: int) -> dict:
    """The reference's logits and mean next-token loss per parity input (padded to a multiple of ``pad``)
    and its parameter gradients (HF names, in-memory layout) of that loss on :data:`GRADS_INPUT`."""
    from model.check_parity import parity_inputs
    from model.config import Qwen3VLConfig

    ref = reference_model(path)
    cfg = Qwen3VLConfig.from_hf(json.loads((Path(path) / "config.json").read_text()))
    out = {"logits": {}, "loss": {}, "grads": {}}
    for x in parity_inputs(cfg, seed=0, pad_multiple=pad):
        with torch.no_grad():
            result = ref(**x.reference_kwargs(), labels=x.input_ids)
        out["logits"][x.name], out["loss"][x.name] = result.logits, result.loss
        if x.name == GRADS_INPUT:
            ref.zero_grad()
            ref(**x.reference_kwargs(), labels=x.input_ids).loss.backward()
            out["grads"] = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                            for n, p in ref.named_parameters()}
    return out


# ----------------------------------------------------------------------------------------------------
# Rank bodies


def _reinit(layout: dict) -> None:
    from megatron.core import parallel_state

    from common.distributed.parallel import initialize_distributed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    initialize_distributed(layout)


def _run_schedule(model, x, labels=None):
    """Forward one input through Megatron's schedule; logits or per-token losses on the last stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(it, module):
        item = next(it)
        out = module(item.input_ids, labels=labels, **item.model_kwargs())
        return out, lambda o: (o.sum() * 0.0, {"out": o.detach()})

    store = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([x]), model=[model],
                                        num_microbatches=1, seq_length=x.input_ids.shape[1], micro_batch_size=1,
                                        forward_only=True)
    return store[0]["out"].float().cpu() if ps.is_pipeline_last_stage() else None


def _training_step_func(x):
    """Forward step of the schedule for the mean next-token loss on ``x`` (the trainer's per-token loss)."""
    from functools import partial

    from pretrain.step import token_loss

    labels = shifted_labels(x.input_ids)
    loss_mask = torch.ones_like(labels)
    loss_mask[:, -1] = 0  # the last position has no next token

    def step(it, module):
        item = next(it)
        return module(item.input_ids, labels=labels, **item.model_kwargs()), partial(token_loss, loss_mask)

    return step


def _gradient_stats(ddp_model, x, ref_grads: dict) -> dict[str, tuple[float, float, float]]:
    """Backward of the mean next-token loss on ``x`` through Megatron's schedule, DDP and
    ``finalize_model_grads`` (the gradients the optimizer sees: data-parallel, sequence-parallel and
    tied-embedding reductions done); per canonical parameter name on this rank: (max |ours - reference|,
    max |reference|, max |ours|), the reference being sliced to this rank's part by the weight-loading
    name mapping (``model.hf_adapter.hf_shards``)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from model.hf_adapter import hf_shards

    ddp_model.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=_training_step_func(x), data_iterator=iter([x]),
                                model=[ddp_model], num_microbatches=1, seq_length=x.input_ids.shape[1],
                                micro_batch_size=1, forward_only=False)

    stats = {}
    for _, name, param, ref in hf_shards(ddp_model.module, ref_grads.__getitem__):
        ours = param.main_grad.float()
        stats[name] = ((ours - ref).abs().max().item(), ref.abs().max().item(), ours.abs().max().item())
    return stats


def layouts_body(rank: int, hf_dir: str, layouts: list[dict], ref_grads: dict[int, dict], train_steps: int = 0):
    """For each layout, a dict of:

    * ``outputs``: logits and per-token losses of every parity input (padded as :func:`pad_multiple`) on
      the rank holding the last stage, tp rank 0, dp rank 0; None elsewhere;
    * ``grads``: :func:`_gradient_stats` on :data:`GRADS_INPUT` against ``ref_grads[pad_multiple(layout)]``;
    * ``train_losses``: with ``train_steps``, the loss of each of that many Adam steps (``pretrain.step``)
      on :data:`TRAIN_INPUT`, every data-parallel replica taking the same input.

    And ``freeze``: the parameters left trainable when vision and language are frozen.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig

    from model.check_parity import parity_inputs
    from model.config import Qwen3VLConfig
    from model.hf_adapter import HFCheckpointReader, load_hf_weights
    from model.qwen3vl import build_qwen3vl
    from pretrain.step import setup_optimizer, train_step, wrap_with_ddp

    reader = HFCheckpointReader(hf_dir)
    cfg = Qwen3VLConfig.from_hf(reader.config_dict)
    out = {"layouts": [], "freeze": None}
    for i, layout in enumerate(layouts):
        _reinit(layout)
        inputs = parity_inputs(cfg, seed=0, pad_multiple=pad_multiple(layout))
        model = build_qwen3vl(cfg, sequence_parallel=layout.get("sequence_parallel", False), parallel_output=False)
        load_hf_weights(model, reader)
        model.eval()
        outputs = {}
        with torch.no_grad():
            for x in inputs:
                outputs[x.name] = (_run_schedule(model, x), _run_schedule(model, x, labels=shifted_labels(x.input_ids)))
        keeper = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 \
            and ps.get_data_parallel_rank() == 0
        x = next(x for x in inputs if x.name == GRADS_INPUT)
        (ddp,) = wrap_with_ddp([model], DistributedDataParallelConfig())
        model.config.finalize_model_grads_func = finalize_model_grads
        result = {"outputs": outputs if keeper else None,
                  "grads": _gradient_stats(ddp, x, ref_grads[pad_multiple(layout)]), "train_losses": None}
        if train_steps:
            ddp.train()
            optimizer = setup_optimizer([ddp], OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0))
            x = next(x for x in inputs if x.name == TRAIN_INPUT)
            step = _training_step_func(x)
            result["train_losses"] = [
                train_step([ddp], optimizer, step, iter([x]), 1, x.input_ids.shape[1], 1).loss
                for _ in range(train_steps)]
        out["layouts"].append(result)
        if i == 0:
            # Freezing for the alignment stage: only the mergers train.
            frozen = build_qwen3vl(cfg, freeze=("vision", "language"),
                                   sequence_parallel=layout.get("sequence_parallel", False))
            out["freeze"] = sorted(n for n, p in frozen.named_parameters() if p.requires_grad)
    return out
