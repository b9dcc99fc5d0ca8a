"""Model weights as Megatron-Core distributed checkpoints: save, find and load, in any parallel layout.

A weights checkpoint is a ``dist_checkpointing`` folder holding one sharded state dict per model chunk
(``model``, or ``model0``, ``model1``, ... with virtual pipeline stages). ``pretrain.checkpoint`` writes
training checkpoints in the same layout plus optimizer and trainer state, so both load here. Collective
functions must be called by every rank of the initialised parallel state.

Every checkpoint of a Qwen3-VL model carries the model's Hugging Face config, ``qwen3vl_config.json``
(:func:`save_weights`, ``model.convert``, ``pretrain.checkpoint``); loading one into a model of another
architecture is refused (:func:`check_model_config`) rather than left to the shapes: a smaller vocabulary
or fewer ViT layers and DeepStack mergers would load silently, truncated or partly.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

LATEST = "latest"  # text file in a checkpoints folder naming its newest complete step directory
CONFIG_FILE = "qwen3vl_config.json"  # the model's HF config.json, next to the weights

# Config fields that do not change what the weights compute, so a checkpoint loads into a model that
# differs in them: the position limit (MRoPE has no position table) and the weight of the MoE
# load-balancing loss (a training objective, not part of the function).
_FREE_FIELDS = {"text.max_position_embeddings", "text.router_aux_loss_coef"}


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


def write_model_config(folder: str | os.PathLike, config: dict) -> None:
    """Write a checkpoint's :data:`CONFIG_FILE`: the model's HF config dict (``Qwen3VLConfig.to_hf()``)."""
    (Path(folder) / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def save_weights(path: str | os.PathLike, model: list) -> None:
    """Save only the model weights as a distributed checkpoint, in the training checkpoints' layout
    (so ``stage.init_from`` and ``load_weights`` read it), with the model's config
    (:data:`CONFIG_FILE`, written by rank 0, for a Qwen3-VL model); collective over all ranks."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    Path(path).mkdir(parents=True, exist_ok=True)  # Megatron wants an existing, empty folder
    dist_checkpointing.save(model_sharded_state(model), str(path))
    cfg = model_config(model)
    if cfg is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        write_model_config(path, cfg.to_hf())


def load_weights(path: str | os.PathLike, model: list) -> Path:
    """Load only the model weights of a checkpoint (a stage's ``init_from``): any layout."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    resolved = resolve_checkpoint(path)
    if resolved is None:
        raise CheckpointError(f"init_from={path}: no checkpoint there (no 'latest' file or trainer.json)")
    check_model_config(resolved, model)
    try:
        loaded = dist_checkpointing.load(model_sharded_state(model), str(resolved))
    # torch's and Megatron's errors name neither the folder nor the file; torch's reader wraps what its
    # ranks raised (a short read: EOFError) in a CheckpointException, a BaseException.
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(unreadable_checkpoint_message(resolved, exc)) from exc
    load_model_state(model, loaded)
    return resolved


def damaged_file(folder: str | os.PathLike) -> str | None:
    """``"<file name>: <what is wrong>"`` for the first file of distributed checkpoint ``folder`` that cannot be
    what a complete checkpoint holds (missing, unreadable, or shorter than the byte ranges ``.metadata``
    records for it: a copy or a write cut short); None when every file looks whole. Reads the metadata
    files and ``common.pt`` (small), and only the sizes of the ``.distcp`` shards."""
    import pickle

    import torch

    folder = Path(folder)
    for name in ("metadata.json", ".metadata"):
        if not (folder / name).is_file():
            return f"{name}: missing"
    try:
        json.loads((folder / "metadata.json").read_text())
    except (OSError, ValueError) as exc:
        return f"metadata.json: unreadable ({_error(exc)})"
    try:
        with open(folder / ".metadata", "rb") as f:
            storage = pickle.load(f).storage_data
    except Exception as exc:  # any unpickling error: a truncated or overwritten file
        return f".metadata: unreadable ({_error(exc)})"
    if (folder / "common.pt").exists():
        try:
            torch.load(folder / "common.pt", map_location="cpu", weights_only=False)
        except Exception as exc:
            return f"common.pt: unreadable ({_error(exc)})"
    needed: dict[str, int] = {}  # shard file -> bytes its recorded tensors reach
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = folder / name
        if not file.is_file():
            return f"{name}: missing"
        if file.stat().st_size < size:
            return f"{name}: {file.stat().st_size} bytes, the checkpoint's index needs {size} (truncated)"
    return None


def unreadable_checkpoint_message(folder: str | os.PathLike, exc: BaseException) -> str:
    """One line for a checkpoint whose loading raised ``exc``: the damaged file when one is found
    (:func:`damaged_file`), else the folder and the error."""
    damaged = damaged_file(folder)
    if damaged is not None:
        return f"checkpoint {folder} is damaged: {damaged}"
    return f"checkpoint {folder} cannot be loaded: {_error(exc)}"


def _error(exc: BaseException) -> str:
    """``"Type: first line of the message"`` (``"Type"`` for an empty one, e.g. EOFError)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def load_model_state(model: list, loaded: dict) -> None:
    from megatron.core.utils import unwrap_model

    for i, chunk in enumerate(unwrap_model(model)):
        chunk.load_state_dict(loaded[model_key(i, len(model))])


def model_config(model: list):
    """The :class:`model.config.Qwen3VLConfig` of ``model``'s chunks; None for another kind of model."""
    from megatron.core.utils import unwrap_model

    from model.config import Qwen3VLConfig

    cfg = getattr(unwrap_model(model)[0], "cfg", None)
    return cfg if isinstance(cfg, Qwen3VLConfig) else None


def config_differences(saved, current) -> list[str]:
    """``"section.field saved vs current"`` for each architecture field in which two
    :class:`model.config.Qwen3VLConfig` differ (:data:`_FREE_FIELDS` aside)."""
    out = []
    for section, a, b in (("text", saved.text, current.text), ("vision", saved.vision, current.vision),
                          ("", saved, current)):
        for f in fields(a):
            name = f"{section}.{f.name}" if section else f.name
            if not f.compare or f.name in ("text", "vision") or name in _FREE_FIELDS:
                continue
            x, y = getattr(a, f.name), getattr(b, f.name)
            if x != y:
                out.append(f"{name} {_show(x)} vs {_show(y)}")
    return out


def _show(value) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def check_model_config(path: str | os.PathLike, model: list) -> None:
    """Raise :class:`CheckpointError` when checkpoint ``path`` (a step or weights folder) was written for a
    model whose architecture differs from ``model``'s, naming the differing fields (the checkpoint's value
    first). Nothing is checked for a checkpoint without :data:`CONFIG_FILE` (written before it was
    recorded) or for a model that is not Qwen3-VL."""
    from model.config import Qwen3VLConfig

    file = Path(path) / CONFIG_FILE
    current = model_config(model)
    if current is None or not file.is_file():
        return
    try:
        saved = Qwen3VLConfig.from_hf(json.loads(file.read_text()))
    except (OSError, ValueError) as exc:  # ConfigError is a ValueError, as is a JSON error
        raise CheckpointError(f"{file}: unreadable model config ({exc})") from None
    differences = config_differences(saved, current)
    if differences:
        raise CheckpointError(f"checkpoint {path} was written for a different model (checkpoint vs this "
                              f"model): {', '.join(differences)}")
