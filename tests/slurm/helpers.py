"""Helpers of the SLURM tests: the tiny stage's overrides, running ``slurm.submit``, waiting on jobs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from slurm.jobs import job_record, wait_for_job

JOB_TIMEOUT_S = 240  # a tiny stage takes ~20 s; a requeue adds ~10 s; the machine may be busy


def tiny_common_overrides(tiny_data: dict, steps: int) -> list[str]:
    """The tiny MoE on 2 CPU ranks of the local SLURM cluster (``cluster=local_slurm``), any stage."""
    return [
        "model=tiny_moe", "parallel=ep2", "cluster=local_slurm",
        f"stage.train_steps={steps}", "stage.train_tokens=null", "stage.seq_length=512",
        "train.global_batch_size=2", "train.save_interval=1000", "train.log_interval=5",
        *tiny_data["overrides"],
    ]


def tiny_stage_overrides(tiny_data: dict, run_dir: Path, steps: int, extra: Sequence[str] = ()) -> list[str]:
    """One s1_pretrain stage from random weights in ``run_dir``."""
    return ["stage=s1_pretrain", *tiny_common_overrides(tiny_data, steps), "stage.init_from=null",
            f"train.run_dir={run_dir}", *extra]


def run_submit(args: Sequence[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m slurm.submit ARGS`` as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "slurm.submit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)
    if check and proc.returncode != 0:
        raise AssertionError(f"slurm.submit exited {proc.returncode}:\n{proc.stderr}\n{proc.stdout}")
    return proc


def submit_ids(args: Sequence[str], cwd: Path, env: dict) -> list[str]:
    """Submit with ``--parsable``; the job ids."""
    ids = run_submit(["--parsable", *args], cwd, env).stdout.split()
    assert ids and all(i.isdigit() for i in ids), ids
    return ids


def metrics(run_dir: Path) -> list[dict]:
    """The trainer's per-step records (``metrics.jsonl``, appended across restarts)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def wait_for_steps(job_id: str, run_dir: Path, steps: int, env: dict, timeout_s: float = JOB_TIMEOUT_S) -> None:
    """Until the running job has logged ``steps`` steps (fails if it ends first)."""
    deadline = time.monotonic() + timeout_s
    while len(metrics(run_dir)) < steps:
        state = job_record(job_id, env)["JobState"]
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job_id} is {state} before step {steps}\n" \
                                                               f"{job_logs(job_record(job_id, env))}"
        assert time.monotonic() < deadline, f"job {job_id}: fewer than {steps} steps after {timeout_s} s"
        time.sleep(0.2)


def finish(job_id: str, env: dict) -> dict:
    """Wait for the job's final state; its record."""
    return wait_for_job(job_id, JOB_TIMEOUT_S, env, poll_s=0.5)


def job_logs(record: dict) -> str:
    """The job's stdout and stderr (for assertion messages and checks)."""
    texts = []
    for key in ("StdOut", "StdErr"):
        path = Path(record.get(key, ""))
        texts.append(f"----- {path}\n{path.read_text(errors='replace') if path.is_file() else '(missing)'}")
    return "\n".join(texts)


def checkpoint_step(run_dir: Path) -> int:
    """The step of ``<run_dir>/checkpoints/latest`` (from its trainer.json)."""
    from model.checkpoint_io import resolve_checkpoint

    path = resolve_checkpoint(run_dir / "checkpoints")
    assert path is not None, f"no checkpoint in {run_dir / 'checkpoints'}"
    return json.loads((path / "trainer.json").read_text())["step"]


def scontrol(*args: str, env: dict) -> None:
    subprocess.run(["scontrol", *args], env=env, check=True, capture_output=True, text=True, timeout=30)


def scancel(*args: str, env: dict) -> None:
    subprocess.run(["scancel", *args], env=env, check=True, capture_output=True, text=True, timeout=30)
