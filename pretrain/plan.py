"""``python -m pretrain.plan [--mfu 0.4] [--gpu H100] [--world-size N] [--visual-patches N]
[--document-length N] [--prompt-tokens N] <overrides>``: the capacity plan of a training job.

Composes the job exactly as ``python -m pretrain.train`` does (same overrides, same validation) and
prints, per GPU: the memory terms of :func:`model.plan.plan_memory` (weights, gradients, optimizer
state, activations, logits + loss, working memory) in GB (1e9 bytes), the largest term, the total
against ``cluster.gpu_memory_gb``, and the step time at a given MFU from the FLOPs formula the trainer
uses for its MFU (:func:`pretrain.metrics.training_step_flops`). ``python -m slurm.submit`` prints the
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

Post-training stages (see :mod:`model.plan` for their terms):

* ``stage.kind: rl``: the rank's ``stage.rl.prompts_per_step / dp`` prompts in one rollout batch, every
  response running to ``stage.rl.max_new_tokens`` and no group filtered (the most rows and the longest
  rows a step can have); a prompt of ``--prompt-tokens`` text tokens (default
  :data:`DEFAULT_PROMPT_TOKENS`) and ``--visual-patches`` ViT patches, or ``data.max_visual_patches_per_pack``,
  or one image of ``data.image_max_pixels`` pixels; the policy update on rows of prompt + response
  (``stage.seq_length`` is not used by RL), ``train.micro_batch_size`` rows per micro-batch; GRPO with
  ``kl_coef > 0`` holds a reference policy (the policy's architecture). The step time is that of the
  log-prob passes and the updates; the rollouts' decoding is bound by memory bandwidth, not FLOPs, and
  is not estimated.
* ``stage.kind: distill``: the teacher's architecture from its checkpoint's run config
  (``stage.distill.teacher``); without a readable checkpoint the teacher is not counted (said so).
* ``stage.kind: distill_on_policy``: the RL plan's rollouts (no old-policy or reference pass in its
  FLOPs) with the teacher: each pipeline stage's peak is the larger of the RL moments plus the teacher's
  weights, and the update counted as a distillation update over the same rows (teacher weights, its
  hidden states kept for every micro-batch, its forward, and both models' logits with the KL counted at
  every position of a row, where the loss takes only the response tokens': an upper bound). When the
  largest stage's breakdown is not one these plans give, it is refused as not planned.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from typing import Sequence

from common.distributed.parallel import ParallelConfig
from model.config import ConfigError as ModelConfigError
from model.config import Qwen3VLConfig
from model.plan import (FROZEN_WEIGHTS, GB, FrozenModel, MemoryPlan, ParameterCounts, Rollout, Workload,
                        parameter_counts, plan_memory, stage_parameters)
from pretrain.config import ConfigError, JobConfig, check_batch_layout, stage_total_steps
from pretrain.metrics import PEAK_BF16_FLOPS, qwen3vl_train_flops, training_step_flops

FRAME_PATCHES = 1024  # ViT patches per image or video frame for the attention FLOPs (a 512 x 512 image)
DEFAULT_MFU = 0.4
DEFAULT_GPU = "H100"
DEFAULT_PROMPT_TOKENS = 512  # text tokens of an RL prompt (chat template, question), its visual tokens apart


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
    rollout: Rollout | None = None  # RL: the rank's rollout batch
    frozen: FrozenModel | None = None  # RL reference policy or distillation teacher
    uncounted: str | None = None  # what the plan could not count, in words
    prompt_text_tokens: int = 0  # RL: text tokens of a prompt (its visual tokens apart)

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
             document_length: int | None = None, prompt_tokens: int | None = None) -> JobPlan:
    """The plan of ``job`` on ``world_size`` ranks (default :func:`cluster_world_size`); raises
    :class:`ConfigError` when the layout or the batch does not fit that world size. ``prompt_tokens``:
    text tokens of an RL prompt (default :data:`DEFAULT_PROMPT_TOKENS`)."""
    try:
        cfg = Qwen3VLConfig.from_mapping(job.model)
    except ModelConfigError as exc:
        raise ConfigError(f"model: {exc}") from None
    world = world_size or cluster_world_size(job)
    try:
        dp = job.parallel.data_parallel_size(world)
    except ValueError as exc:
        raise ConfigError(f"{world} ranks do not fit the parallel layout: {exc}") from None
    if job.stage.kind in ("rl", "distill_on_policy"):
        return _plan_rl(job, cfg, world, dp, visual_patches, prompt_tokens)
    micro_batches = check_batch_layout(job.train, dp, job.parallel.pp, job.parallel.vpp)
    s = job.stage.seq_length
    most = s * cfg.vision.spatial_merge_size ** 2  # a sequence of visual tokens only
    if visual_patches is not None:
        patches, source = visual_patches, "--visual-patches"
    elif job.data.max_visual_patches_per_pack is not None:
        patches, source = min(job.data.max_visual_patches_per_pack, most), "data.max_visual_patches_per_pack"
    else:
        patches, source = most, "a sequence of images only: data.max_visual_patches_per_pack is not set"
    doc = min(document_length or s, s)
    frozen, uncounted = None, None
    if job.stage.kind == "distill":
        frozen, why = _teacher(job)
        if frozen is None:
            uncounted = f"the frozen teacher's weights and activations ({why}); its logits are counted with the student's"
    work = Workload(
        seq_length=s, micro_batch_size=job.train.micro_batch_size, micro_batches=micro_batches,
        visual_patches=patches, loss="distill" if job.stage.kind == "distill" else "lm", **_training(job))
    memory = _plan_memory(cfg, job.parallel, world, work, frozen=frozen)
    sequences = job.train.global_batch_size
    pairs = sequences * (s // doc) * doc * (doc + 1) // 2 + sequences * (s % doc) * (s % doc + 1) // 2
    frame = min(FRAME_PATCHES, patches) if patches else 0
    flops = training_step_flops(cfg, sequences * s, pairs, sequences * patches, sequences * patches * frame,
                                job.stage.trainable, teacher=None if frozen is None else frozen.cfg)
    return JobPlan(job, world, dp, work, memory, parameter_counts(cfg), source, doc, flops, frozen=frozen,
                   uncounted=uncounted)


def _training(job: JobConfig) -> dict:
    """The Workload settings every stage kind takes from the job."""
    recompute = job.stage.recompute
    return dict(bf16=_bf16(job), grad_reduce_in_fp32=True,  # the trainer's DDP setting
                distributed_optimizer=job.train.use_distributed_optimizer, recompute=recompute.granularity,
                recompute_method=recompute.method, recompute_num_layers=recompute.num_layers,
                trainable=tuple(job.stage.trainable))


def _plan_memory(cfg: Qwen3VLConfig, parallel: ParallelConfig, world: int, work: Workload, **kwargs) -> MemoryPlan:
    try:
        return plan_memory(cfg, parallel, world, work, **kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _teacher(job: JobConfig) -> tuple[FrozenModel | None, str | None]:
    """The distillation teacher's architecture from its checkpoint's run config, or (None, why not)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from model.checkpoint_io import CheckpointError
    from pretrain.checkpoint import checkpoint_run_config

    teacher = job.stage.distill.teacher
    try:
        _, run_config = checkpoint_run_config(teacher, "stage.distill.teacher")
        return FrozenModel(Qwen3VLConfig.from_mapping(OmegaConf.to_container(run_config.model, resolve=True)),
                           "teacher"), None
    except (CheckpointError, ModelConfigError, OmegaConfBaseException, OSError, ValueError) as exc:
        return None, str(exc)


