"""Rollout time and KV-cache size: groups of text, image and video prompts, G responses each.

    python benchmarks/bench_rollout.py [--model tiny_moe] [--layers N] [--groups 3] [--group-size 8]
        [--max-new-tokens 64] [--side 224] [--frames 16] [--repeats 3]

One process, the trainer's model of ``stage=rl_sapo`` (random weights), the prompts of
``benchmarks/bench_rl_update.py`` (in turn a text, an image and a 16-frame video prompt), every response
sampled to ``--max-new-tokens`` tokens (no stop token). Times ``generate_rollouts`` with the KV cache
(each prompt's keys and values shared by its G rows, then each row's response; after a warm-up, the
median of ``--repeats``) and, as the reference in the same process, once without a cache (every step
recomputes every row); the two sample the same tokens up to near ties (rows may part where two tokens of
equal probability swap places under rounding: checked in float32, counted in bf16 on CUDA). Prints the
cache's positions against those of a cache of left-padded prompts and of one where every row holds its
own copy of its (left-padded) prompt, the time of each, and on CUDA the peak memory of each.
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

# Where the cached and the recomputed rollouts part, the two tokens' log-probs differ by at most this in
# float32: a near tie (see parted_rows); a larger gap means the cache computes something else.
TIE_LOGPROB = 1e-5


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
            ids, logprobs = rollouts.response_ids, rollouts.logprobs
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        out[use_cache] = {"time": statistics.median(times[1:]), "runs": len(times) - 1, "ids": ids,
                          "logprobs": logprobs, "peak": peak}
    return out


def parted_rows(ids: torch.Tensor, logprobs: torch.Tensor, other_ids: torch.Tensor,
                other_logprobs: torch.Tensor) -> list[tuple[int, int, float]]:
    """(row, first column where the two rollouts' tokens differ, |difference of the two tokens' log-probs|
    there) of every row that parts. Equal log-probs mean a near tie: two tokens of (nearly) the same
    probability swap places in the sampler's order under rounding, so the same uniform number draws the
    other one, and the rest of the row follows from that token."""
    parted = []
    for row in (ids != other_ids).any(dim=1).nonzero()[:, 0].tolist():
        col = int((ids[row] != other_ids[row]).nonzero()[0])
        parted.append((row, col, float((logprobs[row, col] - other_logprobs[row, col]).abs())))
    return parted


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

    job = compose_job(args.model, "single", stage="rl_sapo", micro_batch_size=args.group_size, layers=args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = bench_tokenizer(tmp)
    cfg = fit_model_to_tokenizer(job, tokenizer)
    prompts = rollout_rows(tokenizer, cfg, args.groups, args.group_size, args.max_new_tokens, args.side,
                           args.frames).prompts
    out = spawn_ranks(bench_rank, 1, job, tokenizer, prompts, args.group_size, args.max_new_tokens,
                      args.repeats)[0]
    cached, recomputed = out[True], out[False]
    same = float((cached["ids"] == recomputed["ids"]).float().mean())
    parted = parted_rows(cached["ids"], cached["logprobs"], recomputed["ids"], recomputed["logprobs"])
    gap = max((g for _, _, g in parted), default=0.0)
    if gap > TIE_LOGPROB and not torch.cuda.is_available():  # float32: the cache computes what recomputation does
        row, col, _ = max(parted, key=lambda p: p[2])
        raise SystemExit(f"bench_rollout: the cached and the recomputed rollouts part at row {row}, token {col}, "
                         f"with log-probs {gap:.2g} apart: not a near tie")
    lengths = [int(q["input_ids"].numel()) for q in prompts]
    rows, longest, new = len(prompts) * args.group_size, max(lengths), args.max_new_tokens
    shared, padded, copied = sum(lengths) + rows * new, len(prompts) * longest + rows * new, rows * (longest + new)
    layers = f" ({args.layers} decoder layers)" if args.layers else ""
    print(f"bench_rollout: {args.model}{layers}, {len(prompts)} prompts of {', '.join(map(str, lengths))} tokens x "
          f"G={args.group_size}, {new} new tokens per response")
    print(f"KV cache positions: {shared:,} (prompts once, unpadded: {sum(lengths)} + {rows} rows x {new}); prompts "
          f"left-padded: {padded:,} ({padded / shared:.2f}x); a copy of the prompt per row: {copied:,} "
          f"({copied / shared:.2f}x)")
    for use_cache, name in ((True, "with the KV cache"), (False, "recomputed (no cache)")):
        r = out[use_cache]
        peak = f", peak {r['peak'] / 2**30:.2f} GiB" if r["peak"] is not None else ""
        print(f"{name:22s}: {r['time']:.3f} s (median of {r['runs']}), {rows * new / r['time']:,.0f} tokens/s{peak}")
    print(f"tokens equal to the recomputed rollout's: {same:.1%}; rows that part: {len(parted)}, at near ties "
          f"(the two tokens' log-probs at most {gap:.1g} apart; rounding swaps tokens of equal probability)")
    print(f"recomputed/cached rollout time: {out[False]['time'] / out[True]['time']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
