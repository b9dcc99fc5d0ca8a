"""The build journal ``<out>/.build/journal.jsonl``: an append-only, fsynced record of committed work.

Line 1 is the header (tool version and the build's fingerprint). Then, in the order they happened:

* ``{"type": "rejected", "records": [{"line", "reason", "detail", "input"}, ...]}``
* ``{"type": "failed", "records": [{"line", "error", "traceback", "input"}]}``: a line that hit an
  internal error (a bug), recorded apart from the rejections.
* ``{"type": "shard", "name", "samples", "bytes", "sha256", "last": [line, sub], "lines": n,
  "digests": [[sha256, line], ...], "dropped_clips": n}``: a shard renamed to its final name; ``last``
  is its last sample (manifest line, index of the sample within the line), ``lines`` the accepted
  lines that START in it, ``digests`` their source media (for duplicate detection after a resume),
  ``dropped_clips`` the clips those lines left out (data_tools.kinds.video).
* ``{"type": "done"}``: every line is accounted for; only the final files remain to be written.

A kill can tear the last line only (it is written in one ``write`` and fsynced); :func:`load_journal`
drops a torn line. A shard renamed just before a kill but missing from the journal is simply
rewritten by the resumed build, with the same bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class JournalError(RuntimeError):
    pass


class Journal:
    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "ab")

    @classmethod
    def create(cls, path: Path, header: dict) -> "Journal":
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(_encode({"type": "header", **header}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return cls(path)

    def append(self, record: dict) -> None:
        self._file.write(_encode(record))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _encode(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def load_journal(path: Path) -> tuple[dict, list[dict]]:
    """(header, records) of a journal; a torn last line is dropped (and cut from the file)."""
    if not path.is_file():
        raise JournalError(f"{path} does not exist: nothing to resume")
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, good_bytes = [], 0
    for i, line in enumerate(lines):
        if not line:
            good_bytes += 1 if i < len(lines) - 1 else 0
            continue
        torn = i == len(lines) - 1  # no newline after it
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if torn:
                break
            raise JournalError(f"{path}: line {i + 1} is corrupt (not a torn last line)") from None
        if torn:
            break
        complete.append(record)
        good_bytes += len(line) + 1
    if good_bytes != len(data):
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    if not complete or complete[0].get("type") != "header":
        raise JournalError(f"{path} has no header line")
    return complete[0], complete[1:]
