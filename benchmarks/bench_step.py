"""Time the real training step of a named Qwen3-VL config in a parallel layout: step time, tokens/s and,
on a GPU, the model FLOPs utilisation (MFU); on CPU also the same step in transformers, for comparison.

    python benchmarks/bench_step.py [--model tiny_moe] [--parallel single] [--layers N] [--seq-length 2048]
        [--micro-batch-size 1] [--micro-batches 1] [--steps 5] [--warmup 2] [--world N]
        [--image-side PX] [--hf auto|on|off] [--profile torch|cprofile] [hydra overrides ...]

``--model`` names ``conf/model/<name>.yaml`` and ``--parallel`` ``conf/parallel/<name>.yaml``; the job
is composed by Hydra exactly as ``pretrain.train`` composes it (``stage=s1_pretrain`` by default, so its
optimizer, trainable parts, loss normalisation and recomputation), and further ``key=value`` overrides
are passed on (``train.precision=fp32``, ``stage.recompute.granularity=full``, ...). ``--layers N`` sets
``model.text.num_hidden_layers`` (Qwen3-VL-2B widths with 4 decoder layers: ``--model qwen3vl_2b
--layers 4``).

What is timed is the trainer's step (``pretrain/trainer.py``): ``build_model_chunks`` (bf16 under
Megatron's ``Float16Module`` with fp32 main weights on GPU, fp32 on CPU), Megatron DDP and optimizer
(``pretrain.step.wrap_with_ddp`` / ``setup_optimizer``, distributed optimizer as configured), then per
step ``normalize_loss_weights`` and ``pretrain.step.train_step`` with ``pretrain.forward.qwen3vl_forward_step``
over ``--micro-batches`` micro-batches per data-parallel rank. The micro-batches come from the data
path (``SampleEncoder`` -> ``first_fit_decreasing`` -> ``pack_documents`` -> ``collate_micro_batch``,
with the stage's loss weights): several documents per packed row — text, image-caption pairs,
interleaved text with two images, videos with timestamps — with synthetic pixels (random images up to
``--image-side`` pixels a side, videos of 4 to 8 frames at half that side) and a small BPE tokenizer
trained here (the model keeps its configured vocabulary; its special token ids are the tokenizer's).

Ranks: without a launcher the script starts them itself (``common.distributed.spawn.spawn_ranks``: gloo
on CPU, one process per GPU with NCCL), ``--world`` of them (default: the layout's smallest world
size); under ``torchrun`` it runs as the launched rank. ``--warmup`` steps are run first and not timed.

Output: step time (median over the timed steps, with min and max), tokens/s (real, non-padding tokens
of the global batch, as the trainer logs them; also all positions), peak memory, and on a GPU the MFU
against ``pretrain.metrics.peak_flops_per_gpu`` with FLOPs counted by ``pretrain.metrics.qwen3vl_train_flops``
from the trainer's own per-step counts (the line says what is counted). With ``--hf on`` (default on
CPU) the same architecture is built in transformers (``cfg.to_hf()``, random weights, the same dtype,
eager attention unless ``--hf-attention sdpa``), and each micro-batch row is fed to it as one sequence
with the same tokens, positions and media (so its attention spans the whole row, not each document);
its step is forward + backward over the same micro-batches (with the MoE load-balancing loss, as ours),
gradient clipping as ours and ``torch.optim.AdamW``. The last line is then ``megatron/hf step ratio: X``
(median step times, ours / transformers; goal <= 1.0), after the ratio of the fastest steps.
``--profile`` prints the top costs of the timed steps of rank 0 and of the transformers run (``torch``:
torch.profiler operators; ``cprofile``: Python functions with file:line).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

WORDS = ("red green blue yellow purple orange pink white black gray circle square triangle star shape moves "
         "left right up down slowly quickly on a the in of background there is which way does and then "
         "small large bright dark picture video frame shows").split()
FLOPS_NOTE = ("model FLOPs = pretrain.metrics.qwen3vl_train_flops (the trainer's MFU): 3 x forward (backward "
              "= 2 x forward; a frozen part's weight gradients, and any gradient before the first trained "
              "part, not counted), 2 FLOPs per multiply-add of the decoder (the experts a token is routed "
              "to, attention projections, MLP, LM head) on real (non-padding) tokens and of the ViT layers, "
              "patch embedding and patch mergers on every patch, plus attention scores and values over the "
              "causal pairs of each packed document (not a row's padding tail) and the ViT's pairs inside "
              "each image or video frame group; norms and activation recomputation are not counted")


# ----------------------------------------------------------------------------------------------------
# The global batch: packed multimodal micro-batches from the data path


def bench_tokenizer(out_dir: str | Path, vocab_size: int = 512):
    """A small byte-level BPE (``common.tokens.tokenizer``) trained on the benchmark's word list."""
    import numpy as np

    from common.tokens.tokenizer import Tokenizer, train_byte_level_bpe

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 16)) for _ in range(400)]
    return Tokenizer.from_file(train_byte_level_bpe(texts, vocab_size, out_dir))


