"""Preemption and time limits: save at the next step boundary, then requeue the SLURM job.

SLURM sends ``SIGUSR1`` ``N`` seconds before the time limit when the job asks for it
(``#SBATCH --signal=USR1@N``), and ``SIGTERM`` when it preempts or cancels. Any rank may receive the
signal; :meth:`PreemptionWatcher.stop_requested` is a collective that every rank calls at the same
step, so all ranks agree to stop there, save a checkpoint together and exit. Rank 0 then asks SLURM to
requeue the job (``scontrol requeue``), unless the job already restarted ``max_requeues`` times; the
requeued job finds the checkpoint and resumes from it.
"""

from __future__ import annotations

import os
import signal
import subprocess

import torch.distributed as dist

from common.distributed.comm import all_reduce_values


class PreemptionWatcher:
    """Records SIGUSR1/SIGTERM and turns them into a collective stop decision."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.signals = signals
        self.received: int | None = None

    def install(self) -> "PreemptionWatcher":
        for sig in self.signals:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        # Only record: the training step in flight finishes, then the ranks stop together.
        self.received = signum

    def stop_requested(self) -> bool:
        """True on every rank when any rank got a signal (collective: call at the same step everywhere)."""
        (flag,) = all_reduce_values([1.0 if self.received is not None else 0.0], op=dist.ReduceOp.MAX)
        return bool(flag)


def requeue_slurm_job(max_requeues: int, environ=None) -> str:
    """Ask SLURM to requeue this job; returns what was done, for the log. Call on one rank only."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_ARRAY_JOB_ID"):  # an array task is requeued by its array id and index
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    else:
        job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        return "not under SLURM: no requeue (rerun the same command to resume)"
    restarts = int(env.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= max_requeues:
        return f"job {job_id} already restarted {restarts} times (cluster.max_requeues={max_requeues}): not requeued"
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        return f"scontrol requeue {job_id} failed: {detail}"
    return f"requeued job {job_id} (restart {restarts + 1} of at most {max_requeues})"
