"""Rollout time and KV-cache size: groups of text, image and video prompts, G responses each.

    python benchmarks/bench_rollout.py [--model tiny_moe] [--groups 3] [--group-size 8]
        [--max-new-tokens 64] [--side 224] [--frames 16] [--repeats 3]

One process, the trainer's model of ``stage=rl_sapo`` (random weights), the prompts of
``benchmarks/bench_rl_update.py`` (in turn a text, an image and a 16-frame video prompt), every response
sampled to ``--max-new-tokens`` tokens (no stop token). Times ``generate_rollouts`` with the KV cache
(the prompt cache shared by each prompt's G rows, Megatron's static cache for the responses; after a
warm-up, the median of ``--repeats``) and, as the reference in the same process, once without a cache
(every step recomputes every row); the two sample the same tokens (checked in float32, counted in bf16
on CUDA). Prints the cache's positions against those of a cache where every row holds its own copy of
its (left-padded) prompt, the time of each, and on CUDA the peak memory of each.
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


def bench_rank(rank: int, job, tokenizer, prompts, g: int, new_tokens: int, repeats: int) -> dict:
    from benchmarks.bench_step import _sync
    from common.distributed.parallel import initialize_distributed
    from pretrain.posttrain.rollout import RolloutConfig, generate_rollouts
    from pretrain.trainer import build_training

    initialize_distributed(job.parallel, seed=job.train.seed)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    chunks, _, _ = build_training(job, dtype)
    cfg = RolloutConfig(max_new_tokens=new_tokens, group_size=g, temperature=1.0, stop_tokens=())
    out = {}
    for use_cache in (True, False):
        times, ids = [], None
        # the cached rollout: a warm-up, then `repeats` timed; the recomputed one (slow): a warm-up, one timed
        for i in range(repeats + 1 if use_cache else 2):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            _sync()
            t0 = time.perf_counter()
            rollouts = generate_rollouts(chunks[0], prompts, cfg, tokenizer, use_cache=use_cache)
            _sync()
            times.append(time.perf_counter() - t0)
            ids = rollouts.response_ids
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        out[use_cache] = {"time": statistics.median(times[1:]), "runs": len(times) - 1, "ids": ids, "peak": peak}
    return out


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench_rl_update import add_prompt_arguments, rollout_rows

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_prompt_arguments(p)
    p.add_argument("--group-size", type=int, default=8, help="responses per prompt G (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per response (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed rollouts of each kind (default 3)")
    args = p.parse_args(argv)

    from benchmarks.bench_step import bench_tokenizer, compose_job, fit_model_to_tokenizer
    from common.distributed.spawn import spawn_ranks

    job = compose_job(args.model, "single", stage="rl_sapo", micro_batch_size=args.group_size)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = bench_tokenizer(tmp)
    cfg = fit_model_to_tokenizer(job, tokenizer)
    prompts = rollout_rows(tokenizer, cfg, args.groups, args.group_size, args.max_new_tokens, args.side,
                           args.frames).prompts
    out = spawn_ranks(bench_rank, 1, job, tokenizer, prompts, args.group_size, args.max_new_tokens,
                      args.repeats)[0]
    same = float((out[True]["ids"] == out[False]["ids"]).float().mean())
    if same < 1 and not torch.cuda.is_available():  # float32: the cache computes what recomputation does
        raise SystemExit(f"bench_rollout: the cached and the recomputed rollouts sampled different tokens "
                         f"({same:.1%} equal)")
    lengths = [int(q["input_ids"].numel()) for q in prompts]
    rows, longest, new = len(prompts) * args.group_size, max(lengths), args.max_new_tokens
    shared, copied = len(prompts) * longest + rows * new, rows * (longest + new)
    print(f"bench_rollout: {args.model}, {len(prompts)} prompts of {', '.join(map(str, lengths))} tokens x "
          f"G={args.group_size}, {new} new tokens per response")
    print(f"KV cache positions: {shared:,} (prompts once: {len(prompts)} x {longest} + {rows} rows x {new}); "
          f"a copy of the prompt per row: {copied:,} ({copied / shared:.2f}x)")
    for use_cache, name in ((True, "with the KV cache"), (False, "recomputed (no cache)")):
        r = out[use_cache]
        peak = f", peak {r['peak'] / 2**30:.2f} GiB" if r["peak"] is not None else ""
        print(f"{name:22s}: {r['time']:.3f} s (median of {r['runs']}), {rows * new / r['time']:,.0f} tokens/s{peak}")
    print(f"tokens equal to the recomputed rollout's: {same:.1%} (bf16 on CUDA may round a near tie apart)")
    print(f"recomputed/cached rollout time: {out[False]['time'] / out[True]['time']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
