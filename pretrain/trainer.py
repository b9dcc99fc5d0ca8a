"""The training loop of one stage: build, restore, train, log, checkpoint, stop cleanly.

``run_stage(job)`` is what ``python -m pretrain.train`` runs on every rank:

1. torch.distributed + Megatron parallel state from ``job.parallel`` (gloo + CPU runtime without GPU);
2. Qwen3-VL for this pipeline stage (``model.build_qwen3vl``), parts outside ``stage.trainable``
   frozen, bf16 with fp32 main weights on GPU or fp32 on CPU, Megatron DDP and optimizer
   (distributed optimizer by default), the stage's learning-rate schedule;
3. resume from ``<run_dir>/checkpoints/latest`` when it exists (model, optimizer, schedule, data
   position: the run continues exactly, in this layout or another one; RNG in the same layout), else the
   weights of ``stage.init_from``. The data streams are the stage's, one per data-parallel rank of the
   layout it started with; a resume in another layout draws from the same streams, so its global batches
   are the uninterrupted run's (``pretrain/data/loader.py``). Only a checkpoint without stream positions,
   or a global batch that no longer splits over its streams, cannot continue them: the run then skips
   the consumed sequences in new streams, warns, and records that in ``trainer.json``
   (``data_resumes``) and in the ``data_resume`` field of the step's ``metrics.jsonl`` record. A resume
   keeps the saved learning-rate schedule, so one whose step budget changed is refused
   (:func:`check_resumed_schedule`), and so is one whose ``stage.optimizer`` settings changed;
4. steps until the stage's step or token budget, with per-token loss normalisation over the global
   batch, non-finite steps skipped and counted (the run stops after ``train.max_consecutive_skips``
   in a row), metrics every step, checkpoints every ``train.save_interval`` steps and at the end;
5. on SIGUSR1/SIGTERM (SLURM time limit or preemption): finish the step, save, requeue, exit 0.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.checkpoint import (
    CheckpointError,
    CheckpointManager,
    TrainerState,
    collect_rng_state,
    current_layout,
    restore_rng_state,
)
from model.checkpoint_io import load_weights
from pretrain.config import JobConfig, check_batch_layout, recompute_overrides, stage_total_steps
from pretrain.forward import qwen3vl_forward_step
from pretrain.lr_schedule import build_lr_scheduler
from pretrain.metrics import (ExpertLoadTracker, MetricsLogger, causal_pairs, peak_flops_per_gpu,
                              training_step_flops)
from common.distributed.comm import all_reduce_values, broadcast_flag
from common.distributed.parallel import initialize_distributed
from pretrain.preemption import PreemptionWatcher, requeue_slurm_job
from pretrain.step import setup_optimizer, train_step, wrap_with_ddp


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); a checkpoint was saved first."""


@dataclass
class StageResult:
    """What a stage did, for the summary table and the demo."""

    stage: str
    steps: int  # steps done by this run
    start_step: int
    total_steps: int  # the stage's budget
    tokens: int
    first_loss: float | None
    last_loss: float | None
    wall_seconds: float
    skipped_steps: int
    checkpoint: str | None
    preempted: bool = False  # stopped early by a signal, after saving
    requeued: bool = False  # ... and SLURM will restart the job from that checkpoint


def training_dtype(job: JobConfig) -> torch.dtype:
    if job.train.precision == "bf16" or (job.train.precision == "auto" and torch.cuda.is_available()):
        return torch.bfloat16
    return torch.float32


def build_model_chunks(job: JobConfig, params_dtype: torch.dtype) -> list[torch.nn.Module]:
    """Qwen3-VL of this rank: one chunk, or one per virtual pipeline stage."""
    from megatron.core.transformer.module import Float16Module

    from model.config import Qwen3VLConfig
    from model.qwen3vl import FREEZABLE, build_qwen3vl

    cfg = Qwen3VLConfig.from_mapping(job.model)
    freeze = [part for part in FREEZABLE if part not in job.stage.trainable]
    chunks = []
    for vp_stage in range(job.parallel.vpp or 1):
        chunk = build_qwen3vl(cfg, vp_stage=vp_stage if job.parallel.vpp else None, freeze=freeze,
                              params_dtype=params_dtype, sequence_parallel=job.parallel.sequence_parallel,
                              config_overrides=recompute_overrides(job.stage.recompute))
        if params_dtype == torch.bfloat16:
            chunk = Float16Module(chunk.config, chunk)
        chunks.append(chunk)
    return chunks


