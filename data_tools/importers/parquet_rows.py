"""Hugging Face datasets' parquet files -> ``build-image-text`` or ``build-sft`` records (``import-parquet``).

Each row is one record of the build: numbered from 1 over all files in path order (the "line" of its
sample key, ``source.line``, ``rejected.jsonl`` and ``--resume``); ``source.manifest`` is the file's
name and ``source.id`` the row's index in it. Files are read with pyarrow one row group after the
other, 32 rows at a time (``ParquetFile.iter_batches``), so a file never sits in memory whole.

Image cells (the datasets ``Image`` feature, or plain bytes): raw bytes, or a ``{"bytes", "path"}``
struct; a struct without bytes names a file, relative to the parquet file's folder. Anything else, or
null, is ``invalid_fields``. The bytes are validated like any image (``image_decode_error``, ...).

* ``image_text``: the image column holds one image, the text column the caption (a string; null or
  another type is ``invalid_fields``).
* ``sft``: the messages column holds ``[{"role", "content": str | [{"type": "text", "text"} |
  {"type": "image"}]}]`` (or that list as a JSON string); the image column, when the file has it, one
  image or a list of them. Image parts without a reference take the listed images in order (the
  layout of TRL's datasets); images left over are placed by ``<image>`` placeholders in the texts
  (ms-swift's layout, data_tools.importers.messages). Counts that do not match are
  ``placeholder_mismatch``.

Then the kind's rules and the driver's duplicate detection apply, as for a manifest line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial

from data_tools.build import BuildError, InputRecord, InputScan, RecordSource, process_input
from data_tools.importers import messages as messages_importer
from data_tools.importers.input_files import display_names, expand_pattern, files_fingerprint, jsonable
from data_tools.validation import Rejected

KINDS = ("image_text", "sft")
#: Rows converted to Python objects at a time (this many rows' images), and pyarrow's read buffer.
ROWS_PER_BATCH = 32
READ_BUFFER_BYTES = 1 << 20


def _medium(value: object, where: str, ref: str) -> tuple[str, bytes | None]:
    """(reference, bytes) of an image cell: bytes kept in memory under ``ref`` (or the struct's path),
    or (path, None) for a struct that only names a file. Raises Rejected."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ref, bytes(value)
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, (bytes, bytearray)) and data:
            return (path if isinstance(path, str) and path.strip() else ref), bytes(data)
        if isinstance(path, str) and path.strip():
            return path, None
        raise Rejected("invalid_fields", f"{where} has neither image bytes nor a path")
    if value is None:
        raise Rejected("invalid_fields", f"{where} is null")
    raise Rejected("invalid_fields", f"{where} must hold image bytes or a {{bytes, path}} struct, got {type(value).__name__}")


def translate_image_text(image_column: str, text_column: str, row: dict) -> tuple[dict, dict[str, bytes]]:
    """The ``build-image-text`` record of a row and its image bytes. Raises Rejected."""
    text = row["text"]
    if text is None:
        raise Rejected("invalid_fields", f"column {text_column!r} is null")
    if not isinstance(text, str):
        raise Rejected("invalid_fields", f"column {text_column!r} must hold a string, got {type(text).__name__}")
    ref, data = _medium(row["image"], f"column {image_column!r}", image_column)
    return {"image": ref, "text": text, "id": str(row["row"])}, ({ref: data} if data is not None else {})


