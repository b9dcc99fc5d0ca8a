"""Training checkpoints as Megatron distributed checkpoints, written atomically, keep-last-k.

Layout of ``<run_dir>/checkpoints``::

    step_00000100/            a Megatron distributed checkpoint (model + optimizer shards, any layout)
        trainer.json          step, consumed samples/tokens, scheduler state, skipped steps, layout,
                              number of data streams
        ranks/rank_00003.pt   per-rank state: RNG states
        data/stream_00001.pt  the position of data stream 1 (pretrain/data/loader.py), written once
    latest                    text file naming the newest complete step directory

After each save, older step directories beyond ``keep_last`` are removed, and so is debris: step
directories newer than the one ``latest`` names (left by a kill between a save's rename and its rewrite of
``latest``: nothing names them, and the resumed run went on from an earlier step) and the
``step_*.tmp`` folders of crashed saves. The step ``latest`` names is never removed.

A checkpoint is written to ``step_00000100.tmp`` by all ranks, then rank 0 renames it to its final
name and only after that rewrites ``latest`` (write-then-rename): a crash or kill at any point leaves
the previous checkpoint and ``latest`` intact, and a half-written directory is never under a final
name. Model and optimizer shards use Megatron's ``fully_reshardable`` optimizer format, so a
checkpoint loads in another tensor/pipeline/expert/data-parallel layout. The data streams are the
stage's, not a rank's, so their positions load in any layout too
(:meth:`CheckpointManager.load_data_states`).
A resume is refused (:class:`CheckpointError`, before anything loads) when the checkpoint was written for
another model architecture (its ``qwen3vl_config.json``: :func:`model.checkpoint_io.check_model_config`),
or with the other kind of optimizer: Megatron's distributed optimizer and the plain one (as with EP=1
and EP>1 for MoE) keep their state in forms that do not map to each other; ``stage.init_from`` loads
the weights alone.
The per-rank RNG states are restored only when the layout and world size are unchanged: in another
layout every rank goes on with the RNG that ``initialize_distributed`` seeded from ``train.seed`` at
start-up. Training draws no random numbers as configured (the model configs set dropout to
0), so that changes no loss; it would change the dropout masks of a model with dropout.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from model.checkpoint_io import (
    LATEST,
    CheckpointError,
    check_model_config,
    load_model_state,
    model_sharded_state,
    resolve_checkpoint,
    unreadable_checkpoint_message,
)
from common.megatron_fixes import apply_megatron_fixes

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_STEP_DIR = re.compile(r"^step_(\d{8})\.tmp$")
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


@dataclass
class TrainerState:
    """Progress of a stage, saved in ``trainer.json``."""

    step: int = 0
    consumed_samples: int = 0  # packed sequences
    consumed_tokens: int = 0  # real (non-padding) tokens
    skipped_steps: int = 0  # non-finite steps skipped in total
    scheduler: dict = field(default_factory=dict)
    layout: dict = field(default_factory=dict)  # world size and parallel sizes at save time
    stage: str = ""
    num_optimizers: int = 1  # Megatron's chained optimizers: 2 for MoE with EP>1 (dense + experts)
    # train.use_distributed_optimizer at save time; None: not recorded (a checkpoint written before it was)
    use_distributed_optimizer: bool | None = None
    data_streams: int = 0  # the stage's data streams (its first data-parallel size); 0: none saved
    # Resumes whose data could not continue the saved streams (pretrain.data.loader.plan_data_resume):
    # {"step": ..., "warning": ...}, oldest first.
    data_resumes: list = field(default_factory=list)
    # RL stages: the prompt stream's position (pretrain.posttrain.prompt_set.PromptStream.state_dict)
    prompt_stream: dict = field(default_factory=dict)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def collect_rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _materialize_optimizer_state(optimizer) -> None:
    """Give every parameter the torch-Adam state a step would create (zeros, step 0) if it has none yet.

    Loading a checkpoint into a fresh optimizer needs the state's structure to exist: with torch's Adam
    (no transformer-engine or apex: CPU, and GPUs without them) Megatron's distributed optimizer reads
    the common ``step`` from the per-parameter state before loading, and torch's Adam creates state
    lazily on its first step. The loaded values then replace these placeholders.

    With TE's or apex's fused Adam Megatron keeps ``step`` in the parameter groups and allocates the
    state itself when it is empty (as Megatron-LM's own loader relies on); a per-parameter ``step``
    put there would make its state loader look for a ``step`` tensor in the checkpoint and fail, so
    nothing is added.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)


