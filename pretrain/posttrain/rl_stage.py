"""``stage.kind: rl``: reinforcement learning with SAPO (or GRPO, GSPO) in the job's own layout.

``run_rl_stage(job)`` runs on every rank (``python -m pretrain.train stage=rl_sapo ...``). Each RL step:

1. **prompts**: the step's ``stage.rl.prompts_per_step`` prompts from the RL prompt set
   (:class:`pretrain.posttrain.prompt_set.PromptStream`: seeded order, split over data-parallel ranks);
   a prompt that cannot be encoded (media that do not decode) is skipped, logged and listed in the
   step's ``skipped_prompts`` in ``metrics.jsonl``, and the next prompt of the stream takes its place
   (:func:`pretrain.posttrain.prompt_set.encode_step_prompts`);
2. **rollouts**: ``stage.rl.group_size`` (G) responses per prompt sampled from the current policy with
   a KV cache (:func:`pretrain.posttrain.rollout.generate_rollouts`: temperature, top-p, max new tokens;
   images and videos in the prompt);
3. **rewards**: ``stage.rewards`` (names or {name, weight}) on the decoded responses against the
   prompts' reference answers;
4. **filtering** (report): groups where every response fails, or where at least
   ``stage.rl.filter.easy_fraction`` of them (15 of 16) succeed, are dropped; group-relative advantages;
5. **old-policy log-probs** of the kept responses (one no-gradient pass in the training layout; and
   the reference policy's when the loss has a KL term), then ``stage.rl.updates_per_step`` optimizer
   steps on successive mini-batches of the kept responses, so that from the second one on the ratios
   really leave 1 (:func:`pretrain.posttrain.rl_step.policy_update`);
6. **logging** (console, TensorBoard, ``metrics.jsonl``): mean reward, pass rate, share of groups
   filtered, mean and max |r - 1|, mean gate weight (SAPO) or clip fraction (GRPO, GSPO), entropy,
   response length, rollout and train time; the step's rollouts in ``<run_dir>/rollouts/step_N.jsonl``.

Checkpoints are the trainer's (model, optimizer, schedule, RNG) plus the prompt stream's position;
rollout sampling draws from streams seeded by (``train.seed``, step, prompt key, response), so a run
resumed from step k draws exactly the rollouts, rewards and losses of the uninterrupted run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from common.distributed.comm import all_reduce_values
from data_tools.atomic import write_atomic
from pretrain.config import JobConfig
from pretrain.posttrain.advantages import GroupFilterResult, PromptFilter, filter_groups, group_advantages
from pretrain.posttrain.policy_loss import AGGREGATIONS, policy_loss_config_from_mapping
from pretrain.posttrain.rewards import RewardSet
from pretrain.posttrain.rl_step import PolicyLossStep, RLRows, balance_rows, mini_batches, policy_update
from pretrain.posttrain.rollout import RolloutConfig, generate_rollouts, placeholder_ids, sequence_logprobs
from pretrain.trainer import StageResult, StageRun, format_number, open_stage, start_distributed


class RLSetupError(ValueError):
    """An RL stage that cannot start (prompt set, rewards, layout); raised before any rollout."""


def _prompt_rewards(records, spec, group_size: int, path: str) -> RewardSet:
    """The stage's rewards routed by the records' own (:class:`RewardSet`); every prompt's reward is selected
    by the stage, and a prompt has the reference answer its rewards need."""
    rewards = RewardSet(spec, task_rewards={r.reward for r in records})
    selected = {r.name for r in rewards.rewards}
    for record in records:
        if record.reward not in selected:
            raise RLSetupError(f"RL prompt {record.id} ({record.source}) asks for reward {record.reward!r}, which "
                               f"stage.rewards does not select ({sorted(selected)})")
    try:
        rewards.validate(group_size, [r.answer for r in records], [r.reward for r in records])
    except ValueError as exc:
        raise RLSetupError(f"{path}: {exc}") from None
    return rewards


def _reference_model(job: JobConfig, dtype: torch.dtype):
    """The frozen reference policy of a KL term: the stage's starting weights (``stage.init_from``)."""
    from model.checkpoint_io import resolve_checkpoint
    from model.config import Qwen3VLConfig
    from pretrain.posttrain.distill_stage import build_frozen_model

    resolved = resolve_checkpoint(job.stage.init_from) if job.stage.init_from else None
    if resolved is None:
        raise RLSetupError("the loss has a KL term (stage.loss.kl_coef > 0): its reference policy is the stage's "
                           f"starting checkpoint, but stage.init_from={job.stage.init_from!r} names none")
    return build_frozen_model(job, Qwen3VLConfig.from_mapping(job.model), resolved, dtype)


