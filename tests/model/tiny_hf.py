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


def save_reference(kind: str, path: Path, seed: int = 0) -> Path:
    """Build the reference model of ``kind`` ('dense' / 'moe') with random weights and save_pretrained it."""
    import transformers

    torch.manual_seed(seed)
    if kind == "moe":
        model = transformers.Qwen3VLMoeForConditionalGeneration(transformers.Qwen3VLMoeConfig(**MOE))
    else:
        model = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**DENSE))
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


def layouts_body(rank: int, hf_dir: str, layouts: list[dict], grads_input: str | None):
    """For each layout: logits and per-token losses of every parity input (on the rank holding the last
    stage, tp rank 0, dp rank 0; None elsewhere). With ``grads_input``: in the first layout, also the
    gradients (HF names and layout) of the mean next-token loss on that input."""
    from megatron.core import parallel_state as ps

    from model.check_parity import parity_inputs
    from model.config import Qwen3VLConfig
    from model.hf_adapter import HFCheckpointReader, export_hf_tensors, load_hf_weights
    from model.qwen3vl import build_qwen3vl

    reader = HFCheckpointReader(hf_dir)
    cfg = Qwen3VLConfig.from_hf(reader.config_dict)
    inputs = parity_inputs(cfg, seed=0, pad_multiple=2)
    out = {"layouts": [], "grads": None, "freeze": None}
    for i, layout in enumerate(layouts):
        _reinit(layout)
        model = build_qwen3vl(cfg, sequence_parallel=layout.get("sequence_parallel", False), parallel_output=False)
        load_hf_weights(model, reader)
        model.eval()
        result = {}
        with torch.no_grad():
            for x in inputs:
                logits = _run_schedule(model, x)
                losses = _run_schedule(model, x, labels=shifted_labels(x.input_ids))
                result[x.name] = (logits, losses)
        keeper = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 \
            and ps.get_data_parallel_rank() == 0
        out["layouts"].append(result if keeper else None)
        if i == 0 and grads_input is not None:
            x = next(x for x in inputs if x.name == grads_input)
            losses = model(x.input_ids, labels=shifted_labels(x.input_ids), **x.model_kwargs())
            losses[:, :-1].mean().backward()
            out["grads"] = {k: v.clone() for k, v in export_hf_tensors(model, grads=True)}
        if i == 0:
            # Freezing for the alignment stage: only the mergers train.
            frozen = build_qwen3vl(cfg, freeze=("vision", "language"))
            out["freeze"] = sorted(n for n, p in frozen.named_parameters() if p.requires_grad)
    return out