def synthetic_documents(tokenizer, min_tokens: int, max_doc_tokens: int, image_side: int, seed: int = 0):
    """Encoded documents (``pretrain.data.encoding.SampleEncoder``) totalling at least ``min_tokens``, each
    of at most ``max_doc_tokens``: in turn text, image-caption pairs, interleaved text with two images,
    and videos of 4 to 8 frames with a description. Images are random RGB pixels, sides multiples of
    32 pixels from 32 to ``image_side``; video frames at most half that side."""
    import numpy as np
    import PIL.Image

    from common.media.frame_sampling import VideoClip
    from common.media.resize import FACTOR
    from common.media.vision_inputs import VisionInputConfig
    from pretrain.data.encoding import EncodingConfig, SampleEncoder

    if image_side < 2 * FACTOR:
        raise ValueError(f"--image-side {image_side}: must be at least {2 * FACTOR} pixels")
    rng = np.random.default_rng(seed)
    video_side = image_side // 2
    vision = VisionInputConfig(image_min_pixels=FACTOR * FACTOR, image_max_pixels=image_side * image_side,
                               video_min_pixels=FACTOR * FACTOR, video_max_pixels=8 * video_side * video_side)
    encoder = SampleEncoder(tokenizer, EncodingConfig(vision=vision))

    def side(limit: int) -> int:
        return FACTOR * int(rng.integers(1, limit // FACTOR + 1))

    def image():
        return PIL.Image.fromarray(rng.integers(0, 256, (side(image_side), side(image_side), 3), dtype=np.uint8))

    def clip():
        frames = 2 * int(rng.integers(2, 5))
        pixels = rng.integers(0, 256, (frames, side(video_side), side(video_side), 3), dtype=np.uint8)
        return VideoClip(pixels, np.arange(frames) / 2.0)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))

    makers = (
        lambda: encoder.encode_text(text(20, 300)),
        lambda: encoder.encode_image_text(image(), text(5, 40)),
        lambda: encoder.encode_interleaved([text(10, 80), image(), text(10, 80), image(), text(5, 40)]),
        lambda: encoder.encode_video(clip(), text=text(5, 40)),
    )
    documents, total, tried = [], 0, 0
    while total < min_tokens:
        if tried > 100 + 10 * len(documents):
            raise ValueError(f"packed rows of {max_doc_tokens} tokens: too short for the synthetic documents "
                             f"(text of up to 300 words, images up to {image_side} pixels a side)")
        doc = makers[tried % len(makers)]()
        tried += 1
        if doc.num_tokens <= max_doc_tokens:
            documents.append(doc)
            total += doc.num_tokens
    return documents


