"""The ViT layers' LayerNorms are built like Megatron's own layers: on the parameter device of the config
(the current GPU unless ``use_cpu_initialization``) and in its ``params_dtype``, not on torch's default
device in float32 as Megatron's ``WrappedTorchNorm`` builds them (on a GPU those weights stayed on the
CPU, and a frozen ViT or a frozen teacher failed at its first image)."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import build_module

from model.layer_specs import vision_layer_spec
from model.norm import parameter_device


def _vision_like_config(**overrides) -> TransformerConfig:
    kwargs = dict(num_layers=1, hidden_size=16, num_attention_heads=2, normalization="LayerNorm",
                  params_dtype=torch.bfloat16, bf16=True, use_cpu_initialization=True)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def test_vit_layer_norms_take_the_configs_device_and_dtype():
    config = _vision_like_config()
    layer = vision_layer_spec("document").submodules
    # A norm that left its placement to torch's default device would land on 'meta' here.
    with torch.device("meta"):
        norms = [build_module(spec, config=config, hidden_size=16, eps=1e-6)
                 for spec in (layer.input_layernorm, layer.pre_mlp_layernorm)]
    for norm in norms:
        assert isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-6
        assert {name: (p.device, p.dtype) for name, p in norm.named_parameters()} == {
            "weight": (parameter_device(config), torch.bfloat16), "bias": (parameter_device(config), torch.bfloat16)}


def test_vit_layer_norm_refuses_sequence_parallelism():
    layer = vision_layer_spec("document").submodules
    config = _vision_like_config(tensor_model_parallel_size=2, sequence_parallel=True)
    with pytest.raises(ValueError, match="sequence parallelism"):
        build_module(layer.input_layernorm, config=config, hidden_size=16, eps=1e-6)
