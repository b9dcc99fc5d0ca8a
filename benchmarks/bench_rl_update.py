"""Time of the RL policy update with micro-batches at their own packed lengths vs all padded to the longest,
and padded after cutting every G rows.

    python benchmarks/bench_rl_update.py [--model tiny_moe] [--groups 3] [--group-size 8] [--steps 3]
        [--max-new-tokens 128] [--side 224] [--frames 16]

One process, the trainer's model and optimizer of ``stage=rl_sapo`` (``pretrain.trainer.build_training``),
a synthetic rollout batch of prompt groups as an RL step holds them: in turn a text prompt, an image prompt
and a video prompt (random pixels, encoded by the chat template as the RL stage encodes them), G responses
each of 8 to ``--max-new-tokens`` random tokens; ``micro_batch_size`` G, so there are as many micro-batches
as groups. The same rows go through the trainer's step as ``pretrain.posttrain.rl_step.policy_update`` runs
them, the rows cut by ``rl_micro_batches`` (where the longest micro-batch is shortest), with each micro-batch
at its own length (``same_length=False``: the rule without pipeline stages) and with every one padded to the
longest (``same_length=True``: what pipeline stages need); and, for comparison, padded after cutting every G
rows (one group per micro-batch, so the micro-batches' lengths differ as their prompts do); in turn, after
one warm-up update each. Prints each layout's tokens (real and padding) and update time, then
``padded/own-length update time: X`` and ``padded, cut every G rows/own-length update time: Y``. The
loss of all three is the same (printed); the gradient norm of the last differs a little, its micro-batches
hold other rows (the MoE load-balancing loss is a micro-batch's).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rollout_rows(tokenizer, cfg, groups: int, g: int, max_new_tokens: int, side: int, frames: int, seed: int = 0):
    """An :class:`pretrain.posttrain.rl_step.RLRows` of ``groups`` prompt groups (text, image, video in turn;
    images and frames of ``side`` x ``side`` pixels, ``frames`` frames at 2 fps) of ``g`` responses with
    random lengths in [min(8, max_new_tokens), max_new_tokens], random advantages, old log-probs 0."""
    import numpy as np
    import PIL.Image

    from common.media.frame_sampling import VideoClip
    from common.media.vision_inputs import VisionInputConfig
    from pretrain.data.encoding import EncodingConfig, SampleEncoder
    from pretrain.generate import encode_prompt_messages
    from pretrain.posttrain.rl_step import RLRows

    rng = np.random.default_rng(seed)
    pixels = side * side  # per image and per frame (a video's max_pixels is its whole budget)
    encoder = SampleEncoder(tokenizer, EncodingConfig(vision=VisionInputConfig(
        image_min_pixels=pixels, image_max_pixels=pixels, video_min_pixels=4096, video_max_pixels=frames * pixels)))
    question = {"type": "text", "text": "which way does the red circle move and what is on its left"}
    kinds = [[question],
             [{"type": "image", "image": PIL.Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))},
              question],
             [{"type": "video", "video": VideoClip(rng.integers(0, 255, (frames, side, side, 3), dtype=np.uint8),
                                                   np.arange(frames) / 2.0)}, question]]
    prompts = [encode_prompt_messages(encoder, [{"role": "user", "content": kinds[i % 3]}]) for i in range(groups)]
    rows = groups * g
    lengths = torch.as_tensor(rng.integers(min(8, max_new_tokens), max_new_tokens + 1, rows))
    ids = torch.as_tensor(rng.integers(0, tokenizer.vocab_size, (rows, max_new_tokens)))
    ids = ids.masked_fill(torch.isin(ids, torch.tensor([cfg.image_token_id, cfg.video_token_id])), 0)
    mask = torch.arange(max_new_tokens)[None, :] < lengths[:, None]
    return RLRows(prompts, ids, mask, torch.zeros(rows, max_new_tokens), torch.as_tensor(rng.normal(size=rows)).float(),
                  torch.arange(groups).repeat_interleave(g))


def bench_rank(rank: int, job, tokenizer, rows, g: int, steps: int) -> dict:
    from benchmarks.bench_step import _sync
    from common.distributed.parallel import initialize_distributed
    from model.config import Qwen3VLConfig
    from pretrain.posttrain import rl_step
    from pretrain.posttrain.policy_loss import policy_loss_config
    from pretrain.posttrain.rollout import placeholder_ids
    from pretrain.step import train_step
    from pretrain.trainer import build_training

    initialize_distributed(job.parallel, seed=job.train.seed)
    cfg = Qwen3VLConfig.from_mapping(job.model)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    _, model, optimizer = build_training(job, dtype)
    every_g = list(range(0, len(rows), g)) + [len(rows)]
    options = {"own": {}, "padded": {"same_length": True}, "every_g": {"same_length": True, "cuts": every_g}}
    layouts, out = {}, {}
    for name, kwargs in options.items():  # the micro-batches of each layout, built once (the steps only read them)
        layouts[name] = rl_step.rl_micro_batches(rows, g, dtype, **kwargs)
        batches = layouts[name][0]
        out[name] = {"tokens": sum(b["input_ids"].shape[1] for b in batches),
                     "real": int(sum((b["document_ids"] >= 0).sum() for b in batches)), "times": [], "results": []}

    def update(name: str) -> float:
        loss_step = rl_step.PolicyLossStep(policy_loss_config("sapo"), "seq-mean-token-mean", 1.0,
                                           tokenizer.vocab_size, placeholder_ids(cfg))
        batches, length = layouts[name]
        _sync()
        t0 = time.perf_counter()
        result = train_step(model, optimizer, loss_step, iter(batches), len(batches), length, 1)
        _sync()
        out[name]["results"].append((result.loss, result.grad_norm))
        return time.perf_counter() - t0

    for name in options:
        update(name)  # warm-up
    for _ in range(steps):
        for name in options:
            out[name]["times"].append(update(name))
    return out


def add_prompt_arguments(p: argparse.ArgumentParser) -> None:
    """The options of :func:`rollout_rows`' prompts and the model, shared with bench_rollout.py."""
    p.add_argument("--model", default="tiny_moe", help="a conf/model name (default tiny_moe)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    p.add_argument("--groups", type=int, default=3, help="prompt groups (text, image, video in turn; default 3)")
    p.add_argument("--side", type=int, default=224, help="image and frame side in pixels (default 224)")
    p.add_argument("--frames", type=int, default=16, help="frames of the video prompt (default 16)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_prompt_arguments(p)
    p.add_argument("--group-size", type=int, default=8, help="responses per prompt G (and micro_batch_size)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest response (default 128)")
    p.add_argument("--steps", type=int, default=3, help="timed updates per layout (default 3)")
    args = p.parse_args(argv)

    from benchmarks.bench_step import bench_tokenizer, compose_job, fit_model_to_tokenizer
    from common.distributed.spawn import spawn_ranks

    # lr 1e-12: far below a float32 weight's ulp, the updates leave the weights as they are, so that both
    # layouts run the same model.
    job = compose_job(args.model, "single", stage="rl_sapo", micro_batch_size=args.group_size, layers=args.layers,
                      overrides=["stage.optimizer.lr=1e-12", "stage.optimizer.min_lr=1e-12"])
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = bench_tokenizer(tmp)
    cfg = fit_model_to_tokenizer(job, tokenizer)
    rows = rollout_rows(tokenizer, cfg, args.groups, args.group_size, args.max_new_tokens, args.side, args.frames)
    out = spawn_ranks(bench_rank, 1, job, tokenizer, rows, args.group_size, args.steps)[0]
    prompt_tokens = [int(p["input_ids"].numel()) for p in rows.prompts[:3]]
    print(f"bench_rl_update: {args.model}, {args.groups} prompt groups x G={args.group_size} rows, "
          f"{args.groups} micro-batches; prompts of {', '.join(map(str, prompt_tokens))} tokens (text, image, "
          f"video of {args.frames} frames, {args.side}x{args.side} pixels), responses of 8-{args.max_new_tokens} tokens")
    names = {"own": "own length", "padded": "padded to the longest", "every_g": "padded, cut every G rows"}
    for key, name in names.items():
        r = out[key]
        loss, norm = r["results"][-1]
        print(f"{name:25s}: {r['tokens']:,} tokens ({r['real']:,} real, {1 - r['real'] / r['tokens']:.0%} padding), "
              f"update {statistics.median(r['times']):.3f} s (median of {len(r['times'])}), loss {loss:.6f}, "
              f"grad norm {norm:.6f}")
    own = statistics.median(out["own"]["times"])
    print(f"padded/own-length update time: {statistics.median(out['padded']['times']) / own:.2f}")
    print(f"padded, cut every G rows/own-length update time: {statistics.median(out['every_g']['times']) / own:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
