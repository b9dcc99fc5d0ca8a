"""End to end against a real SLURM (munged + slurmctld + slurmd on this machine, 2 CPUs).

Every job is submitted with ``python -m slurm.submit`` and trains the tiny MoE on 2 CPU ranks (expert
parallel 2) through the sbatch script's ``srun``. Skipped, with the reason, where SLURM cannot run.
"""

from __future__ import annotations

import re

import pytest

from slurm.jobs import job_record, wait_for_job
from tests.slurm.helpers import (
    checkpoint_step,
    finish,
    job_logs,
    metrics,
    scancel,
    scontrol,
    submit_ids,
    tiny_common_overrides,
    tiny_stage_overrides,
    wait_for_steps,
)

STEPS = 16


@pytest.fixture(scope="session")
def chain(local_slurm, tiny_data, tmp_path_factory) -> dict:
    """``--chain s0_align,s1_pretrain``: s0_align STEPS steps from random weights, then 2 steps of
    s1_pretrain from its checkpoint; both submitted at once and run to the end."""
    workdir = tmp_path_factory.mktemp("chain")
    runs = workdir / "runs"
    env = local_slurm.env()
    ids = submit_ids(["--chain", "s0_align,s1_pretrain", *tiny_common_overrides(tiny_data, STEPS),
                      f"train.run_root={runs}", "s1_pretrain:stage.train_steps=2"], workdir, env)
    assert len(ids) == 2
    dependency = job_record(ids[1], env)["Dependency"]
    records = [finish(job_id, env) for job_id in ids]
    return {"ids": ids, "records": records, "runs": runs, "workdir": workdir, "dependency": dependency}


def test_submitted_stage_trains_and_checkpoints(chain):
    (job_id, _), (record, _), run_dir = chain["ids"], chain["records"], chain["runs"] / "s0_align"
    logs = job_logs(record)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", logs
    assert record["Restarts"] == "0" and record["NumTasks"] == "2", record
    # One srun started both ranks with SLURM's rendezvous; the trainer saw 2 ranks, dp=2 (ep=2).
    assert f"[slurm.submit] job {job_id} (restart 0): 2 ranks on 1 node(s)" in logs
    assert re.search(rf"master \S+:{20000 + int(job_id) % 20000}", logs), logs
    assert "s0_align: random initialisation" in logs and "layout 2 ranks, dp=2" in logs
    assert f"s0_align step {STEPS}/{STEPS}" in logs
    assert f"[slurm.submit] stage s0_align complete: step {STEPS} of {STEPS}" in logs
    assert checkpoint_step(run_dir) == STEPS
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))
    # The submitted script is kept next to the logs and asks for the pre-limit signal and requeue.
    (script,) = (chain["workdir"] / "slurm_logs").glob("s0_align-*.sbatch")
    text = script.read_text()
    assert "#SBATCH --signal=USR1@60" in text and "#SBATCH --requeue" in text
    assert "#SBATCH --ntasks-per-node=2" in text


def test_chain_runs_each_stage_after_the_previous_from_its_checkpoint(chain):
    (first_id, _), (first, second), runs = chain["ids"], chain["records"], chain["runs"]
    assert f"afterok:{first_id}" in chain["dependency"]
    assert second["JobState"] == "COMPLETED", job_logs(second)
    assert second["StartTime"] >= first["EndTime"]
    logs = job_logs(second)
    assert f"s1_pretrain: weights from {runs}/s0_align/checkpoints/step_{STEPS:08d}" in logs
    assert checkpoint_step(runs / "s1_pretrain") == 2
    assert [m["step"] for m in metrics(runs / "s1_pretrain")] == [1, 2]


