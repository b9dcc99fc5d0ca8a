"""The training data loader: blended data_tools shard sets -> packed micro-batches for one data-parallel rank.

Contract with the trainer
-------------------------
``build_train_loader(data_cfg, stage_cfg, *, seq_length, micro_batch_size, dp_rank, dp_size, seed,
tokenizer, encoding_cfg=None, num_workers=None, attention_mask=True) -> TrainLoader``

* Iterating a :class:`TrainLoader` yields micro-batches forever: dicts of ``micro_batch_size`` packed
  sequences of ``seq_length`` tokens for THIS data-parallel rank (energon splits the shards over
  ``dp_size`` ranks and over the ``num_workers`` worker processes of each rank). Keys, dtypes and shapes
  are listed in :mod:`pretrain.data.micro_batch`; in short ``tokens``, ``labels`` (next-token targets,
  never across documents), ``loss_mask``, ``loss_weights`` (the stage's loss normalisation, see
  :mod:`pretrain.data.loss_weights`), ``position_ids`` [3, b, s], ``attention_mask`` [b, 1, s, s]
  (CPU), ``cu_seqlens``/``max_seqlen`` (GPU), ``document_ids``, ``mm_token_type_ids``, the vision
  inputs, and counters. The loader adds running totals: ``samples_skipped_total`` and
  ``micro_batches_total``.
* ``TrainLoader.save_state() -> dict`` (picklable; store it per rank in the checkpoint) and
  ``TrainLoader.restore_state(state)`` (before the first batch is drawn): a restored loader yields
  exactly the micro-batches the uninterrupted run would have yielded next. Underneath:
  energon's ``save_state_rank``/``restore_state_rank`` (shard positions and shuffle RNG per worker,
  the shuffle and packing buffers as restore keys) plus our counters and a fingerprint of the settings
  that must not change across a resume (sequence length, batch size, rank layout, workers, seed, blend).
* Loss: per micro-batch ``sum(per_token_loss * loss_weights)``; the step's normaliser is
  ``sum(loss_weights)`` all-reduced over data-parallel ranks and micro-batches (a float: it equals the
  target-token count only for ``loss_normalization="token"``).
* Media tensors are always present, possibly with 0 rows (a micro-batch without images has
  ``pixel_values`` [0, 1536] and ``image_grid_thw`` [0, 3]).
* ``TrainLoader.close()`` stops the worker processes (also on ``with build_train_loader(...) as l:``).
* ``build_eval_loader(...)`` gives the packed micro-batches of the sets' ``val`` split, once, in order.

Data flow: :mod:`pretrain.data.blend` (energon metadataset of the weighted sources) -> energon
``CrudeWebdataset`` per source -> shuffle -> :class:`PackingTaskEncoder` (encode, pack, batch) ->
``SavableDataLoader``. Corrupt samples are logged with source, shard and key, counted, and skipped.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pretrain.data.blend import BlendSource, metadataset_config, resolve_blend
from pretrain.data.encoding import EncodingConfig, SampleEncoder
from pretrain.data.packing import PackingConfig
from pretrain.data.task_encoder import PackingTaskEncoder
from common.tokens.tokenizer import Tokenizer, load_tokenizer
from common.media.frame_sampling import FrameSamplingConfig
from common.media.vision_inputs import VisionInputConfig

logger = logging.getLogger("pretrain.data")

STATE_VERSION = 1
# The micro-batch counters that TrainLoader accumulates into its state.
_SUMMED = ("num_documents", "num_real_tokens", "num_loss_tokens", "num_visual_patches", "num_truncated", "num_skipped")


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def encoding_config_from_data(data_cfg: Any) -> EncodingConfig:
    """The :class:`EncodingConfig` the ``data`` config section asks for (pixel bounds, video fps)."""
    vision = VisionInputConfig(
        image_min_pixels=int(_field(data_cfg, "image_min_pixels", VisionInputConfig.image_min_pixels)),
        image_max_pixels=int(_field(data_cfg, "image_max_pixels", VisionInputConfig.image_max_pixels)),
    )
    frames = FrameSamplingConfig(fps=float(_field(data_cfg, "video_fps", FrameSamplingConfig.fps)))
    return EncodingConfig(vision=vision, frames=frames)


@dataclass(frozen=True)
class PipelineSettings:
    """Everything that determines the stream of micro-batches of one rank (compared on restore)."""

    seq_length: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int
    num_workers: int
    seed: int
    packing_buffer_size: int
    shuffle_buffer_size: int | None
    max_samples_per_sequence: int | None
    max_visual_patches: int | None
    overlong: str
    loss_normalization: str
    blend: tuple[tuple[str, float, str], ...]  # (name, weight, kind); paths may move between machines

    def differences(self, other: Mapping[str, Any]) -> list[str]:
        mine = self.as_dict()
        return [f"{k}: saved {other.get(k)!r}, now {mine[k]!r}" for k in mine if other.get(k) != mine[k]]

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["blend"] = [list(b) for b in self.blend]
        return d


def _quiet_loader_warnings() -> None:
    # energon asks torch's DataLoader for pinned memory, which warns once per loader on CPU-only hosts.
    warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true but no accelerator.*")


def _log_pipeline_error(exc: Exception, sample: Any, sources: Any = None) -> None:
    """energon's error hook, for failures outside our per-sample handling (e.g. a tar that cannot be read)."""
    where = ", ".join(f"{s.dataset_path}/{s.shard_name}[{s.index}]" for s in sources or ()) or "unknown source"
    logger.error("data pipeline error at %s, sample skipped: %s: %s", where, type(exc).__name__, exc)


