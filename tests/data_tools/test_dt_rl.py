"""build-rl: RL prompt sets (validation and rejection reasons, determinism) and synth's rl.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dt_helpers import build, read_jsonl

from data_tools.inspect_set import describe
from data_tools.schema import RlSample, SchemaError, sample_from_dict, sample_from_json, sample_to_dict
from data_tools.shards import iter_shard
from data_tools.synth import COLOURS, DIRECTIONS, SHAPES, BACKGROUNDS, ImageSpec, VideoSpec, encode_image, encode_synth_video
from data_tools.verify import verify

REPO = Path(__file__).resolve().parents[2]


def samples_of(out: Path) -> list:
    index = json.loads((out / "index.json").read_text())
    return [sample_from_json(parts["json"]) for s in index["shards"] for _, parts in iter_shard(out / s["name"])]


def user(*content) -> dict:
    return {"role": "user", "content": list(content)}


def image(path: str) -> dict:
    return {"type": "image", "image": path}


def text(words: str) -> dict:
    return {"type": "text", "text": words}


def hand_made_manifest(root: Path) -> tuple[Path, dict[int, str]]:
    """Good prompts (image, video, text only, a system turn, answer null with another reward) and one
    broken line per rule; returns (manifest, {line: expected rejection reason})."""
    root.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(("red", "blue", "green")):
        (root / f"img{i}.png").write_bytes(encode_image(ImageSpec(colour, "circle", "white", 96, 80, 48, 40, 20, "png")))
    (root / "clip.mp4").write_bytes(encode_synth_video(VideoSpec("red", "star", "black", "left", 96, 64, 12, 2.0, 0.5, 30)))
    truncated = (root / "img0.png").read_bytes()
    (root / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    q = text("What colour is the shape?")
    lines: list[tuple[object, str | None]] = [
        ({"id": "img", "messages": [user(image("img0.png"), q)], "answer": "red"}, None),
        ({"messages": [{"role": "system", "content": "Answer in one word."}, user(image("img1.png"), q)],
          "answer": "blue", "reward": "exact_match"}, None),
        ({"id": "vid", "messages": [user({"type": "video", "video": "clip.mp4"}, text("Which way does the star move?"))],
          "answer": "left"}, None),
        ({"id": "text-only", "messages": [user(text("Say something polite."))], "answer": None, "reward": "format"}, None),
        ({"messages": [user(image("img2.png"), q), {"role": "assistant", "content": "green"}], "answer": "green"}, "invalid_fields"),
        ({"messages": [{"role": "system", "content": "Be brief."}], "answer": "x"}, "invalid_fields"),  # no user turn
        ({"messages": [user(image("img2.png"), q)]}, "invalid_fields"),  # no answer field
        ({"messages": [user(image("img2.png"), q)], "answer": 3}, "invalid_fields"),  # answer of the wrong type
        ({"messages": [user(image("img2.png"), q)], "answer": "  "}, "empty_text"),
        ({"messages": [user(image("img2.png"), q)], "answer": "red<|im_end|>"}, "special_token"),
        ({"messages": [user(image("img2.png"), q)], "answers": "green"}, "invalid_fields"),  # unknown key
        ({"messages": [user(image("img2.png"), q)], "answer": "green", "reward": "exact match"}, "invalid_fields"),
        ({"messages": [user(image("img2.png"), q)], "answer": "green", "reward": ""}, "invalid_fields"),
        ({"messages": [user(image("img2.png"), text(" "))], "answer": "green"}, "empty_text"),  # empty prompt
        ({"messages": [], "answer": "green"}, "invalid_fields"),
        ({"messages": [user(image("missing.png"), q)], "answer": "green"}, "missing_file"),
        ({"messages": [user(image("truncated.png"), q)], "answer": "red"}, "image_decode_error"),
        ({"messages": [user(image("img0.png"), text("What shape is it?"))], "answer": "circle"}, "duplicate_media"),
        ('{"messages": [', "malformed_json"),
        ({"id": "last-good", "messages": [user(image("img2.png"), q)], "answer": "green"}, None),
    ]
    manifest = root / "rl.jsonl"
    manifest.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r, _ in lines))
    return manifest, {n: reason for n, (_, reason) in enumerate(lines, start=1) if reason}


def test_build_rl_accepts_prompts_and_rejects_each_broken_line_with_its_reason(tmp_path):
    manifest, expected = hand_made_manifest(tmp_path / "raw")
    summary = build("rl", manifest, tmp_path / "set")
    rejected = read_jsonl(tmp_path / "set" / "rejected.jsonl")
    assert {r["line"]: r["reason"] for r in rejected} == expected
    details = {r["line"]: r["detail"] for r in rejected}
    assert "assistant" in details[5] and "end with a user" in details[6] and "'answer'" in details[7]
    assert "answers" in details[11] and "reward" in details[12]
    assert (summary.input_lines, summary.accepted_lines, summary.rejected_lines) == (20, 5, 15)
    samples = samples_of(tmp_path / "set")
    assert all(isinstance(s, RlSample) for s in samples)
    by_id = {s.source.id or s.key: s for s in samples}
    assert [(by_id[i].answer, by_id[i].reward) for i in ("img", "vid", "text-only", "last-good")] == [
        ("red", "exact_match"), ("left", "exact_match"), (None, "format"), ("green", "exact_match")]
    system = by_id["000000002"]
    assert [m.role for m in system.messages] == ["system", "user"] and system.answer == "blue"
    assert [p.type for p in by_id["vid"].messages[0].content] == ["video", "text"] and by_id["vid"].media[0].type == "video"
    assert by_id["text-only"].media == ()
    problems, checked = verify(tmp_path / "set", decode=True)
    assert problems == [] and checked["samples"] == 5
    assert describe(by_id["img"])[-2:] == ["    user: <img0.png> What colour is the shape?", "    answer: red  [reward exact_match]"]


def test_the_schema_refuses_an_rl_sample_that_is_not_a_prompt(tmp_path):
    manifest, _ = hand_made_manifest(tmp_path / "raw")
    build("rl", manifest, tmp_path / "set")
    sample = sample_to_dict(next(s for s in samples_of(tmp_path / "set") if s.source.id == "text-only"))
    assert sample_from_dict(sample).answer is None  # null answers survive the round trip
    hi = [{"type": "text", "text": "hi"}]
    for messages, words in (([*sample["messages"], {"role": "assistant", "content": hi}], "role must be one of"),
                            ([{"role": "system", "content": hi}], "must end with a user message")):
        with pytest.raises(SchemaError, match=words):
            sample_from_dict({**sample, "messages": messages})


def test_build_rl_is_byte_identical_whatever_the_workers_and_resumes(tmp_path):
    manifest, _ = hand_made_manifest(tmp_path / "raw")
    build("rl", manifest, tmp_path / "w0", max_samples_per_shard=2)
    cli = [sys.executable, "-m", "data_tools", "build-rl", "--manifest", str(manifest), "--out", str(tmp_path / "w2"),
           "--workers", "2", "--max-samples-per-shard", "2", "--no-progress"]
    done = subprocess.run(cli, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "5 samples from 5 lines in 3 shards" in done.stdout and "15 lines rejected" in done.stdout
    names = ["index.json", "rejected.jsonl", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for name in names:
        assert (tmp_path / "w0" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    again = subprocess.run([*cli, "--resume"], capture_output=True, text=True, cwd=REPO)  # a finished build stays as it is
    assert again.returncode == 0 and all((tmp_path / "w0" / n).read_bytes() == (tmp_path / "w2" / n).read_bytes() for n in names)


def _media_paths(record: dict) -> set[str]:
    if "media" in record:  # eval.jsonl
        return {record["media"]}
    return {item.get("image") or item.get("video") for m in record.get("messages", []) if isinstance(m["content"], list)
            for item in m["content"] if item["type"] != "text"}


def test_synth_rl_manifest_asks_about_media_of_its_own_and_builds(corpus, built_sets):
    synth = json.loads((corpus / "synth.json").read_text())
    good = [r for r in read_jsonl(corpus / "rl.jsonl") if r["id"].startswith("rl-")]
    assert len(good) == synth["counts"]["rl"] == 8
    vocabulary = set(COLOURS) | set(SHAPES) | set(BACKGROUNDS) | set(DIRECTIONS)
    for record in good:
        assert record["reward"] == "exact_match" and record["answer"] in vocabulary
        assert [m["role"] for m in record["messages"]][-1] == "user"
        assert all(m["role"] != "assistant" for m in record["messages"])
    rl_media = set().union(*(_media_paths(r) for r in good))
    assert len(rl_media) == len(good) and all(p.startswith("rl_media/") and (corpus / p).is_file() for p in rl_media)
    others = set()
    for name in ("sft.jsonl", "eval.jsonl"):
        others |= set().union(*(_media_paths(r) for r in read_jsonl(corpus / name)))
    assert others and not rl_media & others
    index = json.loads((built_sets["rl"] / "index.json").read_text())
    assert index["kind"] == "rl" and index["totals"]["samples"] == len(good)
    assert {b["reason"] for b in synth["bad_lines"]["rl.jsonl"]} == {"missing_file", "invalid_fields"}
    answers = {s.source.id: s.answer for s in samples_of(built_sets["rl"])}
    assert answers == {r["id"]: r["answer"] for r in good}
