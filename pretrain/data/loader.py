"""The training data loader: blended data_tools shard sets -> packed micro-batches for one data-parallel rank.

Contract with the trainer
-------------------------
``build_train_loader(data_cfg, stage_cfg, *, seq_length, micro_batch_size, dp_rank, dp_size, seed,
tokenizer, encoding_cfg=None, num_workers=None, global_batch_size=None,
num_streams=None) -> TrainLoader``

* Iterating a :class:`TrainLoader` yields micro-batches forever: dicts of ``micro_batch_size`` packed
  sequences of ``seq_length`` tokens for THIS data-parallel rank. Keys, dtypes and shapes are listed in
  :mod:`pretrain.data.micro_batch`; in short ``tokens``, ``labels`` (next-token targets, never across
  documents), ``loss_mask``, ``loss_weights`` (the stage's loss normalisation, see
  :mod:`pretrain.data.loss_weights`), ``position_ids`` [3, b, s], ``document_ids``
  (attention stays within documents), ``cu_seqlens``/``max_seqlen`` (transformer-engine), ``doc_ids``, ``mm_token_type_ids``, the
  vision inputs, and counters. The loader adds running totals: ``samples_skipped_total`` and
  ``micro_batches_total``.
* Data streams: the data of a stage is ``num_streams`` independent energon streams, one per
  data-parallel rank of the layout the stage STARTED with (energon splits the shards over the streams and
  over the ``num_workers`` worker processes of each, and seeds each from its index). A global batch is
  stream 0's next ``per_stream`` micro-batches, then stream 1's, and so on; data-parallel rank ``r`` of
  the current layout trains on its contiguous share of that list (:class:`StreamPlan`). With the
  stage's first layout every rank hosts exactly its own stream; after a resume with fewer data-parallel
  ranks a rank hosts several streams, with more ranks several ranks host one stream and each keeps its
  share of it. Either way the global batches are exactly those of the uninterrupted run (an energon
  reader state belongs to its stream and cannot be re-split over another number of ranks, so the
  streams, not their states, are what moves between layouts). The price: a rank hosting k streams holds
  k shuffle and packing buffers and runs k x ``num_workers`` workers; ranks sharing a stream each read
  all of it (the data work of one rank of the first layout).
* ``TrainLoader.save_state() -> {stream: state}`` (picklable; the checkpoint stores one file per stream,
  written by the first rank hosting it) and ``TrainLoader.restore_state(states)`` (before the first
  batch is drawn; the states of the streams this rank hosts): a restored loader yields exactly the
  micro-batches the uninterrupted run would have yielded next, in any data-parallel layout. Underneath:
  energon's ``save_state_rank``/``restore_state_rank`` per stream (shard positions and shuffle RNG per
  worker, the shuffle and packing buffers as restore keys) plus our counters and a fingerprint of the
  settings that must not change across a resume (sequence length, batch size, number of streams,
  workers, seed, blend, how samples are encoded: pixel bounds, frame rate, the tokenizer). Save only
  between global batches.
* ``TrainLoader.skip(micro_batches)`` fast-forwards each hosted stream (draws and drops: it takes as
  long as producing them), for a resume that has no stream states to continue from
  (see :func:`plan_data_resume`).
* Loss: per micro-batch ``sum(per_token_loss * loss_weights)``; the step's normaliser is
  ``sum(loss_weights)`` all-reduced over data-parallel ranks and micro-batches (a float: it equals the
  target-token count only for ``loss_normalization="token"``).
* Media tensors are always present, possibly with 0 rows (a micro-batch without images has
  ``pixel_values`` [0, 1536] and ``image_grid_thw`` [0, 3]).
* ``TrainLoader.close()`` stops the worker processes (also on ``with build_train_loader(...) as l:``).
* ``build_eval_loader(...)`` gives the packed micro-batches of the sets' ``val`` split, once, in order.
* Quiet by default: energon draws a "Filling reading buffer" progress bar in every worker while it
  fills its first packing buffer; unless ``data.verbose_loader`` is true those bars are switched off,
  and ``TrainLoader.ready_message`` (set once the first micro-batch is drawn; the trainer prints it)
  says in one line what was loaded and how long it took.

Data flow: :mod:`pretrain.data.blend` (energon metadataset of the weighted sources) -> energon
``CrudeWebdataset`` per source -> shuffle -> :class:`PackingTaskEncoder` (encode, pack, batch) ->
``SavableDataLoader`` (one per hosted stream). Corrupt samples are logged with source, shard and key,
counted, and skipped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
import warnings
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from megatron.energon import PackingDataset as EnergonPackingDataset

from pretrain.data.blend import BlendSource, metadataset_config, resolve_blend
from pretrain.data.encoding import EncodingConfig, SampleEncoder
from pretrain.data.packing import PackingConfig
from pretrain.data.task_encoder import PackingTaskEncoder
from common.tokens.tokenizer import Tokenizer, load_tokenizer
from common.media.frame_sampling import FrameSamplingConfig
from common.media.vision_inputs import VisionInputConfig

logger = logging.getLogger("pretrain.data")

STATE_VERSION = 2
# The micro-batch counters that each stream accumulates into its state.
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


_ADDED_LATER = frozenset({"encoding", "tokenizer"})


@dataclass(frozen=True)
class PipelineSettings:
    """Everything that determines the data streams of a stage (compared on restore)."""

    seq_length: int
    micro_batch_size: int
    num_streams: int  # the data-parallel size the stage started with
    num_workers: int  # energon worker processes per stream
    seed: int
    packing_buffer_size: int
    shuffle_buffer_size: int | None
    max_samples_per_sequence: int | None
    max_visual_patches: int | None
    overlong: str
    loss_normalization: str
    blend: tuple[tuple[str, float, str], ...]  # (name, weight, kind); paths may move between machines
    # What each sample's tokens and patches are (pixel bounds, frame rate, ...: the restored packing
    # buffers' plans hold the sizes they gave), JSON; and the tokenizer (Tokenizer.fingerprint).
    encoding: str = ""
    tokenizer: str = ""

    def differences(self, other: Mapping[str, Any]) -> list[str]:
        mine = self.as_dict()
        # A state saved before a field existed says nothing about it (encoding, tokenizer).
        return [f"{k}: saved {other.get(k)!r}, now {mine[k]!r}" for k in mine
                if other.get(k) != mine[k] and (k in other or k not in _ADDED_LATER)]

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["blend"] = [list(b) for b in self.blend]
        return d


@dataclass(frozen=True)
class StreamPlan:
    """Which micro-batches of which data streams one data-parallel rank trains on.

    A global batch is ``num_streams * per_stream`` micro-batches: stream 0's next ``per_stream``, then
    stream 1's, and so on. Data-parallel rank ``dp_rank`` trains on positions ``[dp_rank * per_rank,
    (dp_rank + 1) * per_rank)`` of that list, so it draws from the streams those positions fall in.
    """

    num_streams: int
    per_stream: int
    dp_rank: int
    per_rank: int

    @classmethod
    def of(cls, *, dp_rank: int, dp_size: int, num_streams: int, micro_batches_per_step: int | None) -> "StreamPlan":
        """``micro_batches_per_step``: global batch size / micro-batch size; None: one stream per rank,
        which then trains on every micro-batch of its own stream (``num_streams`` must be ``dp_size``)."""
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        if micro_batches_per_step is None:
            if num_streams != dp_size:
                raise ValueError(f"num_streams={num_streams} differs from dp_size={dp_size}: "
                                 "give global_batch_size, which says how the streams make a global batch")
            micro_batches_per_step = dp_size
        for name, n in (("num_streams", num_streams), ("dp_size", dp_size)):
            if n < 1 or micro_batches_per_step % n:
                raise ValueError(f"a global batch of {micro_batches_per_step} micro-batches does not split "
                                 f"evenly over {name}={n}")
        return cls(num_streams, micro_batches_per_step // num_streams, dp_rank, micro_batches_per_step // dp_size)

    @property
    def streams(self) -> list[int]:
        """The streams this rank draws from, in order."""
        first = self.dp_rank * self.per_rank
        return list(range(first // self.per_stream, (first + self.per_rank - 1) // self.per_stream + 1))

    def kept(self, stream: int) -> range:
        """Which of ``stream``'s ``per_stream`` micro-batches of each global batch this rank trains on."""
        offset = stream * self.per_stream
        return range(max(self.dp_rank * self.per_rank - offset, 0),
                     min((self.dp_rank + 1) * self.per_rank - offset, self.per_stream))

    def writes(self, stream: int) -> bool:
        """Whether this rank is the first to draw from ``stream`` (the one that saves its state)."""
        return stream * self.per_stream // self.per_rank == self.dp_rank


