"""RL prompt sets: read a ``python -m data_tools build-rl`` shard set, encode its prompts for the rollout,
and deal them out step by step over the data-parallel ranks.

* :func:`load_prompt_set` reads the whole set into memory as :class:`PromptRecord` objects: shards in
  index.json order, samples in file order (RL sets are small: a plain sequential read, no energon).
  Media stay ENCODED (the JPEG/PNG/MP4 bytes of the shard, about what the set weighs on disk); they are
  decoded when a prompt is encoded, so a set of long videos never sits in memory as pixels.
* :func:`encode_rl_prompt` turns a record into the rollout's prompt dict (``input_ids``,
  ``position_ids``, vision inputs; see :mod:`pretrain.posttrain.rollout`) through the same path as the
  SFT training data (:func:`pretrain.data.encoding.decode_messages`, then the run's
  :class:`~pretrain.data.encoding.SampleEncoder` via :func:`pretrain.generate.encode_prompt_messages`),
  so a prompt is tokenised exactly as :func:`pretrain.generate.encode_prompt` would tokenise it.
* :class:`PromptStream` yields each step's prompts for one data-parallel rank: the global batch is the
  next ``prompts_per_step`` prompts of a per-epoch permutation of the set (seeded by ``seed`` and the
  epoch; a batch that crosses the end of an epoch takes the rest from the next one), and rank ``r`` of
  ``dp_size`` gets its contiguous share with the prompts' indices in the global batch as keys (the
  rollout's ``prompt_keys``: the same prompt draws the same sampling stream whatever the layout).
  ``state_dict()`` / ``load_state_dict()`` hold (epoch, cursor): a resumed run, in any data-parallel
  layout, gets exactly the prompts the uninterrupted run would have got next.
* :func:`encode_step_prompts` encodes a rank's share of a step and skips the prompts that cannot be
  encoded (media that do not decode, a prompt over ``max_tokens``): each one is recorded (its id,
  source and error) and its place in the global batch goes to the next prompt of the stream, drawn
  alike on every rank, so every rank keeps its count of prompts (expert-parallel ranks step together)
  and no good prompt is lost.
"""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_tools.schema import Message, RlSample, SchemaError, read_sample
from data_tools.shards import iter_shard

STATE_VERSION = 1


class PromptSetError(ValueError):
    """A folder that cannot be read as an RL prompt set; the message names it and says why."""


@dataclass(frozen=True)
class PromptRecord:
    """One RL prompt.

    id: the manifest line's ``id`` (the shard key when the line had none); messages: system/user turns
    (``data_tools.schema.Message``: text parts, and image/video parts naming a member of ``media``),
    ending with a user turn; answer: the reference answer (None: the prompt has none); reward: the name
    of the reward that scores the responses (as written in the manifest: the trainer checks it is
    registered); media: the encoded media bytes by part name (``"img0.png"``); key: the sample's shard
    key; source: ``"<manifest>:<line>"`` (for error messages).
    """

    id: str
    messages: tuple[Message, ...]
    answer: str | None
    reward: str
    media: Mapping[str, bytes] = field(repr=False)
    key: str
    source: str


