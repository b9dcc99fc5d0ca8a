"""``python -m pretrain.train stage=distill`` end to end on 2 gloo ranks, on text-only conversations.

A teacher is trained for a few SFT steps; then (1) a student that starts from the teacher's own weights
has a KL of 0 to it (TP2 with sequence parallelism: the KL runs on vocabulary-parallel logits), and
(2) a randomly initialised student (EP2) gets closer to the teacher step after step, with only its
language model trained.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_trainer import TORCHRUN, _env

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

    # The teacher's own weights: KL 0 at the first step (before any update), in TP2 + SP.
    same = tmp_path / "same"
    _run([*base, "stage=distill", "parallel=tp2", f"stage.distill.teacher={teacher}", f"stage.init_from={teacher}",
          "stage.train_steps=1", f"train.run_dir={same}"])
    assert abs(_losses(same)[0]) < 1e-6, _losses(same)

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

