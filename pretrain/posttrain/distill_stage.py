"""``stage.kind: distill``: strong-to-weak distillation in the training loop of :mod:`pretrain.trainer`.

The report's post-training distils a stronger teacher into the model on text-only data, training the
language model only (``conf/stage/distill.yaml``: ``trainable: [language]``). Here the teacher is any
checkpoint this stack wrote (``stage.distill.teacher``: a checkpoints folder or a step directory). Its
model is rebuilt from its run's ``config.yaml`` in the *job's own layout* (same tensor, pipeline,
expert, context and data parallelism as the student; each pipeline rank holds its stage of the
teacher's layers, which may differ in number and width from the student's), frozen, without optimizer
state. Both models share the tokenizer (checked: same special token ids, and the teacher's padded
vocabulary must equal the student's so that the two vocabulary-parallel logit shards line up).

A step, on every rank (:func:`pretrain.trainer.run_stage`):

1. :func:`run_teacher` runs the teacher over every micro-batch of the step, before the student's
   pipeline schedule: stage by stage, the hidden states going down the pipeline point-to-point
   (:func:`pretrain.posttrain.pipeline_forward.stage_forward`). The last stage keeps the teacher's
   final hidden states of each micro-batch (after the final norm, before the output layer: [s, b, h]
   with s this rank's part of the sequence, cut over context and, with sequence parallelism, tensor
   ranks; bf16 on GPU), in the micro-batch itself under :data:`TEACHER_HIDDEN`. Not the logits: the
   vocabulary is large, the hidden states are a small fraction of it.
2. Megatron's schedule runs the student over the same micro-batch objects
   (:func:`distill_forward_step`); on the last stage the loss function turns the micro-batch's teacher
   hidden states into logits with the teacher's output layer (vocabulary-parallel, as the teacher's own
   forward does) and takes the KL to the student's logits.

Without pipeline parallelism the same code runs (the teacher pass sends nothing); the work is what
running the teacher inside the student's forward step would do, plus keeping one [s, b, h] tensor per
micro-batch until the step's schedule has used it.

Loss per target token: KL(p_teacher || p_student) at ``stage.distill.temperature``
(:func:`pretrain.posttrain.distill.vocab_parallel_forward_kl`: the vocabulary is never gathered),
weighted and normalised like the pretraining loss (``loss_weights``; mean over the global batch's
target tokens).
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path

import torch
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import get_attr_wrapped_model, unwrap_model
from omegaconf import OmegaConf

from model.checkpoint_io import load_weights
from model.context_parallel import split_on_this_rank
from pretrain.forward import model_inputs, to_device, weighted_token_loss
from pretrain.posttrain.distill import vocab_parallel_forward_kl
from pretrain.posttrain.pipeline_forward import stage_forward

TEACHER_HIDDEN = "teacher_hidden"  # micro-batch key: the teacher's final hidden states (last stage)


def build_frozen_model(job, cfg, checkpoint: Path, params_dtype: torch.dtype) -> torch.nn.Module:
    """Qwen3-VL of ``cfg`` in the job's layout with the weights of ``checkpoint``, frozen (eval mode, no
    gradients, no optimizer): a distillation teacher or an RL reference policy. With pipeline
    parallelism, this rank's stage of it (embedding and ViT on the first, output layer on the last:
    ``build_qwen3vl`` reads the stage from Megatron's parallel state)."""
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
    layers, pp = cfg.text.num_hidden_layers, job.parallel.pp
    if layers % pp:
        raise ConfigError(f"teacher {resolved}: its {layers} decoder layers do not split evenly over "
                          f"parallel.pp={pp} pipeline stages")
    teacher = build_frozen_model(job, cfg, resolved, params_dtype)
    params = sum(p.numel() for p in teacher.parameters())
    return teacher, f"{resolved} ({params / 1e6:.1f}M parameters on this rank, frozen)"


def _unwrap(teacher: torch.nn.Module):
    """The Qwen3-VL module of a :func:`build_frozen_model` teacher (inside Float16Module in bf16)."""
    return unwrap_model(teacher, module_instances=(Float16Module,))


def teacher_config(teacher: torch.nn.Module):
    """The whole teacher's ``Qwen3VLConfig`` (every layer, not this pipeline stage's)."""
    return _unwrap(teacher).cfg


