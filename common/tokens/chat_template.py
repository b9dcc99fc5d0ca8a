"""The Qwen3-VL chat template, rendered by plain Python (no Jinja) into typed segments.

It reproduces the official Qwen3-VL Instruct ``chat_template`` (tokenizer_config / chat_template.json of
the published checkpoints) for system, user and assistant messages with text, image and video content:

    <|im_start|>system\\n{system text}<|im_end|>\\n          (only if messages[0] is a system message)
    <|im_start|>user\\n{text and <|vision_start|><|image_pad|><|vision_end|> ...}<|im_end|>\\n
    <|im_start|>assistant\\n{text}<|im_end|>\\n
    <|im_start|>assistant\\n                                (add_generation_prompt)

A message is ``{"role": "system" | "user" | "assistant", "content": str | list[item], "loss"?: bool}`` where an item is
``{"type": "text", "text": str}``, ``{"type": "image", "image": <any>}`` or ``{"type": "video",
"video": <any>}`` (the official template's detection rules: an item with an ``image``/``image_url`` key
or type ``image`` is an image, then ``video``, then ``text``). Where the official template silently
drops content (a system message after the first, media in system/assistant turns, unknown items) this
module raises ``ValueError`` instead: that content would otherwise vanish from training data. Tool
calls and the ``tool`` role are not supported.

:func:`chat_segments` is what the sample encoder consumes: each segment says whether it is template
markup, content text, or a media placeholder, and whether it is an SFT target (assistant content and
its closing ``<|im_end|>``). ``loss`` is ms-swift's per-message flag, which the official template
ignores (the rendered text is the same): ``False`` on an assistant message keeps the turn as context
but not as a target; ``True``, ``None`` or absent: a target. It is a bool on assistant messages only
(elsewhere, or of another type, a ``ValueError``: only assistant turns are ever targets).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from common.tokens.tokenizer import IM_END, IM_START, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END
VIDEO_PLACEHOLDER = VISION_START + VIDEO_PAD + VISION_END
ROLES = ("system", "user", "assistant")
#: The published Qwen3-VL Instruct ``chat_template`` (Jinja), byte for byte: what this module reproduces
#: (tests/data/test_chat_template.py renders both), and what an export that has none carries
#: (``model.convert``), so that transformers' processors format chats as training did.
OFFICIAL_TEMPLATE_FILE = Path(__file__).with_name("qwen3_vl_chat_template.jinja")


@dataclass(frozen=True)
class ChatSegment:
    """One piece of a rendered conversation.

    kind: "special" (one special token string, e.g. ``<|im_start|>``), "text" (template text such as
        ``"user\\n"`` or message content), "image" or "video" (the media object is ``media``).
    text: the string for "special" and "text"; the official placeholder for "image"/"video".
    target: True for SFT targets (assistant content and its ``<|im_end|>``, unless the message has
        ``"loss": False``).
    is_content: True for text written by the data (checked for reserved tokens), False for template text.
    index: for media, the 0-based index among media of the same kind in the conversation.
    """

    kind: Literal["special", "text", "image", "video"]
    text: str
    target: bool = False
    is_content: bool = False
    media: Any = None
    index: int = -1


def _content_items(content: Any, where: str) -> list[Mapping]:
    if not isinstance(content, Sequence) or isinstance(content, (str, bytes)):
        raise ValueError(f"{where}: content must be a str or a list of items, got {type(content).__name__}")
    for i, item in enumerate(content):
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: content item {i} must be a dict, got {type(item).__name__}")
    return list(content)


def _item_kind(item: Mapping, where: str) -> str:
    """The official template's order of tests: image, then video, then text."""
    if item.get("type") == "image" or "image" in item or "image_url" in item:
        return "image"
    if item.get("type") == "video" or "video" in item:
        return "video"
    if "text" in item:
        if not isinstance(item["text"], str):
            raise ValueError(f"{where}: text item must hold a str, got {type(item['text']).__name__}")
        return "text"
    raise ValueError(f"{where}: content item {dict(item)!r} is neither text, image nor video")


def _text_only(content: Any, where: str) -> str:
    """System and assistant content: a str, or the concatenated text items (media is an error)."""
    if isinstance(content, str):
        return content
    parts = []
    for item in _content_items(content, where):
        kind = _item_kind(item, where)
        if kind != "text":
            raise ValueError(f"{where}: {kind} content is only allowed in user messages")
        parts.append(item["text"])
    return "".join(parts)


def _is_target(message: Mapping, role: str, where: str) -> bool:
    """Whether a message's content and ``<|im_end|>`` are SFT targets: an assistant message unless its
    ``loss`` is False. Raises ValueError for a ``loss`` that is not a bool, or on another role."""
    loss = message.get("loss")
    if loss is None:
        return role == "assistant"
    if not isinstance(loss, bool):
        raise ValueError(f"{where}: 'loss' must be a bool, got {type(loss).__name__}")
    if role != "assistant":
        raise ValueError(f"{where}: only assistant messages are SFT targets and take 'loss'")
    return loss


def chat_segments(
    messages: Sequence[Mapping], *, add_generation_prompt: bool = False, add_vision_id: bool = False
) -> list[ChatSegment]:
    """Render ``messages`` with the Qwen3-VL template into segments (see the module docstring)."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    segments: list[ChatSegment] = []
    counts = {"image": 0, "video": 0}

    def special(token: str, target: bool = False):
        segments.append(ChatSegment("special", token, target=target))

    def text(value: str, target: bool = False, is_content: bool = False):
        if value:
            segments.append(ChatSegment("text", value, target=target, is_content=is_content))

    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: must be a dict with 'role' and 'content'")
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"{where}: role {role!r} is not supported (use one of {ROLES})")
        if message.get("tool_calls"):
            raise ValueError(f"{where}: tool_calls are not supported")
        where = f"message {i} ({role})"
        target = _is_target(message, role, where)
        if role == "system":
            if i != 0:
                raise ValueError(f"{where}: a system message must be the first message")
            special(IM_START)
            text("system\n")
            text(_text_only(message["content"], where), is_content=True)
            special(IM_END)
            text("\n")
        elif role == "user":
            special(IM_START)
            text("user\n")
            content = message["content"]
            if isinstance(content, str):
                text(content, is_content=True)
            else:
                for item in _content_items(content, where):
                    kind = _item_kind(item, where)
                    if kind == "text":
                        text(item["text"], is_content=True)
                        continue
                    counts[kind] += 1
                    if add_vision_id:
                        text(f"{'Picture' if kind == 'image' else 'Video'} {counts[kind]}: ")
                    media = item.get(kind, item.get("image_url")) if kind == "image" else item.get("video")
                    placeholder = IMAGE_PLACEHOLDER if kind == "image" else VIDEO_PLACEHOLDER
                    segments.append(ChatSegment(kind, placeholder, media=media, index=counts[kind] - 1))
            special(IM_END)
            text("\n")
        else:  # assistant
            special(IM_START)
            text("assistant\n")
            text(_text_only(message["content"], where), target=target, is_content=True)
            special(IM_END, target=target)
            text("\n")
    if add_generation_prompt:
        special(IM_START)
        text("assistant\n")
    return segments


def render_chat(messages: Sequence[Mapping], *, add_generation_prompt: bool = False, add_vision_id: bool = False) -> str:
    """The conversation as the official template renders it (media as ``<|vision_start|><|..._pad|><|vision_end|>``)."""
    return "".join(
        seg.text for seg in chat_segments(messages, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)
    )
