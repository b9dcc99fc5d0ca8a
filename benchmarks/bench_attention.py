"""Peak memory and time of one forward + backward of the tiny Qwen3-VL at long sequence lengths:
the dense-mask attention path vs the document attention backend, and context parallelism 1 vs 2.

    python benchmarks/bench_attention.py [--lengths 4096 16384 32768] [--model tiny_dense]
                                         [--dense-limit-gb 6]

Each measurement runs in fresh processes (spawned ranks, gloo on CPU, NCCL on a GPU), so the peak is
that run's own: on CPU the growth of the process' peak resident memory (``ru_maxrss``) over the
forward + backward, on a GPU ``torch.cuda.max_memory_allocated``. Inputs are packed sequences of
text documents of 256 to 4,096 tokens (a fixed seed, the same mix at every length) and per-token
losses on every token. The dense path builds an ``s x s`` mask and ``heads x s x s`` scores, so it is
skipped where its estimate exceeds ``--dense-limit-gb``. Then the peak-memory ratio 32K/16K of the
document backend (goal <= 2.3: linear growth), the CP2 per-rank saving, and the same pack at the middle
length with ``--images`` images of 256 patches, CP1 vs CP2 (the CP ranks share the ViT's work).

Last, the load balance of context parallelism at 256K tokens (``--balance-length``), counted, not run:
the attention work of each CP rank (the causal (query, key) pairs of its queries) for packs of
different mixes, with the layout of :mod:`model.context_parallel` (each document cut into ``2 * cp``
chunks) and with a cut of the whole pack into ``2 * cp`` chunks; printed as the busiest rank's work over
the mean (1.00 = balanced: a step waits for its busiest rank), and the time to compute the layout.

On a GPU, first, the attention kernels alone (:func:`print_kernels`): one layer's forward + backward in
bf16 at the lengths up to 32K, one varlen flash call vs one SDPA per document, for long and for short
documents.
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


def _measure(rank: int, model_name: str, backend: str, seq: int, cp: int, images: int = 0) -> dict:
    from common.distributed.parallel import initialize_distributed
    from model.qwen3vl import build_qwen3vl
    from model.registry import get_config

    initialize_distributed({"cp": cp})
    cfg = get_config(model_name)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    # On a GPU as the trainer runs there: bf16 under Float16Module (the document backend's varlen flash call).
    # In float32 CUDA has no fused kernel for grouped-query heads: SDPA's math kernel would keep heads x n x n
    # probabilities per document and layer, gigabytes the training step never holds.
    model = build_qwen3vl(cfg, attention=backend, params_dtype=torch.bfloat16 if cuda else torch.float32)
    if cuda:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.text.vocab_size - 16, (1, seq), generator=g).to(device)
    documents = random_document_ids(seq).to(device)
    labels = torch.roll(tokens, -1, dims=1)
    media = {}
    if images:  # images of 16 x 16 patches (64 tokens each) at the start of the pack
        merged = 256 // cfg.vision.spatial_merge_size ** 2
        tokens[:, 8:8 + images * merged] = cfg.image_token_id
        media = {"position_ids": torch.arange(seq, device=device).expand(3, 1, seq),
                 "pixel_values": torch.randn(images * 256, cfg.vision.patch_dim, generator=g).to(device),
                 "image_grid_thw": torch.tensor([[1, 16, 16]] * images)}
    if cuda:  # a first pass loads the kernels; the measured one follows (on CPU the peak RSS cannot be reset)
        model(tokens, document_ids=documents, labels=labels, **media).sum().backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    start = time.perf_counter()
    losses = model(tokens, document_ids=documents, labels=labels, **media)
    losses.sum().backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _rss_mb()
    return {"seconds": time.perf_counter() - start, "peak_mb": peak - base}


def _rank_work(document_ids: torch.Tensor, positions: torch.Tensor) -> list[int]:
    """Causal (query, key) pairs of each rank's queries: ``positions`` [cp, S / cp] of one row."""
    from model.context_parallel import document_bounds

    starts, _ = document_bounds(document_ids)
    return [int((p - starts[p] + 1).sum()) for p in positions]


