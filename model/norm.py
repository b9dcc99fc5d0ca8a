"""RMSNorm and LayerNorm for the Megatron-Core local (non-transformer-engine) layer specs.

Megatron-Core's local spec wraps ``torch.nn.RMSNorm``, which refuses sequence parallelism; MoE with
tensor parallelism needs sequence parallelism. This norm computes exactly what Qwen3's reference
``Qwen3RMSNorm`` computes and marks its weight ``sequence_parallel`` so Megatron's
``finalize_model_grads`` all-reduces its gradient over the tensor-parallel group (each rank only saw
its slice of the sequence).
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class RMSNorm(torch.nn.Module):
    """``weight * x / sqrt(mean(x**2, -1) + eps)``, normalised in fp32, over the last ``hidden_size`` dim."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-6,
        persist_layer_norm: bool = False,  # signature of Megatron's norm modules; unused
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ):
        super().__init__()
        if normalization != "RMSNorm":
            raise ValueError(f"model.norm.RMSNorm built with normalization={normalization!r}")
        if zero_centered_gamma or config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centred gamma is not part of Qwen3's RMSNorm")
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=parameter_device(config))
        )
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's rms_norm on the fp32 copy: the reference's x * rsqrt(mean(x**2) + eps) (bit-identical on
        # CPU), one fused kernel on recent CUDA builds, where the written-out form is five and keeps more
        # fp32 tensors for the backward.
        normed = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class LayerNorm(torch.nn.LayerNorm):
    """torch's LayerNorm (the ViT's pre-attention and pre-MLP norms) with the signature of Megatron's norm
    modules, its parameters built where Megatron's own layers put theirs (the current GPU unless
    ``config.use_cpu_initialization``) and in ``config.params_dtype``.

    Megatron's ``WrappedTorchNorm`` builds ``torch.nn.LayerNorm`` on torch's default device in float32:
    on a GPU those weights stayed on the CPU (only a distributed-optimizer buffer would move them, never
    for a frozen ViT or a frozen teacher), and the first forward with images failed there."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,  # signature of Megatron's norm modules; unused
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        if normalization != "LayerNorm":
            raise ValueError(f"model.norm.LayerNorm built with normalization={normalization!r}")
        if zero_centered_gamma or config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centred gamma is not part of the ViT's LayerNorm")
        if config.sequence_parallel:
            # Its weights are not marked sequence_parallel: their gradients would miss the other ranks' tokens.
            raise ValueError("model.norm.LayerNorm runs without sequence parallelism (the ViT never splits "
                             "its sequence)")
        super().__init__(hidden_size, eps=eps, device=parameter_device(config), dtype=config.params_dtype)


def parameter_device(config: TransformerConfig) -> torch.device:
    """The device of parameters built outside Megatron's layers (these norms, the ViT's plain torch
    modules): the current GPU unless ``config.use_cpu_initialization``, as Megatron's layers do."""
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
