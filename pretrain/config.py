"""The job configuration: Hydra composes ``conf/``; this module checks it against typed schemas.

Every config group has a dataclass schema. :func:`validate_job_config` merges each composed section
into its schema with OmegaConf, which rejects unknown keys and values of the wrong type, then runs the
section's own checks. Errors are raised as :class:`ConfigError` naming the key (``parallel.tpp``) and
the reason, and the entry points print them without a traceback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.distributed.parallel import ParallelConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

TRAINABLE_PARTS = ("vision", "merger", "language")
LOSS_NORMALIZATIONS = ("token", "sample", "square_root")
LR_SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
RECOMPUTE_GRANULARITIES = (None, "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
STAGE_KINDS = ("lm", "distill", "rl", "distill_on_policy")


class ConfigError(ValueError):
    """A configuration value that cannot run; the message names the key and the reason."""


@dataclass
class OptimizerSchema:
    """AdamW with warm-up then cosine or WSD (warmup-stable-decay) decay. Learning rates per step."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    decay_fraction: float = 0.1  # WSD: share of the steps spent decaying to min_lr


@dataclass
class RecomputeSchema:
    """Activation recomputation (Megatron's): what the backward pass computes again instead of storing.

    granularity: null (store everything), ``selective`` (the attention core only) or ``full`` (whole
    layers: only each recomputed layer's input is stored). method and num_layers (``full`` only):
    ``uniform`` recomputes groups of ``num_layers`` layers, ``block`` the first ``num_layers`` layers
    of each pipeline stage. The ViT follows the decoder's setting (``full``: its layers too).
    """

    granularity: str | None = None
    method: str = "uniform"
    num_layers: int = 1


@dataclass
class DistillSchema:
    """``stage.kind: distill`` and ``distill_on_policy``: the frozen teacher (pretrain/posttrain/distill_stage.py)."""

    teacher: str | None = None  # checkpoints folder (its latest) or step dir of a run of this stack
    temperature: float = 1.0  # of both distributions in KL(teacher || student)


@dataclass
class PromptFilterSchema:
    """Groups dropped before the update (report: all failed, or >= 15 of 16 succeeded)."""

    enabled: bool = True  # false: keep every group (graded rewards; groups with equal rewards still get A = 0)
    pass_threshold: float = 1.0  # a response with reward >= this is a success
    easy_fraction: float = 0.9375  # 15/16: a group with at least this share of successes is too easy


@dataclass
class RLSchema:
    """``stage.kind: rl``: rollouts, filtering and updates (pretrain/posttrain/rl_stage.py); ``distill_on_policy``
    takes the prompts, sampling and updates from here (not the filter)."""

    prompts: str | None = None  # an RL prompt set built by ``python -m data_tools build-rl``
    prompts_per_step: int = 16  # prompts per RL step, all data-parallel ranks together
    group_size: int = 16  # G responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    updates_per_step: int = 2  # optimizer mini-batches on each step's rollouts (ratios leave 1 after the first)
    filter: PromptFilterSchema = field(default_factory=PromptFilterSchema)
    save_rollouts: bool = True  # <run_dir>/rollouts/step_XXXXXXXX.jsonl
    # modules imported before the rewards are looked up: your own @register_reward functions
    reward_modules: list[str] = field(default_factory=list)


