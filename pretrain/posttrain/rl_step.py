"""The policy update of an RL step: a rollout batch's loss through Megatron-Core's training schedule.

The rows of a step (responses that survived the prompt filter, with their old-policy log-probs and
advantages) become ``ceil(rows / micro_batch_size)`` micro-batches of contiguous rows, each row its prompt
followed by its response, the rows of a micro-batch packed into one sequence
(:func:`pretrain.posttrain.rollout.response_rows`). Rows' lengths differ a lot (a group of video prompts'
rows can be several times a group of text prompts'), so the rows are cut where the longest micro-batch is
shortest (:func:`split_rows`), not every ``micro_batch_size`` rows; the cut depends on the rows alone, so
every layout runs the same micro-batches. With pipeline parallelism every micro-batch of the step is
padded to the longest, as the stages exchange fixed shapes (the padding is document -1, which the MoE
routers leave out: it changes neither the loss nor the load-balancing gradient, and it attends within
blocks of 128 tokens); without it each micro-batch keeps its own length. The schedule's forward step
runs the model (any layout the trainer runs: TP, SP, PP, EP, DP); its loss function, on the last
pipeline stage, takes the vocabulary-parallel logits to per-token log-probs and returns the policy loss
as a *sum and a count* (:func:`pretrain.posttrain.policy_loss.policy_loss_terms`): Megatron adds the
counts over micro-batches and data-parallel ranks and divides the gradients by the total, so the update
follows the loss of the whole global batch under the chosen aggregation, whatever the layout or
micro-batch split.

Every data-parallel rank runs the same number of micro-batches (expert-parallel ranks exchange tokens
in every MoE layer, so none may stop early): :func:`balance_rows` pads each rank's rows to the largest
count with rows whose mask is empty (they cost a forward and count for nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import torch
from megatron.core import parallel_state

from common.distributed.comm import all_reduce_values
from model.attention import padding_mask
from pretrain.forward import media_inputs, to_device
from pretrain.posttrain.policy_loss import policy_loss_terms
from pretrain.posttrain.rollout import packed_length, packed_sizes, response_logprobs, response_rows
from pretrain.step import LOSS_KEY, StepResult, train_step


@dataclass
class RLRows:
    """Training rows of one rank: ``response_ids``/``response_mask``/``old_logp`` [R, T], ``advantages`` [R],
    ``prompt_index`` [R] (into ``prompts``), optional ``ref_logp`` [R, T]."""

    prompts: list  # rollout prompt dicts (pretrain.posttrain.prompt_set.encode_rl_prompt)
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    prompt_index: torch.Tensor
    ref_logp: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.response_ids.shape[0])

    def select(self, rows: torch.Tensor | slice) -> "RLRows":
        pick = (lambda t: None if t is None else t[rows])
        return replace(self, response_ids=pick(self.response_ids), response_mask=pick(self.response_mask),
                       old_logp=pick(self.old_logp), advantages=pick(self.advantages),
                       prompt_index=pick(self.prompt_index), ref_logp=pick(self.ref_logp))

    def padded_to(self, rows: int, pad_id: int) -> "RLRows":
        """``rows`` rows: these, then rows of prompt 0 with an empty mask (no loss, no count)."""
        extra = rows - len(self)
        if extra <= 0:
            return self
        width = self.response_ids.shape[1]

        def cat(t, fill):
            if t is None:
                return None
            return torch.cat([t, torch.full((extra, *t.shape[1:]), fill, dtype=t.dtype)])

        return replace(self, response_ids=cat(self.response_ids, pad_id),
                       response_mask=torch.cat([self.response_mask, torch.zeros(extra, width, dtype=torch.bool)]),
                       old_logp=cat(self.old_logp, 0.0), advantages=cat(self.advantages, 0.0),
                       prompt_index=cat(self.prompt_index, 0), ref_logp=cat(self.ref_logp, 0.0))


def balance_rows(local_rows: int) -> int:
    """The largest row count of any data-parallel rank (every rank pads to it)."""
    group = parallel_state.get_data_parallel_group() if torch.distributed.is_initialized() else None
    return int(all_reduce_values([local_rows], group=group, op=torch.distributed.ReduceOp.MAX)[0])


def split_rows(sizes: list[int], responses: list[int], count: int, response_cap: int) -> list[int]:
    """Where to cut rows of ``sizes`` tokens (prompt + response) into ``count`` contiguous non-empty
    micro-batches (the first row of each, then len(sizes)) so that the longest holds as few tokens as
    possible, none holding more than ``response_cap`` response tokens (``responses`` per row).

    The smallest longest length L is found by bisection: cutting greedily (each micro-batch as long as
    fits in L tokens and the cap) needs the fewest micro-batches for a given L, and cutting a
    micro-batch again never makes one longer, so L is feasible when the greedy cut needs at most
    ``count``; the greedy cut is then split further (its longest micro-batch of several rows in two,
    the halves as even as the rows allow) up to ``count``."""
    if not 1 <= count <= len(sizes):
        raise ValueError(f"{len(sizes)} rows do not split into {count} non-empty micro-batches")
    if max(responses) > response_cap:
        raise ValueError(f"a row of {max(responses)} response tokens is over the cap of {response_cap}")

    def greedy(limit: int) -> list[int]:
        starts, total, kept = [0], 0, 0
        for i, (size, response) in enumerate(zip(sizes, responses)):
            if i > starts[-1] and (total + size > limit or kept + response > response_cap):
                starts.append(i)
                total, kept = 0, 0
            total, kept = total + size, kept + response
        return starts

    low, high = max(sizes), sum(sizes)
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if len(greedy(mid)) <= count else (mid + 1, high)
    starts = greedy(low) + [len(sizes)]
    while len(starts) - 1 < count:
        _, a, b = max((sum(sizes[a:b]), a, b) for a, b in zip(starts, starts[1:]) if b - a > 1)
        cut = min(range(a + 1, b), key=lambda c: max(sum(sizes[a:c]), sum(sizes[c:b])))
        starts = sorted([*starts, cut])
    return starts


def micro_batch_cuts(rows: RLRows, micro_batch_size: int) -> list[int]:
    """The cut of ``rows`` into the micro-batches of :func:`rl_micro_batches` (the first row of each,
    then len(rows))."""
    count = math.ceil(len(rows) / micro_batch_size)
    starts, kept, _ = packed_sizes(rows.prompts, rows.prompt_index, rows.response_ids, rows.response_mask)
    return split_rows([s + k for s, k in zip(starts, kept)], kept, count,
                      micro_batch_size * int(rows.response_ids.shape[1]))


def mini_batches(rows: RLRows, micro_batch_size: int, updates: int) -> tuple[list[tuple[slice, list[int]]], list[int]]:
    """An RL step's ``updates`` optimizer steps, each as (its rows, a slice: successive runs of
    ``ceil(len(rows) / updates)`` rows; the last may be smaller, and with few rows there may be fewer of
    them, never an empty one; and the cut of those rows into its micro-batches, :func:`micro_batch_cuts`,
    for :func:`policy_update`), and the cut of all the step's rows into the same micro-batches (the
    first row of each, then len(rows)): the old-policy and reference log-prob passes run the
    micro-batches the updates run, so that each row is scored in the packed sequence it is trained in (on
    a GPU, other shapes round differently and move the first update's ratios off 1; under pipeline
    parallelism the updates' padding still differs)."""
    if not len(rows):
        return [], [0]
    per_update = -(-len(rows) // updates)
    parts, cuts = [], [0]
    for start in range(0, len(rows), per_update):
        part = slice(start, min(start + per_update, len(rows)))
        own = micro_batch_cuts(rows.select(part), micro_batch_size)
        parts.append((part, own))
        cuts += [start + c for c in own[1:]]
    return parts, cuts


def rl_micro_batches(rows: RLRows, micro_batch_size: int, dtype: torch.dtype, multiple_of: int = 1,
                     same_length: bool = False, cuts: list[int] | None = None) -> tuple[list[dict], int]:
    """(micro-batches, the longest length L): ``ceil(len(rows) / micro_batch_size)`` micro-batches, each
    a contiguous run of rows packed into one sequence [1, L_k] with L_k a multiple of ``multiple_of``.
    The rows are cut where the longest micro-batch is shortest (:func:`split_rows`), no micro-batch
    holding more response tokens than ``micro_batch_size`` full-width responses: rows differ a lot in
    length (a group of video prompts' rows can be several times a group of text prompts'), and cutting
    every ``micro_batch_size`` rows would make some micro-batches much longer than others. The cut
    depends on the rows alone, not on the layout: every layout runs the same micro-batches.
    ``same_length`` (pipeline parallelism): every L_k is L, the shorter micro-batches right-padded.
    ``cuts``: the first row of each micro-batch, then len(rows), instead (benchmarks compare cuts)."""
    if cuts is None:
        cuts = micro_batch_cuts(rows, micro_batch_size)
    parts = [rows.select(slice(a, b)) for a, b in zip(cuts, cuts[1:])]
    lengths = [packed_length(p.prompts, p.prompt_index, p.response_ids, p.response_mask, multiple_of) for p in parts]
    longest = max(lengths)
    batches = []
    for part, length in zip(parts, lengths):
        inputs, index = response_rows(part.prompts, part.response_ids, part.prompt_index, dtype,
                                      response_mask=part.response_mask, multiple_of=multiple_of,
                                      length=longest if same_length else length)
        batch = {**inputs, "index": index, "response_ids": part.response_ids, "response_mask": part.response_mask,
                 "old_logp": part.old_logp, "advantages": part.advantages}
        if part.ref_logp is not None:
            batch["ref_logp"] = part.ref_logp
        batches.append(batch)
    return batches, longest


class PolicyLossMetrics:
    """Token-weighted sums of the loss's metrics over the micro-batches of one update (last stage)."""

    MEANS = ("ratio_dev_mean", "gate_weight_mean", "clip_frac", "seq_ratio_dev_mean", "kl")

    def __init__(self):
        self.sums = dict.fromkeys(self.MEANS, 0.0)
        self.tokens = 0.0
        self.ratio_dev_max = 0.0

    def add(self, metrics: dict[str, torch.Tensor], tokens: float) -> None:
        for key in self.MEANS:
            if key in metrics:
                self.sums[key] += float(metrics[key]) * tokens
        if "ratio_dev_max" in metrics and tokens:
            self.ratio_dev_max = max(self.ratio_dev_max, float(metrics["ratio_dev_max"]))
        self.tokens += tokens

    def reduce(self, present: set[str]) -> dict[str, float]:
        """Means over every generated token of the global batch (all ranks call this)."""
        tp = parallel_state.get_tensor_model_parallel_world_size() if torch.distributed.is_initialized() else 1
        values = all_reduce_values([self.tokens, *self.sums.values()])
        # The loss runs on the last pipeline stage only: the metrics it reported, on every rank.
        top, *flags = all_reduce_values([self.ratio_dev_max, *(float(key in present) for key in self.MEANS)],
                                        op=torch.distributed.ReduceOp.MAX)
        present = {key for key, flag in zip(self.MEANS, flags) if flag}
        tokens = values[0] / tp  # tensor-parallel peers hold the same values
        out = {key: value / tp / tokens for key, value in zip(self.MEANS, values[1:]) if key in present and tokens}
        out["ratio_dev_max"] = top
        return out


class PolicyLossStep:
    """Forward step of Megatron's schedules for the policy loss (see the module docstring). The
    log-probs are those of the sampling policy: tempered by ``temperature``, over the tokenizer's
    ``vocab_size`` ids less the ``banned`` ones (:func:`pretrain.posttrain.rollout.placeholder_ids`)."""

    def __init__(self, loss_cfg, aggregation: str, temperature: float, vocab_size: int, banned: tuple[int, ...]):
        self.loss_cfg, self.aggregation = loss_cfg, aggregation
        self.temperature, self.vocab_size, self.banned = temperature, vocab_size, banned
        self.metrics = PolicyLossMetrics()
        self.present: set[str] = set()

    def __call__(self, data_iterator, model):
        batch = to_device(next(data_iterator))
        logits = model(batch["input_ids"], batch["position_ids"], document_ids=batch["document_ids"],
                       padding_mask=padding_mask(batch["document_ids"]), runtime_gather_output=False,
                       **media_inputs(batch))
        return logits, partial(self._loss, batch)

    def _loss(self, batch: dict, logits: torch.Tensor):
        mask = batch["response_mask"]
        logp = response_logprobs(logits, batch["index"], batch["response_ids"], mask, self.temperature,
                                 self.vocab_size, self.banned)
        total, count, metrics = policy_loss_terms(self.loss_cfg, logp, batch["old_logp"], batch["advantages"],
                                                  mask, self.aggregation, batch.get("ref_logp"))
        self.metrics.add(metrics, float(mask.sum()))
        self.present.update(metrics)
        report = torch.stack([total.detach().float(), count.detach().float()])
        return total, count.to(torch.int), {LOSS_KEY: report}


def policy_update(model: list, optimizer, rows: RLRows, loss_step, micro_batch_size: int,
                  dtype: torch.dtype, cuts: list[int] | None = None,
                  prepare: Callable[[list[dict]], None] | None = None) -> StepResult:
    """One optimizer step on ``rows`` (this rank's share of the mini-batch; the same row count on every
    data-parallel rank). ``StepResult.loss`` is the loss of the global mini-batch (``loss_step``: a
    :class:`PolicyLossStep`, or another forward step on these micro-batches, e.g. on-policy
    distillation's). ``cuts``: its micro-batches' cut when the caller has it (:func:`mini_batches`),
    else computed. ``prepare``: called on the step's micro-batches before the schedule runs (on every
    rank, in the same order: e.g. a teacher's forward, which puts what the loss needs into them)."""
    sp = model[0].config.sequence_parallel
    multiple = parallel_state.get_tensor_model_parallel_world_size() if sp else 1
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    batches, length = rl_micro_batches(rows, micro_batch_size, dtype, multiple, same_length=pipelined, cuts=cuts)
    if prepare is not None:
        prepare(batches)
    return train_step(model, optimizer, loss_step, iter(batches), len(batches), length, 1)  # [1, L_k] each
