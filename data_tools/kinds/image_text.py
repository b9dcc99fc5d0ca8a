"""Image-caption pairs. Manifest line: ``{"image": path, "text": str, "id"?: str}``; any other key is rejected."""

from __future__ import annotations

from data_tools.sample_media import LineContext, LineSamples, SampleMedia, prepare
from data_tools.schema import ImageTextSample, Source, sample_key
from data_tools.validation import check_keys, check_text, check_total_text, field, source_id

#: The keys of a manifest line.
KEYS = ("id", "image", "text")


def make_samples(record: dict, ctx: LineContext) -> LineSamples:
    """One sample (and the sha256 of its source media). Raises Rejected."""
    check_keys(record, KEYS, "an image-text line")
    ident = source_id(record)
    text = check_text(field(record, "text", str), "text")
    check_total_text([text], ctx.config.max_text_chars)
    media = SampleMedia(ctx)
    image = media.image(field(record, "image", str), "image")
    sample = ImageTextSample(
        key=sample_key(ctx.line), source=Source(ctx.line, ctx.manifest_name, ident), media=tuple(media.infos),
        text=text, image=image,
    )
    return LineSamples([prepare(sample, media.members)], media.source_digests)
