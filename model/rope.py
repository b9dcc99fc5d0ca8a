"""Interleaved multimodal RoPE (MRoPE) of the Qwen3-VL language model, in Megatron-Core's format.

Each token has 3 positions (time, height, width); see :mod:`common.tokens.positions` for how they are
assigned. The rotary frequencies ``inv_freq[i] = theta ** (-2i / head_dim)``, ``i < head_dim / 2``, are
shared out between the three axes *interleaved*: frequency ``i`` rotates by the height position when
``i % 3 == 1`` and ``i < 3 * mrope_section[1]``, by the width position when ``i % 3 == 2`` and
``i < 3 * mrope_section[2]``, and by the time position otherwise (the reference's
``Qwen3VLTextRotaryEmbedding``; Megatron's own ``MultimodalRotaryEmbedding`` is Qwen2-VL's chunked
layout, a different function). Text tokens have equal positions on all axes, so for text this is the
ordinary RoPE.

The result is an angle tensor ``[s, b, 1, head_dim]`` (the ``head_dim / 2`` angles twice, the
"rotate-half" layout), which Megatron's attention turns into cos/sin and applies to queries and keys.
"""

from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """float32 ``(head_dim / 2,)`` inverse frequencies ``theta ** (-2i / head_dim)``."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def mrope_axis_of_frequency(head_dim: int, mrope_section: tuple[int, int, int]) -> torch.Tensor:
    """int64 ``(head_dim / 2,)``: which position axis (0 time, 1 height, 2 width) drives each frequency."""
    half = head_dim // 2
    if sum(mrope_section) != half:
        raise ValueError(f"mrope_section {list(mrope_section)} must sum to head_dim/2 = {half}")
    axis = torch.zeros(half, dtype=torch.long)
    for dim in (1, 2):
        axis[dim : 3 * mrope_section[dim] : 3] = dim
    return axis


class InterleavedMRoPE(torch.nn.Module):
    """``position_ids [3, b, s]`` (int) -> rotary angles ``[s, b, 1, head_dim]`` (float32).

    ``position_ids`` of shape ``[b, s]`` (text only) are used on all three axes.
    """

    def __init__(self, head_dim: int, theta: float, mrope_section: tuple[int, int, int]):
        super().__init__()
        self.head_dim = head_dim
        # Plain attributes, not buffers: Megatron's Float16Module casts every buffer to bf16/fp16, and
        # bf16 frequencies (8 mantissa bits) give angles off by whole radians at 8K positions. The
        # angles are always computed in float32, as Megatron's own RotaryEmbedding does.
        self._inv_freq = rope_inv_freq(head_dim, theta)
        self._axis = mrope_axis_of_frequency(head_dim, tuple(mrope_section))
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self._inv_freq.to(device), self._axis.to(device))
        return self._on_device[device]

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(f"position_ids must be [3, batch, seq] or [batch, seq], got {tuple(position_ids.shape)}")
        inv_freq, axis = self._tables(position_ids.device)
        # [3, b, s, d/2]: every axis' angle for every frequency, then each frequency keeps its axis.
        freqs = position_ids[..., None].float() * inv_freq
        index = axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])
        angles = freqs.gather(0, index)[0]  # [b, s, d/2]
        emb = torch.cat((angles, angles), dim=-1)  # rotate-half layout
        return emb.transpose(0, 1).unsqueeze(2).contiguous()  # [s, b, 1, d]
