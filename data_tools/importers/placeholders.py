"""``<image>`` / ``<video>`` placeholders in text, matched in order to a record's list of media paths.

LLaVA and ms-swift keep the media of a sample in top-level lists and mark where each one goes with a
placeholder in the conversation's text: the n-th ``<image>`` of the conversation (messages in order)
is the n-th listed image, and the same for ``<video>``. :func:`expand` cuts a text at its placeholders
into native content parts; :func:`check_all_used` then proves the counts match one to one.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping

from data_tools.validation import Rejected

PLACEHOLDERS = {"<image>": "image", "<video>": "video"}
_SPLIT = re.compile("(" + "|".join(map(re.escape, PLACEHOLDERS)) + ")")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_NEWLINES = "\r\n"


def local_path(value: object, where: str) -> object:
    """A media path as the build reads it: ``file://`` dropped; a URL is rejected (no download here).
    Values that are not strings are returned as they are (the kind's checks reject them)."""
    if not isinstance(value, str):
        return value
    if value.startswith("file://"):
        return value[len("file://") :]
    if _URL.match(value):
        raise Rejected("invalid_fields", f"{where} {value!r} is a URL: only local files are read, download the media first")
    return value


def media_list(record: Mapping, names: tuple[str, ...]) -> list[str]:
    """The media paths of the first of ``names`` the record has (a path or a list of paths; null or
    absent: none). Two of them at once is ambiguous. Raises Rejected."""
    given = [name for name in names if record.get(name) is not None]
    if not given:
        return []
    if len(given) > 1:
        raise Rejected("invalid_fields", f"fields {given} are all given; use one of them")
    name = given[0]
    value = record[name]
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise Rejected("invalid_fields", f"field {name!r} must be a path or a list of paths, got {value!r:.80}")
    return [local_path(p, f"{name}[{i}]") for i, p in enumerate(paths)]


def expand(text: str, listed: Mapping[str, list[str]], used: Counter) -> str | list[dict]:
    """``text`` as native content: itself when it holds no placeholder, else the list of its text and
    media parts in order. A placeholder takes the next unused path of ``listed[kind]`` (``used`` counts
    them; one past the end is only counted, for :func:`check_all_used`). The newlines next to a
    placeholder (LLaVA writes ``"<image>\\n"``) are dropped, and so are pieces left blank."""
    pieces = _SPLIT.split(text)
    if len(pieces) == 1:
        return text
    parts: list[dict] = []
    for k, piece in enumerate(pieces):
        if k % 2:  # a placeholder
            kind = PLACEHOLDERS[piece]
            if used[kind] < len(listed[kind]):
                parts.append({"type": kind, kind: listed[kind][used[kind]]})
            used[kind] += 1
            continue
        if k > 0:
            piece = piece.lstrip(_NEWLINES)
        if k < len(pieces) - 1:
            piece = piece.rstrip(_NEWLINES)
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts


def check_all_used(listed: Mapping[str, list[str]], used: Counter) -> None:
    """Every listed medium had its placeholder and every placeholder its medium. Raises Rejected."""
    for placeholder, kind in PLACEHOLDERS.items():
        if used[kind] != len(listed[kind]):
            raise Rejected(
                "placeholder_mismatch",
                f"{used[kind]} {placeholder} placeholders in the text but {len(listed[kind])} {kind}s listed",
            )
