"""3D (time, height, width) MRoPE position ids of one Qwen3-VL sample, starting at 0.

Rules (transformers' ``Qwen3VLModel.get_rope_index``):

* A run of text tokens (``mm_token_type_ids == 0``) gets ``p, p+1, ...`` on all three axes.
* A run of visual tokens of one image, or of one frame group of a video (each group is its own run,
  separated by its ``<t seconds>`` text), with merged grid ``h x w`` = ``grid_h / merge`` x ``grid_w / merge``:
  time = ``p`` for every token, height = ``p + row``, width = ``p + column`` (row-major over the grid).
  The next token starts at ``p + max(h, w)``.

Time is therefore carried by the text timestamps, not by the temporal position axis (Qwen3-VL's
"text-timestamp alignment"). Positions restart at 0 for every sample; a packer that concatenates
samples keeps each sample's own positions.
"""

from __future__ import annotations

import numpy as np
import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


def _runs(types: np.ndarray) -> list[tuple[int, int, int]]:
    """(type, start, end) of maximal runs of equal values."""
    if types.size == 0:
        return []
    change = np.flatnonzero(np.diff(types)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [types.size]])
    return [(int(types[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def frame_group_grids(video_grid_thw: torch.Tensor | np.ndarray | None) -> np.ndarray:
    """Split each video's (t, h, w) into t grids of (1, h, w): one per frame group, in order."""
    if video_grid_thw is None:
        return np.zeros((0, 3), dtype=np.int64)
    grids = np.asarray(video_grid_thw, dtype=np.int64).reshape(-1, 3)
    groups = np.repeat(grids, grids[:, 0], axis=0)
    groups[:, 0] = 1
    return groups


def mrope_position_ids(
    mm_token_type_ids: torch.Tensor | np.ndarray,
    image_grid_thw: torch.Tensor | np.ndarray | None = None,
    video_grid_thw: torch.Tensor | np.ndarray | None = None,
    merge_size: int = 2,
) -> torch.Tensor:
    """int64 (3, L) positions (t, h, w) for one sample whose token types are ``mm_token_type_ids`` (L,).

    ``image_grid_thw`` (n_images, 3) and ``video_grid_thw`` (n_videos, 3) are in patches, in the order
    the images / videos appear. Raises ``ValueError`` when the visual runs do not match the grids.
    """
    types = np.asarray(mm_token_type_ids, dtype=np.int64).reshape(-1)
    grids = {
        IMAGE: np.asarray(image_grid_thw if image_grid_thw is not None else np.zeros((0, 3)), np.int64).reshape(-1, 3),
        VIDEO: frame_group_grids(video_grid_thw),
    }
    used = {IMAGE: 0, VIDEO: 0}
    out = np.empty((3, types.size), dtype=np.int64)
    pos = 0
    for kind, start, end in _runs(types):
        length = end - start
        if kind == TEXT:
            out[:, start:end] = np.arange(pos, pos + length)
            pos += length
            continue
        if kind not in grids:
            raise ValueError(f"unknown mm_token_type {kind} at token {start} (0 text, 1 image, 2 video)")
        name = "image" if kind == IMAGE else "video frame group"
        if used[kind] >= len(grids[kind]):
            raise ValueError(f"{name} run at token {start} has no grid left ({len(grids[kind])} given)")
        t, h, w = grids[kind][used[kind]]
        used[kind] += 1
        llm_h, llm_w = h // merge_size, w // merge_size
        if t * llm_h * llm_w != length:
            raise ValueError(
                f"{name} run at token {start} has {length} tokens but its grid {(t, h, w)} needs {t * llm_h * llm_w}"
            )
        rows, cols = np.divmod(np.arange(llm_h * llm_w), llm_w)
        frame = np.repeat(np.arange(t), llm_h * llm_w)
        out[0, start:end] = pos + frame
        out[1, start:end] = pos + np.tile(rows, t)
        out[2, start:end] = pos + np.tile(cols, t)
        pos += max(llm_h, llm_w)
    for kind, name in ((IMAGE, "image"), (VIDEO, "video frame group")):
        if used[kind] != len(grids[kind]):
            raise ValueError(f"{len(grids[kind])} {name} grids given but {used[kind]} {name} runs in the tokens")
    return torch.from_numpy(out)
