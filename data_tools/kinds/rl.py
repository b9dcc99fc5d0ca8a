"""Prompts for RL post-training: the SFT message format without the assistant turn, plus a reference answer.

Manifest line: ``{"id"?: str, "messages": [{"role": "system"|"user", "content": str | [{"type": "text",
"text": str} | {"type": "image", "image": path} | {"type": "video", "video": path}]}], "answer": str |
null, "reward"?: str}``.

Rules: the messages follow data_tools.kinds.sft's rules (same checks, same reasons: images and videos
only in user messages, a system message only first) but hold no assistant turn (the policy writes it)
and end with a user turn; ``answer`` must be present, a usable text (not blank, no control token) or
null for a prompt without a reference; ``reward`` (default ``"exact_match"``) is the name of the reward
that scores the responses, an identifier such as ``exact_match``: data_tools stores it as given, the
trainer checks that such a reward is registered.
Any other key is rejected (a misspelt ``"answers"`` must not silently leave a prompt without its
reference). ``loss``, SFT's per-message flag, is rejected too, by the shared rule that only assistant
messages take it: a prompt has none, and nothing of a prompt is a target (the policy's response is
what the RL loss scores), so a prompt set marked with it was meant for something else.
"""

from __future__ import annotations

import re

from data_tools.kinds.sft import check_messages, message_texts, store_messages
from data_tools.sample_media import LineContext, LineSamples, SampleMedia, prepare
from data_tools.schema import RlSample, Source, sample_key
from data_tools.validation import Rejected, check_keys, check_text, check_total_text, field, source_id

DEFAULT_REWARD = "exact_match"
KEYS = ("id", "messages", "answer", "reward")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _reward(record: dict) -> str:
    if "reward" not in record:
        return DEFAULT_REWARD
    reward = field(record, "reward", str)
    if not _IDENTIFIER.fullmatch(reward):
        raise Rejected("invalid_fields",
                       f"field 'reward' must name a reward, an identifier such as {DEFAULT_REWARD!r}, got {reward!r}")
    return reward


def make_samples(record: dict, ctx: LineContext) -> LineSamples:
    """One sample (and the sha256 of its source media). Raises Rejected."""
    check_keys(record, KEYS, "an RL prompt line")
    ident = source_id(record)
    checked = check_messages(record)
    for i, message in enumerate(checked):
        if message.role == "assistant":
            raise Rejected("invalid_fields", f"messages[{i}]: an RL prompt has no assistant turn (the policy writes it)")
    if checked[-1].role != "user":
        raise Rejected("invalid_fields", "an RL prompt must end with a user message")
    if "answer" not in record:
        raise Rejected("invalid_fields", "missing field 'answer' (a string, or null for a prompt without a reference)")
    answer = record["answer"]
    if answer is not None:
        if not isinstance(answer, str):
            raise Rejected("invalid_fields", f"field 'answer' must be a string or null, got {type(answer).__name__}")
        check_text(answer, "answer")
    reward = _reward(record)
    check_total_text(message_texts(checked) + ([answer] if answer else []), ctx.config.max_text_chars)
    media = SampleMedia(ctx)
    messages = store_messages(checked, media)
    sample = RlSample(
        key=sample_key(ctx.line), source=Source(ctx.line, ctx.manifest_name, ident), media=tuple(media.infos),
        messages=messages, answer=answer, reward=reward,
    )
    return LineSamples([prepare(sample, media.members)], media.source_digests)
