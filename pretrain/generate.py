"""Answer a question about an image or a video with a trained checkpoint (greedy decoding, one process).

    python -m pretrain.generate --ckpt runs/sft/checkpoints --image cat.png --prompt "What colour is it?"
    python -m pretrain.generate --ckpt runs/sft/checkpoints --video clip.mp4 --prompt "Which way does it move?"

The checkpoint's run folder holds the config it was trained with (``config.yaml``): the model, the
tokenizer and the image/video settings come from there, so the prompt is encoded exactly as training
data was (Qwen3-VL chat template, smart_resize, frame sampling, timestamps). The model is rebuilt in a
single-process layout; distributed checkpoints load into any layout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from model.checkpoint_io import CheckpointError, load_weights
from pretrain.forward import to_device


@dataclass
class InferenceModel:
    """A model ready to answer, with the tokenizer and sample encoder it was trained with."""

    model: Any
    tokenizer: Any
    encoder: Any
    frames: Any  # FrameSamplingConfig of the run
    checkpoint: Path


def load_inference_model(ckpt: str | Path) -> InferenceModel:
    """Build the model of ``ckpt``'s run on this process (world size 1) and load its weights."""
    from model.config import Qwen3VLConfig
    from model.qwen3vl import build_qwen3vl
    from pretrain.data.encoding import SampleEncoder
    from pretrain.data.loader import encoding_config_from_data
    from common.tokens.tokenizer import load_tokenizer
    from common.distributed.parallel import initialize_distributed

    from pretrain.checkpoint import checkpoint_run_config

    resolved, cfg = checkpoint_run_config(ckpt)
    initialize_distributed({}, seed=0, environ={})
    model = build_qwen3vl(Qwen3VLConfig.from_mapping(OmegaConf.to_container(cfg.model, resolve=True)),
                          pre_process=True, post_process=True, parallel_output=False)
    load_weights(resolved, [model])
    model.eval()
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    encoding = encoding_config_from_data(cfg.data)
    return InferenceModel(model, tokenizer, SampleEncoder(tokenizer, encoding), encoding.frames, resolved)


def load_media(path: str | Path, kind: str, frames) -> Any:
    """A PIL image or a sampled :class:`VideoClip` (the run's fps and frame bounds)."""
    from common.media.decode import load_image
    from common.media.frame_sampling import load_video_clip

    return load_image(str(path)) if kind == "image" else load_video_clip(str(path), frames)


def encode_prompt_messages(encoder: Any, messages: Sequence[Mapping]) -> dict:
    """The prompt dict of a rollout or a greedy answer: token ids ``input_ids`` [s], 3D positions
    ``position_ids`` [3, s] and, with media, ``pixel_values`` + ``image_grid_thw`` and/or
    ``pixel_values_videos`` + ``video_grid_thw``, of ``messages`` followed by ``<|im_start|>assistant\\n``.

    ``encoder``: the run's :class:`pretrain.data.encoding.SampleEncoder`; ``messages``: system/user turns
    as :meth:`SampleEncoder.encode_conversation` takes them (media decoded: PIL images, VideoClips),
    without an assistant turn. Raises ValueError.
    """
    if any(m.get("role") == "assistant" for m in messages):
        raise ValueError("a prompt holds system and user turns only: the model writes the assistant turn")
    # A placeholder answer: the prompt ends where its first target token begins.
    sample = encoder.encode_conversation([*messages, {"role": "assistant", "content": "x"}])
    start = int((sample.labels != -100).nonzero()[0])
    inputs = {"input_ids": sample.input_ids[:start], "position_ids": sample.position_ids[:, :start]}
    if sample.image_grid_thw.numel():
        inputs.update(pixel_values=sample.pixel_values, image_grid_thw=sample.image_grid_thw)
    if sample.video_grid_thw.numel():
        inputs.update(pixel_values_videos=sample.pixel_values_videos, video_grid_thw=sample.video_grid_thw)
    return inputs


