"""The one build driver behind ``build-image-text``, ``build-interleaved``, ``build-video``, ``build-sft`` and ``build-rl``.

Pipeline: the manifest is read line by line in the main process; worker processes validate lines and
prepare samples (``data_tools.kinds``); results come back IN MANIFEST ORDER, and the main process alone
detects duplicates, cuts shards and writes them. Hence the same input and options give byte-identical
shards whatever ``--workers`` is.

The manifest may also be one JSON array of records (``data_tools.json_array``): element ``n`` counts as
line ``n``. The ``import-*`` commands run this same driver on other datasets' layouts: an importer
(``data_tools.importers``) translates each input record into the kind's manifest record in the worker,
before the kind's checks, and relative media paths resolve against ``--media-root``.
``import-webdataset`` and ``import-parquet`` read tar and parquet files instead of a manifest (a
:class:`RecordSource`): their records are numbered like lines, and their media travel to the workers
as bytes (``LineContext.media``).

Every non-blank manifest line ends up either in exactly one shard (as one sample, or one per clip),
in ``rejected.jsonl`` with a reason (the INPUT is bad), or, when processing it raised an unexpected
exception (a BUG in data_tools, not bad input), in ``internal_errors.jsonl`` with the traceback. The
build goes on past a bug so that one run shows all of them, but its summary reports them apart from
the rejections and the command exits with status 3 (:func:`run_build_command`). Output folder::

    shard-000000.tar ...   WebDataset shards (data_tools.schema describes a sample)
    index.json             shards (samples, bytes, sha256), totals (incl. failed_lines: internal errors;
                           dropped_clips: clips of accepted videos left out, with no text or caption),
                           rejections by reason, config, version
    rejected.jsonl         {"line", "reason", "detail", "input"} per rejected line, in line order
    internal_errors.jsonl  {"line", "error", "traceback", "input"} per line that hit a bug (only when some did)
    .nv-meta/, *.tar.idx   energon metadata (data_tools.energon_meta)
    .build/journal.jsonl   what is committed, for --resume (data_tools.journal)

Crash safety: shards are renamed into place only when complete and then journaled; index.json is
written last, so its presence means the set is complete. ``--resume`` rebuilds the state from the
journal, deletes anything not journaled, and goes on from the last committed sample; determinism
makes the result identical to an uninterrupted build.

A worker process that dies (a decoder segfault, the OOM killer) does not stop the build: the lines
that were in flight are re-run one at a time in a fresh process (a new one after each crash), and the
one that kills its process again is rejected as ``worker_crash`` (an input a decoder cannot survive).
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_tools.atomic import write_atomic
from data_tools.config import SHARD_PATTERN, BuildConfig
from data_tools.energon_meta import META_DIR, write_energon_metadata
from data_tools.importers import IMPORTERS, importer_maker
from data_tools.journal import Journal, JournalError, load_journal
from data_tools.json_array import JsonArrayError, is_json_array, iter_json_array
from data_tools.kinds import maker
from data_tools.sample_media import LineContext, PreparedSample
from data_tools.schema import SCHEMA_VERSION
from data_tools.shards import ShardWriter
from data_tools.validation import REASONS, Rejected, decode_line, parse_record

INDEX_JSON = "index.json"
REJECTED_JSONL = "rejected.jsonl"
INTERNAL_ERRORS_JSONL = "internal_errors.jsonl"
BUILD_DIR = ".build"
JOURNAL = "journal.jsonl"
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar(\.idx)?$")
FORMAT = "qwen3vl-stack webdataset shard set"


class BuildError(RuntimeError):
    """A build that cannot start or go on (bad arguments, foreign output folder, changed options)."""


def tool_version() -> str:
    try:
        return metadata.version("qwen3vl-stack")
    except metadata.PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------------


@dataclass
class LineResult:
    """What became of one manifest line: samples, source media digests and the clips left out
    (data_tools.sample_media.LineSamples), a rejection (``reason``, ``detail``: the input is bad), or an
    internal error (``error``: one line naming the exception and where it was raised, ``traceback``: the
    full one; the input may be fine, data_tools has a bug)."""

    line: int
    samples: list[PreparedSample] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    dropped_clips: int = 0
    reason: str | None = None
    detail: str | None = None
    error: str | None = None
    traceback: str | None = None


_WORKER: dict = {}


def _exit_when_orphaned(parent: int) -> None:
    """Worker side: end this process once its parent is gone (a kill -9 of the build must not leave
    workers waiting forever on their task queue)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def init_worker(config: BuildConfig, watch_parent: bool = False) -> None:
    """Per-process set-up (also run in the main process for ``--workers 0``)."""
    if watch_parent:
        threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    _WORKER["config"] = config
    _WORKER["make"] = maker(config.kind) if config.importer is None else importer_maker(config.importer, config.kind)
    _WORKER["manifest_name"] = os.path.basename(config.manifest)
    _WORKER["base_dir"] = config.media_root or os.path.dirname(config.manifest)


