"""Patch merger: 2x2 neighbouring ViT patch features -> one LLM-width token (Qwen3-VL)."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from model.norm import parameter_device


class PatchMerger(MegatronModule):
    """LayerNorm, then ``merge**2 * hidden -> merge**2 * hidden`` (column-parallel), exact GELU,
    ``-> out_hidden`` (row-parallel), with biases.

    ``postshuffle_norm=False`` (the main merger) normalises each patch feature before the 4 patches of a
    block are concatenated; ``True`` (the DeepStack mergers) normalises the concatenation.
    Input ``[num_patches, hidden]`` in merge-block order; output ``[num_patches / merge**2, out_hidden]``.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, merge_size: int, out_hidden_size: int,
                 postshuffle_norm: bool, eps: float = 1e-6):
        super().__init__(config=config)
        self.merged = hidden_size * merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = torch.nn.LayerNorm(self.merged if postshuffle_norm else hidden_size, eps=eps,
                                       dtype=config.params_dtype, device=parameter_device(config))
        init = config.init_method
        self.linear_fc1 = ColumnParallelLinear(self.merged, self.merged, config=config, init_method=init,
                                               bias=True, gather_output=False)
        self.linear_fc2 = RowParallelLinear(self.merged, out_hidden_size, config=config,
                                            init_method=config.output_layer_init_method, bias=True,
                                            input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.merged))
        else:
            x = self.norm(x).reshape(-1, self.merged)
        x, _ = self.linear_fc1(x.unsqueeze(1))
        x = torch.nn.functional.gelu(x)
        x, _ = self.linear_fc2(x)
        return x.squeeze(1)
