"""Show the samples of a built set (and optionally dump their media and JSON to a folder).

Prints the set's totals from index.json, then each sample: key, source line and id, text (shortened),
captions or messages, and its media (size, duration). ``--key`` picks samples, ``--limit`` caps how
many are shown, ``--rejected`` lists rejected lines instead, ``--dump-media DIR`` writes each shown
sample's members as ``DIR/<key>.<part>`` (names are tar keys, never input paths).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _short(text: str | None, width: int) -> str:
    if text is None:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def describe(sample, width: int = 100) -> list[str]:
    """Lines describing one sample (a data_tools.schema sample)."""
    from data_tools.schema import ImageTextSample, InterleavedSample, RlSample, SftSample, VideoSample

    src = sample.source
    lines = [f"{sample.key}  [{sample.kind}]  line {src.line} of {src.manifest}" + (f"  id={src.id}" if src.id else "")]
    for m in sample.media:
        extra = f", {m.num_frames} frames, {m.fps:g} fps, {m.duration:.2f} s, {m.backend}" if m.type == "video" else ""
        resized = f" (from {m.original_width}x{m.original_height})" if m.original_width else ""
        lines.append(f"    {m.name}: {m.format} {m.width}x{m.height}{resized}{extra}, {m.bytes} bytes  <- {m.source}")
    if isinstance(sample, ImageTextSample):
        lines.append(f"    text: {_short(sample.text, width)}")
    elif isinstance(sample, InterleavedSample):
        for p in sample.segments:
            lines.append(f"    {p.type}: {_short(p.text, width) if p.type == 'text' else p.image}")
    elif isinstance(sample, VideoSample):
        if sample.clip:
            c = sample.clip
            lines.append(f"    clip {c.index + 1}/{c.count}: source {c.start:.2f}-{c.end:.2f} s")
        if sample.text:
            lines.append(f"    text: {_short(sample.text, width)}")
        for c in sample.captions:
            lines.append(f"    [{c.start:7.2f} - {c.end:7.2f} s] {_short(c.text, width)}")
    elif isinstance(sample, (SftSample, RlSample)):
        for msg in sample.messages:
            content = " ".join(_short(p.text, width) if p.type == "text" else f"<{p.image or p.video}>" for p in msg.content)
            role = msg.role if msg.loss else f"{msg.role} (loss: false)"  # context, not an SFT target
            lines.append(f"    {role}: {_short(content, width)}")
        if isinstance(sample, RlSample):
            answer = "(none)" if sample.answer is None else _short(sample.answer, width)
            lines.append(f"    answer: {answer}  [reward {sample.reward}]")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a folder written by a build-* command")
    parser.add_argument("--limit", type=int, default=10, help="samples to show (default 10; 0 = all)")
    parser.add_argument("--key", action="append", default=[], help="show only this sample key (repeatable)")
    parser.add_argument("--dump-media", metavar="FOLDER", help="write the shown samples' members into FOLDER")
    parser.add_argument("--rejected", action="store_true", help="list rejected lines (line, reason, detail) instead")
    parser.add_argument("--width", type=int, default=100, help="characters of text to show")


def run(args: argparse.Namespace) -> int:
    from data_tools.atomic import write_atomic
    from data_tools.schema import SchemaError, sample_from_json
    from data_tools.shards import iter_shard

    root = Path(args.dir)
    try:
        index = json.loads((root / "index.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        print(f"inspect: error: {root / 'index.json'} cannot be read ({e}); is this a finished build?", file=sys.stderr)
        return 2
    t = index["totals"]
    print(
        f"{root}: {index['kind']}, {t['samples']} samples in {t['shards']} shards ({t['bytes'] / 1e6:.1f} MB), "
        f"{t['accepted_lines']} of {t['input_lines']} lines accepted, {t['rejected_lines']} rejected; "
        f"built by data_tools {index['tool_version']}"
    )
    if t.get("failed_lines"):
        print(f"  {t['failed_lines']} lines failed on an internal error of data_tools (see internal_errors.jsonl)")
    if t.get("dropped_clips"):
        print(f"  {t['dropped_clips']} clips left out: neither the video's text nor a caption falls in their span")
    if args.rejected:
        with open(root / "rejected.jsonl") as f:
            for n, text in enumerate(f):
                if args.limit and n >= args.limit:
                    break
                r = json.loads(text)
                print(f"  line {r['line']}: {r['reason']}: {_short(r['detail'], args.width)}")
        return 0
    dump = Path(args.dump_media) if args.dump_media else None
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
    wanted = set(args.key)
    shown = 0
    for entry in index["shards"]:
        for key, parts in iter_shard(root / entry["name"]):
            if wanted and key not in wanted:
                continue
            try:
                sample = sample_from_json(parts["json"])
            except (SchemaError, KeyError) as e:
                print(f"{entry['name']}:{key}: unreadable sample: {e}")
                continue
            print("\n".join(describe(sample, args.width)))
            if dump:
                for part, data in parts.items():
                    write_atomic(dump / f"{key}.{part}", data, durable=False)
            shown += 1
            if args.limit and shown >= args.limit:
                break
        if args.limit and shown >= args.limit:
            break
    if wanted and shown < len(wanted):
        print(f"inspect: {len(wanted) - shown} of the requested keys were not found", file=sys.stderr)
        return 1
    if dump:
        print(f"inspect: wrote the members of {shown} samples to {dump}")
    return 0
