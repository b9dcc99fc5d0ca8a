"""Capacity planning: parameters, and memory per GPU, of Qwen3-VL training in a parallel layout.

Pure arithmetic on a :class:`model.config.Qwen3VLConfig`, a :class:`ParallelConfig` with its world size,
and a :class:`Workload` (sequence length, micro-batch, precision, optimizer, recomputation, visual
patches): no model, process group or device is needed. The command line is ``python -m pretrain.plan``
(it reads the job config, which lives in ``pretrain/``; ``model/`` must not import ``pretrain/``).

Parameters (:func:`parameter_counts`, :func:`stage_parameters`) follow the modules of
:mod:`model.qwen3vl` exactly: the counts equal those of the model built on the meta device
(``python -m model.sizes``; tested for the six published sizes).

Memory (:func:`plan_memory`) in bytes per GPU, for the pipeline stage that needs the most:

* **weights**: the stage's parameters on this rank (tensor, expert and pipeline splits), 2 bytes in
  bf16, 4 in fp32;
* **gradients**: Megatron DDP's gradient buffer, one element per *trainable* parameter, fp32 with
  ``grad_reduce_in_fp32`` (the trainer's setting) else the parameter dtype; never sharded;
* **optimizer state**: Adam's two fp32 moments, plus fp32 main parameters when the weights are bf16;
  with the distributed optimizer sharded over data x context parallel ranks (expert parameters: over
  the expert-data-parallel ranks, ``world / (ep * etp * pp)``), as Megatron's
  ``get_megatron_optimizer`` does;
* **activations**: what autograd stores for the backward pass in this project's layers (the
  ``document`` attention path: Megatron-Core local layers, our RMSNorm, per-document SDPA), counted
  tensor by tensor from the code (see :func:`decoder_layer_bytes`) for every micro-batch the pipeline
  schedule holds at once, with the recomputation setting (``selective``: the attention core;
  ``full``: only each recomputed group's input is kept, and one group is recomputed at a time in the
  backward pass). The sequence is split over context-parallel ranks (``s / cp`` tokens each; keys
  and values are all-gathered per layer) and, in the norms and residual stream, over tensor-parallel
  ranks with sequence parallelism. The ViT's work is shared by the CP ranks of the first pipeline
  stage, frame by frame (counted as ``1 / cp`` of the patches each: a pack of fewer images or frames
  than ranks puts more on some), and each keeps the full-sequence visual embeddings and DeepStack
  features until its forward pass ends. Frozen parts (``Workload.trainable``,
  the stage's ``trainable`` list) store less: a frozen ViT nothing (no gradient flows into it; the
  mergers, if trained, then keep their inputs), a frozen decoder not the inputs of its linear layers
  nor its norms' normalised values (Megatron's frozen-weight linear keeps only the weight), while
  gradients still flow through it to a trained merger (S0's alignment);
* **logits + loss**: the last stage's logits ``[s / cp, vocab / tp]`` and Megatron's cross entropy,
  which works in fp32 (bf16 logits + their fp32 copy at the peak);
* **working memory**: the largest short-lived buffers at the peak: the group of layers recomputed in
  the backward pass, gradients in flight, a weight-sized gradient before it is added to the buffer,
  the full-sequence embedding buffers while the visual features are merged.

The peak is the largest of four moments (the *phase*): the ViT and embedding merge (first stage),
the end of the forward pass (with the loss on the last stage), the loss's backward pass, the backward
pass through the decoder. The optimizer step adds nothing to the weights, gradients and optimizer state
with a fused Adam (transformer-engine's, on the GPU path; torch's foreach AdamW would add a copy of the
optimizer's shard). Not modelled: the CUDA context, NCCL buffers and allocator fragmentation (a few GB on a
GPU: keep that headroom in ``cluster.gpu_memory_gb``), pipeline send/receive buffers, load imbalance
between experts (tokens are assumed evenly routed), and transformer-engine's layers (the GPU path at
``cp = 1``), which store somewhat less than the local layers counted here. Validated on CPU in fp32
against the measured peak of real training steps (``tests/test_plan.py``).

Post-training stages add terms and moments:

* **RL** (``stage.kind: rl``; :class:`Rollout`, ``Workload(loss="policy")``): the policy update trains
  on rows of prompt + response, ``micro_batch_size`` rows per micro-batch, packed into one sequence
  (counted as that many rows of the planned prompt length + ``max_new_tokens``: the same tokens; the
  rows of one prompt share one ViT pass: :attr:`Workload.vision_rows`), and its loss keeps the
  response tokens' logits in fp32 (the gathered logits, their tempered copy, the cross entropy's
  softmax) on top of the bf16 logits of the whole row. Three more moments: the rollout's *prefill* (the
  prompts' forward without gradient, and the P prompts' keys and values in the KV cache), the rollout's
  *decoding* (the **KV cache**, :class:`model.kv_cache.KVCache`: the prompts' keys and values per layer
  of the stage, ``[P x prompt, kv heads / tp, head_dim]``, once per prompt for its G rows, and all P x G
  rows' responses, ``[rows, kv heads / tp, max_new_tokens, head_dim]``; plus one decoding step: the
  attention's left-padded fp32 copies of a layer's cached keys and values and its scores over prompt and
  response, the sampling's fp32/fp64 copies of the rows' logits), and the *old-policy
  log-probs* (a micro-batch's forward without gradient, its logits and the
  entropy's fp32 temporaries);
* a **frozen model** (:class:`FrozenModel`: an RL reference policy, GRPO's KL, or a distillation
  teacher) adds its weights in the job's layout, no gradients, no optimizer state; a *teacher* runs
  over every micro-batch of the step before the student's schedule, keeps its final hidden states
  ``[s, b, h]`` per micro-batch on the last stage until the student's loss turns them into its logits
  shard, and adds one more moment (*teacher forward*: one micro-batch's forward without gradient);
  the KL keeps the student's and teacher's logits and its fp32 temporaries (``Workload(loss="distill")``).

The forward without gradient (prefill, teacher, log-prob passes) is counted as its live working set:
the residual stream, the normalised input and the widest layer's intermediates (the MLP's), the ViT's
equivalent and the full-sequence embeddings and DeepStack features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.distributed.parallel import ParallelConfig
from model.config import Qwen3VLConfig

GB = 1e9  # bytes; GPU memory sizes in this project's configs are in these units

PARTS = ("vision", "merger", "language")  # the freezable parts (model.qwen3vl.FREEZABLE)
RECOMPUTE_GRANULARITIES = (None, "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
LOSSES = ("lm", "policy", "distill")  # Workload.loss
FROZEN_ROLES = ("reference", "teacher")  # FrozenModel.role

# Bytes per token of small per-layer tensors measured in the local layers (fp32 CPU, ``tests/test_plan``
# checks the totals): the MoE router (top-k indices, probabilities, aux-loss statistics) per expert and
# per selected expert, and the token dispatcher's index tensors.
_ROUTER_BYTES_PER_EXPERT = 4
_ROUTER_BYTES_PER_TOPK = 20
_DISPATCH_BYTES_PER_EXPERT = 5
_DISPATCH_BYTES_PER_TOPK = 8


# ----------------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class ParameterCounts:
    """Whole-model counts (no parallelism): ``active`` = what one token uses (all non-expert
    parameters plus ``top-k / experts`` of the expert ones), ``vision`` = ViT + mergers."""

    total: int
    active: int
    vision: int


def _vision_counts(cfg: Qwen3VLConfig, tp: int = 1) -> dict[str, int]:
    """ViT parameters (``vision``) and merger parameters (``merger``) on one tensor-parallel rank."""
    v = cfg.vision
    hv, fv, m, out = v.hidden_size, v.intermediate_size, v.merged_hidden_size, v.out_hidden_size
    layer = (2 * 2 * hv  # two LayerNorms (weight + bias), replicated
             + (3 * hv * hv + 3 * hv) // tp + hv * hv // tp + hv  # qkv (column), proj (row; bias replicated)
             + (fv * hv + fv) // tp + hv * fv // tp + hv)  # fc1 (column), fc2 (row)
    vision = v.patch_dim * hv + hv + v.num_position_embeddings * hv + v.depth * layer

    def merger(norm_width: int) -> int:
        return 2 * norm_width + (m * m + m) // tp + out * m // tp + out

    mergers = merger(hv) + cfg.num_deepstack * merger(m)
    return {"vision": vision, "merger": mergers}


def _decoder_layer_counts(cfg: Qwen3VLConfig, moe: bool, tp: int = 1, ep: int = 1, etp: int = 1) -> tuple[int, int]:
    """(dense, expert) parameters of one decoder layer on one rank."""
    t = cfg.text
    h, d = t.hidden_size, t.head_dim
    q, kv = t.num_attention_heads * d, t.num_key_value_heads * d
    dense = 2 * h + 2 * d + (q + 2 * kv) * h // tp + q * h // tp  # norms, QK-norms, qkv, proj
    if not moe:
        return dense + 3 * h * t.intermediate_size // tp, 0
    experts = t.num_experts // ep * 3 * h * t.moe_intermediate_size // etp
    return dense + t.num_experts * h, experts  # + the router (replicated)


def parameter_counts(cfg: Qwen3VLConfig) -> ParameterCounts:
    """Total, active and vision parameters of the whole model (``python -m model.sizes`` counts the
    same on the built model)."""
    t = cfg.text
    dense = experts = 0
    for moe in t.moe_layer_pattern():
        d, e = _decoder_layer_counts(cfg, bool(moe))
        dense, experts = dense + d, experts + e
    language = dense + experts + t.vocab_size * t.hidden_size * (1 if cfg.tie_word_embeddings else 2) + t.hidden_size
    vision = sum(_vision_counts(cfg).values())
    total = language + vision
    active = total - experts + (experts * t.num_experts_per_tok // t.num_experts if t.is_moe else 0)
    return ParameterCounts(total=total, active=active, vision=vision)


def _layers_of_stage(cfg: Qwen3VLConfig, parallel: ParallelConfig, stage: int) -> list[int]:
    """Global indexes of the decoder layers on pipeline rank ``stage`` (Megatron's even split, over
    ``pp * vpp`` model chunks, chunk ``c`` of rank ``r`` holding block ``c * pp + r``)."""
    layers = cfg.text.num_hidden_layers
    chunks = parallel.pp * (parallel.vpp or 1)
    if layers % chunks:
        raise ValueError(f"{layers} decoder layers do not split evenly over pp * vpp = {chunks} model chunks")
    per_chunk = layers // chunks
    return [i for c in range(parallel.vpp or 1) for i in range((c * parallel.pp + stage) * per_chunk,
                                                                (c * parallel.pp + stage + 1) * per_chunk)]


def stage_parameters(cfg: Qwen3VLConfig, parallel: ParallelConfig, stage: int) -> dict[tuple[str, bool], int]:
    """Parameters of one rank of pipeline stage ``stage``: ``{(part, is_expert): count}`` with part in
    :data:`PARTS`. The ViT, mergers and token embedding live on the first stage, the final norm and
    the output layer on the last (with tied embeddings and ``pp > 1`` the last stage holds a copy of
    the embedding as its output layer, as Megatron does)."""
    t = cfg.text
    tp, ep, etp = parallel.tp, parallel.ep, parallel.expert_tp
    first, last = stage == 0, stage == parallel.pp - 1
    counts = {(part, expert): 0 for part in PARTS for expert in (False, True)}
    pattern = t.moe_layer_pattern()
    for i in _layers_of_stage(cfg, parallel, stage):
        dense, experts = _decoder_layer_counts(cfg, bool(pattern[i]), tp, ep, etp)
        counts["language", False] += dense
        counts["language", True] += experts
    embedding = t.vocab_size * t.hidden_size // tp
    if first:
        for part, n in _vision_counts(cfg, tp).items():
            counts[part, False] += n
        counts["language", False] += embedding
    if last:
        counts["language", False] += t.hidden_size  # final norm
        if not (cfg.tie_word_embeddings and first):
            counts["language", False] += embedding  # output layer (a synchronised copy when tied)
    return counts


# ----------------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class Workload:
    """What each rank trains on, per optimizer step.

    ``micro_batches``: micro-batches per step per data-parallel rank (the pipeline holds up to ``pp``
    of them at once). ``visual_patches``: ViT patches in one packed sequence (0: text only).
    ``trainable``: the parts that get gradients and optimizer state. ``vision_rows``: sequences per
    micro-batch whose images the ViT encodes (default: every one, ``micro_batch_size``; RL rows of one
    prompt share one ViT pass). ``loss``: ``lm`` (cross entropy on every token), ``policy`` (RL: the
    log-probs of the last ``response_tokens`` tokens of every row) or ``distill`` (KL to a teacher's
    logits on every token).
    """

    seq_length: int
    micro_batch_size: int = 1
    micro_batches: int = 1
    visual_patches: int = 0
    bf16: bool = True
    grad_reduce_in_fp32: bool = True
    distributed_optimizer: bool = True
    recompute: str | None = None  # None | "selective" | "full"
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    trainable: tuple[str, ...] = PARTS
    vision_rows: int | None = None
    loss: str = "lm"
    response_tokens: int = 0

    def __post_init__(self):
        if self.recompute not in RECOMPUTE_GRANULARITIES:
            raise ValueError(f"recompute={self.recompute!r}: must be one of {list(RECOMPUTE_GRANULARITIES)}")
        if self.recompute_method not in RECOMPUTE_METHODS:
            raise ValueError(f"recompute_method={self.recompute_method!r}: must be one of {list(RECOMPUTE_METHODS)}")
        for name in ("seq_length", "micro_batch_size", "micro_batches", "recompute_num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be positive")
        if self.visual_patches < 0:
            raise ValueError(f"visual_patches={self.visual_patches}: must be 0 or more")
        unknown = sorted(set(self.trainable) - set(PARTS))
        if unknown:
            raise ValueError(f"trainable parts {unknown} unknown; known: {list(PARTS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: must be one of {list(LOSSES)}")
        if self.loss == "policy" and not 0 < self.response_tokens <= self.seq_length:
            raise ValueError(f"response_tokens={self.response_tokens}: a policy loss needs 1 to seq_length="
                             f"{self.seq_length} response tokens per row")
        if self.vision_rows is not None and not 0 <= self.vision_rows <= self.micro_batch_size:
            raise ValueError(f"vision_rows={self.vision_rows}: must be in [0, micro_batch_size="
                             f"{self.micro_batch_size}]")

    @property
    def image_sequences(self) -> int:
        """Sequences per micro-batch whose ``visual_patches`` the ViT encodes."""
        return self.micro_batch_size if self.vision_rows is None else self.vision_rows

    @property
    def act_bytes(self) -> int:
        return 2 if self.bf16 else 4


@dataclass(frozen=True)
class Rollout:
    """The rollouts of an RL step on one data-parallel rank (:mod:`pretrain.posttrain.rollout`): the
    rank's ``prompts`` prompts in one batch, ``group_size`` responses each, up to ``max_new_tokens``
    tokens; ``prompt_tokens``: the longest prompt's tokens, its visual tokens included (every prompt is
    counted at that length: the KV cache holds prompts unpadded, a decoding step's attention lays them
    out left-padded to it); ``visual_patches``: ViT patches per prompt (the prefill encodes every
    prompt's images once)."""

    prompts: int
    group_size: int
    prompt_tokens: int
    max_new_tokens: int
    visual_patches: int = 0

    def __post_init__(self):
        for name in ("prompts", "group_size", "prompt_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout {name}={getattr(self, name)}: must be positive")
        if self.visual_patches < 0:
            raise ValueError(f"rollout visual_patches={self.visual_patches}: must be 0 or more")

    @property
    def rows(self) -> int:
        return self.prompts * self.group_size

    @property
    def positions(self) -> int:
        """Positions of a row: the longest prompt and the longest possible response."""
        return self.prompt_tokens + self.max_new_tokens


@dataclass(frozen=True)
class FrozenModel:
    """A model without gradients or optimizer state beside the trained one, in the same layout
    (``pretrain.posttrain.distill_stage.build_frozen_model``): ``role="reference"``, an RL reference
    policy (log-probs only, before the updates), or ``role="teacher"``, a distillation teacher (see the
    module docstring)."""

    cfg: Qwen3VLConfig
    role: str

    def __post_init__(self):
        if self.role not in FROZEN_ROLES:
            raise ValueError(f"frozen model role={self.role!r}: must be one of {list(FROZEN_ROLES)}")


TERMS = ("weights", "gradients", "optimizer state", "decoder activations", "vision activations",
         "logits + loss", "working memory")
# Terms of post-training plans only, after the first three of TERMS: a frozen model's weights, the
# rollouts' KV cache, a teacher's activations (its hidden states kept for the loss, its forward).
FROZEN_WEIGHTS = {"reference": "reference weights", "teacher": "teacher weights"}
KV_CACHE = "KV cache"
TEACHER_ACTIVATIONS = "teacher activations"


@dataclass
class MemoryPlan:
    """Bytes per GPU at the peak of the pipeline stage that needs the most (``stage``), by term
    (:data:`TERMS`, and for post-training the terms named after it), with the moment of the peak
    (``phase``), every stage's peak and the totals of every moment of this stage."""

    stage: int
    phase: str
    terms: dict[str, float]
    stage_totals: list[float] = field(default_factory=list)
    phase_totals: dict[str, float] = field(default_factory=dict)  # of this stage

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def largest(self) -> tuple[str, float]:
        name = max(self.terms, key=self.terms.get)
        return name, self.terms[name]


@dataclass(frozen=True)
class _Shape:
    """Token counts and widths of one rank (per micro-batch)."""

    n: int  # tokens in the tensor-parallel region (b * s / cp)
    n_sp: int  # tokens in the sequence-parallel region (n / tp with sequence parallelism)
    tp: int
    cp: int
    etp: int
    a: int  # activation bytes


def workload_shape(parallel: ParallelConfig, work: Workload) -> _Shape:
    """Tokens and widths of one rank for :func:`decoder_layer_bytes`."""
    n = work.micro_batch_size * work.seq_length // parallel.cp
    n_sp = n // parallel.tp if parallel.sequence_parallel else n
    return _Shape(n, n_sp, parallel.tp, parallel.cp, parallel.expert_tp, work.act_bytes)


def _norm_bytes(width: float, a: int, input_is_new: bool = True, rows: int = 1, frozen: bool = False) -> float:
    """What our RMSNorm stores for ``rows`` rows of ``width``: its input in fp32 (a copy in bf16; in fp32
    the input itself, new storage only when ``input_is_new``), the normalised value (only for the
    weight's gradient: not when ``frozen``), the fp32 1/rms."""
    stored_input = 4 if (a == 2 or input_is_new) else 0
    return (stored_input + (0 if frozen else a)) * width + 4 * rows


def decoder_layer_bytes(cfg: Qwen3VLConfig, moe: bool, shape: _Shape, recompute: str | None,
                        frozen: bool = False) -> float:
    """Bytes one decoder layer stores for the backward pass, per micro-batch on one rank, when it is not
    recomputed as a whole (``recompute`` None or ``selective``).

    Counted from the local layers (tests/test_plan.py measures the totals): per token of the
    sequence-parallel region the two norms (input, normalised value, output: the next linear's
    input); per token of the tensor-parallel region the fused qkv output, the QK-norms, the rotary
    cos/sin, the rotated q and k, the attention output and its log-sum-exp, the projection's input,
    and the SwiGLU MLP (fc1 output, silu output, the linear half, their product). MoE layers store the
    router's tensors and, per routed token copy, the expert MLP's input and intermediates; with
    context parallelism each layer keeps the all-gathered keys and values of the whole sequence.

    ``frozen`` (the language model not trained, gradients still flowing through it): the linear layers
    keep only their weights, so their inputs (the norms' outputs, the projection's and fc2's inputs,
    each expert's input and fc2 input) and the norms' normalised values are not stored; the MoE
    router keeps its input.
    """
    t = cfg.text
    n, n_sp, tp, cp, a = shape.n, shape.n_sp, shape.tp, shape.cp, shape.a
    h, d = t.hidden_size, t.head_dim
    heads = t.num_attention_heads // tp
    groups = max(1, t.num_key_value_heads // tp)
    hq, hkv = heads * d, groups * d
    # Residual stream: input norm + its output (qkv input), post-attention norm + its output (the MLP's or
    # the router's input).
    if not frozen:
        total = n_sp * 2 * (_norm_bytes(h, a) + a * h)
    else:
        total = n_sp * (2 * _norm_bytes(h, a, frozen=True) + (a * h if moe else 0))
    per_token = a * (hq + 2 * hkv)  # fused qkv output (v stays a view of it)
    per_token += 4 * d * a  # cos and sin of q and of k
    q_copy = groups > 1 and heads > groups  # reshaping q out of the fused output copies it
    per_token += (a * hq if q_copy and a == 4 else 0) + _norm_bytes(hq, a, False, heads, frozen)
    per_token += _norm_bytes(hkv, a, False, groups, frozen)
    per_token += a * hq  # rotated q
    if recompute == "selective" or cp == 1:
        per_token += a * hkv  # rotated k (v is the fused output's view)
    else:
        per_token += 2 * a * hkv * cp  # keys and values of the whole sequence (all-gathered)
    if recompute != "selective":
        per_token += a * hq + 4 * heads  # attention output and log-sum-exp
    if not frozen:
        per_token += a * hq  # projection input
    total += n * per_token
    if not moe:
        total += n * (4 if frozen else 5) * a * t.intermediate_size // tp
    else:
        k, e = t.num_experts_per_tok, t.num_experts
        # Each rank routes its sequence-parallel tokens; with expert tensor parallelism the routed copies
        # are all-gathered over the etp ranks, each of which computes 1/etp of every expert's width.
        total += n_sp * (_ROUTER_BYTES_PER_EXPERT * e + _ROUTER_BYTES_PER_TOPK * k
                         + _DISPATCH_BYTES_PER_EXPERT * e + _DISPATCH_BYTES_PER_TOPK * k)
        ffn = t.moe_intermediate_size // shape.etp
        # per routed copy: the expert's input, fc1 output, silu output, linear half, their product, x prob
        # (the last is fc2's input; it and the expert's input are not kept when frozen)
        total += n_sp * shape.etp * k * (a * (5 * ffn if frozen else h + 6 * ffn) + 4)
    return total


def vision_bytes(cfg: Qwen3VLConfig, patches: int, tp: int, a: int, recompute: str | None,
                 trainable: tuple[str, ...] = PARTS) -> float:
    """Bytes the ViT and mergers store for one packed sequence of ``patches`` patches (first stage).

    Per patch: the pixels, and per layer (not recomputed) the two LayerNorm inputs and outputs, the
    fused qkv output, the rotated q and k, the attention output and log-sum-exp, the projection input,
    the GELU MLP's two intermediates, the rotary cos/sin; ``full`` recomputation keeps only each
    layer's input. The mergers (not recomputed) keep their norm, fc1 and GELU tensors.

    ``trainable`` without ``vision``: the ViT stores nothing; the mergers, if ``merger`` is trained,
    keep their norm's input (the outputs of the DeepStack layers and of the last layer), norm output,
    fc1 and GELU outputs; with neither, nothing is stored.
    """
    if patches == 0 or not {"vision", "merger"} & set(trainable):
        return 0.0
    v = cfg.vision
    mergers = 1 + cfg.num_deepstack
    if "vision" not in trainable:
        inputs = len(set(v.deepstack_visual_indexes) | {v.depth - 1})  # layer outputs the mergers read
        return patches * a * (inputs * v.hidden_size + mergers * (v.hidden_size + 2 * v.hidden_size // tp))
    hv, fv, heads = v.hidden_size, v.intermediate_size, v.num_heads // tp
    per_patch = a * v.patch_dim + 48  # pixels; position-embedding taps and rotary angles
    if recompute == "full":
        layer = a * hv
    else:
        layer = a * (4 * hv + 7 * hv // tp + 2 * fv // tp + 4 * v.head_dim) + 4 * (heads + 4)
        if recompute == "selective":
            layer -= a * hv // tp + 4 * heads
    per_patch += v.depth * layer
    # Mergers (a 2x2 block of patches -> one token: per patch hv of the merged width): the main one keeps
    # its input (the last layer's output) and norm output, each DeepStack one its norm output (its input
    # is a layer's output, kept anyway), both their fc1 output and GELU output (split over TP).
    per_patch += a * (2 * hv + 2 * hv // tp) + cfg.num_deepstack * a * (hv + 2 * hv // tp)
    return patches * per_patch


def _static_bytes(cfg: Qwen3VLConfig, parallel: ParallelConfig, world_size: int, work: Workload,
                  stage: int) -> dict[str, float]:
    params = stage_parameters(cfg, parallel, stage)
    weight_bytes = 2 if work.bf16 else 4
    grad_bytes = 4 if work.grad_reduce_in_fp32 else weight_bytes
    # Adam moments (fp32), plus fp32 main parameters when the model is bf16.
    state_bytes = 8 + (4 if work.bf16 else 0)
    dense_shards = world_size // (parallel.tp * parallel.pp) if work.distributed_optimizer else 1
    expert_shards = world_size // (parallel.ep * parallel.expert_tp * parallel.pp) if work.distributed_optimizer else 1
    weights = sum(params.values()) * weight_bytes
    trainable = {key: n for key, n in params.items() if key[0] in work.trainable}
    gradients = sum(trainable.values()) * grad_bytes
    optimizer = sum(n * state_bytes / (expert_shards if expert else dense_shards)
                    for (_, expert), n in trainable.items())
    return {"weights": weights, "gradients": gradients, "optimizer state": optimizer}


def held_chunks(parallel: ParallelConfig, micro_batches: int, stage: int) -> tuple[int, list[int]]:
    """The most micro-batches' chunks whose forward pass a pipeline stage has run and whose backward pass
    it has not, at any time of a step of ``micro_batches`` (per data-parallel rank): (over all its model
    chunks, per model chunk). Megatron's schedules:
    1F1B runs ``pp - stage - 1`` warm-up forwards, then one forward and one backward in turn; the
    interleaved one ``2 * (pp - stage - 1) + (vpp - 1) * pp`` warm-up forwards, forwards in the order of
    its schedule table (groups of ``pp`` micro-batches chunk by chunk) and backwards in the same order
    with the chunks reversed. So chunk 0 (the ViT's) holds up to ``2 pp`` micro-batches, not ``pp``."""
    from megatron.core.pipeline_parallel.schedules import get_schedule_table

    pp, vpp, m = parallel.pp, parallel.vpp or 1, micro_batches
    if vpp == 1:
        held = min(pp - stage, m)
        return held, [held]
    chunks = [c for _, c in get_schedule_table(m, vpp, pp)]
    warmup = min(2 * (pp - stage - 1) + (vpp - 1) * pp, len(chunks))
    held, peak_total, peak = [0] * vpp, 0, [0] * vpp
    backward = iter(vpp - 1 - c for c in chunks)
    for k, c in enumerate(chunks):
        held[c] += 1
        peak_total, peak = max(peak_total, sum(held)), [max(a, b) for a, b in zip(peak, held)]
        if k >= warmup:  # the steady state: each forward is followed by the oldest backward
            held[next(backward)] -= 1
    return peak_total, peak


def _in_flight(parallel: ParallelConfig, work: Workload, stage: int) -> float:
    """Micro-batches whose activations a stage holds at once, in units of the stage's layers (a model
    chunk is ``1 / vpp`` of them): 1F1B holds ``pp - stage`` (at most the step's micro-batches); the
    interleaved schedule ``2 * (pp - stage - 1) + (vpp - 1) * pp + 1`` chunks (:func:`held_chunks`)."""
    return held_chunks(parallel, work.micro_batches, stage)[0] / (parallel.vpp or 1)


def kv_cache_bytes(cfg: Qwen3VLConfig, parallel: ParallelConfig, stage: int, rows: int, positions: int,
                   a: int) -> float:
    """A KV cache on one rank of pipeline stage ``stage``: for each of the stage's decoder layers, keys and
    values of ``positions`` positions of ``rows`` rows, ``kv heads / tp`` heads of ``head_dim``, ``a`` bytes."""
    t = cfg.text
    groups = max(1, t.num_key_value_heads // parallel.tp)
    return 2.0 * len(_layers_of_stage(cfg, parallel, stage)) * positions * rows * groups * t.head_dim * a


def _layer_forward_bytes(cfg: Qwen3VLConfig, moe: bool, n: int, n_sp: int, tp: int, etp: int, a: int) -> float:
    """Bytes live at the peak of one decoder layer's forward without gradients: its input (the residual
    stream, sequence-parallel region) and normalised input (gathered), then the larger of the
    attention's intermediates (fused qkv output, rotated q and k, attention output) and the MLP's
    (SwiGLU: fc1 output, SiLU output, their product; MoE: the router's fp32 scores and, per routed copy,
    the expert's input and those)."""
    t = cfg.text
    h, d = t.hidden_size, t.head_dim
    hq, hkv = t.num_attention_heads // tp * d, max(1, t.num_key_value_heads // tp) * d
    attention = n * a * ((hq + 2 * hkv) + (hq + hkv) + hq)
    if moe:
        k, e, ffn = t.num_experts_per_tok, t.num_experts, t.moe_intermediate_size // etp
        mlp = n_sp * (4 * e + etp * k * a * (h + 4 * ffn))
    else:
        mlp = n * a * 4 * t.intermediate_size // tp
    return a * (n_sp + n) * h + max(attention, mlp)


def _vision_forward_bytes(cfg: Qwen3VLConfig, patches: int, tp: int, a: int) -> float:
    """Bytes live at the peak of the ViT's forward without gradients over ``patches`` patches, beyond
    its input pixels: a layer's input and normalised input, the larger of its attention's (qkv, attention
    output, projection input) and MLP's (fc1 and GELU outputs) intermediates, the DeepStack features."""
    if patches == 0:
        return 0.0
    v = cfg.vision
    layer = max(5 * v.hidden_size // tp, 2 * v.intermediate_size // tp)
    merged = patches // v.spatial_merge_size ** 2
    return patches * a * (2 * v.hidden_size + layer) + cfg.num_deepstack * merged * a * v.out_hidden_size


def forward_bytes(cfg: Qwen3VLConfig, parallel: ParallelConfig, stage: int, tokens: int, patches: int,
                  a: int) -> float:
    """Bytes live at the peak of a forward without gradients (a rollout's prefill, a log-prob pass, a
    distillation teacher) over ``tokens`` tokens holding ``patches`` ViT patches, on one rank of pipeline
    stage ``stage``, beyond the weights: on the first stage the pixels, the ViT, then the full-sequence
    embeddings and DeepStack features (twice while they are merged), kept through the stage's layers;
    the rotary angles; the stage's widest decoder layer (:func:`_layer_forward_bytes`). The logits are
    not in it."""
    t = cfg.text
    n = tokens // parallel.cp
    n_sp = n // parallel.tp if parallel.sequence_parallel else n
    pattern = t.moe_layer_pattern()
    layer = max(_layer_forward_bytes(cfg, bool(pattern[i]), n, n_sp, parallel.tp, parallel.expert_tp, a)
                for i in _layers_of_stage(cfg, parallel, stage))
    rotary = 4 * t.head_dim * n  # fp32 angles of the sequence, shared by the layers
    if stage != 0 or not patches:
        return rotary + layer
    held = (1 + cfg.num_deepstack) * a * t.hidden_size * tokens
    pixels = patches * cfg.vision.patch_dim * a
    return pixels + max(_vision_forward_bytes(cfg, patches, parallel.tp, a), 2 * held, held + rotary + layer)


def _decoding_bytes(cfg: Qwen3VLConfig, parallel: ParallelConfig, stage: int, rollout: Rollout, a: int) -> float:
    """Bytes of one decoding step of all the rollout's rows beside the KV cache: in a layer, the attention
    (:meth:`model.kv_cache.KVCache.attend`: the prompts' keys, then values, gathered left-padded and
    their fp32 copy; below fp32 an fp32 copy of the rows' response keys and values; the fp32 scores over
    prompt and response of every query head: their matmul outputs, the prompts' grid and the rows'
    gather, scaled, masked and their softmax, and the probabilities' prompts' grid); on the last stage,
    after the layers, the sampling's copies of the rows'
    gathered logits (the logits, an fp32 copy, the fp32 log-softmax and its sorted copy, the int64 sort
    order, the fp64 probabilities and their cumulative sum). The new tokens' own tensors are negligible."""
    t = cfg.text
    rows, new, prompt = rollout.rows, rollout.max_new_tokens, rollout.prompt_tokens
    groups = max(1, t.num_key_value_heads // parallel.tp)
    heads = t.num_attention_heads // parallel.tp
    upcast = ((2 * 4 * new * rows if a != 4 else 0) + (a + 4) * prompt * rollout.prompts) * groups * t.head_dim
    scores = rows * heads * (prompt + new)
    layer = upcast + scores * (4 * 4 + 16)
    sampling = rows * t.vocab_size * (a + 4 + 4 + 4 + 8 + 8 + 8) if stage == parallel.pp - 1 else 0.0
    return max(layer, sampling)


def loss_bytes(cfg: Qwen3VLConfig, parallel: ParallelConfig, work: Workload) -> float:
    """The last stage's logits and loss tensors of one micro-batch at the loss (bytes).

    ``lm``: Megatron's cross entropy in fp32 (the logits ``[s / cp, vocab / tp]`` + their fp32 copy in
    bf16). ``policy`` (:func:`pretrain.posttrain.rollout.response_logprobs`): the logits of the whole
    rows, and for the response tokens their gathered copy, its fp32 tempered copy and the masked copy the cross
    entropy turns into its softmax in place (``a + 8`` bytes per response token and vocabulary entry); the rows
    of a micro-batch are one packed sequence ``[1, L]``, whose logits the model's ``[s, b] -> [b, s]`` transpose
    does not copy. ``distill`` (:func:`pretrain.posttrain.distill.vocab_parallel_forward_kl`): the student's and
    the teacher's logits, and the KL's fp32 temporaries at its peak (both log-softmaxes, the teacher's
    probabilities, the log-ratio product, a zero fill, its mask and the per-entry terms: 25 bytes).
    """
    n, a = workload_shape(parallel, work).n, work.act_bytes
    vocab = cfg.text.vocab_size // parallel.tp
    if work.loss == "lm":
        return (4 + (a if a == 2 else 0)) * n * vocab
    if work.loss == "distill":
        return (2 * a + 25) * n * vocab
    return (a * n + (a + 8) * work.micro_batch_size * work.response_tokens) * vocab


def _logprob_bytes(cfg: Qwen3VLConfig, parallel: ParallelConfig, work: Workload) -> float:
    """The last stage's logits and log-prob tensors of one micro-batch in the no-gradient old-policy
    pass (:func:`pretrain.posttrain.rollout.sequence_logprobs` with the entropy): the rows' logits, the
    response tokens' fp32 logits and the entropy's fp32 temporaries (shifted logits, their exp, its
    positivity mask, the product, a zero fill and the selected terms: 25 bytes per entry with them)."""
    n, a = workload_shape(parallel, work).n, work.act_bytes
    vocab = cfg.text.vocab_size // parallel.tp
    return (a * n + 25 * work.micro_batch_size * work.response_tokens) * vocab


def plan_memory(cfg: Qwen3VLConfig, parallel: ParallelConfig, world_size: int, work: Workload,
                rollout: Rollout | None = None, frozen: FrozenModel | None = None) -> MemoryPlan:
    """Peak memory per GPU of training ``cfg`` in ``parallel`` over ``world_size`` ranks (see the
    module docstring for the terms); the stage with the largest peak. ``rollout``: an RL stage's
    rollouts (with ``work.loss == "policy"``); ``frozen``: its reference policy or a distillation
    teacher (with ``work.loss == "distill"``; a distillation plan without one counts the student and
    the KL only)."""
    parallel.data_parallel_size(world_size)  # raises on a layout that does not fit the world size
    if (rollout is not None) != (work.loss == "policy"):
        raise ValueError("an RL plan takes both a Rollout and Workload(loss='policy')")
    if frozen is not None and (frozen.role == "teacher") != (work.loss == "distill"):
        loss = "distill" if frozen.role == "teacher" else "policy"
        raise ValueError(f"a {frozen.role} goes with Workload(loss={loss!r})")
    plans = [_plan_stage(cfg, parallel, world_size, work, stage, rollout, frozen) for stage in range(parallel.pp)]
    worst = max(plans, key=lambda p: p.total)
    worst.stage_totals = [p.total for p in plans]
    return worst


def _plan_stage(cfg: Qwen3VLConfig, parallel: ParallelConfig, world_size: int, work: Workload,
                stage: int, rollout: Rollout | None, frozen: FrozenModel | None) -> MemoryPlan:
    t = cfg.text
    shape = workload_shape(parallel, work)
    n, n_sp, a = shape.n, shape.n_sp, shape.a
    h, tp = t.hidden_size, parallel.tp
    first, last = stage == 0, stage == parallel.pp - 1
    static = _static_bytes(cfg, parallel, world_size, work, stage)
    param_bytes = 2 if work.bf16 else 4
    pattern = t.moe_layer_pattern()
    layers = _layers_of_stage(cfg, parallel, stage)
    b, s = work.micro_batch_size, work.seq_length

    # Decoder: what one micro-batch stores, and the largest group recomputed at once in the backward pass.
    frozen_decoder = "language" not in work.trainable
    full_layers = [decoder_layer_bytes(cfg, bool(pattern[i]), shape, work.recompute, frozen_decoder)
                   for i in layers]
    k = work.recompute_num_layers
    recomputed_group = 0.0
    if work.recompute == "full":
        chunk = len(layers) // (parallel.vpp or 1)
        chunk_layers = [full_layers[c * chunk:(c + 1) * chunk] for c in range(parallel.vpp or 1)]
        layer_input = a * h * n_sp
        stored = 0.0
        for group in chunk_layers:
            if work.recompute_method == "uniform":
                starts = range(0, len(group), k)
                stored += len(starts) * layer_input
                recomputed_group = max([recomputed_group] + [sum(group[i:i + k]) for i in starts])
            else:  # block: the first k layers of each chunk recomputed one by one, the others stored
                stored += min(k, len(group)) * layer_input + sum(group[k:])
                recomputed_group = max([recomputed_group] + group[:k])
        stored += 4 * t.head_dim * n  # rotary angles, kept once for all groups
        if first and work.visual_patches:
            stored += cfg.num_deepstack * a * h * n_sp  # DeepStack features, an input of every group
    else:
        stored = sum(full_layers)
    if last:  # final norm and the output layer's input (frozen: its 1/rms and fp32 input only)
        stored += n_sp * (_norm_bytes(h, a, frozen=frozen_decoder) + (0 if frozen_decoder else a * h))
    in_flight = _in_flight(parallel, work, stage)
    decoder = in_flight * stored

    # Vision (first stage): the ViT's stored tensors per micro-batch in flight (each of its sequences'
    # images); the embeddings and DeepStack features of the whole sequence, kept until the micro-batch's
    # forward pass ends.
    vision = held = merge = 0.0
    images = work.image_sequences * work.visual_patches
    if first and images:
        # The CP ranks share the ViT's work, frame by frame (model.context_parallel.encode_over_cp).
        patches = -(-work.visual_patches // parallel.cp)
        vision = held_chunks(parallel, work.micro_batches, 0)[1][0] * work.image_sequences * vision_bytes(
            cfg, patches, tp, a, work.recompute, work.trainable)
        if "vision" not in work.trainable:  # a frozen ViT's forward: one layer's tensors live at a time
            merge = _vision_forward_bytes(cfg, patches, tp, a) * work.image_sequences
        held = (1 + cfg.num_deepstack) * a * h * b * s
        # while merging: the token embeddings, the scattered copies
        merge = max(merge, (1 + cfg.num_deepstack) * a * h * b * s)

    # Gradients in flight in the backward pass of a layer: the residual stream's two gradients, the
    # widest intermediate's gradient, a weight-sized gradient before it is added to the buffer.
    if any(pattern[i] for i in layers):
        widest = max(n * 2 * t.intermediate_size // tp if not all(pattern) else 0,
                     # etp x the routed copies, 1/etp of the width each
                     n_sp * t.num_experts_per_tok * 2 * t.moe_intermediate_size)
        weight = 2 * h * t.moe_intermediate_size // parallel.expert_tp  # one expert's fc1
    else:
        widest = n * 2 * t.intermediate_size // tp
        weight = 2 * h * t.intermediate_size // tp  # fc1
    backward = a * (2 * h * n_sp + widest) + (0 if frozen_decoder else param_bytes * weight)
    # Megatron's global buffer for the sequence-parallel all-gathers, kept from the first one on
    sp_buffer = a * h * n if parallel.sequence_parallel else 0.0

    # Logits and the loss (last stage; see loss_bytes).
    vocab = t.vocab_size // tp
    logits = loss_bytes(cfg, parallel, work) if last else 0.0
    output_weight_grad = param_bytes * vocab * h if last else 0.0

    phases = {
        # everything stored; the first stage's forward pass still holds the whole sequence's visual features
        "forward end (logits + loss)" if last else "forward end": {
            "decoder activations": decoder, "vision activations": vision + held, "logits + loss": logits,
            "working memory": sp_buffer},
        # the loss's backward: the logits' gradient, the output layer's weight-sized gradient
        "loss backward": {
            "decoder activations": decoder, "vision activations": vision, "logits + loss": logits,
            "working memory": sp_buffer + output_weight_grad + a * h * n},
        "decoder backward": {
            "decoder activations": decoder, "vision activations": vision, "logits + loss": 0.0,
            "working memory": sp_buffer + recomputed_group + backward},
        # the micro-batches already in flight, this one's ViT tensors and the merge's full-sequence buffers
        "vision encoder and embedding merge": {
            "decoder activations": decoder * (in_flight - 1) / in_flight, "vision activations": vision + held,
            "logits + loss": 0.0, "working memory": sp_buffer + merge},
    }
    if not last:
        del phases["loss backward"]
    if not (first and images):
        del phases["vision encoder and embedding merge"]

    names = list(TERMS)
    if rollout is not None:
        names.insert(3, KV_CACHE)
        phases.update(_rollout_phases(cfg, parallel, work, rollout, stage))
    base = dict(static)
    if frozen is not None:
        weights = FROZEN_WEIGHTS[frozen.role]
        names.insert(3, weights)
        try:
            base[weights] = sum(stage_parameters(frozen.cfg, parallel, stage).values()) * param_bytes
        except ValueError as exc:
            raise ValueError(f"the {frozen.role}: {exc}") from None
        if frozen.role == "teacher":
            names.insert(names.index("logits + loss"), TEACHER_ACTIVATIONS)
            # the teacher's final hidden states [s, b, h] of every micro-batch of the step, on the last stage
            kept = work.micro_batches * a * frozen.cfg.text.hidden_size * n_sp if last else 0.0
            for extra in phases.values():
                extra[TEACHER_ACTIVATIONS] = kept
            phases["teacher forward"] = {TEACHER_ACTIVATIONS: kept + forward_bytes(
                frozen.cfg, parallel, stage, b * s, images, a)}
    totals = {phase: sum({**base, **extra}.values()) for phase, extra in phases.items()}
    peak = max(totals, key=totals.get)
    terms = {**base, **phases[peak]}
    return MemoryPlan(stage=stage, phase=peak, terms={name: terms.get(name, 0.0) for name in names},
                      phase_totals=totals)


def _rollout_phases(cfg: Qwen3VLConfig, parallel: ParallelConfig, work: Workload, rollout: Rollout,
                    stage: int) -> dict[str, dict[str, float]]:
    """The moments of an RL step outside the policy update (beside the weights, gradients, optimizer
    state and a reference policy's weights, which stay): the rollout's prefill (the prompts' keys and
    values, a layer's twice, their forward), its decoding (the prompts' and every row's response keys and values in the KV
    cache, the prefill's inputs or one step),
    the old-policy log-probs of one micro-batch (its forward, then its logits; a reference policy's
    log-probs take the same pass without the entropy, less)."""
    a, last = work.act_bytes, stage == parallel.pp - 1
    prompts, patches = rollout.prompts, rollout.prompts * rollout.visual_patches
    pixels = patches * cfg.vision.patch_dim * a if stage == 0 else 0.0
    prefill = forward_bytes(cfg, parallel, stage, prompts * rollout.prompt_tokens, patches, a)
    forward = forward_bytes(cfg, parallel, stage, work.micro_batch_size * work.seq_length,
                            work.image_sequences * work.visual_patches, a)
    logprobs = _logprob_bytes(cfg, parallel, work) if last else 0.0
    return {
        "rollout prefill": {
            # a layer's keys and values twice while they are copied (model.kv_cache.KVCache.store_prompts)
            KV_CACHE: kv_cache_bytes(cfg, parallel, stage, prompts, rollout.prompt_tokens, a)
            * (1 + 1 / len(_layers_of_stage(cfg, parallel, stage))),
            "working memory": prefill},
        "rollout decoding": {
            KV_CACHE: kv_cache_bytes(cfg, parallel, stage, prompts, rollout.prompt_tokens, a)
            + kv_cache_bytes(cfg, parallel, stage, rollout.rows, rollout.max_new_tokens, a),
            "working memory": max(pixels, _decoding_bytes(cfg, parallel, stage, rollout, a))},
        # the forward's working set, then (last stage) the logits: never both at once
        "old-policy log-probs": {"logits + loss": logprobs, "working memory": 0.0} if logprobs >= forward else
                                {"logits + loss": 0.0, "working memory": forward},
    }
