"""``stage.kind: distill_on_policy``: on-policy strong-to-weak distillation (the second phase of the
Qwen3 report's "Strong-to-Weak Distillation", arXiv 2505.09388 Sec. 4.5, which the Qwen3-VL report's
small models follow): the student samples responses to prompts, and learns the teacher's next-token
distributions on those responses, its own.

``run_on_policy_distill_stage(job)`` runs on every rank (``python -m pretrain.train
stage=distill_on_policy model=... stage.distill.teacher=... stage.rl.prompts=...``), in any layout the
RL stage runs (tp, sp, pp, ep, dp; no cp, no vpp). It is the RL stage's loop
(:mod:`pretrain.posttrain.rl_stage`) with the distillation stage's teacher
(:mod:`pretrain.posttrain.distill_stage`) in place of rewards and a policy loss. Each step:

1. **prompts and rollouts**: the step's ``stage.rl.prompts_per_step`` prompts of the RL prompt set
   (``python -m data_tools build-rl``), ``stage.rl.group_size`` responses each from the student as it
   is now (``stage.rl.temperature``, ``top_p``, ``max_new_tokens``; KV cache in the training layout):
   :meth:`pretrain.posttrain.rl_stage.RolloutStage.next_rollouts`;
2. **rows**: each response after its prompt, the rows of a micro-batch packed into one sequence
   (:class:`pretrain.posttrain.rl_step.RLRows`, :func:`pretrain.posttrain.rl_step.mini_batches`); no
   reward, advantage or prompt filter: every response is trained on;
3. **teacher**: :func:`pretrain.posttrain.distill_stage.run_teacher` over each micro-batch before the
   schedule (the last pipeline stage keeps its final hidden states in the micro-batch);
4. **update** (``stage.rl.updates_per_step`` optimizer steps on successive mini-batches of the rows; 1 by
   default): :func:`pretrain.posttrain.rl_step.policy_update` with :class:`OnPolicyKLStep`, whose loss
   is KL(teacher || student) at ``stage.distill.temperature`` at every response token (the prompt's
   positions and the packing's padding are not gathered: they add nothing to the loss or its gradient),
   a token mean over the global mini-batch (:func:`response_kl_terms`). Both distributions are over the
   whole (padded) vocabulary, as in ``kind: distill``.

Logged per step (``metrics.jsonl``, TensorBoard, console): ``loss`` (the last update's KL), ``kl`` (the
first update's: the student that sampled the responses against the teacher, before the step changes
it), ``response_length``, ``tokens_per_s`` (generated tokens per second of rollout), ``grad_norm``,
``lr``, ``rollout_s``, ``train_s``; the rollouts in ``<run_dir>/rollouts/step_N.jsonl`` with
``stage.rl.save_rollouts``. Checkpoints and resume are the RL stage's: a run resumed from step k samples
and trains exactly as the uninterrupted run.
"""

from __future__ import annotations

import time
from functools import partial

import torch

from common.distributed.comm import all_reduce_values
from pretrain.config import JobConfig
from pretrain.forward import model_inputs, to_device
from pretrain.posttrain.distill import vocab_parallel_forward_kl
from pretrain.posttrain.distill_stage import build_teacher, run_teacher, take_teacher_hidden, teacher_logits
from pretrain.posttrain.rl_stage import load_rl_prompts, open_rollout_stage
from pretrain.posttrain.rl_step import RLRows, mini_batches, policy_update
from pretrain.posttrain.rollout import response_tokens
from pretrain.step import LOSS_KEY
from pretrain.trainer import StageResult


def response_kl_terms(student_logits: torch.Tensor, target_logits: torch.Tensor, index: torch.Tensor,
                      response_ids: torch.Tensor, response_mask: torch.Tensor,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over the response tokens of KL(teacher || student) at ``temperature``, their count) of one
    micro-batch: the rows of :func:`pretrain.posttrain.rollout.response_rows` packed into one sequence,
    ``student_logits`` and ``target_logits`` (the teacher's) this rank's vocabulary shard [1, L, V/tp],
    ``index`` [n, T] the position of the logit that predicts each response token, ``response_mask``
    [n, T] the tokens that count. Only those positions are gathered: the prompt's and the padding's
    logits change neither the loss nor its gradient (which only the student gets)."""
    _, positions, _ = response_tokens(student_logits, index, response_ids, response_mask)

    def at_responses(logits: torch.Tensor) -> torch.Tensor:
        return logits.reshape(-1, logits.shape[-1])[positions]  # [N, V/tp]

    kl = vocab_parallel_forward_kl(at_responses(student_logits), at_responses(target_logits),
                                   temperature=temperature)
    return kl.sum(), torch.tensor(positions.numel(), device=kl.device)


def teacher_pass(teacher: torch.nn.Module, micro_batches: list[dict]) -> None:
    """The teacher's forward over an update's micro-batches (``policy_update``'s ``prepare``; every rank,
    every micro-batch in order): its final hidden states land in each micro-batch on the last pipeline
    stage (:func:`pretrain.posttrain.distill_stage.run_teacher`)."""
    for batch in micro_batches:
        batch["tokens"] = batch["input_ids"]  # the key run_teacher (and OnPolicyKLStep) read the ids under
    run_teacher(teacher, micro_batches)


class OnPolicyKLStep:
    """Forward step of Megatron's schedules for on-policy distillation (any pipeline layout): the
    student's forward on a micro-batch of :func:`teacher_pass`, and on the last stage a loss function
    giving (sum of the response tokens' KLs to the teacher, their count, logging) from the teacher hidden
    states in the micro-batch; Megatron divides by the count over micro-batches and data-parallel ranks."""

    def __init__(self, teacher: torch.nn.Module, temperature: float):
        self.teacher, self.temperature = teacher, temperature

    def __call__(self, data_iterator, model):
        batch = next(data_iterator)
        hidden = take_teacher_hidden(batch, model, "teacher_pass (policy_update's prepare)")
        batch = to_device(batch)
        # model_inputs: the arguments run_teacher gave the teacher (equal weights: equal logits, KL 0)
        logits = model(batch["tokens"], runtime_gather_output=False, **model_inputs(batch, model))
        return logits, partial(self._loss, batch, hidden)

    def _loss(self, batch: dict, hidden: torch.Tensor, logits: torch.Tensor):
        with torch.no_grad():
            target = teacher_logits(self.teacher, hidden)
        total, count = response_kl_terms(logits, target, batch["index"], batch["response_ids"],
                                         batch["response_mask"], self.temperature)
        report = torch.stack([total.detach().float(), count.float()])
        return total, count.to(torch.int), {LOSS_KEY: report}


def run_on_policy_distill_stage(job: JobConfig, composed_yaml: str = "") -> StageResult:
    """Train one on-policy distillation stage on this rank (call on every rank; see the module docstring)."""
    from megatron.core import parallel_state

    rl, mbs, g = job.stage.rl, job.train.micro_batch_size, job.stage.rl.group_size
    records = load_rl_prompts(job)
    opened = open_rollout_stage(job, records, composed_yaml)
    run = opened.run
    model, state, logger = run.model, run.state, run.logger
    teacher, teacher_origin = build_teacher(job, run.dtype, run.tokenizer)
    loss_step = OnPolicyKLStep(teacher, job.stage.distill.temperature)
    total_steps = job.stage.train_steps
    logger.message(f"{job.stage.name}: {run.origin}; teacher {teacher_origin}; {total_steps} steps of "
                   f"{rl.prompts_per_step} prompts x G={g} (KL at temperature {job.stage.distill.temperature}, "
                   f"{rl.updates_per_step} update(s) per step); {len(records)} prompts in {rl.prompts}; layout "
                   f"{opened.info.world_size} ranks, dp={opened.dp_size}, {job.parallel}; {run.dtype}")

    first_kl, last_kl = None, None
    opened.begin()
    while state.step < total_steps:
        t0 = time.perf_counter()
        batch, prompts, skipped, rollouts = opened.next_rollouts()
        t_rollout = time.perf_counter() - t0

        t1 = time.perf_counter()
        # Every data-parallel rank has prompts_per_step / dp prompts x G rows: no padding rows needed.
        rows = RLRows(prompts, rollouts.response_ids, rollouts.response_mask, rollouts.logprobs,
                      torch.zeros(len(rollouts.lengths)), rollouts.prompt_index)
        results, lr = [], run.optimizer.param_groups[0]["lr"]
        for part, cuts in mini_batches(rows, mbs, rl.updates_per_step)[0]:
            lr = run.optimizer.param_groups[0]["lr"]  # the rate this update uses, before the scheduler's step
            result = policy_update(model, run.optimizer, rows.select(part), loss_step, mbs, run.dtype, cuts=cuts,
                                   prepare=partial(teacher_pass, teacher))
            results.append(result)
            if not result.skipped:
                run.scheduler.step(increment=1)
        t_train = time.perf_counter() - t1
        state.step += 1
        stepped = [r for r in results if not r.skipped]

        # global figures: sums over data-parallel ranks (model-parallel peers hold the same rollouts)
        generated, responses = all_reduce_values([float(rollouts.lengths.sum()), rollouts.lengths.numel()],
                                                 group=parallel_state.get_data_parallel_group())
        metrics = {
            "loss": results[-1].loss, "kl": results[0].loss, "grad_norm": results[-1].grad_norm, "lr": lr,
            "response_length": generated / responses, "updates": len(stepped), "rollout_s": t_rollout,
            "train_s": t_train, "step_seconds": time.perf_counter() - t0,
            "tokens_per_s": generated / max(t_rollout, 1e-9), "mfu": None,
        }
        first_kl = metrics["kl"] if first_kl is None else first_kl
        last_kl = metrics["kl"]
        opened.save_rollouts(batch, rollouts)
        if opened.end_step(metrics, skipped, generated, failed=not stepped):
            break

    return opened.close(("KL", first_kl, last_kl), first_kl, last_kl)