def _num_optimizers(optimizer) -> int:
    return len(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed_optimizer(optimizer) -> bool | None:
    """Whether ``optimizer`` is (or chains) Megatron's distributed optimizer; None without an optimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if optimizer is None:
        return None
    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def _sharded_state(model: list, optimizer, is_loading: bool = False) -> dict:
    model_state = model_sharded_state(model)
    state = dict(model_state)
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
        # Nested by chunk, as Megatron reads it (any structure): merged into one dict, the local names of
        # virtual pipeline chunks ("decoder.layers.0...") would overwrite each other.
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata=dict(OPTIMIZER_SHARDING))
    return state


def _first_of_data_replica() -> bool:
    """Whether this rank is the first of the ranks that share its data (tensor/pipeline/context peers)."""
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
            and ps.get_context_parallel_rank() == 0)


def current_layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "etp": ps.get_expert_tensor_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


class CheckpointManager:
    """Saves and loads the checkpoints of one stage's run directory (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    # ------------------------------------------------------------------ save
    def save(self, model: list, optimizer, state: TrainerState, rank_state: dict[str, Any],
             describe=None, data_states: dict[int, Any] | None = None) -> Path:
        """Write a complete checkpoint for ``state.step``; collective over all ranks.

        ``rank_state``: this rank's own state (RNG). ``data_states``: {stream: position} of the data
        streams this rank saves (each stream from one data-parallel rank; of the ranks sharing that
        rank's data, the first writes). ``describe(folder)``, called on rank 0 before the checkpoint
        gets its final name, adds files that make the checkpoint self-describing (the model config, the
        tokenizer).
        """
        from megatron.core import dist_checkpointing

        final = self.root / step_dir_name(state.step)
        tmp = self.root / (final.name + ".tmp")
        if _rank() == 0:
            if tmp.exists():  # left by a crash during an earlier save of this step
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)  # empty: Megatron treats a non-empty folder as a failed save
        _barrier()
        dist_checkpointing.save(_sharded_state(model, optimizer), str(tmp))
        (tmp / "ranks").mkdir(exist_ok=True)
        torch.save(rank_state, tmp / "ranks" / f"rank_{_rank():05d}.pt")
        if data_states and _first_of_data_replica():
            (tmp / "data").mkdir(exist_ok=True)
            for stream, data_state in data_states.items():
                torch.save(data_state, tmp / "data" / f"stream_{stream:05d}.pt")
        _barrier()
        if _rank() == 0:
            state.layout = current_layout()
            state.num_optimizers = _num_optimizers(optimizer)
            state.use_distributed_optimizer = _is_distributed_optimizer(optimizer)
            if describe is not None:
                describe(tmp)
            _write_atomic(tmp / "trainer.json", json.dumps(asdict(state), indent=2))
            if final.exists():  # a step saved again (e.g. after a resume without progress)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.root / LATEST, final.name + "\n")
            self._prune(final)
        _barrier()
        return final

    def _prune(self, current: Path) -> None:
        """Keep ``current`` (the step just saved, which ``latest`` names) and the ``keep_last - 1`` newest
        steps before it; remove older steps, steps newer than ``current`` (orphans, see the module
        docstring) and the ``.tmp`` folders of crashed saves. Rank 0, after ``latest`` was rewritten."""
        steps = sorted(p for p in self.root.iterdir() if _STEP_DIR.match(p.name))
        orphans = [p for p in steps if p.name > current.name]
        earlier = [p for p in steps if p.name < current.name]
        older = earlier[: max(0, len(earlier) - (self.keep_last - 1))]
        crashed = [p for p in self.root.iterdir() if _TMP_STEP_DIR.match(p.name)]
        for old in orphans + older + crashed:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def latest(self) -> Path | None:
        return resolve_checkpoint(self.root) if self.root.is_dir() else None

    def load(self, path: Path, model: list, optimizer) -> tuple[TrainerState, dict[str, Any] | None]:
        """Restore model, optimizer and progress from ``path``; returns the trainer state and this
        rank's saved state (None when the layout changed: the RNG states of one layout's ranks do not
        map to another's). The data positions load in any layout: :meth:`load_data_states`."""
        from megatron.core import dist_checkpointing

        state = _read_trainer_state(path)
        apply_megatron_fixes()
        check_model_config(path, model)
        _check_optimizer_kind(path, state, optimizer)
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            loaded = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True), str(path))
        except (Exception, CheckpointException) as exc:  # as load_weights: name the damaged file
            raise CheckpointError(unreadable_checkpoint_message(path, exc)) from exc
        load_model_state(model, loaded)
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])
        rank_file = path / "ranks" / f"rank_{_rank():05d}.pt"
        same_layout = state.layout == current_layout()
        rank_state = torch.load(rank_file, weights_only=False) if same_layout and rank_file.is_file() else None
        return state, rank_state

    def load_data_states(self, path: Path, streams: list[int]) -> dict[int, Any]:
        """The saved positions of data ``streams`` in checkpoint ``path``, by stream."""
        files = {stream: path / "data" / f"stream_{stream:05d}.pt" for stream in streams}
        missing = [stream for stream, file in files.items() if not file.is_file()]
        if missing:
            raise CheckpointError(f"{path}: no saved position of data stream(s) {missing} (data/stream_*.pt)")
        return {stream: torch.load(file, weights_only=False) for stream, file in files.items()}


