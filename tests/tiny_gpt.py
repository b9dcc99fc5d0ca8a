"""Tiny Qwen3 decoders (Megatron-Core GPTModel) and a forward step, for the parallelism tests."""

from __future__ import annotations

from functools import partial

import torch

from model.language import Qwen3TextConfig, build_language_model
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
