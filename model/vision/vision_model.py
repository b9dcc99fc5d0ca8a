"""The Qwen3-VL ViT on Megatron-Core: patch embedding, interpolated learned positions, 2D RoPE,
frame-segmented attention layers (tensor-parallel), the patch merger and the DeepStack mergers.

Input: ``pixel_values`` float ``(num_patches, 3 * temporal_patch * patch**2)`` of any number of images or
videos concatenated, and their ``grid_thw`` (see :mod:`common.media.vision_inputs`). Output: one
LLM-width embedding per ``merge x merge`` patch block, ``(num_patches / merge**2, out_hidden)``, and one
such tensor per DeepStack layer.

The encoder is replicated along the sequence (no sequence parallelism inside it: all tensor-parallel
ranks see every patch) and lives on the first pipeline stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

from model.config import Qwen3VLVisionConfig
from model.layer_specs import vision_layer_spec
from model.vision import geometry
from model.norm import parameter_device
from model.vision.merger import PatchMerger


class Qwen3VLVisionModel(MegatronModule):
    """Vision encoder; ``forward(pixel_values, grid_thw) -> (embeds, [deepstack embeds])``."""

    def __init__(self, cfg: Qwen3VLVisionConfig, config: TransformerConfig, attention: str = "document"):
        super().__init__(config=config)
        self.cfg = cfg
        self.attention = attention  # a backend of model.layer_specs.ATTENTION_BACKENDS
        # Where Megatron's own layers put their parameters (the GPU unless use_cpu_initialization).
        factory = dict(dtype=config.params_dtype, device=parameter_device(config))
        # Conv3d weight layout (hidden, channels, temporal, patch, patch), as the reference stores it.
        self.patch_embed = torch.nn.Conv3d(
            cfg.in_channels, cfg.hidden_size,
            kernel_size=(cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size),
            stride=(cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size), bias=True, **factory,
        )
        self.pos_embed = torch.nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size, **factory)
        spec = vision_layer_spec(attention)
        self.layers = torch.nn.ModuleList(
            [build_module(spec, config=config, layer_number=i + 1) for i in range(cfg.depth)]
        )
        self.merger = PatchMerger(config, cfg.hidden_size, cfg.spatial_merge_size, cfg.out_hidden_size,
                                  postshuffle_norm=False, eps=cfg.layer_norm_eps)
        self.deepstack_merger_list = torch.nn.ModuleList([
            PatchMerger(config, cfg.hidden_size, cfg.spatial_merge_size, cfg.out_hidden_size,
                        postshuffle_norm=True, eps=cfg.layer_norm_eps)
            for _ in cfg.deepstack_visual_indexes
        ])

    def set_input_tensor(self, input_tensor) -> None:  # never pipelined: it lives on the first stage
        pass

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Megatron's default treats a plain ``ModuleList`` as replicated; its members here are
        tensor-parallel layers and mergers, so each one gives its own sharded state."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import sharded_state_dict_default

        tp_group = parallel_state.get_tensor_model_parallel_group()
        out = {}
        for name, module in self.named_children():
            members = enumerate(module) if isinstance(module, torch.nn.ModuleList) else [(None, module)]
            for i, member in members:
                key = f"{prefix}{name}." if i is None else f"{prefix}{name}.{i}."
                out.update(sharded_state_dict_default(member, key, sharded_offsets, metadata, tp_group=tp_group))
        return out

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cfg = self.cfg
        grid_thw = torch.as_tensor(grid_thw).reshape(-1, 3).cpu()
        num_patches = int(grid_thw.prod(-1).sum())
        if pixel_values.dim() != 2 or pixel_values.shape != (num_patches, cfg.patch_dim):
            raise ValueError(
                f"pixel_values must be ({num_patches}, {cfg.patch_dim}) for grid_thw {grid_thw.tolist()}, "
                f"got {tuple(pixel_values.shape)}"
            )
        device = pixel_values.device
        # The Conv3d's kernel is its stride: one patch in, one vector out. As a matrix product over the
        # flattened patches (columns in the weight's (channel, frame, row, column) order) it is the same
        # map, 7x faster than the convolution on CPU, forward and backward.
        weight = self.patch_embed.weight
        x = F.linear(pixel_values.to(weight.dtype), weight.view(cfg.hidden_size, -1), self.patch_embed.bias)

        indices, weights = geometry.interpolation_taps(grid_thw, cfg.num_grid_per_side, cfg.spatial_merge_size)
        pos = (self.pos_embed(indices.to(device)) * weights.to(device, self.pos_embed.weight.dtype)[:, :, None]).sum(1)
        x = x + pos.to(x.dtype)

        rotary = geometry.vision_rotary_angles(grid_thw, cfg.spatial_merge_size, cfg.head_dim, cfg.rope_theta)
        rotary = rotary.to(device)
        packed = mask = None
        if self.attention == "te":
            cu = geometry.cu_seqlens(grid_thw, device=device)
            max_len = max(geometry.frame_lengths(grid_thw))
            packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                     max_seqlen_q=max_len, max_seqlen_kv=max_len)
        elif self.attention == "document":
            mask = geometry.frame_segment_ids(grid_thw, device=device)  # [1, patches]
        else:
            mask = geometry.block_diagonal_mask(grid_thw, device=device)

        hidden = x.unsqueeze(1)  # [s, b=1, h]
        deepstack = []
        recompute = self.config.recompute_granularity == "full" and self.training
        for i, layer in enumerate(self.layers):
            if recompute:
                hidden = tensor_parallel.checkpoint(
                    lambda h, layer=layer: _run_layer(layer, h, mask, rotary, packed), False, hidden)
            else:
                hidden = _run_layer(layer, hidden, mask, rotary, packed)
            if i in cfg.deepstack_visual_indexes:
                j = cfg.deepstack_visual_indexes.index(i)
                deepstack.append(self.deepstack_merger_list[j](hidden.squeeze(1)))
        return self.merger(hidden.squeeze(1)), deepstack


def _run_layer(layer, hidden, mask, rotary, packed):
    out, _ = layer(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary, packed_seq_params=packed)
    return out