def _check_optimizer_kind(path: Path, state: TrainerState, optimizer) -> None:
    """Raise :class:`CheckpointError` when checkpoint ``path``'s optimizer state (``state``) was saved in
    a form ``optimizer`` cannot load: another number of chained optimizers (MoE with EP=1 vs EP>1) or
    the other kind (distributed or not; not checked when the checkpoint did not record it)."""
    if optimizer is None:
        return
    if state.num_optimizers != _num_optimizers(optimizer):
        # Megatron keeps expert parameters in their own optimizer only when EP>1; its
        # non-tensor optimizer state (param groups, step) does not map between the two forms.
        raise CheckpointError(
            f"{path}: its optimizer state was saved as {state.num_optimizers} Megatron optimizer(s) "
            f"(layout {state.layout}); this layout {current_layout()} has {_num_optimizers(optimizer)}. "
            "MoE optimizer state moves between layouts with the same kind of expert parallelism "
            "(EP=1 or EP>1); load the weights alone with stage.init_from instead."
        )
    distributed = _is_distributed_optimizer(optimizer)
    if state.use_distributed_optimizer is not None and state.use_distributed_optimizer != distributed:
        # The distributed optimizer saves its state sharded by parameter ranges (fully_reshardable),
        # the plain one per parameter: neither loader reads the other's.
        raise CheckpointError(
            f"{path}: its optimizer state was saved with train.use_distributed_optimizer="
            f"{str(state.use_distributed_optimizer).lower()}, this run has {str(distributed).lower()}; resume "
            "with the setting it was saved with, or load the weights alone with stage.init_from instead."
        )


def _read_trainer_state(path: Path) -> TrainerState:
    meta = path / "trainer.json"
    try:
        return TrainerState(**json.loads(meta.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{meta}: unreadable trainer state ({exc})") from None


def checkpoint_run_config(ckpt: str | os.PathLike, what: str = "checkpoint"):
    """(the resolved step directory, the run's composed config) of ``ckpt`` (a checkpoints folder, its
    latest, or a step directory): the config ``pretrain.train`` wrote into the run folder, which says
    how to rebuild the model, the tokenizer and the data encoding. ``what`` names ``ckpt`` in errors."""
    from omegaconf import OmegaConf

    resolved = resolve_checkpoint(ckpt)
    if resolved is None:
        raise CheckpointError(f"{what} {ckpt}: no checkpoint there (no 'latest' file or trainer.json)")
    run_config = resolved.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise CheckpointError(f"{what} {ckpt}: {run_config} is missing (the run's config, written by pretrain.train)")
    return resolved, OmegaConf.load(run_config)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