@dataclass
class StageSchema:
    """One training stage of the report (S0 alignment, S1 8K, S2 32K, S3 256K, SFT)."""

    name: str = "s1_pretrain"
    seq_length: int = 8192  # tokens per packed sequence
    train_steps: int | None = None  # the budget: steps, or
    train_tokens: int | None = None  # tokens (converted to steps with the global batch)
    trainable: list[str] = field(default_factory=lambda: list(TRAINABLE_PARTS))
    loss_normalization: str = "token"
    init_from: str | None = None  # previous stage's checkpoints folder (its latest) or step dir: weights only
    optimizer: OptimizerSchema = field(default_factory=OptimizerSchema)
    recompute: RecomputeSchema = field(default_factory=RecomputeSchema)
    data_weights: dict[str, float] = field(default_factory=dict)  # per data source name
    # lm: next-token loss; distill: KL to a teacher; rl: policy optimisation on rollouts; distill_on_policy:
    # KL to a teacher on the model's own rollouts
    kind: str = "lm"
    distill: DistillSchema = field(default_factory=DistillSchema)
    rl: RLSchema = field(default_factory=RLSchema)
    # kind rl: reward names, or {name, weight} entries (pretrain/posttrain/rewards.py)
    rewards: list[Any] = field(default_factory=list)
    # kind rl: {name: sapo|grpo|gspo, aggregation: seq-mean-token-mean|token-mean, <the method's options>}
    loss: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainSchema:
    """Run-level settings shared by every stage."""

    seed: int = 1234
    micro_batch_size: int = 1  # packed sequences per micro-batch per data-parallel rank
    global_batch_size: int = 8  # packed sequences per optimizer step, all ranks together
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    run_root: str = "runs"
    run_dir: str = "${train.run_root}/${stage.name}"
    log_interval: int = 1
    save_interval: int = 100
    keep_last: int = 2
    max_consecutive_skips: int = 5  # non-finite steps in a row that stop the run
    use_distributed_optimizer: bool = True


@dataclass
class DataSourceSchema:
    name: str = "???"
    path: str = "???"  # a shard set built by data_tools (holds .nv-meta)
    weight: float = 1.0


@dataclass
class DataSchema:
    """Shard sets to blend and how samples become model inputs."""

    name: str = "synth"
    root: str = ""  # folder the source paths may refer to as ${data.root}
    sources: list[DataSourceSchema] = field(default_factory=list)
    tokenizer: str = "qwen"  # "qwen" (the real vocabulary) or a directory with tokenizer.json
    num_workers: int = 0
    image_min_pixels: int = 65_536
    image_max_pixels: int = 16_777_216
    video_fps: float = 2.0
    max_visual_patches_per_pack: int | None = None  # ViT patches per packed sequence (bounds ViT memory)
    packing_buffer_size: int = 1024  # samples grouped at once by first-fit-decreasing packing (fill vs. warm-up)
    shuffle_buffer_size: int | None = 100  # samples (energon's sample shuffle buffer)
    max_samples_per_sequence: int | None = 100  # consecutive samples read from one shard slice
    overlong: str = "truncate"  # a sample longer than a pack: "truncate" (at a safe boundary) or "drop"
    # energon's per-worker "Filling reading buffer" progress bars; off: one "loader: ..." line instead
    verbose_loader: bool = False


@dataclass
class ClusterSchema:
    """Where the job runs. ``local``: this machine; anything else is a SLURM cluster (see slurm/)."""

    name: str = "local"
    nodes: int = 1
    gpus_per_node: int = 0
    # Memory per GPU in GB (1e9 bytes) that training may use; slurm.submit refuses a job whose plan
    # (python -m pretrain.plan) needs more. None: not checked (CPU clusters).
    gpu_memory_gb: float | None = None
    cpus_per_task: int = 1
    tasks_per_node: int | None = None  # training processes per node; None: gpus_per_node (one per GPU)
    python: str | None = None  # interpreter in the job; None: the one running slurm.submit (shared FS)
    srun_args: list[str] = field(default_factory=list)  # extra srun options, e.g. --mpi=pmix
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit: str = "01:00:00"
    env_setup: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    container_image: str | None = None
    container_mounts: list[str] = field(default_factory=list)
    output_dir: str = "slurm_logs"
    signal_seconds_before_limit: int = 300
    max_requeues: int = 3
    extra_sbatch: dict[str, str] = field(default_factory=dict)


SECTION_SCHEMAS: dict[str, type] = {
    "stage": StageSchema,
    "train": TrainSchema,
    "data": DataSchema,
    "parallel": ParallelConfig,
    "cluster": ClusterSchema,
}


def _typed(section: str, value: Any, schema: type) -> Any:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), value)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        reason = str(getattr(exc, "msg", None) or exc).splitlines()[0]
        raise ConfigError(f"{section}.{key}: {reason}") from None


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: must be one of {list(allowed)}")


def _positive(key: str, value: Any) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{key}={value!r}: must be positive")


