"""``python -m pretrain.plan [--mfu 0.4] [--gpu H100] [--world-size N] [--visual-patches N]
[--document-length N] <overrides>``: the capacity plan of a training job.

Composes the job exactly as ``python -m pretrain.train`` does (same overrides, same validation) and
prints, per GPU: the memory terms of :func:`model.plan.plan_memory` (weights, gradients, optimizer
state, activations, logits + loss, working memory) in GB (1e9 bytes), the largest term, the total
against ``cluster.gpu_memory_gb``, and the step time at a given MFU from the FLOPs formula the trainer
uses for its MFU (:func:`pretrain.metrics.qwen3vl_train_flops`). ``python -m slurm.submit`` prints the
same plan and refuses a job that does not fit.

The arithmetic lives in :mod:`model.plan` (pure functions of the model config and the layout); this
command lives in ``pretrain/`` because it reads the job config, and imports point one way
(``pretrain -> model``), so ``model/`` cannot read ``pretrain``'s config.

Assumptions, printed with the plan: every packed sequence is full; it holds
``data.max_visual_patches_per_pack`` ViT patches, or, without that bound, as many as it can
(``seq_length * spatial_merge_size**2``: a sequence of images only) unless ``--visual-patches`` says
otherwise; for the FLOPs, one document per sequence unless ``--document-length`` says otherwise, and
images or frames of :data:`FRAME_PATCHES` patches. The world size is the cluster's (``nodes x
tasks_per_node``) for a SLURM cluster, else the layout's smallest.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Sequence

from common.distributed.parallel import ParallelConfig
from model.config import ConfigError as ModelConfigError
from model.config import Qwen3VLConfig
from model.plan import GB, MemoryPlan, ParameterCounts, Workload, parameter_counts, plan_memory
from pretrain.config import ConfigError, JobConfig, check_batch_layout, stage_total_steps
from pretrain.metrics import PEAK_BF16_FLOPS, qwen3vl_train_flops

FRAME_PATCHES = 1024  # ViT patches per image or video frame for the attention FLOPs (a 512 x 512 image)
DEFAULT_MFU = 0.4
DEFAULT_GPU = "H100"


@dataclass
class JobPlan:
    """The plan of one job: its memory per GPU, the step time and the assumptions behind them."""

    job: JobConfig
    world_size: int
    data_parallel_size: int
    workload: Workload
    memory: MemoryPlan
    params: ParameterCounts
    visual_patches_source: str
    document_length: int
    step_flops: float

    @property
    def gpu_memory_gb(self) -> float | None:
        return self.job.cluster.gpu_memory_gb

    @property
    def fits(self) -> bool | None:
        """Whether the peak fits ``cluster.gpu_memory_gb`` (None when the cluster does not say)."""
        return None if self.gpu_memory_gb is None else self.memory.total <= self.gpu_memory_gb * GB

    def step_seconds(self, mfu: float, gpu: str) -> float:
        return self.step_flops / (mfu * PEAK_BF16_FLOPS[gpu] * self.world_size)


def cluster_world_size(job: JobConfig) -> int:
    """Ranks of the job: nodes x tasks per node on a SLURM cluster, the layout's smallest world on
    ``cluster=local`` (where ``torchrun`` decides)."""
    cluster = job.cluster
    if cluster.name == "local":
        return job.parallel.min_world_size()
    tasks = cluster.tasks_per_node if cluster.tasks_per_node is not None else (cluster.gpus_per_node or 1)
    return cluster.nodes * tasks


def _bf16(job: JobConfig) -> bool:
    """``train.precision``; ``auto`` is bf16 except on a CPU-only SLURM cluster (``gpus_per_node: 0``)."""
    if job.train.precision != "auto":
        return job.train.precision == "bf16"
    return job.cluster.gpus_per_node > 0 or job.cluster.name == "local"


def plan_job(job: JobConfig, world_size: int | None = None, visual_patches: int | None = None,
             document_length: int | None = None) -> JobPlan:
    """The plan of ``job`` on ``world_size`` ranks (default :func:`cluster_world_size`); raises
    :class:`ConfigError` when the layout or the batch does not fit that world size."""
    try:
        cfg = Qwen3VLConfig.from_mapping(job.model)
    except ModelConfigError as exc:
        raise ConfigError(f"model: {exc}") from None
    world = world_size or cluster_world_size(job)
    try:
        dp = job.parallel.data_parallel_size(world)
    except ValueError as exc:
        raise ConfigError(f"{world} ranks do not fit the parallel layout: {exc}") from None
    micro_batches = check_batch_layout(job.train, dp)
    s = job.stage.seq_length
    most = s * cfg.vision.spatial_merge_size ** 2  # a sequence of visual tokens only
    if visual_patches is not None:
        patches, source = visual_patches, "--visual-patches"
    elif job.data.max_visual_patches_per_pack is not None:
        patches, source = min(job.data.max_visual_patches_per_pack, most), "data.max_visual_patches_per_pack"
    else:
        patches, source = most, "a sequence of images only: data.max_visual_patches_per_pack is not set"
    doc = min(document_length or s, s)
    recompute = job.stage.recompute
    work = Workload(
        seq_length=s, micro_batch_size=job.train.micro_batch_size, micro_batches=micro_batches,
        visual_patches=patches, bf16=_bf16(job), grad_reduce_in_fp32=True,  # the trainer's DDP setting
        distributed_optimizer=job.train.use_distributed_optimizer, recompute=recompute.granularity,
        recompute_method=recompute.method, recompute_num_layers=recompute.num_layers,
        trainable=tuple(job.stage.trainable))
    try:
        memory = plan_memory(cfg, job.parallel, world, work)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    sequences = job.train.global_batch_size
    pairs = sequences * (s // doc) * doc * (doc + 1) // 2 + sequences * (s % doc) * (s % doc + 1) // 2
    frame = min(FRAME_PATCHES, patches) if patches else 0
    flops = qwen3vl_train_flops(cfg, sequences * s, pairs, sequences * patches, sequences * patches * frame)
    return JobPlan(job, world, dp, work, memory, parameter_counts(cfg), source, doc, flops)


def _layout(parallel: ParallelConfig, dp: int) -> str:
    parts = [f"tp{parallel.tp}", f"pp{parallel.pp}"]
    if parallel.vpp:
        parts.append(f"vpp{parallel.vpp}")
    parts += [f"cp{parallel.cp}", f"ep{parallel.ep}"]
    if parallel.ep > 1 or parallel.etp is not None:
        parts.append(f"etp{parallel.expert_tp}")
    parts.append(f"dp{dp}")
    return " ".join(parts) + (" +sp" if parallel.sequence_parallel else "")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_plan(plan: JobPlan, mfu: float = DEFAULT_MFU, gpu: str = DEFAULT_GPU) -> str:
    """The plan as printed by ``pretrain.plan`` and ``slurm.submit``."""
    job, work, memory = plan.job, plan.workload, plan.memory
    cfg_name = job.model.get("name", "model")
    p = plan.params
    recompute = work.recompute or "none"
    if work.recompute == "full":
        recompute += f" ({work.recompute_method}, {work.recompute_num_layers} layer(s))"
    lines = [
        f"plan: {cfg_name} ({p.total / 1e9:.2f}B parameters, {p.active / 1e9:.2f}B active), stage "
        f"{job.stage.name}, {plan.world_size} GPUs as {_layout(job.parallel, plan.data_parallel_size)}",
        f"  per step: {job.train.global_batch_size} x {work.seq_length:,} tokens, {work.micro_batches} "
        f"micro-batch(es) of {work.micro_batch_size} per data-parallel rank; "
        f"{'bf16' if work.bf16 else 'fp32'}, recompute {recompute}, "
        f"{'distributed' if work.distributed_optimizer else 'replicated'} optimizer, trains "
        f"{'+'.join(work.trainable)}",
        f"  assumed: {work.visual_patches:,} ViT patches per sequence ({plan.visual_patches_source})",
        "",
        f"  {'term':<24}{'GB per GPU':>11}",
    ]
    for name, value in memory.terms.items():
        lines.append(f"  {name:<24}{value / GB:>11.1f}")
    where = f"pipeline stage {memory.stage + 1} of {job.parallel.pp}, " if job.parallel.pp > 1 else ""
    lines.append(f"  {'total':<24}{memory.total / GB:>11.1f}   ({where}peak at: {memory.phase})")
    name, value = memory.largest
    lines.append(f"  largest term: {name} ({value / GB:.1f} GB)")
    if plan.gpu_memory_gb is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"  GPU memory: {memory.total / GB:.1f} of {plan.gpu_memory_gb:g} GB "
                     f"(cluster.gpu_memory_gb of {job.cluster.name}): {verdict}")
    if work.bf16:
        seconds = plan.step_seconds(mfu, gpu)
        tokens = job.train.global_batch_size * work.seq_length
        steps = stage_total_steps(job)
        lines.append(f"  step time at {mfu:.0%} MFU on {gpu} ({PEAK_BF16_FLOPS[gpu] / 1e12:.0f} TFLOP/s bf16): "
                     f"{_duration(seconds)} ({tokens / seconds / plan.world_size:,.0f} tokens/s per GPU; one "
                     f"document of {plan.document_length:,} tokens per sequence); the stage's {steps:,} steps: "
                     f"{_duration(steps * seconds)}")
    if job.stage.kind == "distill":
        lines.append("  not counted: the frozen teacher (its weights in this layout, its logits per micro-batch): "
                     f"plan {job.stage.distill.teacher}'s model in this layout and add its weights")
    elif job.stage.kind == "rl":
        lines.append(f"  not counted: the rollouts' KV cache ({job.stage.rl.prompts_per_step} prompts x "
                     f"G={job.stage.rl.group_size} rows of prompt + {job.stage.rl.max_new_tokens} tokens over the "
                     "data-parallel ranks) and a reference policy's weights (GRPO with kl_coef > 0); the training "
                     "rows are taken as packed sequences of stage.seq_length")
    return "\n".join(lines)


def over_memory(plan: JobPlan) -> str:
    """Why ``plan`` does not fit its cluster's GPUs, in one line: the totals and the largest term."""
    name, value = plan.memory.largest
    return (f"stage {plan.job.stage.name}: the plan needs {plan.memory.total / GB:.1f} GB per GPU, more than "
            f"cluster.gpu_memory_gb={plan.gpu_memory_gb:g} (largest term: {name}, {value / GB:.1f} GB; "
            f"{plan.workload.visual_patches:,} ViT patches per sequence assumed)")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    from pretrain.cli import CONF_DIR

    parser = argparse.ArgumentParser(
        prog="python -m pretrain.plan",
        description="Memory per GPU and step time of a training job (the same overrides as pretrain.train).",
        epilog="Overrides use Hydra's grammar, as for pretrain.train: group=option (stage=s3_long_256k) or "
               "key=value (parallel.tp=2). Groups: " + ", ".join(sorted(p.name for p in CONF_DIR.iterdir()
                                                                      if p.is_dir())))
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help=f"model FLOPs utilisation for the step time (default {DEFAULT_MFU})")
    parser.add_argument("--gpu", choices=sorted(PEAK_BF16_FLOPS), default=DEFAULT_GPU,
                        help=f"GPU whose bf16 peak the MFU refers to (default {DEFAULT_GPU})")
    parser.add_argument("--world-size", type=int, help="ranks (default: the cluster's, or the layout's smallest)")
    parser.add_argument("--visual-patches", type=int,
                        help="ViT patches per packed sequence (default: data.max_visual_patches_per_pack, else "
                             "a sequence of images only)")
    parser.add_argument("--document-length", type=int,
                        help="tokens per document for the attention FLOPs (default: the whole sequence)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from pretrain.cli import load_job

    for flag in ("world_size", "visual_patches", "document_length"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "visual_patches" else 1):
            print(f"error: --{flag.replace('_', '-')} {value}: must be "
                  f"{'0 or more' if flag == 'visual_patches' else 'positive'}", file=sys.stderr)
            return 2
    if not 0 < args.mfu <= 1:
        print(f"error: --mfu {args.mfu}: must be in (0, 1]", file=sys.stderr)
        return 2
    try:
        _, job = load_job(args.overrides)
        plan = plan_job(job, args.world_size, args.visual_patches, args.document_length)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(plan, args.mfu, args.gpu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
