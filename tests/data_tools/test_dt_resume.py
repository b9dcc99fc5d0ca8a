"""--resume: after a real kill -9 of a running build, and after crashes at chosen points of the journal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dt_helpers import build
from test_dt_media import moving_frames

from data_tools.build import BUILD_DIR, JOURNAL, BuildError
from data_tools.synth import SynthConfig, generate
from data_tools.verify import verify
from common.media import decode as media
from common.media.encode import encode_video

REPO = Path(__file__).resolve().parents[2]


def shard_bytes(out: Path) -> dict[str, bytes]:
    index = json.loads((out / "index.json").read_text())
    return {s["name"]: (out / s["name"]).read_bytes() for s in index["shards"]}


def journal_records(out: Path) -> list[dict]:
    path = out / BUILD_DIR / JOURNAL
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_resume_after_kill_9_gives_the_uninterrupted_result(tmp_path):
    corpus = tmp_path / "corpus"
    generate(SynthConfig(out=str(corpus), seed=3, images=160, videos=0, docs=0, sft=0, eval=0), progress=False)
    manifest = corpus / "image_text.jsonl"
    options = dict(max_samples_per_shard=2)
    build("image_text", manifest, tmp_path / "reference", **options)

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "data_tools", "build-image-text", "--manifest", str(manifest), "--out", str(out),
               "--max-samples-per-shard", "2", "--workers", "1", "--no-progress"]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if sum(r.get("type") == "shard" for r in _safe_records(out)) >= 4:
                break
            time.sleep(0.002)
        children = _children(process.pid)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    deadline = time.monotonic() + 10  # its worker processes notice and exit too
    while any(Path(f"/proc/{child}").exists() for child in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [child for child in children if Path(f"/proc/{child}").exists()]
    records = _safe_records(out)
    assert not any(r.get("type") == "done" for r in records) and not (out / "index.json").exists()
    committed = [r["name"] for r in records if r.get("type") == "shard"]
    assert 4 <= len(committed) < 80

    summary = build("image_text", manifest, out, resume=True, workers=2, **options)
    assert 0 < summary.samples_this_run < summary.samples
    assert verify(out)[0] == []
    assert shard_bytes(out) == shard_bytes(tmp_path / "reference")  # byte-identical shards
    assert (out / "rejected.jsonl").read_bytes() == (tmp_path / "reference" / "rejected.jsonl").read_bytes()
    assert not list((out / BUILD_DIR).glob("tmp/*"))  # no half-written shard left behind


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # kernels without CONFIG_PROC_CHILDREN: nothing to check
        return []


def _safe_records(out: Path) -> list[dict]:
    records = []
    try:
        text = (out / BUILD_DIR / JOURNAL).read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return records
    for line in text.split("\n")[:-1]:  # the last piece may be a line being written
        records.append(json.loads(line))
    return records


def _crash_after(out: Path, keep_shards: int, extra_partial: bool = True) -> None:
    """Make ``out`` look like a build killed after ``keep_shards`` shard commits (and after the next
    shard was renamed into place but not journaled), with a half-written shard in the temp folder."""
    path = out / BUILD_DIR / JOURNAL
    lines = path.read_text().splitlines(keepends=True)
    kept, shards = [], 0
    for line in lines:
        record = json.loads(line)
        if record["type"] == "shard":
            if shards == keep_shards:
                break
            shards += 1
        if record["type"] == "done":
            break
        kept.append(line)
    path.write_text("".join(kept) + '{"type": "shard", "name": "torn')  # a torn last line
    (out / "index.json").unlink()
    if extra_partial:
        (out / BUILD_DIR / "tmp").mkdir(exist_ok=True)
        (out / BUILD_DIR / "tmp" / "shard-000099.tar.partial").write_bytes(b"half a shard")


def test_resume_after_crash_between_rename_and_journal(corpus, tmp_path):
    options = dict(max_samples_per_shard=3)
    build("sft", corpus / "sft.jsonl", tmp_path / "reference", **options)
    out = tmp_path / "crashed"
    build("sft", corpus / "sft.jsonl", out, **options)
    _crash_after(out, keep_shards=2)
    summary = build("sft", corpus / "sft.jsonl", out, resume=True, **options)
    assert summary.samples_this_run == summary.samples - 6
    assert shard_bytes(out) == shard_bytes(tmp_path / "reference")
    assert verify(out)[0] == []
    assert not (out / BUILD_DIR / "tmp" / "shard-000099.tar.partial").exists()


def test_resume_in_the_middle_of_a_video_cut_into_clips(tmp_path):
    for name, n in (("a.mp4", 24), ("b.mp4", 8), ("c.mp4", 20)):
        (tmp_path / name).write_bytes(encode_video(moving_frames(n), fps=4))
    manifest = tmp_path / "v.jsonl"
    manifest.write_text("".join(json.dumps({"video": v, "text": f"video {v}"}) + "\n" for v in ("a.mp4", "b.mp4", "c.mp4")))
    options = dict(max_clip_seconds=2.0, max_samples_per_shard=2)
    build("video", manifest, tmp_path / "reference", **options)
    out = tmp_path / "crashed"
    build("video", manifest, out, **options)
    first = json.loads((out / BUILD_DIR / JOURNAL).read_text().splitlines()[1])
    assert first["type"] == "shard" and first["last"] == [1, 1]  # line 1 (3 clips) spans two shards
    _crash_after(out, keep_shards=1)
    summary = build("video", manifest, out, resume=True, **options)
    assert summary.samples_this_run == summary.samples - 2
    assert shard_bytes(out) == shard_bytes(tmp_path / "reference")
    index = json.loads((out / "index.json").read_text())
    assert index["totals"]["samples"] == 3 + 1 + 3 and index["totals"]["accepted_lines"] == 3
    assert verify(out)[0] == []


def test_journal_with_a_corrupt_middle_line_is_refused(corpus, tmp_path):
    out = tmp_path / "out"
    build("sft", corpus / "sft.jsonl", out, max_samples_per_shard=4)
    path = out / BUILD_DIR / JOURNAL
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = "{garbage\n"
    path.write_text("".join(lines))
    with pytest.raises(BuildError, match="corrupt"):
        build("sft", corpus / "sft.jsonl", out, resume=True, max_samples_per_shard=4)
