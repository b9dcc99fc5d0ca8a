"""Benchmark of the training data pipeline: packing fill, samples/s and tokens/s with 0, 1, 2 workers,
and the ratio to what a training step of the demo model consumes.

    python benchmarks/bench_loader.py [--data DIR --tokenizer DIR] [--seq-length 512] [--workers 0,1,2]

Without ``--data`` it makes the demo's data the way ``make demo`` does (``python -m data_tools synth``,
the four ``build-*`` commands and ``train-tokenizer``) in a temporary folder. The blend is the one of
the stage (``--stage``, default s1_pretrain: image-text, interleaved, video and SFT) over
``conf/data/synth.yaml``'s settings. For each worker count the loader is built fresh, warmed up (the
first micro-batches wait for the packing buffers to fill) and timed over ``--batches`` micro-batches:

* fill: real (non-padding) tokens / tokens of the packed sequences (goal >= 98.5% per buffer, ~99% on average);
* samples/s (documents packed), tokens/s (real tokens) of one data-parallel rank;
* consumption: real tokens/s of a training step (forward, backward, AdamW) of the demo model
  (``--model``, default tiny_moe) on those same micro-batches, one process, one thread (the demo runs
  one rank per core), and the ratio loader tokens/s / step tokens/s (goal >= 2x).

Every process here runs torch single-threaded, as the demo does (``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KINDS = {kind: "build-" + kind.replace("_", "-") for kind in ("image_text", "interleaved", "video", "sft")}


def make_demo_data(out: Path) -> tuple[Path, Path]:
    """Synthetic corpus -> the four shard sets and a 2048-id BPE tokenizer, with the data_tools commands."""
    from data_tools.__main__ import main as data_tools

    corpus = out / "corpus"
    steps = [["synth", "--out", str(corpus)]]
    steps += [[command, "--manifest", str(corpus / f"{kind}.jsonl"), "--out", str(out / "shards" / kind),
               "--workers", "2"] for kind, command in KINDS.items()]
    steps.append(["train-tokenizer", *[a for kind in KINDS for a in ("--manifest", str(corpus / f"{kind}.jsonl"))],
                  "--vocab-size", "2048", "--out", str(out / "tokenizer")])
    for argv in steps:
        print(f"$ python -m data_tools {' '.join(argv)}", flush=True)
        if data_tools(argv):
            raise SystemExit(f"data_tools {argv[0]} failed")
    return out / "shards", out / "tokenizer"


def data_section(shards: Path, packing_buffer_size: int | None):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "data" / "synth.yaml")
    cfg.root = str(shards)
    data = OmegaConf.to_container(OmegaConf.create({"data": cfg}), resolve=True)["data"]  # ${data.root}
    if packing_buffer_size is not None:
        data["packing_buffer_size"] = packing_buffer_size
    return data


def measure_loader(data, stage, tokenizer, args, workers: int) -> dict:
    """Throughput and fill of one loader configuration; keeps the timed micro-batches."""
    from pretrain.data.loader import build_train_loader

    loader = build_train_loader(
        data, stage, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, dp_rank=0, dp_size=1,
        seed=1234, tokenizer=tokenizer, num_workers=workers,
    )
    started = time.perf_counter()
    for _ in range(args.warmup * max(1, workers)):
        next(loader)
    warmup_s = time.perf_counter() - started
    batches, documents, real, total = [], 0, 0, 0
    started = time.perf_counter()
    for _ in range(args.batches):
        batch = next(loader)
        batches.append(batch)
        documents += batch["num_documents"]
        real += batch["num_real_tokens"]
        total += batch["tokens"].numel()
    seconds = time.perf_counter() - started
    loader.close()
    return {
        "workers": workers, "seconds": seconds, "warmup_s": warmup_s, "batches": batches,
        "samples_per_s": documents / seconds, "tokens_per_s": real / seconds, "fill": real / total,
        "skipped": batches[-1]["samples_skipped_total"],
    }


def measure_step(batches, tokenizer, model_name: str, steps: int) -> float:
    """Real tokens/s of forward + backward + AdamW of the demo model on ``batches`` (one process)."""
    import torch

    from model.qwen3vl import build_qwen3vl
    from model.registry import get_config
    from common.distributed.parallel import initialize_distributed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    initialize_distributed({})
    cfg = get_config(model_name)
    # The demo model is used with the demo tokenizer: its special ids and vocabulary.
    vocab = max(cfg.text.vocab_size, tokenizer.vocab_size)
    cfg = dataclasses.replace(
        cfg, text=dataclasses.replace(cfg.text, vocab_size=vocab),
        image_token_id=tokenizer.image_pad_id, video_token_id=tokenizer.video_pad_id,
        vision_start_token_id=tokenizer.vision_start_id, vision_end_token_id=tokenizer.vision_end_id,
    )
    torch.manual_seed(0)
    model = build_qwen3vl(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def media(batch, pixels, grid):
        # The model takes None for "no images" (it rejects an empty grid).
        return (batch[pixels], batch[grid]) if batch[grid].shape[0] else (None, None)

    def step(batch):
        pixel_values, image_grid_thw = media(batch, "pixel_values", "image_grid_thw")
        pixel_values_videos, video_grid_thw = media(batch, "pixel_values_videos", "video_grid_thw")
        losses = model(batch["tokens"], batch["position_ids"], document_ids=batch["document_ids"],
                       labels=batch["labels"], pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                       pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)
        weights = batch["loss_weights"]
        loss = (losses * weights).sum() / weights.sum().clamp(min=1e-6)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(batches[0])  # warm-up
    timed = batches[1 : 1 + steps]
    started = time.perf_counter()
    for batch in timed:
        step(batch)
    seconds = time.perf_counter() - started
    return sum(b["num_real_tokens"] for b in timed) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="folder holding the built sets image_text/, interleaved/, video/, sft/")
    parser.add_argument("--tokenizer", help="tokenizer directory or 'qwen' (required with --data)")
    parser.add_argument("--stage", default="s1_pretrain", help="stage whose data_weights and loss normalisation to use")
    parser.add_argument("--seq-length", type=int, default=512, help="tokens per packed sequence (demo S1: 512)")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--packing-buffer-size", type=int, default=None, help="default: conf/data/synth.yaml")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--batches", type=int, default=100, help="timed micro-batches per worker count")
    parser.add_argument("--warmup", type=int, default=2, help="untimed micro-batches per worker first")
    parser.add_argument("--model", default="tiny_moe", help="model config of the step-consumption measurement")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps")
    args = parser.parse_args(argv)
    if bool(args.data) != bool(args.tokenizer):
        parser.error("--data and --tokenizer go together")

    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    from omegaconf import OmegaConf
    from rich.console import Console
    from rich.table import Table

    from common.tokens.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        if args.data:
            shards, tokenizer_dir = Path(args.data), args.tokenizer
        else:
            shards, tokenizer_dir = make_demo_data(Path(tmp))
        tokenizer = load_tokenizer(tokenizer_dir)
        data = data_section(shards, args.packing_buffer_size)
        stage = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "stage" / f"{args.stage}.yaml"))
        results = []
        for workers in (int(w) for w in args.workers.split(",")):
            console.print(f"loader with {workers} worker(s) ...")
            results.append(measure_loader(data, stage, tokenizer, args, workers))
        console.print(f"training step of {args.model} ...")
        consumption = measure_step(results[0]["batches"], tokenizer, args.model, args.steps)

    table = Table(title=f"data pipeline, {args.stage} blend, {args.seq_length} tokens x {args.micro_batch_size} "
                        f"per micro-batch, buffer {data['packing_buffer_size']}")
    for column in ("workers", "fill", "samples/s", "tokens/s", "x step", "warm-up s", "skipped"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(str(r["workers"]), f"{100 * r['fill']:.2f}%", f"{r['samples_per_s']:.1f}",
                      f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / consumption:.1f}x", f"{r['warmup_s']:.1f}",
                      str(r["skipped"]))
    console.print(table)
    fill = min(r["fill"] for r in results)
    best = max(r["tokens_per_s"] for r in results)
    console.print(f"training step consumption ({args.model}, 1 process, 1 thread): {consumption:.0f} tokens/s")
    console.print(f"fill: {100 * fill:.2f}% (goal >= 98.5%: {'met' if fill >= 0.985 else 'NOT met'})")
    console.print(f"loader / step: {best / consumption:.1f}x at best (goal >= 2x: "
                  f"{'met' if best >= 2 * consumption else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
