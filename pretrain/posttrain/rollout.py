"""Rollouts: G sampled responses per prompt from the current policy, in the training job's own layout.

``generate_rollouts(model, prompts, cfg, tokenizer, step=...)`` samples ``cfg.group_size`` responses
for each prompt (temperature and top-p sampling, up to ``cfg.max_new_tokens`` or a stop token) and
returns them in the batch layout of :mod:`pretrain.posttrain` (B = prompts * G, the G responses of
prompt p at rows ``p*G .. p*G + G - 1``, per-token tensors [B, T] with a response mask).
``sequence_logprobs(model, prompts, rollouts)`` gives the per-token log-probs of given responses in
one batched forward (old-policy and reference log-probs, or the current policy's with gradient).

A prompt is a dict as :func:`pretrain.generate.encode_prompt` builds it from the SFT chat template:
``input_ids`` [s] int, ``position_ids`` [3, s] (MRoPE; optional for text, which counts 0..s-1 on all
axes) and, with media, ``pixel_values`` + ``image_grid_thw`` and/or ``pixel_values_videos`` +
``video_grid_thw``. Response tokens are text: each takes the next position on all three MRoPE axes.

How the batch runs (all prompts x G responses in one batch):

* **Left padding.** Prompts are left-padded to the longest, so every row's next token sits in the
  same column: each decoding step feeds one ``[B, 1]`` column. The padding is a separate segment of
  the ``document_ids`` (id -1, as a pack's padding: the MoE routers leave it out, ``padding_mask``), so
  no real token ever attends to it, and positions are the prompt's own: a left-padded row computes
  what the prompt alone would (right padding would need a different write column per row).
* **Prefill once per prompt.** The P prompts, packed into one row without their left padding (with
  their images and videos: the ViT runs once per prompt, not G times), fill the KV cache
  (:class:`model.kv_cache.KVCache`: every decoder layer's keys and values of the P prompts, kept once
  for the G rows of each, unpadded there too), and the first tokens of the G responses are sampled from
  the same logits.
* **Decoding.** Each step feeds one token per row; every layer appends its (rotated) key and value to
  the row's response in the cache (``[B, kv heads, max_new_tokens, head_dim]`` per layer) and attends
  over the row's prompt and its response so far, so a token costs one token's forward, and a prompt's
  keys are held (and read) once, not G times: the prompts' tokens + B x response positions, where a
  cache of whole left-padded rows holds B x (longest prompt + response). ``use_cache=False`` recomputes
  the whole sequence at every step instead (correct and slow; the reference the cache is tested against).
* **Finished rows** keep their place until at most 3/4 of the batch is still running; then the cache
  is compacted to the running rows (a handful of copies per rollout, not one per finished row).

Sampling. Logits are gathered over the tensor-parallel vocabulary split, cut to the tokenizer's
vocabulary (a padded embedding's extra rows are never sampled) and scaled by 1/temperature in float32;
top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p`` (at least one)
and renormalises it; temperature 0 is greedy (argmax). A row's t-th token is drawn by inverse CDF with
the uniform number ``u[t]`` of a stream seeded from ``(cfg.seed, step, prompt key, response index)``:

* reproducible from ``(seed, step)``: a resumed run re-draws the same rollouts (same weights and
  prompts); different seeds or steps give different streams;
* independent of the layout and the batch: ``prompt_keys`` (default: the prompt's index in the global
  batch, ``dp_rank * P + p``) name the prompts, so the same prompt gets the same stream whatever the
  data-parallel split, the batch order or the other prompts;
* the same on every tensor-parallel rank (same keys, same gathered logits); the tokens and log-probs
  are still broadcast from the first rank of the tensor-parallel group so that no rounding
  difference can ever make the ranks disagree.

Log-probs. ``logprobs[b, t]`` = log softmax(z / T)[token] with z the logits over the tokenizer's
vocabulary and T = ``cfg.temperature`` (T = 1 for greedy decoding, see
:attr:`RolloutConfig.logprob_temperature`): the *untruncated* tempered policy, as verl and OpenRLHF
define the behaviour policy, whatever top-p cut when sampling. The loss must compute its log-probs
the same way: :func:`sequence_logprobs` with ``temperature=rollouts.temperature`` (it reads it from
the :class:`Rollouts` it is given). With an unchanged model the two agree to float rounding (tested
at 1e-5 in float32).

Layouts: every rank of a model-parallel group calls these functions with the same prompts.

* tensor parallelism, with or without sequence parallelism (switched off for the length of a
  generation: one new token per row cannot be split over the TP ranks);
* pipeline parallelism: each step's hidden states go down the stages (point-to-point), the last
  stage samples and broadcasts the tokens to the others; every stage keeps the KV cache of its own
  layers. ``sequence_logprobs`` runs there without gradients only (old-policy and reference
  log-probs; the training step's pipeline schedule computes the policy's own);
* expert parallelism: the ranks of an expert group hold different prompts but exchange tokens in
  every MoE layer, so they step together until all their responses have ended;
* data parallelism. Context parallelism (cp > 1) and virtual pipeline stages are refused with a
  one-line error.

Models on the ``te`` or ``dense_mask`` attention backends generate with
:class:`model.attention.DocumentAttention` swapped in for the decoder's core attention during the
rollout (same weights; the swap is undone afterwards).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from common.distributed.comm import all_reduce_values
from common.tokens.tokenizer import ENDOFTEXT, IM_END
from model.attention import padding_mask
from pretrain.forward import to_device
from pretrain.posttrain.pipeline_forward import from_last_stage, stage_forward

STOP_TOKENS = (IM_END, ENDOFTEXT)
MEDIA = (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw"))
COMPACT_WHEN_RUNNING = 0.75  # compact the KV cache when at most this share of its rows still runs


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling settings of a rollout.

    ``temperature`` 0 is greedy; ``top_p`` in (0, 1] (1 = no cut); ``group_size`` G >= 1 responses per
    prompt; ``max_new_tokens`` >= 1 per response; ``seed`` with the RL step seeds the sampling;
    ``stop_tokens``: vocabulary entries that end a response (kept in it, counted in its mask).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    group_size: int = 8
    seed: int = 0
    stop_tokens: tuple[str, ...] = STOP_TOKENS

    def __post_init__(self) -> None:
        g = self.group_size
        if not isinstance(g, int) or isinstance(g, bool) or g < 1:
            raise ValueError(f"rollout group_size G={g!r} must be an integer >= 1")
        n = self.max_new_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"rollout max_new_tokens={n!r} must be an integer >= 1")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"rollout temperature={t!r} must be a finite number >= 0 (0 = greedy)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"rollout top_p={p!r} must be in (0, 1] (1 = no nucleus cut)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"rollout seed={self.seed!r} must be an integer")
        if isinstance(self.stop_tokens, str) or not all(isinstance(s, str) for s in self.stop_tokens):
            raise ValueError(f"rollout stop_tokens={self.stop_tokens!r} must be a list of vocabulary entries")
        object.__setattr__(self, "stop_tokens", tuple(self.stop_tokens))  # a config's list, frozen

    @property
    def logprob_temperature(self) -> float:
        """The temperature of the returned log-probs: ``temperature``, or 1 for greedy decoding."""
        return float(self.temperature) if self.temperature > 0 else 1.0


@dataclass
class Rollouts:
    """The responses of one rollout, B = prompts * G rows (the G of prompt p at ``p*G .. p*G+G-1``).

    ``response_ids`` [B, T] int64 (T = the longest response; ``pad_id`` after a response's end),
    ``response_mask`` [B, T] bool (True = a generated token, the stop token included),
    ``logprobs`` [B, T] float32 (log-prob of each sampled token under the tempered sampling policy at
    ``temperature``, see the module docstring; 0 on padding), ``lengths`` [B] int64, ``finished`` [B]
    bool (ended by a stop token; False = cut at ``max_new_tokens``), ``texts`` (decoded with the
    special tokens, as the ``format`` reward reads them), ``prompt_index`` [B] (p of each row).
    ``timing``: seconds of ``prefill_s``, ``decode_s``, ``total_s``, the generated ``tokens``,
    ``tokens_per_s`` and the model ``forwards`` run.
    """

    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    texts: list[str]
    prompt_index: torch.Tensor
    group_size: int
    temperature: float
    vocab_size: int
    timing: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# prompts


@dataclass
class _Prompt:
    ids: torch.Tensor  # [s] int64
    positions: torch.Tensor  # [3, s] int64
    media: dict[str, torch.Tensor]


def _prompts(prompts: Sequence[Mapping[str, Any]]) -> list[_Prompt]:
    if isinstance(prompts, Mapping) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of dicts with input_ids (and position_ids, media)")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, Mapping) or "input_ids" not in p:
            raise ValueError(f"prompt {i} must be a dict with input_ids [s] (pretrain.generate.encode_prompt)")
        ids = torch.as_tensor(p["input_ids"]).long().cpu()
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"prompt {i}: input_ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
        positions = p.get("position_ids")
        if positions is None:
            if any(k in p for k, _ in MEDIA):
                raise ValueError(f"prompt {i}: position_ids [3, s] are required with images or videos")
            positions = torch.arange(ids.numel()).expand(3, -1)
        positions = torch.as_tensor(positions).long().cpu()
        if tuple(positions.shape) != (3, ids.numel()):
            raise ValueError(f"prompt {i}: position_ids {tuple(positions.shape)} must be [3, {ids.numel()}]")
        media = {}
        for pixels, grid in MEDIA:
            if (pixels in p) != (grid in p):
                raise ValueError(f"prompt {i}: {pixels} and {grid} go together")
            if pixels in p:
                media[pixels], media[grid] = torch.as_tensor(p[pixels]).cpu(), torch.as_tensor(p[grid]).long().cpu()
        out.append(_Prompt(ids, positions, media))
    return out


def _media(prompts: list[_Prompt], order: Sequence[int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Images and videos of the prompts ``order`` (one per batch row), concatenated in row order: the
    model fills the pad tokens of a batch in row-major order."""
    out = {}
    for pixels, grid in MEDIA:
        rows = [prompts[i] for i in order if pixels in prompts[i].media]
        if rows:
            out[pixels] = torch.cat([r.media[pixels] for r in rows]).to(dtype)
            out[grid] = torch.cat([r.media[grid] for r in rows])
    return out


_INDEX = {"pixel_values": "image_index", "pixel_values_videos": "video_index"}


def _shared_media(prompts: list[_Prompt], order: Sequence[int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Like :func:`_media`, but each prompt's images and videos once (prompts in order of first use), with
    ``image_index`` / ``video_index`` naming, for each image of each row in row order, the image it is:
    rows of the same prompt share one ViT pass (see ``Qwen3VLModel.visual_embeddings``)."""
    out = {}
    unique = list(dict.fromkeys(order))
    for pixels, grid in MEDIA:
        holders = [p for p in unique if pixels in prompts[p].media]
        if not holders:
            continue
        first, count = {}, 0
        for p in holders:
            first[p] = count
            count += int(prompts[p].media[grid].shape[0])
        out[pixels] = torch.cat([prompts[p].media[pixels] for p in holders]).to(dtype)
        out[grid] = torch.cat([prompts[p].media[grid] for p in holders])
        out[_INDEX[pixels]] = torch.tensor([first[p] + k for p in order if p in first
                                            for k in range(int(prompts[p].media[grid].shape[0]))], dtype=torch.long)
    return out


@dataclass
class _Batch:
    """The left-padded token grid of a rollout: prompts (``prompt_len`` columns) then generated tokens.

    ``ids`` [B, S], ``positions`` [3, B, S], ``documents`` [B, S] (-1 = left padding, 0 = the row's
    prompt and response) with S = prompt_len + max_new_tokens; rows p*G .. p*G+G-1 hold prompt p.
    """

    prompts: list[_Prompt]
    group_size: int
    prompt_len: int
    ids: torch.Tensor
    positions: torch.Tensor
    documents: torch.Tensor

    @classmethod
    def build(cls, prompts: list[_Prompt], group_size: int, max_new_tokens: int, pad_id: int) -> "_Batch":
        n, g = len(prompts), group_size
        prompt_len = max(p.ids.numel() for p in prompts)
        total = prompt_len + max_new_tokens
        ids = torch.full((n, total), pad_id, dtype=torch.long)
        positions = torch.zeros(3, n, total, dtype=torch.long)
        documents = torch.full((n, total), -1, dtype=torch.long)
        for i, p in enumerate(prompts):
            start = prompt_len - p.ids.numel()
            ids[i, start:prompt_len] = p.ids
            positions[:, i, start:prompt_len] = p.positions
            # Response tokens are text: the next position on all three axes (pretrain.generate).
            last = int(p.positions.max())
            positions[:, i, prompt_len:] = torch.arange(last + 1, last + 1 + max_new_tokens)
            documents[i, start:] = 0
        return cls(prompts, g, prompt_len, ids.repeat_interleave(g, 0), positions.repeat_interleave(g, 1),
                   documents.repeat_interleave(g, 0))

    def prompt_of(self, rows: torch.Tensor) -> list[int]:
        return (rows // self.group_size).tolist()


# --------------------------------------------------------------------------------------------------
# the model during a generation


def placeholder_ids(cfg) -> tuple[int, ...]:
    """Token ids a response never holds: the image and video pad tokens of ``cfg`` (a Qwen3VLConfig).
    The model replaces those ids by vision features wherever they appear, so a response that sampled
    one could not be scored (the placeholders would outnumber the features); they are cut from the
    policy like the padded vocabulary beyond the tokenizer's, in sampling and in the log-probs alike."""
    return (int(cfg.image_token_id), int(cfg.video_token_id))


def _unwrap(model):
    """The Qwen3-VL module inside Megatron's DDP / Float16Module wrappers."""
    from model.qwen3vl import Qwen3VLModel

    inner = model
    while not isinstance(inner, Qwen3VLModel) and hasattr(inner, "module"):
        inner = inner.module
    if not isinstance(inner, Qwen3VLModel):
        raise ValueError(f"rollouts need a Qwen3VLModel (model.qwen3vl), got {type(model).__name__}")
    return inner


def check_rollout_layout(model) -> None:
    """One-line ValueError for the layouts rollouts do not run in (context parallelism, virtual
    pipeline stages)."""
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1:
        raise ValueError(f"rollouts run with context parallelism 1, not cp={cp}")
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vpp is not None and vpp > 1:
        raise ValueError(f"rollouts take one model chunk per pipeline rank, not virtual pipeline stages (vpp={vpp})")


@contextlib.contextmanager
def _generation_mode(model) -> Iterator[None]:
    """For the length of a generation: eval mode, sequence parallelism off and the decoder's core
    attention on the ``document`` backend (what the KV-cache path of :class:`Qwen3VLModel` takes).
    Everything is put back afterwards, each module's train/eval flag included."""
    from model.attention import DocumentAttention

    modes = [(m, m.training) for m in model.modules()]
    undo: list[tuple[Any, str, Any]] = []

    def set_attr(obj, name, value):
        undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    model.eval()
    try:
        if model.config.sequence_parallel:
            set_attr(model.config, "sequence_parallel", False)
            for module in model.modules():  # the linear layers keep their own copy of the flag
                if getattr(module, "sequence_parallel", None) is True:
                    set_attr(module, "sequence_parallel", False)
        if model.attention != "document":
            for layer in model.decoder.layers:
                attention = layer.self_attention
                set_attr(attention, "core_attention",
                         DocumentAttention(attention.config, attention.layer_number, attention.attn_mask_type))
            set_attr(model, "attention", "document")
        yield
    finally:
        for obj, name, value in reversed(undo):
            setattr(obj, name, value)
        for module, training in modes:
            module.training = training


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


class _CachedDecoder:
    """Prefill once per prompt, then one token per row and step with a :class:`model.kv_cache.KVCache`:
    the G rows of a prompt share its keys and values, each row's response keys follow."""

    def __init__(self, model, batch: _Batch):
        from model.kv_cache import KVCache

        self.model, self.batch = model, batch
        s, firsts = batch.prompt_len, torch.arange(0, batch.ids.shape[0], batch.group_size)
        self.firsts = firsts  # one row per prompt
        self.padding = padding_mask(batch.documents[firsts, :s])  # [P, s]: the prompts' left padding
        # Response positions of every row and the prompts' padding, on the model's device once.
        self.grid = to_device({"position_ids": batch.positions[:, :, s:], "padding": self.padding})
        self.cache = KVCache(self.grid["padding"], batch.group_size, batch.ids.shape[1] - s)
        self.rows = torch.arange(batch.ids.shape[0])  # the batch rows held in the cache, in cache order

    def close(self) -> None:
        self.cache.release()

    def prefill(self) -> torch.Tensor:
        """Logits [B, V] of every row's first response token. The prompts run packed into one row (their
        left padding left out: a video prompt beside text prompts would otherwise pad them all to its
        length, in every layer and expert)."""
        b, g, s, firsts = self.batch, self.batch.group_size, self.batch.prompt_len, self.firsts
        tokens = ~self.padding
        prompt_of = torch.arange(len(b.prompts))[:, None].expand(-1, s)
        inputs = to_device({"input_ids": b.ids[firsts, :s][tokens][None],
                            "position_ids": b.positions[:, firsts, :s][:, tokens][:, None],
                            "document_ids": prompt_of[tokens][None],
                            **_media(b.prompts, range(len(b.prompts)), _model_dtype(self.model))})
        logits = stage_forward(self.model, lambda: self.model(
            inputs.pop("input_ids"), inputs.pop("position_ids"), kv_cache=self.cache,
            runtime_gather_output=True, **inputs))
        self.cache.start_decoding()
        return None if logits is None else logits[:, -1].repeat_interleave(g, 0)

    def step(self, rows: torch.Tensor) -> torch.Tensor:
        """Feed the last written token of ``rows`` (a subset of the cached rows, in their order);
        logits [len(rows), V] of the token after it."""
        if not torch.equal(rows, self.rows):
            self.cache.keep_rows(torch.searchsorted(self.rows, rows))
            self.rows = rows
        t = self.cache.length  # the response column of the token fed now
        col = self.batch.prompt_len + t
        ids = to_device({"input_ids": self.batch.ids[rows, col:col + 1]})["input_ids"]
        positions = self.grid["position_ids"][:, rows.to(ids.device), t:t + 1]
        logits = stage_forward(self.model, lambda: self.model(ids, positions, kv_cache=self.cache,
                                                              runtime_gather_output=True))
        self.cache.advance()
        return None if logits is None else logits[:, -1]


class _RecomputeDecoder:
    """No cache: every step runs the whole sequence of each row (the reference for the cache)."""

    def __init__(self, model, batch: _Batch):
        self.model, self.batch = model, batch
        self.length = batch.prompt_len  # columns written so far

    def _logits(self, rows: torch.Tensor) -> torch.Tensor:
        b, n = self.batch, self.length
        inputs = to_device({"input_ids": b.ids[rows, :n], "position_ids": b.positions[:, rows, :n],
                            "document_ids": b.documents[rows, :n], "padding_mask": padding_mask(b.documents[rows, :n]),
                            **_media(b.prompts, b.prompt_of(rows), _model_dtype(self.model))})
        logits = stage_forward(self.model, lambda: self.model(
            inputs.pop("input_ids"), inputs.pop("position_ids"), runtime_gather_output=True, **inputs))
        return None if logits is None else logits[:, -1]

    def prefill(self) -> torch.Tensor:
        return self._logits(torch.arange(self.batch.ids.shape[0]))

    def step(self, rows: torch.Tensor) -> torch.Tensor:
        self.length += 1
        return self._logits(rows)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# sampling


def _row_seed(seed: int, step: int, prompt_key: int, response: int) -> int:
    digest = hashlib.blake2b(f"rollout/{seed}/{step}/{prompt_key}/{response}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sampling_uniforms(seed: int, step: int, prompt_keys: Sequence[int], group_size: int,
                      max_new_tokens: int) -> torch.Tensor:
    """float64 [P * G, max_new_tokens] in [0, 1): row p*G + g, column t is the uniform number that
    draws the t-th token of response g of the prompt named ``prompt_keys[p]`` (see the module docstring)."""
    rows = []
    for key in prompt_keys:
        for g in range(group_size):
            gen = torch.Generator().manual_seed(_row_seed(seed, step, int(key), g))
            rows.append(torch.rand(max_new_tokens, generator=gen, dtype=torch.float64))
    return torch.stack(rows)


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float,
                  top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [n] int64, their log-probs [n] float32) from ``logits`` [n, V] (the tokenizer's
    vocabulary) and one uniform number per row; see the module docstring for the rule."""
    z = logits.float()
    if temperature == 0:
        tokens = z.argmax(dim=-1)
        return tokens, torch.log_softmax(z, dim=-1).gather(1, tokens[:, None])[:, 0]
    logp = torch.log_softmax(z / temperature, dim=-1)
    # Most likely first; stable, so equal probabilities keep vocabulary order (top-p -> 0 is argmax).
    sorted_logp, order = torch.sort(logp, dim=-1, descending=True, stable=True)
    probs = sorted_logp.double().exp()
    if top_p < 1:  # (at 1 nothing is cut: rounding must not drop the tail)
        before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        probs = torch.where(before < top_p, probs, torch.zeros_like(probs))
        probs[:, 0] = sorted_logp[:, 0].double().exp()  # the most likely token is always kept
    cdf = probs.cumsum(dim=-1)
    u = uniforms.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]
    index = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[1] - 1)
    tokens = order.gather(1, index)[:, 0]
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


def _share_samples(tokens: torch.Tensor | None, logp: torch.Tensor | None, count: int,
                   device) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens and log-probs sampled by the first tensor-parallel rank of the last pipeline stage,
    on every rank of the model-parallel group (other stages pass None)."""
    packed = None
    if tokens is not None:
        packed = torch.stack([tokens.double(), logp.double()])  # ids < 2**53: exact in float64
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            dist.broadcast(packed, parallel_state.get_tensor_model_parallel_src_rank(),
                           group=parallel_state.get_tensor_model_parallel_group())
    packed = from_last_stage(packed, (2, count), torch.float64, device)
    return packed[0].long(), packed[1].float()


def _anyone_running(model, running: bool) -> bool:
    """Whether a rank of this rank's expert group still has a running response: those ranks exchange
    tokens in every MoE layer, so they run the same number of forwards."""
    if not model.cfg.text.is_moe:
        return running
    group = parallel_state.get_expert_tensor_and_model_parallel_group()
    if group is None or dist.get_world_size(group) == 1:
        return running
    (flag,) = all_reduce_values([float(running)], group=group, op=dist.ReduceOp.MAX)
    return bool(flag)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------
# entry points


def generate_rollouts(
    model,
    prompts: Sequence[Mapping[str, Any]],
    cfg: RolloutConfig,
    tokenizer,
    *,
    step: int = 0,
    prompt_keys: Sequence[int] | None = None,
    use_cache: bool = True,
) -> Rollouts:
    """Sample ``cfg.group_size`` responses per prompt with the model as it is now (see the module
    docstring). Every rank of the model-parallel group calls it with the same prompts; ranks of
    different data-parallel replicas call it with theirs. ``step``: the RL step (seeds the sampling
    with ``cfg.seed``); ``prompt_keys``: one integer per prompt naming it in the sampling streams
    (default ``dp_rank * len(prompts) + p``, its index in the global batch)."""
    if not isinstance(cfg, RolloutConfig):
        raise ValueError(f"cfg must be a RolloutConfig, got {type(cfg).__name__}")
    inner = _unwrap(model)
    check_rollout_layout(inner)
    items = _prompts(prompts)
    n, g = len(items), cfg.group_size
    if prompt_keys is None:
        first = parallel_state.get_data_parallel_rank() * n
        prompt_keys = range(first, first + n)
    prompt_keys = list(prompt_keys)
    if len(prompt_keys) != n:
        raise ValueError(f"{len(prompt_keys)} prompt_keys for {n} prompts")
    vocab = tokenizer.vocab_size
    banned = placeholder_ids(inner.cfg)
    if vocab > inner.cfg.text.vocab_size:
        raise ValueError(f"tokenizer vocabulary ({vocab}) is larger than the model's ({inner.cfg.text.vocab_size})")
    try:
        stop = torch.tensor(sorted({tokenizer.token_to_id(t) for t in cfg.stop_tokens}), dtype=torch.long)
    except KeyError as exc:
        raise ValueError(f"rollout stop token: {exc.args[0]}") from None

    start = time.perf_counter()
    batch = _Batch.build(items, g, cfg.max_new_tokens, tokenizer.pad_id)
    rows_total = n * g
    uniforms = sampling_uniforms(cfg.seed, step, prompt_keys, g, cfg.max_new_tokens)
    out_ids = torch.full((rows_total, cfg.max_new_tokens), tokenizer.pad_id, dtype=torch.long)
    out_logp = torch.zeros(rows_total, cfg.max_new_tokens, dtype=torch.float32)
    lengths = torch.zeros(rows_total, dtype=torch.long)
    done = torch.zeros(rows_total, dtype=torch.bool)
    forwards = 0
    device = next(inner.parameters()).device
    with torch.no_grad(), _generation_mode(inner):
        decoder = (_CachedDecoder if use_cache else _RecomputeDecoder)(inner, batch)
        try:
            logits = decoder.prefill()
            forwards += 1
            _synchronize()
            prefill_done = time.perf_counter()
            rows = torch.arange(rows_total)  # the rows ``logits`` belong to (None before the last stage)
            for t in range(cfg.max_new_tokens):
                live = ~done[rows]
                if bool(live.any()):
                    active = rows[live]
                    tokens = logp = None
                    if logits is not None:
                        live_logits = logits[live.to(logits.device), :vocab].float()
                        live_logits[:, [i for i in banned if i < vocab]] = float("-inf")
                        tokens, logp = sample_tokens(live_logits, uniforms[active, t], cfg.temperature, cfg.top_p)
                    tokens, logp = _share_samples(tokens, logp, active.numel(), device)
                    tokens, logp = tokens.cpu(), logp.cpu()
                    out_ids[active, t], out_logp[active, t], lengths[active] = tokens, logp, t + 1
                    batch.ids[active, batch.prompt_len + t] = tokens
                    done[active] = torch.isin(tokens, stop)
                running = (~done).nonzero()[:, 0]
                if t + 1 == cfg.max_new_tokens or not _anyone_running(inner, running.numel() > 0):
                    break
                if running.numel() == 0:
                    rows = rows[:1]  # others in the expert group still run: step along with one row
                elif running.numel() <= COMPACT_WHEN_RUNNING * rows.numel():
                    rows = running
                logits = decoder.step(rows)
                forwards += 1
        finally:
            decoder.close()  # the KV cache's buffers are freed
    _synchronize()
    end = time.perf_counter()

    width = max(1, int(lengths.max()))
    response_ids, logprobs = out_ids[:, :width].contiguous(), out_logp[:, :width].contiguous()
    mask = torch.arange(width)[None, :] < lengths[:, None]
    texts = [tokenizer.decode(response_ids[i, :int(lengths[i])].tolist()) for i in range(rows_total)]
    tokens_total = int(lengths.sum())
    timing = {"prefill_s": prefill_done - start, "decode_s": end - prefill_done, "total_s": end - start,
              "tokens": tokens_total, "tokens_per_s": tokens_total / max(end - start, 1e-9), "forwards": forwards}
    return Rollouts(response_ids=response_ids, response_mask=mask, logprobs=torch.where(mask, logprobs, 0.0),
                    lengths=lengths, finished=done, texts=texts,
                    prompt_index=torch.arange(n).repeat_interleave(g), group_size=g,
                    temperature=cfg.logprob_temperature, vocab_size=vocab, timing=timing)


def sequence_logprobs(
    model,
    prompts: Sequence[Mapping[str, Any]],
    responses: Rollouts | torch.Tensor,
    response_mask: torch.Tensor | None = None,
    *,
    temperature: float | None = None,
    vocab_size: int | None = None,
    micro_batch_size: int | None = None,
    prompt_index: torch.Tensor | None = None,
    with_entropy: bool = False,
    cuts: Sequence[int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs [B, T] float32 of the responses under ``model``, 0 on padding.

    ``responses``: a :class:`Rollouts` (its ids, mask, temperature and vocabulary size are used) or
    response ids [B, T] with ``response_mask`` [B, T] (default: all ones), ``temperature`` (default 1)
    and ``vocab_size`` (the tokenizer's, default: the model's). Row b answers prompt
    ``prompt_index[b]`` (default: B = len(prompts) * G rows grouped by prompt). Each row is its prompt
    followed by its response, the rows packed into one sequence (:func:`response_rows`), in one forward
    (``micro_batch_size`` rows at a time when given; ``cuts``: the first row of each forward, then B,
    instead) in the model's training layout; the vocabulary
    stays split over the tensor-parallel ranks (Megatron's vocab-parallel cross entropy), and the
    result carries a gradient when called with gradients enabled (the policy's log-probs in the loss).
    ``with_entropy``: also return the entropy [B, T] (nats) of the tempered distribution at each
    response token, 0 on padding.
    """
    inner = _unwrap(model)
    check_rollout_layout(inner)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp > 1 and torch.is_grad_enabled():
        raise ValueError(f"sequence_logprobs with pp={pp} runs without gradients (torch.no_grad()): "
                         "the training step's pipeline schedule computes the policy's log-probs")
    items = _prompts(prompts)
    if isinstance(responses, Rollouts):
        ids, mask = responses.response_ids, responses.response_mask
        temperature = responses.temperature if temperature is None else temperature
        vocab_size = responses.vocab_size if vocab_size is None else vocab_size
    else:
        ids = torch.as_tensor(responses)
        mask = torch.ones_like(ids, dtype=torch.bool) if response_mask is None else torch.as_tensor(response_mask)
    temperature = 1.0 if temperature is None else float(temperature)
    if not temperature > 0:
        raise ValueError(f"sequence_logprobs temperature={temperature!r} must be > 0")
    if ids.dim() != 2 or tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"responses must be [B, T] with a mask of the same shape, got {tuple(ids.shape)} "
                         f"and {tuple(mask.shape)}")
    rows, width = ids.shape
    if prompt_index is None:
        if rows % len(items):
            raise ValueError(f"{rows} responses do not split into groups over {len(items)} prompts")
        prompt_index = torch.arange(rows) // (rows // len(items))
    prompt_index = torch.as_tensor(prompt_index).long().cpu()
    if tuple(prompt_index.shape) != (rows,) or int(prompt_index.min()) < 0 or int(prompt_index.max()) >= len(items):
        raise ValueError(f"prompt_index must give one prompt in [0, {len(items)}) per response row ({rows})")
    vocab_size = inner.cfg.text.vocab_size if vocab_size is None else int(vocab_size)
    if cuts is not None and micro_batch_size is not None:
        raise ValueError("sequence_logprobs takes micro_batch_size or cuts, not both")
    if cuts is None:
        step = rows if micro_batch_size is None else int(micro_batch_size)
        if step < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size!r} must be >= 1")
        cuts = [*range(0, rows, step), rows]
    cuts = [int(c) for c in cuts]
    if cuts[0] != 0 or cuts[-1] != rows or any(a >= b for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"cuts {cuts} must rise from 0 to the {rows} rows")
    ids, mask = ids.long().cpu(), mask.bool().cpu()
    parts = [_sequence_logprobs(inner, items, ids[a:b], mask[a:b], prompt_index[a:b], temperature, vocab_size,
                                with_entropy) for a, b in zip(cuts, cuts[1:])]
    logp = torch.cat([part[0] for part in parts]).float()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(mask.to(logp.device), logp, zero)
    if not with_entropy:
        return logp
    entropy = torch.cat([part[1] for part in parts]).float()
    return logp, torch.where(mask.to(entropy.device), entropy, zero)


def packed_sizes(prompts: Sequence[Mapping[str, Any]] | list[_Prompt], prompt_index: torch.Tensor,
                 responses: torch.Tensor, response_mask: torch.Tensor | None = None,
                 multiple_of: int = 1) -> tuple[list[int], list[int], int]:
    """(prompt tokens of each row, response tokens kept of each row, the packed length rounded up to
    ``multiple_of``) of :func:`response_rows` (without building it)."""
    items = prompts if prompts and isinstance(prompts[0], _Prompt) else _prompts(prompts)
    n, width = responses.shape
    kept = [width] * n
    if response_mask is not None:
        columns = torch.arange(1, width + 1).expand(n, -1)
        kept = torch.where(response_mask.bool().cpu(), columns, torch.zeros_like(columns)).amax(dim=1).tolist()
    starts = [items[int(p)].ids.numel() for p in prompt_index]
    needed = sum(starts) + sum(kept)
    return starts, kept, needed + -needed % multiple_of


def packed_length(prompts: Sequence[Mapping[str, Any]], prompt_index: torch.Tensor, responses: torch.Tensor,
                  response_mask: torch.Tensor | None = None, multiple_of: int = 1) -> int:
    """The length of :func:`response_rows`' sequence for these rows (without building it)."""
    return packed_sizes(prompts, prompt_index, responses, response_mask, multiple_of)[2]


def response_rows(prompts: Sequence[Mapping[str, Any]] | list[_Prompt], responses: torch.Tensor,
                  prompt_index: torch.Tensor, dtype: torch.dtype, *, response_mask: torch.Tensor | None = None,
                  multiple_of: int = 1, length: int | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The model inputs of responses after their prompts, packed into one sequence: (inputs, index).

    Row i is prompt ``prompt_index[i]`` then ``responses[i]`` [n, T] up to its last token in
    ``response_mask`` (default: all T), one document of the packed sequence (``document_ids`` i, so
    attention stays inside the row); the rows follow each other without padding, and the sequence is
    right-padded (document id -1, as a pack's padding) to ``length`` tokens (default: the rows' total,
    rounded up to ``multiple_of``, e.g. tp with sequence parallelism). Packing instead of padding every row to the
    longest prompt matters because prompts differ a lot in length (a video prompt is several times an
    image prompt, a long response many times a short one). ``inputs`` holds ``input_ids`` [1, L],
    ``position_ids`` [3, 1, L] (each row's prompt positions, its response tokens on the next position
    of all three axes) and ``document_ids`` [1, L], and the rows' media, each prompt's once, with
    ``image_index`` / ``video_index`` (rows of one prompt share its ViT pass). ``index`` [n, T]: the
    position in the sequence of the logit that predicts response token t of row i
    (``logits[0, index[i, t]]``); tokens past a row's end point at its last token (their log-probs are
    masked by the caller).
    """
    items = prompts if prompts and isinstance(prompts[0], _Prompt) else _prompts(prompts)
    n, width = responses.shape
    starts, kept, needed = packed_sizes(items, prompt_index, responses, response_mask, multiple_of)
    length = needed if length is None else int(length)
    if length < needed or length % multiple_of:
        raise ValueError(f"packed length {length} must be >= {needed} and a multiple of {multiple_of}")
    ids = torch.zeros(1, length, dtype=torch.long)
    positions = torch.arange(length).expand(3, 1, length).clone()
    documents = torch.full((1, length), -1, dtype=torch.long)
    index = torch.zeros(n, width, dtype=torch.long)
    offset = 0
    for i, p in enumerate(prompt_index.tolist()):
        prompt, s, k = items[p], starts[i], kept[i]
        row = slice(offset, offset + s + k)
        ids[0, offset:offset + s], ids[0, offset + s:row.stop] = prompt.ids, responses[i, :k]
        positions[:, 0, offset:offset + s] = prompt.positions
        last = int(prompt.positions.max())
        positions[:, 0, offset + s:row.stop] = torch.arange(last + 1, last + 1 + k)
        documents[0, row] = i
        # logit at offset + s - 1 + t predicts response token t; beyond the row's end, its last token
        index[i] = offset + s - 1 + torch.arange(width).clamp(max=max(k - 1, 0))
        offset = row.stop
    inputs = {"input_ids": ids, "position_ids": positions, "document_ids": documents,
              **_shared_media(items, prompt_index.tolist(), dtype)}
    return inputs, index


def _response_logits(logits: torch.Tensor, positions: torch.Tensor, temperature: float, vocab_size: int,
                     banned: Sequence[int] = ()) -> torch.Tensor:
    """This rank's vocabulary shard of the tempered logits [N, V/tp] (float32) at ``positions`` [N] of
    the logits [1, L, V/tp] of a :func:`response_rows` sequence; -inf beyond the tokenizer's vocabulary
    (a padded embedding's extra rows are never sampled) and at the ``banned`` ids (:func:`placeholder_ids`)."""
    picked = logits.reshape(-1, logits.shape[-1])[positions.to(logits.device)]  # [N, V/tp]
    z = picked.float() / temperature
    shard = z.shape[-1]
    first = parallel_state.get_tensor_model_parallel_rank() * shard
    ids = torch.arange(first, first + shard, device=z.device)
    outside = (ids >= vocab_size) | torch.isin(ids, torch.tensor(list(banned), dtype=ids.dtype, device=ids.device))
    return z.masked_fill(outside, float("-inf")).contiguous()


def response_tokens(logits: torch.Tensor, index: torch.Tensor, responses: torch.Tensor,
                    response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep [n, T] bool, the sequence positions [N] and the token ids [N] of the N kept response
    tokens) on the logits' device. Only kept tokens are gathered: rows end at different lengths, and
    the fp32 copies of the logits at every column of every row (up to the longest response) would cost
    n * T * V/tp floats each where the responses hold far fewer tokens."""
    keep = response_mask.bool().to(logits.device)
    return keep, index.to(logits.device)[keep], responses.to(logits.device)[keep]


def _unflatten(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Values [N] of the kept entries back to ``keep``'s shape [n, T], 0 elsewhere (differentiable)."""
    return torch.zeros(keep.shape, dtype=values.dtype, device=values.device).masked_scatter(keep, values)


def response_logprobs(logits: torch.Tensor, index: torch.Tensor, responses: torch.Tensor,
                      response_mask: torch.Tensor, temperature: float, vocab_size: int,
                      banned: Sequence[int] = ()) -> torch.Tensor:
    """log softmax(z / temperature)[token] [n, T] of each response token in ``response_mask`` [n, T]
    (0 elsewhere) from the model's vocabulary-parallel logits [1, L, V/tp] of a :func:`response_rows`
    sequence (``index`` [n, T] its second result), over the tokenizer's vocabulary less the ``banned``
    ids (:func:`placeholder_ids`), as sampled."""
    keep, positions, tokens = response_tokens(logits, index, responses, response_mask)
    z = _response_logits(logits, positions, temperature, vocab_size, banned)
    return _unflatten(-tensor_parallel.vocab_parallel_cross_entropy(z, tokens), keep)


def vocab_parallel_entropy(z: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(z) over the last axis, z being this rank's vocabulary shard [..., V/tp]
    (-inf entries have probability 0): three all-reduces over the tensor-parallel group, no gather."""
    group = parallel_state.get_tensor_model_parallel_group() \
        if parallel_state.get_tensor_model_parallel_world_size() > 1 else None
    top = z.max(dim=-1).values
    if group is not None:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shifted = z - top.unsqueeze(-1)
    e = shifted.exp()
    sums = torch.stack([e.sum(dim=-1), torch.where(e > 0, e * shifted, torch.zeros_like(e)).sum(dim=-1)])
    if group is not None:
        dist.all_reduce(sums, group=group)
    # H = log S - sum(e * shifted) / S with S = sum(e) (shifted logits, so exp never overflows)
    return sums[0].log() - sums[1] / sums[0]


def _sequence_logprobs(model, prompts: list[_Prompt], responses: torch.Tensor, response_mask: torch.Tensor,
                       prompt_index: torch.Tensor, temperature: float, vocab_size: int, with_entropy: bool = False):
    n, width = responses.shape
    multiple = parallel_state.get_tensor_model_parallel_world_size() if model.config.sequence_parallel else 1
    inputs, index = response_rows(prompts, responses, prompt_index, _model_dtype(model), response_mask=response_mask,
                                  multiple_of=multiple)
    inputs = to_device(inputs)
    logits = stage_forward(model, lambda: model(inputs.pop("input_ids"), inputs.pop("position_ids"),
                                                 runtime_gather_output=False,
                                                 padding_mask=padding_mask(inputs["document_ids"]), **inputs))
    device = next(model.parameters()).device
    if logits is None:  # an earlier pipeline stage: the last one computes the log-probs
        logp = from_last_stage(None, (n, width), torch.float32, device)
        return logp, (from_last_stage(None, (n, width), torch.float32, device) if with_entropy else None)
    keep, positions, tokens = response_tokens(logits, index, responses, response_mask)
    z = _response_logits(logits, positions, temperature, vocab_size, placeholder_ids(model.cfg))
    entropy = None
    if with_entropy:  # first: Megatron's cross entropy works in place on z
        with torch.no_grad():
            entropy = _unflatten(vocab_parallel_entropy(z), keep)
    logp = _unflatten(-tensor_parallel.vocab_parallel_cross_entropy(z, tokens), keep)
    # In the order the earlier stages receive them (above): log-probs, then entropy.
    logp = from_last_stage(logp, (n, width), torch.float32, logp.device)
    if with_entropy:
        entropy = from_last_stage(entropy, (n, width), torch.float32, logp.device)
    return logp, entropy
