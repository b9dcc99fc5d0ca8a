"""The build commands: every line accounted for, validation reasons, determinism, shard limits, clips, crashes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
from dt_helpers import KIND_MANIFESTS, build, read_jsonl
from PIL import Image
from test_dt_media import bar_column, moving_frames, png_bytes, png_header_only

from data_tools.build import BuildError, LineResult, ordered_results
from data_tools.config import BuildConfig
from data_tools.kinds.image_text import make_samples as make_image_text_samples
from data_tools.schema import sample_from_json
from data_tools.shards import iter_shard
from data_tools.verify import verify
from common.media import decode as media
from common.media.encode import encode_video

MEMBER_RE = re.compile(r"^\d{9}(_\d{4})?\.(json|img\d+\.[a-z0-9]+|vid\d+\.[a-z0-9]+)$")
REPO = Path(__file__).resolve().parents[2]


def samples_of(out: Path) -> list:
    index = json.loads((out / "index.json").read_text())
    return [sample_from_json(parts["json"]) for s in index["shards"] for _, parts in iter_shard(out / s["name"])]


@pytest.mark.parametrize("kind", list(KIND_MANIFESTS))
def test_every_line_lands_once_or_is_rejected_with_its_reason(kind, corpus, built_sets):
    out = built_sets[kind]
    index = json.loads((out / "index.json").read_text())
    synth = json.loads((corpus / "synth.json").read_text())
    expected_bad = {b["line"]: b["reason"] for b in synth["bad_lines"][KIND_MANIFESTS[kind]]}
    rejected = {r["line"]: r["reason"] for r in read_jsonl(out / "rejected.jsonl")}
    assert rejected == expected_bad
    manifest_lines = (corpus / KIND_MANIFESTS[kind]).read_text().splitlines()
    for r in read_jsonl(out / "rejected.jsonl"):  # the input line is recorded verbatim
        assert r["input"] == manifest_lines[r["line"] - 1] and r["detail"]
    lines = [s.source.line for s in samples_of(out)]
    assert len(lines) == len(set(lines))  # no clips here: one sample per accepted line
    assert set(lines) | set(rejected) == set(range(1, len(manifest_lines) + 1))
    assert not set(lines) & set(rejected)
    t = index["totals"]
    assert (t["input_lines"], t["accepted_lines"], t["rejected_lines"]) == (len(manifest_lines), len(lines), len(rejected))
    assert index["kind"] == kind and index["config"]["max_samples_per_shard"] == 10
    assert all(s["samples"] <= 10 for s in index["shards"]) and len(index["shards"]) == -(-len(lines) // 10)
    for shard in index["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar:
                assert MEMBER_RE.match(member.name), member.name  # plain keys, never an input path
                assert (member.mtime, member.uid, member.gid, member.uname, member.mode) == (0, 0, 0, "", 0o644)
    problems, checked = verify(out, decode=True)
    assert problems == [] and checked["samples"] == len(lines)


def test_sample_content_matches_the_manifest(corpus, built_sets):
    by_line = {s.source.line: s for s in samples_of(built_sets["image_text"])}
    for line, record in enumerate(read_jsonl_lenient(corpus / "image_text.jsonl"), start=1):
        if line not in by_line or record is None:
            continue
        sample = by_line[line]
        assert sample.text == record["text"] and sample.source.id == record["id"]
        (m,) = sample.media
        source = (corpus / record["image"]).read_bytes()
        assert m.source == record["image"] and m.bytes == len(source)  # original bytes kept
        assert (m.width, m.height) == Image.open(io.BytesIO(source)).size
        assert m.name == sample.image and m.name.endswith(".png" if record["image"].endswith("png") else ".jpg")


def read_jsonl_lenient(path: Path) -> list:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append(None)
    return out


def test_image_text_validation_reasons(tmp_path):
    d = tmp_path
    (d / "a.png").write_bytes(png_bytes(64, 64))
    (d / "a_copy.png").write_bytes(png_bytes(64, 64))
    (d / "b.png").write_bytes(png_bytes(64, 40, color=(1, 2, 3)))
    (d / "big.png").write_bytes(png_bytes(300, 200, color=(9, 9, 9)))
    (d / "bomb.png").write_bytes(png_header_only(10_000, 5_000))
    (d / "small.png").write_bytes(png_bytes(20, 100))
    (d / "thin.png").write_bytes(png_bytes(29, 6000))
    full = png_bytes(90, 90, color=(50, 60, 70))
    (d / "trunc.png").write_bytes(full[: len(full) // 2])
    (d / "folder.png").mkdir()
    cases = [
        ("good", {"image": "a.png", "text": "a red circle"}, None),
        ("dup-path", {"image": "a.png", "text": "again"}, "duplicate_media"),
        ("dup-bytes", {"image": "a_copy.png", "text": "copy"}, "duplicate_media"),
        ("utf8", b'{"id": "utf8", "image": "b.png", "text": "caf\xe9"}', "invalid_utf8"),
        ("surrogate", '{"id": "surrogate", "image": "b.png", "text": "x\\ud800"}', "invalid_utf8"),
        ("type", {"image": "b.png", "text": 5}, "invalid_fields"),
        ("array", '["b.png", "text"]', "invalid_fields"),
        ("json", '{"id": "json", "image": "b.png", "text": "unclosed', "malformed_json"),
        ("long", {"image": "b.png", "text": "x" * 41}, "text_too_long"),
        ("special", {"image": "b.png", "text": "hi <|im_start|> there"}, "special_token"),
        ("bomb", {"image": "bomb.png", "text": "big"}, "decompression_bomb"),
        ("small", {"image": "small.png", "text": "small"}, "image_too_small"),
        ("thin", {"image": "thin.png", "text": "thin"}, "aspect_ratio"),
        ("dir", {"image": "folder.png", "text": "a folder"}, "unreadable_file"),
        ("missing", {"image": "nope.png", "text": "missing"}, "missing_file"),
        ("trunc", {"image": "trunc.png", "text": "truncated"}, "image_decode_error"),
        ("empty", {"image": "b.png", "text": " \t"}, "empty_text"),
        ("downscaled", {"image": "big.png", "text": "a big one"}, None),
        ("good2", {"image": "b.png", "text": "a blue one", "id": 42}, None),
    ]
    lines = [b"\xef\xbb\xbf"]  # a UTF-8 BOM before line 1 is allowed
    expected, line = {}, 0
    for i, (ident, record, reason) in enumerate(cases):
        if isinstance(record, dict):
            record = json.dumps({"id": ident, **record} if "id" not in record else record)
        lines.append((record if isinstance(record, bytes) else record.encode()) + b"\n")
        line += 1
        if reason:
            expected[line] = reason
        if i == 3:
            lines.append(b"   \r\n")  # a blank line: skipped, not an input
            line += 1
    manifest = d / "m.jsonl"
    manifest.write_bytes(b"".join(lines))
    summary = build("image_text", manifest, d / "out", max_text_chars=40, downscale_pixels=10_000)
    assert {r["line"]: r["reason"] for r in read_jsonl(d / "out" / "rejected.jsonl")} == expected
    index = json.loads((d / "out" / "index.json").read_text())
    assert index["totals"]["blank_lines"] == 1 and summary.input_lines == len(cases)
    accepted = {s.source.id: s for s in samples_of(d / "out")}
    assert set(accepted) == {"good", "downscaled", "42"}
    (m,) = accepted["downscaled"].media  # 300x200 -> smart_resize under 10,000 pixels -> 96x64, PNG
    assert (m.width, m.height, m.original_width, m.original_height, m.format) == (96, 64, 300, 200, "png")
    stored = {name: data for s in index["shards"] for key, parts in iter_shard(d / "out" / s["name"])
              for name, data in parts.items() if key == accepted["downscaled"].key}
    assert Image.open(io.BytesIO(stored[m.name])).size == (96, 64)
    dup = next(r for r in read_jsonl(d / "out" / "rejected.jsonl") if r["reason"] == "duplicate_media")
    assert "line 1" in dup["detail"]
    assert verify(d / "out")[0] == []


def write_manifest(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_interleaved_and_sft_rules(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(64, 64))
    (tmp_path / "b.png").write_bytes(png_bytes(48, 64, color=(200, 0, 0)))
    docs = write_manifest(tmp_path / "docs.jsonl", [
        {"id": "ok", "segments": [{"text": "look"}, {"image": "a.png"}, {"text": "and"}, {"image": "a.png"}]},
        {"id": "both", "segments": [{"text": "x", "image": "b.png"}]},
        {"id": "noimage", "segments": [{"text": "only words"}]},
        {"id": "notext", "segments": [{"image": "b.png"}]},
        {"id": "empty", "segments": []},
        # Consecutive text segments read as one text: a control token may not form across them (each
        # alone passes); across an image it cannot form.
        {"id": "joined", "segments": [{"image": "a.png"}, {"text": "see <|image"}, {"text": "_pad|> here"}]},
        {"id": "apart", "segments": [{"text": "see <|image"}, {"image": "b.png"}, {"text": "_pad|> here"}]},
    ])
    build("interleaved", docs, tmp_path / "docs")
    rejected = read_jsonl(tmp_path / "docs" / "rejected.jsonl")
    reasons = {json.loads(r["input"])["id"]: r["reason"] for r in rejected}
    assert reasons == {"both": "invalid_fields", "noimage": "invalid_fields", "notext": "empty_text",
                       "empty": "invalid_fields", "joined": "special_token"}
    assert any("segments[1].text and segments[2].text join into the control token <|image_pad|>" in r["detail"]
               for r in rejected), rejected
    doc, apart = sorted(samples_of(tmp_path / "docs"), key=lambda d: len(d.segments[0].text or ""))
    assert [p.type for p in apart.segments] == ["text", "image", "text"]
    assert [p.type for p in doc.segments] == ["text", "image", "text", "image"]
    assert len(doc.media) == 1 and doc.segments[1].image == doc.segments[3].image == "img0.png"  # stored once

    user_image = {"type": "image", "image": "b.png"}
    conversations = write_manifest(tmp_path / "sft.jsonl", [
        {"id": "ok", "messages": [{"role": "system", "content": "be brief"},
                                  {"role": "user", "content": [user_image, {"type": "text", "text": "colour?"}]},
                                  {"role": "assistant", "content": "red"}]},
        {"id": "late-system", "messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
                                           {"role": "assistant", "content": "yo"}]},
        {"id": "assistant-image", "messages": [{"role": "user", "content": "draw"},
                                               {"role": "assistant", "content": [user_image]}]},
        {"id": "no-answer", "messages": [{"role": "user", "content": "hi"}]},
        {"id": "bad-role", "messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"id": "bad-part", "messages": [{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]},
                                        {"role": "assistant", "content": "y"}]},
        {"id": "joined", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi <|im_"},
                                                                   {"type": "text", "text": "end|>"}]},
                                      {"role": "assistant", "content": "y"}]},
    ])
    build("sft", conversations, tmp_path / "sft")
    reasons = {json.loads(r["input"])["id"]: r["reason"] for r in read_jsonl(tmp_path / "sft" / "rejected.jsonl")}
    assert reasons == {**dict.fromkeys(["late-system", "assistant-image", "no-answer", "bad-role", "bad-part"],
                                       "invalid_fields"), "joined": "special_token"}
    (conv,) = samples_of(tmp_path / "sft")
    assert [m.role for m in conv.messages] == ["system", "user", "assistant"]
    assert conv.messages[0].content[0].text == "be brief"  # string content -> one text part
    assert conv.messages[1].content[0].image == conv.media[0].name == "img0.png"


def test_video_validation_and_caption_checks(tmp_path):
    (tmp_path / "v.mp4").write_bytes(encode_video(moving_frames(16), fps=8))  # 2.0 s
    (tmp_path / "w.mp4").write_bytes(encode_video(moving_frames(12), fps=8))
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 2048)
    (tmp_path / "still.mp4").write_bytes(encode_video(moving_frames(1), fps=8))  # the model needs 2 frames
    manifest = write_manifest(tmp_path / "v.jsonl", [
        {"id": "ok", "video": "v.mp4", "captions": [{"start": 0, "end": 2.1, "text": "moves"}]},  # 0.1 s late: clamped
        {"id": "late", "video": "w.mp4", "captions": [{"start": 0.5, "end": 2.5, "text": "too long"}]},
        {"id": "reversed", "video": "w.mp4", "captions": [{"start": 1.0, "end": 0.5, "text": "backwards"}]},
        {"id": "untitled", "video": "w.mp4"},
        {"id": "corrupt", "video": "bad.mp4", "text": "noise"},
        {"id": "nan", "video": "w.mp4", "captions": [{"start": float("nan"), "end": 1, "text": "x"}]},
        {"id": "still", "video": "still.mp4", "text": "one frame"},
    ])
    build("video", manifest, tmp_path / "out")
    reasons = {json.loads(r["input"])["id"]: r["reason"] for r in read_jsonl(tmp_path / "out" / "rejected.jsonl")}
    assert reasons == {"late": "caption_out_of_range", "reversed": "caption_out_of_range", "untitled": "empty_text",
                       "corrupt": "video_decode_error", "nan": "invalid_fields", "still": "no_usable_frames"}
    (sample,) = samples_of(tmp_path / "out")
    assert sample.captions[0].end == 2.0 and sample.clip is None
    m = sample.media[0]
    assert (m.num_frames, m.fps, m.duration, m.backend) == (16, 8.0, 2.0, "decord")
    assert m.sha256 == hashlib.sha256((tmp_path / "v.mp4").read_bytes()).hexdigest()  # original bytes kept


def test_clips_hold_at_least_one_temporal_patch_of_frames():
    from data_tools.kinds.video import clip_frame_ranges

    assert clip_frame_ranges(24, 4, 2.5) == [(0, 10), (10, 20), (20, 24)]
    # A 1-frame rest (5.125 s at 8 fps, cut at 5 s) joins the clip before it: the model needs 2 frames.
    assert clip_frame_ranges(41, 8, 5.0) == [(0, 41)]
    assert clip_frame_ranges(81, 8, 5.0) == [(0, 40), (40, 81)]
    assert clip_frame_ranges(5, 10, 0.1) == [(0, 2), (2, 5)]  # no clip of fewer than 2 frames


def test_long_videos_are_cut_into_clips_with_retimed_captions(tmp_path):
    (tmp_path / "long.mp4").write_bytes(encode_video(moving_frames(24), fps=4))  # 6.0 s at 4 fps
    (tmp_path / "short.mp4").write_bytes(encode_video(moving_frames(8), fps=4))  # 2.0 s: not cut
    manifest = write_manifest(tmp_path / "v.jsonl", [
        {"id": "long", "video": "long.mp4", "text": "a bar moves right",
         "captions": [{"start": 0.0, "end": 1.0, "text": "start"}, {"start": 1.0, "end": 6.0, "text": "moving"},
                      {"start": 5.5, "end": 5.5, "text": "instant"}]},
        {"id": "short", "video": "short.mp4", "text": "short"},
    ])
    build("video", manifest, tmp_path / "out", max_clip_seconds=2.5, max_samples_per_shard=2)
    samples = samples_of(tmp_path / "out")
    assert [s.key for s in samples] == ["000000001_0000", "000000001_0001", "000000001_0002", "000000002"]
    clips = samples[:3]
    assert [(c.clip.index, c.clip.count, c.clip.start, c.clip.end) for c in clips] == [
        (0, 3, 0.0, 2.5), (1, 3, 2.5, 5.0), (2, 3, 5.0, 6.0)]
    assert [[(c.start, c.end, c.text) for c in s.captions] for s in clips] == [
        [(0.0, 1.0, "start"), (1.0, 2.5, "moving")],
        [(0.0, 2.5, "moving")],
        [(0.0, 1.0, "moving"), (0.5, 0.5, "instant")],
    ]
    assert all(s.text == "a bar moves right" for s in clips)
    assert [s.media[0].num_frames for s in clips] == [10, 10, 4]
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    members = {key: parts for s in index["shards"] for key, parts in iter_shard(tmp_path / "out" / s["name"])}
    second = members["000000001_0001"]["vid0.mp4"]
    frames = media.read_video_frames(second, [0, 9])
    assert [bar_column(f) for f in frames] == [20, 38]  # source frames 10 and 19
    assert samples[3].clip is None and samples[3].media[0].num_frames == 8
    assert index["totals"]["accepted_lines"] == 2 and index["totals"]["samples"] == 4
    assert verify(tmp_path / "out", decode=True)[0] == []


def built_files(out: Path) -> dict[str, bytes]:
    """Every file a build writes for the trainer and the user (energon's .nv-meta aside: it holds a uuid)."""
    index = json.loads((out / "index.json").read_text())
    names = ["index.json", "rejected.jsonl", *(s["name"] for s in index["shards"])]
    assert sorted(p.name for p in out.glob("shard-*.tar")) == sorted(s["name"] for s in index["shards"])
    return {name: (out / name).read_bytes() for name in names}


@pytest.mark.parametrize("kind, options", [
    ("image_text", dict(max_samples_per_shard=4, max_shard_bytes=12_000)),
    ("interleaved", dict(max_samples_per_shard=3)),
    ("video", dict(max_samples_per_shard=4, max_clip_seconds=1.5)),  # clips: decoded and re-encoded to H.264
    ("sft", dict(max_samples_per_shard=4)),  # images and videos
])
def test_builds_are_byte_identical_whatever_the_workers(kind, options, corpus, tmp_path):
    manifest = corpus / KIND_MANIFESTS[kind]
    build(kind, manifest, tmp_path / "w0", workers=0, **options)
    build(kind, manifest, tmp_path / "w2", workers=2, **options)
    one, two = built_files(tmp_path / "w0"), built_files(tmp_path / "w2")
    assert one.keys() == two.keys() and len(one) > 4  # index.json, rejected.jsonl and at least 3 shards
    for name in one:
        assert one[name] == two[name], name
    samples = samples_of(tmp_path / "w0")
    if kind == "video":
        assert sum(s.clip is not None for s in samples) > len({s.source.line for s in samples})  # videos were cut
    if kind == "image_text":  # both limits hold, and the byte limit cut some shards early
        shards = json.loads(one["index.json"])["shards"]
        assert all(s["samples"] <= 4 and (s["bytes"] <= 12_000 or s["samples"] == 1) for s in shards)
        assert any(s["samples"] < 4 for s in shards[:-1])


def crash_on_line_30(task):
    """Stands in for a decoder that segfaults on one input: the worker process dies."""
    line, raw = task
    if line == 30:
        os._exit(1)
    return LineResult(line)


@pytest.mark.parametrize("consumer_seconds", [0.0, 0.05])
def test_a_worker_that_dies_rejects_only_its_line(tmp_path, consumer_seconds):
    # Line 30 comes in a chunk of many lines (they are quick): only it is rejected, every other line has its
    # result. A slow consumer (the build writes shards between results) finds the pool already broken when
    # it hands out the next chunk, not when it collects one.
    config = BuildConfig(kind="image_text", manifest=str(tmp_path / "m.jsonl"), out=str(tmp_path / "o"), workers=1)
    tasks = iter([(line, b"{}") for line in range(1, 81)])
    results = []
    for _, result in ordered_results(tasks, config, fn=crash_on_line_30):
        results.append(result)
        time.sleep(consumer_seconds)
    assert [r.line for r in results] == list(range(1, 81))
    assert {r.line: r.reason for r in results if r.reason} == {30: "worker_crash"}


def make_samples_with_a_bug(record: dict, ctx):
    """image_text's make_samples with a real bug on valid lines whose caption names a background: it
    reads an option that BuildConfig does not have (an AttributeError, as a typo would raise)."""
    made = make_image_text_samples(record, ctx)
    if "background" in record["text"]:
        ctx.config.max_caption_chars
    return made


def process_line_with_a_bug(task):
    """process_line in a worker process, over the buggy kind (spawned workers do not see a monkeypatch)."""
    from data_tools import build as driver

    driver._WORKER["make"] = make_samples_with_a_bug
    return driver.process_line(task)


def test_a_bug_is_an_internal_error_apart_from_the_rejections(corpus, tmp_path, monkeypatch, capsys):
    from data_tools import build as driver
    from data_tools.kinds import image_text
    from data_tools.validation import Rejected

    manifest = corpus / "image_text.jsonl"
    records = read_jsonl_lenient(manifest)
    bad = {b["line"]: b["reason"] for b in json.loads((corpus / "synth.json").read_text())["bad_lines"]["image_text.jsonl"]}
    buggy = {line for line, r in enumerate(records, start=1) if r and line not in bad and "background" in r["text"]}
    assert 0 < len(buggy) < len(records) - len(bad)

    monkeypatch.setattr(image_text, "make_samples", make_samples_with_a_bug)
    out = tmp_path / "out"
    config = BuildConfig(kind="image_text", manifest=str(manifest), out=str(out), workers=0, progress=False)
    assert driver.run_build_command(config, "build-image-text") == driver.EXIT_INTERNAL_ERROR
    printed = capsys.readouterr()
    assert f"INTERNAL ERRORS: {len(buggy)} lines" in printed.out and "max_caption_chars" in printed.out
    assert "internal error (a bug in data_tools" in printed.err

    # The bad inputs are rejected as before; the lines that hit the bug are not rejections.
    assert {r["line"]: r["reason"] for r in read_jsonl(out / "rejected.jsonl")} == bad
    errors = read_jsonl(out / "internal_errors.jsonl")
    assert [e["line"] for e in errors] == sorted(buggy)
    for e in errors:
        assert e["error"].startswith("AttributeError:") and "max_caption_chars" in e["error"]
        assert "make_samples_with_a_bug" in e["traceback"] and e["input"] == manifest.read_text().splitlines()[e["line"] - 1]
    totals = json.loads((out / "index.json").read_text())["totals"]
    assert totals["failed_lines"] == len(buggy) and totals["rejected_lines"] == len(bad)
    assert totals["accepted_lines"] + totals["rejected_lines"] + totals["failed_lines"] == totals["input_lines"]
    assert not {s.source.line for s in samples_of(out)} & buggy
    problems, _ = verify(out)
    assert len(problems) == 1 and f"{len(buggy)} input lines failed on an internal error" in problems[0]
    # A finished set keeps saying so.
    resumed = BuildConfig(kind="image_text", manifest=str(manifest), out=str(out), workers=0, progress=False, resume=True)
    assert driver.run_build_command(resumed, "build-image-text") == driver.EXIT_INTERNAL_ERROR

    # The same classification when the bug runs in worker processes.
    tasks = list(driver.iter_manifest(manifest))
    results = [r for _, r in ordered_results(iter(tasks), replace(config, workers=2), fn=process_line_with_a_bug)]
    assert {r.line for r in results if r.error} == buggy
    assert {r.line: r.reason for r in results if r.reason} == bad
    # A rejection reason that does not exist is a bug too, not a rejection.
    with pytest.raises(ValueError, match="unknown reason 'no_such_reason'"):
        Rejected("no_such_reason", "x")


def test_output_folder_rules(corpus, tmp_path):
    manifest = corpus / "sft.jsonl"
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match="not empty"):
        build("sft", manifest, out)
    with pytest.raises(BuildError, match="nothing to resume|holds no interrupted build"):
        build("sft", manifest, out, resume=True)
    build("sft", manifest, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only what a build writes
    with pytest.raises(BuildError, match="max_samples_per_shard"):
        build("sft", manifest, out, resume=True, max_samples_per_shard=3)
    summary = build("sft", manifest, out, resume=True)  # complete already: nothing to do
    assert summary.samples_this_run == 0 and summary.samples == json.loads((out / "index.json").read_text())["totals"]["samples"]
    with pytest.raises(BuildError, match="does not exist"):
        build("sft", tmp_path / "missing.jsonl", tmp_path / "x")


def test_cli(corpus, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-m", "data_tools", "build-interleaved", "--manifest", str(corpus / "interleaved.jsonl"),
         "--out", str(tmp_path / "out"), "--workers", "1"],
        capture_output=True, text=True, env=env, cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    assert "input lines ->" in run.stdout and "rejected by reason: missing_file 1" in run.stdout
    assert "build interleaved" in run.stderr  # the progress bar
    again = subprocess.run([sys.executable, "-m", "data_tools", "build-interleaved", "--manifest", str(corpus / "interleaved.jsonl"),
                            "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=REPO)
    assert again.returncode == 2 and "--resume" in again.stderr
    from data_tools.__main__ import COMMANDS, main

    for command in COMMANDS:
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
