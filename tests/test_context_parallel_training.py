"""pretrain.train with context parallelism: a CP2 run trains exactly as the single-rank run, and its
checkpoints resume in the other layout (CP2 -> CP1 and CP1 -> CP2) with the uninterrupted run's losses.

The model is the tiny Qwen3-VL-MoE on packed sequences of the synthetic corpus (text, images, videos;
several documents per pack, cut across the CP chunks). Both layouts read the same data stream (one
data-parallel rank), so per-step losses and gradient norms must agree to fp32 round-off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def _train(synth_data, run_root: Path, layout: str, steps: int) -> None:
    ranks = "1" if layout == "single" else "2"
    args = [*synth_data.overrides, f"train.run_root={run_root}", f"parallel={layout}", "stage=s3_long_256k",
            "stage.init_from=null", "stage.train_tokens=null", f"stage.train_steps={steps}",
            "stage.seq_length=512", "train.global_batch_size=2", "train.log_interval=1", "train.save_interval=2",
            # A constant learning rate: a run stopped after 2 steps and continued to 4 follows the same
            # schedule as one that ran 4 steps at once.
            "stage.optimizer.schedule=constant", "stage.optimizer.warmup_steps=0", "stage.optimizer.lr=1e-3"]
    done = subprocess.run([TORCHRUN, "--nproc-per-node", ranks, "-m", "pretrain.train", *args],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _metrics(run_root: Path) -> dict[int, tuple[float, float]]:
    lines = (run_root / "s3_long_256k" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in map(json.loads, lines)}


def _assert_same(got: dict, expected: dict, steps) -> None:
    for step in steps:
        (loss, norm), (ref_loss, ref_norm) = got[step], expected[step]
        assert loss == pytest.approx(ref_loss, rel=1e-5), (step, loss, ref_loss)
        assert norm == pytest.approx(ref_norm, rel=1e-4), (step, norm, ref_norm)


@pytest.mark.slow
def test_cp2_trains_as_one_rank_and_resumes_across_layouts(synth_data, tmp_path):
    _train(synth_data, tmp_path / "single", "single", 4)
    reference = _metrics(tmp_path / "single")
    assert sorted(reference) == [1, 2, 3, 4] and reference[4][0] < reference[1][0]

    _train(synth_data, tmp_path / "cp2", "cp2", 4)
    _assert_same(_metrics(tmp_path / "cp2"), reference, [1, 2, 3, 4])

    for first, then in (("cp2", "single"), ("single", "cp2")):
        run_root = tmp_path / f"{first}_then_{then}"
        _train(synth_data, run_root, first, 2)
        _train(synth_data, run_root, then, 4)  # resumes from step 2, saved in the other layout
        _assert_same(_metrics(run_root), reference, [3, 4])
