"""One module per sample kind: turn one manifest record into prepared samples (or raise Rejected).

Each module exposes ``make_samples(record: dict, ctx: LineContext) -> (samples, source digests)``:
the prepared samples of the line (several for a video cut into clips) and the sha256 of every source
medium (for duplicate detection); it documents its manifest line format. Checks run cheapest first (fields and text before any media).
"""

from __future__ import annotations

from collections.abc import Callable

from data_tools.sample_media import LineContext, PreparedSample


def maker(kind: str) -> Callable[[dict, LineContext], tuple[list[PreparedSample], list[str]]]:
    """``make_samples`` of ``kind`` ("image_text" | "interleaved" | "video" | "sft" | "rl")."""
    from data_tools.kinds import image_text, interleaved, rl, sft, video

    return {"image_text": image_text, "interleaved": interleaved, "video": video, "sft": sft, "rl": rl}[kind].make_samples
