"""Statistics of built sets: counts per kind, resolution and duration histograms, token estimates.

Reads only the sample JSONs (media sizes and durations were recorded at build time). Visual tokens
are what Qwen3-VL's preprocessing would give (patch 16, merge 2, ``common.media.vision_inputs``
sizes, videos sampled at 2 fps by ``common.media.frame_sampling``); text tokens are counted with the
project tokenizer (``common.tokens.tokenizer``; the real Qwen vocabulary unless ``--tokenizer`` names a
folder with a tokenizer.json) over every text field, without chat-template tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

SIDE_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)  # longer side, pixels
DURATION_BUCKETS = (2, 5, 10, 30, 60, 300, 1800)  # seconds


def _bucket(value: float, edges: tuple, unit: str) -> str:
    lower = 0
    for edge in edges:
        if value < edge:
            return f"{lower}-{edge}{unit}"
        lower = edge
    return f">={edges[-1]}{unit}"


def _bucket_order(edges: tuple, unit: str) -> list[str]:
    labels, lower = [], 0
    for edge in edges:
        labels.append(f"{lower}-{edge}{unit}")
        lower = edge
    return labels + [f">={edges[-1]}{unit}"]


def sample_texts(sample) -> list[str]:
    """Every text of a sample (captions, segments, messages)."""
    from data_tools.schema import ImageTextSample, InterleavedSample, VideoSample

    if isinstance(sample, ImageTextSample):
        return [sample.text]
    if isinstance(sample, VideoSample):
        return ([sample.text] if sample.text else []) + [c.text for c in sample.captions]
    parts = sample.segments if isinstance(sample, InterleavedSample) else [p for m in sample.messages for p in m.content]
    return [p.text for p in parts if p.type == "text"]


class TokenEstimator:
    """Visual-token estimates of Qwen3-VL's preprocessing for recorded media sizes."""

    def __init__(self, image_min_pixels: int | None = None, image_max_pixels: int | None = None, video_fps: float = 2.0):
        from common.media.frame_sampling import FrameSamplingConfig
        from common.media.vision_inputs import VisionInputConfig

        kwargs = {}
        if image_min_pixels is not None:
            kwargs["image_min_pixels"] = image_min_pixels
        if image_max_pixels is not None:
            kwargs["image_max_pixels"] = image_max_pixels
        self.vision = VisionInputConfig(**kwargs)
        self.sampling = FrameSamplingConfig(fps=video_fps)

    def image(self, width: int, height: int) -> int:
        from common.media.resize import visual_tokens
        from common.media.vision_inputs import image_target_size

        h, w = image_target_size(height, width, self.vision)
        p = self.vision.patch_size
        return visual_tokens(1, h // p, w // p, self.vision.merge_size)

    def video(self, width: int, height: int, num_frames: int, fps: float) -> int:
        from common.media.resize import visual_tokens
        from common.media.frame_sampling import num_sampled_frames
        from common.media.vision_inputs import video_target_size

        t = max(num_sampled_frames(num_frames, fps, self.sampling), self.vision.temporal_patch_size)
        h, w = video_target_size(t, height, width, self.vision)
        p = self.vision.patch_size
        grid_t = math.ceil(t / self.vision.temporal_patch_size)
        return visual_tokens(grid_t, h // p, w // p, self.vision.merge_size)


def _tokenizer(spec: str):
    if spec == "none":
        return None
    from common.tokens.tokenizer import Tokenizer

    return Tokenizer.qwen() if spec == "qwen" else Tokenizer.from_dir(spec)


def collect(directories: list[str], *, tokenizer: str = "qwen", estimator: TokenEstimator | None = None) -> dict:
    """Statistics over the sets in ``directories`` (a JSON-ready dict)."""
    from data_tools.schema import sample_from_json
    from data_tools.shards import iter_shard_json

    estimator = estimator or TokenEstimator()
    tok = _tokenizer(tokenizer)
    samples_by_kind: Counter = Counter()
    media_by_type: Counter = Counter()
    sides: Counter = Counter()
    durations: Counter = Counter()
    visual = {"image": 0, "video": 0}
    text_tokens = text_chars = 0
    video_seconds = 0.0
    per_sample_tokens: list[int] = []
    for directory in directories:
        index = json.loads((Path(directory) / "index.json").read_text())
        for entry in index["shards"]:
            for _, data in iter_shard_json(Path(directory) / entry["name"]):
                sample = sample_from_json(data)
                samples_by_kind[sample.kind] += 1
                tokens = 0
                for m in sample.media:
                    media_by_type[m.type] += 1
                    sides[_bucket(max(m.width, m.height), SIDE_BUCKETS, "px")] += 1
                    if m.type == "image":
                        n = estimator.image(m.width, m.height)
                    else:
                        durations[_bucket(m.duration, DURATION_BUCKETS, "s")] += 1
                        video_seconds += m.duration
                        n = estimator.video(m.width, m.height, m.num_frames, m.fps)
                    visual[m.type] += n
                    tokens += n
                texts = sample_texts(sample)
                text_chars += sum(len(t) for t in texts)
                if tok is not None:
                    n = sum(len(tok.encode(t, allow_special=True)) for t in texts)
                    text_tokens += n
                    tokens += n
                per_sample_tokens.append(tokens)
    per_sample_tokens.sort()
    count = len(per_sample_tokens)
    return {
        "sets": directories,
        "samples": count,
        "samples_by_kind": dict(samples_by_kind),
        "media_by_type": dict(media_by_type),
        "longer_side_histogram": {b: sides[b] for b in _bucket_order(SIDE_BUCKETS, "px") if sides[b]},
        "video_duration_histogram": {b: durations[b] for b in _bucket_order(DURATION_BUCKETS, "s") if durations[b]},
        "video_hours": video_seconds / 3600,
        "visual_tokens": {**visual, "total": visual["image"] + visual["video"]},
        "text_chars": text_chars,
        "text_tokens": text_tokens if tok is not None else None,
        "tokens_per_sample": {
            "mean": sum(per_sample_tokens) / count if count else 0,
            "p50": per_sample_tokens[count // 2] if count else 0,
            "p99": per_sample_tokens[min(count - 1, int(count * 0.99))] if count else 0,
            "max": per_sample_tokens[-1] if count else 0,
        },
        "token_estimate": "Qwen3-VL preprocessing (patch 16, merge 2, 2 fps) and the project tokenizer; no chat template",
    }


def _print(stats: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{stats['samples']} samples[/bold] in {len(stats['sets'])} set(s): "
                  + ", ".join(f"{k} {v}" for k, v in stats["samples_by_kind"].items()))
    table = Table(title="media")
    table.add_column("")
    table.add_column("count", justify="right")
    for k, v in stats["media_by_type"].items():
        table.add_row(f"{k}s", str(v))
    table.add_row("video hours", f"{stats['video_hours']:.3f}")
    console.print(table)
    for title, key in (("longer side (pixels)", "longer_side_histogram"), ("video duration", "video_duration_histogram")):
        hist = stats[key]
        if not hist:
            continue
        table = Table(title=title)
        table.add_column("bucket")
        table.add_column("count", justify="right")
        table.add_column("")
        peak = max(hist.values())
        for bucket, n in hist.items():
            table.add_row(bucket, str(n), "#" * max(1, round(30 * n / peak)))
        console.print(table)
    table = Table(title="estimated tokens")
    table.add_column("")
    table.add_column("tokens", justify="right")
    for k, v in stats["visual_tokens"].items():
        table.add_row(f"visual ({k})", f"{v:,}")
    table.add_row("text", "n/a" if stats["text_tokens"] is None else f"{stats['text_tokens']:,}")
    for k, v in stats["tokens_per_sample"].items():
        table.add_row(f"per sample, {k}", f"{v:,.0f}")
    console.print(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="folders written by build-* commands")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    parser.add_argument("--tokenizer", default="qwen", help="'qwen' (default), 'none', or a folder with tokenizer.json")
    parser.add_argument("--image-min-pixels", type=int, default=None, help="training's image min_pixels (Qwen3-VL default)")
    parser.add_argument("--image-max-pixels", type=int, default=None, help="training's image max_pixels (Qwen3-VL default)")
    parser.add_argument("--video-fps", type=float, default=2.0, help="video sampling rate for the estimate (default 2)")


def run(args: argparse.Namespace) -> int:
    for d in args.dirs:
        if not (Path(d) / "index.json").is_file():
            print(f"stats: error: {d} has no index.json (not a finished build)", file=sys.stderr)
            return 2
    estimator = TokenEstimator(args.image_min_pixels, args.image_max_pixels, args.video_fps)
    stats = collect(args.dirs, tokenizer=args.tokenizer, estimator=estimator)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        _print(stats)
    return 0