def balance_mixes(seq: int) -> dict[str, torch.Tensor]:
    """Packs of ``seq`` tokens (document ids [seq]): the mixes the balance table compares."""
    def pack(lengths):
        lengths = list(lengths)
        lengths.append(seq - sum(lengths))
        return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))

    quarter = seq // 4
    return {
        "documents of 256-4096 tokens": random_document_ids(seq)[0],
        "one document": torch.zeros(seq, dtype=torch.long),
        "3/4 one document, then 1K ones": pack([3 * quarter] + [1024] * (quarter // 1024 - 1)),
        "1K ones, then 3/4 one document": pack([1024] * (quarter // 1024) + [3 * quarter - 1]) ,
        "a half, a quarter, 2K ones": pack([2 * quarter, quarter] + [2048] * (quarter // 2048 - 1)),
    }


def print_balance(seq: int, cps: list[int]) -> None:
    from model.context_parallel import rank_positions

    print(f"\ncontext-parallel load balance at {seq:,} tokens: busiest rank's attention work / mean")
    print(f"{'pack':<34}{'cp':>4}{'per document':>14}{'whole pack':>12}{'layout s':>10}")
    for name, ids in balance_mixes(seq).items():
        for cp in cps:
            start = time.perf_counter()
            per_document = rank_positions(ids, seq, cp)
            seconds = time.perf_counter() - start
            ratios = []
            for positions in (per_document, rank_positions(None, seq, cp)):
                work = _rank_work(ids, positions)
                ratios.append(max(work) * len(work) / sum(work))
            print(f"{name:<34}{cp:>4}{ratios[0]:>14.2f}{ratios[1]:>12.2f}{seconds:>10.3f}")


def print_kernels(lengths: list[int], reps: int = 5) -> None:
    """CUDA only: one attention layer's forward + backward over a pack (Qwen3-VL-2B heads: 16 query, 8 key,
    128 dims; bf16) as one varlen flash call vs one SDPA per document (``model.attention.attend_packed``),
    for documents of 256-4,096 tokens and of 32-512 tokens (short SFT conversations); median ms."""
    from model import attention

    hq, hk, dim = 16, 8, 128
    scale = dim ** -0.5
    device = torch.device("cuda", torch.cuda.current_device())
    ready = attention.varlen_ready(device, torch.bfloat16, dim, hq, hk, scale)
    print(f"\nattention kernels, one layer forward + backward, bf16, {hq}/{hk} heads x {dim} "
          f"(varlen usable: {ready})")
    print(f"{'':8}{'tokens':>8}  {'documents':<22}{'per document ms':>16}{'varlen ms':>11}{'ratio':>7}")
    for seq in lengths:
        for shortest, longest in ((256, 4096), (32, 512)):
            ids = random_document_ids(seq, shortest, longest)
            plans = attention._plan(ids, 1, seq, True, 1, 0)
            q = torch.randn(seq, 1, hq, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.randn(seq, 1, hk, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(2))
            times, cache = {}, {}
            for varlen in (False, True) if ready else (False,):
                samples = []
                for i in range(reps + 2):  # two warm-up runs
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    out = attention.attend_packed(q, k, v, plans, None, True, scale, varlen=varlen, cache=cache)
                    out.backward(torch.ones_like(out))
                    torch.cuda.synchronize()
                    if i >= 2:
                        samples.append((time.perf_counter() - start) * 1e3)
                times[varlen] = sorted(samples)[len(samples) // 2]
            varlen_ms = f"{times[True]:>11.2f}{times[True] / times[False]:>7.2f}" if ready else f"{'-':>11}{'-':>7}"
            docs = f"{int(ids.max()) + 1} of {shortest}-{longest}"
            print(f"kernels {seq:>8}  {docs:<22}{times[False]:>16.2f}{varlen_ms}", flush=True)


def _dense_estimate_gb(cfg, seq: int) -> float:
    """Scores, probabilities and their gradients of one layer, float32, plus the boolean mask."""
    return (4 * cfg.text.num_attention_heads * seq * seq * 4 + seq * seq) / 2**30


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--model", default="tiny_dense")
    p.add_argument("--dense-limit-gb", type=float, default=6.0)
    p.add_argument("--images", type=int, default=64,
                   help="images of 256 patches in the pack of the ViT-sharing rows (at the middle length)")
    p.add_argument("--balance-length", type=int, default=262144)
    p.add_argument("--balance-cp", type=int, nargs="+", default=[2, 8])
    args = p.parse_args(argv)

    from common.distributed.spawn import spawn_ranks
    from model.registry import get_config

    cfg = get_config(args.model)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else None  # NCCL: one GPU per rank
    where = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else "CPU"
    if gpus:  # first: the figure that decides the GPU kernel (a part's time limit may cut the rest)
        print_kernels([n for n in args.lengths if n <= 32768])
    print(f"{args.model} on {where}{' in bf16 (Float16Module)' if gpus else ''}: one forward + backward, peak "
          "memory above the built model (per rank)")
    print(f"{'tokens':>8}  {'path':<18}{'peak MB':>10}{'seconds':>10}")
    document_peak: dict[int, float] = {}
    cp2_peak: dict[int, float] = {}
    for seq in args.lengths:
        runs = [("dense mask", "dense_mask", 1), ("document", "document", 1), ("document, cp2", "document", 2)]
        for name, backend, cp in runs:
            if backend == "dense_mask" and _dense_estimate_gb(cfg, seq) > args.dense_limit_gb:
                print(f"{seq:>8}  {name:<18}{'skipped':>10}  (needs ~{_dense_estimate_gb(cfg, seq):.0f} GB)")
                continue
            if gpus is not None and cp > gpus:
                print(f"{seq:>8}  {name:<18}{'skipped':>10}  (needs {cp} GPUs)")
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
    if args.images:
        # The ViT's work shared over the CP ranks, image by image: its activations per rank halve at cp2.
        seq = sorted(args.lengths)[len(args.lengths) // 2]
        with_images = {}
        for cp in (1, 2) if gpus is None or gpus >= 2 else (1,):
            results = spawn_ranks(_measure, cp, args.model, "document", seq, cp, args.images)
            with_images[cp] = max(r["peak_mb"] for r in results)
            name = f"+{args.images} images" + (", cp2" if cp == 2 else "")
            print(f"{seq:>8}  {name:<18}{with_images[cp]:>10.0f}{max(r['seconds'] for r in results):>10.2f}",
                  flush=True)
        shares = []
        for cp, peak in with_images.items():
            text_only = (cp2_peak if cp > 1 else document_peak).get(seq, 0)
            shares.append(f"cp{cp}{' per rank' if cp > 1 else ''} {peak - text_only:.0f} MB")
        print(f"images' share of the peak ({args.images} x 256 patches at {seq}): {', '.join(shares)}")
    print_balance(args.balance_length, args.balance_cp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
