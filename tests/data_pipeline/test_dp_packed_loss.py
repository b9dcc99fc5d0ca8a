"""The packed micro-batch is loss-equivalent to its documents run one by one (issue 7, item 4).

A tiny Qwen3 decoder (Megatron-Core GPTModel on CPU, ``model/text_config.py``) runs once on a packed
micro-batch with the block-diagonal causal mask, and once per document alone. Per-token losses, the
(weighted) loss sums and the parameter gradients must agree; without the document mask they must not.
"""

from __future__ import annotations

import torch

from pretrain.data.encoding import SampleEncoder
from pretrain.data.loss_weights import token_loss_weights
from pretrain.data.micro_batch import collate_micro_batch
from pretrain.data.packing import first_fit_decreasing, next_token_labels, pack_documents
from tests.multirank import run_ranks

TEXTS = [
    "a red circle on a white background",
    "there is a blue square on a gray background and the blue square moves left",
    "a green star",
    "which way does the yellow triangle move up or down the yellow triangle moves down",
    "a purple star on a black background",
    "the orange circle moves right on a white background",
    "pink square",
]


def _losses_packed_and_alone(rank, batch, documents, vocab_size, seq_length):
    from model.text_config import Qwen3TextConfig
    from tests.tiny_gpt import build_language_model
    from common.distributed.parallel import initialize_distributed

    initialize_distributed({})
    cfg = Qwen3TextConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, intermediate_size=128, rope_theta=10000.0)
    torch.manual_seed(0)
    model = build_language_model(cfg, cfg.transformer_config(), max_sequence_length=seq_length, parallel_output=True)

    def run(tokens, labels, document_ids):
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        # The decoder's document attention (model/attention.py) takes the document ids as its mask.
        return model(tokens, positions, attention_mask=document_ids, labels=labels)

    model.zero_grad()
    packed = run(batch["tokens"], batch["labels"], batch["document_ids"])
    (packed * batch["loss_weights"]).sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():
        unmasked = run(batch["tokens"], batch["labels"], None)  # plain causal: documents see each other

    model.zero_grad()
    alone = []
    for tokens, labels, weights in documents:
        loss = run(tokens[None], labels[None], None)[0]
        (loss * weights).sum().backward()
        alone.append(loss.detach())
    alone_grads = [p.grad.clone() for p in model.parameters()]
    # numpy, not tensors: tensors would cross the process boundary as shared memory that dies with us
    numpy = lambda ts: [t.detach().numpy().copy() for t in ts]  # noqa: E731
    return numpy([packed])[0], numpy([unmasked])[0], numpy(alone), numpy(packed_grads), numpy(alone_grads)


def test_packed_loss_equals_sum_of_documents_alone(tokenizer):
    encoder = SampleEncoder(tokenizer)
    docs = [encoder.encode_text(t, sample_id=str(i)) for i, t in enumerate(TEXTS)]
    seq_length = 40
    bins = first_fit_decreasing([d.num_tokens for d in docs], [0] * len(docs), seq_length)
    assert len(bins) == 2 and all(len(b) > 1 for b in bins)  # two rows, several documents each
    packs = [pack_documents([docs[i] for i in b], seq_length, tokenizer.pad_id) for b in bins]
    batch = collate_micro_batch(packs)
    batch["loss_weights"] = token_loss_weights(batch["loss_mask"], batch["document_ids"], "square_root")
    assert batch["num_real_tokens"] < 2 * seq_length  # padding is present and must not matter

    # Each document alone, with the same next-token labels and the same per-token weights.
    alone_inputs, where = [], []
    for row, members in enumerate(bins):
        offset = 0
        for i in members:
            n = docs[i].num_tokens
            labels, _ = next_token_labels(docs[i].labels, tokenizer.pad_id)
            weights = batch["loss_weights"][row, offset : offset + n]
            alone_inputs.append((docs[i].input_ids, labels, weights))
            where.append((row, offset, n))
            offset += n

    vocab = tokenizer.vocab_size + (-tokenizer.vocab_size % 64)
    results = run_ranks(_losses_packed_and_alone, 1, batch, alone_inputs, vocab, seq_length)[0]
    packed, unmasked = torch.from_numpy(results[0]), torch.from_numpy(results[1])
    alone, packed_grads, alone_grads = ([torch.from_numpy(a) for a in r] for r in results[2:])

    mask = batch["loss_mask"]
    total_alone = 0.0
    for (row, offset, n), loss, (_, _, weights) in zip(where, alone, alone_inputs):
        target = mask[row, offset : offset + n].bool()
        assert torch.allclose(packed[row, offset : offset + n][target], loss[target], atol=1e-5, rtol=0)
        total_alone += float((loss * weights).sum())
    total_packed = float((packed * batch["loss_weights"]).sum())
    assert abs(total_packed - total_alone) <= 1e-5 * max(1.0, abs(total_alone))
    for a, b in zip(packed_grads, alone_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    # The document mask is what makes this true: plain causal attention changes later documents' losses.
    assert (unmasked - packed)[mask.bool()].abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------------
# Multimodal variant: the full Qwen3-VL model (ViT, DeepStack, interleaved MRoPE) on packed documents
# ------------------------------------------------------------------------------------------------------


def _media(batch, pixels, grid):
    return (batch[pixels], batch[grid]) if batch[grid].shape[0] else (None, None)


def _multimodal_losses(rank, batch, documents, special_ids, vocab_size):
    import dataclasses

    from model.qwen3vl import build_qwen3vl
    from model.registry import get_config
    from common.distributed.parallel import initialize_distributed

    initialize_distributed({})
    cfg = get_config("tiny_dense")
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=vocab_size), **special_ids)
    torch.manual_seed(0)
    model = build_qwen3vl(cfg)

    def run(inputs, document_ids):
        pixel_values, image_grid_thw = _media(inputs, "pixel_values", "image_grid_thw")
        pixel_values_videos, video_grid_thw = _media(inputs, "pixel_values_videos", "video_grid_thw")
        return model(inputs["tokens"], inputs["position_ids"], document_ids=document_ids, labels=inputs["labels"],
                     pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                     pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)

    model.zero_grad()
    packed = run(batch, batch["document_ids"])
    (packed * batch["loss_weights"]).sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    alone = []
    for inputs, weights in documents:
        loss = run(inputs, None)[0]
        (loss * weights).sum().backward()
        alone.append(loss.detach())
    alone_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    numpy = lambda ts: [t.detach().numpy().copy() for t in ts]  # noqa: E731
    return numpy([packed])[0], numpy(alone), numpy(packed_grads), numpy(alone_grads)