def build_training(job: JobConfig, params_dtype: torch.dtype):
    """This rank's model chunks, their Megatron DDP wrappers and the optimizer of ``job``'s stage
    (call after ``initialize_distributed``); the stage's trainer and ``benchmarks/bench_step.py`` use it."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    chunks = build_model_chunks(job, params_dtype)
    model = wrap_with_ddp(chunks, DistributedDataParallelConfig(
        use_distributed_optimizer=job.train.use_distributed_optimizer, grad_reduce_in_fp32=True))
    opt = job.stage.optimizer
    optimizer = setup_optimizer(model, OptimizerConfig(
        optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad, bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
        use_distributed_optimizer=job.train.use_distributed_optimizer))
    return chunks, model, optimizer


def check_tokenizer_matches_model(tokenizer, model_cfg, where: str) -> None:
    """The model's special token ids and vocabulary must be the tokenizer's; raise naming both."""
    from model.config import ConfigError

    pairs = {
        "image_token_id": tokenizer.image_pad_id,
        "video_token_id": tokenizer.video_pad_id,
        "vision_start_token_id": tokenizer.vision_start_id,
        "vision_end_token_id": tokenizer.vision_end_id,
    }
    wrong = [f"model.{k}={getattr(model_cfg, k)} but the tokenizer has {v}"
             for k, v in pairs.items() if getattr(model_cfg, k) != v]
    if tokenizer.vocab_size > model_cfg.text.vocab_size:
        wrong.append(f"model.text.vocab_size={model_cfg.text.vocab_size} < the tokenizer's {tokenizer.vocab_size} ids")
    if wrong:
        raise ConfigError(f"tokenizer {where} does not fit the model: " + "; ".join(wrong))


def _all_reduce_dp(values: list[float]) -> list[float]:
    """Sum over data-parallel ranks (tensor/pipeline/context peers hold the same data)."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group() if dist.is_initialized() else None
    return all_reduce_values(values, group=group)


def normalize_loss_weights(micro_batches: list[dict]) -> None:
    """Scale the step's ``loss_weights`` so that they sum to the global loss-token count (in place)."""
    weight_sum = sum(float(b["loss_weights"].sum()) for b in micro_batches)
    token_sum = sum(float(b["loss_mask"].sum()) for b in micro_batches)
    weight_sum, token_sum = _all_reduce_dp([weight_sum, token_sum])
    scale = token_sum / weight_sum if weight_sum > 0 else 0.0
    for b in micro_batches:
        b["loss_weights"] = b["loss_weights"] * scale


def step_counts(micro_batches: list[dict]) -> dict[str, float]:
    """Tokens, documents, attention work and data fingerprint of this rank's micro-batches of one step."""
    real = docs = pairs = patches = vision_pairs = fingerprint = 0
    for b in micro_batches:
        real += int(b["num_real_tokens"])
        docs += int(b["num_documents"])
        fingerprint += sum(zlib.crc32(doc.encode()) for row in b.get("doc_ids", ()) for doc in row)
        pairs += causal_pairs(b["document_ids"])
        for key in ("image_grid_thw", "video_grid_thw"):
            grid = b.get(key)
            if grid is not None and grid.numel():
                per_frame = grid[:, 1] * grid[:, 2]
                patches += int((grid[:, 0] * per_frame).sum())
                vision_pairs += int((grid[:, 0] * per_frame * per_frame).sum())
    return {"tokens": real, "documents": docs, "pairs": pairs, "patches": patches, "vision_pairs": vision_pairs,
            "fingerprint": fingerprint}


