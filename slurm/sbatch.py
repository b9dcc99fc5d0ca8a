"""The sbatch script of one training stage, rendered from the validated job config.

:func:`render_sbatch_script` turns a :class:`pretrain.config.JobConfig` and the Hydra overrides that
produced it into a bash script for ``sbatch``:

* ``#SBATCH`` options from ``cluster``: nodes, tasks (training processes) per node, GPUs per node,
  CPUs per task, time limit, partition/account/qos, ``--signal=USR1@N`` (the trainer saves and
  requeues on it), ``--requeue``, ``--open-mode=append`` (a requeued job appends to its logs),
  ``--output``/``--error`` under ``cluster.output_dir``, then ``cluster.extra_sbatch``;
* a guard that stops a job SLURM restarted more than ``cluster.max_requeues`` times;
* ``cluster.env_setup`` lines (module loads, venv activation), ``cluster.env`` exports (NCCL and
  network variables), ``MASTER_ADDR`` (first node) and ``MASTER_PORT`` (from the job id);
* one ``srun`` that starts every rank of ``python -m pretrain.train <the same overrides>``, inside
  ``cluster.container_image`` when set (pyxis/enroot);
* a completion check: the job succeeds only when the stage's newest checkpoint reached the step
  budget, so that ``afterok`` dependents never start from a stage stopped early (a preempted job
  that was not requeued because of the requeue limit).

:func:`check_job_layout` checks the world size (nodes x tasks per node) against the parallel layout
and the global batch at submit time; the trainer checks it again before any work.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

from pretrain.config import ClusterSchema, ConfigError, JobConfig, check_batch_layout

# The trainer's checkpoint folder layout (pretrain/checkpoint.py): <run_dir>/checkpoints/latest names
# the newest complete step_XXXXXXXX directory.
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STEP_DIR_PREFIX = "step_"

_TIME_LIMIT = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_limit_seconds(value: str) -> int:
    """Seconds of a SLURM time limit: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``."""
    match = _TIME_LIMIT.match(str(value).strip())
    if not match:
        raise ConfigError(f"cluster.time_limit={value!r}: not a SLURM time (e.g. 04:00:00 or 2-00:00:00)")
    days, a, b, c = match.groups()
    a, b, c = int(a), None if b is None else int(b), None if c is None else int(c)
    if days is None:
        if b is None:  # minutes
            seconds = a * 60
        elif c is None:  # minutes:seconds
            seconds = a * 60 + b
        else:  # hours:minutes:seconds
            seconds = a * 3600 + b * 60 + c
    else:  # days-hours[:minutes[:seconds]]
        seconds = int(days) * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if seconds <= 0:
        raise ConfigError(f"cluster.time_limit={value!r}: must be positive")
    return seconds


@dataclass(frozen=True)
class JobLayout:
    """Processes of the job: ``nodes`` x ``tasks_per_node`` ranks, one per GPU on GPU clusters."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    data_parallel_size: int
    micro_batches_per_step: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def check_job_layout(job: JobConfig) -> JobLayout:
    """Validate the cluster section and the world size against ``job.parallel`` and the batch.

    Raises :class:`ConfigError` naming the values, before anything is submitted.
    """
    cluster = job.cluster
    if cluster.name == "local":
        raise ConfigError("cluster=local is this machine without a scheduler (use torchrun); "
                          "choose a SLURM cluster from conf/cluster/, e.g. cluster=example_h100")
    for key in ("nodes", "cpus_per_task"):
        if getattr(cluster, key) < 1:
            raise ConfigError(f"cluster.{key}={getattr(cluster, key)}: must be positive")
    if cluster.gpus_per_node < 0:
        raise ConfigError(f"cluster.gpus_per_node={cluster.gpus_per_node}: must be 0 (CPU) or positive")
    tasks = cluster.tasks_per_node if cluster.tasks_per_node is not None else (cluster.gpus_per_node or 1)
    if tasks < 1:
        raise ConfigError(f"cluster.tasks_per_node={cluster.tasks_per_node}: must be positive")
    if cluster.gpus_per_node and tasks > cluster.gpus_per_node:
        raise ConfigError(f"cluster.tasks_per_node={tasks} > cluster.gpus_per_node={cluster.gpus_per_node}: "
                          "each training process needs its own GPU")
    if cluster.gpu_memory_gb is not None and cluster.gpu_memory_gb <= 0:
        raise ConfigError(f"cluster.gpu_memory_gb={cluster.gpu_memory_gb}: must be positive (or null: not checked)")
    if cluster.max_requeues < 0:
        raise ConfigError(f"cluster.max_requeues={cluster.max_requeues}: must be 0 or more")
    limit = time_limit_seconds(cluster.time_limit)
    if not 0 < cluster.signal_seconds_before_limit < limit:
        raise ConfigError(f"cluster.signal_seconds_before_limit={cluster.signal_seconds_before_limit}: must be "
                          f"positive and below the time limit ({cluster.time_limit} = {limit} s)")
    world = cluster.nodes * tasks
    try:
        dp = job.parallel.data_parallel_size(world)
    except ValueError as exc:
        raise ConfigError(f"{cluster.nodes} node(s) x {tasks} task(s) per node = {world} ranks do not fit "
                          f"the parallel layout: {exc} (smallest world size: {job.parallel.min_world_size()})"
                          ) from None
    micro = check_batch_layout(job.train, dp, job.parallel.pp, job.parallel.vpp)
    return JobLayout(cluster.nodes, tasks, cluster.gpus_per_node, dp, micro)


