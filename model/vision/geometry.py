"""Per-patch index tensors of the Qwen3-VL ViT, computed from ``grid_thw`` (no weights).

Patches of one image / video arrive in *merge-block order*: time, block row, block column, then the
``merge x merge`` patches of the block row-major (see :func:`common.media.vision_inputs.patchify`).
``grid_thw`` rows are (t, h, w) counted in patches.
"""

from __future__ import annotations

import torch


def _grids(grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
    grids = [tuple(int(x) for x in row) for row in torch.as_tensor(grid_thw).reshape(-1, 3).tolist()]
    for t, h, w in grids:
        if t <= 0 or h <= 0 or w <= 0:
            raise ValueError(f"grid_thw rows must be positive, got {(t, h, w)}")
    return grids


def patch_rows_cols(grid_thw: torch.Tensor, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 (num_patches,) row and column (in patches) of every patch, in merge-block order."""
    rows, cols = [], []
    for t, h, w in _grids(grid_thw):
        if h % merge or w % merge:
            raise ValueError(f"grid {(t, h, w)} is not a multiple of the merge size {merge}")
        r = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
        c = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
        # block row, block col, row in block, col in block
        rows.append(r.permute(0, 2, 1, 3).reshape(-1).repeat(t))
        cols.append(c.permute(0, 2, 1, 3).reshape(-1).repeat(t))
    return torch.cat(rows), torch.cat(cols)


def frame_lengths(grid_thw: torch.Tensor) -> list[int]:
    """Patches per attention segment: every frame group of every image / video attends only to itself."""
    return [h * w for t, h, w in _grids(grid_thw) for _ in range(t)]


def cu_seqlens(grid_thw: torch.Tensor, device=None) -> torch.Tensor:
    """int32 cumulative segment boundaries ``[0, l0, l0+l1, ...]`` (for THD attention on GPU)."""
    lengths = torch.tensor(frame_lengths(grid_thw), dtype=torch.int32, device=device)
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def frame_segment_ids(grid_thw: torch.Tensor, device=None) -> torch.Tensor:
    """int64 ``[1, n]``: the frame group of every patch (segment ids for :mod:`model.attention`)."""
    lengths = frame_lengths(grid_thw)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                   torch.tensor(lengths, device=device))[None]


def block_diagonal_mask(grid_thw: torch.Tensor, device=None) -> torch.Tensor:
    """bool ``[1, 1, n, n]``, True where attention is *masked* (Megatron's convention): patches of
    different frame groups never attend to each other (the ``dense_mask`` backend)."""
    segment = frame_segment_ids(grid_thw, device)[0]
    return (segment[:, None] != segment[None, :])[None, None]


def interpolation_taps(grid_thw: torch.Tensor, side: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear resampling (``align_corners=True``) of a ``side x side`` learned position table to each
    image's ``h x w`` patch grid: int64 indices and float32 weights, both ``(num_patches, 4)``, taps in
    the order (top-left, top-right, bottom-left, bottom-right)."""
    rows, cols = patch_rows_cols(grid_thw, merge)
    heights = torch.cat([torch.full((t * h * w,), h) for t, h, w in _grids(grid_thw)])
    widths = torch.cat([torch.full((t * h * w,), w) for t, h, w in _grids(grid_thw)])

    def axis(index: torch.Tensor, size: torch.Tensor):
        # Source coordinate of target index i on an axis of `size` samples spanning 0..side-1.
        src = index.float() * (side - 1) / torch.clamp(size - 1, min=1)
        floor = torch.floor(src)
        offsets = torch.arange(2)
        taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
        weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
        return taps, weights

    h_taps, h_w = axis(rows, heights)
    w_taps, w_w = axis(cols, widths)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    return indices, weights


def vision_rotary_angles(grid_thw: torch.Tensor, merge: int, head_dim: int, theta: float) -> torch.Tensor:
    """float32 ``[num_patches, 1, 1, head_dim]`` 2D rotary angles in Megatron's rotate-half layout: the first
    ``head_dim/4`` frequencies rotate by the patch row, the next ``head_dim/4`` by the patch column."""
    rows, cols = patch_rows_cols(grid_thw, merge)
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float32) / spatial))
    angles = torch.cat([rows[:, None].float() * inv_freq, cols[:, None].float() * inv_freq], dim=-1)
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]