def checkpoint_description(model_cfg, params_dtype: torch.dtype, tokenizer, stage: str,
                           carried_from: Path | None = None):
    """Files that make a training checkpoint convertible as it is (``python -m model.convert
    mcore-to-hf --ckpt <checkpoints>``): the HF config, the dtype, the tokenizer, and the other HF files
    (processor and generation configs, chat template) of the checkpoint the stage started from
    (``carried_from``: its ``hf_extra/``, e.g. from ``model.convert hf-to-mcore``), so that the exported
    folder loads with ``AutoProcessor`` as the original did. The tokenizer is the stage's own."""
    from model.checkpoint_io import write_model_config
    from model.convert import EXTRA_DIR, META_FILE
    from common.tokens.tokenizer import TOKENIZER_FILE

    carried = sorted(p for p in (carried_from / EXTRA_DIR).iterdir() if p.is_file() and p.name != TOKENIZER_FILE) \
        if carried_from is not None and (carried_from / EXTRA_DIR).is_dir() else []

    def describe(folder: Path) -> None:
        write_model_config(folder, model_cfg.to_hf())
        dtype = "bfloat16" if params_dtype == torch.bfloat16 else "float32"
        (folder / META_FILE).write_text(json.dumps({"dtype": dtype, "source": f"pretrain.train stage {stage}"}) + "\n")
        (folder / EXTRA_DIR).mkdir(parents=True, exist_ok=True)
        for file in carried:
            shutil.copyfile(file, folder / EXTRA_DIR / file.name)
        tokenizer.save(folder / EXTRA_DIR)

    return describe


def _data_states(loader) -> dict:
    """{stream: position} of the data streams this rank writes into a checkpoint."""
    return {stream: position for stream, position in loader.save_state().items() if loader.plan.writes(stream)}


def _open_train_data(job: JobConfig, state: TrainerState, manager: CheckpointManager, latest: Path | None,
                     tokenizer, dp_rank: int, dp_size: int):
    """The rank's training loader, positioned where the stage stands; returns it with the warning of
    :func:`pretrain.data.loader.plan_data_resume` (None when the data continues exactly)."""
    from pretrain.data.loader import build_train_loader, plan_data_resume

    resume = plan_data_resume(
        saved_streams=state.data_streams if latest is not None else None, consumed_samples=state.consumed_samples,
        global_batch_size=job.train.global_batch_size, micro_batch_size=job.train.micro_batch_size,
        dp_size=dp_size)
    loader = build_train_loader(
        job.data, job.stage, seq_length=job.stage.seq_length, micro_batch_size=job.train.micro_batch_size,
        dp_rank=dp_rank, dp_size=dp_size, seed=job.train.seed, tokenizer=tokenizer,
        global_batch_size=job.train.global_batch_size, num_streams=resume.num_streams)
    if resume.restore:
        try:
            loader.restore_state(manager.load_data_states(latest, loader.streams))
        except ValueError as exc:  # e.g. stage.seq_length changed: the saved streams are other streams
            raise CheckpointError(f"{latest}: {exc}") from None
    elif resume.skip:
        loader.skip(resume.skip)
    state.data_streams = resume.num_streams
    if resume.warning:
        state.data_resumes.append({"step": state.step, "warning": resume.warning})
    return loader, resume.warning