def encode_prompt(im: InferenceModel, media: Any, kind: str, prompt: str) -> dict:
    """The prompt dict (:func:`encode_prompt_messages`) of one user turn: ``media`` (a PIL image or a
    VideoClip, ``kind`` "image" | "video") followed by the text ``prompt``."""
    messages = [{"role": "user", "content": [{"type": kind, kind: media}, {"type": "text", "text": prompt}]}]
    return encode_prompt_messages(im.encoder, messages)


@torch.no_grad()
def next_token_logits(im: InferenceModel, inputs: dict, continuations: list[list[int]]) -> torch.Tensor:
    """Logits [n, L + 1, vocab] after the prompt and each token of each of the n continuations.

    The continuations run as one batch, right-padded to the longest (L); padding comes after the
    tokens that matter, so causal attention keeps it from changing their logits. Continuation tokens
    are text: each takes the next position on all three MRoPE axes.
    """
    n, length = len(continuations), max(len(c) for c in continuations)
    prompt = inputs["input_ids"]
    ids = torch.cat([prompt.expand(n, -1),
                     torch.tensor([c + [im.tokenizer.pad_id] * (length - len(c)) for c in continuations],
                                  dtype=torch.long).reshape(n, length)], dim=1)
    last = int(inputs["position_ids"].max())
    extra = torch.arange(last + 1, last + 1 + length).expand(3, -1)
    positions = torch.cat([inputs["position_ids"], extra], dim=1)[:, None, :].expand(3, n, -1)
    media = {}
    for pixels, grid, index in (("pixel_values", "image_grid_thw", "image_index"),
                                ("pixel_values_videos", "video_grid_thw", "video_index")):
        if pixels in inputs:  # every row holds the same media: one ViT pass, its features for each row
            media[pixels], media[grid] = inputs[pixels], inputs[grid]
            if n > 1:
                media[index] = torch.arange(inputs[grid].shape[0]).repeat(n)
    # Inputs are built on the CPU; the model may sit on a GPU.
    batch = to_device({"input_ids": ids, "position_ids": positions, **media})
    logits = im.model(batch.pop("input_ids"), batch.pop("position_ids"), **batch)
    return logits[:, prompt.shape[0] - 1:].float().cpu()


def generate(im: InferenceModel, inputs: dict, max_new_tokens: int = 16) -> str:
    """Greedy decoding until ``<|im_end|>``/``<|endoftext|>`` or ``max_new_tokens``."""
    stop = {im.tokenizer.im_end_id, im.tokenizer.eos_id}
    out: list[int] = []
    for _ in range(max_new_tokens):
        # The model's vocabulary may be padded beyond the tokenizer's: never pick a padding row.
        token = int(next_token_logits(im, inputs, [out])[0, -1, : im.tokenizer.vocab_size].argmax())
        if token in stop:
            break
        out.append(token)
    return im.tokenizer.decode(out).strip()


def choice_log_likelihoods(im: InferenceModel, inputs: dict, choices: list[str]) -> list[float]:
    """Sum of token log-probabilities of each answer choice followed by ``<|im_end|>``."""
    targets = [im.tokenizer.encode(choice) + [im.tokenizer.im_end_id] for choice in choices]
    logp = torch.log_softmax(next_token_logits(im, inputs, [t[:-1] for t in targets]), dim=-1)
    return [float(logp[i, torch.arange(len(t)), torch.tensor(t)].sum()) for i, t in enumerate(targets)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoints folder (its latest) or a step directory")
    media = parser.add_mutually_exclusive_group(required=True)
    media.add_argument("--image", help="image file")
    media.add_argument("--video", help="video file")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    from common.media.decode import MediaError

    try:
        im = load_inference_model(args.ckpt)
        kind, path = ("image", args.image) if args.image else ("video", args.video)
        answer = generate(im, encode_prompt(im, load_media(path, kind, im.frames), kind, args.prompt),
                          args.max_new_tokens)
    except (CheckpointError, MediaError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(answer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