def _plan_rl(job: JobConfig, cfg: Qwen3VLConfig, world: int, dp: int, visual_patches: int | None,
             prompt_tokens: int | None) -> JobPlan:
    """An RL stage's plan: the rollouts, the old-policy log-probs and the policy updates of one RL step
    on the busiest data-parallel rank (every prompt kept, every response at ``max_new_tokens``)."""
    rl, mbs = job.stage.rl, job.train.micro_batch_size
    if rl.prompts_per_step % dp:
        raise ConfigError(f"stage.rl.prompts_per_step={rl.prompts_per_step} does not split over {dp} "
                          "data-parallel ranks")
    merge = cfg.vision.spatial_merge_size ** 2
    if visual_patches is not None:
        patches, source = visual_patches, "--visual-patches"
    elif job.data.max_visual_patches_per_pack is not None:
        patches, source = job.data.max_visual_patches_per_pack, "data.max_visual_patches_per_pack"
    else:
        patches = job.data.image_max_pixels // cfg.vision.patch_size ** 2 // merge * merge
        source = f"one image of data.image_max_pixels={job.data.image_max_pixels:,} pixels"
    text = DEFAULT_PROMPT_TOKENS if prompt_tokens is None else prompt_tokens
    prompt = text + patches // merge
    prompts, g = rl.prompts_per_step // dp, rl.group_size
    rollout = Rollout(prompts=prompts, group_size=g, prompt_tokens=prompt, max_new_tokens=rl.max_new_tokens,
                      visual_patches=patches)
    multiple = job.parallel.tp if job.parallel.sequence_parallel else 1  # rl_step.rl_micro_batches rounds up to it
    length = -(-rollout.positions // multiple) * multiple
    rows_per_update = -(-rollout.rows // rl.updates_per_step)
    # rows of one prompt are adjacent: a micro-batch of mbs rows spans at most 1 + ceil((mbs - 1) / G) prompts
    images = min(mbs, 1 + -(-(mbs - 1) // g)) if patches else 0
    work = Workload(seq_length=length, micro_batch_size=mbs, micro_batches=-(-rows_per_update // mbs),
                    visual_patches=patches, vision_rows=images, loss="policy", response_tokens=rl.max_new_tokens,
                    **_training(job))
    on_policy = job.stage.kind == "distill_on_policy"
    kl_coef = float(job.stage.loss.get("kl_coef", 0.0) or 0.0)
    reference = FrozenModel(cfg, "reference") if kl_coef > 0 and not on_policy else None
    memory = _plan_memory(cfg, job.parallel, world, work, rollout=rollout, frozen=reference)
    # FLOPs: the updates (forward + backward) and the no-gradient passes (old policy, reference) over
    # every row; each micro-batch encodes its prompts' images once.
    rows = rl.prompts_per_step * g
    passes = dp * rl.updates_per_step * work.micro_batches
    vision = passes * images * patches
    frame = min(FRAME_PATCHES, patches) if patches else 0
    counts = (cfg, rows * length, rows * length * (length + 1) // 2, vision, vision * frame)
    forward = qwen3vl_train_flops(*counts, trainable=())
    passes = 0 if on_policy else 1 + (reference is not None)  # old-policy (and reference) log-prob passes
    flops = qwen3vl_train_flops(*counts, job.stage.trainable) + forward * passes
    plan = JobPlan(job, world, dp, work, memory, parameter_counts(cfg), source, length, flops, rollout=rollout,
                   frozen=reference, prompt_text_tokens=text)
    return _with_teacher(plan, cfg, counts[1:]) if on_policy else plan


def _with_teacher(plan: JobPlan, cfg: Qwen3VLConfig, counts: tuple) -> JobPlan:
    """The RL-shaped ``plan`` of an on-policy distillation stage with its teacher (see the module docstring):
    per pipeline stage the larger of (the RL moments + the teacher's weights) and (a distillation update of
    the same micro-batches with the teacher); the teacher's forward added to the FLOPs. ``counts``: the
    token, attention-pair and ViT counts of the step's rows (:func:`qwen3vl_train_flops`)."""
    job, work, rl_memory = plan.job, plan.workload, plan.memory
    teacher, why = _teacher(job)
    if teacher is None:
        plan.uncounted = f"the frozen teacher: its weights, activations, forward and logits ({why})"
        return plan
    parallel = job.parallel
    param_bytes = 2 if work.bf16 else 4
    try:
        weights = [sum(stage_parameters(teacher.cfg, parallel, stage).values()) * param_bytes
                   for stage in range(parallel.pp)]
    except ValueError as exc:
        raise ConfigError(f"the teacher: {exc}") from None
    update = _plan_memory(cfg, parallel, plan.world_size, replace(work, loss="distill"), frozen=teacher)
    # the two per-stage peaks, and the larger one's stage
    candidates = [(total + weights[stage], "rl", stage) for stage, total in enumerate(rl_memory.stage_totals)]
    candidates += [(total, "update", stage) for stage, total in enumerate(update.stage_totals)]
    total, source, stage = max(candidates)
    if source == "rl" and stage != rl_memory.stage:
        raise ConfigError(f"stage.kind=distill_on_policy: not planned: the largest pipeline stage ({stage + 1} of "
                          f"{parallel.pp}) peaks in the rollouts, whose breakdown by term the plan does not give "
                          "for that stage with a teacher")
    name = FROZEN_WEIGHTS["teacher"]
    if source == "rl":
        terms = dict(rl_memory.terms)
        items = list(terms.items())
        terms = dict(items[:3] + [(name, weights[stage])] + items[3:])
        phases = {phase: value + weights[stage] for phase, value in rl_memory.phase_totals.items()}
        memory = MemoryPlan(stage, rl_memory.phase, terms, phase_totals=phases)
    else:
        memory = MemoryPlan(stage, update.phase, dict(update.terms), phase_totals=dict(update.phase_totals))
    if rl_memory.stage == update.stage == stage:  # every moment of that stage: the rollouts', then the update's
        rollout_phases = {p: v + weights[stage] for p, v in rl_memory.phase_totals.items() if p.startswith("rollout")}
        memory.phase_totals = {**rollout_phases, **update.phase_totals}
    memory.stage_totals = [max(a + w, b) for a, w, b in zip(rl_memory.stage_totals, weights, update.stage_totals)]
    flops = plan.step_flops + qwen3vl_train_flops(teacher.cfg, *counts, trainable=())
    return replace(plan, memory=memory, frozen=teacher, step_flops=flops)


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


def _teacher_line(plan: JobPlan) -> str:
    t = plan.frozen.cfg.text
    teacher = parameter_counts(plan.frozen.cfg)
    return (f"  teacher: {plan.job.stage.distill.teacher} ({teacher.total / 1e9:.2f}B parameters, "
            f"{t.num_hidden_layers} layers of {t.hidden_size:,}), frozen, in this layout")


def format_plan(plan: JobPlan, mfu: float = DEFAULT_MFU, gpu: str = DEFAULT_GPU) -> str:
    """The plan as printed by ``pretrain.plan`` and ``slurm.submit``."""
    job, work, memory = plan.job, plan.workload, plan.memory
    cfg_name = job.model.get("name", "model")
    p = plan.params
    recompute = work.recompute or "none"
    if work.recompute == "full":
        recompute += f" ({work.recompute_method}, {work.recompute_num_layers} layer(s))"
    training = (f"{'bf16' if work.bf16 else 'fp32'}, recompute {recompute}, "
                f"{'distributed' if work.distributed_optimizer else 'replicated'} optimizer, trains "
                f"{'+'.join(work.trainable)}")
    lines = [
        f"plan: {cfg_name} ({p.total / 1e9:.2f}B parameters, {p.active / 1e9:.2f}B active), stage "
        f"{job.stage.name}, {plan.world_size} GPUs as {_layout(job.parallel, plan.data_parallel_size)}"]
    rollout = plan.rollout
    if rollout is not None:
        rl = job.stage.rl
        text = plan.prompt_text_tokens
        lines += [
            f"  per RL step: {rl.prompts_per_step} prompts x G={rl.group_size} responses; per data-parallel rank "
            f"{rollout.prompts} prompt(s), {rollout.rows} rows in one rollout batch, then {rl.updates_per_step} "
            f"update(s) of {work.micro_batches} micro-batch(es) of {work.micro_batch_size} row(s) of "
            f"{work.seq_length:,} tokens; {training}",
            f"  assumed: every response runs to stage.rl.max_new_tokens={rollout.max_new_tokens:,} and no group is "
            f"filtered; prompts of {rollout.prompt_tokens:,} tokens: {text:,} of text (--prompt-tokens) + "
            f"{rollout.prompt_tokens - text:,} visual tokens ({rollout.visual_patches:,} ViT patches per prompt: "
            f"{plan.visual_patches_source})"]
        if plan.frozen is not None and plan.frozen.role == "teacher":
            lines.append(_teacher_line(plan))
        elif plan.frozen is not None:
            lines.append("  reference policy (stage.loss.kl_coef > 0): the starting weights, frozen, in this layout")
    else:
        lines += [
            f"  per step: {job.train.global_batch_size} x {work.seq_length:,} tokens, {work.micro_batches} "
            f"micro-batch(es) of {work.micro_batch_size} per data-parallel rank; {training}",
            f"  assumed: {work.visual_patches:,} ViT patches per sequence ({plan.visual_patches_source})"]
        if plan.frozen is not None:
            lines.append(_teacher_line(plan))
    lines += ["", f"  {'term':<24}{'GB per GPU':>11}"]
    for name, value in memory.terms.items():
        lines.append(f"  {name:<24}{value / GB:>11.1f}")
    where = f"pipeline stage {memory.stage + 1} of {job.parallel.pp}, " if job.parallel.pp > 1 else ""
    lines.append(f"  {'total':<24}{memory.total / GB:>11.1f}   ({where}peak at: {memory.phase})")
    name, value = memory.largest
    lines.append(f"  largest term: {name} ({value / GB:.1f} GB)")
    if rollout is not None or job.stage.kind == "distill":
        lines.append("  every moment: " + ", ".join(f"{phase} {total / GB:.1f}"
                                                    for phase, total in memory.phase_totals.items()) + " GB")
    if plan.gpu_memory_gb is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"  GPU memory: {memory.total / GB:.1f} of {plan.gpu_memory_gb:g} GB "
                     f"(cluster.gpu_memory_gb of {job.cluster.name}): {verdict}")
    if work.bf16:
        seconds = plan.step_seconds(mfu, gpu)
        steps = stage_total_steps(job)
        peak = f"step time at {mfu:.0%} MFU on {gpu} ({PEAK_BF16_FLOPS[gpu] / 1e12:.0f} TFLOP/s bf16)"
        if rollout is not None:
            passes = "the teacher's passes" if job.stage.kind == "distill_on_policy" else "the log-prob passes"
            lines.append(f"  {peak}: {_duration(seconds)} per RL step for {passes} and the updates, "
                         f"without the rollouts (their decoding is bound by memory bandwidth, not estimated); "
                         f"the stage's {steps:,} steps: more than {_duration(steps * seconds)}")
        else:
            tokens = job.train.global_batch_size * work.seq_length
            lines.append(f"  {peak}: {_duration(seconds)} ({tokens / seconds / plan.world_size:,.0f} tokens/s per "
                         f"GPU; one document of {plan.document_length:,} tokens per sequence); the stage's "
                         f"{steps:,} steps: {_duration(steps * seconds)}")
    if plan.uncounted:
        lines.append(f"  not counted: {plan.uncounted}")
    return "\n".join(lines)


def over_memory(plan: JobPlan) -> str:
    """Why ``plan`` does not fit its cluster's GPUs, in one line: the totals and the largest term."""
    name, value = plan.memory.largest
    per = "prompt" if plan.rollout is not None else "sequence"
    return (f"stage {plan.job.stage.name}: the plan needs {plan.memory.total / GB:.1f} GB per GPU, more than "
            f"cluster.gpu_memory_gb={plan.gpu_memory_gb:g} (largest term: {name}, {value / GB:.1f} GB; "
            f"{plan.workload.visual_patches:,} ViT patches per {per} assumed)")


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
                        help="ViT patches per packed sequence, or per prompt in RL stages (default: "
                             "data.max_visual_patches_per_pack, else a sequence of images only; RL: one image of "
                             "data.image_max_pixels)")
    parser.add_argument("--document-length", type=int,
                        help="tokens per document for the attention FLOPs (default: the whole sequence)")
    parser.add_argument("--prompt-tokens", type=int,
                        help=f"RL stages: text tokens of a prompt, its visual tokens apart (default "
                             f"{DEFAULT_PROMPT_TOKENS}); --visual-patches then counts a prompt's ViT patches")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from pretrain.cli import load_job

    for flag in ("world_size", "visual_patches", "document_length", "prompt_tokens"):
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
        plan = plan_job(job, args.world_size, args.visual_patches, args.document_length, args.prompt_tokens)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(plan, args.mfu, args.gpu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