@dataclass
class StageRun:
    """What every kind of stage opens before its first step (:func:`open_stage`): the model and its
    optimizer and schedule, restored or initialised, the tokenizer, the checkpoint manager, the logger
    and the preemption watcher. The loop of the stage's kind (:func:`run_stage`, and the post-training
    loops in :mod:`pretrain.posttrain`) runs on it."""

    job: JobConfig
    info: object  # common.distributed.parallel.DistributedInfo
    dp_size: int
    dtype: torch.dtype
    model_cfg: object  # model.config.Qwen3VLConfig
    chunks: list
    model: list
    optimizer: object
    scheduler: object
    manager: CheckpointManager
    state: TrainerState
    rank_state: dict | None  # this rank's saved state (RNG) when resuming in the same layout
    latest: Path | None  # the checkpoint resumed from
    origin: str  # where the weights came from, for the first log line
    tokenizer: object
    describe: object  # checkpoint_description(...)
    watcher: PreemptionWatcher
    logger: MetricsLogger

    @property
    def rank0(self) -> bool:
        return self.info.rank == 0

    def restore_rng(self) -> None:
        """The saved RNG of this rank (same layout), else note that it was seeded from train.seed."""
        if self.rank_state is not None:
            restore_rng_state(self.rank_state["rng"])
        elif self.latest is not None and self.state.layout != current_layout():
            self.origin += (f" in another layout ({self.state.layout} -> {current_layout()}; "
                            "RNG seeded from train.seed)")

    def save(self, data_states: dict | None = None) -> Path:
        """A checkpoint of the model, optimizer, schedule, progress and RNG (collective)."""
        self.state.scheduler = schedule_state(self.scheduler)
        return self.manager.save(self.model, self.optimizer, self.state, {"rng": collect_rng_state()},
                                 describe=self.describe, data_states=data_states)

    def end_step(self, total_steps: int, consecutive_skips: int,
                 data_states: Callable[[], dict] | None = None) -> tuple[str | None, bool, bool]:
        """After a step: checkpoint every ``train.save_interval`` steps, at the end, on SIGUSR1/SIGTERM and
        before giving up after ``train.max_consecutive_skips`` skipped steps in a row (then raise
        :class:`TrainingStopped`). ``data_states``: called when saving, the data positions to save (asking
        the loader's workers for them is a round trip to each: not at every step). Returns (the checkpoint
        saved now or None, stopped by a signal, requeued)."""
        train, step = self.job.train, self.state.step
        stop = self.watcher.stop_requested()
        too_many_skips = consecutive_skips >= train.max_consecutive_skips
        checkpoint = None
        if step % train.save_interval == 0 or step == total_steps or stop or too_many_skips:
            checkpoint = str(self.save(data_states() if data_states is not None else None))
        if too_many_skips:
            raise TrainingStopped(f"{consecutive_skips} steps in a row without a finite update at step {step} "
                                  f"(train.max_consecutive_skips={train.max_consecutive_skips}); saved {checkpoint}")
        if not stop:
            return checkpoint, False, False
        if step >= total_steps:
            # The stage is done and saved: a requeue or "stopped early" would restart a finished stage
            # (and make a job chain cancel the next one).
            self.logger.message(f"signal {self.watcher.received} received at the last step: stage finished, "
                                f"saved {checkpoint}")
            return checkpoint, False, False
        self.logger.message(f"signal {self.watcher.received} received: saved {checkpoint} at step {step}")
        return checkpoint, True, self.handle_stop()

    def handle_stop(self) -> bool:
        """After a save on SIGUSR1/SIGTERM: requeue the SLURM job (rank 0 decides); True when requeued."""
        requeued = False
        if self.rank0:
            outcome = requeue_slurm_job(self.job.cluster.max_requeues)
            requeued = outcome.startswith("requeued")
            self.logger.message(outcome)
        return broadcast_flag(requeued)


#: The saved learning-rate schedule's settings (Megatron's scheduler state, and the WSD decay length this
#: trainer adds to it) and the job settings they come from.
SCHEDULE_SETTINGS = {
    "max_lr": "stage.optimizer.lr", "min_lr": "stage.optimizer.min_lr",
    "lr_warmup_steps": "stage.optimizer.warmup_steps", "lr_decay_style": "stage.optimizer.schedule",
    "wsd_decay_steps": "stage.optimizer.decay_fraction (WSD decay steps)",
    "start_wd": "stage.optimizer.weight_decay",
}


def schedule_state(scheduler) -> dict:
    """What a checkpoint keeps of the learning-rate schedule: Megatron's scheduler state plus the WSD
    decay length (``stage.optimizer.decay_fraction`` of the steps), which Megatron's leaves out."""
    return {**scheduler.state_dict(), "wsd_decay_steps": scheduler.wsd_decay_steps}


