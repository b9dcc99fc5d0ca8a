"""One module per sample kind: turn one manifest record into prepared samples (or raise Rejected).

Each module exposes ``make_samples(record: dict, ctx: LineContext) -> LineSamples``: the prepared
samples of the line (several for a video cut into clips), the sha256 of every source medium (for
duplicate detection) and the clips it left out (data_tools.sample_media.LineSamples); it documents its
manifest line format and rejects any top-level key outside it. Checks run cheapest first (fields and
text before any media).
"""

from __future__ import annotations

from collections.abc import Callable

from data_tools.sample_media import LineContext, LineSamples


def maker(kind: str) -> Callable[[dict, LineContext], LineSamples]:
    """``make_samples`` of ``kind`` ("image_text" | "interleaved" | "video" | "sft" | "rl")."""
    from data_tools.kinds import image_text, interleaved, rl, sft, video

    return {"image_text": image_text, "interleaved": interleaved, "video": video, "sft": sft, "rl": rl}[kind].make_samples