@dataclass(frozen=True)
class DataResume:
    """How a resumed stage gets its data back (:func:`plan_data_resume`)."""

    num_streams: int
    restore: bool  # continue the checkpoint's streams from their saved states (exact)
    skip: int = 0  # otherwise: micro-batches to fast-forward each new stream by
    warning: str | None = None  # set when the run cannot see the uninterrupted run's data


def plan_data_resume(*, saved_streams: int | None, consumed_samples: int, global_batch_size: int,
                     micro_batch_size: int, dp_size: int) -> DataResume:
    """Decide how the data continues. ``saved_streams``: the checkpoint's number of data streams (None:
    no checkpoint, a new stage; 0: a checkpoint without data stream states). ``consumed_samples``:
    packed sequences the stage has trained on, all ranks together.

    Exact whenever the checkpoint has its streams' states and the global batch still splits over them,
    in any data-parallel layout. Otherwise the run starts ``dp_size`` new streams and skips the consumed
    sequences in them (deterministic: the global batches from here on are those of an uninterrupted run
    with this layout), and ``warning`` says so: that is not the data the checkpoint's run would have seen.
    """
    micro_batches = global_batch_size // micro_batch_size
    if saved_streams is None:
        return DataResume(num_streams=dp_size, restore=False)
    if saved_streams > 0 and micro_batches % saved_streams == 0:
        return DataResume(num_streams=saved_streams, restore=True)
    why = ("the checkpoint holds no data stream states" if saved_streams == 0 else
           f"a global batch of {micro_batches} micro-batches does not split over its {saved_streams} data streams")
    skip, left = divmod(consumed_samples, micro_batch_size * dp_size)
    warning = (f"data: the saved data streams cannot continue ({why}); started {dp_size} new stream(s), each "
               f"fast-forwarded by {skip} micro-batches for the {consumed_samples} sequences consumed so far"
               + (f" ({left} left over)" if left else "")
               + ". The data from here on is not what the uninterrupted run would have seen: samples of the "
                 "current pass over the data may repeat or be left out.")
    return DataResume(num_streams=dp_size, restore=False, skip=skip, warning=warning)