def check_resumed_schedule(latest: Path, state: TrainerState, scheduler, total_steps: int) -> None:
    """Raise :class:`CheckpointError` when checkpoint ``latest`` (trainer state ``state``) was saved with
    another learning-rate schedule than this run's ``scheduler`` (built from the job, not loaded yet).

    A resume keeps the saved schedule (Megatron's scheduler restores its own settings), while the loop
    runs to this run's budget ``total_steps``. A budget changed since the save (``stage.train_steps``,
    or ``stage.train_tokens`` over another ``train.global_batch_size`` or ``stage.seq_length``; the
    optimizer steps of an RL step, ``stage.rl.updates_per_step``) would
    stop the stage before its learning rate decayed (WSD: still at its peak), or train past the decay at
    ``min_lr``, on another number of tokens than ``stage.train_tokens``; a changed ``stage.optimizer``
    setting (lr, min_lr, warm-up, schedule, decay fraction, weight decay) would be ignored. A checkpoint
    at or past this run's budget trains no step: not checked. Settings a checkpoint did not save are
    not compared."""
    if state.step >= total_steps:
        return
    saved, current = state.scheduler, schedule_state(scheduler)
    # A constant rate does not depend on the span: extending (or shortening) such a run changes no rate.
    constant = saved.get("lr_decay_style") == current["lr_decay_style"] == "constant"
    if "lr_decay_steps" in saved and saved["lr_decay_steps"] != current["lr_decay_steps"] and not constant:
        raise CheckpointError(
            f"{latest}: its learning-rate schedule spans {saved['lr_decay_steps']} optimizer steps, this run's "
            f"{current['lr_decay_steps']}: the stage's budget ({total_steps} steps: stage.train_steps, or "
            "stage.train_tokens / (train.global_batch_size x stage.seq_length); in an RL or on-policy distillation "
            "stage, times stage.rl.updates_per_step optimizer steps each) changed since it was saved, and a "
            "resume keeps the saved schedule. Resume with the budget it was saved with (a new global batch: "
            "stage.train_tokens=null stage.train_steps=<its steps>), or start a new stage from its weights with "
            "stage.init_from")
    changed = [f"{setting}: saved {saved[key]}, now {current[key]}" for key, setting in SCHEDULE_SETTINGS.items()
               if key in saved and not _same_setting(saved[key], current[key])]
    if changed:
        raise CheckpointError(
            f"{latest} was saved with another learning-rate schedule ({'; '.join(changed)}) and a resume keeps the "
            "saved one: resume with the saved settings, or start a new stage from its weights with "
            "stage.init_from (a new schedule and optimizer state)")


def _same_setting(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)
    return a == b


def start_distributed(job: JobConfig):
    """torch.distributed and Megatron's parallel state of ``job``; returns (info, data-parallel size)."""
    from megatron.core import parallel_state

    info = initialize_distributed(job.parallel, seed=job.train.seed)
    return info, parallel_state.get_data_parallel_world_size()


