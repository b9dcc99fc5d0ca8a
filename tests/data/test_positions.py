"""3D MRoPE position ids against transformers' Qwen3VLModel.get_rope_index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.tokens.positions import mrope_position_ids


def _layout(rng, images, videos):
    """Token types for text runs around images (one run each) and videos (one run per frame group)."""
    types = [0] * int(rng.integers(1, 6))
    media = [("image", g) for g in images] + [("video", g) for g in videos]
    rng.shuffle(media)
    order_images, order_videos = [], []
    for kind, (t, h, w) in media:
        if kind == "image":
            types += [0] + [1] * (h * w // 4) + [0] * int(rng.integers(1, 4))
            order_images.append((t, h, w))
        else:
            for _ in range(t):
                types += [0] * 5 + [2] * (h * w // 4) + [0]  # "<t seconds>" + start, pads, end
            types += [0] * int(rng.integers(0, 3))
            order_videos.append((t, h, w))
    return types, order_images, order_videos


@pytest.mark.parametrize("seed", range(6))
def test_positions_match_get_rope_index(rope_model, seed):
    rng = np.random.default_rng(seed)
    grid = lambda t: (t, 2 * int(rng.integers(1, 8)), 2 * int(rng.integers(1, 8)))  # noqa: E731
    images = [grid(1) for _ in range(int(rng.integers(0, 4)))]
    videos = [grid(int(rng.integers(1, 5))) for _ in range(int(rng.integers(0, 3)))]
    if not images and not videos:
        images = [grid(1)]
    types, images, videos = _layout(rng, images, videos)
    types_t = torch.tensor(types, dtype=torch.int64)
    image_grid = torch.tensor(images, dtype=torch.int64).reshape(-1, 3)
    video_grid = torch.tensor(videos, dtype=torch.int64).reshape(-1, 3)
    expected, _ = rope_model.get_rope_index(
        torch.zeros(1, len(types), dtype=torch.int64),
        types_t[None],
        image_grid if len(images) else None,
        video_grid.clone() if len(videos) else None,
    )
    ours = mrope_position_ids(types_t, image_grid, video_grid)
    assert ours.dtype == torch.int64 and ours.shape == (3, len(types))
    assert torch.equal(ours, expected[:, 0])
    assert ours[:, 0].tolist() == [0, 0, 0]


def test_text_only_positions_are_arange():
    ours = mrope_position_ids(torch.zeros(7, dtype=torch.int64))
    assert torch.equal(ours, torch.arange(7).expand(3, 7))


def test_image_block_layout():
    # "a" <start> 2x3 merged image <end> "b": image tokens at t=2, h=2..3, w=2..4; text resumes at 2+3.
    types = torch.tensor([0, 0] + [1] * 6 + [0, 0])
    ours = mrope_position_ids(types, torch.tensor([[1, 4, 6]]))
    assert ours[:, 2:8].tolist() == [[2] * 6, [2, 2, 2, 3, 3, 3], [2, 3, 4, 2, 3, 4]]
    assert ours[:, 8].tolist() == [5, 5, 5] and ours[:, 9].tolist() == [6, 6, 6]


@pytest.mark.parametrize(
    "types, images, videos, match",
    [
        ([0, 1, 1, 0], [[1, 4, 4]], None, "has 2 tokens but its grid"),
        ([0, 1, 1, 1, 1, 0], None, None, "no grid left"),
        ([0, 0], [[1, 2, 2]], None, "1 image grids given but 0"),
        ([0, 2, 0], None, [[2, 2, 2]], "2 video frame group grids given but 1"),
        ([0, 3, 0], None, None, "unknown mm_token_type 3"),
    ],
)
def test_mismatched_grids_are_errors(types, images, videos, match):
    with pytest.raises(ValueError, match=match):
        mrope_position_ids(torch.tensor(types), images, videos)