def synthetic_global_batch(tokenizer, seq_length: int, micro_batch_size: int, num_micro_batches: int,
                           image_side: int, loss_normalization: str = "square_root", seed: int = 0) -> list[dict]:
    """``num_micro_batches`` micro-batches of ``micro_batch_size`` packed rows of ``seq_length`` tokens
    (``pretrain.data.micro_batch`` layout, without the dense mask, un-normalised loss weights). Each row
    is the fullest first-fit-decreasing pack of its own stream of :func:`synthetic_documents` (a little
    over ``seq_length`` tokens of every kind), so that every row holds documents of every kind."""
    from pretrain.data.loss_weights import token_loss_weights
    from pretrain.data.micro_batch import collate_micro_batch
    from pretrain.data.packing import first_fit_decreasing, pack_documents

    packs = []
    for row in range(micro_batch_size * num_micro_batches):
        documents = synthetic_documents(tokenizer, seq_length + seq_length // 8, seq_length, image_side,
                                        seed=seed * 1_000_003 + row)
        bins = first_fit_decreasing([d.num_tokens for d in documents], [0] * len(documents), seq_length)
        fullest = max(bins, key=lambda b: sum(documents[i].num_tokens for i in b))
        packs.append(pack_documents([documents[i] for i in fullest], seq_length, tokenizer.pad_id))
    batches = []
    for m in range(num_micro_batches):
        batch = collate_micro_batch(packs[m * micro_batch_size:(m + 1) * micro_batch_size])
        batch["loss_weights"] = token_loss_weights(batch["loss_mask"], batch["document_ids"], loss_normalization)
        batches.append(batch)
    return batches


def describe_batch(micro_batches: list[dict]) -> str:
    """One line: rows, positions, real tokens, documents by kind, media and ViT patches."""
    rows = sum(b["tokens"].shape[0] for b in micro_batches)
    seq = micro_batches[0]["tokens"].shape[1]
    real = sum(b["num_real_tokens"] for b in micro_batches)
    kinds: dict[str, int] = {}
    for b in micro_batches:
        for kind, n in b["documents_per_kind"].items():
            kinds[kind] = kinds.get(kind, 0) + n
    images = sum(int(b["image_grid_thw"].shape[0]) for b in micro_batches)
    videos = sum(int(b["video_grid_thw"].shape[0]) for b in micro_batches)
    patches = sum(b["num_visual_patches"] for b in micro_batches)
    return (f"{rows} packed row(s) x {seq} tokens = {rows * seq:,} positions, {real:,} real tokens, "
            f"{sum(kinds.values())} documents ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}), "
            f"{images} images + {videos} videos = {patches:,} ViT patches")


# ----------------------------------------------------------------------------------------------------
# Timing helpers


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _Profile:
    """Profiles the timed steps (``torch`` or ``cprofile``); ``report()`` is the top-costs text."""

    def __init__(self, kind: str | None, rows: int = 25):
        self.kind, self.rows, self.profiler = kind, rows, None

    def __enter__(self):
        if self.kind == "torch":
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()
        elif self.kind == "cprofile":
            import cProfile

            self.profiler = cProfile.Profile()
            self.profiler.enable()
        return self

    def __exit__(self, *exc):
        if self.kind == "torch":
            self.profiler.__exit__(*exc)
        elif self.kind == "cprofile":
            self.profiler.disable()

    def report(self) -> str | None:
        if self.kind == "torch":
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            return self.profiler.key_averages().table(sort_by=sort, row_limit=self.rows)
        if self.kind == "cprofile":
            import io
            import pstats

            out = io.StringIO()
            stats = pstats.Stats(self.profiler, stream=out)  # full paths: file:line of each function
            stats.sort_stats("tottime").print_stats(self.rows)
            stats.sort_stats("cumulative").print_stats(self.rows)
            return out.getvalue()
        return None


# ----------------------------------------------------------------------------------------------------
# Our step (one rank)


def training_step(model, optimizer, micro_batches: list[dict]):
    """One trainer step on this rank's ``micro_batches``: the loss weights normalised over the step
    (``pretrain.trainer.normalize_loss_weights``), then ``pretrain.step.train_step``; the
    :class:`pretrain.step.StepResult`, after the device has finished."""
    from pretrain.forward import qwen3vl_forward_step
    from pretrain.step import train_step
    from pretrain.trainer import normalize_loss_weights

    batches = [dict(b) for b in micro_batches]
    normalize_loss_weights(batches)
    iterators = [iter(batches) for _ in model] if len(model) > 1 else iter(batches)
    shape = batches[0]["tokens"].shape
    result = train_step(model, optimizer, qwen3vl_forward_step, iterators, len(batches), int(shape[1]),
                        int(shape[0]))
    _sync()
    return result


