"""Peak memory and time of one forward + backward of the tiny Qwen3-VL at long sequence lengths:
the dense-mask attention path vs the document attention backend, and context parallelism 1 vs 2.

    python benchmarks/bench_attention.py [--lengths 4096 16384 32768] [--model tiny_dense]
                                         [--dense-limit-gb 6]

Each measurement runs in fresh processes (spawned ranks, gloo on CPU, NCCL on a GPU), so the peak is
that run's own: on CPU the growth of the process' peak resident memory (``ru_maxrss``) over the
forward + backward, on a GPU ``torch.cuda.max_memory_allocated``. Inputs are packed sequences of
text documents of 256 to 4,096 tokens (a fixed seed, the same mix at every length) and per-token
losses on every token. The dense path builds an ``s x s`` mask and ``heads x s x s`` scores, so it is
skipped where its estimate exceeds ``--dense-limit-gb``. The last lines print the peak-memory ratio
32K/16K of the document backend (goal <= 2.3: linear growth) and the CP2 per-rank saving.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def random_document_ids(seq: int, shortest: int = 256, longest: int = 4096, seed: int = 0) -> torch.Tensor:
    """int64 [1, seq]: the document ids of a pack of documents of ``shortest``..``longest`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids, doc, pos = torch.empty(seq, dtype=torch.long), 0, 0
    while pos < seq:
        n = int(torch.randint(shortest, longest + 1, (1,), generator=g))
        ids[pos:pos + n] = doc
        pos, doc = pos + n, doc + 1
    return ids[None]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _measure(rank: int, model_name: str, backend: str, seq: int, cp: int) -> dict:
    from common.distributed.parallel import initialize_distributed
    from model.qwen3vl import build_qwen3vl
    from model.registry import get_config

    initialize_distributed({"cp": cp})
    cfg = get_config(model_name)
    torch.manual_seed(0)
    model = build_qwen3vl(cfg, attention=backend)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.text.vocab_size - 16, (1, seq), generator=g).to(device)
    documents = random_document_ids(seq).to(device)
    labels = torch.roll(tokens, -1, dims=1)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    start = time.perf_counter()
    losses = model(tokens, document_ids=documents, labels=labels)
    losses.sum().backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _rss_mb()
    return {"seconds": time.perf_counter() - start, "peak_mb": peak - base}


def _dense_estimate_gb(cfg, seq: int) -> float:
    """Scores, probabilities and their gradients of one layer, float32, plus the boolean mask."""
    return (4 * cfg.text.num_attention_heads * seq * seq * 4 + seq * seq) / 2**30


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--model", default="tiny_dense")
    p.add_argument("--dense-limit-gb", type=float, default=6.0)
    args = p.parse_args(argv)

    from common.distributed.spawn import spawn_ranks
    from model.registry import get_config

    cfg = get_config(args.model)
    print(f"{args.model}: one forward + backward, peak memory above the built model (per rank)")
    print(f"{'tokens':>8}  {'path':<18}{'peak MB':>10}{'seconds':>10}")
    document_peak: dict[int, float] = {}
    cp2_peak: dict[int, float] = {}
    for seq in args.lengths:
        runs = [("dense mask", "dense_mask", 1), ("document", "document", 1), ("document, cp2", "document", 2)]
        for name, backend, cp in runs:
            if backend == "dense_mask" and _dense_estimate_gb(cfg, seq) > args.dense_limit_gb:
                print(f"{seq:>8}  {name:<18}{'skipped':>10}  (needs ~{_dense_estimate_gb(cfg, seq):.0f} GB)")
                continue
            results = spawn_ranks(_measure, cp, args.model, backend, seq, cp)
            peak = max(r["peak_mb"] for r in results)
            seconds = max(r["seconds"] for r in results)
            print(f"{seq:>8}  {name:<18}{peak:>10.0f}{seconds:>10.2f}", flush=True)
            if backend == "document":
                (document_peak if cp == 1 else cp2_peak)[seq] = peak
    if 16384 in document_peak and 32768 in document_peak:
        print(f"document backend peak memory 32K/16K: {document_peak[32768] / document_peak[16384]:.2f} "
              "(goal <= 2.3)")
    for seq in sorted(set(document_peak) & set(cp2_peak)):
        print(f"cp2 per-rank peak / cp1 peak at {seq}: {cp2_peak[seq] / document_peak[seq]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