def open_stage(job: JobConfig, info, dp_size: int, total_steps: int, composed_yaml: str = "",
               schedule_steps: int | None = None) -> StageRun:
    """Build this rank's model and optimizer, resume from ``<run_dir>/checkpoints/latest`` (else load
    ``stage.init_from``), load and check the tokenizer, write the run's ``config.yaml``, and open the
    logger and the preemption watcher (see the module docstring, steps 2-3). ``total_steps``: the
    stage's steps (logged); ``schedule_steps``: the optimizer steps the learning-rate schedule spans
    (default ``total_steps``; an RL step makes several)."""
    from model.config import Qwen3VLConfig
    from common.tokens.tokenizer import load_tokenizer

    run_dir = Path(job.train.run_dir)
    dtype = training_dtype(job)
    model_cfg = Qwen3VLConfig.from_mapping(job.model)
    chunks, model, optimizer = build_training(job, dtype)
    schedule_steps = schedule_steps or total_steps
    scheduler = build_lr_scheduler(optimizer, job.stage.optimizer, schedule_steps)

    manager = CheckpointManager(run_dir, keep_last=job.train.keep_last)
    state, rank_state = TrainerState(stage=job.stage.name), None
    latest = manager.latest()
    started_from = latest
    if latest is not None:
        state, rank_state = manager.load(latest, model, optimizer)
        check_resumed_schedule(latest, state, scheduler, total_steps)
        scheduler.load_state_dict(state.scheduler)
        origin = f"resumed from {latest} (step {state.step})"
    elif job.stage.init_from:
        started_from = load_weights(job.stage.init_from, model)
        origin = f"weights from {started_from}"
        # A bf16/fp16 optimizer copied the random initialisation into its fp32 main weights when it was
        # built; without this its first step would write them back over the loaded ones.
        optimizer.reload_model_params()
    else:
        origin = "random initialisation"

    tokenizer = load_tokenizer(job.data.tokenizer)
    check_tokenizer_matches_model(tokenizer, model_cfg, job.data.tokenizer)
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if composed_yaml:
            (run_dir / "config.yaml").write_text(composed_yaml)
    logger = MetricsLogger(run_dir, job.stage.name, total_steps, state.step, job.train.log_interval,
                           info.rank == 0)
    return StageRun(job=job, info=info, dp_size=dp_size, dtype=dtype, model_cfg=model_cfg, chunks=chunks,
                    model=model, optimizer=optimizer, scheduler=scheduler, manager=manager, state=state,
                    rank_state=rank_state, latest=latest, origin=origin, tokenizer=tokenizer,
                    describe=checkpoint_description(model_cfg, dtype, tokenizer, job.stage.name, started_from),
                    watcher=PreemptionWatcher().install(), logger=logger)