def job_python(cluster: ClusterSchema) -> str:
    """The interpreter the job runs: ``cluster.python``, else ``python`` in a container, else this one."""
    if cluster.python:
        return cluster.python
    return "python" if cluster.container_image else sys.executable


def _sbatch_options(job: JobConfig, layout: JobLayout, output_dir: Path, workdir: Path) -> dict[str, str | None]:
    cluster = job.cluster
    options: dict[str, str | None] = {
        "job-name": job.stage.name,
        "nodes": str(layout.nodes),
        "ntasks-per-node": str(layout.tasks_per_node),
    }
    if layout.gpus_per_node:
        options["gpus-per-node"] = str(layout.gpus_per_node)
    options["cpus-per-task"] = str(cluster.cpus_per_task)
    options["time"] = cluster.time_limit
    for key in ("partition", "account", "qos"):
        if getattr(cluster, key):
            options[key] = getattr(cluster, key)
    options.update({
        # Without "B:", SLURM signals the job steps (the training ranks), not this batch shell.
        "signal": f"USR1@{cluster.signal_seconds_before_limit}",
        "requeue": None,
        "open-mode": "append",
        "chdir": str(workdir),
        "output": str(output_dir / "%x-%j.out"),
        "error": str(output_dir / "%x-%j.err"),
    })
    for key, value in cluster.extra_sbatch.items():
        options[str(key).lstrip("-")] = None if value in (None, "") else str(value)
    return options


def _directive_value(key: str, value: str) -> str:
    """An ``#SBATCH`` option's value as sbatch reads it: in double quotes when it holds a space (sbatch splits
    an unquoted directive at white space: a working directory with a space was refused)."""
    if any(ch in value for ch in '"\n\r'):
        raise ValueError(f"sbatch option --{key}={value!r}: a double quote or line break cannot be written "
                         "into an #SBATCH line")
    return f'"{value}"' if any(ch.isspace() for ch in value) else value


