"""torch.distributed + Megatron-Core parallel state from the Hydra ``parallel`` config.

The process layout comes from the launcher's environment:

* ``torchrun --nproc-per-node N``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
* SLURM ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the first host of
  ``SLURM_JOB_NODELIST`` as master (``MASTER_PORT`` from the environment, else derived from the job id);
* nothing: a single process (world size 1) on a free local port.

The backend is NCCL when CUDA is available, else gloo with :mod:`common.distributed.cpu_runtime` installed.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import subprocess
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
import torch.distributed as dist

from common.distributed.cpu_runtime import install_cpu_runtime
from common.distributed.spawn import free_port


class ParallelConfigError(ValueError):
    """A parallel layout that cannot run on the given world size; the message names the values."""


@dataclass
class ParallelConfig:
    """Model-parallel layout. Sizes are numbers of ranks (processes, one per GPU)."""

    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    vpp: int | None = None  # virtual pipeline stages per pipeline rank (interleaved schedule)
    ep: int = 1  # expert parallel
    etp: int | None = None  # expert tensor parallel (None: same as tp)
    cp: int = 1  # context parallel
    sequence_parallel: bool = False
    distributed_timeout_minutes: int = 30

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "ParallelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ParallelConfigError(f"unknown parallel option(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: cfg[k] for k in cfg})

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def validate(self, moe: bool = False) -> None:
        """Check the values on their own (the world size is checked by :meth:`data_parallel_size`).

        ``moe``: the model to train has MoE layers (rules that depend on the model; a caller that does
        not know the model leaves it False and gets the layout-only checks).
        """
        for name in ("tp", "pp", "ep", "cp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ParallelConfigError(f"parallel.{name}={value!r} must be a positive integer")
        if self.etp is not None and (not isinstance(self.etp, int) or self.etp < 1):
            raise ParallelConfigError(f"parallel.etp={self.etp!r} must be a positive integer or null")
        if self.vpp is not None:
            if not isinstance(self.vpp, int) or self.vpp < 2:
                # vpp=1 would select Megatron's interleaved schedule for one chunk per rank.
                raise ParallelConfigError(f"parallel.vpp={self.vpp!r} must be an integer >= 2 (virtual "
                                          "pipeline stages per pipeline rank) or null (no interleaving)")
            if self.pp < 2:
                raise ParallelConfigError(f"parallel.vpp={self.vpp} needs parallel.pp >= 2, got pp={self.pp}")
        if self.sequence_parallel and self.tp < 2:
            raise ParallelConfigError("parallel.sequence_parallel=true needs parallel.tp >= 2, got tp=1")
        if self.ep > 1 and self.tp > 1 and not self.sequence_parallel:
            # Expert parallelism means a MoE model: see the rule below.
            raise ParallelConfigError(
                f"parallel.ep={self.ep} with parallel.tp={self.tp} needs parallel.sequence_parallel=true"
            )
        if moe and self.tp > 1 and not self.sequence_parallel:
            # Megatron-Core's MoE layer raises at the first training forward without it, whatever ep is.
            raise ParallelConfigError(
                f"parallel.tp={self.tp} with a MoE model needs parallel.sequence_parallel=true "
                "(Megatron-Core's MoE layer does not train tensor-parallel without it)"
            )

    def data_parallel_size(self, world_size: int) -> int:
        """Validate the layout against ``world_size`` ranks and return the data-parallel size."""
        self.validate()
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ParallelConfigError(
                f"world size {world_size} is not divisible by tp*pp*cp = "
                f"{self.tp}*{self.pp}*{self.cp} = {model_parallel}"
            )
        expert_block = self.expert_tp * self.ep * self.pp
        if world_size % expert_block:
            raise ParallelConfigError(
                f"world size {world_size} is not divisible by etp*ep*pp = "
                f"{self.expert_tp}*{self.ep}*{self.pp} = {expert_block}"
            )
        return world_size // model_parallel

    def min_world_size(self) -> int:
        """The smallest world size this layout runs on (both the dense and the expert blocks fit)."""
        return math.lcm(self.tp * self.pp * self.cp, self.expert_tp * self.ep * self.pp)


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    # Without scontrol, expand the first entry of a list like "node[003-005,9],gpu1" ourselves.
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    match = re.match(r"^(.*?)\[([^\]]+)\](.*)$", first)
    if not match:
        return first
    prefix, ranges, suffix = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def process_info(environ: Mapping[str, str] | None = None) -> ProcessInfo:
    """Read this process' rank and rendezvous from the launcher's environment (see module docstring)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return ProcessInfo(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return ProcessInfo(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
            # A port derived from the job id lets concurrent jobs on one node avoid each other.
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
            launcher="slurm",
        )
    return ProcessInfo(0, 1, 0, "127.0.0.1", free_port(), "single")


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device this process drives: ``local_rank`` among the node's GPUs, or 0 when the launcher
    gave each process one GPU of its own (``srun --gpus-per-task=1``, ``--gpu-bind``: every rank sees
    a single device, its own, whatever its local rank). Raises :class:`ParallelConfigError` when the
    process sees more than one GPU but fewer than ``local_rank + 1``."""
    if device_count == 1:
        return 0
    if not 0 <= local_rank < device_count:
        raise ParallelConfigError(
            f"local rank {local_rank} has no GPU: this process sees {device_count} "
            "(CUDA_VISIBLE_DEVICES); start at most one rank per visible GPU, or give each rank one GPU")
    return local_rank


def initialize_distributed(
    parallel: ParallelConfig | Mapping[str, Any],
    seed: int = 1234,
    environ: Mapping[str, str] | None = None,
) -> ProcessInfo:
    """Start torch.distributed and Megatron-Core's parallel state for ``parallel``; seed every RNG.

    Validates the layout against the world size before creating any group. Idempotent per process.
    """
    from megatron.core import parallel_state, tensor_parallel

    cfg = parallel if isinstance(parallel, ParallelConfig) else ParallelConfig.from_mapping(parallel)
    info = process_info(environ)
    cfg.data_parallel_size(info.world_size)  # raises ParallelConfigError before any work

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        # Before NCCL starts: its communicators bind to the current device.
        torch.cuda.set_device(cuda_device_index(info.local_rank, torch.cuda.device_count()))
    else:
        install_cpu_runtime()
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=f"tcp://{info.master_addr}:{info.master_port}",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(minutes=cfg.distributed_timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tp,
            pipeline_model_parallel_size=cfg.pp,
            virtual_pipeline_model_parallel_size=cfg.vpp,
            context_parallel_size=cfg.cp,
            expert_model_parallel_size=cfg.ep,
            expert_tensor_parallel_size=cfg.etp,
            distributed_timeout_minutes=cfg.distributed_timeout_minutes,
        )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return info


def destroy_distributed() -> None:
    """Tear down Megatron-Core's parallel state and the default process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
