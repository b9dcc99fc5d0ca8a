"""Megatron-Core module specs of the Qwen3 decoder (dense and MoE).

Two backends, chosen by :func:`use_transformer_engine`: transformer-engine's fused modules on a GPU with
TE installed, else Megatron-Core's local modules with our :class:`model.norm.RMSNorm` (which supports
sequence parallelism). Both have RMSNorm, grouped-query attention with QK-norm, SwiGLU and no biases;
which of those is on is set by the ``TransformerConfig``.
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

from model.norm import RMSNorm


def use_transformer_engine() -> bool:
    """True when CUDA and transformer-engine are both available (the fast GPU path)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def qwen3_layer_spec(num_experts: int | None = None, moe_grouped_gemm: bool = False,
                     use_te: bool | None = None) -> ModuleSpec:
    """Spec of one Qwen3 decoder layer: dense (``num_experts`` None) or MoE."""
    use_te = use_transformer_engine() if use_te is None else use_te
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=True
        )
    spec = get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=True,
        normalization="RMSNorm",
    )
    layer = spec.submodules
    attention = layer.self_attention.submodules
    return dataclasses.replace(
        spec,
        submodules=dataclasses.replace(
            layer,
            input_layernorm=RMSNorm,
            pre_mlp_layernorm=RMSNorm,
            self_attention=dataclasses.replace(
                layer.self_attention,
                submodules=dataclasses.replace(attention, q_layernorm=RMSNorm, k_layernorm=RMSNorm),
            ),
        ),
    )


def qwen3_block_spec(config: TransformerConfig, use_te: bool | None = None,
                     vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """Specs of the decoder layers this pipeline stage builds, plus the final norm."""
    use_te = use_transformer_engine() if use_te is None else use_te
    layer = qwen3_layer_spec(config.num_moe_experts, config.moe_grouped_gemm, use_te)
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = RMSNorm
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)