def write_rollouts(run_dir: Path, step: int, lines: list[dict]) -> None:
    """All ranks call; rank 0 writes ``rollouts/step_XXXXXXXX.jsonl`` (write, then rename) with the lines of
    the first rank of every model-parallel group (its peers hold the same rollouts)."""
    from megatron.core import parallel_state as ps

    writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(lines if writer else None, gathered, dst=0)
    if dist.get_rank() != 0:
        return
    folder = run_dir / "rollouts"
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(line) + "\n" for part in gathered for line in part or ())
    write_atomic(folder / f"step_{step:08d}.jsonl", text.encode())


def load_rl_prompts(job: JobConfig) -> list:
    """The records of ``stage.rl.prompts`` (:func:`pretrain.posttrain.prompt_set.load_prompt_set`);
    :class:`RLSetupError` when the set cannot be read."""
    from pretrain.posttrain.prompt_set import PromptSetError, load_prompt_set

    try:
        return load_prompt_set(job.stage.rl.prompts)
    except PromptSetError as exc:
        raise RLSetupError(str(exc)) from None


@dataclass
class RolloutStage:
    """What a stage that trains on its own rollouts opens before its first step (:func:`open_rollout_stage`):
    the trainer's run (model, optimizer, schedule, checkpoints, logger), the prompt stream at its saved
    position, the prompts' encoder and the sampling settings."""

    run: StageRun
    info: object  # common.distributed.parallel.DistributedInfo
    dp_size: int
    stream: object  # pretrain.posttrain.prompt_set.PromptStream
    encoder: object  # pretrain.data.encoding.SampleEncoder
    rollout_cfg: RolloutConfig
    # The steps' bookkeeping (:meth:`begin`, :meth:`end_step`): where this run started, when, its last
    # checkpoint, failed steps in a row, and whether a signal ended it.
    start_step: int = 0
    started: float = 0.0
    checkpoint: str | None = None
    consecutive_skips: int = 0
    preempted: bool = False
    requeued: bool = False

    @property
    def total_steps(self) -> int:
        return self.run.job.stage.train_steps

    def begin(self) -> None:
        """Just before the first step: the step and time the run starts from, and its checkpoint so far."""
        run = self.run
        self.start_step, self.started = run.state.step, time.perf_counter()
        self.checkpoint = str(run.latest) if run.latest else None

    def next_rollouts(self):
        """The next step's prompts and ``stage.rl.group_size`` responses to each from the model as it is now:
        (encoded batch, rollout prompts, skipped prompts, :class:`Rollouts`); all ranks call. A prompt that
        cannot be encoded is logged and replaced by the next of the stream."""
        from megatron.core import parallel_state

        from pretrain.posttrain.prompt_set import encode_step_prompts

        run = self.run
        batch, prompts, skipped = encode_step_prompts(self.encoder, self.stream, next(self.stream),
                                                      parallel_state.get_data_parallel_group())
        for failure in skipped:  # the error names the prompt; the next prompt of the stream took its place
            run.logger.message(f"WARNING: skipped {failure['error']}")
        rollouts = generate_rollouts(run.model[0], prompts, self.rollout_cfg, run.tokenizer, step=run.state.step,
                                     prompt_keys=batch.keys)
        return batch, prompts, skipped, rollouts

    def save_rollouts(self, batch, rollouts, **per_response) -> None:
        """With ``stage.rl.save_rollouts``, the step's responses to ``<run_dir>/rollouts/step_N.jsonl``: per
        response its prompt, index in its group, text, length and whether it finished, and the values of
        ``per_response`` (name -> one value per response). All ranks call."""
        job, step = self.run.job, self.run.state.step
        if not job.stage.rl.save_rollouts:
            return
        g = job.stage.rl.group_size
        lines = [{"step": step, "prompt": batch.records[int(p)].id, "response": i % g, "text": rollouts.texts[i],
                  **{name: values[i] for name, values in per_response.items()}, "length": int(rollouts.lengths[i]),
                  "finished": bool(rollouts.finished[i])}
                 for i, p in enumerate(rollouts.prompt_index.tolist())]
        write_rollouts(Path(job.train.run_dir), step, lines)

    def end_step(self, metrics: dict, skipped_prompts: list[dict], generated_tokens: float, failed: bool) -> bool:
        """Close a step that has been counted in ``state.step`` (all ranks call): a ``failed`` step (it took
        no optimizer step) is counted as skipped (``train.max_consecutive_skips`` of them in a row stop the
        stage); ``metrics`` gets the skipped steps and prompts and the tokens generated so far, the state
        the consumed prompts and tokens and the prompt stream's position; then the step is logged and the
        trainer's end of step runs (checkpoint, preemption). True when the stage stops here (preempted)."""
        run, state = self.run, self.run.state
        if failed:
            state.skipped_steps += 1
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0
        metrics["skipped_steps"] = state.skipped_steps
        if skipped_prompts:
            metrics["skipped_prompts"] = [{k: f[k] for k in ("prompt", "source", "error")} for f in skipped_prompts]
        state.consumed_samples += run.job.stage.rl.prompts_per_step
        state.consumed_tokens += int(generated_tokens)
        metrics["consumed_tokens"] = state.consumed_tokens  # generated tokens so far
        state.prompt_stream = self.stream.state_dict()
        run.logger.log(state.step, metrics)
        saved, self.preempted, self.requeued = run.end_step(self.total_steps, self.consecutive_skips)
        self.checkpoint = saved or self.checkpoint
        return self.preempted

    def close(self, summary: tuple[str, object, object], first_loss, last_loss) -> StageResult:
        """End the stage: the logger's summary (steps, prompts, ``summary``: (name, first, last) of the
        stage's figure, skipped steps, wall seconds, last checkpoint) and the stage's result."""
        state, wall = self.run.state, time.perf_counter() - self.started
        name, first, last = summary
        self.run.logger.close({"steps": f"{self.start_step}->{state.step}", "prompts": state.consumed_samples,
                               f"{name} first->last": f"{format_number(first)} -> {format_number(last)}",
                               "skipped": state.skipped_steps, "wall s": round(wall, 1),
                               "checkpoint": self.checkpoint or "-"})
        return StageResult(stage=self.run.job.stage.name, steps=state.step - self.start_step,
                           start_step=self.start_step, total_steps=self.total_steps, tokens=state.consumed_tokens,
                           first_loss=first_loss, last_loss=last_loss, wall_seconds=wall,
                           skipped_steps=state.skipped_steps, checkpoint=self.checkpoint, preempted=self.preempted,
                           requeued=self.requeued)