def _drop_nulls(value: object) -> object:
    """Struct fields a part does not have come out of pyarrow as None (a text part has ``image: None``)."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _row_images(cells: list, image_column: str) -> tuple[list[str], dict[str, bytes]]:
    """The references of a row's image cells, in order, and the bytes of those held in memory. A
    struct naming a file keeps its path as reference (the same path twice is the same file); bytes
    under a name another cell of the row uses too (HF's ``Image`` often writes one ``path`` for every
    image) are numbered instead, ``<image_column>[i]``, since a reference in memory hides the file of
    that name. Raises Rejected."""
    parsed = [_medium(cell, f"column {image_column!r}[{i}]", f"{image_column}[{i}]") for i, cell in enumerate(cells)]
    files = {ref for ref, data in parsed if data is None}
    refs, media = [], {}
    for i, (ref, data) in enumerate(parsed):
        if data is not None:
            if ref in media or ref in files:
                ref = f"{image_column}[{i}]"
            media[ref] = data
        refs.append(ref)
    return refs, media


def translate_sft(messages_column: str, image_column: str, row: dict) -> tuple[dict, dict[str, bytes]]:
    """The ``build-sft`` record of a row and its images' bytes. Raises Rejected."""
    messages = row["messages"]
    where = f"column {messages_column!r}"
    if messages is None:
        raise Rejected("invalid_fields", f"{where} is null")
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise Rejected("malformed_json", f"{where}: not valid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(messages, list):
        raise Rejected("invalid_fields", f"{where} must hold a list of messages, got {type(messages).__name__}")
    messages = _drop_nulls(messages)
    cells = row.get("images")
    cells = [] if cells is None else cells if isinstance(cells, list) else [cells]
    refs, media = _row_images(cells, image_column)
    used = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") == "image" and "image" not in part:
                if used == len(refs):
                    raise Rejected("placeholder_mismatch", f"more image parts than the {len(refs)} images of column {image_column!r}")
                part["image"] = refs[used]
                used += 1
    record = {"id": str(row["row"]), "messages": messages, "images": refs[used:]}
    return messages_importer.translate(record), media


class ParquetSource(RecordSource):
    """The rows of the parquet files that ``pattern`` matches (a RecordSource of data_tools.build).

    ``kind``: "image_text" (``image_column`` and ``text_column``) or "sft" (``messages_column``, and
    ``image_column`` where a file has it)."""

    label = "import parquet"
    unit = "row"

    def __init__(self, pattern: str, kind: str, image_column: str, text_column: str | None = None,
                 messages_column: str | None = None):
        if kind not in KINDS:
            raise BuildError(f"--kind {kind!r}: import-parquet builds {' or '.join(KINDS)}")
        self.pattern, self.kind = pattern, kind
        if kind == "image_text":
            self.columns = {"image": image_column, "text": text_column}
            self.required = ("image", "text")
            translate = partial(translate_image_text, image_column, text_column)
        else:
            self.columns = {"messages": messages_column, "images": image_column}
            self.required = ("messages",)
            translate = partial(translate_sft, messages_column, image_column)
        self.process = partial(process_input, translate)

    def scan(self) -> InputScan:
        """Every file's footer: the columns must be there (a wrong column name stops the import before
        anything is written) and the row counts give the number of records."""
        import pyarrow.parquet as pq

        self.paths = expand_pattern(self.pattern, "--files")
        self.names = display_names(self.paths)
        rows = 0
        for path in self.paths:
            try:
                with pq.ParquetFile(path) as file:
                    names, num_rows = file.schema_arrow.names, file.metadata.num_rows
            except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not parquet
                raise BuildError(f"{path} is not a readable parquet file: {e}") from None
            for field in self.required:
                if self.columns[field] not in names:
                    raise BuildError(f"{path} has no column {self.columns[field]!r} (columns: {', '.join(names)})")
            rows += num_rows
        return InputScan({"parquet": files_fingerprint(self.paths, self.names), "columns": self.columns}, rows)

    def records(self) -> Iterator[tuple[int, InputRecord]]:
        import pyarrow.parquet as pq

        number = 0
        for path, name in zip(self.paths, self.names):
            # pyarrow's defaults (pre-buffering, threads reading ahead) hold ever more of the file: with
            # these, memory stays at about two row groups' worth of the columns read, whatever the file size
            # (benchmarks/bench_parquet_memory.py).
            with pq.ParquetFile(path, buffer_size=READ_BUFFER_BYTES, pre_buffer=False) as file:
                present = {field: column for field, column in self.columns.items() if column in file.schema_arrow.names}
                row = 0
                for group in range(file.num_row_groups):
                    for batch in file.iter_batches(batch_size=ROWS_PER_BATCH, row_groups=[group],
                                                   columns=list(present.values()), use_threads=False):
                        values = {field: batch.column(column).to_pylist() for field, column in present.items()}
                        for i in range(batch.num_rows):
                            number += 1
                            data = {"row": row, **dict.fromkeys(self.columns), **{f: v[i] for f, v in values.items()}}
                            yield number, InputRecord(name, data, str(path.parent))
                            row += 1

    def input_text(self, payload: InputRecord) -> str:
        row = {k: v for k, v in payload.data.items() if k != "row"}
        return json.dumps({"file": payload.name, "row": payload.data["row"], **jsonable(row)}, ensure_ascii=False)
