"""Read the records of an input file that is one JSON array (``[{...}, {...}]``), streaming.

Datasets such as LLaVA-Instruct ship as one JSON array rather than JSONL. The build driver reads both
(:func:`data_tools.build.iter_manifest`): a file whose first non-blank character is ``[`` is an array,
and its elements take the place of manifest lines: element ``n`` (1-based) is "line" ``n`` in sample
keys, ``source.line``, ``rejected.jsonl`` and ``--resume``, and its text, exactly as written in the
file, is what a worker parses and what ``rejected.jsonl`` records as the input.

The file is read in chunks and never held whole in memory (LLaVA-665K is 1 GB). Unlike a JSONL file,
an array cannot be read past a syntax error (where the next element starts is unknown), so a
malformed array is an error for the whole file (:class:`JsonArrayError`), raised by the first pass
(the build's scan) before anything is written.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path

#: Characters read per refill; a refill reads at least as much as is buffered (so an element larger
#: than a chunk costs a logarithmic number of re-parses, not a linear one).
CHUNK_CHARS = 1 << 20
_WHITESPACE = " \t\r\n"


class JsonArrayError(ValueError):
    """A file that starts like a JSON array but is not one (the message names the element and the error)."""


def is_json_array(path: Path) -> bool:
    """Whether the first non-whitespace character of ``path`` (after a UTF-8 BOM) is ``[``."""
    with open(path, "rb") as f:
        head = f.read(4096)
        while head:
            text = head.removeprefix(codecs.BOM_UTF8).lstrip(_WHITESPACE.encode())
            if text:
                return text.startswith(b"[")
            head = f.read(4096)  # a file that starts with a lot of whitespace
    return False


class _Buffer:
    """Decoded text of a file read chunk by chunk: ``text[pos:]`` is what is not consumed yet."""

    def __init__(self, f):
        self.f = f
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.text = ""
        self.pos = 0
        self.eof = False

    def more(self) -> bool:
        """Read more text; False at the end of the file."""
        if self.eof:
            return False
        want = max(CHUNK_CHARS, len(self.text) - self.pos)
        raw = self.f.read(want)
        try:
            chunk = self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            raise JsonArrayError(f"not valid UTF-8 near byte {self.f.tell() - len(raw) + e.start}") from None
        self.text = self.text[self.pos :] + chunk
        self.pos = 0
        self.eof = not raw
        return True

    def next_char(self) -> str:
        """The next non-whitespace character (not consumed), or "" at the end of the file."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return ""


def iter_json_array(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based position, the element's text as UTF-8 bytes) of every element of the JSON array in
    ``path``. Raises JsonArrayError where the file stops being a JSON array."""
    decoder = json.JSONDecoder()
    with open(path, "rb") as f:
        buf = _Buffer(f)
        if buf.next_char() != "[":
            raise JsonArrayError("does not start with '['")
        buf.pos += 1
        position = 0
        while True:
            char = buf.next_char()
            if char == "]" and position == 0:
                buf.pos += 1
                break
            if char == "":
                raise JsonArrayError(f"ends inside the array, after element {position}")
            position += 1
            while True:
                try:
                    _, end = decoder.raw_decode(buf.text, buf.pos)
                except json.JSONDecodeError as e:
                    if buf.more():
                        continue  # the element may go on past what is read
                    raise JsonArrayError(f"element {position} is not valid JSON: {e.msg}") from None
                except RecursionError:
                    raise JsonArrayError(f"element {position} is nested too deeply") from None
                if end == len(buf.text) and buf.more():
                    continue  # a number or literal cut by the chunk end may go on
                break
            yield position, buf.text[buf.pos : end].encode("utf-8")
            buf.pos = end
            char = buf.next_char()
            buf.pos += 1
            if char == "]":
                break
            if char != ",":
                found = repr(char) if char else "the end of the file"
                raise JsonArrayError(f"expected ',' or ']' after element {position}, found {found}")
            if buf.next_char() == "]":
                raise JsonArrayError(f"a comma after the last element ({position}) is not JSON")
        if buf.next_char() != "":
            raise JsonArrayError("holds more than one JSON value (text after the closing ']')")