def open_rollout_stage(job: JobConfig, records: list, composed_yaml: str = "") -> RolloutStage:
    """Start the ranks and open the stage (:func:`pretrain.trainer.open_stage`: resumed or initialised; the
    schedule spans ``train_steps * stage.rl.updates_per_step`` optimizer steps), the prompt stream over
    ``records`` split over the data-parallel ranks at its saved position, and restore the RNG."""
    from megatron.core import parallel_state

    from pretrain.data.encoding import SampleEncoder
    from pretrain.data.loader import encoding_config_from_data
    from pretrain.posttrain.prompt_set import PromptStream

    rl = job.stage.rl
    info, dp_size = start_distributed(job)
    if rl.prompts_per_step % dp_size:
        raise RLSetupError(f"stage.rl.prompts_per_step={rl.prompts_per_step} does not split over {dp_size} "
                           "data-parallel ranks")
    total_steps = job.stage.train_steps
    run = open_stage(job, info, dp_size, total_steps, composed_yaml, schedule_steps=total_steps * rl.updates_per_step)
    stream = PromptStream(records, rl.prompts_per_step, job.train.seed, parallel_state.get_data_parallel_rank(),
                          dp_size)
    if run.state.prompt_stream:
        stream.load_state_dict(run.state.prompt_stream)
    run.restore_rng()
    encoder = SampleEncoder(run.tokenizer, encoding_config_from_data(job.data))
    rollout_cfg = RolloutConfig(temperature=rl.temperature, top_p=rl.top_p, max_new_tokens=rl.max_new_tokens,
                                group_size=rl.group_size, seed=job.train.seed)
    return RolloutStage(run, info, dp_size, stream, encoder, rollout_cfg)


