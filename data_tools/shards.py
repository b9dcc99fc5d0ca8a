"""Deterministic WebDataset tar shards: write under a temporary name then rename; read them back.

Determinism: members are written in the order given, every header has mtime 0, uid/gid 0, empty
user/group names and mode 0644 (GNU tar format), so the same samples always give the same bytes.
Crash safety: a shard is written to ``<tmp_dir>/<name>.partial``, fsynced, then renamed to its final
name, so a shard under its final name is always complete.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_tools.atomic import fsync_dir
from data_tools.sample_media import PreparedSample
from data_tools.schema import SchemaError, split_member_name

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the archive to a multiple of this
END_OF_ARCHIVE = 2 * BLOCK


def member_size(data_len: int) -> int:
    """Bytes one member takes in a tar file: a 512-byte header plus the data padded to 512 bytes
    (names are short ASCII keys, so no extended headers)."""
    return BLOCK + -(-data_len // BLOCK) * BLOCK


def sample_size(sample: PreparedSample) -> int:
    return sum(member_size(len(data)) for _, data in sample.members)


def tar_file_size(content: int) -> int:
    """Size of a finished tar file whose members take ``content`` bytes."""
    return -(-(content + END_OF_ARCHIVE) // RECORD) * RECORD


@dataclass(frozen=True)
class ShardInfo:
    """A finished shard: file name, sample count, size in bytes, sha256 of the file."""

    name: str
    samples: int
    bytes: int
    sha256: str


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        self._f.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


class ShardWriter:
    """Writes samples into one shard; :meth:`commit` makes it visible under its final name."""

    def __init__(self, final_path: Path, tmp_dir: Path):
        self.final_path = final_path
        self.tmp_path = tmp_dir / (final_path.name + ".partial")
        self._file = open(self.tmp_path, "wb")
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.GNU_FORMAT)
        self.samples = 0
        self.content_bytes = 0

    def size_with(self, sample: PreparedSample) -> int:
        """The finished file size if ``sample`` were added."""
        return tar_file_size(self.content_bytes + sample_size(sample))

    def add(self, sample: PreparedSample) -> None:
        for part, data in sample.members:
            info = tarfile.TarInfo(f"{sample.key}.{part}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1
        self.content_bytes += sample_size(sample)

    def commit(self) -> ShardInfo:
        """Finish the tar, fsync it, rename it to its final name."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.final_path)
        fsync_dir(self.final_path.parent)
        return ShardInfo(self.final_path.name, self.samples, self._hashing.size, self._hashing.sha256.hexdigest())

    def abort(self) -> None:
        try:
            self._tar.close()
        except Exception:
            pass
        self._file.close()
        self.tmp_path.unlink(missing_ok=True)


def iter_shard(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {part: bytes})`` for each sample of a shard, in file order.

    Raises SchemaError for a non-file member, a member name that is not ``<key>.<part>``, or a key that
    appears in two separate runs of members (samples must be contiguous).
    """
    seen: set[str] = set()
    key, parts = None, {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isreg():
                raise SchemaError(f"{path}: member {member.name!r} is not a regular file")
            member_key, part = split_member_name(member.name)
            if member_key != key:
                if key is not None:
                    yield key, parts
                if member_key in seen:
                    raise SchemaError(f"{path}: sample {member_key!r} is split across the shard")
                seen.add(member_key)
                key, parts = member_key, {}
            if part in parts:
                raise SchemaError(f"{path}: sample {key!r} has two members {part!r}")
            parts[part] = tar.extractfile(member).read()
        if key is not None:
            yield key, parts


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def iter_shard_json(path: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """Yield ``(key, json bytes)`` of each sample, seeking past media members without reading them."""
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if member.isreg() and member.name.endswith(".json"):
                key, part = split_member_name(member.name)
                if part == "json":
                    yield key, tar.extractfile(member).read()