@contextlib.contextmanager
def _hidden_states_out(model):
    """For the length of the block, ``model`` (a last-stage :class:`model.qwen3vl.Qwen3VLModel`) returns
    its decoder's output, after the final norm, instead of logits: its forward stops before the output
    layer when ``post_process`` is False, while the decoder keeps its own flag and final norm."""
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = True


@torch.no_grad()
def run_teacher(teacher: torch.nn.Module, micro_batches: list[dict]) -> None:
    """The teacher's forward over ``micro_batches`` (this rank's micro-batches of one step, the objects
    the student's schedule will read), through the pipeline stages; call on every rank before the step.

    On the last pipeline stage each micro-batch gets ``batch[TEACHER_HIDDEN]``: the teacher's final
    hidden states [s, b, h] (this rank's part of the sequence, in the teacher's dtype), which
    :func:`distill_forward_step` takes out again; the other stages only pass hidden states on.
    """
    inner = _unwrap(teacher)  # called directly: Float16Module would only cast the output to fp32
    last = inner.post_process
    for batch in micro_batches:
        on_device = to_device(batch)
        inputs = model_inputs(on_device, inner)  # the student's forward step builds the same

        def run():
            # Not around stage_forward: it reads post_process to know the last stage.
            with _hidden_states_out(inner) if last else contextlib.nullcontext():
                return inner(on_device["tokens"], **inputs)

        hidden = stage_forward(inner, run)
        if last:
            batch[TEACHER_HIDDEN] = hidden


def teacher_logits(teacher: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """This tensor-parallel rank's vocabulary shard of the teacher's logits [b, s, V/tp] from its final
    hidden states [s, b, h] (:data:`TEACHER_HIDDEN`): the last part of the teacher's own forward, its
    output layer (gathering a sequence-parallel split first, as in the forward)."""
    inner = _unwrap(teacher)
    weight = inner.shared_embedding_or_output_weight() if inner.share_embeddings_and_output_weights else None
    logits, _ = inner.output_layer(hidden, weight=weight, runtime_gather_output=False)
    return logits.transpose(0, 1).contiguous()


def _kl_loss(teacher, hidden: torch.Tensor, temperature: float, loss_weights: torch.Tensor,
             loss_mask: torch.Tensor, student_logits: torch.Tensor):
    with torch.no_grad():
        target = teacher_logits(teacher, hidden)
    # logits [b, s, V/tp]; the models already return this rank's context-parallel chunk of s
    kl = vocab_parallel_forward_kl(student_logits, target, loss_mask, temperature)
    return weighted_token_loss(loss_weights, loss_mask, kl)


def take_teacher_hidden(batch: dict, model, producer: str) -> torch.Tensor | None:
    """The teacher's final hidden states that ``producer`` (what runs the teacher before the step) put in
    micro-batch ``batch``, taken out of it (the step's data does not keep them), on the last pipeline stage
    of ``model``; None on the other stages. ``ValueError`` when they are missing."""
    if not get_attr_wrapped_model(model, "post_process"):
        return None
    hidden = batch.pop(TEACHER_HIDDEN, None)
    if hidden is None:
        raise ValueError(f"distillation: a micro-batch without {TEACHER_HIDDEN!r} on the last pipeline stage; "
                         f"{producer} must run before the step")
    return hidden


def distill_forward_step(teacher: torch.nn.Module, temperature: float):
    """A forward step for Megatron's schedules (any pipeline layout): the student's forward on the
    micro-batch, and on the last stage a loss function giving (sum of weighted per-token KLs to the
    teacher, target-token count, logging) from the teacher hidden states that :func:`run_teacher` put
    in the micro-batch."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        hidden = take_teacher_hidden(batch, model, "run_teacher(teacher, micro_batches)")
        batch = to_device(batch)
        student_logits = model(batch["tokens"], runtime_gather_output=False, **model_inputs(batch, model))
        loss_weights = split_on_this_rank(batch["loss_weights"], 1, batch["document_ids"])
        loss_mask = split_on_this_rank(batch["loss_mask"], 1, batch["document_ids"])
        return student_logits, partial(_kl_loss, teacher, hidden, temperature, loss_weights, loss_mask)

    return forward_step
