"""Model weights as Megatron-Core distributed checkpoints: save, find and load, in any parallel layout.

A weights checkpoint is a ``dist_checkpointing`` folder holding one sharded state dict per model chunk
(``model``, or ``model0``, ``model1``, ... with virtual pipeline stages). ``pretrain.checkpoint`` writes
training checkpoints in the same layout plus optimizer and trainer state, so both load here. Collective
functions must be called by every rank of the initialised parallel state.
"""

from __future__ import annotations

import os
from pathlib import Path

LATEST = "latest"  # text file in a checkpoints folder naming its newest complete step directory


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path and the reason."""


def resolve_checkpoint(path: str | os.PathLike) -> Path | None:
    """A step directory (or a weights-only checkpoint), or a checkpoints folder / ``latest`` file
    resolved to its newest step; None if there is none."""
    p = Path(path)
    if p.name == LATEST or (p.is_dir() and (p / LATEST).is_file()):
        latest = p if p.name == LATEST else p / LATEST
        if not latest.is_file():
            return None
        target = latest.parent / latest.read_text().strip()
        if not target.is_dir():
            raise CheckpointError(f"{latest} names {target.name}, which does not exist")
        return target
    if p.is_dir() and ((p / "trainer.json").is_file() or (p / "metadata.json").is_file()):
        return p  # a training step, or weights saved by save_weights (e.g. model.convert hf-to-mcore)
    return None


def model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def model_sharded_state(model: list) -> dict:
    """Sharded state dicts of the model chunks, without their DDP / Float16 wrappers' prefixes."""
    from megatron.core.utils import unwrap_model

    return {model_key(i, len(model)): chunk.sharded_state_dict()
            for i, chunk in enumerate(unwrap_model(model))}


def save_weights(path: str | os.PathLike, model: list) -> None:
    """Save only the model weights as a distributed checkpoint, in the training checkpoints' layout
    (so ``stage.init_from`` and ``load_weights`` read it); collective over all ranks."""
    from megatron.core import dist_checkpointing

    Path(path).mkdir(parents=True, exist_ok=True)  # Megatron wants an existing, empty folder
    dist_checkpointing.save(model_sharded_state(model), str(path))


def load_weights(path: str | os.PathLike, model: list) -> Path:
    """Load only the model weights of a checkpoint (a stage's ``init_from``): any layout."""
    from megatron.core import dist_checkpointing

    resolved = resolve_checkpoint(path)
    if resolved is None:
        raise CheckpointError(f"init_from={path}: no checkpoint there (no 'latest' file or trainer.json)")
    loaded = dist_checkpointing.load(model_sharded_state(model), str(resolved))
    load_model_state(model, loaded)
    return resolved


def load_model_state(model: list, loaded: dict) -> None:
    from megatron.core.utils import unwrap_model

    for i, chunk in enumerate(unwrap_model(model)):
        chunk.load_state_dict(loaded[model_key(i, len(model))])