@pytest.mark.slow
def test_signalled_job_requeues_and_resumes_without_lost_steps(local_slurm, tiny_data, chain, tmp_path):
    """SIGUSR1 (what SLURM sends before the time limit): checkpoint, requeue, resume, same result."""
    env = local_slurm.env()
    run_dir = tmp_path / "run"
    (job_id,) = submit_ids(["stage=s0_align", *tiny_common_overrides(tiny_data, STEPS), f"train.run_dir={run_dir}"],
                           tmp_path, env)
    wait_for_steps(job_id, run_dir, 1, env)
    scancel("--signal=USR1", job_id, env=env)  # to the job steps (the ranks), as --signal=USR1@N does
    record = finish(job_id, env)
    logs = job_logs(record)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", logs
    assert record["Restarts"] == "1", logs
    saved = re.search(r"signal \d+ received: saved \S+step_(\d+) at step (\d+)", logs)
    assert saved, logs
    stopped = int(saved.group(2))
    assert 1 <= stopped < STEPS
    assert f"requeued job {job_id} (restart 1" in logs
    assert f"[slurm.submit] job {job_id} (restart 1)" in logs
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d} (step {stopped})" in logs
    # No lost and no repeated steps: 1..k before the signal, k+1..STEPS after the requeue.
    records = metrics(run_dir)
    assert [m["step"] for m in records] == list(range(1, STEPS + 1))
    assert checkpoint_step(run_dir) == STEPS
    # The exact resume gives the uninterrupted run's losses (the chain's s0_align), step for step.
    reference = [m["loss"] for m in metrics(chain["runs"] / "s0_align")]
    assert [m["loss"] for m in records] == pytest.approx(reference, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_preempted_job_at_its_requeue_limit_fails_and_stops_the_chain(local_slurm, tiny_data, tmp_path):
    """cluster.max_requeues=0: the checkpoint is saved but the job is not requeued; it must not count
    as a finished stage, so the next stage of the chain is cancelled instead of starting."""
    env = local_slurm.env()
    runs = tmp_path / "runs"
    ids = submit_ids(["--chain", "s0_align,s1_pretrain", *tiny_common_overrides(tiny_data, STEPS),
                      f"train.run_root={runs}", "s0_align:cluster.max_requeues=0"], tmp_path, env)
    wait_for_steps(ids[0], runs / "s0_align", 1, env)
    scancel("--signal=USR1", ids[0], env=env)
    first, second = finish(ids[0], env), finish(ids[1], env)
    logs = job_logs(first)
    assert first["JobState"] == "FAILED" and first["Restarts"] == "0", logs
    assert "(cluster.max_requeues=0): not requeued" in logs
    stopped = checkpoint_step(runs / "s0_align")
    assert stopped < STEPS
    assert f"stage s0_align stopped at step {stopped} of {STEPS}" in logs
    assert second["JobState"] == "CANCELLED", second
    assert not (runs / "s1_pretrain").exists()


@pytest.mark.slow
def test_job_restarted_beyond_its_limit_does_not_run_again(local_slurm, tiny_data, tmp_path):
    """SLURM itself requeues (node failure, preemption): the script stops past cluster.max_requeues."""
    env = local_slurm.env()
    run_dir = tmp_path / "run"
    (job_id,) = submit_ids(tiny_stage_overrides(tiny_data, run_dir, STEPS, ["cluster.max_requeues=0"]),
                           tmp_path, env)
    wait_for_job(job_id, 120, env, until=frozenset({"RUNNING"}), poll_s=0.2)
    scontrol("requeue", job_id, env=env)
    record = finish(job_id, env)
    logs = job_logs(record)
    assert record["JobState"] == "FAILED" and record["Restarts"] == "1", logs
    assert f"job {job_id} restarted 1 times > cluster.max_requeues=0: not running again" in logs


@pytest.mark.slow
def test_crashing_job_fails_and_is_not_requeued(local_slurm, tiny_data, tmp_path):
    env = local_slurm.env()
    (job_id,) = submit_ids(tiny_stage_overrides(tiny_data, tmp_path / "run", STEPS,
                                                [f"data.root={tmp_path / 'no_such_shards'}"]), tmp_path, env)
    record = finish(job_id, env)
    logs = job_logs(record)
    assert record["JobState"] == "FAILED" and record["Restarts"] == "0", logs
    assert record["ExitCode"] != "0:0"
    assert "no_such_shards" in logs
