"""Benchmark of the shard builders: images/s of ``build-image-text`` and videos/s of ``build-video``
against the raw rate of the same media work, with the same number of processes.

    python benchmarks/bench_build.py [--images 10000] [--videos 120] [--workers 1,2] [--repeats 2]

Input: a corpus made by ``python -m data_tools synth`` in a temporary folder (64-160 px PNG/JPEG
images; 8 fps H.264 videos of 2-6 s, 64-128 px), or ``--corpus DIR`` (a synth output folder).

* raw: the builder's media work and nothing else, done with the builder's own functions
  (``data_tools.sample_media``, which calls ``common.media.decode`` and ``encode``) on the media of the
  lines the builder accepts, split into ``W`` parts run by ``W`` processes started beforehand.
  Images: ``SampleMedia.image`` (read, sha256, full decode, header probe; with ``--downscale-pixels``
  also ``smart_resize`` and re-encoding). Videos: ``SampleMedia.read_video`` (probe, decode of the
  middle and last frames sampled at 2 fps) and, with ``--max-clip-seconds``, each clip decoded
  (``iter_video_frames``), re-encoded (``encode_video``) and validated, as ``build-video`` does.
* build: the command itself, ``python -m data_tools build-* --workers W``, in a fresh process, wall
  time: interpreter and imports, worker start-up, manifest, validation, ordering, duplicate detection,
  tar shards, journal, energon metadata (energon imports torch: about 1.5 s). ``fixed``: the same
  command on a one-line manifest; ``per item``: the rate of the remaining lines, (N - 1) / (T_N - T_1).
* ratios build / raw, end to end and per item; the goal is per item >= 0.8 (the pipeline adds at
  most 25 % to the media work of a large build, whose fixed seconds do not matter).
* decode at 2 fps: for reference, videos/s when every frame sampled at 2 fps is decoded
  (``read_video_frames``, what the trainer does with a video), ``W`` processes.

Every figure is the best of ``--repeats`` runs (other processes on a shared machine only slow a run).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MEDIA_FIELD = {"image_text": "image", "video": "video"}


def data_tools(argv: list[str]) -> None:
    """``python -m data_tools ARGV`` in a fresh process, quietly; raises on failure."""
    run = subprocess.run([sys.executable, "-m", "data_tools", *argv], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if run.returncode:
        raise SystemExit(f"data_tools {argv[0]} failed ({run.returncode}):\n{run.stderr}")


def make_corpus(out: Path, images: int, videos: int) -> Path:
    argv = ["synth", "--out", str(out), "--images", str(images), "--videos", str(videos), "--docs", "0", "--sft", "0",
            "--eval", "0", "--no-progress"]
    print(f"$ python -m data_tools {' '.join(argv)}", flush=True)
    data_tools(argv)
    return out


def good_records(corpus: Path, kind: str) -> list[dict]:
    """The manifest records the builder accepts (synth.json lists the deliberately bad lines)."""
    manifest = f"{kind}.jsonl"
    bad = {b["line"] for b in json.loads((corpus / "synth.json").read_text())["bad_lines"][manifest]}
    lines = (corpus / manifest).read_text().splitlines()
    return [json.loads(text) for n, text in enumerate(lines, start=1) if n not in bad]


# ------------------------------------------------------------------------------------------ raw work
def _context(config):
    from data_tools.sample_media import LineContext

    return LineContext(1, os.path.basename(config.manifest), os.path.dirname(config.manifest), config)


def raw_images(config, paths: list[str]) -> int:
    from data_tools.sample_media import SampleMedia

    ctx = _context(config)
    for path in paths:
        SampleMedia(ctx).image(path, "image")
    return len(paths)


def raw_videos(config, paths: list[str]) -> int:
    from data_tools.kinds.video import clip_frame_ranges
    from data_tools.sample_media import SampleMedia, validate_video
    from common.media.decode import iter_video_frames
    from common.media.encode import encode_video

    ctx = _context(config)
    for path in paths:
        _, data, _, info = SampleMedia(ctx).read_video(path, "video")
        if config.max_clip_seconds is not None and info.duration > config.max_clip_seconds + 1e-9:
            for lo, hi in clip_frame_ranges(info.num_frames, info.fps, config.max_clip_seconds):
                clip = encode_video(iter_video_frames(data, lo, hi), info.fps)
                validate_video(clip, "clip", path, config.video_sample_fps)
    return len(paths)


def decode_at_2fps(config, paths: list[str]) -> int:
    from common.media.decode import frame_indices_at_fps, probe_video, read_video_frames

    for path in paths:
        data = Path(os.path.dirname(config.manifest), path).read_bytes()
        info = probe_video(data)
        read_video_frames(data, frame_indices_at_fps(info.num_frames, info.fps, 2.0))
    return len(paths)


def _import_media_modules() -> None:
    import data_tools.kinds.video  # noqa: F401  (what a build worker imports)


def raw_seconds(fn, config, paths: list[str], workers: int) -> float:
    """Seconds of ``fn`` over ``paths`` split into ``workers`` parts, on processes started beforehand."""
    processes = max(1, workers)
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(_import_media_modules) for _ in range(processes)]:
            future.result()
        started = time.perf_counter()
        assert sum(pool.map(fn, [config] * processes, [paths[i::processes] for i in range(processes)])) == len(paths)
        return time.perf_counter() - started


def build_seconds(kind: str, manifest: Path, out: Path, workers: int, options: list[str]) -> float:
    command = "build-" + kind.replace("_", "-")
    started = time.perf_counter()
    data_tools([command, "--manifest", str(manifest), "--out", str(out), "--workers", str(workers), "--overwrite",
                "--no-progress", *options])
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------- main
def measure(kind: str, corpus: Path, tmp: Path, workers: int, args, build_options: list[str], config) -> dict:
    records = good_records(corpus, kind)
    paths = [r[MEDIA_FIELD[kind]] for r in records]
    one = dict(records[0], **{MEDIA_FIELD[kind]: str(corpus / paths[0])})  # absolute path: the manifest lies elsewhere
    one_line = tmp / f"one_{kind}.jsonl"
    one_line.write_text(json.dumps(one) + "\n")
    raw_fn = raw_images if kind == "image_text" else raw_videos
    n = len(paths)
    best = {"raw": float("inf"), "build": float("inf"), "fixed": float("inf"), "decode_2fps": float("inf")}
    for _ in range(args.repeats):  # interleaved, so that a busy spell of the machine hits every figure alike
        best["raw"] = min(best["raw"], raw_seconds(raw_fn, config, paths, workers))
        best["build"] = min(best["build"], build_seconds(kind, corpus / f"{kind}.jsonl", tmp / "out", workers, build_options))
        best["fixed"] = min(best["fixed"], build_seconds(kind, one_line, tmp / "out_one", workers, build_options))
        if kind == "video":
            best["decode_2fps"] = min(best["decode_2fps"], raw_seconds(decode_at_2fps, config, paths, workers))
    row = {"kind": kind, "workers": workers, "items": n, "raw": n / best["raw"], "build": n / best["build"],
           "fixed_s": best["fixed"], "per_item": (n - 1) / max(best["build"] - best["fixed"], 1e-9)}
    if kind == "video":
        row["decode_2fps"] = n / best["decode_2fps"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", help="a data_tools synth folder (default: make one in a temporary folder)")
    parser.add_argument("--images", type=int, default=10000, help="image-text lines of the made corpus (default 10000)")
    parser.add_argument("--videos", type=int, default=120, help="video lines of the made corpus (default 120)")
    parser.add_argument("--workers", default="1,2", help="comma-separated --workers values (default 1,2)")
    parser.add_argument("--downscale-pixels", type=int, default=None,
                        help="build-image-text --downscale-pixels (re-encode larger images; default: keep originals)")
    parser.add_argument("--max-clip-seconds", type=float, default=2.0,
                        help="build-video --max-clip-seconds (clips are re-encoded; 0: keep videos whole; default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per figure, the best is kept (default 2)")
    parser.add_argument("--only", choices=("image_text", "video"), help="benchmark one builder only")
    args = parser.parse_args(argv)

    from data_tools.config import BuildConfig

    workers = [int(w) for w in args.workers.split(",")]
    kinds = [args.only] if args.only else ["image_text", "video"]
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_build_") as tmp_name:
        tmp = Path(tmp_name)
        corpus = Path(args.corpus).resolve() if args.corpus else make_corpus(tmp / "corpus", args.images, args.videos)
        for kind in kinds:
            if kind == "image_text":
                options = {"downscale_pixels": args.downscale_pixels}
                flags = ["--downscale-pixels", str(args.downscale_pixels)] if args.downscale_pixels else []
            else:
                options = {"max_clip_seconds": args.max_clip_seconds or None}
                flags = ["--max-clip-seconds", str(args.max_clip_seconds)] if args.max_clip_seconds else []
            for w in workers:
                config = BuildConfig(kind=kind, manifest=str(corpus / f"{kind}.jsonl"), out=str(tmp / "out"),
                                     workers=w, **options)
                row = measure(kind, corpus, tmp, w, args, flags, config)
                rows.append(row)
                print(f"{kind} --workers {w}: raw {row['raw']:.1f}/s, build {row['build']:.1f}/s end to end, "
                      f"{row['per_item']:.1f}/s per item after {row['fixed_s']:.1f} s fixed", flush=True)

    print()
    print(f"{'command':<17} {'workers':>7} {'items':>6} {'raw/s':>8} {'build/s':>8} {'ratio':>6} {'fixed s':>8} "
          f"{'per item/s':>10} {'ratio':>6}  goal: per-item ratio >= 0.8")
    for r in rows:
        per_item = r["per_item"] / r["raw"]
        print(f"{'build-' + r['kind'].replace('_', '-'):<17} {r['workers']:>7} {r['items']:>6} {r['raw']:>8.1f} "
              f"{r['build']:>8.1f} {r['build'] / r['raw']:>6.2f} {r['fixed_s']:>8.2f} {r['per_item']:>10.1f} "
              f"{per_item:>6.2f}  {'met' if per_item >= 0.8 else 'NOT met'}")
    for r in rows:
        if "decode_2fps" in r:
            print(f"build-video --workers {r['workers']}: {r['build']:.1f} videos/s end to end; decoding every frame at "
                  f"2 fps runs at {r['decode_2fps']:.1f} videos/s (build / that = {r['build'] / r['decode_2fps']:.2f})")
    print(f"images: synth 64-160 px, --downscale-pixels {args.downscale_pixels}; videos: synth 2-6 s at 8 fps, "
          f"--max-clip-seconds {args.max_clip_seconds}; {os.cpu_count()} cores; {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
