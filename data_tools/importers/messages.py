"""Chat "messages" records (``import-messages``: Qwen fine-tuning examples, ms-swift) -> ``build-sft`` records.

Input record (a JSONL line or an element of one JSON array)::

    {"id"?: str | int, "messages": [{"role": "system" | "user" | "assistant",
                                     "content": str | [{"type": "text", "text": str} | {"type": "image", "image": path}
                                                      | {"type": "video", "video": path}],
                                     "loss"?: bool}, ...],
     "images"?: [path], "videos"?: [path]}

Typed image/video parts are taken as they are (Qwen's layout); ``file://`` paths become plain paths.
ms-swift's top-level ``images`` / ``videos`` lists are placed by the ``<image>`` / ``<video>``
placeholders in the texts, in order, as in data_tools.importers.llava (a mismatch is a
``placeholder_mismatch`` rejection). Roles, system prompts and turns are kept as given; the
``build-sft`` rules then apply. Other fields of the record are ignored; a message's keys are passed on
as they are, so ms-swift's ``"loss": false`` (an assistant turn kept as context, not trained) works as
in a native manifest, and any other message key is rejected there (data_tools.kinds.sft) rather than
dropped with what it meant.
"""

from __future__ import annotations

from collections import Counter

from data_tools.importers.placeholders import check_all_used, expand, local_path, media_list
from data_tools.validation import field, objects


def _content(content: str | list, listed: dict, used: Counter, where: str) -> str | list:
    if isinstance(content, str):
        return expand(content, listed, used)
    items: list = []
    for j, item in enumerate(content):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text" and isinstance(item.get("text"), str):
            expanded = expand(item["text"], listed, used)
            items.extend([item] if isinstance(expanded, str) else expanded)
        elif kind in ("image", "video"):
            items.append({**item, kind: local_path(item.get(kind), f"{where}.content[{j}].{kind}")})
        else:
            items.append(item)  # the build-sft rules reject it, with their reason
    return items


def translate(record: dict) -> dict:
    """The ``build-sft`` record of a chat "messages" record. Raises Rejected."""
    messages = field(record, "messages", list)
    listed = {"image": media_list(record, ("images",)), "video": media_list(record, ("videos",))}
    used: Counter = Counter()
    out = []
    for _, where, message in objects(messages, "messages"):
        content = field(message, "content", (str, list), where)
        out.append({**message, "content": _content(content, listed, used, where)})
    check_all_used(listed, used)
    # Only the build-sft keys: the kind rejects any other (a native manifest's misspelt key), while an
    # imported record's other fields (ms-swift's media lists, a dataset's own columns) are ignored.
    translated = {"messages": out}
    if "id" in record:
        translated["id"] = record["id"]
    return translated
