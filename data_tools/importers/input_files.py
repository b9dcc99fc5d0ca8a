"""The input files of a container import (``import-webdataset``, ``import-parquet``): a glob pattern
expanded in a fixed order, and the fingerprint that ties a ``--resume`` to the same files."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from data_tools.build import BuildError


def expand_pattern(pattern: str, flag: str) -> list[Path]:
    """The files ``pattern`` matches (``*``, ``?``, ``[...]``, ``**`` for any depth), sorted by path so
    that record numbers do not depend on the file system's order. Raises BuildError when none match."""
    paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise BuildError(f"{flag} {pattern!r} matches no file")
    return paths


def display_names(paths: list[Path]) -> list[str]:
    """Each path relative to the folder that holds them all (``00000.tar``, or ``part1/00000.tar``):
    what the samples record as their ``source.manifest``."""
    root = os.path.commonpath([str(p.parent) for p in paths])
    return [os.path.relpath(p, root) for p in paths]


def files_fingerprint(paths: list[Path], names: list[str]) -> list[dict]:
    """Name, size and modification time of each input file. Cheap (no file is read), which matters for
    terabytes of tars; an input rewritten in place with the same size and time goes unnoticed."""
    out = []
    for path, name in zip(paths, names):
        st = path.stat()
        out.append({"name": name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def jsonable(value: object) -> object:
    """``value`` with every bytes value replaced by ``"<N bytes>"`` (for rejected.jsonl's ``input``)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)
