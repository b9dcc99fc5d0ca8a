"""Thin wrappers over the SLURM client commands: submit a script, read a job's record, wait for it.

Every function takes ``env`` (default: this process' environment) so that callers can point the
clients at a particular cluster through ``SLURM_CONF``. Errors are :class:`SlurmError` with the
command and SLURM's own message.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Mapping, Sequence

# Job states after which a job will not run again by itself (REQUEUED/PENDING/RUNNING are not here).
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED", "SPECIAL_EXIT", "REVOKED",
})


class SlurmError(RuntimeError):
    """A SLURM client command failed; the message holds the command and SLURM's answer."""


def _run(cmd: Sequence[str], env: Mapping[str, str] | None, timeout_s: float = 60) -> str:
    try:
        proc = subprocess.run(list(cmd), env=None if env is None else dict(env), capture_output=True,
                              text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]}: not found; run on a SLURM login node (or install the SLURM client)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(cmd)}: no answer within {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def sbatch_command(script: str | os.PathLike, dependency: str | None = None) -> list[str]:
    """The ``sbatch`` command line for ``script``; ``dependency`` e.g. ``afterok:123``.

    With a dependency, ``--kill-on-invalid-dep=yes`` cancels the job when the dependency can never be
    satisfied (the previous stage failed), instead of leaving it pending forever.
    """
    cmd = ["sbatch", "--parsable"]
    if dependency:
        cmd += [f"--dependency={dependency}", "--kill-on-invalid-dep=yes"]
    return cmd + [str(script)]


def submit_script(script: str | os.PathLike, dependency: str | None = None,
                  env: Mapping[str, str] | None = None) -> str:
    """Submit ``script`` with ``sbatch``; returns the job id."""
    out = _run(sbatch_command(script, dependency), env).strip()
    job_id = out.splitlines()[-1].split(";")[0].strip() if out else ""
    if not job_id.isdigit():
        raise SlurmError(f"sbatch {script}: unexpected answer {out!r} (expected a job id)")
    return job_id


def job_record(job_id: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``ExitCode``, ``Reason``, ...)."""
    out = _run(["scontrol", "show", "job", "--oneliner", str(job_id)], env)
    record: dict[str, str] = {}
    for token in out.split():
        key, sep, value = token.partition("=")
        if sep:
            record[key] = value
    if "JobState" not in record:
        raise SlurmError(f"scontrol show job {job_id}: no JobState in {out.strip()!r}")
    return record


def wait_for_job(job_id: str, timeout_s: float, env: Mapping[str, str] | None = None,
                 until: frozenset[str] = FINAL_STATES, poll_s: float = 1.0) -> dict[str, str]:
    """Poll the job until its state is in ``until``; returns its record. Raises SlurmError on timeout."""
    deadline = time.monotonic() + timeout_s
    record: dict[str, str] = {}
    while True:
        record = job_record(job_id, env)
        if record["JobState"] in until:
            return record
        if time.monotonic() > deadline:
            raise SlurmError(f"job {job_id} still {record['JobState']} (reason {record.get('Reason')}) "
                             f"after {timeout_s:.0f} s")
        time.sleep(poll_s)

