"""The Qwen3 language decoder's architecture (dense or MoE) and its Megatron-Core ``TransformerConfig``.

:class:`Qwen3TextConfig` holds the architecture numbers with the names of the Hugging Face Qwen3 text
config; :meth:`Qwen3TextConfig.transformer_config` turns them into Megatron-Core's ``TransformerConfig``
for the current parallel state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig



def runtime_settings(params_dtype: torch.dtype) -> dict:
    """``TransformerConfig`` fields set by where and how the model runs, not by its architecture:
    no dropout (as Qwen3 trains), fusions off (they need CUDA kernels; the GPU path switches them on
    through overrides), CPU initialisation without a GPU, the parameter dtype."""
    return dict(
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        init_method_std=0.02,
    )


@dataclass
class Qwen3TextConfig:
    """Architecture of a Qwen3 decoder. Sizes in elements; ``num_experts=0`` means dense."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # dense SwiGLU width
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    max_position_embeddings: int = 262_144
    tie_word_embeddings: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # per-expert SwiGLU width
    # Weight of Megatron's load-balancing loss (``moe_aux_loss_coeff``), as Megatron-LM's and mbridge's
    # Qwen3-MoE configs pass it. Not the reference's objective at the same weight: Megatron adds one
    # switch loss per MoE layer whose token fractions are divided by top-k (each layer's loss is
    # transformers' ``load_balancing_loss_func`` on that layer's router logits / ``num_experts_per_tok``),
    # while transformers adds ``coef`` times one loss over all layers' logits concatenated (about their
    # mean). At one coefficient the gradient pushing for balance is ~``moe_layers / top_k`` times the
    # reference's: 6x for 30B-A3B (48 / 8), 11.75x for 235B-A22B (94 / 8).
    router_aux_loss_coef: float = 1e-3

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def transformer_config(
        self,
        params_dtype: torch.dtype = torch.float32,
        sequence_parallel: bool = False,
        **overrides,
    ) -> TransformerConfig:
        """Megatron-Core config for this architecture in the initialised parallel state."""
        ps = parallel_state
        vpp = ps.get_virtual_pipeline_model_parallel_world_size()
        kwargs = dict(
            num_layers=self.num_hidden_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_key_value_heads,
            kv_channels=self.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=self.rms_norm_eps,
            qk_layernorm=True,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            **runtime_settings(params_dtype),
            tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
            pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
            # Megatron places a chunk's layers by vp_stage only when the config knows the virtual size
            # (without it every virtual stage of a rank built the same layers: a model twice as deep).
            virtual_pipeline_model_parallel_size=vpp,
            # The interleaved schedule sends activations and gradients to the same peer in one exchange
            # when pp = 2; Megatron's batched exchange posts the gradient's send first and the peer
            # receives in the other order (the activation received as the gradient, silently: same
            # shape). Its unbatched exchange orders the pair; Megatron-LM's defaults for vpp.
            **(dict(overlap_p2p_comm=True, batch_p2p_comm=False) if vpp else {}),
            expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
            expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
            context_parallel_size=ps.get_context_parallel_world_size(),
            sequence_parallel=sequence_parallel,
        )
        if self.is_moe:
            kwargs.update(
                num_moe_experts=self.num_experts,
                moe_router_topk=self.num_experts_per_tok,
                moe_ffn_hidden_size=self.moe_intermediate_size,
                moe_router_load_balancing_type="aux_loss",
                moe_aux_loss_coeff=self.router_aux_loss_coef,
                moe_router_pre_softmax=False,  # softmax over the top-k: normalised top-k probabilities
                moe_router_dtype="fp32",
                moe_token_dispatcher_type="alltoall",
                moe_grouped_gemm=False,
            )
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)