def render_sbatch_script(job: JobConfig, overrides: Sequence[str], *, workdir: str | Path,
                         layout: JobLayout | None = None) -> str:
    """The sbatch script that trains ``job`` (see the module docstring).

    overrides: the Hydra overrides that composed ``job`` (``cluster=<name>`` included); the ranks run
    ``python -m pretrain.train`` with exactly these. workdir: the job's working directory (relative
    paths in the config, such as ``train.run_dir``, are relative to it).
    """
    layout = layout or check_job_layout(job)
    cluster = job.cluster
    workdir = Path(workdir).resolve()
    output_dir = (workdir / cluster.output_dir).resolve()
    python = job_python(cluster)
    q = shlex.quote
    max_requeues = cluster.max_requeues

    lines = [
        "#!/bin/bash",
        f"# Generated by `python -m slurm.submit` on {datetime.now().isoformat(timespec='seconds')}: "
        f"stage {job.stage.name} on cluster {cluster.name}.",
    ]
    for key, value in _sbatch_options(job, layout, output_dir, workdir).items():
        lines.append(f"#SBATCH --{key}" if value is None else f"#SBATCH --{key}={_directive_value(key, value)}")
    lines += [
        "set -euo pipefail",
        "",
        "# SLURM requeues this job on preemption, node failure, or when the trainer asks for it before the",
        "# time limit. A job restarted more often than cluster.max_requeues stops here instead of looping.",
        'RESTARTS="${SLURM_RESTART_COUNT:-0}"',
        f"if (( RESTARTS > {max_requeues} )); then",
        f'  echo "[slurm.submit] job $SLURM_JOB_ID restarted $RESTARTS times > cluster.max_requeues={max_requeues}:'
        ' not running again" >&2',
        "  exit 1",
        "fi",
        "",
    ]
    if cluster.env_setup:
        # Module and venv scripts often read unset variables: no `set -u` while they run.
        lines.append("# Environment (cluster.env_setup)")
        lines += ["set +u", *cluster.env_setup, "set -u", ""]
    env = dict(cluster.env)
    env.setdefault("OMP_NUM_THREADS", str(cluster.cpus_per_task))
    lines.append("# Variables (cluster.env): NCCL/network settings, threads per rank")
    lines += [f"export {key}={q(str(value))}" for key, value in env.items()]
    world = layout.world_size
    lines += [
        "",
        "# Rendezvous: the first node is the master; the port follows from the job id (as in",
        "# common/distributed/parallel.py), so jobs sharing a node do not collide. Each rank reads its place from",
        "# SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; torchrun variables inherited from the submitting shell",
        "# would take precedence in common/distributed/parallel.py, hence the unset.",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"',
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        "unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE",
        f'if [[ "${{SLURM_NTASKS:-}}" != "{world}" ]]; then',
        f'  echo "[slurm.submit] the allocation has ${{SLURM_NTASKS:-?}} tasks; the layout needs {world} '
        f'({layout.nodes} node(s) x {layout.tasks_per_node})" >&2',
        "  exit 1",
        "fi",
        'echo "[slurm.submit] job $SLURM_JOB_ID (restart $RESTARTS): $SLURM_NTASKS ranks on '
        '$SLURM_JOB_NUM_NODES node(s) [$SLURM_JOB_NODELIST], master $MASTER_ADDR:$MASTER_PORT, $(date -Is)"',
        "",
    ]
    srun = ["srun", "--kill-on-bad-exit=1", f"--nodes={layout.nodes}", f"--ntasks={world}",
            f"--ntasks-per-node={layout.tasks_per_node}", f"--cpus-per-task={cluster.cpus_per_task}"]
    if cluster.container_image:
        srun.append(f"--container-image={cluster.container_image}")
        if cluster.container_mounts:
            srun.append(f"--container-mounts={','.join(cluster.container_mounts)}")
        srun.append(f"--container-workdir={workdir}")
    srun += list(cluster.srun_args)
    train = [python, "-m", "pretrain.train", *overrides]
    lines += [
        "# Every rank of the stage; SLURM forwards SIGUSR1 (time limit) and SIGTERM (preemption). Each rank",
        "# sees all GPUs of its node and takes device SLURM_LOCALID: no per-task GPU binding here.",
    ]
    lines.append(" \\\n    ".join([" ".join(q(a) for a in srun), " ".join(q(a) for a in train)]))
    run_dir = q(str(job.train.run_dir))
    steps = _total_steps(job)
    lines += [
        "",
        "# The ranks exit 0 after a preemption checkpoint too: the stage is complete only when its newest",
        "# checkpoint reached the budget. Otherwise fail, so that afterok dependents do not start.",
        f"LATEST_STEP=$(cat {run_dir}/{CHECKPOINTS_DIR}/{LATEST_FILE} 2>/dev/null || true)",
        f'LATEST_STEP="${{LATEST_STEP##*{STEP_DIR_PREFIX}}}"',
        'if [[ "$LATEST_STEP" =~ ^[0-9]+$ ]]; then LATEST_STEP=$((10#$LATEST_STEP)); else LATEST_STEP=none; fi',
        f'if [[ "$LATEST_STEP" == none ]] || (( LATEST_STEP < {steps} )); then',
        # The run folder outside the double quotes: it is shell-quoted on its own (a " or $ in it).
        f'  echo "[slurm.submit] stage {job.stage.name} stopped at step $LATEST_STEP of {steps} '
        f'(checkpoints in "{run_dir}"); not complete" >&2',
        "  exit 1",
        "fi",
        f'echo "[slurm.submit] stage {job.stage.name} complete: step {steps} of {steps}, $(date -Is)"',
        "",
    ]
    return "\n".join(lines)


def _total_steps(job: JobConfig) -> int:
    from pretrain.config import stage_total_steps

    return stage_total_steps(job)