def _quiet_loader_warnings() -> None:
    # energon asks torch's DataLoader for pinned memory, which warns once per loader on CPU-only hosts.
    warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true but no accelerator.*")


class PackingDataset(EnergonPackingDataset):
    """energon's PackingDataset without the "Filling reading buffer" bar that each worker draws while it
    fills its first buffer (energon 7.4 draws it unconditionally and offers no switch). Same name as
    energon's: energon writes class names into saved states and restore keys, which must not depend on
    ``data.verbose_loader``."""

    def _fill_reading_buffer(self, source_iter, log_progress: bool = False) -> bool:
        return super()._fill_reading_buffer(source_iter, log_progress=False)


def _quiet_packing(dataset: Any) -> None:
    """Make every energon PackingDataset in the wrapper chain under ``dataset`` the quiet one above (same
    state and behaviour, no bar). The task encoder builds them inside energon, hence the class change
    on the fresh, not yet iterated, instances."""
    stack = [dataset]
    while stack:
        node = stack.pop()
        if type(node) is EnergonPackingDataset:
            node.__class__ = PackingDataset
        stack.extend(getattr(node, "datasets", ()))


def _split_size(sources: list[BlendSource], split_part: str) -> tuple[int, int]:
    """(shards, samples) of ``split_part`` over ``sources``, from their energon metadata."""
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors.webdataset import WebdatasetMeta

    shards = samples = 0
    for source in sources:
        if source.has_split(split_part):
            meta = WebdatasetMeta.from_config(EPath(source.path), split_part=split_part)
            shards += len(meta.shards)
            samples += sum(shard.count for shard in meta.shards)
    return shards, samples


