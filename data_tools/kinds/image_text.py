"""Image-caption pairs. Manifest line: ``{"image": path, "text": str, "id"?: str}``."""

from __future__ import annotations

from data_tools.sample_media import LineContext, PreparedSample, SampleMedia, prepare
from data_tools.schema import ImageTextSample, Source, sample_key
from data_tools.validation import check_text, check_total_text, field, source_id


def make_samples(record: dict, ctx: LineContext) -> tuple[list[PreparedSample], list[str]]:
    """One sample; returns (samples, sha256 of the source media). Raises Rejected."""
    ident = source_id(record)
    text = check_text(field(record, "text", str), "text")
    check_total_text([text], ctx.config.max_text_chars)
    media = SampleMedia(ctx)
    image = media.image(field(record, "image", str), "image")
    sample = ImageTextSample(
        key=sample_key(ctx.line), source=Source(ctx.line, ctx.manifest_name, ident), media=tuple(media.infos),
        text=text, image=image,
    )
    return [prepare(sample, media.members)], media.source_digests
