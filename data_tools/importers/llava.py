"""LLaVA-Instruct records (``import-llava``) -> ``build-sft`` records.

Input record (a JSONL line or an element of one JSON array)::

    {"id"?: str | int, "image"?: path | [path], "images"?: [path], "video"?: path | [path], "videos"?: [path],
     "conversations": [{"from": "human" | "gpt" | "system", "value": "...<image>..."}, ...]}

``from`` maps to the role (human -> user, gpt -> assistant, system -> system). Each ``<image>`` /
``<video>`` in the values is replaced, in order, by the next listed image / video as a content part at
the placeholder's place (data_tools.importers.placeholders; the newline LLaVA writes after
``<image>`` is dropped). A placeholder without its medium, or a medium without its placeholder, is a
``placeholder_mismatch`` rejection. Records without media are text-only conversations. Other fields
are ignored.
"""

from __future__ import annotations

from collections import Counter

from data_tools.importers.placeholders import check_all_used, expand, media_list
from data_tools.validation import Rejected, field, objects

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def translate(record: dict) -> dict:
    """The ``build-sft`` record of a LLaVA record. Raises Rejected."""
    conversations = field(record, "conversations", list)
    listed = {"image": media_list(record, ("image", "images")), "video": media_list(record, ("video", "videos"))}
    used: Counter = Counter()
    messages = []
    for _, where, turn in objects(conversations, "conversations"):
        speaker = field(turn, "from", str, where)
        if speaker not in ROLES:
            raise Rejected("invalid_fields", f"{where}.from must be one of {list(ROLES)}, got {speaker!r}")
        messages.append({"role": ROLES[speaker], "content": expand(field(turn, "value", str, where), listed, used)})
    check_all_used(listed, used)
    out = {"messages": messages}
    if "id" in record:
        out["id"] = record["id"]
    return out