def _index(root: Path) -> dict:
    from data_tools.build import FORMAT, INDEX_JSON

    where = f"RL prompt set {root}"
    if not root.is_dir():
        raise PromptSetError(f"{where}: no such folder (build one with `python -m data_tools build-rl`)")
    try:
        index = json.loads((root / INDEX_JSON).read_text())
    except FileNotFoundError:
        raise PromptSetError(f"{where}: no {INDEX_JSON}: not a data_tools shard set, or its build did not finish "
                             "(rerun it with --resume)") from None
    except (OSError, ValueError) as e:
        raise PromptSetError(f"{where}: {INDEX_JSON} is unreadable ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise PromptSetError(f"{where}: {INDEX_JSON} is not a data_tools shard set index")
    if index.get("kind") != "rl":
        raise PromptSetError(f"{where}: a {index.get('kind')!r} shard set, not an RL prompt set "
                             "(build one with `python -m data_tools build-rl`)")
    return index


def load_prompt_set(path: str | Path) -> list[PromptRecord]:
    """Every prompt of the ``build-rl`` set in ``path``, in set order. Raises :class:`PromptSetError`
    (missing folder, unfinished build, another kind of set, a shard missing, truncated or corrupt)."""
    root = Path(path)
    index = _index(root)
    records: list[PromptRecord] = []
    for shard in index["shards"]:
        file = root / shard["name"]
        size = file.stat().st_size if file.is_file() else None
        if size != shard["bytes"]:
            found = "is missing" if size is None else f"has {size} bytes"
            raise PromptSetError(f"RL prompt set {root}: shard {file} {found}, index.json says {shard['bytes']}")
        try:
            for _, parts in iter_shard(file):
                sample, media = read_sample(parts)
                if not isinstance(sample, RlSample):
                    raise SchemaError(f"sample {sample.key} is a {sample.kind!r} sample")
                records.append(PromptRecord(
                    id=sample.source.id or sample.key, messages=sample.messages, answer=sample.answer,
                    reward=sample.reward, media=media, key=sample.key,
                    source=f"{sample.source.manifest}:{sample.source.line}",
                ))
        except (SchemaError, OSError, EOFError, tarfile.TarError) as e:
            raise PromptSetError(f"RL prompt set {root}: {file.name} cannot be read: {type(e).__name__}: {e}") from None
    if not records:
        raise PromptSetError(f"RL prompt set {root}: holds no prompt (every manifest line was rejected, see rejected.jsonl)")
    return records


def encode_rl_prompt(encoder: Any, record: PromptRecord, *, frames: Any = None) -> dict:
    """The rollout prompt dict of ``record`` (see :func:`pretrain.generate.encode_prompt_messages`).

    ``encoder``: the run's :class:`~pretrain.data.encoding.SampleEncoder`; ``frames``: the video frame
    sampling (a ``FrameSamplingConfig``; default ``encoder.config.frames``, as for the training data).
    Raises :class:`~pretrain.data.encoding.SampleEncodingError` naming the prompt (bad media, a prompt
    longer than the encoder's ``max_tokens``).
    """
    # Imported here: pretrain.generate loads Megatron (seconds), which reading and dealing prompts do not need.
    from pretrain.data.encoding import SampleEncodingError, decode_messages
    from pretrain.generate import encode_prompt_messages

    try:
        messages = decode_messages(record.messages, record.media, encoder.config.frames if frames is None else frames,
                                   record.key)
        return encode_prompt_messages(encoder, messages)
    except ValueError as err:
        raise SampleEncodingError(f"RL prompt {record.id} ({record.source}): {err}",
                                  reason=getattr(err, "reason", "invalid_sample")) from err


@dataclass(frozen=True)
class PromptBatch:
    """One data-parallel rank's share of a step's global batch.

    records: the prompts; keys: their indices in the global batch (``dp_rank * len(records) + p``: the
    rollout's ``prompt_keys``); indices: their indices in the prompt set (for logs).
    """

    records: list[PromptRecord]
    keys: list[int]
    indices: list[int]


class PromptStream:
    """Deterministic prompts for each step, split over data-parallel ranks (see the module docstring).

    ``records``: the prompt set; ``prompts_per_step``: the global batch, a multiple of ``dp_size``;
    ``seed``: the shuffle seed. Iterating yields a :class:`PromptBatch` per step, forever (epochs wrap).
    """

    def __init__(self, records: Sequence[PromptRecord], prompts_per_step: int, seed: int, dp_rank: int = 0,
                 dp_size: int = 1):
        if not records:
            raise ValueError("PromptStream needs at least one prompt")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not a rank of dp_size {dp_size}")
        if prompts_per_step < 1 or prompts_per_step % dp_size:
            raise ValueError(f"prompts_per_step {prompts_per_step} must be a positive multiple of the "
                             f"data-parallel size {dp_size}")
        self.records = list(records)
        self.prompts_per_step, self.seed = prompts_per_step, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch = 0  # the epoch the next prompt comes from
        self.cursor = 0  # its position in that epoch's order
        self._fingerprint = hashlib.sha256("\0".join(r.id for r in self.records).encode()).hexdigest()[:16]
        self._order_epoch, self._order = -1, []

    def epoch_order(self, epoch: int) -> list[int]:
        """The prompt indices of ``epoch`` in the order they are dealt (a permutation seeded by (seed, epoch))."""
        if epoch != self._order_epoch:
            order = list(range(len(self.records)))
            random.Random(f"{self.seed}/prompts/{epoch}").shuffle(order)
            self._order_epoch, self._order = epoch, order
        return self._order

    def draw(self, count: int) -> list[int]:
        """The indices of the next ``count`` prompts of the stream (crossing into the next epoch when this
        one ends). Every data-parallel rank must draw alike: a step's global batch, or the replacements
        of its prompts that failed to encode (:func:`encode_step_prompts`)."""
        indices: list[int] = []
        while len(indices) < count:
            order = self.epoch_order(self.epoch)
            take = min(count - len(indices), len(order) - self.cursor)
            indices += order[self.cursor:self.cursor + take]
            self.cursor += take
            if self.cursor == len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        return indices

    def __iter__(self) -> Iterator[PromptBatch]:
        return self

    def __next__(self) -> PromptBatch:
        indices = self.draw(self.prompts_per_step)
        share = self.prompts_per_step // self.dp_size
        first = self.dp_rank * share
        mine = indices[first:first + share]
        return PromptBatch([self.records[i] for i in mine], list(range(first, first + share)), mine)

    def state_dict(self) -> dict:
        """Where the stream stands (JSON-ready); the same on every rank."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "num_prompts": len(self.records), "prompts_fingerprint": self._fingerprint}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from ``state`` (any data-parallel layout and ``prompts_per_step`` may resume it).
        Raises ValueError when it belongs to another prompt set or seed."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"prompt stream state version {state.get('version')!r} is not {STATE_VERSION}")
        ours = {"seed": self.seed, "num_prompts": len(self.records), "prompts_fingerprint": self._fingerprint}
        changed = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in ours.items() if state.get(k) != v]
        if changed:
            raise ValueError("the prompt stream state belongs to another prompt set or seed (" + "; ".join(changed) + ")")
        if not (isinstance(state["epoch"], int) and state["epoch"] >= 0
                and isinstance(state["cursor"], int) and 0 <= state["cursor"] < len(self.records)):
            raise ValueError(f"prompt stream state has epoch {state['epoch']!r}, cursor {state['cursor']!r}: out of range")
        self.epoch, self.cursor = state["epoch"], state["cursor"]


def _all_failures(failures: list[dict], group: Any) -> list[dict]:
    """The failures of every rank of the data-parallel ``group`` (None: this process alone), in global-batch
    order. One all-reduce of a count per call; the failures themselves are gathered only when there are any."""
    import torch.distributed as dist

    from common.distributed.comm import all_reduce_values

    if not dist.is_initialized():
        return failures
    (count,) = all_reduce_values([len(failures)], group=group)
    if not count:
        return []
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, failures, group=group)
    return sorted((f for part in gathered for f in part), key=lambda f: f["key"])


def encode_step_prompts(encoder: Any, stream: PromptStream, batch: PromptBatch,
                        group: Any = None) -> tuple[PromptBatch, list[dict], list[dict]]:
    """(the batch as trained, its rollout prompt dicts, the skipped prompts) for this rank's ``batch`` of
    ``stream`` (see the module docstring). Every rank of the data-parallel ``group`` calls it with its
    share of the same step (model-parallel peers hold the same prompts and fail alike).

    A prompt that :func:`encode_rl_prompt` cannot encode is skipped: its place (its key, so its sampling
    stream) goes to the next prompt of the stream, drawn on every rank in global-batch order, until every
    place holds a prompt that encodes. The skipped prompts of every rank come back as
    ``{"key", "index", "prompt", "source", "error"}`` (key: the place in the global batch; index: the
    prompt's in the set). A prompt that fails again in a later epoch is skipped again, so a resumed run
    draws what the uninterrupted one drew. Raises
    :class:`~pretrain.data.encoding.SampleEncodingError` when every prompt of the set has failed.
    """
    from pretrain.data.encoding import SampleEncodingError

    records, indices = list(batch.records), list(batch.indices)
    first = batch.keys[0] if batch.keys else 0
    encoded: list = [None] * len(records)
    pending, skipped, failed_prompts = range(len(records)), [], set()
    while True:
        failures = []
        for p in pending:
            try:
                encoded[p] = encode_rl_prompt(encoder, records[p])
            except SampleEncodingError as err:
                failures.append({"key": batch.keys[p], "index": indices[p], "prompt": records[p].id,
                                 "source": records[p].source, "error": str(err)})
        failures = _all_failures(failures, group)
        if not failures:
            return PromptBatch(records, list(batch.keys), indices), encoded, skipped
        skipped += failures
        failed_prompts.update(f["index"] for f in failures)
        if len(failed_prompts) == len(stream.records):
            raise SampleEncodingError(f"none of the {len(stream.records)} RL prompts can be encoded (last: "
                                      f"{failures[-1]['error']})", reason="no_usable_prompt")
        pending = []
        for failure, index in zip(failures, stream.draw(len(failures))):
            p = failure["key"] - first
            if 0 <= p < len(records):  # a place of this rank's share
                records[p], indices[p] = stream.records[index], index
                pending.append(p)
