"""Micro-batch collation (attention mask, cu_seqlens, counters) and the loss normalisation weights."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.data.encoding import SampleEncoder
from pretrain.data.loss_weights import token_loss_weights
from pretrain.data.micro_batch import collate_micro_batch, segment_boundaries
from pretrain.data.packing import pack_documents


def test_dense_reference_mask_is_causal_and_block_diagonal():
    """The dense_mask attention backend's mask (model/qwen3vl.py): causal within each run of equal ids."""
    from model.qwen3vl import dense_document_mask

    ids = torch.tensor([[0, 0, 0, 1, 1, -1, -1]])
    visible = ~dense_document_mask(ids)[0, 0]
    for i in range(7):
        for j in range(7):
            assert bool(visible[i, j]) == bool(ids[0, i] == ids[0, j] and j <= i), (i, j)
    assert bool(visible.any(dim=1).all())  # every row sees something: no NaN softmax


def test_cu_seqlens_cover_documents_and_padding_of_every_row():
    ids = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0], [0, 1, 2, -1, -1, -1]])
    cu, longest = segment_boundaries(ids)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 2, 5, 6, 12, 13, 14, 15, 18]
    assert longest == 6


def _pack(encoder, texts, seq, pad):
    docs = [encoder.encode_text(t) for t in texts]
    return pack_documents(docs, seq, pad, sources=["a"] * len(docs))


def test_collate_shapes_and_counters(tokenizer):
    enc = SampleEncoder(tokenizer)
    seq = 48
    packs = [_pack(enc, ["red circle", "a blue square moves left"], seq, tokenizer.pad_id),
             _pack(enc, ["green star on a white background"], seq, tokenizer.pad_id)]
    batch = collate_micro_batch(packs, skipped=[{"key": "k", "reason": "r"}], num_truncated=1)
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (2, seq)
    assert batch["position_ids"].shape == (3, 2, seq)
    assert "attention_mask" not in batch  # attention takes the document ids: no s x s mask is ever built
    assert batch["num_documents"] == 3
    assert batch["num_real_tokens"] == int((batch["document_ids"] >= 0).sum())
    assert batch["num_loss_tokens"] == int(batch["loss_mask"].sum())
    assert batch["num_skipped"] == 1 and batch["num_truncated"] == 1
    assert batch["cu_seqlens"][-1] == 2 * seq
    assert batch["pixel_values"].shape == (0, 1536)


def test_loss_weights_per_mode():
    loss_mask = torch.tensor([[0, 1, 1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.float32)
    ids = torch.tensor([[0, 0, 0, 0, 1, 1, -1, -1], [0, 0, 0, 0, 0, -1, -1, -1]])
    token = token_loss_weights(loss_mask, ids, "token")
    assert torch.equal(token, loss_mask)
    sample = token_loss_weights(loss_mask, ids, "sample")
    # Each document's weights sum to 1: three documents with targets.
    assert sample[0, :4].sum() == pytest.approx(1.0) and sample[0, 4:6].sum() == pytest.approx(1.0)
    assert sample[1].sum() == pytest.approx(1.0) and sample.sum() == pytest.approx(3.0)
    root = token_loss_weights(loss_mask, ids, "square_root")
    # A document of n targets weighs sqrt(n) in total, 1/sqrt(n) per target.
    assert root[0, 1].item() == pytest.approx(1 / math.sqrt(3)) and root[0, :4].sum() == pytest.approx(math.sqrt(3))
    assert root[1].sum() == pytest.approx(2.0) and root[0, 5].item() == pytest.approx(1.0)
    for w in (token, sample, root):
        assert bool((w[loss_mask == 0] == 0).all())
    with pytest.raises(ValueError, match="not one of"):
        token_loss_weights(loss_mask, ids, "mean")


def test_square_root_objective_lies_between_token_and_sample():
    """A long document dominates the per-token mean, not the per-sample one; sqrt is in between."""
    losses = torch.zeros(1, 12)
    losses[0, :10] = 1.0  # a long document with loss 1, a short one with loss 3
    losses[0, 10:] = 3.0
    mask = torch.ones(1, 12)
    ids = torch.tensor([[0] * 10 + [1] * 2])
    objective = {}
    for mode in ("token", "sample", "square_root"):
        w = token_loss_weights(mask, ids, mode)
        objective[mode] = float((w * losses).sum() / w.sum())
    assert objective["token"] == pytest.approx((10 + 6) / 12)
    assert objective["sample"] == pytest.approx(2.0)
    assert objective["token"] < objective["square_root"] < objective["sample"]
    expected = (math.sqrt(10) * 1 + math.sqrt(2) * 3) / (math.sqrt(10) + math.sqrt(2))
    assert objective["square_root"] == pytest.approx(expected)
