"""``stage.kind: distill``: strong-to-weak distillation in the training loop of :mod:`pretrain.trainer`.

The report's post-training distils a stronger teacher into the model on text-only data, training the
language model only (``conf/stage/distill.yaml``: ``trainable: [language]``). Here the teacher is any
checkpoint this stack wrote (``stage.distill.teacher``: a checkpoints folder or a step directory). Its
model is rebuilt from its run's ``config.yaml`` in the *job's own layout* (same tensor, expert, context
and data parallelism as the student), frozen, without optimizer state, and runs in the same process
just before the student on every micro-batch. Both models share the tokenizer (checked: same special
token ids, and the teacher's padded vocabulary must equal the student's so that the two
vocabulary-parallel logit shards line up).

Loss per target token: KL(p_teacher || p_student) at ``stage.distill.temperature``
(:func:`pretrain.posttrain.distill.vocab_parallel_forward_kl`: the vocabulary is never gathered),
weighted and normalised like the pretraining loss (``loss_weights``; mean over the global batch's
target tokens).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

from model.checkpoint_io import load_weights
from model.context_parallel import split_on_this_rank
from pretrain.forward import model_inputs, to_device, weighted_token_loss
from pretrain.posttrain.distill import vocab_parallel_forward_kl


def build_frozen_model(job, cfg, checkpoint: Path, params_dtype: torch.dtype) -> torch.nn.Module:
    """Qwen3-VL of ``cfg`` in the job's layout with the weights of ``checkpoint``, frozen (eval mode, no
    gradients, no optimizer): a distillation teacher or an RL reference policy."""
    from megatron.core.transformer.module import Float16Module

    from model.qwen3vl import build_qwen3vl

    model = build_qwen3vl(cfg, params_dtype=params_dtype, sequence_parallel=job.parallel.sequence_parallel)
    if params_dtype == torch.bfloat16:
        model = Float16Module(model.config, model)
    load_weights(checkpoint, [model])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_teacher(job, params_dtype: torch.dtype, tokenizer) -> tuple[torch.nn.Module, str]:
    """The frozen teacher of ``job`` on this rank and a line saying what it is."""
    from model.config import ConfigError, Qwen3VLConfig
    from pretrain.trainer import check_tokenizer_matches_model

    from pretrain.checkpoint import checkpoint_run_config

    resolved, run_config = checkpoint_run_config(job.stage.distill.teacher, "stage.distill.teacher")
    cfg = Qwen3VLConfig.from_mapping(OmegaConf.to_container(run_config.model, resolve=True))
    student_vocab = Qwen3VLConfig.from_mapping(job.model).text.vocab_size
    if cfg.text.vocab_size != student_vocab:
        raise ConfigError(f"teacher {resolved}: vocabulary {cfg.text.vocab_size} != the student's {student_vocab}; "
                          "teacher and student must share the tokenizer and the padded vocabulary")
    check_tokenizer_matches_model(tokenizer, cfg, f"{job.data.tokenizer} (the student's, for the teacher)")
    teacher = build_frozen_model(job, cfg, resolved, params_dtype)
    params = sum(p.numel() for p in teacher.parameters())
    return teacher, f"{resolved} ({params / 1e6:.1f}M parameters on this rank, frozen)"


def distill_forward_step(teacher: torch.nn.Module, temperature: float):
    """A forward step for Megatron's schedules (pp = 1): teacher logits without gradient, student logits,
    and a loss function giving (sum of weighted per-token KLs, target-token count, logging)."""

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator))
        inputs = model_inputs(batch, model)  # teacher and student: the same layout and attention backend
        with torch.no_grad():
            teacher_logits = teacher(batch["tokens"], runtime_gather_output=False, **inputs)
        student_logits = model(batch["tokens"], runtime_gather_output=False, **inputs)
        loss_weights = split_on_this_rank(batch["loss_weights"], 1)
        loss_mask = split_on_this_rank(batch["loss_mask"], 1)
        # logits [b, s, V/tp]; the model already returns this rank's context-parallel chunk of s
        kl = vocab_parallel_forward_kl(student_logits, teacher_logits, loss_mask, temperature)
        return kl, partial(weighted_token_loss, loss_weights, loss_mask)

    return forward_step
