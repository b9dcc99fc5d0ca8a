"""WebDataset tar files (img2dataset's output) -> ``build-image-text`` records (``import-webdataset``).

A tar file holds samples as runs of consecutive members that share a key, the member name up to the
first dot of its file name (WebDataset's rule): ``<key>.jpg`` (or ``.jpeg``, ``.png``, ``.webp``, ...:
the image), ``<key>.txt`` (the caption) and/or ``<key>.json`` (metadata with the caption in field
``caption_field``, default ``"caption"``; img2dataset writes all three). Other members are ignored.

Each sample is one record of the build: numbered from 1 over all files in path order, the "line" of
its sample key, ``source.line``, ``rejected.jsonl`` and ``--resume``; ``source.manifest`` is the tar
file's name and ``source.id`` the sample's key in it. Its translation (in the worker):

* the caption is field ``caption_field`` of ``<key>.json`` when the member has it (not null), else
  the text of ``<key>.txt`` (UTF-8, trailing newlines dropped); neither is ``invalid_fields``, and a
  ``.json`` that is not one JSON object is rejected like a manifest line (``malformed_json``, ...);
* exactly one image member (none: ``missing_file``; several: ``invalid_fields``), kept in memory;
* then the ``build-image-text`` rules and the driver's duplicate detection, as for a manifest line.

Tars are read as a stream (``tarfile`` mode ``r|*``: plain, gzip, bzip2 or xz), one member at a time,
nothing extracted to disk. A damaged tar keeps what precedes the damage: the sample whose member is
cut short, or after which the file has an unreadable header or (uncompressed tars: compressed ones are
not checked for it) ends without its end-of-archive blocks, is rejected as ``unreadable_file`` with the
byte offset, and the file ends there. A file that is not a tar at all stops the import before anything
is written.
"""

from __future__ import annotations

import json
import lzma
import os
import tarfile
import zlib
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from data_tools.build import BuildError, InputRecord, InputScan, RecordSource, process_input
from data_tools.importers.input_files import display_names, expand_pattern, files_fingerprint
from data_tools.validation import Rejected, decode_line, parse_record

#: Member extensions taken as the sample's image (lower case; the decoder checks the real format).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
#: Errors of a damaged or truncated tar (or of its compression) while it is read.
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def split_member_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name by WebDataset's rule: the key runs to the first dot of the
    file name (folders included), the extension is the rest, lower case (``""`` without a dot)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _damage(offset: int, what: str) -> tuple[str, str]:
    return "unreadable_file", f"the tar file is damaged at byte {offset}: {what}; the rest of the file is skipped"


