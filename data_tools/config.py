"""BuildConfig: every option of a ``build-*`` command, and its command-line flags (one place for both)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

from common.media.decode import DEFAULT_MAX_PIXELS
from data_tools.schema import KINDS

SHARD_PATTERN = "shard-{index:06d}.tar"


@dataclass(frozen=True)
class BuildConfig:
    """Options of one shard-set build.

    kind: one of data_tools.schema.KINDS ("image_text" | "interleaved" | "video" | "sft" | "rl").
    manifest: the JSONL manifest, or JSON array of records (absolute path); relative media paths in it
        are resolved against its folder, or ``media_root`` when set. out: the output folder.
    max_samples_per_shard, max_shard_bytes: a shard is closed before a sample that would exceed either
        (bytes of the finished tar file, including headers and padding); a single sample larger than
        ``max_shard_bytes`` gets a shard of its own.
    max_pixels: decompression-bomb limit; images with more pixels are rejected from their header.
    downscale_pixels: if set, valid images with more pixels are resized with ``smart_resize`` to at most
        this many pixels (sides multiples of 32) and re-encoded (JPEG q95 for JPEG sources, else PNG);
        otherwise every medium is stored as its original bytes.
    max_text_chars: a sample whose text (all text fields together) is longer is rejected.
    max_clip_seconds: if set (video builds), longer videos are cut into clips of at most this many
        seconds (re-encoded to H.264 MP4), captions re-timed to each clip.
    video_sample_fps: a video must give at least one frame when sampled at this rate (Qwen3-VL: 2 fps).
    split: energon train/val/test ratio over shards.
    media_root: the folder relative media paths resolve against (absolute path; ``import-*`` commands).
    importer: the ``data_tools.importers`` name ("llava", "messages") that translates each input record
        into a ``kind`` manifest record, or None when the manifest is in the kind's own format.
    workers: processes that validate inputs (0 = in the main process, for debugging).

    Only ``workers`` and the run flags (``resume``, ``overwrite``, ``progress``) may change between a
    build and its ``--resume``; everything else is part of :meth:`fingerprint`.
    """

    kind: str
    manifest: str
    out: str
    max_samples_per_shard: int = 1000
    max_shard_bytes: int = 1 << 30
    max_pixels: int = DEFAULT_MAX_PIXELS
    downscale_pixels: int | None = None
    max_text_chars: int = 100_000
    max_clip_seconds: float | None = None
    video_sample_fps: float = 2.0
    split: tuple[float, float, float] = (1.0, 0.0, 0.0)
    media_root: str | None = None
    importer: str | None = None
    workers: int = 1
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}")
        checks = [
            (self.max_samples_per_shard >= 1, "--max-samples-per-shard must be at least 1"),
            (self.max_shard_bytes >= 10240, "--max-shard-bytes must be at least 10240 (one tar record)"),
            (self.max_pixels >= 28 * 28, "--max-pixels must be at least 784 (28x28)"),
            (self.downscale_pixels is None or self.downscale_pixels >= 32 * 32, "--downscale-pixels must be at least 1024"),
            (self.max_text_chars >= 1, "--max-text-chars must be at least 1"),
            (self.max_clip_seconds is None or self.max_clip_seconds > 0, "--max-clip-seconds must be positive"),
            (self.video_sample_fps > 0, "--video-sample-fps must be positive"),
            (len(self.split) == 3 and min(self.split) >= 0 and self.split[0] > 0, "--split needs 3 ratios, train > 0"),
            (self.workers >= 0, "--workers must be at least 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def fingerprint(self) -> dict:
        """The options that determine the output bytes (recorded in index.json, compared on --resume)."""
        d = dataclasses.asdict(self)
        for run_only in ("workers", "resume", "overwrite", "progress", "out"):
            d.pop(run_only)
        d["split"] = list(self.split)
        return d


def available_cores() -> int:
    """Cores this process may run on (a SLURM allocation, a taskset), not all cores of the node."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _split(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split must be three numbers like 8,1,1, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"--split must be three numbers like 8,1,1, got {text!r}")
    return values  # type: ignore[return-value]


MANIFEST_HELP = "input JSONL manifest (relative media paths are relative to it)"


def add_build_arguments(
    parser: argparse.ArgumentParser, kind: str, *, input_flag: str = "--manifest", input_help: str = MANIFEST_HELP,
    media_root: bool = False,
) -> None:
    """The flags shared by every build command (``kind`` only adds the video-only ones). An ``import-*``
    command names its input ``input_flag`` (stored as ``manifest``) and asks for ``--media-root``."""
    parser.add_argument(input_flag, dest="manifest", metavar=input_flag.lstrip("-").upper(), required=True, help=input_help)
    if media_root:
        parser.add_argument("--media-root", required=True, help="folder that relative media paths in the input are relative to")
    parser.add_argument("--out", required=True, help="output folder for shards, index.json, rejected.jsonl, .nv-meta")
    parser.add_argument("--max-samples-per-shard", type=int, default=1000, help="samples per shard at most (default 1000)")
    parser.add_argument("--max-shard-bytes", type=int, default=1 << 30, help="bytes per shard at most (default 1 GiB)")
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
        help=f"decompression-bomb limit: reject images with more pixels (default {DEFAULT_MAX_PIXELS})",
    )
    parser.add_argument(
        "--downscale-pixels", type=int, default=None,
        help="downscale (smart_resize) and re-encode images with more pixels than this (default: keep original bytes)",
    )
    parser.add_argument("--max-text-chars", type=int, default=100_000, help="reject samples with more text characters")
    if kind == "video":
        parser.add_argument("--max-clip-seconds", type=float, default=None, help="cut longer videos into clips of at most this length")
    parser.add_argument("--video-sample-fps", type=float, default=2.0, help="videos must give a frame at this sampling rate (default 2)")
    parser.add_argument("--split", type=_split, default=(1.0, 0.0, 0.0), help="energon train,val,test ratio over shards (default 1,0,0)")
    parser.add_argument(
        "--workers", type=int, default=available_cores(), help="validation processes (default: the cores this process may use; 0 = in-process)"
    )
    parser.add_argument("--resume", action="store_true", help="finish an interrupted build in --out (same options)")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing build in --out first")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def config_from_args(args: argparse.Namespace, kind: str, importer: str | None = None) -> BuildConfig:
    media_root = getattr(args, "media_root", None)
    return BuildConfig(
        kind=kind,
        manifest=os.path.abspath(args.manifest),
        out=os.path.abspath(args.out),
        max_samples_per_shard=args.max_samples_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        max_pixels=args.max_pixels,
        downscale_pixels=args.downscale_pixels,
        max_text_chars=args.max_text_chars,
        max_clip_seconds=getattr(args, "max_clip_seconds", None),
        video_sample_fps=args.video_sample_fps,
        split=tuple(args.split),
        media_root=os.path.abspath(media_root) if media_root else None,
        importer=importer,
        workers=args.workers,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=args.progress,
    )