def run_stage(job: JobConfig, composed_yaml: str = "") -> StageResult:
    """Train one stage on this rank (call on every rank; see the module docstring). Stages of kind
    ``lm`` (next-token loss) and ``distill`` (KL to a teacher's distributions) run here; ``rl`` stages
    run in :func:`pretrain.posttrain.rl_stage.run_rl_stage`."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics

    info, dp_size = start_distributed(job)
    num_micro = check_batch_layout(job.train, dp_size, job.parallel.pp, job.parallel.vpp)
    total_steps = stage_total_steps(job)
    seq_length = job.stage.seq_length
    run = open_stage(job, info, dp_size, total_steps, composed_yaml)
    chunks, model, optimizer, scheduler = run.chunks, run.model, run.optimizer, run.scheduler
    state, logger, model_cfg, dtype = run.state, run.logger, run.model_cfg, run.dtype
    loader, data_warning = _open_train_data(job, state, run.manager, run.latest, run.tokenizer,
                                            parallel_state.get_data_parallel_rank(), dp_size)
    run.restore_rng()
    forward_step, teacher, teacher_cfg = qwen3vl_forward_step, None, None
    if job.stage.kind == "distill":
        from pretrain.posttrain.distill_stage import build_teacher, distill_forward_step, run_teacher, teacher_config

        teacher, teacher_origin = build_teacher(job, dtype, run.tokenizer)
        teacher_cfg = teacher_config(teacher)  # its forward runs in the timed step: MFU counts it
        forward_step = distill_forward_step(teacher, job.stage.distill.temperature)
        run.origin += f"; teacher {teacher_origin}"
    logger.message(f"{job.stage.name}: {run.origin}; {total_steps} steps of {job.train.global_batch_size} x "
                   f"{seq_length} tokens; layout {info.world_size} ranks, dp={dp_size}, "
                   f"{job.parallel}; {dtype}; {state.data_streams} data stream(s)")
    if data_warning:
        logger.message(f"WARNING: {data_warning}")
    experts = ExpertLoadTracker(chunks) if model_cfg.is_moe else None
    moe_pattern = model_cfg.text.moe_layer_pattern() if model_cfg.is_moe else None
    peak = peak_flops_per_gpu()
    data = iter(loader)
    start_step, first_loss, last_loss, consecutive_skips = state.step, None, None, 0
    started = time.perf_counter()
    preempted = requeued = False
    checkpoint = str(run.latest) if run.latest else None

    while state.step < total_steps:
        t0 = time.perf_counter()
        micro_batches = [next(data) for _ in range(num_micro)]
        if state.step == start_step and loader.ready_message:
            logger.message(loader.ready_message)  # instead of energon's per-worker buffer bars
        normalize_loss_weights(micro_batches)
        if teacher is not None:
            run_teacher(teacher, micro_batches)  # its hidden states ride in the micro-batches to the loss
        iterators = [iter(micro_batches) for _ in model] if len(model) > 1 else iter(micro_batches)
        result = train_step(model, optimizer, forward_step, iterators, num_micro, seq_length,
                            job.train.micro_batch_size)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used; the scheduler then sets the next one
        state.step += 1
        if result.skipped:
            state.skipped_steps += 1
            consecutive_skips += 1
        else:
            scheduler.step(increment=1)
            consecutive_skips = 0
        counts = step_counts(micro_batches)
        tokens, pairs, patches, vision_pairs, fingerprint = _all_reduce_dp(
            [counts["tokens"], counts["pairs"], counts["patches"], counts["vision_pairs"], counts["fingerprint"]])
        state.consumed_samples += job.train.global_batch_size
        state.consumed_tokens += int(tokens)
        elapsed = time.perf_counter() - t0
        metrics = {
            "loss": result.loss, "grad_norm": result.grad_norm, "lr": lr,
            "tokens_per_s": tokens / elapsed, "step_seconds": elapsed, "consumed_tokens": state.consumed_tokens,
            "skipped_steps": state.skipped_steps, "mfu": None,
            # Which documents the global batch held (a sum of CRC32s of their ids): equal in any layout
            # for the same global batch, so runs and resumes can be compared step by step.
            "data_fingerprint": int(fingerprint),
        }
        if data_warning and state.step == start_step + 1:
            metrics["data_resume"] = data_warning
        # The step's model FLOPs (a distillation teacher's forward included): MFU on a GPU of the peak
        # table, and what a user divides by another GPU's peak.
        flops = training_step_flops(model_cfg, int(tokens), int(pairs), int(patches), int(vision_pairs),
                                    job.stage.trainable, teacher=teacher_cfg)
        metrics["model_flops"] = flops
        if peak is not None:
            metrics["mfu"] = flops / elapsed / (peak * info.world_size)
        if moe_pattern is not None:
            aux: dict = {}
            track_moe_metrics(loss_scale=1.0 / num_micro, iteration=state.step, total_loss_dict=aux,
                              force_initialize=True, track_names=["load_balancing_loss"],
                              num_layers=model_cfg.text.num_hidden_layers, moe_layer_freq=moe_pattern)
            if "load_balancing_loss" in aux:
                metrics["moe_aux_loss"] = float(aux["load_balancing_loss"])
            if state.step % job.train.log_interval == 0 or state.step == total_steps:
                per_layer = experts.imbalance()
                if per_layer:
                    metrics["expert_imbalance"] = max(per_layer.values())
                    metrics["expert_imbalance_per_layer"] = per_layer
        logger.log(state.step, metrics)
        if first_loss is None and not result.skipped:
            first_loss = result.loss
        if not result.skipped:
            last_loss = result.loss

        saved, preempted, requeued = run.end_step(total_steps, consecutive_skips, partial(_data_states, loader))
        checkpoint = saved or checkpoint
        if preempted:
            break

    wall = time.perf_counter() - started
    result = StageResult(stage=job.stage.name, steps=state.step - start_step, start_step=start_step,
                         total_steps=total_steps,
                         tokens=state.consumed_tokens, first_loss=first_loss, last_loss=last_loss,
                         wall_seconds=wall, skipped_steps=state.skipped_steps, checkpoint=checkpoint,
                         preempted=preempted, requeued=requeued)
    logger.close({"steps": f"{start_step}->{state.step}", "tokens": state.consumed_tokens,
                  "loss first->last": f"{format_number(first_loss)} -> {format_number(last_loss)}",
                  "skipped": state.skipped_steps, "wall s": round(wall, 1), "checkpoint": checkpoint or "-"})
    return result


def format_number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