def _not_negative(key: str, value: Any) -> None:
    if value is None or value < 0:
        raise ConfigError(f"{key}={value!r}: must be 0 or more")


def check_adam(opt: OptimizerSchema) -> None:
    """AdamW's settings as torch's Adam and Megatron's scheduler take them (they raise only once the model
    is built, with a traceback): moments' betas in [0, 1), eps and weight decay 0 or more, clip_grad 0 (no
    clipping) or more."""
    for key in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(opt, key) < 1.0:
            raise ConfigError(f"stage.optimizer.{key}={getattr(opt, key)}: must be in [0, 1)")
    for key in ("adam_eps", "weight_decay", "clip_grad"):
        _not_negative(f"stage.optimizer.{key}", getattr(opt, key))


def check_recompute(job: "JobConfig") -> None:
    """``stage.recompute`` against Megatron's recompute loops and the model: ``uniform`` recomputes the
    decoder layers of each pipeline (virtual) stage in groups of ``num_layers``, which must divide the
    stage's layers (Megatron indexes past the last one otherwise: an IndexError in the first step);
    ``block`` calls the layers it does not recompute without the MoE routers' padding mask (padding
    would be routed and counted as tokens), so an MoE model takes ``uniform``."""
    recompute = job.stage.recompute
    _one_of("stage.recompute.granularity", recompute.granularity, RECOMPUTE_GRANULARITIES)
    _one_of("stage.recompute.method", recompute.method, RECOMPUTE_METHODS)
    _positive("stage.recompute.num_layers", recompute.num_layers)
    if recompute.granularity != "full":
        return
    text = job.model.get("text", {}) if isinstance(job.model, dict) else {}
    layers = text.get("num_hidden_layers")
    parallel = job.parallel
    chunks = parallel.pp * (parallel.vpp or 1)
    if recompute.method == "uniform" and isinstance(layers, int) and layers % chunks == 0:
        per_stage = layers // chunks
        if per_stage % recompute.num_layers:
            raise ConfigError(f"stage.recompute.num_layers={recompute.num_layers}: with method uniform it must divide "
                              f"the {per_stage} decoder layers of each pipeline stage ({layers} layers over pp * vpp "
                              f"= {chunks})")
    if recompute.method == "block" and text.get("num_experts"):
        raise ConfigError("stage.recompute.method=block with an MoE model: Megatron's block recompute runs the "
                          "layers it does not recompute without the routers' padding mask; use method uniform")


@dataclass
class JobConfig:
    """The validated job: typed sections, plus the model section as composed (checked by model/)."""

    model: dict
    stage: StageSchema
    train: TrainSchema
    data: DataSchema
    parallel: ParallelConfig
    cluster: ClusterSchema


