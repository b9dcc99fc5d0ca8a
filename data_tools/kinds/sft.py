"""Supervised fine-tuning conversations.

Manifest line: ``{"id"?: str, "messages": [{"role": "system"|"user"|"assistant", "content": str |
[{"type": "text", "text": str} | {"type": "image", "image": path} | {"type": "video", "video": path}],
"loss"?: bool}]}``.

Rules: a system message only first; at least one user and one assistant message; images and videos
only in user messages (the chat template places media in user turns only: the model does not generate
media, and a system prompt is text); no empty content. A string content becomes one text part in the
stored sample. Any top-level key other than ``id`` and ``messages``, and any message key other than
``role``, ``content`` and ``loss``, is rejected (a misspelt key must not silently drop data).

``loss`` (ms-swift's per-message flag) is a JSON boolean allowed on assistant messages only (on another
role, or of another type, it is rejected; ``null`` is the same as absent): ``false`` keeps the turn as
context but makes neither its content nor its ``<|im_end|>`` an SFT target; ``true`` or absent: a target,
as every assistant turn is by default. A conversation whose every assistant turn has ``loss: false`` has
no target and is rejected (``invalid_fields``), as one without an assistant turn is. The stored Message
carries it (``data_tools.schema.Message.loss``, in the JSON only when false).
"""

from __future__ import annotations

from typing import NamedTuple

from data_tools.sample_media import LineContext, LineSamples, SampleMedia, prepare
from data_tools.schema import ROLES, Message, Part, SftSample, Source, sample_key
from data_tools.validation import (Rejected, check_joined_texts, check_keys, check_text, check_total_text, field, objects,
                                   source_id)

#: The keys of a manifest line.
KEYS = ("id", "messages")
#: The keys of a message of its ``messages``.
MESSAGE_KEYS = ("role", "content", "loss")
#: The one role whose messages may hold images and videos (common.tokens.chat_template).
MEDIA_ROLE = "user"
#: The one role whose messages are SFT targets, and so the one whose messages may set ``loss``.
TARGET_ROLE = "assistant"


class CheckedMessage(NamedTuple):
    """A message after every field and text check: its role, its content items (a string content as one
    text item) and ``loss``: False only for an assistant turn marked ``"loss": false`` (not an SFT target),
    True otherwise (an assistant turn is then a target; other roles never are)."""

    role: str
    items: list[dict]
    loss: bool


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


def _loss(message: dict, role: str, where: str) -> bool:
    """Whether a checked message is an SFT target: its ``loss``, a bool set on assistant messages only
    (absent or null: True). Raises Rejected."""
    loss = field(message, "loss", bool, where, optional=True)
    if loss is None:
        return True
    if role != TARGET_ROLE:  # only assistant turns are targets: the flag would mean nothing, or a misplaced turn
        raise Rejected("invalid_fields", f"{where}.loss: only {TARGET_ROLE} messages are SFT targets and take 'loss', "
                                         f"this one is a {role} message")
    return loss


def check_messages(record: dict) -> list[CheckedMessage]:
    """The ``messages`` of a line after every field and text check (no file is opened): only
    MESSAGE_KEYS, roles in ROLES, a system message only first, media only in user messages, no empty
    content or text, ``loss`` a bool on assistant messages only. Shared with data_tools.kinds.rl (and so
    with every importer: they translate into these records). Raises Rejected."""
    messages = field(record, "messages", list)
    if not messages:
        raise Rejected("invalid_fields", "'messages' is empty")
    checked: list[CheckedMessage] = []
    for i, where, message in objects(messages, "messages"):
        check_keys(message, MESSAGE_KEYS, "a message", where)
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
        checked.append(CheckedMessage(role, items, _loss(message, role, where)))
    return checked


def message_texts(checked: list[CheckedMessage]) -> list[str]:
    """Every text of checked messages (for the --max-text-chars rule)."""
    return [it["text"] for message in checked for it in message.items if it["type"] == "text"]


def store_messages(checked: list[CheckedMessage], media: SampleMedia) -> tuple[Message, ...]:
    """Checked messages as schema Messages, their media validated and stored in ``media``. Raises Rejected."""
    out = []
    for i, (role, items, loss) in enumerate(checked):
        parts = []
        for j, item in enumerate(items):
            where = f"messages[{i}].content[{j}].{item['type']}"
            if item["type"] == "text":
                parts.append(Part(type="text", text=item["text"]))
            elif item["type"] == "image":
                parts.append(Part(type="image", image=media.image(item["image"], where)))
            else:
                parts.append(Part(type="video", video=media.video(item["video"], where)))
        out.append(Message(role=role, content=tuple(parts), loss=loss))
    return tuple(out)


def make_samples(record: dict, ctx: LineContext) -> LineSamples:
    """One sample (and the sha256 of its source media). Raises Rejected."""
    check_keys(record, KEYS, "an SFT line")
    ident = source_id(record)
    checked = check_messages(record)  # all field and text checks before any file is opened
    roles = {message.role for message in checked}
    if "user" not in roles or TARGET_ROLE not in roles:
        raise Rejected("invalid_fields", "a conversation needs at least one user and one assistant message")
    if not any(message.loss for message in checked if message.role == TARGET_ROLE):  # the loader could not train it
        raise Rejected("invalid_fields", "every assistant message has \"loss\": false: the conversation has no SFT target")
    check_total_text(message_texts(checked), ctx.config.max_text_chars)
    media = SampleMedia(ctx)
    messages = store_messages(checked, media)
    sample = SftSample(
        key=sample_key(ctx.line), source=Source(ctx.line, ctx.manifest_name, ident), media=tuple(media.infos),
        messages=messages,
    )
    return LineSamples([prepare(sample, media.members)], media.source_digests)
