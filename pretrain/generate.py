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
from pretrain.posttrain.rollout import RolloutConfig, generate_rollouts, sequence_logprobs


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


def generate_answers(im: InferenceModel, prompts: Sequence[dict], max_new_tokens: int = 16) -> list[str]:
    """Greedy answer of each prompt (:func:`encode_prompt` dicts), all in one batch, until
    ``<|im_end|>``/``<|endoftext|>`` or ``max_new_tokens``; the stop token is not part of the answer.

    The batch is the rollout's (:func:`pretrain.posttrain.rollout.generate_rollouts` at temperature 0):
    prompts left-padded into one grid, the ViT once per prompt, one prefill then one token per row and
    step with a KV cache. Never picks a token the tokenizer does not have (a padded embedding's extra
    rows) or an image/video placeholder.
    """
    cfg = RolloutConfig(temperature=0.0, max_new_tokens=max_new_tokens, group_size=1)
    rollouts = generate_rollouts(im.model, list(prompts), cfg, im.tokenizer, prompt_keys=range(len(prompts)))
    answers = []
    for ids, length, finished in zip(rollouts.response_ids, rollouts.lengths, rollouts.finished):
        kept = int(length) - int(finished)  # a finished answer ends with its stop token
        answers.append(im.tokenizer.decode(ids[:kept].tolist()).strip())
    return answers


def generate(im: InferenceModel, inputs: dict, max_new_tokens: int = 16) -> str:
    """Greedy answer of one prompt (:func:`generate_answers`)."""
    return generate_answers(im, [inputs], max_new_tokens)[0]


@torch.no_grad()
def choice_log_likelihoods(im: InferenceModel, prompts: Sequence[dict],
                           choices: Sequence[Sequence[str]]) -> list[list[float]]:
    """Sum of token log-probabilities (nats) of each answer choice followed by ``<|im_end|>``:
    ``result[q][c]`` for choice ``choices[q][c]`` after prompt ``prompts[q]``.

    All rows (prompt, choice) run as one packed sequence
    (:func:`pretrain.posttrain.rollout.sequence_logprobs`): each prompt's media through the ViT once
    for all its choices. Probabilities are over the tokenizer's vocabulary less the image/video
    placeholders, the tokens :func:`generate_answers` picks from.
    """
    if len(prompts) != len(choices):
        raise ValueError(f"{len(choices)} lists of choices for {len(prompts)} prompts")
    targets = [im.tokenizer.encode(c) + [im.tokenizer.im_end_id] for options in choices for c in options]
    width = max(len(t) for t in targets)
    ids = torch.full((len(targets), width), im.tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(targets), width, dtype=torch.bool)
    for row, t in enumerate(targets):
        ids[row, :len(t)], mask[row, :len(t)] = torch.tensor(t), True
    prompt_index = torch.tensor([q for q, options in enumerate(choices) for _ in options], dtype=torch.long)
    logp = sequence_logprobs(im.model, list(prompts), ids, mask, temperature=1.0,
                             vocab_size=im.tokenizer.vocab_size, prompt_index=prompt_index)
    sums = logp.sum(dim=1).cpu().tolist()
    out, row = [], 0
    for options in choices:
        out.append(sums[row:row + len(options)])
        row += len(options)
    return out


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