def validate_job_config(cfg: DictConfig) -> JobConfig:
    """Type-check every section of a composed config; raise :class:`ConfigError` on the first problem."""
    missing = [s for s in ("model", *SECTION_SCHEMAS) if s not in cfg]
    if missing:
        raise ConfigError(f"config lacks section(s) {missing}")
    unknown = sorted(set(cfg) - {"model", *SECTION_SCHEMAS})
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; known: {['model', *SECTION_SCHEMAS]}")
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{getattr(exc, 'full_key', '?')}: {getattr(exc, 'msg', exc)}") from None
    typed = {name: _typed(name, resolved[name], schema) for name, schema in SECTION_SCHEMAS.items()}
    job = JobConfig(model=resolved["model"], **typed)

    stage, train = job.stage, job.train
    _positive("stage.seq_length", stage.seq_length)
    if (stage.train_steps is None) == (stage.train_tokens is None):
        raise ConfigError("stage: set exactly one of stage.train_steps and stage.train_tokens")
    _positive("stage.train_steps" if stage.train_steps is not None else "stage.train_tokens",
              stage.train_steps if stage.train_steps is not None else stage.train_tokens)
    for part in stage.trainable:
        _one_of("stage.trainable[]", part, TRAINABLE_PARTS)
    _one_of("stage.loss_normalization", stage.loss_normalization, LOSS_NORMALIZATIONS)
    _one_of("stage.optimizer.schedule", stage.optimizer.schedule, LR_SCHEDULES)
    _positive("stage.optimizer.lr", stage.optimizer.lr)
    if not 0.0 <= stage.optimizer.min_lr <= stage.optimizer.lr:  # Megatron's scheduler would assert
        raise ConfigError(f"stage.optimizer.min_lr={stage.optimizer.min_lr}: must be in [0, stage.optimizer.lr="
                          f"{stage.optimizer.lr}]")
    if not 0.0 <= stage.optimizer.decay_fraction <= 1.0:
        raise ConfigError(f"stage.optimizer.decay_fraction={stage.optimizer.decay_fraction}: must be in [0, 1]")
    check_adam(stage.optimizer)
    _one_of("train.precision", train.precision, PRECISIONS)
    for key in ("micro_batch_size", "global_batch_size", "log_interval", "save_interval", "keep_last",
                "max_consecutive_skips"):
        _positive(f"train.{key}", getattr(train, key))
    _not_negative("stage.optimizer.warmup_steps", stage.optimizer.warmup_steps)
    _not_negative("data.num_workers", job.data.num_workers)
    for source in job.data.sources:
        _positive(f"data.sources[{source.name}].weight", source.weight)
    names = [s.name for s in job.data.sources]
    for name, weight in stage.data_weights.items():
        if name not in names:
            raise ConfigError(f"stage.data_weights.{name}: no data source named {name!r} (have {names})")
        _not_negative(f"stage.data_weights.{name}", weight)
    text = job.model.get("text", {}) if isinstance(job.model, dict) else {}
    try:  # the world size is checked at launch, before any work
        job.parallel.validate(moe=bool(text.get("num_experts")))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    check_recompute(job)
    check_sequence_layout(stage.seq_length, job.parallel)
    _one_of("stage.kind", stage.kind, STAGE_KINDS)
    if stage.kind == "distill":
        check_distill_stage(job)
    elif stage.kind == "rl":
        check_rl_stage(job)
    elif stage.kind == "distill_on_policy":
        check_on_policy_distill_stage(job)
    return job


def check_distill_stage(job: JobConfig) -> None:
    """``kind: distill`` needs a teacher and a positive temperature. The teacher runs in the student's
    layout (tensor, pipeline, expert, context and data parallelism), one model chunk per pipeline rank:
    virtual pipeline stages are refused."""
    distill = job.stage.distill
    if not distill.teacher:
        raise ConfigError(f"stage.distill.teacher: set the teacher's checkpoints folder (kind: {job.stage.kind})")
    _positive("stage.distill.temperature", distill.temperature)
    if job.parallel.vpp:
        raise ConfigError(f"stage.kind=distill with parallel.vpp={job.parallel.vpp}: the teacher runs one model "
                          "chunk per pipeline rank; set parallel.vpp=null")


def check_rl_stage(job: JobConfig) -> None:
    """One-line errors for an RL stage that cannot run, before any model is built or rollout drawn."""
    from pretrain.posttrain.advantages import PromptFilter, check_group_size
    from pretrain.posttrain.policy_loss import AGGREGATIONS, policy_loss_config_from_mapping
    from pretrain.posttrain.rewards import parse_reward_specs

    import importlib

    rl = job.stage.rl
    for module in rl.reward_modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"stage.rl.reward_modules: cannot import {module!r} ({exc})") from None
    check_rollouts(job)
    try:
        check_group_size(rl.group_size)
        parse_reward_specs(job.stage.rewards)
        PromptFilter(pass_threshold=rl.filter.pass_threshold, easy_fraction=rl.filter.easy_fraction)
        loss = dict(job.stage.loss)
        _one_of("stage.loss.aggregation", loss.pop("aggregation", AGGREGATIONS[0]), AGGREGATIONS)
        policy_loss_config_from_mapping(loss)
    except ValueError as exc:
        raise ConfigError(f"stage (kind: rl): {exc}") from None


