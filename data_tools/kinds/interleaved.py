"""Interleaved image-text documents.

Manifest line: ``{"id"?: str, "segments": [{"text": str} | {"image": path}, ...]}`` in reading order.
A document needs at least one text and one image segment; each segment has exactly one of the keys.
Any other top-level key is rejected.
"""

from __future__ import annotations

from data_tools.sample_media import LineContext, LineSamples, SampleMedia, prepare
from data_tools.schema import InterleavedSample, Part, Source, sample_key
from data_tools.validation import (Rejected, check_joined_texts, check_keys, check_text, check_total_text, field,
                                   objects, source_id)

#: The keys of a manifest line.
KEYS = ("id", "segments")


def make_samples(record: dict, ctx: LineContext) -> LineSamples:
    """One sample (and the sha256 of its source media). Raises Rejected."""
    check_keys(record, KEYS, "an interleaved line")
    ident = source_id(record)
    segments = field(record, "segments", list)
    if not segments:
        raise Rejected("invalid_fields", "'segments' is empty")
    kinds = []
    run: list[tuple[str, str]] = []  # consecutive text segments: one text
    for _, where, segment in objects(segments, "segments"):  # all field and text checks before any file is opened
        keys = [k for k in ("text", "image") if k in segment]
        if len(keys) != 1:
            raise Rejected("invalid_fields", f"{where} must have exactly one of 'text' or 'image', has {keys or 'neither'}")
        if keys[0] == "text":
            run.append((check_text(segment["text"], f"{where}.text"), f"{where}.text"))
        else:
            check_joined_texts(run)
            run = []
        kinds.append(keys[0])
    check_joined_texts(run)
    if "image" not in kinds:
        raise Rejected("invalid_fields", "the document has no image segment")
    if "text" not in kinds:
        raise Rejected("empty_text", "the document has no text segment")
    check_total_text([s["text"] for s in segments if "text" in s], ctx.config.max_text_chars)
    media = SampleMedia(ctx)
    parts = []
    for i, segment in enumerate(segments):
        if "text" in segment:
            parts.append(Part(type="text", text=segment["text"]))
        else:
            parts.append(Part(type="image", image=media.image(segment["image"], f"segments[{i}].image")))
    sample = InterleavedSample(
        key=sample_key(ctx.line), source=Source(ctx.line, ctx.manifest_name, ident), media=tuple(media.infos),
        segments=tuple(parts),
    )
    return LineSamples([prepare(sample, media.members)], media.source_digests)