def megatron_rank(rank: int, job, micro_batches: list[dict], warmup: int, steps: int, profile: str | None) -> dict:
    """Build the trainer's model and optimizer for ``job`` on this rank and time ``steps`` training steps
    after ``warmup``; ``micro_batches`` is the global batch (this rank takes its data-parallel share)."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_attr_wrapped_model

    from common.distributed.parallel import initialize_distributed
    from pretrain.trainer import build_training, training_dtype

    info = initialize_distributed(job.parallel, seed=job.train.seed)
    dtype = training_dtype(job)
    chunks, model, optimizer = build_training(job, dtype)

    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = len(micro_batches) // dp_size
    mine = micro_batches[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    def step():
        return training_step(model, optimizer, mine)

    losses, seconds = [], []
    for _ in range(warmup):
        losses.append(step().loss)
    with _Profile(profile if rank == 0 else None) as prof:
        for _ in range(steps):
            start = time.perf_counter()
            result = step()
            seconds.append(time.perf_counter() - start)
            losses.append(result.loss)
    return {
        "seconds": seconds, "losses": losses, "peak_mb": _peak_memory_mb(), "world_size": info.world_size,
        "dp": dp_size, "dtype": str(dtype).replace("torch.", ""),
        "attention": get_attr_wrapped_model(model[0], "attention"),
        "local_params": sum(p.numel() for c in chunks for p in c.parameters()),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "profile": prof.report(),
    }


# ----------------------------------------------------------------------------------------------------
# The same step in transformers (one process)


def hf_labels(batch: dict) -> torch.Tensor:
    """Our next-token targets in transformers' convention (labels aligned with the inputs, shifted inside
    the model): the target predicted at position i sits at i + 1; -100 where there is none."""
    labels = torch.full_like(batch["labels"], -100)
    labels[:, 1:] = torch.where(batch["loss_mask"][:, :-1] > 0, batch["labels"][:, :-1], -100)
    return labels


def hf_rank(rank: int, hf_config: dict, micro_batches: list[dict], dtype_name: str, lr: float, clip_grad: float,
            warmup: int, steps: int, profile: str | None, attention: str = "eager") -> dict:
    """Time ``steps`` transformers steps (after ``warmup``) over every micro-batch of the global batch."""
    import transformers

    dtype = getattr(torch, dtype_name)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    config = dict(hf_config)
    config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    moe = config.model_type == "qwen3_vl_moe"
    cls = transformers.Qwen3VLMoeForConditionalGeneration if moe else transformers.Qwen3VLForConditionalGeneration
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation=attention, dtype=dtype).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    inputs = []
    for b in micro_batches:
        x = {"input_ids": b["tokens"], "position_ids": b["position_ids"], "mm_token_type_ids": b["mm_token_type_ids"],
             "labels": hf_labels(b)}
        for key, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            if b[grid].shape[0]:
                x[key], x[grid] = b[key].to(dtype), b[grid]
        if moe:
            x["output_router_logits"] = True  # the load-balancing loss, as ours has
        inputs.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in x.items()})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for x in inputs:
            loss = model(**x).loss / len(inputs)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        _sync()
        return total

    losses, seconds = [], []
    for _ in range(warmup):
        losses.append(step())
    with _Profile(profile) as prof:
        for _ in range(steps):
            start = time.perf_counter()
            losses.append(step())
            seconds.append(time.perf_counter() - start)
    return {"seconds": seconds, "losses": losses, "peak_mb": _peak_memory_mb(), "version": transformers.__version__,
            "params": sum(p.numel() for p in model.parameters()), "profile": prof.report()}


# ----------------------------------------------------------------------------------------------------
# Command line


def rows_tokens(micro_batches: list[dict]) -> int:
    """Positions of the global batch, padding included."""
    return sum(int(b["tokens"].numel()) for b in micro_batches)


def _summary(seconds: list[float]) -> str:
    return f"{statistics.median(seconds):.3f} s (min {min(seconds):.3f}, max {max(seconds):.3f})"


def compose_job(model: str, parallel: str = "single", stage: str = "s1_pretrain", seq_length: int = 2048,
                micro_batch_size: int = 1, layers: int | None = None, overrides: list[str] = ()):
    """The :class:`pretrain.config.JobConfig` that ``pretrain.train`` would compose for these choices
    (``ConfigError`` naming the bad key otherwise)."""
    from pretrain.cli import load_job

    choices = [f"model={model}", f"parallel={parallel}", f"stage={stage}", f"stage.seq_length={seq_length}",
               f"train.micro_batch_size={micro_batch_size}"]
    if layers is not None:
        choices.append(f"model.text.num_hidden_layers={layers}")
    return load_job(choices + list(overrides))[1]


def fit_model_to_tokenizer(job, tokenizer):
    """Give ``job.model`` the tokenizer's special token ids (in place; the vocabulary, hence the model's
    size, stays as configured) and return it as a checked :class:`model.config.Qwen3VLConfig`."""
    from model.config import Qwen3VLConfig
    from pretrain.trainer import check_tokenizer_matches_model

    job.model.update(image_token_id=tokenizer.image_pad_id, video_token_id=tokenizer.video_pad_id,
                     vision_start_token_id=tokenizer.vision_start_id, vision_end_token_id=tokenizer.vision_end_id)
    cfg = Qwen3VLConfig.from_mapping(job.model)
    check_tokenizer_matches_model(tokenizer, cfg, "of the benchmark")
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny_moe", help="a conf/model name (default tiny_moe)")
    p.add_argument("--parallel", default="single", help="a conf/parallel name (default single)")
    p.add_argument("--stage", default="s1_pretrain", help="a conf/stage name (optimizer, loss weights, recompute)")
    p.add_argument("--layers", type=int, help="decoder layers (model.text.num_hidden_layers)")
    p.add_argument("--seq-length", type=int, default=2048, help="tokens per packed row (default 2048)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="packed rows per micro-batch (default 1)")
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step and data-parallel rank")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--world", type=int, help="ranks to start (default: the layout's smallest world size)")
    p.add_argument("--image-side", type=int, help="largest image side in pixels (default 128 on CPU, 512 on GPU)")
    p.add_argument("--hf", choices=["auto", "on", "off"], default="auto",
                   help="also time transformers (auto: on CPU without a launcher)")
    p.add_argument("--hf-attention", choices=["eager", "sdpa"], default="eager",
                   help="transformers' attention implementation (default eager)")
    p.add_argument("--profile", choices=["torch", "cprofile"], help="print the top costs of the timed steps")
    p.add_argument("overrides", nargs="*", help="more Hydra overrides (key=value)")
    args = p.parse_args(argv)
    for name in ("seq_length", "micro_batch_size", "micro_batches", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")

    from common.distributed.spawn import spawn_ranks, user_error_message
    from pretrain.config import ConfigError
    from pretrain.metrics import peak_flops_per_gpu, qwen3vl_train_flops
    from pretrain.trainer import step_counts

    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    rank = int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available()
    try:
        job = compose_job(args.model, args.parallel, args.stage, args.seq_length, args.micro_batch_size,
                          args.layers, args.overrides)
        world = int(os.environ["WORLD_SIZE"]) if launched else (args.world or job.parallel.min_world_size())
        dp = job.parallel.data_parallel_size(world)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = bench_tokenizer(tmp)
        cfg = fit_model_to_tokenizer(job, tokenizer)
        micro_batches = synthetic_global_batch(
            tokenizer, args.seq_length, args.micro_batch_size, args.micro_batches * dp,
            args.image_side or (512 if cuda else 128), job.stage.loss_normalization)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    hf = args.hf == "on" or (args.hf == "auto" and not cuda and not launched)
    t, v = cfg.text, cfg.vision
    if rank == 0:
        experts = f", {t.num_experts} experts top-{t.num_experts_per_tok}" if cfg.is_moe else ""
        print(f"bench_step: {args.model} ({t.num_hidden_layers} decoder layers of width {t.hidden_size}{experts}, "
              f"ViT {v.depth} x {v.hidden_size}, vocabulary {t.vocab_size:,}), stage {args.stage}")
        par = job.parallel
        print(f"layout {args.parallel}: {world} rank(s), tp={par.tp} pp={par.pp} vpp={par.vpp} ep={par.ep} "
              f"etp={par.expert_tp} cp={par.cp} sequence_parallel={par.sequence_parallel} dp={dp}")
        print(f"global batch per step: {describe_batch(micro_batches)}")
        print(f"{args.warmup} warm-up step(s), {args.steps} timed", flush=True)

    try:
        if launched:
            ours = megatron_rank(rank, job, micro_batches, args.warmup, args.steps, args.profile)
        else:
            ours = spawn_ranks(megatron_rank, world, job, micro_batches, args.warmup, args.steps, args.profile)[0]
    except Exception as exc:
        message = user_error_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0

    counts = step_counts(micro_batches)
    step_s = statistics.median(ours["seconds"])
    where = ours["device"] if cuda else f"cpu, {os.cpu_count()} cores"
    print(f"megatron ({ours['dtype']}, attention {ours['attention']}, {where}): step {_summary(ours['seconds'])}, "
          f"{counts['tokens'] / step_s:,.0f} tokens/s real ({rows_tokens(micro_batches) / step_s:,.0f} with "
          f"padding), loss {ours['losses'][0]:.4f} -> {ours['losses'][-1]:.4f}, peak memory rank 0 "
          f"{ours['peak_mb']:,.0f} MB, {ours['local_params']:,} parameters on rank 0")
    flops = qwen3vl_train_flops(cfg, counts["tokens"], counts["pairs"], counts["patches"], counts["vision_pairs"],
                                job.stage.trainable)
    peak = peak_flops_per_gpu()
    if peak is not None:
        # Three significant digits, not a fixed decimal: a tiny model's MFU (0.01 %) must not print as 0.0 %.
        print(f"MFU: {100 * flops / step_s / (peak * world):.3g}% ({flops / step_s / world / 1e12:.3g} TFLOP/s "
              f"per GPU of {peak / 1e12:.0f} bf16 peak; {flops / 1e12:.2f} TFLOP per step)")
    elif cuda:
        print(f"MFU: unknown bf16 peak for {ours['device']} (pretrain.metrics.PEAK_BF16_FLOPS); "
              f"{flops / step_s / world / 1e12:.1f} TFLOP/s per GPU")
    else:
        print(f"MFU: n/a on CPU; {flops / 1e9:.2f} GFLOP per step = {flops / step_s / 1e9:.1f} GFLOP/s")
    print(f"FLOPs: {FLOPS_NOTE}")
    if ours["profile"]:
        print(f"--- profile, megatron rank 0 ({args.profile}) ---\n{ours['profile']}")

    if hf:
        opt = job.stage.optimizer
        hf_out = spawn_ranks(hf_rank, 1, cfg.to_hf(), micro_batches, ours["dtype"], opt.lr, opt.clip_grad,
                             args.warmup, args.steps, args.profile, args.hf_attention)[0]
        hf_s = statistics.median(hf_out["seconds"])
        print(f"transformers {hf_out['version']} ({args.hf_attention}, {ours['dtype']}): step "
              f"{_summary(hf_out['seconds'])}, {counts['tokens'] / hf_s:,.0f} tokens/s real, loss {hf_out['losses'][0]:.4f} -> "
              f"{hf_out['losses'][-1]:.4f}, peak memory {hf_out['peak_mb']:,.0f} MB, {hf_out['params']:,} parameters")
        if hf_out["profile"]:
            print(f"--- profile, transformers ({args.profile}) ---\n{hf_out['profile']}")
        # Medians are the figure; the fastest steps show how much of a gap is noise (a busy machine).
        print(f"fastest steps: megatron {min(ours['seconds']):.3f} s, transformers {min(hf_out['seconds']):.3f} s, "
              f"ratio {min(ours['seconds']) / min(hf_out['seconds']):.2f}")
        print(f"megatron/hf step ratio: {step_s / hf_s:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