def _log_pipeline_error(exc: Exception, sample: Any, sources: Any = None) -> None:
    """energon's error hook, for failures outside our per-sample handling (e.g. a tar that cannot be read)."""
    where = ", ".join(f"{s.dataset_path}/{s.shard_name}[{s.index}]" for s in sources or ()) or "unknown source"
    logger.error("data pipeline error at %s, sample skipped: %s: %s", where, type(exc).__name__, exc)


def _worker_config(rank: int, world_size: int, num_workers: int, seed: int):
    from megatron.energon import WorkerConfig

    if not 0 <= rank < world_size:
        raise ValueError(f"dp_rank={rank} must lie in [0, dp_size={world_size})")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return WorkerConfig(
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        seed_offset=seed,
        global_error_handler=_log_pipeline_error,
    )


def _task_encoder(tokenizer, encoding_cfg, packing, loss_normalization, seed) -> PackingTaskEncoder:
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    return PackingTaskEncoder(
        SampleEncoder(tok, encoding_cfg),
        packing,
        pad_id=tok.pad_id,
        loss_normalization=loss_normalization,
        seed=seed,
    )


class _Stream:
    """One energon stream: its loader and the totals of the micro-batches drawn from it."""

    def __init__(self, index: int, loader):
        self.index = index
        self.loader = loader
        self.iterator: Iterator | None = None
        self.micro_batches = 0
        self.totals: Counter = Counter()
        self.skipped_by_reason: Counter = Counter()
        self.documents_per_source: Counter = Counter()

    def draw(self) -> dict:
        if self.iterator is None:
            self.iterator = iter(self.loader)
        batch = next(self.iterator)
        self.micro_batches += 1
        for key in _SUMMED:
            self.totals[key] += batch[key]
        self.skipped_by_reason.update(r["reason"] for r in batch["skipped"])
        self.documents_per_source.update(batch["documents_per_source"])
        return batch

    def save_state(self, settings: PipelineSettings) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "stream": self.index,
            "settings": settings.as_dict(),
            "energon": self.loader.save_state_rank(),
            "counters": {
                "micro_batches": self.micro_batches,
                **{key: self.totals[key] for key in _SUMMED},
                "skipped_by_reason": dict(self.skipped_by_reason),
                "documents_per_source": dict(self.documents_per_source),
            },
        }

    def restore_state(self, state: Mapping[str, Any], settings: PipelineSettings) -> None:
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a data stream state of version {STATE_VERSION}")
        if state["stream"] != self.index:
            raise ValueError(f"the state of data stream {state['stream']} given for stream {self.index}")
        diff = settings.differences(state["settings"])
        if diff:
            raise ValueError("cannot resume the data pipeline with different settings: " + "; ".join(diff))
        # A copy: energon's restore consumes the state object it is given (two loaders restored from one
        # object in a process, e.g. two ranks' shares of one stream, would otherwise stall or diverge).
        self.loader.restore_state_rank(copy.deepcopy(state["energon"]))
        counters = state["counters"]
        self.micro_batches = counters["micro_batches"]
        self.totals = Counter({key: counters[key] for key in _SUMMED})
        self.skipped_by_reason = Counter(counters["skipped_by_reason"])
        self.documents_per_source = Counter(counters["documents_per_source"])

    def close(self) -> None:
        workers_iterator = getattr(self.loader, "_iterator", None)  # torch DataLoader, persistent workers
        if workers_iterator is not None and hasattr(workers_iterator, "_shutdown_workers"):
            workers_iterator._shutdown_workers()
            self.loader._iterator = None
        self.iterator = None