def run_rl_stage(job: JobConfig, composed_yaml: str = "") -> StageResult:
    """Train one RL stage on this rank (call on every rank; see the module docstring)."""
    from megatron.core import parallel_state

    rl = job.stage.rl
    loss_options = dict(job.stage.loss)
    aggregation = loss_options.pop("aggregation", AGGREGATIONS[0])
    loss_cfg = policy_loss_config_from_mapping(loss_options)
    records = load_rl_prompts(job)
    rewards = _prompt_rewards(records, job.stage.rewards, rl.group_size, rl.prompts)

    opened = open_rollout_stage(job, records, composed_yaml)
    run, info, dp_size, stream = opened.run, opened.info, opened.dp_size, opened.stream
    total_steps = job.stage.train_steps
    model, state, logger = run.model, run.state, run.logger
    reference = _reference_model(job, run.dtype) if getattr(loss_cfg, "kl_coef", 0.0) > 0 else None
    prompt_filter = PromptFilter(pass_threshold=rl.filter.pass_threshold, easy_fraction=rl.filter.easy_fraction)
    g, mbs = rl.group_size, job.train.micro_batch_size
    logger.message(f"{job.stage.name}: {run.origin}; {total_steps} RL steps of {rl.prompts_per_step} prompts x "
                   f"G={g} (loss {loss_cfg.name}, {aggregation}, {rl.updates_per_step} updates per step); "
                   f"{len(records)} prompts in {rl.prompts}; layout {info.world_size} ranks, dp={dp_size}, "
                   f"{job.parallel}; {run.dtype}")

    first_reward, last_reward, first_loss, last_loss = None, None, None, None
    opened.begin()
    while state.step < total_steps:
        t0 = time.perf_counter()
        batch, prompts, skipped, rollouts = opened.next_rollouts()
        t_rollout = time.perf_counter() - t0

        t1 = time.perf_counter()
        reward, parts = rewards.score(rollouts.texts, [r.answer for r in batch.records], g,
                                      [r.reward for r in batch.records])
        kept = filter_groups(reward, g, prompt_filter) if rl.filter.enabled else \
            GroupFilterResult(torch.ones(len(batch.records), dtype=torch.bool), 0, 0, g)
        advantages = group_advantages(reward, g)
        keep = kept.response_keep()
        keep_rows = keep.nonzero()[:, 0]
        rows = RLRows(prompts, rollouts.response_ids, rollouts.response_mask, rollouts.logprobs, advantages,
                      rollouts.prompt_index).select(keep_rows)
        target = balance_rows(len(rows))
        rows = rows.padded_to(target, run.tokenizer.pad_id)
        entropy_sum = 0.0
        updates = rl.updates_per_step
        results, lr = [], run.optimizer.param_groups[0]["lr"]  # lr: the rate of the step's last update
        loss_step = PolicyLossStep(loss_cfg, aggregation, rollouts.temperature, rollouts.vocab_size,
                                   placeholder_ids(run.model_cfg))
        if target:
            update_rows, cuts = mini_batches(rows, mbs, updates)
            for chunk in model:
                chunk.eval()
            with torch.no_grad():
                rows.old_logp, entropy = sequence_logprobs(
                    model[0], prompts, rows.response_ids, rows.response_mask, temperature=rollouts.temperature,
                    vocab_size=rollouts.vocab_size, cuts=cuts, prompt_index=rows.prompt_index, with_entropy=True)
                rows.old_logp, entropy_sum = rows.old_logp.cpu(), float(entropy.sum())
                if reference is not None:
                    rows.ref_logp = sequence_logprobs(
                        reference, prompts, rows.response_ids, rows.response_mask, temperature=rollouts.temperature,
                        vocab_size=rollouts.vocab_size, cuts=cuts, prompt_index=rows.prompt_index).cpu()
            for chunk in model:
                chunk.train()
            for part, part_cuts in update_rows:
                result = policy_update(model, run.optimizer, rows.select(part), loss_step, mbs, run.dtype,
                                       cuts=part_cuts)
                results.append(result)
                lr = run.optimizer.param_groups[0]["lr"]  # the rate this update used, before the scheduler's step
                if not result.skipped:
                    run.scheduler.step(increment=1)
        t_train = time.perf_counter() - t1
        state.step += 1
        stepped = [r for r in results if not r.skipped]

        # global figures: sums over data-parallel ranks (model-parallel peers hold the same rollouts)
        group = parallel_state.get_data_parallel_group()
        kept_tokens = float(rows.response_mask.sum())
        success = (reward >= prompt_filter.pass_threshold).float()
        sums = all_reduce_values([
            float(reward.sum()), float(success.sum()), reward.numel(), kept.all_failed + kept.too_easy,
            kept.keep.numel(), float(rollouts.lengths.sum()), entropy_sum, kept_tokens,
            *[float(v.nansum()) for v in parts.values()], *[float(v.isfinite().sum()) for v in parts.values()]],
            group=group)
        responses = sums[2]
        metrics = {
            "loss": results[-1].loss if results else float("nan"),
            "grad_norm": results[-1].grad_norm if results else None,
            "lr": lr,
            "reward_mean": sums[0] / responses, "pass_rate": sums[1] / responses,
            "filtered_share": sums[3] / sums[4], "response_length": sums[5] / responses,
            "entropy": sums[6] / sums[7] if sums[7] else None, "updates": len(stepped),
            "rollout_s": t_rollout, "train_s": t_train, "step_seconds": time.perf_counter() - t0,
            "tokens_per_s": sums[5] / max(t_rollout, 1e-9), "mfu": None,
            # each reward's mean over the responses it scored (a prompt's own reward, or one for all)
            **{f"reward_{name}": value / scored if scored else None
               for name, value, scored in zip(parts, sums[8:8 + len(parts)], sums[8 + len(parts):])},
        }
        if results:
            metrics.update(loss_step.metrics.reduce(loss_step.present))
        if first_reward is None:
            first_reward = metrics["reward_mean"]
        last_reward = metrics["reward_mean"]
        if stepped:
            first_loss = stepped[0].loss if first_loss is None else first_loss
            last_loss = stepped[-1].loss
        opened.save_rollouts(batch, rollouts, reward=reward.tolist(),
                             **{name: v.tolist() for name, v in parts.items()}, advantage=advantages.tolist(),
                             kept=[bool(k) for k in keep.tolist()])
        if opened.end_step(metrics, skipped, sums[5], failed=bool(results) and not stepped):
            break

    return opened.close(("reward", first_reward, last_reward), first_loss, last_loss)

