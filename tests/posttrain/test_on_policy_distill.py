"""``stage.kind: distill_on_policy``: the KL on student-generated responses (pretrain/posttrain/on_policy_distill.py).

In this process: the loss of one packed micro-batch (:func:`response_kl_terms`) is KL(teacher || student) at
the response tokens only: 0 for equal logits, the direct log-softmax formula otherwise, and changing the
logits at the prompt's positions or the padding changes neither the loss nor the gradient. One rank
(gloo, fp32, tiny dense model): the update of :func:`policy_update` with the teacher's pass
(:func:`teacher_pass`) and :class:`OnPolicyKLStep` gives KL 0 and no gradient for a student holding the
teacher's weights, and a KL that falls step after step for a random student.

End to end (slow: ``python -m pretrain.train stage=distill_on_policy``, 2 ranks): an SFT teacher; a student
started from its weights has KL 0 at its first step (TP2 + SP, and PP2); a random student's KL falls over
its steps, and a run resumed mid-stage reproduces the uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.multirank import run_ranks

TEMPERATURE = 1.5
SAME_WEIGHTS_KL = 1e-6  # KL of a student holding the teacher's weights (fp32: equal logits)


def _micro_batch():
    """Two prompts, three rows of responses of 2, 3 and 1 tokens (width 3), packed with 2 tokens of padding:
    (index [3, 3], response ids, response mask, the positions of response-token logits, the others)."""
    from pretrain.posttrain.rollout import response_rows

    prompts = [{"input_ids": torch.tensor([5, 6, 7])}, {"input_ids": torch.tensor([8, 9])}]
    ids = torch.tensor([[1, 2, 0], [3, 4, 1], [2, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    inputs, index = response_rows(prompts, ids, torch.tensor([0, 0, 1]), torch.float32, response_mask=mask,
                                  multiple_of=8)
    length = inputs["input_ids"].shape[1]
    used = index[mask].unique()
    others = torch.tensor([p for p in range(length) if p not in used.tolist()])
    assert length == 16 and len(used) == 6 and (inputs["document_ids"][0, -2:] == -1).all()
    return index, ids, mask, used, others


def test_kl_is_on_response_tokens_only():
    from pretrain.posttrain.on_policy_distill import response_kl_terms

    index, ids, mask, used, others = _micro_batch()
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(1, 16, 32, generator=g)
    student = torch.randn(1, 16, 32, generator=g, requires_grad=True)

    total, count = response_kl_terms(teacher.clone(), teacher, index, ids, mask, TEMPERATURE)
    assert count == 6 and total == 0.0

    total, count = response_kl_terms(student, teacher, index, ids, mask, TEMPERATURE)
    log_t = torch.log_softmax(teacher[0, used] / TEMPERATURE, -1)
    log_s = torch.log_softmax(student[0, used].detach() / TEMPERATURE, -1)
    want = (log_t.exp() * (log_t - log_s)).sum()  # each used position once: one logit predicts one token
    assert float(total.detach()) == pytest.approx(float(want), rel=1e-6) and float(total.detach()) > 0.1
    (grad,) = torch.autograd.grad(total, student)
    assert grad[0, others].abs().max() == 0 and grad[0, used].abs().min() > 0

    # Prompt positions and padding hold other logits, in the student and in the teacher: the same loss and gradient.
    moved_student, moved_teacher = student.detach().clone(), teacher.clone()
    moved_student[0, others] += 100 * torch.randn(len(others), 32, generator=g)
    moved_teacher[0, others] = float("inf")
    moved_student.requires_grad_(True)
    moved, _ = response_kl_terms(moved_student, moved_teacher, index, ids, mask, TEMPERATURE)
    (moved_grad,) = torch.autograd.grad(moved, moved_student)
    assert float(moved.detach()) == float(total.detach()) and torch.equal(moved_grad, grad)


def _updates(rank, cfg, prompts: list[dict], rows: dict, dirs: dict, steps: int) -> dict:
    """One process: ``steps`` on-policy distillation updates on fixed rows, for a student holding the
    teacher's weights and for a random one: {name: [(KL, grad norm, skipped)] per step}."""
    from types import SimpleNamespace

    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from common.distributed.parallel import initialize_distributed
    from model.checkpoint_io import load_weights, save_weights
    from model.qwen3vl import build_qwen3vl
    from pretrain.posttrain.distill_stage import build_frozen_model
    from pretrain.posttrain.on_policy_distill import OnPolicyKLStep, teacher_pass
    from pretrain.posttrain.rl_step import RLRows, policy_update
    from pretrain.step import setup_optimizer, wrap_with_ddp

    initialize_distributed({}, seed=0)
    torch.manual_seed(0)
    save_weights(dirs["teacher"], [build_qwen3vl(cfg)])
    save_weights(dirs["random"], [build_qwen3vl(cfg)])
    job = SimpleNamespace(parallel=SimpleNamespace(sequence_parallel=False))
    teacher = build_frozen_model(job, cfg, Path(dirs["teacher"]), torch.float32)
    out = {}
    for name in ("teacher", "random"):
        module = build_qwen3vl(cfg, freeze=("vision", "merger"))
        model = wrap_with_ddp([module], DistributedDataParallelConfig(use_distributed_optimizer=True,
                                                                      grad_reduce_in_fp32=True))
        optimizer = setup_optimizer(model, OptimizerConfig(optimizer="adam", lr=2e-3, clip_grad=1.0,
                                                           use_distributed_optimizer=True, params_dtype=torch.float32))
        load_weights(dirs[name], model)
        step = OnPolicyKLStep(teacher, TEMPERATURE)
        results = []
        for _ in range(steps if name == "random" else 1):
            r = policy_update(model, optimizer, RLRows(prompts, **rows), step, 2, torch.float32,
                              prepare=partial(teacher_pass, teacher))
            results.append((r.loss, r.grad_norm, r.skipped))
        out[name] = results
    return out