class TrainLoader:
    """Infinite iterator of packed micro-batches for one data-parallel rank, with exact save/restore
    in any data-parallel layout (see the module docstring)."""

    def __init__(self, streams: list[_Stream], plan: StreamPlan, settings: PipelineSettings,
                 sources: list[BlendSource]):
        self._streams = streams
        self.plan = plan
        self.settings = settings
        self.sources = sources
        self.ready_message: str | None = None  # one line, once the first micro-batch is drawn
        self._created = time.perf_counter()
        self._pending: deque[dict] = deque()  # this rank's rest of the current global batch
        self._started = False
        self._closed = False

    @property
    def streams(self) -> list[int]:
        """The data streams this rank draws from."""
        return [s.index for s in self._streams]

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict:
        if self._closed:
            raise RuntimeError("the data loader was closed")
        self._started = True
        if not self._pending:  # draw this rank's share of the next global batch
            for stream in self._streams:
                keep = self.plan.kept(stream.index)
                for position in range(self.plan.per_stream):
                    batch = stream.draw()
                    if position in keep:
                        batch["samples_skipped_total"] = sum(s.totals["num_skipped"] for s in self._streams)
                        batch["micro_batches_total"] = sum(s.micro_batches for s in self._streams)
                        self._pending.append(batch)
            self._ready()
        return self._pending.popleft()

    def _ready(self) -> None:
        if self.ready_message is None:
            shards, samples = _split_size(self.sources, "train")
            self.ready_message = (
                f"loader: {len(self.sources)} source(s), {shards} shards, {samples} samples; "
                f"{self.settings.num_workers} worker(s) x {len(self._streams)} stream(s) on this rank; "
                f"first micro-batch ready in {time.perf_counter() - self._created:.1f} s")
            logger.info(self.ready_message)

    def skip(self, micro_batches: int) -> None:
        """Draw and drop ``micro_batches`` micro-batches of every stream this rank draws from (between
        global batches; with one stream per rank, that is this rank's next ``micro_batches``)."""
        self._check_between_batches("skip")
        self._started = True
        for stream in self._streams:
            for _ in range(micro_batches):
                stream.draw()
        if micro_batches:
            self._ready()

    def close(self) -> None:
        """Stop the worker processes now (otherwise they stop when the loader is garbage collected,
        which can stall whatever runs then). The loader cannot be iterated afterwards."""
        for stream in self._streams:
            stream.close()
        self._closed = True

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def counters(self) -> dict[str, Any]:
        """Totals over every micro-batch drawn from this rank's streams so far (restored ones included;
        with more ranks than streams, a stream's micro-batches that other ranks train on count too)."""
        totals, reasons, per_source = Counter(), Counter(), Counter()
        for s in self._streams:
            totals.update(s.totals)
            reasons.update(s.skipped_by_reason)
            per_source.update(s.documents_per_source)
        return {
            "micro_batches": sum(s.micro_batches for s in self._streams),
            **{key: totals[key] for key in _SUMMED},
            "skipped_by_reason": dict(reasons),
            "documents_per_source": dict(per_source),
        }

    def _check_between_batches(self, what: str) -> None:
        if self._pending:
            raise RuntimeError(f"{what} between global batches: {len(self._pending)} micro-batch(es) of this "
                               "rank's share of the current one are not drawn yet")

    def save_state(self) -> dict[int, dict[str, Any]]:
        """Picklable position of each stream this rank draws from, by stream index (store
        ``plan.writes(stream)``'s with the checkpoint). Only between global batches."""
        self._check_between_batches("save the data position")
        return {s.index: s.save_state(self.settings) for s in self._streams}

    def restore_state(self, states: Mapping[int, Mapping[str, Any]]) -> None:
        """Continue every stream this rank draws from at its saved state (from :meth:`save_state` of
        loaders with the same settings; any data-parallel layout). Must be called before the first
        micro-batch is drawn. Raises ``ValueError`` naming every setting that differs from the saved run."""
        if self._started:
            raise RuntimeError("restore_state must be called before the first micro-batch is drawn")
        missing = [i for i in self.streams if i not in states]
        if missing:
            raise ValueError(f"no saved state for data stream(s) {missing}")
        for stream in self._streams:
            stream.restore_state(states[stream.index], self.settings)


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
    global_batch_size: int | None = None,
    num_streams: int | None = None,
) -> TrainLoader:
    """The training loader of one data-parallel rank (see the module docstring for the contract).

    data_cfg: the ``data`` section (``pretrain.config.DataSchema`` or a mapping): sources, num_workers,
        packing_buffer_size, shuffle_buffer_size, max_samples_per_sequence, max_visual_patches_per_pack,
        overlong, pixel bounds, video fps and verbose_loader. stage_cfg: the ``stage`` section (``data_weights``,
        ``loss_normalization``). tokenizer: a :class:`Tokenizer`, ``"qwen"`` or a tokenizer directory.
        encoding_cfg: defaults to :func:`encoding_config_from_data`. num_workers: overrides
        ``data_cfg.num_workers``.
        global_batch_size: packed sequences per optimizer step, all ranks (needed when ``num_streams``
        differs from ``dp_size``). num_streams: the stage's data streams (default ``dp_size``; a resumed
        stage keeps the number it started with, :func:`plan_data_resume`).
    """
    from megatron.energon import get_savable_loader, get_train_dataset

    _quiet_loader_warnings()
    sources = resolve_blend(_field(data_cfg, "sources", []), _field(stage_cfg, "data_weights", {}) or {})
    workers = int(_field(data_cfg, "num_workers", 0) if num_workers is None else num_workers)
    tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    encoding_cfg = encoding_cfg or encoding_config_from_data(data_cfg)
    settings = PipelineSettings(
        seq_length=int(seq_length),
        micro_batch_size=int(micro_batch_size),
        num_streams=int(dp_size if num_streams is None else num_streams),
        num_workers=workers,
        seed=int(seed),
        packing_buffer_size=int(_field(data_cfg, "packing_buffer_size", 1024)),
        shuffle_buffer_size=_field(data_cfg, "shuffle_buffer_size", 100),
        max_samples_per_sequence=_field(data_cfg, "max_samples_per_sequence", 100),
        max_visual_patches=_field(data_cfg, "max_visual_patches_per_pack", None),
        overlong=str(_field(data_cfg, "overlong", "truncate")),
        loss_normalization=str(_field(stage_cfg, "loss_normalization", "token")),
        blend=tuple((s.name, s.weight, s.kind) for s in sources),
        encoding=json.dumps(dataclasses.asdict(encoding_cfg), sort_keys=True),
        tokenizer=tokenizer.fingerprint,
    )
    if settings.micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if settings.packing_buffer_size < 1:
        raise ValueError(f"data.packing_buffer_size must be >= 1, got {settings.packing_buffer_size}")
    if global_batch_size is not None and global_batch_size % settings.micro_batch_size:
        raise ValueError(f"global_batch_size={global_batch_size} is not a multiple of "
                         f"micro_batch_size={micro_batch_size}")
    plan = StreamPlan.of(dp_rank=int(dp_rank), dp_size=int(dp_size), num_streams=settings.num_streams,
                         micro_batches_per_step=None if global_batch_size is None
                         else global_batch_size // settings.micro_batch_size)
    packing = PackingConfig(
        seq_length=settings.seq_length,
        max_visual_patches=settings.max_visual_patches,
        overlong=settings.overlong,
        merge_size=encoding_cfg.vision.merge_size,
    )
    streams = []
    for index in plan.streams:
        task_encoder = _task_encoder(
            tokenizer, encoding_cfg, packing, settings.loss_normalization, settings.seed
        )
        dataset = get_train_dataset(
            metadataset_config(sources, "train"),
            split_part="train",
            # energon's rank and world size are the stream's: its shard slices and seeds follow from them.
            worker_config=_worker_config(index, settings.num_streams, workers, settings.seed),
            batch_size=settings.micro_batch_size,
            packing_buffer_size=settings.packing_buffer_size,
            shuffle_buffer_size=settings.shuffle_buffer_size,
            max_samples_per_sequence=settings.max_samples_per_sequence,
            task_encoder=task_encoder,
        )
        if not _field(data_cfg, "verbose_loader", False):
            _quiet_packing(dataset)
        streams.append(_Stream(index, get_savable_loader(dataset, watchdog_timeout_seconds=None)))
    logger.info(
        "train loader rank %d/%d, data stream(s) %s of %d: %s; %d tokens x %d per micro-batch, %d workers per stream",
        dp_rank, dp_size, plan.streams, settings.num_streams,
        ", ".join(f"{s.name} ({s.kind}) w={s.weight:g}" for s in sources), seq_length, micro_batch_size, workers,
    )
    return TrainLoader(streams, plan, settings, sources)


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
        tokenizer, encoding_cfg, packing, str(_field(stage_cfg, "loss_normalization", "token")), 0
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
    if not _field(data_cfg, "verbose_loader", False):
        _quiet_packing(dataset)
    return get_loader(dataset, watchdog_timeout_seconds=None)
