"""Re-read every shard of a built set and check it against index.json; exit status 1 on any mismatch.

Checks: every shard listed in index.json exists with its byte size and sha256; no unlisted shard
lies next to them; each sample has a valid JSON (data_tools.schema) whose key matches its tar key, and
exactly the media members it describes, with their sizes and sha256; keys are unique across the set;
the sample, line and rejection counts add up (accepted + rejected + failed = input lines); rejected.jsonl
is well-formed; no line failed on an internal error (a set built past a bug in data_tools lacks those
lines: it is reported, with internal_errors.jsonl's first error); the energon metadata (.nv-meta/.info.json counts, dataset.yaml, one .tar.idx per shard)
agrees. ``--decode`` also decodes every image, and probes every video and decodes its last frame (the
one training's frame sampler always reads: a file cut short behind an intact index fails only there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path

SHARD_FILE_RE = re.compile(r"^shard-\d{6}\.tar$")


def verify(directory: str | os.PathLike, *, decode: bool = False, progress: bool = False) -> tuple[list[str], dict]:
    """All problems found in the set at ``directory`` (empty list: it is intact) and counts checked."""
    import yaml
    from tqdm import tqdm

    from data_tools.schema import SchemaError, sample_from_json
    from data_tools.shards import iter_shard, sha256_file
    from common.media.decode import MediaError, load_image, probe_video, read_video_frames, recorded_max_pixels

    root = Path(directory)
    problems: list[str] = []
    checked = {"shards": 0, "samples": 0, "media": 0}
    index_path = root / "index.json"
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        return [f"{index_path} is missing: the build did not finish (run it again with --resume)"], checked
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return [f"{index_path} is not valid JSON: {e}"], checked

    listed = [s["name"] for s in index["shards"]]
    on_disk = sorted(p.name for p in root.iterdir() if SHARD_FILE_RE.match(p.name))
    for name in sorted(set(on_disk) - set(listed)):
        problems.append(f"{name} lies in the folder but index.json does not list it")

    keys: set[str] = set()
    lines: set[int] = set()
    total_samples = 0
    for entry in tqdm(index["shards"], desc="verify", unit="shard", disable=not progress):
        name = entry["name"]
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        checked["shards"] += 1
        if path.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, index.json says {entry['bytes']}")
        if sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from index.json")
        count = 0
        try:
            for key, parts in iter_shard(path):
                count += 1
                where = f"{name}:{key}"
                if key in keys:
                    problems.append(f"{where}: key appears twice in the set")
                keys.add(key)
                if "json" not in parts:
                    problems.append(f"{where}: no json member")
                    continue
                try:
                    sample = sample_from_json(parts["json"])
                except SchemaError as e:
                    problems.append(f"{where}: {e}")
                    continue
                if sample.key != key:
                    problems.append(f"{where}: JSON key {sample.key!r} differs from the tar key")
                if sample.kind != index["kind"]:
                    problems.append(f"{where}: kind {sample.kind!r} in a {index['kind']!r} set")
                lines.add(sample.source.line)
                described = {m.name for m in sample.media}
                present = set(parts) - {"json"}
                for extra in sorted(present - described):
                    problems.append(f"{where}: member {extra!r} is not described by the JSON")
                for m in sample.media:
                    data = parts.get(m.name)
                    if data is None:
                        problems.append(f"{where}: media member {m.name!r} is missing")
                        continue
                    checked["media"] += 1
                    if len(data) != m.bytes or hashlib.sha256(data).hexdigest() != m.sha256:
                        problems.append(f"{where}: media {m.name!r} bytes differ from the JSON's size/sha256")
                    if decode:
                        try:
                            if m.type == "image":
                                image = load_image(data, max_pixels=recorded_max_pixels(m.width, m.height))
                                if image.size != (m.width, m.height):
                                    problems.append(f"{where}: {m.name} decodes to {image.size}, JSON says {(m.width, m.height)}")
                            else:
                                read_video_frames(data, [probe_video(data).num_frames - 1])
                        except MediaError as e:
                            problems.append(f"{where}: {m.name} does not decode: {e.detail}")
        except (SchemaError, OSError, EOFError) as e:
            problems.append(f"{name}: cannot be read as a tar shard: {e}")
        except Exception as e:  # tarfile raises assorted errors on corrupt archives
            problems.append(f"{name}: cannot be read as a tar shard: {type(e).__name__}: {e}")
        if count != entry["samples"]:
            problems.append(f"{name}: {count} samples, index.json says {entry['samples']}")
        total_samples += count
        checked["samples"] += count
        idx = root / (name + ".idx")
        if index.get("energon", {}).get("metadata") and (not idx.is_file() or idx.stat().st_size != 8 * (count + 1)):
            problems.append(f"{name}.idx (energon tar index) is missing or does not match {count} samples")

    totals = index["totals"]
    if total_samples != totals["samples"]:
        problems.append(f"the shards hold {total_samples} samples, index.json totals say {totals['samples']}")
    if len(lines) != totals["accepted_lines"]:
        problems.append(f"samples come from {len(lines)} manifest lines, index.json says {totals['accepted_lines']}")

    rejected_lines = set()
    rejected_path = root / "rejected.jsonl"
    try:
        for n, text in enumerate(rejected_path.read_text().splitlines(), start=1):
            try:
                record = json.loads(text)
                rejected_lines.add(int(record["line"]))
                if not record.get("reason"):
                    raise KeyError("reason")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                problems.append(f"rejected.jsonl line {n} is malformed: {e}")
    except FileNotFoundError:
        problems.append("rejected.jsonl is missing")
    if len(rejected_lines) != totals["rejected_lines"]:
        problems.append(f"rejected.jsonl lists {len(rejected_lines)} lines, index.json says {totals['rejected_lines']}")
    if rejected_lines & lines:
        problems.append(f"lines both accepted and rejected: {sorted(rejected_lines & lines)[:10]}")
    failed = totals.get("failed_lines", 0)
    if failed:
        try:
            first = json.loads((root / "internal_errors.jsonl").read_text().splitlines()[0])
            problems.append(
                f"{failed} input lines failed on an internal error of data_tools and are missing from the set "
                f"(first: line {first['line']}: {first['error']}; see internal_errors.jsonl)"
            )
        except (FileNotFoundError, IndexError, json.JSONDecodeError, KeyError) as e:
            problems.append(f"index.json counts {failed} failed lines but internal_errors.jsonl is missing or invalid: {e}")
    if totals["accepted_lines"] + totals["rejected_lines"] + failed != totals["input_lines"]:
        problems.append("accepted + rejected + failed lines do not add up to the input lines in index.json")

    if index.get("energon", {}).get("metadata"):
        meta = root / ".nv-meta"
        try:
            info = json.loads((meta / ".info.json").read_text())
            expected = {s["name"]: s["samples"] for s in index["shards"]}
            if info.get("shard_counts") != expected:
                problems.append(".nv-meta/.info.json shard counts differ from index.json")
        except (FileNotFoundError, json.JSONDecodeError) as e:
            problems.append(f".nv-meta/.info.json is missing or invalid: {e}")
        try:
            dataset = yaml.safe_load((meta / "dataset.yaml").read_text())
            if dataset.get("__class__") != "CrudeWebdataset" or dataset.get("subflavors", {}).get("kind") != index["kind"]:
                problems.append(".nv-meta/dataset.yaml is not a CrudeWebdataset of this kind")
        except (FileNotFoundError, yaml.YAMLError, AttributeError) as e:
            problems.append(f".nv-meta/dataset.yaml is missing or invalid: {e}")
        for name in ("split.yaml", "index.sqlite"):
            if not (meta / name).is_file():
                problems.append(f".nv-meta/{name} is missing")
    return problems, checked


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a folder written by a build-* command")
    parser.add_argument("--decode", action="store_true", help="also decode every image, and probe every video and decode its last frame (slow)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    problems, checked = verify(args.dir, decode=args.decode, progress=args.progress)
    if problems:
        for problem in problems[:200]:
            print(f"verify: {problem}", file=sys.stderr)
        if len(problems) > 200:
            print(f"verify: ... and {len(problems) - 200} more problems", file=sys.stderr)
        print(f"verify: FAILED: {len(problems)} problems in {args.dir}")
        return 1
    print(f"verify: OK: {checked['shards']} shards, {checked['samples']} samples, {checked['media']} media in {args.dir}")
    return 0