def test_update_kl_is_0_from_the_teachers_weights_and_falls_from_a_random_student(layout_tokenizer, tmp_path):
    from tests.multimodal_packs import tiny_config

    tok = layout_tokenizer
    cfg = tiny_config("dense", tok)
    prompts = [{"input_ids": torch.tensor(tok.encode(t))} for t in ("red circle moves left", "which way", "a star")]
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 2, 4, 1, 5, 3])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    ids = torch.randint(0, tok.vocab_size, (6, 5), generator=g)
    ids[torch.isin(ids, torch.tensor([tok.image_pad_id, tok.video_pad_id]))] = 0
    rows = {"response_ids": ids, "response_mask": mask, "old_logp": torch.zeros(6, 5), "advantages": torch.zeros(6),
            "prompt_index": torch.arange(6) // 2}
    dirs = {"teacher": str(tmp_path / "teacher"), "random": str(tmp_path / "random")}
    out = run_ranks(_updates, 1, cfg, prompts, rows, dirs, 3)[0]
    (kl, norm, skipped), = out["teacher"]
    assert not skipped and abs(kl) < SAME_WEIGHTS_KL and norm < SAME_WEIGHTS_KL, out["teacher"]
    kls = [kl for kl, _, skipped in out["random"] if not skipped]
    print("on-policy distillation KL per update:", kls)
    assert len(kls) == 3 and kls[0] > 0.01 and kls[2] < 0.9 * kls[0], out["random"]


# ----------------------------------------------------------------------------------------------------
# End to end


def _run(args: list[str]) -> subprocess.CompletedProcess:
    from tests.test_trainer import TORCHRUN, _env

    done = subprocess.run(TORCHRUN + args, capture_output=True, text=True, env=_env(), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_on_policy_distillation_to_the_teacher(synth_data, tmp_path):
    prompts = synth_data.shards / "rl"  # the synthetic RL prompts: images and videos among them
    base = [*synth_data.overrides, f"train.run_root={tmp_path}", "data.image_min_pixels=1024",
            "data.image_max_pixels=4096"]
    # The teacher: a few SFT steps on the synthetic conversations.
    _run([*base, "stage=sft", "parallel=ep2", "stage.init_from=null", "stage.train_tokens=null",
          "stage.train_steps=6", "stage.seq_length=256", "train.global_batch_size=4", "stage.optimizer.lr=1e-2",
          "stage.optimizer.warmup_steps=1"])
    teacher = tmp_path / "sft" / "checkpoints"
    stage = ["stage=distill_on_policy", f"stage.distill.teacher={teacher}", f"stage.rl.prompts={prompts}",
             "stage.rl.prompts_per_step=4", "stage.rl.group_size=2", "stage.rl.max_new_tokens=6",
             "train.micro_batch_size=4", "train.save_interval=3"]

    # The teacher's own weights: KL 0 at the first step, in TP2 + SP (vocabulary-parallel KL) and PP2.
    for name, layout in (("tp2_sp", ["parallel=tp2", "parallel.sequence_parallel=true"]), ("pp2", ["parallel=pp2"])):
        same = tmp_path / f"same_{name}"
        _run([*base, *stage, *layout, f"stage.init_from={teacher}", "stage.train_steps=1", f"train.run_dir={same}"])
        record = _records(same)[1]
        # (the gradient is not 0: tiny_moe's load-balancing loss has one)
        assert abs(record["kl"]) < SAME_WEIGHTS_KL and record["kl"] == record["loss"], (layout, record)

    # A random student (EP2) gets closer to the teacher on its own responses; resumed from step 3, the same.
    student = tmp_path / "student"
    steps = 6
    done = _run([*base, *stage, "parallel=ep2", "stage.init_from=null", f"stage.train_steps={steps}",
                 "stage.optimizer.lr=1e-2", f"train.run_dir={student}"])
    assert "teacher" in done.stdout
    records = _records(student)
    kls = [records[s]["kl"] for s in sorted(records)]
    print("on-policy distillation KL per step:", kls)
    assert sorted(records) == list(range(1, steps + 1)) and kls[0] > 0.05
    assert sum(kls[-2:]) / 2 < 0.8 * sum(kls[:2]) / 2, kls
    for record in records.values():
        assert all(record.get(k) is not None for k in ("kl", "loss", "response_length", "tokens_per_s",
                                                         "grad_norm", "lr")), record
    assert (student / "rollouts" / "step_00000002.jsonl").is_file()

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(student / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    (resumed / "checkpoints" / "latest").write_text("step_00000003\n")
    done = _run([*base, *stage, "parallel=ep2", "stage.init_from=null", f"stage.train_steps={steps}",
                 "stage.optimizer.lr=1e-2", f"train.run_dir={resumed}"])
    assert "resumed from" in done.stdout
    again = _records(resumed)
    assert sorted(again) == [4, 5, 6]
    for step, record in again.items():
        assert record["kl"] == pytest.approx(records[step]["kl"], rel=1e-5, abs=1e-7), step
        assert record["grad_norm"] == pytest.approx(records[step]["grad_norm"], rel=1e-5), step
        assert record["response_length"] == records[step]["response_length"], step