def _as_text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="backslashreplace")


def internal_error(line: int, e: Exception) -> LineResult:
    """The result of a line whose processing raised ``e``, an exception no validation rule raises."""
    where = traceback.extract_tb(e.__traceback__)[-1]
    error = f"{type(e).__name__}: {e} (at {os.path.basename(where.filename)}:{where.lineno})"
    return LineResult(line, error=error, traceback="".join(traceback.format_exception(e)))


def _make_samples(line: int, prepare) -> LineResult:
    """The kind's samples of the (manifest record, LineContext) that ``prepare()`` returns. Never
    raises: ``Rejected`` becomes a rejection, any other exception an internal error (a bug must neither
    stop the build nor pass for bad input)."""
    try:
        record, ctx = prepare()
        made = _WORKER["make"](record, ctx)
        return LineResult(line, samples=made.samples, digests=made.digests, dropped_clips=made.dropped_clips)
    except Rejected as r:
        return LineResult(line, reason=r.reason, detail=r.detail)
    except Exception as e:
        return internal_error(line, e)


def process_line(task: tuple[int, bytes]) -> LineResult:
    """Validate one manifest line and prepare its samples. Never raises (see _make_samples)."""
    line, raw = task
    return _make_samples(line, lambda: (
        parse_record(decode_line(raw)),
        LineContext(line, _WORKER["manifest_name"], _WORKER["base_dir"], _WORKER["config"]),
    ))


@dataclass(frozen=True)
class InputRecord:
    """One record of an import whose input is not manifest lines (a tar sample, a parquet row), as a
    worker receives it: ``name`` is the input file it comes from (the samples' ``source.manifest``),
    ``data`` what the importer's ``translate`` takes (picklable), ``base_dir`` the folder relative media
    paths of the translated record resolve against."""

    name: str
    data: Any
    base_dir: str = ""


def process_input(translate, task: tuple[int, InputRecord]) -> LineResult:
    """Worker side of such an import: ``translate(data) -> (manifest record of the build's kind, its
    media as ``{reference: bytes}``)`` (raises Rejected for a record it cannot translate), then the
    kind's checks exactly as for a manifest line. Never raises (see _make_samples)."""
    line, item = task

    def prepare():
        record, media = translate(item.data)
        return record, LineContext(line, item.name, item.base_dir, _WORKER["config"], media)

    return _make_samples(line, prepare)


def _executor(config: BuildConfig, workers: int) -> ProcessPoolExecutor:
    # spawn, not fork: the main process may hold threads (progress bar) whose locks fork would copy.
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker,
        initargs=(config, True),
    )


#: Lines travel to the workers in chunks, one message each: a process pool costs about half a
#: millisecond per message on a busy machine, more than decoding a small image (one line per message
#: made build-image-text 1.5-1.7x slower on 64-160 px images). A chunk holds about CHUNK_SECONDS of
#: work (lines that take longer, such as videos, go one by one), at most MAX_CHUNK_LINES lines and
#: about MAX_CHUNK_BYTES of results (memory: at most ``CHUNKS_PER_WORKER * workers`` chunks are in
#: flight), judged from the lines done so far.
CHUNK_SECONDS = 0.02
MAX_CHUNK_LINES = 64
MAX_CHUNK_BYTES = 4 << 20
CHUNKS_PER_WORKER = 3


