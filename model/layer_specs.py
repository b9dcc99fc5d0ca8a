"""Megatron-Core module specs of the Qwen3 decoder (dense and MoE) and of the ViT layer.

Three attention backends (:data:`ATTENTION_BACKENDS`):

* ``te``: transformer-engine's fused modules (a GPU with TE installed; THD packed sequences);
* ``document``: Megatron-Core's local modules with our :class:`model.norm.RMSNorm` (which supports
  sequence parallelism) and :class:`model.attention.DocumentAttention` (per-document flash attention,
  context parallelism, no ``s x s`` mask): the path on CPU and on GPUs without TE;
* ``dense_mask``: the same local modules with Megatron's ``DotProductAttention`` and an explicit
  ``[b, 1, s, s]`` mask (quadratic memory; kept as a reference for tests and benchmarks).

All have RMSNorm, grouped-query attention with QK-norm, SwiGLU and no biases; which of those is on is
set by the ``TransformerConfig``.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from model.norm import LayerNorm, RMSNorm


def use_transformer_engine() -> bool:
    """True when CUDA and transformer-engine are both available (the fast GPU path)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


ATTENTION_BACKENDS = ("te", "document", "dense_mask")


def resolve_attention_backend(backend: str | None = None, context_parallel: int = 1) -> str:
    """``backend``, checked; None picks ``te`` when CUDA and transformer-engine are present and the
    layout has no context parallelism (this project's CP runs on the ``document`` backend), else
    ``document``."""
    if backend is None:
        return "te" if use_transformer_engine() and context_parallel == 1 else "document"
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {list(ATTENTION_BACKENDS)}")
    if backend == "te" and not use_transformer_engine():
        raise ValueError("attention backend 'te' needs CUDA and transformer-engine")
    if context_parallel > 1 and backend != "document":
        raise ValueError(f"context parallelism (cp={context_parallel}) runs on the 'document' attention "
                         f"backend, not {backend!r}")
    return backend


def _local_core_attention(backend: str):
    if backend == "document":
        from model.attention import DocumentAttention

        return DocumentAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention


def qwen3_layer_spec(num_experts: int | None = None, moe_grouped_gemm: bool = False,
                     backend: str = "document") -> ModuleSpec:
    """Spec of one Qwen3 decoder layer: dense (``num_experts`` None) or MoE."""
    if backend == "te":
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=True
        )
    spec = get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=True,
        normalization="RMSNorm",
    )
    layer = spec.submodules
    attention = layer.self_attention.submodules
    # Checkpoint names as Megatron's TE spec writes them, so that a checkpoint of either backend loads on
    # the other (a `te` S1 run, then S3 on the `document` backend for cp > 1): TE folds the norms into the
    # linear layer that follows, and the local spec's map files them under those names, except an MoE
    # layer's pre-MLP norm, which TE keeps as its own module (the experts have no fused fc1 to take it).
    keys_map = dict(layer.sharded_state_dict_keys_map)
    if num_experts:
        keys_map.pop("pre_mlp_layernorm.")
    return dataclasses.replace(
        spec,
        submodules=dataclasses.replace(
            layer,
            sharded_state_dict_keys_map=keys_map,
            input_layernorm=RMSNorm,
            pre_mlp_layernorm=RMSNorm,
            self_attention=dataclasses.replace(
                layer.self_attention,
                submodules=dataclasses.replace(attention, q_layernorm=RMSNorm, k_layernorm=RMSNorm,
                                               core_attention=_local_core_attention(backend)),
            ),
        ),
    )


# ----------------------------------------------------------------------------------------------------
# Qwen3-VL: decoder layers that take DeepStack features, and the ViT layer.


class DeepStackTransformerLayer(TransformerLayer):
    """A decoder layer that adds its DeepStack visual features to its output (Qwen3-VL).

    The features of this pipeline stage travel through the block as the layers' ``context`` argument
    (the cross-attention input, unused by these self-attention-only layers), a tensor
    ``[n, s, b, h]`` whose entry ``deepstack_slot`` belongs to this layer: zeros except at visual tokens,
    so adding it equals the reference's in-place add at the visual positions. Passing it as an argument
    (rather than keeping it on the module) keeps it correct under activation recomputation and with
    several micro-batches in flight.
    """

    deepstack_slot: int | None = None

    def forward(self, *args, **kwargs):
        output, context = super().forward(*args, **kwargs)
        slot = self.deepstack_slot
        if context is not None and slot is not None and slot < context.shape[0]:
            output = output + context[slot]
        return output, context


def qwen3vl_decoder_block_spec(config: TransformerConfig, moe_pattern: list[int], backend: str = "document",
                               vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """Specs of the Qwen3-VL decoder layers this pipeline stage builds (dense or MoE per ``moe_pattern``,
    one entry per global layer), plus the final RMSNorm."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    dense = dataclasses.replace(qwen3_layer_spec(None, False, backend), module=DeepStackTransformerLayer)
    moe = None
    if any(moe_pattern):
        moe = dataclasses.replace(qwen3_layer_spec(config.num_moe_experts, config.moe_grouped_gemm, backend),
                                  module=DeepStackTransformerLayer)
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = RMSNorm
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    specs = [moe if moe_pattern[offset + i] else dense for i in range(num_layers)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)


def vision_layer_spec(backend: str = "document") -> ModuleSpec:
    """Spec of one Qwen3-VL ViT layer: pre-LayerNorm, bidirectional attention with QKV and output
    biases (no QK-norm), GELU(tanh) MLP with biases. Frame segment ids (``document``), an attention
    mask (``dense_mask``) or the packed-sequence boundaries (``te``) keep it within each frame group."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    if backend == "te":
        from megatron.core.extensions.transformer_engine import (
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )

        qkv, attn, proj, fc1, fc2 = (TELayerNormColumnParallelLinear, TEDotProductAttention, TERowParallelLinear,
                                     TELayerNormColumnParallelLinear, TERowParallelLinear)
        input_norm = pre_mlp_norm = IdentityOp
    else:
        qkv, attn, proj, fc1, fc2 = (ColumnParallelLinear, _local_core_attention(backend), RowParallelLinear,
                                     ColumnParallelLinear, RowParallelLinear)
        input_norm = pre_mlp_norm = LayerNorm
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.padding},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv, core_attention=attn, linear_proj=proj,
                    q_layernorm=IdentityOp, k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2)),
            mlp_bda=get_bias_dropout_add,
            # Local and transformer-engine checkpoints use the same names (TE fuses the norms).
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )
