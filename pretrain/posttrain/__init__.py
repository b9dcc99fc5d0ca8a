"""Post-training as the Qwen3-VL report does it: strong-to-weak distillation and RL with SAPO (or GRPO,
GSPO), as stages of the same trainer (``stage.kind: distill | distill_on_policy | rl``).

The stages:

* :mod:`.distill_stage`: ``kind: distill``, a frozen teacher in the job's layout, run in the loop of
  :func:`pretrain.trainer.run_stage` with a KL loss;
* :mod:`.on_policy_distill`: ``kind: distill_on_policy``, distillation's on-policy phase: the student's
  own rollouts (the RL stage's prompts, sampling and updates), the teacher's KL on their response tokens;
* :mod:`.rl_stage`: ``kind: rl``, the RL loop (prompts, rollouts, rewards, filtering, old log-probs,
  several updates per step), and :mod:`.rl_step`, one policy update through Megatron's schedule.

Their pieces:

* :mod:`.policy_loss`: SAPO, GRPO and GSPO policy losses behind one function, with an explicit
  aggregation ('seq-mean-token-mean' or 'token-mean');
* :mod:`.advantages`: group-normalised advantages and the filtering of too-hard / too-easy prompts;
* :mod:`.rewards`: rewards registered by name, combined with weights (``exact_match``, ``format``);
* :mod:`.distill`: forward KL(teacher || student) on vocab-parallel logits, without gathering the vocabulary;
* :mod:`.rollout`: batched sampling of G responses per prompt with a KV cache, in the training layout,
  and the log-probs of given responses under a model (old policy, reference);
* :mod:`.pipeline_forward`: one forward of a frozen model through the pipeline stages outside
  Megatron's schedules (rollouts, the distillation teacher);
* :mod:`.prompt_set`: RL prompt sets (``python -m data_tools build-rl``), encoded and dealt out per step.

Batch layout shared by all of them: B = prompts * G responses, the G responses of prompt p at rows
``p*G .. p*G + G - 1``; per-token tensors are [B, T] with a response mask [B, T] (1 = a generated token).
"""