def run_chunk(fn, chunk: list[tuple[int, bytes]]) -> tuple[list[LineResult], float]:
    """Worker side: ``fn`` over the lines of a chunk; (results, seconds it took)."""
    started = time.perf_counter()
    results = [fn(task) for task in chunk]
    return results, time.perf_counter() - started


class _ChunkSizer:
    """Lines per chunk from the mean seconds and result bytes per line seen so far (1 before any)."""

    def __init__(self):
        self.lines = 0
        self.seconds = 0.0
        self.bytes = 0

    def record(self, results: list[LineResult], seconds: float) -> None:
        self.lines += len(results)
        self.seconds += seconds
        self.bytes += sum(sample.num_bytes for r in results for sample in r.samples)

    def size(self) -> int:
        if not self.lines:
            return 1
        by_time = CHUNK_SECONDS * self.lines / max(self.seconds, 1e-9)
        by_bytes = MAX_CHUNK_BYTES * self.lines / max(self.bytes, 1)
        return max(1, min(MAX_CHUNK_LINES, int(by_time), int(by_bytes)))


_CRASH_DETAIL = "processing this line killed its worker process twice (decoder crash or out of memory)"


def _run_alone(tasks: list[tuple[int, bytes]], config: BuildConfig, fn) -> Iterator[tuple[tuple[int, bytes], LineResult]]:
    """``(task, fn(task))`` for lines whose worker died: one at a time in a fresh process, so that the
    line that kills its process again is found (and rejected as ``worker_crash``) and the others are not."""
    solo = None
    try:
        for task in tasks:
            solo = solo or _executor(config, 1)
            try:
                yield task, solo.submit(fn, task).result()
            except BrokenProcessPool:
                yield task, LineResult(task[0], reason="worker_crash", detail=_CRASH_DETAIL)
                solo.shutdown(wait=True)
                solo = None
    finally:
        if solo is not None:
            solo.shutdown(wait=True)


