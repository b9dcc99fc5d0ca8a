"""Tiny text-only Qwen3 decoders (Megatron-Core GPTModel with our decoder layers) and a forward step, for
the CPU-runtime and packed-loss tests."""

from __future__ import annotations

from functools import partial

import torch

from model.text_config import Qwen3TextConfig
from pretrain.step import token_loss

SEQ = 16

TINY_DENSE = Qwen3TextConfig(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, intermediate_size=128, rope_theta=10000.0,
)
TINY_MOE = Qwen3TextConfig(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, intermediate_size=128, rope_theta=10000.0,
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
)


def build(cfg: Qwen3TextConfig, sequence_parallel: bool = False, seed: int = 7,
          for_training: bool = False):
    """Same weights on every call with the same seed and layout (CPU initialisation).

    For training the logits stay split over the vocabulary (Megatron's vocab-parallel cross
    entropy); for comparing logits they are gathered.
    """
    torch.manual_seed(seed)
    config = cfg.transformer_config(sequence_parallel=sequence_parallel)
    return build_language_model(cfg, config, max_sequence_length=SEQ, parallel_output=for_training)


def build_language_model(
    cfg: Qwen3TextConfig,
    config: TransformerConfig,
    max_sequence_length: int,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    parallel_output: bool = True,
    vp_stage: int | None = None,
) -> GPTModel:
    """The Qwen3 decoder of this pipeline stage (embedding on the first, LM head on the last)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from model.layer_specs import qwen3vl_decoder_block_spec

    return GPTModel(
        config=config,
        transformer_layer_spec=qwen3vl_decoder_block_spec(config, [int(cfg.is_moe)] * cfg.num_hidden_layers,
                                                          vp_stage=vp_stage),
        vocab_size=cfg.vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        if pre_process is None else pre_process,
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        if post_process is None else post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta),
        vp_stage=vp_stage,
    )


def fixed_batch(batch: int = 2, seq: int = SEQ, seed: int = 0, vocab: int = 128) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(seq).unsqueeze(0).expand(batch, seq).contiguous(),
        "loss_mask": torch.ones(batch, seq),
    }


def forward_step(data_iterator, model):
    """Schedule forward step: each pipeline stage reads what it needs from the same batch."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
    return output, partial(token_loss, batch["loss_mask"])


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["tokens"], batch["position_ids"], attention_mask=None)
