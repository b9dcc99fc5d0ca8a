"""``stage.kind: distill``: the teacher pass and the KL step in pipeline layouts, and the stage end to end.

In process (:func:`tests.multirank.run_ranks`, gloo, fp32): the real pieces of a distillation step
(``build_frozen_model`` teacher loaded from a checkpoint, ``run_teacher`` before the step,
``train_step`` with ``distill_forward_step`` through Megatron's schedule, DDP and the distributed
optimizer) on the multimodal packs of ``tests/multimodal_packs.py`` (2 micro-batches of 2 rows,
images and videos: DeepStack features travel down the pipeline with the hidden states, in the teacher
and in the student). The teacher is a wider model than the student (hidden 96 vs 64), so its pipeline
messages cannot be confused with the student's. pp=2 (and pp=2 x tp=2 with sequence parallelism) gives
the per-step KL losses and gradient norms of the one-process run; a student started from the teacher's
weights has a KL of 0 at its first step with pp=2.

End to end (``python -m pretrain.train``, 2 ranks, text-only conversations): a teacher is trained for
a few SFT steps; then (1) a student that starts from the teacher's own weights has a KL of 0 to it (TP2
with sequence parallelism: the KL runs on vocabulary-parallel logits; and PP2), and (2) a randomly
initialised student (EP2) gets closer to the teacher step after step, with only its language model
trained.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.multirank import run_ranks
from tests.multimodal_packs import MICRO_BATCH_SIZE, tiny_config
from tests.test_trainer import TORCHRUN, _env

STEPS = 2
TEMPERATURE = 1.5
# Measured, max relative difference to the one-process run over both steps and all ranks: pp2 3.4e-7
# (KL losses) and 4.9e-8 (gradient norms); pp2 x tp2 + SP 3.5e-6 and 3.2e-6 (the KL is a small
# difference of log-probabilities, ~0.01 here, so its relative rounding is larger than the loss's of
# pretraining). Feeding each micro-batch the other's teacher hidden states moves the KL of the
# same-weights student from 0 to 0.019.
LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 1e-5
SAME_WEIGHTS_KL = 1e-6  # KL of a student holding the teacher's weights (fp32 rounding of equal logits)

WORDS = "red green blue yellow circle square star triangle left right up down".split()


@pytest.fixture(scope="module")
def text_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    lines = [json.dumps({"id": f"t{i}", "messages": [
        {"role": "user", "content": f"say {WORDS[i % len(WORDS)]} and {WORDS[(i * 5) % len(WORDS)]}"},
        {"role": "assistant", "content": f"{WORDS[i % len(WORDS)]} {WORDS[(i * 5) % len(WORDS)]}"}]})
        for i in range(48)]
    (root / "text.jsonl").write_text("\n".join(lines) + "\n")
    done = subprocess.run([sys.executable, "-m", "data_tools", "build-sft", "--manifest", str(root / "text.jsonl"),
                           "--out", str(root / "text"), "--no-progress"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return root / "text"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(TORCHRUN + args, capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_distillation_to_the_teacher(synth_data, text_set, tmp_path):
    base = [*synth_data.overrides, f"train.run_root={tmp_path}", "stage.train_tokens=null", "stage.seq_length=128",
            "train.global_batch_size=4", "stage.optimizer.warmup_steps=1",
            f"data.sources=[{{name: text, path: {text_set}}}, {{name: sft, path: {text_set}}}]"]
    _run([*base, "stage=sft", "parallel=ep2", "stage.init_from=null", "stage.train_steps=8",
          "stage.optimizer.lr=1e-2"])
    teacher = tmp_path / "sft" / "checkpoints"

    # The teacher's own weights: KL 0 at the first step (before any update), in TP2 + SP and in PP2.
    for layout in ("tp2", "pp2"):
        same = tmp_path / f"same_{layout}"
        _run([*base, "stage=distill", f"parallel={layout}", f"stage.distill.teacher={teacher}",
              f"stage.init_from={teacher}", "stage.train_steps=1", f"train.run_dir={same}"])
        assert abs(_losses(same)[0]) < 1e-6, (layout, _losses(same))

    # A random student learns the teacher's distributions; only the language model changes.
    student = tmp_path / "student"
    done = _run([*base, "stage=distill", "parallel=ep2", f"stage.distill.teacher={teacher}", "stage.init_from=null",
                 "stage.train_steps=6", "stage.optimizer.lr=1e-2",
                 f"train.run_dir={student}"])
    assert "teacher" in done.stdout
    losses = _losses(student)
    print("distillation KL per step:", losses)
    assert len(losses) == 6 and losses[0] > 0.05
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses



# ----------------------------------------------------------------------------------------------------
# In process: pipeline layouts against the one-process run


def _teacher_config(tokenizer):
    """The dense test config made wider (hidden 96; the ViT's output follows): not the student's shape."""
    cfg = tiny_config("dense", tokenizer)
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, hidden_size=96, intermediate_size=192),
                               vision=dataclasses.replace(cfg.vision, out_hidden_size=96))


def _distill(rank, layout: dict, student_cfg, teacher_cfg, global_batch: list[dict], dirs: dict, save: bool,
             steps: int) -> dict:
    """``steps`` distillation steps of a ``student_cfg`` student in ``layout``, from the teacher in
    ``dirs["teacher"]``. ``save``: first write a random teacher and the student's initial weights
    (``dirs["student"]``); else load the student from ``dirs["student"]``.

    Returns ``steps``: (KL loss, grad norm, skipped, loss tokens) per step; ``last_stage``: whether this
    rank computed losses; ``teacher_params`` / ``student_params``: parameter elements on this rank;
    ``left``: micro-batches still holding teacher hidden states after the steps.
    """
    from types import SimpleNamespace

    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from common.distributed.parallel import initialize_distributed
    from model.checkpoint_io import load_weights, save_weights
    from model.qwen3vl import build_qwen3vl
    from pretrain.posttrain.distill_stage import (
        TEACHER_HIDDEN,
        build_frozen_model,
        distill_forward_step,
        run_teacher,
    )
    from pretrain.step import setup_optimizer, train_step, wrap_with_ddp
    from pretrain.trainer import normalize_loss_weights

    initialize_distributed(layout)
    sequence_parallel = layout.get("sequence_parallel", False)
    if save:
        save_weights(dirs["teacher"], [build_qwen3vl(teacher_cfg)])
    job = SimpleNamespace(parallel=SimpleNamespace(sequence_parallel=sequence_parallel))
    teacher = build_frozen_model(job, teacher_cfg, Path(dirs["teacher"]), torch.float32)

    module = build_qwen3vl(student_cfg, freeze=("vision", "merger"), sequence_parallel=sequence_parallel)
    model = wrap_with_ddp([module], DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True))
    optimizer = setup_optimizer(model, OptimizerConfig(
        optimizer="adam", lr=3e-3, clip_grad=1.0, use_distributed_optimizer=True, params_dtype=torch.float32))
    if save:
        save_weights(dirs["student"], model)
    else:
        load_weights(dirs["student"], model)

    assert parallel_state.get_data_parallel_world_size() == 1  # every rank runs both micro-batches
    seq_length = int(global_batch[0]["tokens"].shape[1])
    forward_step = distill_forward_step(teacher, TEMPERATURE)
    results, left = [], 0
    for _ in range(steps):
        micro_batches = [dict(b) for b in global_batch]
        normalize_loss_weights(micro_batches)
        run_teacher(teacher, micro_batches)
        r = train_step(model, optimizer, forward_step, iter(micro_batches), num_microbatches=len(micro_batches),
                       seq_length=seq_length, micro_batch_size=MICRO_BATCH_SIZE)
        results.append((r.loss, r.grad_norm, r.skipped, r.num_tokens))
        left += sum(TEACHER_HIDDEN in b for b in micro_batches)
    return {"steps": results, "last_stage": parallel_state.is_pipeline_last_stage(), "left": left,
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "student_params": sum(p.numel() for p in module.parameters())}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, layout_tokenizer, layout_batch):
    """The one-process (pp=1) run: it writes the teacher and the student's initial weights."""
    root = tmp_path_factory.mktemp("distill_layouts")
    dirs = {"teacher": str(root / "teacher"), "student": str(root / "student")}
    student_cfg, teacher_cfg = tiny_config("dense", layout_tokenizer), _teacher_config(layout_tokenizer)
    result = run_ranks(_distill, 1, {}, student_cfg, teacher_cfg, layout_batch, dirs, True, STEPS)[0]
    tokens = sum(int(b["loss_mask"].sum()) for b in layout_batch)
    assert all(not skipped and n == tokens for _, _, skipped, n in result["steps"]), result["steps"]
    losses = [loss for loss, *_ in result["steps"]]
    # A random student is away from the (random, wider) teacher, and one update brings it closer by
    # far more than the tolerance (measured: 0.0146 -> 0.0111): equal step-2 losses are equal updates.
    assert losses[0] > 1e-3 and losses[1] < 0.9 * losses[0], losses
    assert result["left"] == 0  # the loss took each micro-batch's teacher hidden states out
    return student_cfg, teacher_cfg, dirs, result


def _assert_distills_like_one_process(layout: dict, world: int, one_process, global_batch):
    student_cfg, teacher_cfg, dirs, ref = one_process
    results = run_ranks(_distill, world, layout, student_cfg, teacher_cfg, global_batch, dirs, False, STEPS)
    assert sum(r["last_stage"] for r in results) == world // 2  # the last stage's TP ranks
    for rank, result in enumerate(results):
        where = f"{layout}, rank {rank}"
        # Both models are split: each pipeline rank holds a part of the teacher and of the student.
        assert result["teacher_params"] < ref["teacher_params"], where
        assert result["student_params"] < ref["student_params"], where
        assert result["left"] == 0, where
        steps, ref_steps = result["steps"], ref["steps"]
        assert [(s, n) for _, _, s, n in steps] == [(s, n) for _, _, s, n in ref_steps], where
        assert [loss for loss, *_ in steps] == pytest.approx([loss for loss, *_ in ref_steps],
                                                            rel=LOSS_RTOL, abs=0), where
        assert [norm for _, norm, *_ in steps] == pytest.approx([norm for _, norm, *_ in ref_steps],
                                                               rel=GRAD_NORM_RTOL, abs=0), where


def test_pp2_distills_like_one_process(one_process, layout_batch):
    _assert_distills_like_one_process({"pp": 2}, 2, one_process, layout_batch)


def test_pp2_tp2_sp_distills_like_one_process(one_process, layout_batch):
    _assert_distills_like_one_process({"pp": 2, "tp": 2, "sequence_parallel": True}, 4, one_process, layout_batch)


def test_student_with_the_teachers_weights_has_kl_0_in_pp2(one_process, layout_batch):
    _, teacher_cfg, dirs, _ = one_process
    same = {"teacher": dirs["teacher"], "student": dirs["teacher"]}
    results = run_ranks(_distill, 2, {"pp": 2}, teacher_cfg, teacher_cfg, layout_batch, same, False, 1)
    for rank, result in enumerate(results):
        (loss, grad_norm, skipped, _), = result["steps"]
        assert not skipped and abs(loss) < SAME_WEIGHTS_KL and grad_norm < SAME_WEIGHTS_KL, (rank, result["steps"])