def ordered_results(
    tasks: Iterator[tuple[int, bytes]], config: BuildConfig, fn=process_line
) -> Iterator[tuple[tuple[int, bytes], LineResult]]:
    """``(task, fn(task))`` over ``tasks`` on ``config.workers`` processes, in task order.

    ``fn`` (a picklable module-level function, default :func:`process_line`) must not raise. Lines go
    to the workers in chunks (see ``CHUNK_SECONDS``); at most ``CHUNKS_PER_WORKER * workers`` chunks
    are in flight, so memory stays bounded whatever the manifest size.
    """
    if config.workers == 0:
        init_worker(config)
        for task in tasks:
            yield task, fn(task)
        return
    window = CHUNKS_PER_WORKER * config.workers
    sizer = _ChunkSizer()
    pool = _executor(config, config.workers)
    pending: deque = deque()  # (chunk, future)
    try:
        while True:
            broken = False
            while len(pending) < window:
                chunk = list(itertools.islice(tasks, sizer.size()))
                if not chunk:
                    break
                try:
                    pending.append((chunk, pool.submit(run_chunk, fn, chunk)))
                except BrokenProcessPool:  # a worker died while the caller was busy (writing a shard)
                    pending.append((chunk, None))
                    broken = True
                    break
            if not pending:
                return
            if not broken:
                chunk, future = pending[0]
                try:
                    results, seconds = future.result()
                except BrokenProcessPool:
                    broken = True
                else:
                    pending.popleft()
                    sizer.record(results, seconds)
                    yield from zip(chunk, results)
                    continue
            # A worker died. Keep the results that arrived; re-run the other lines alone to find the culprit.
            in_flight = list(pending)
            pending.clear()
            pool.shutdown(wait=True, cancel_futures=True)
            for c, f in in_flight:
                if f is not None and f.done() and not f.cancelled() and f.exception() is None:
                    yield from zip(c, f.result()[0])
                else:
                    yield from _run_alone(c, config, fn)
            pool = _executor(config, config.workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------------
# Main side
# ----------------------------------------------------------------------------------------------------


@dataclass
class ManifestScan:
    sha256: str
    input_lines: int  # non-blank lines
    blank_lines: int


_WHITESPACE = b" \t\r\n\x0b\x0c"


def _line_content(line: int, raw: bytes) -> bytes:
    """A manifest line without its line ending (and without a UTF-8 BOM on line 1)."""
    raw = raw.rstrip(b"\n").rstrip(b"\r")
    if line == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    return raw


def scan_manifest(path: Path) -> ManifestScan:
    """sha256 of the manifest file and its counts of non-blank and blank lines (blank lines are not inputs);
    for a JSON array (data_tools.json_array), its count of elements. Raises JsonArrayError."""
    h = hashlib.sha256()
    nonblank = blank = 0
    if is_json_array(path):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return ManifestScan(h.hexdigest(), sum(1 for _ in iter_json_array(path)), 0)
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            h.update(raw)
            if _line_content(line, raw).strip(_WHITESPACE):
                nonblank += 1
            else:
                blank += 1
    return ManifestScan(h.hexdigest(), nonblank, blank)


def iter_manifest(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line content) of every non-blank line; of a JSON array, (1-based element
    number, element text) of every element (data_tools.json_array)."""
    if is_json_array(path):
        yield from iter_json_array(path)
        return
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            content = _line_content(line, raw)
            if content.strip(_WHITESPACE):
                yield line, content


@dataclass
class InputScan:
    """What a build knows of its input before reading it: the entries it adds to the build's
    fingerprint (compared on --resume), its number of records (None: counted while they are read) and
    of blank manifest lines."""

    fingerprint: dict
    input_lines: int | None
    blank_lines: int = 0


class RecordSource:
    """The input of a build: numbered records, and the worker function that turns one into a LineResult.

    The build commands read their manifest (:class:`ManifestSource`, the default of :func:`run_build`);
    ``import-webdataset`` and ``import-parquet`` read other containers (data_tools.importers) and hand
    the workers :class:`InputRecord` s that carry their media as bytes. Contract: :meth:`records` yields
    ``(number, payload)`` with numbers 1-based and increasing, the same records under the same numbers
    on every call (determinism and --resume rest on it); ``process`` is a picklable function
    ``((number, payload)) -> LineResult`` that never raises (it runs in the worker processes);
    :meth:`input_text` is what rejected.jsonl and internal_errors.jsonl record as the input.
    """

    label = "build"  # progress bar
    unit = "line"
    process = staticmethod(process_line)

    def scan(self) -> InputScan:
        raise NotImplementedError

    def records(self) -> Iterator[tuple[int, Any]]:
        raise NotImplementedError

    def input_text(self, payload: Any) -> str:
        return _as_text(payload)


class ManifestSource(RecordSource):
    """The lines of ``config.manifest`` (JSONL, or one JSON array of records)."""

    def __init__(self, config: BuildConfig):
        self.config = config
        self.path = Path(config.manifest)
        self.label = f"import {config.importer}" if config.importer else f"build {config.kind}"

    def scan(self) -> InputScan:
        manifest, config = self.path, self.config
        if not manifest.is_file():
            raise BuildError(f"input {manifest} does not exist or is not a file")
        if config.importer is not None and config.importer not in IMPORTERS:
            raise BuildError(f"unknown importer {config.importer!r} (known: {', '.join(IMPORTERS)})")
        if config.media_root is not None and not Path(config.media_root).is_dir():
            raise BuildError(f"--media-root {config.media_root} does not exist or is not a folder")
        try:
            scan = scan_manifest(manifest)
        except JsonArrayError as e:
            raise BuildError(f"input {manifest} starts with '[' but is not a JSON array of records: {e}") from None
        return InputScan({"manifest_sha256": scan.sha256}, scan.input_lines, scan.blank_lines)

    def records(self) -> Iterator[tuple[int, bytes]]:
        return iter_manifest(self.path)


@dataclass
class BuildState:
    """What the journal says is committed."""

    shards: list[dict] = field(default_factory=list)
    rejected: dict[int, dict] = field(default_factory=dict)
    failed: dict[int, dict] = field(default_factory=dict)  # lines that hit an internal error
    seen: dict[str, int] = field(default_factory=dict)  # source media sha256 -> line that has it
    last: tuple[int, int] | None = None  # (line, sub-sample) of the last committed sample
    done: bool = False

    @classmethod
    def from_records(cls, records: list[dict]) -> "BuildState":
        state = cls()
        for record in records:
            if record["type"] == "shard":
                state.add_shard(record)
            elif record["type"] == "rejected":
                for r in record["records"]:
                    state.rejected[r["line"]] = r
            elif record["type"] == "failed":
                for r in record["records"]:
                    state.failed[r["line"]] = r
            elif record["type"] == "done":
                state.done = True
        return state

    def add_shard(self, record: dict) -> None:
        self.shards.append(record)
        self.last = tuple(record["last"])
        for digest, line in record["digests"]:
            self.seen[digest] = line


def _our_outputs(out: Path) -> list[Path]:
    names = {INDEX_JSON, REJECTED_JSONL, INTERNAL_ERRORS_JSONL, BUILD_DIR, META_DIR}
    names |= {name + ".tmp" for name in (INDEX_JSON, REJECTED_JSONL, INTERNAL_ERRORS_JSONL)}
    return [p for p in out.iterdir() if p.name in names or SHARD_RE.match(p.name)]


def _prepare_fresh(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise BuildError(
                f"--out {out} is not empty: pass --resume to finish an interrupted build there, "
                "or --overwrite to replace it"
            )
        for p in _our_outputs(out):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _remove_uncommitted(out: Path, state: BuildState) -> None:
    """Delete what the journal does not vouch for; check that committed shards are still intact."""
    tmp = out / BUILD_DIR / "tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    for name in (INDEX_JSON, REJECTED_JSONL, INTERNAL_ERRORS_JSONL):
        (out / name).unlink(missing_ok=True)
        (out / (name + ".tmp")).unlink(missing_ok=True)
    for p in out.iterdir():
        m = SHARD_RE.match(p.name)
        if m and (int(m.group(1)) >= len(state.shards) or m.group(2)):
            p.unlink()  # a shard renamed but not journaled (rewritten identically), or energon's index
    for record in state.shards:
        path = out / record["name"]
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            raise BuildError(
                f"committed shard {path} is missing or has changed size since it was written; "
                "this build cannot be resumed, rebuild it with --overwrite"
            )


def _diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


@dataclass
class BuildSummary:
    out: str
    input_lines: int
    accepted_lines: int
    rejected_lines: int
    samples: int
    shards: int
    bytes: int
    rejected_by_reason: dict[str, int]
    seconds: float  # this run
    samples_this_run: int = 0
    dropped_clips: int = 0  # clips of accepted videos left out: no text or caption in their span
    failed_lines: int = 0  # lines that hit an internal error (a bug), listed in internal_errors.jsonl
    first_error: str | None = None  # the first of them: "line N: Exception: message (at file.py:line)"

    def text(self, command: str) -> str:
        mb = self.bytes / 1e6
        rate = self.samples_this_run / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"{command}: {self.input_lines} input lines -> {self.samples} samples from {self.accepted_lines} lines "
            f"in {self.shards} shards ({mb:.1f} MB); {self.rejected_lines} lines rejected",
        ]
        if self.rejected_by_reason:
            lines.append("  rejected by reason: " + ", ".join(f"{r} {n}" for r, n in self.rejected_by_reason.items()))
        if self.dropped_clips:
            lines.append(f"  {self.dropped_clips} clips left out: neither the video's text nor a caption falls in their span")
        if self.failed_lines:
            lines.append(
                f"  INTERNAL ERRORS: {self.failed_lines} lines failed on a bug in data_tools, not on bad input "
                f"(they are in no shard; tracebacks in {INTERNAL_ERRORS_JSONL}); first: {self.first_error}"
            )
        lines.append(f"  this run: {self.samples_this_run} samples written in {self.seconds:.1f} s, {rate:.1f} samples/s")
        errors = f", {INTERNAL_ERRORS_JSONL}" if self.failed_lines else ""
        energon = f", {META_DIR}/" if self.shards else ""
        lines.append(f"  output: {self.out} ({INDEX_JSON}, {REJECTED_JSONL}{errors}{energon})")
        return "\n".join(lines)


def _ordered_reasons(counts: Counter) -> dict[str, int]:
    order = list(REASONS)
    return {r: counts[r] for r in sorted(counts, key=lambda r: (order.index(r) if r in order else len(order), r))}


def run_build(config: BuildConfig, source: RecordSource | None = None) -> BuildSummary:
    """Build (or with ``config.resume`` finish) the shard set of ``config`` from ``source`` (default:
    the manifest, :class:`ManifestSource`). Raises BuildError."""
    started = time.monotonic()
    out = Path(config.out)
    source = source or ManifestSource(config)
    scan = source.scan()
    fingerprint = {**config.fingerprint(), **scan.fingerprint}
    journal_path = out / BUILD_DIR / JOURNAL
    if config.resume:
        if not journal_path.is_file():
            raise BuildError(f"--resume: {out} holds no interrupted build ({BUILD_DIR}/{JOURNAL} is missing)")
        try:
            header, records = load_journal(journal_path)
        except JournalError as e:
            raise BuildError(f"{e}; this build cannot be resumed, rebuild it with --overwrite") from None
        changes = _diff(header["config"], fingerprint)
        if changes:
            raise BuildError("--resume needs the same options and manifest as the interrupted build:\n  " + "\n  ".join(changes))
    else:
        _prepare_fresh(out, config.overwrite)
        (out / BUILD_DIR).mkdir()
        Journal.create(journal_path, {"tool_version": tool_version(), "config": fingerprint}).close()
        records = []
    state = BuildState.from_records(records)
    if state.done and (out / INDEX_JSON).is_file():
        return _summary_from_index(out, time.monotonic() - started)
    _remove_uncommitted(out, state)
    written = 0
    if not state.done:
        written = _process(config, out, source, scan, state, journal_path)
    elif scan.input_lines is None:  # finished but for the final files: count the records again
        scan.input_lines = sum(1 for _ in source.records())
    summary = _finalize(config, out, scan, state, fingerprint)
    summary.samples_this_run = written
    summary.seconds = time.monotonic() - started  # everything: validation, writing, energon metadata
    return summary


def _process(config: BuildConfig, out: Path, source: RecordSource, scan: InputScan, state: BuildState, journal_path: Path) -> int:
    """Process the records from where the journal stops; return the samples written to shards (and
    set ``scan.input_lines`` when the source could not count its records up front)."""
    tmp_dir = out / BUILD_DIR / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    journal = Journal(journal_path)
    resume_line = state.last[0] if state.last else 0
    bar = tqdm(
        total=scan.input_lines, unit=source.unit, disable=not config.progress, dynamic_ncols=True, mininterval=0.5,
        desc=source.label,
    )
    counts = {"accepted": sum(r["lines"] for r in state.shards), "rejected": len(state.rejected), "written": 0, "inputs": 0}

    def tasks() -> Iterator[tuple[int, Any]]:
        for line, raw in source.records():
            counts["inputs"] += 1
            if line < resume_line or line in state.rejected or line in state.failed:
                bar.update(1)  # committed before this run
                continue
            yield line, raw

    writer: ShardWriter | None = None
    shard = {"lines": 0, "digests": [], "last": None, "dropped_clips": 0}
    pending_rejections: list[dict] = []

    def flush_rejections() -> None:
        if pending_rejections:
            journal.append({"type": "rejected", "records": list(pending_rejections)})
            pending_rejections.clear()

    def fail(result: LineResult, text: str) -> None:
        """A line that hit a bug: journaled at once (they are rare), counted apart from the rejections."""
        record = {"line": result.line, "error": result.error, "traceback": result.traceback, "input": text}
        state.failed[result.line] = record
        journal.append({"type": "failed", "records": [record]})

    def commit() -> None:
        nonlocal writer
        flush_rejections()
        info = writer.commit()
        record = {
            "type": "shard", "name": info.name, "samples": info.samples, "bytes": info.bytes, "sha256": info.sha256,
            "last": list(shard["last"]), "lines": shard["lines"], "digests": shard["digests"],
            "dropped_clips": shard["dropped_clips"],
        }
        journal.append(record)
        state.add_shard(record)
        writer = None
        shard.update(lines=0, digests=[], last=None, dropped_clips=0)

    def reject(line: int, reason: str, detail: str, text: str) -> None:
        record = {"line": line, "reason": reason, "detail": detail, "input": text}
        state.rejected[line] = record
        pending_rejections.append(record)
        counts["rejected"] += 1
        if len(pending_rejections) >= 1000:  # safe at any time: resumes skip journaled rejections
            flush_rejections()

    resume_point = state.last  # the run goes on after this (line, sub-sample)
    try:
        for (_, raw), result in ordered_results(tasks(), config, source.process):
            bar.update(1)
            resumed_mid_line = resume_point is not None and result.line == resume_point[0]
            if result.error is not None:
                if resumed_mid_line:
                    raise BuildError(
                        f"line {result.line} was accepted by the interrupted build but now fails with an internal "
                        f"error ({result.error}); rebuild with --overwrite"
                    )
                fail(result, source.input_text(raw))
                continue
            if result.reason is not None:
                if resumed_mid_line:
                    raise BuildError(
                        f"line {result.line} was accepted by the interrupted build but is now rejected "
                        f"({result.reason}: {result.detail}): its media changed; rebuild with --overwrite"
                    )
                reject(result.line, result.reason, result.detail or "", source.input_text(raw))
                continue
            skip = resume_point[1] + 1 if resumed_mid_line else 0
            new_digests: list[list] = []
            if not resumed_mid_line:
                dup = next((d for d in result.digests if d in state.seen), None)
                if dup is not None:
                    position = result.digests.index(dup)
                    reject(
                        result.line, "duplicate_media",
                        f"medium {position} has the same bytes (sha256 {dup[:16]}...) as a medium of line {state.seen[dup]}",
                        source.input_text(raw),
                    )
                    continue
                for d in dict.fromkeys(result.digests):
                    state.seen[d] = result.line
                    new_digests.append([d, result.line])
                counts["accepted"] += 1
            for sub, sample in enumerate(result.samples):
                if sub < skip:
                    continue
                if writer is not None and (
                    writer.samples >= config.max_samples_per_shard or writer.size_with(sample) > config.max_shard_bytes
                ):
                    commit()
                if writer is None:
                    writer = ShardWriter(out / SHARD_PATTERN.format(index=len(state.shards)), tmp_dir)
                writer.add(sample)
                counts["written"] += 1
                shard["last"] = (result.line, sub)
                if sub == 0 and not resumed_mid_line:  # a line's counts go with the shard it starts in
                    shard["lines"] += 1
                    shard["digests"].extend(new_digests)
                    shard["dropped_clips"] += result.dropped_clips
            if config.progress and bar.n % 32 == 0:  # (a disabled bar's n stays 0)
                bar.set_postfix(accepted=counts["accepted"], rejected=counts["rejected"], refresh=False)
        if writer is not None:
            commit()
        flush_rejections()
        journal.append({"type": "done"})
        state.done = True
        if scan.input_lines is None:
            scan.input_lines = counts["inputs"]
        return counts["written"]
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.set_postfix(accepted=counts["accepted"], rejected=counts["rejected"])
        bar.close()
        journal.close()


def _finalize(config: BuildConfig, out: Path, scan: InputScan, state: BuildState, fingerprint: dict) -> BuildSummary:
    """Write rejected.jsonl, the energon metadata and, last, index.json."""
    rejected = [state.rejected[line] for line in sorted(state.rejected)]
    failed = [state.failed[line] for line in sorted(state.failed)]
    accepted_lines = sum(r["lines"] for r in state.shards)
    if accepted_lines + len(rejected) + len(failed) != scan.input_lines:
        raise BuildError(
            f"internal accounting error: {accepted_lines} accepted + {len(rejected)} rejected + {len(failed)} failed "
            f"lines != {scan.input_lines} input lines; please report this with {out / BUILD_DIR / JOURNAL}"
        )
    write_atomic(out / REJECTED_JSONL, _jsonl(rejected))
    if failed:
        write_atomic(out / INTERNAL_ERRORS_JSONL, _jsonl(failed))
    shard_names = [r["name"] for r in state.shards]
    if shard_names:
        write_energon_metadata(out, shard_names, config.kind, config.split, config.workers)
    by_reason = _ordered_reasons(Counter(r["reason"] for r in rejected))
    summary = BuildSummary(
        out=str(out), input_lines=scan.input_lines, accepted_lines=accepted_lines, rejected_lines=len(rejected),
        samples=sum(r["samples"] for r in state.shards), shards=len(shard_names),
        bytes=sum(r["bytes"] for r in state.shards), rejected_by_reason=by_reason, seconds=0.0,
        failed_lines=len(failed), first_error=_first_error(failed),
        # (.get: a journal of an earlier version, resumed by this one, has no such count)
        dropped_clips=sum(r.get("dropped_clips", 0) for r in state.shards),
    )
    index = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "tool": "data_tools",
        "tool_version": tool_version(),
        "kind": config.kind,
        "shards": [{k: r[k] for k in ("name", "samples", "bytes", "sha256")} for r in state.shards],
        "totals": {
            "input_lines": scan.input_lines,
            "blank_lines": scan.blank_lines,
            "accepted_lines": accepted_lines,
            "rejected_lines": len(rejected),
            "failed_lines": len(failed),
            "dropped_clips": summary.dropped_clips,
            "samples": summary.samples,
            "shards": summary.shards,
            "bytes": summary.bytes,
        },
        "rejected_by_reason": by_reason,
        "energon": {
            "metadata": META_DIR if shard_names else None,
            "dataset_yaml": f"{META_DIR}/dataset.yaml" if shard_names else None,
            "split": list(config.split),
        },
        "config": fingerprint,
    }
    write_atomic(out / INDEX_JSON, (json.dumps(index, indent=2, ensure_ascii=False) + "\n").encode())
    shutil.rmtree(out / BUILD_DIR / "tmp", ignore_errors=True)
    return summary


def _jsonl(records: list[dict]) -> bytes:
    return b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in records)


def _first_error(failed: list[dict]) -> str | None:
    return f"line {failed[0]['line']}: {failed[0]['error']}" if failed else None


def _summary_from_index(out: Path, seconds: float) -> BuildSummary:
    index = json.loads((out / INDEX_JSON).read_text())
    t = index["totals"]
    failed = []
    if t.get("failed_lines"):
        failed = [json.loads(line) for line in (out / INTERNAL_ERRORS_JSONL).read_text().splitlines()]
    return BuildSummary(
        out=str(out), input_lines=t["input_lines"], accepted_lines=t["accepted_lines"], rejected_lines=t["rejected_lines"],
        samples=t["samples"], shards=t["shards"], bytes=t["bytes"], rejected_by_reason=index["rejected_by_reason"],
        seconds=seconds, failed_lines=len(failed), first_error=_first_error(failed), dropped_clips=t.get("dropped_clips", 0),
    )


#: Exit status of a build that hit internal errors (a bug in data_tools), whatever else happened.
EXIT_INTERNAL_ERROR = 3


def run_build_command(config: BuildConfig, command: str, source: RecordSource | None = None) -> int:
    """Run a build for the CLI and print its summary. Exit status: 0 done; 1 no sample was accepted
    (every line was bad input); 2 the build cannot run (bad options, foreign output folder);
    3 (``EXIT_INTERNAL_ERROR``) some lines hit a bug in data_tools (the rest of the set is built, the
    failed lines are in ``internal_errors.jsonl``); 130 interrupted."""
    try:
        summary = run_build(config, source)
    except BuildError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted; run the same command with --resume to finish", file=sys.stderr)
        return 130
    print(summary.text(command))
    if summary.failed_lines:
        print(
            f"{command}: error: {summary.failed_lines} lines hit an internal error (a bug in data_tools, please "
            f"report it with {Path(config.out) / INTERNAL_ERRORS_JSONL}); rebuild with --overwrite once it is fixed",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR
    if summary.samples == 0 and summary.input_lines > 0:
        print(f"{command}: error: no sample was accepted (see {REJECTED_JSONL})", file=sys.stderr)
        return 1
    return 0
