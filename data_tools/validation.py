"""Input validation shared by every build command: rejection reasons, manifest field and text rules.

Every rejected manifest line gets exactly one reason code from ``REASONS`` (recorded in
``rejected.jsonl`` with a sentence naming the field or file and what is wrong). Media checks live in
``common.media.decode`` (their ``MediaError.reason`` codes are reused as they are) and
``data_tools.sample_media``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping

from common.tokens.tokenizer import SPECIAL_TOKENS, tokens_across_pieces

#: Reason code -> what it means. The order is the order of the end-of-build summary.
REASONS: dict[str, str] = {
    "invalid_utf8": "the line, or a string in it, is not valid UTF-8",
    "malformed_json": "the line is not one JSON value",
    "invalid_fields": "a field is missing, has the wrong type or a value outside its allowed set",
    "placeholder_mismatch": "the <image>/<video> placeholders in the text do not match the listed media one to one",
    "empty_text": "a text is empty or only whitespace",
    "text_too_long": "the sample's text is longer than --max-text-chars",
    "special_token": "a text contains a chat/vision control token such as <|im_start|> (or texts read as one form one)",
    "missing_file": "a media file does not exist",
    "unreadable_file": "a media file cannot be read",
    "image_decode_error": "an image cannot be decoded completely",
    "decompression_bomb": "an image has more pixels than --max-pixels",
    "image_too_small": "an image side, or a video frame side, is below 28 pixels",
    "aspect_ratio": "an image's or a video frame's long side is more than 200 times its short side",
    "video_decode_error": "a video cannot be decoded (neither decord nor PyAV), or not all its frames can (a truncated file)",
    "no_usable_frames": "a video gives no frame at the sampling rate",
    "invalid_media": "a medium is unusable for another reason",
    "caption_out_of_range": "a caption's times are not inside the video",
    "duplicate_media": "a medium has the same bytes (sha256) as one in an earlier accepted sample",
    "worker_crash": "validating the line killed the worker process (decoder crash, out of memory)",
}
# A bug (any exception other than Rejected) is not a rejection reason: the build records it apart, in
# internal_errors.jsonl, and exits non-zero (data_tools.build).

_SPECIAL_STRINGS = tuple(token for token, _ in SPECIAL_TOKENS)


class Rejected(Exception):
    """A manifest line that cannot become a sample: ``reason`` (a key of REASONS) and ``detail`` (words)."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:  # a bug in the code raising it, reported as an internal error
            raise ValueError(f"Rejected with unknown reason {reason!r} (detail: {detail})")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_line(raw: bytes) -> str:
    """The text of a manifest line (bytes without the newline). Raises Rejected("invalid_utf8")."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected("invalid_utf8", f"byte {e.start} of the line is not valid UTF-8 ({e.reason})") from None


def parse_record(text: str) -> dict:
    """The JSON object of a manifest line. Raises Rejected (malformed_json, invalid_fields)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise Rejected("malformed_json", f"not valid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise Rejected("malformed_json", "JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise Rejected("invalid_fields", f"the line must be a JSON object, got a JSON {type(value).__name__}")
    return value


def field(record: Mapping, name: str, types: type | tuple[type, ...], where: str = "", *, optional: bool = False):
    """``record[name]`` checked against ``types`` (bools never count as numbers). Raises Rejected."""
    label = f"{where}.{name}" if where else name
    if name not in record or record[name] is None:
        if optional:
            return None
        raise Rejected("invalid_fields", f"missing field {label!r}")
    value = record[name]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise Rejected("invalid_fields", f"field {label!r} must be {names}, got {type(value).__name__}")
    return value


def check_keys(record: Mapping, known: tuple[str, ...], what: str, where: str = "") -> None:
    """Reject a manifest record with a key outside ``known`` (``what`` names the record, as in "a video
    line"; ``where``, for a nested object, its path, as in ``"messages[2]"``, which prefixes the keys
    named): a misspelt optional field (``"caption"`` for ``"captions"``) would otherwise be ignored and
    its data silently lost. Raises Rejected("invalid_fields") naming the unknown keys and the known ones."""
    unknown = sorted(set(record) - set(known))
    if unknown:
        named = [f"{where}.{key}" for key in unknown] if where else unknown
        raise Rejected("invalid_fields", f"unknown field(s) {named}; {what} has {list(known)}")


def objects(items: list, where: str) -> Iterator[tuple[int, str, dict]]:
    """``(i, "where[i]", item)`` for each item of a JSON list that must hold objects. Raises Rejected
    at the first item that is not one."""
    for i, item in enumerate(items):
        label = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise Rejected("invalid_fields", f"{label} must be an object, got {type(item).__name__}")
        yield i, label, item


def number(record: Mapping, name: str, where: str = "") -> float:
    """A finite number field (int or float, not bool). Raises Rejected."""
    value = field(record, name, (int, float), where)
    if not math.isfinite(value):
        raise Rejected("invalid_fields", f"field {where}.{name} must be a finite number, got {value}")
    return float(value)


def check_text(value: object, where: str) -> str:
    """A usable text: a string, valid UTF-8 (no lone surrogates from ``\\ud800`` escapes), not blank,
    without chat/vision control tokens. Raises Rejected."""
    if not isinstance(value, str):
        raise Rejected("invalid_fields", f"{where} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Rejected("invalid_utf8", f"{where} contains {value[e.start]!r}, a lone surrogate that is not valid UTF-8") from None
    if not value.strip():
        raise Rejected("empty_text", f"{where} is empty")
    for token in _SPECIAL_STRINGS:
        if token in value:
            raise Rejected("special_token", f"{where} contains the control token {token}")
    return value


def check_joined_texts(pieces: list[tuple[str, str]]) -> None:
    """Consecutive texts that are read as one (``(text, where)`` each, each through :func:`check_text`):
    an interleaved document's text segments with no image between them, one message's text items. A
    control token may not form across their boundaries either (``"<|im_"`` + ``"end|>"``). Raises Rejected."""
    for token, first, last in tokens_across_pieces([text for text, _ in pieces], _SPECIAL_STRINGS):
        raise Rejected("special_token", f"{pieces[first][1]} and {pieces[last][1]} join into the control "
                                        f"token {token}")


def check_total_text(texts: list[str], max_chars: int) -> None:
    total = sum(len(t) for t in texts)
    if total > max_chars:
        raise Rejected("text_too_long", f"{total} characters of text, more than --max-text-chars {max_chars}")


def source_id(record: Mapping) -> str | None:
    """The optional ``id`` of a line (a string; an integer is accepted and written as a string)."""
    value = field(record, "id", (str, int), optional=True)
    if value is None:
        return None
    value = str(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected("invalid_utf8", "id contains a lone surrogate that is not valid UTF-8") from None
    return value or None