def _worker_config(dp_rank: int, dp_size: int, num_workers: int, seed: int):
    from megatron.energon import WorkerConfig

    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return WorkerConfig(
        rank=dp_rank,
        world_size=dp_size,
        num_workers=num_workers,
        seed_offset=seed,
        global_error_handler=_log_pipeline_error,
    )


def _task_encoder(tokenizer, encoding_cfg, packing, loss_normalization, attention_mask, seed) -> PackingTaskEncoder:
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    return PackingTaskEncoder(
        SampleEncoder(tok, encoding_cfg),
        packing,
        pad_id=tok.pad_id,
        loss_normalization=loss_normalization,
        attention_mask=attention_mask,
        seed=seed,
    )


class TrainLoader:
    """Infinite iterator of packed micro-batches for one data-parallel rank, with exact save/restore."""

    def __init__(self, loader, settings: PipelineSettings, sources: list[BlendSource]):
        self._loader = loader
        self.settings = settings
        self.sources = sources
        self._iterator: Iterator | None = None
        self._totals: Counter = Counter()
        self._skipped_by_reason: Counter = Counter()
        self._documents_per_source: Counter = Counter()
        self._micro_batches = 0
        self._closed = False

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict:
        if self._closed:
            raise RuntimeError("the data loader was closed")
        if self._iterator is None:
            self._iterator = iter(self._loader)
        batch = next(self._iterator)
        self._micro_batches += 1
        for key in _SUMMED:
            self._totals[key] += batch[key]
        self._skipped_by_reason.update(r["reason"] for r in batch["skipped"])
        self._documents_per_source.update(batch["documents_per_source"])
        batch["samples_skipped_total"] = self._totals["num_skipped"]
        batch["micro_batches_total"] = self._micro_batches
        return batch

    def close(self) -> None:
        """Stop the worker processes now (otherwise they stop when the loader is garbage collected,
        which can stall whatever runs then). The loader cannot be iterated afterwards."""
        workers_iterator = getattr(self._loader, "_iterator", None)  # torch DataLoader, persistent workers
        if workers_iterator is not None and hasattr(workers_iterator, "_shutdown_workers"):
            workers_iterator._shutdown_workers()
            self._loader._iterator = None
        self._iterator = None
        self._closed = True

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def counters(self) -> dict[str, Any]:
        """Totals over every micro-batch drawn so far (restored ones included)."""
        return {
            "micro_batches": self._micro_batches,
            **{key: self._totals[key] for key in _SUMMED},
            "skipped_by_reason": dict(self._skipped_by_reason),
            "documents_per_source": dict(self._documents_per_source),
        }

    def save_state(self) -> dict[str, Any]:
        """Picklable position of this rank's pipeline, to store with the checkpoint."""
        return {
            "version": STATE_VERSION,
            "settings": self.settings.as_dict(),
            "energon": self._loader.save_state_rank(),
            "counters": self.counters,
        }

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`save_state` of a loader built with the same settings).

        Must be called before the first micro-batch is drawn. Raises ``ValueError`` naming every setting
        that differs from the saved run.
        """
        if self._iterator is not None:
            raise RuntimeError("restore_state must be called before the first micro-batch is drawn")
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a data loader state of version {STATE_VERSION}")
        diff = self.settings.differences(state["settings"])
        if diff:
            raise ValueError("cannot resume the data pipeline with different settings: " + "; ".join(diff))
        self._loader.restore_state_rank(state["energon"])
        counters = state["counters"]
        self._micro_batches = counters["micro_batches"]
        self._totals = Counter({key: counters[key] for key in _SUMMED})
        self._skipped_by_reason = Counter(counters["skipped_by_reason"])
        self._documents_per_source = Counter(counters["documents_per_source"])


def build_train_loader(
    data_cfg: Any,
    stage_cfg: Any,
    *,
    seq_length: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    tokenizer: Tokenizer | str,
    encoding_cfg: EncodingConfig | None = None,
    num_workers: int | None = None,
    attention_mask: bool = True,
) -> TrainLoader:
    """The training loader of one data-parallel rank (see the module docstring for the contract).

    data_cfg: the ``data`` section (``pretrain.config.DataSchema`` or a mapping): sources, num_workers,
        packing_buffer_size, shuffle_buffer_size, max_samples_per_sequence, max_visual_patches_per_pack,
        overlong, pixel bounds and video fps. stage_cfg: the ``stage`` section (``data_weights``,
        ``loss_normalization``). tokenizer: a :class:`Tokenizer`, ``"qwen"`` or a tokenizer directory.
        encoding_cfg: defaults to :func:`encoding_config_from_data`. num_workers: overrides
        ``data_cfg.num_workers``. attention_mask: include the dense [b, 1, s, s] mask (CPU attention).
    """
    from megatron.energon import get_savable_loader, get_train_dataset

    _quiet_loader_warnings()
    sources = resolve_blend(_field(data_cfg, "sources", []), _field(stage_cfg, "data_weights", {}) or {})
    workers = int(_field(data_cfg, "num_workers", 0) if num_workers is None else num_workers)
    settings = PipelineSettings(
        seq_length=int(seq_length),
        micro_batch_size=int(micro_batch_size),
        dp_rank=int(dp_rank),
        dp_size=int(dp_size),
        num_workers=workers,
        seed=int(seed),
        packing_buffer_size=int(_field(data_cfg, "packing_buffer_size", 1024)),
        shuffle_buffer_size=_field(data_cfg, "shuffle_buffer_size", 100),
        max_samples_per_sequence=_field(data_cfg, "max_samples_per_sequence", 100),
        max_visual_patches=_field(data_cfg, "max_visual_patches_per_pack", None),
        overlong=str(_field(data_cfg, "overlong", "truncate")),
        loss_normalization=str(_field(stage_cfg, "loss_normalization", "token")),
        blend=tuple((s.name, s.weight, s.kind) for s in sources),
    )
    if settings.micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if settings.packing_buffer_size < 1:
        raise ValueError(f"data.packing_buffer_size must be >= 1, got {settings.packing_buffer_size}")
    encoding_cfg = encoding_cfg or encoding_config_from_data(data_cfg)
    packing = PackingConfig(
        seq_length=settings.seq_length,
        max_visual_patches=settings.max_visual_patches,
        overlong=settings.overlong,
        merge_size=encoding_cfg.vision.merge_size,
    )
    task_encoder = _task_encoder(
        tokenizer, encoding_cfg, packing, settings.loss_normalization, attention_mask, settings.seed
    )
    worker_config = _worker_config(settings.dp_rank, settings.dp_size, workers, settings.seed)
    dataset = get_train_dataset(
        metadataset_config(sources, "train"),
        split_part="train",
        worker_config=worker_config,
        batch_size=settings.micro_batch_size,
        packing_buffer_size=settings.packing_buffer_size,
        shuffle_buffer_size=settings.shuffle_buffer_size,
        max_samples_per_sequence=settings.max_samples_per_sequence,
        task_encoder=task_encoder,
    )
    loader = get_savable_loader(dataset, watchdog_timeout_seconds=None)
    logger.info(
        "train loader rank %d/%d: %s; %d tokens x %d per micro-batch, %d workers",
        dp_rank, dp_size, ", ".join(f"{s.name} ({s.kind}) w={s.weight:g}" for s in sources),
        seq_length, micro_batch_size, workers,
    )
    return TrainLoader(loader, settings, sources)


def build_eval_loader(
    data_cfg: Any,
    stage_cfg: Any,
    *,
    seq_length: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    tokenizer: Tokenizer | str,
    encoding_cfg: EncodingConfig | None = None,
    split_part: str = "val",
    limit: int | None = None,
    attention_mask: bool = True,
):
    """Packed micro-batches of the ``split_part`` shards of the stage's sources, once, without shuffling
    (in-process: no workers). ``limit`` caps the number of micro-batches. Iterate it once per evaluation."""
    from megatron.energon import get_loader, get_val_dataset

    _quiet_loader_warnings()
    sources = resolve_blend(_field(data_cfg, "sources", []), _field(stage_cfg, "data_weights", {}) or {})
    encoding_cfg = encoding_cfg or encoding_config_from_data(data_cfg)
    packing = PackingConfig(
        seq_length=int(seq_length),
        max_visual_patches=_field(data_cfg, "max_visual_patches_per_pack", None),
        overlong=str(_field(data_cfg, "overlong", "truncate")),
        merge_size=encoding_cfg.vision.merge_size,
    )
    task_encoder = _task_encoder(
        tokenizer, encoding_cfg, packing, str(_field(stage_cfg, "loss_normalization", "token")), attention_mask, 0
    )
    dataset = get_val_dataset(
        metadataset_config(sources, split_part),
        split_part=split_part,
        worker_config=_worker_config(dp_rank, dp_size, 0, 0),
        batch_size=int(micro_batch_size),
        packing_buffer_size=int(_field(data_cfg, "packing_buffer_size", 1024)),
        limit=limit,
        task_encoder=task_encoder,
    )
    return get_loader(dataset, watchdog_timeout_seconds=None)