def check_rollouts(job: JobConfig) -> None:
    """``stage.rl``'s prompts, sampling and updates of a stage that trains on its rollouts (kinds rl and
    distill_on_policy), and a layout rollouts run in."""
    rl, kind = job.stage.rl, job.stage.kind
    if not rl.prompts:
        raise ConfigError(f"stage.rl.prompts: set the RL prompt set (python -m data_tools build-rl) for kind: {kind}")
    for key in ("prompts_per_step", "group_size", "max_new_tokens", "updates_per_step"):
        _positive(f"stage.rl.{key}", getattr(rl, key))
    if not 0 <= rl.temperature or not 0 < rl.top_p <= 1:
        raise ConfigError(f"stage.rl.temperature={rl.temperature} must be >= 0 and stage.rl.top_p={rl.top_p} "
                          "in (0, 1]")
    if job.parallel.cp > 1 or job.parallel.vpp:
        raise ConfigError(f"stage.kind={kind} with parallel.cp={job.parallel.cp}, vpp={job.parallel.vpp}: rollouts "
                          "run without context parallelism or virtual pipeline stages")


def check_on_policy_distill_stage(job: JobConfig) -> None:
    """``kind: distill_on_policy``: the teacher of ``kind: distill`` and the rollouts of ``kind: rl``;
    the RL stage's rewards and policy loss have no place in it (refused rather than ignored)."""
    for key in ("rewards", "loss"):
        if getattr(job.stage, key):
            raise ConfigError(f"stage.{key}={getattr(job.stage, key)!r}: kind distill_on_policy has no rewards "
                              "or policy loss (its loss is the KL to stage.distill.teacher); remove it")
    check_rollouts(job)
    check_distill_stage(job)


def check_sequence_layout(seq_length: int, parallel: ParallelConfig) -> None:
    """A packed sequence must split over the layout: into 2*cp equal chunks (context parallelism), each
    of which splits over tp ranks with sequence parallelism."""
    multiple = 2 * parallel.cp if parallel.cp > 1 else 1
    if parallel.sequence_parallel:
        multiple *= parallel.tp
    if seq_length % multiple:
        parts = (["2*cp"] if parallel.cp > 1 else []) + (["tp"] if parallel.sequence_parallel else [])
        raise ConfigError(
            f"stage.seq_length={seq_length} is not divisible by {'*'.join(parts)} = {multiple} "
            f"(parallel.cp={parallel.cp}, parallel.tp={parallel.tp}, "
            f"sequence_parallel={parallel.sequence_parallel})")


def recompute_overrides(recompute: RecomputeSchema) -> dict:
    """``TransformerConfig`` fields for ``stage.recompute`` (``config_overrides`` of ``build_qwen3vl``)."""
    if recompute.granularity is None:
        return {}
    if recompute.granularity == "selective":
        return {"recompute_granularity": "selective"}
    return {"recompute_granularity": "full", "recompute_method": recompute.method,
            "recompute_num_layers": recompute.num_layers}


def stage_total_steps(job: JobConfig) -> int:
    """The stage's budget in optimizer steps (a token budget is rounded up to whole steps)."""
    if job.stage.train_steps is not None:
        return job.stage.train_steps
    tokens_per_step = job.train.global_batch_size * job.stage.seq_length
    return max(1, math.ceil(job.stage.train_tokens / tokens_per_step))


def check_batch_layout(train: TrainSchema, data_parallel_size: int, pp: int = 1, vpp: int | None = None) -> int:
    """Number of micro-batches per step; the global batch must split evenly over data-parallel ranks,
    and with the interleaved pipeline schedule (``vpp``) into whole groups of ``pp`` micro-batches
    (Megatron's schedule runs each virtual stage on ``pp`` consecutive micro-batches)."""
    per_step = train.micro_batch_size * data_parallel_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by "
            f"train.micro_batch_size*data_parallel_size = {train.micro_batch_size}*{data_parallel_size}"
        )
    micro_batches = train.global_batch_size // per_step
    if vpp and micro_batches % pp:
        raise ConfigError(
            f"parallel.vpp={vpp}: the interleaved pipeline schedule takes a multiple of parallel.pp={pp} "
            f"micro-batches per step, and train.global_batch_size={train.global_batch_size} gives "
            f"{micro_batches} (micro_batch_size {train.micro_batch_size} x data-parallel size {data_parallel_size})"
        )
    return micro_batches
