"""Supervised fine-tuning conversations.

Manifest line: ``{"id"?: str, "messages": [{"role": "system"|"user"|"assistant", "content": str |
[{"type": "text", "text": str} | {"type": "image", "image": path} | {"type": "video", "video": path}]}]}``.

Rules: a system message only first; at least one user and one assistant message; images and videos
only in user messages (the chat template places media in user turns only: the model does not generate
media, and a system prompt is text); no empty content. A string content becomes one text part in the
stored sample. Any top-level key other than ``id`` and ``messages`` is rejected (a misspelt key must
not silently drop data).
"""

from __future__ import annotations

from data_tools.sample_media import LineContext, LineSamples, SampleMedia, prepare
from data_tools.schema import ROLES, Message, Part, SftSample, Source, sample_key
from data_tools.validation import (Rejected, check_joined_texts, check_keys, check_text, check_total_text, field, objects,
                                   source_id)

#: The keys of a manifest line.
KEYS = ("id", "messages")
#: The one role whose messages may hold images and videos (common.tokens.chat_template).
MEDIA_ROLE = "user"


def _content_items(message: dict, where: str) -> list[dict]:
    content = field(message, "content", (str, list), where)
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not content:
        raise Rejected("invalid_fields", f"{where}.content is empty")
    for _, iw, item in objects(content, f"{where}.content"):
        kind = field(item, "type", str, iw)
        if kind not in ("text", "image", "video"):
            raise Rejected("invalid_fields", f"{iw}.type must be text, image or video, got {kind!r}")
        field(item, kind, str, iw)
    return content


def check_messages(record: dict) -> list[tuple[str, list[dict]]]:
    """The ``messages`` of a line as ``[(role, content items)]`` after every field and text check (no file
    is opened): roles in ROLES, a system message only first, media only in user messages, no empty
    content or text. Shared with data_tools.kinds.rl (and so with every importer: they translate into
    these records). Raises Rejected."""
    messages = field(record, "messages", list)
    if not messages:
        raise Rejected("invalid_fields", "'messages' is empty")
    checked: list[tuple[str, list[dict]]] = []
    for i, where, message in objects(messages, "messages"):
        role = field(message, "role", str, where)
        if role not in ROLES:
            raise Rejected("invalid_fields", f"{where}.role must be one of {list(ROLES)}, got {role!r}")
        if role == "system" and i != 0:
            raise Rejected("invalid_fields", f"{where}: a system message may only come first")
        items = _content_items(message, where)
        run: list[tuple[str, str]] = []  # consecutive text items: the chat template joins them
        for j, item in enumerate(items):
            if item["type"] == "text":
                run.append((check_text(item["text"], f"{where}.content[{j}].text"), f"{where}.content[{j}].text"))
                continue
            if role != MEDIA_ROLE:  # the chat template refuses media elsewhere: the sample would never train
                raise Rejected("invalid_fields", f"{where} ({role}): content[{j}] is {item['type']} content, which is "
                                                 f"only allowed in {MEDIA_ROLE} messages")
            check_joined_texts(run)
            run = []
        check_joined_texts(run)
        checked.append((role, items))
    return checked


def message_texts(checked: list[tuple[str, list[dict]]]) -> list[str]:
    """Every text of checked messages (for the --max-text-chars rule)."""
    return [it["text"] for _, items in checked for it in items if it["type"] == "text"]


def store_messages(checked: list[tuple[str, list[dict]]], media: SampleMedia) -> tuple[Message, ...]:
    """Checked messages as schema Messages, their media validated and stored in ``media``. Raises Rejected."""
    out = []
    for i, (role, items) in enumerate(checked):
        parts = []
        for j, item in enumerate(items):
            where = f"messages[{i}].content[{j}].{item['type']}"
            if item["type"] == "text":
                parts.append(Part(type="text", text=item["text"]))
            elif item["type"] == "image":
                parts.append(Part(type="image", image=media.image(item["image"], where)))
            else:
                parts.append(Part(type="video", video=media.video(item["video"], where)))
        out.append(Message(role=role, content=tuple(parts)))
    return tuple(out)


def make_samples(record: dict, ctx: LineContext) -> LineSamples:
    """One sample (and the sha256 of its source media). Raises Rejected."""
    check_keys(record, KEYS, "an SFT line")
    ident = source_id(record)
    checked = check_messages(record)  # all field and text checks before any file is opened
    roles = {role for role, _ in checked}
    if "user" not in roles or "assistant" not in roles:
        raise Rejected("invalid_fields", "a conversation needs at least one user and one assistant message")
    check_total_text(message_texts(checked), ctx.config.max_text_chars)
    media = SampleMedia(ctx)
    messages = store_messages(checked, media)
    sample = SftSample(
        key=sample_key(ctx.line), source=Source(ctx.line, ctx.manifest_name, ident), media=tuple(media.infos),
        messages=messages,
    )
    return LineSamples([prepare(sample, media.members)], media.source_digests)