def test_packed_multimodal_loss_equals_sum_of_documents_alone(tokenizer):
    import numpy as np
    import PIL.Image

    from pretrain.data.encoding import EncodingConfig
    from common.media.frame_sampling import VideoClip
    from common.media.vision_inputs import VisionInputConfig

    rng = np.random.default_rng(0)

    def image(w, h):
        return PIL.Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    vision = VisionInputConfig(image_min_pixels=1024, image_max_pixels=4096,
                               video_min_pixels=1024, video_max_pixels=8192)
    encoder = SampleEncoder(tokenizer, EncodingConfig(vision=vision))
    clip = VideoClip(rng.integers(0, 255, (4, 64, 32, 3), dtype=np.uint8), np.arange(4) / 2.0)
    docs = [
        encoder.encode_image_text(image(64, 32), "a red circle on a white background"),
        encoder.encode_text("a green star moves up"),
        encoder.encode_interleaved(["there is", image(32, 64), "a blue square and", image(64, 64), "a star"]),
        encoder.encode_video(clip, text="the yellow triangle moves left"),
        encoder.encode_image_text(image(32, 32), "a pink square"),
    ]
    seq_length = max(sum(d.num_tokens for d in docs[:3]), sum(d.num_tokens for d in docs[3:])) + 3
    rows = [docs[:3], docs[3:]]
    batch = collate_micro_batch([pack_documents(r, seq_length, tokenizer.pad_id) for r in rows])
    batch["loss_weights"] = token_loss_weights(batch["loss_mask"], batch["document_ids"], "square_root")
    assert batch["image_grid_thw"].shape[0] == 4 and batch["video_grid_thw"].shape[0] == 1

    alone_inputs, where = [], []
    for row, members in enumerate(rows):
        offset = 0
        for doc in members:
            n = doc.num_tokens
            one = collate_micro_batch([pack_documents([doc], n, tokenizer.pad_id)])
            alone_inputs.append((one, batch["loss_weights"][row, offset : offset + n][None]))
            where.append((row, offset, n))
            offset += n

    special_ids = dict(image_token_id=tokenizer.image_pad_id, video_token_id=tokenizer.video_pad_id,
                       vision_start_token_id=tokenizer.vision_start_id, vision_end_token_id=tokenizer.vision_end_id)
    vocab = tokenizer.vocab_size + (-tokenizer.vocab_size % 64)
    packed, alone, packed_grads, alone_grads = run_ranks(
        _multimodal_losses, 1, batch, alone_inputs, special_ids, vocab)[0]
    packed = torch.from_numpy(packed)
    mask = batch["loss_mask"]
    for (row, offset, n), loss in zip(where, alone):
        target = mask[row, offset : offset + n].bool()
        assert target.any()
        alone_loss = torch.from_numpy(loss)[target]
        assert torch.allclose(packed[row, offset : offset + n][target], alone_loss, atol=1e-5, rtol=0)
    assert len(packed_grads) == len(alone_grads) > 0
    for a, b in zip(packed_grads, alone_grads):
        assert np.allclose(a, b, atol=1e-5, rtol=1e-4)
