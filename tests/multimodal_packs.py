"""The multimodal packs and tiny model configs that several multi-rank tests train on.

Built by the real data path (``SampleEncoder`` -> ``pack_documents`` -> ``collate_micro_batch`` ->
``token_loss_weights``): 4 packed rows, each with a text, an image and a video document (two rows also
an interleaved document with two images) and padding, in micro-batches of :data:`MICRO_BATCH_SIZE`.
``tests/conftest.py`` makes them session fixtures (``layout_tokenizer``, ``layout_batch``).
"""

from __future__ import annotations

import dataclasses

MICRO_BATCH_SIZE = 2  # the global batch is the 4 packs of packs(): 2 micro-batches


def train_tokenizer(folder):
    """A byte-level BPE tokenizer (400 ids) trained on the words of the packs' texts, in ``folder``."""
    from common.tokens.tokenizer import Tokenizer, train_byte_level_bpe

    words = "red green blue yellow purple orange pink circle square triangle star moves left right up down " \
            "on a the background there is which way does white black".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(300)]
    return Tokenizer.from_file(train_byte_level_bpe(texts, 400, folder))


def packs(tokenizer) -> list:
    """4 packed rows; every one holds a text document, an image document and a video document
    (plus, in two rows, an interleaved document with two images), and some padding."""
    import numpy as np
    import PIL.Image

    from common.media.frame_sampling import VideoClip
    from common.media.vision_inputs import VisionInputConfig
    from pretrain.data.encoding import EncodingConfig, SampleEncoder
    from pretrain.data.packing import pack_documents

    rng = np.random.default_rng(0)

    def image(w, h):
        return PIL.Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    def clip(frames, w, h):
        return VideoClip(rng.integers(0, 255, (frames, h, w, 3), dtype=np.uint8), np.arange(frames) / 2.0)

    # Small media: a 32x32 image is one merged visual token, a 64x32 one two.
    vision = VisionInputConfig(image_min_pixels=1024, image_max_pixels=4096,
                               video_min_pixels=1024, video_max_pixels=8192)
    enc = SampleEncoder(tokenizer, EncodingConfig(vision=vision))
    rows = [
        [enc.encode_image_text(image(64, 32), "a red circle on a white background"),
         enc.encode_text("a green star moves up"),
         enc.encode_video(clip(4, 64, 32), text="the yellow triangle moves left")],
        [enc.encode_video(clip(4, 32, 64), text="which way does the blue square move"),
         enc.encode_interleaved(["there is", image(32, 64), "a blue square and", image(64, 64), "a star"]),
         enc.encode_text("the orange circle moves right on a black background")],
        [enc.encode_text("pink square"),
         enc.encode_image_text(image(32, 32), "a purple star"),
         enc.encode_video(clip(2, 64, 64), text="a white circle moves down")],
        [enc.encode_interleaved(["a", image(64, 32), "and a", image(32, 32), "on the background"]),
         enc.encode_video(clip(4, 32, 32), text="the red triangle moves up"),
         enc.encode_text("there is a green square")],
    ]
    longest = max(sum(d.num_tokens for d in row) for row in rows)
    # Padding in every row; a multiple of 4 so that sequence parallelism (tp = 2) and context
    # parallelism (2 * cp = 4 chunks) can cut it.
    seq_length = longest + 1 + (-(longest + 1) % 4)
    return [pack_documents(row, seq_length, tokenizer.pad_id) for row in rows]


def global_batch(tokenizer, micro_batch_size: int = MICRO_BATCH_SIZE) -> list[dict]:
    """The micro-batches of one step's global batch, as the task encoder emits them (un-normalised
    square-root loss weights)."""
    from pretrain.data.loss_weights import token_loss_weights
    from pretrain.data.micro_batch import collate_micro_batch

    rows = packs(tokenizer)
    micro_batches = []
    for i in range(0, len(rows), micro_batch_size):
        batch = collate_micro_batch(rows[i:i + micro_batch_size])
        batch["loss_weights"] = token_loss_weights(batch["loss_mask"], batch["document_ids"], "square_root")
        micro_batches.append(batch)
    # Not vacuous: every micro-batch of two packs has several documents, images, a video and padding.
    for batch in micro_batches if micro_batch_size == MICRO_BATCH_SIZE else ():
        assert batch["num_documents"] >= 6
        assert batch["image_grid_thw"].shape[0] >= 2 and batch["video_grid_thw"].shape[0] == 2
        assert batch["num_real_tokens"] < batch["tokens"].numel()
    return micro_batches


def tiny_config(kind: str, tokenizer):
    """The tiny config of ``conf/model`` on the test tokenizer's vocabulary and special ids.

    Dense: three DeepStack features over four decoder layers, so with pp=2 the third one travels to
    the second stage (forward) and its gradient back (backward). MoE: layer 1 is a dense MLP among
    expert layers, so dense and expert gradients are reduced over different data-parallel groups; the
    load-balancing loss weighs 0.1, not Qwen3's 1e-3: at 1e-3 dropping it altogether moves the losses
    by < 1e-6 and the norms by < 6e-6 relative, within the tolerances, so a layout that got it wrong
    would pass; at 0.1 halving it moves the step-2 and step-3 losses and norms by ~1e-4.
    """
    from model.registry import get_config

    cfg = get_config(f"tiny_{kind}")
    vocab = tokenizer.vocab_size + (-tokenizer.vocab_size % 64)
    text = dataclasses.replace(cfg.text, vocab_size=vocab)
    vision = cfg.vision
    if kind == "dense":
        vision = dataclasses.replace(vision, deepstack_visual_indexes=(0, 1, 2))
    else:
        text = dataclasses.replace(text, mlp_only_layers=(1,), router_aux_loss_coef=0.1)
    return dataclasses.replace(
        cfg, text=text, vision=vision, image_token_id=tokenizer.image_pad_id,
        video_token_id=tokenizer.video_pad_id, vision_start_token_id=tokenizer.vision_start_id,
        vision_end_token_id=tokenizer.vision_end_id)