def iter_tar_samples(path: Path) -> Iterator[dict]:
    """``{"key", "members": [(name, bytes)], "error": None | (reason, detail)}`` for each sample of a
    tar file, in file order (see the module docstring for damaged files). Raises BuildError when the
    file is not a tar at all."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        plain = not f.read(6).startswith(_COMPRESSED_MAGIC)
        f.seek(0)
        try:
            tar = tarfile.open(fileobj=f, mode="r|*")
        except _READ_ERRORS as e:
            raise BuildError(f"{path} is not a readable tar file: {e}") from None
        current: dict | None = None
        error: tuple[str, str] | None = None
        with tar:
            while True:
                offset = tar.offset
                try:
                    member = tar.next()
                except _READ_ERRORS as e:
                    if current is None and offset == 0:
                        raise BuildError(f"{path} is not a readable tar file: {e}") from None
                    error = _damage(offset, f"cannot read the member header ({e})")
                    break
                tar.members = []  # TarFile keeps every header it read; a tar may hold millions
                if member is None:
                    error = _end_of_archive(f, tar.offset, size) if plain else None
                    break
                if member.isdir():
                    continue
                key, _ = split_member_name(member.name)
                if current is None or key != current["key"]:
                    if current is not None:
                        yield current
                    current = {"key": key, "members": [], "error": None}
                if not member.isreg():
                    what = "a symbolic link" if member.issym() else "a hard link" if member.islnk() else "not a regular file"
                    current["members"].append((member.name, b""))
                    current["error"] = current["error"] or ("unreadable_file", f"member {member.name!r} is {what}")
                    continue
                try:
                    data = tar.extractfile(member).read()
                except _READ_ERRORS as e:
                    current["members"].append((member.name, b""))
                    error = _damage(member.offset_data, f"member {member.name!r} of {member.size} bytes is cut short ({e})")
                    break
                current["members"].append((member.name, data))
        if error is not None and current is None:  # damage before the first member: nothing to keep
            raise BuildError(f"{path} is not a readable tar file: {error[1]}")
        if current is not None:
            if error is not None:
                current["error"] = error
            yield current


def _end_of_archive(f, offset: int, size: int) -> tuple[str, str] | None:
    """None when an uncompressed tar ends properly at ``offset`` (a zero block: tarfile stops without
    a word both at the end-of-archive marker and at a header it cannot parse, and at a file cut
    between two members); else the damage."""
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        return _damage(offset, f"the file ends ({size} bytes) without the end-of-archive marker, so the "
                               "sample before may be incomplete (the file was cut short)")
    if block.strip(b"\0"):
        return _damage(offset, "a member header that cannot be parsed")
    return None


def translate(caption_field: str, sample: dict) -> tuple[dict, dict[str, bytes]]:
    """The ``build-image-text`` record of a tar sample and its image bytes (see the module docstring).
    Raises Rejected."""
    if sample["error"] is not None:
        raise Rejected(*sample["error"])
    key = sample["key"]
    parts: dict[str, tuple[str, bytes]] = {}
    for name, data in sample["members"]:
        ext = split_member_name(name)[1]
        if ext in parts:
            raise Rejected("invalid_fields", f"sample {key!r} has two members {ext!r}")
        parts[ext] = (name, data)
    images = [parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts]
    names = [name for name, _ in sample["members"]]
    if not images:
        raise Rejected("missing_file", f"sample {key!r} has no image member (.{', .'.join(IMAGE_EXTENSIONS)}): {names}")
    if len(images) > 1:
        raise Rejected("invalid_fields", f"sample {key!r} has several image members: {[n for n, _ in images]}")
    caption = None
    if "json" in parts:
        name, data = parts["json"]
        try:
            meta = parse_record(decode_line(data))
        except Rejected as r:
            raise Rejected(r.reason, f"{name}: {r.detail}") from None
        caption = meta.get(caption_field)
        if caption is not None and not isinstance(caption, str):
            raise Rejected("invalid_fields", f"{name}: field {caption_field!r} must be a string, got {type(caption).__name__}")
    if caption is None and "txt" in parts:
        name, data = parts["txt"]
        try:
            caption = data.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise Rejected("invalid_utf8", f"{name}: byte {e.start} is not valid UTF-8 ({e.reason})") from None
    if caption is None:
        raise Rejected("invalid_fields", f"sample {key!r} has no caption: no {key}.txt and no field {caption_field!r} in {key}.json")
    image_name, image = images[0]
    return {"image": image_name, "text": caption, "id": key}, {image_name: image}


class TarSource(RecordSource):
    """The samples of the tar files that ``pattern`` matches (a RecordSource of data_tools.build)."""

    label = "import webdataset"
    unit = "sample"

    def __init__(self, pattern: str, caption_field: str = "caption"):
        self.pattern = pattern
        self.caption_field = caption_field
        self.process = partial(process_input, partial(translate, caption_field))

    def scan(self) -> InputScan:
        """The files' fingerprint; the samples are counted while they are read (counting them first
        would read every tar twice)."""
        self.paths = expand_pattern(self.pattern, "--tars")
        self.names = display_names(self.paths)
        for path in self.paths:  # a file that is not a tar stops the import before anything is written
            next(iter_tar_samples(path), None)
        return InputScan({"tars": files_fingerprint(self.paths, self.names), "caption_field": self.caption_field}, None)

    def records(self) -> Iterator[tuple[int, InputRecord]]:
        number = 0
        for path, name in zip(self.paths, self.names):
            for sample in iter_tar_samples(path):
                number += 1
                yield number, InputRecord(name, sample)

    def input_text(self, payload: InputRecord) -> str:
        sample = payload.data
        return json.dumps({"tar": payload.name, "key": sample["key"], "members": [n for n, _ in sample["members"]]},
                          ensure_ascii=False)
