"""Manifest fields: media only in user messages (build-sft, build-rl, the chat importers), unknown
top-level keys rejected by every kind, a message's keys and its ``loss`` flag (build-sft, import-messages,
build-rl), and train-tokenizer skipping times that are not finite."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from dt_helpers import build, read_jsonl
from test_dt_media import moving_frames, png_bytes

from data_tools import train_tokenizer
from data_tools.build import run_build
from data_tools.config import BuildConfig
from data_tools.kinds import image_text, interleaved, rl, sft, video
from data_tools.schema import sample_from_json
from data_tools.shards import iter_shard
from common.media.encode import encode_video


def samples_of(out: Path) -> list:
    index = json.loads((out / "index.json").read_text())
    return [sample_from_json(parts["json"]) for s in index["shards"] for _, parts in iter_shard(out / s["name"])]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def reasons_and_details(out: Path) -> dict[int, tuple[str, str]]:
    return {r["line"]: (r["reason"], r["detail"]) for r in read_jsonl(out / "rejected.jsonl")}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """Distinct images a.png ... f.png (a medium seen in an earlier sample is a duplicate) and a video."""
    root = tmp_path_factory.mktemp("field_media")
    for i, name in enumerate("abcdef"):
        (root / f"{name}.png").write_bytes(png_bytes(64, 48, color=(40 * i, 200 - 30 * i, 7 * i)))
    (root / "v.mp4").write_bytes(encode_video(moving_frames(12), fps=8))
    return root


def image(path: str) -> dict:
    return {"type": "image", "image": path}


def text(words: str) -> dict:
    return {"type": "text", "text": words}


def msg(role: str, content) -> dict:
    return {"role": role, "content": content}


# ----------------------------------------------------------------------------------------------------
# Media only in user messages
# ----------------------------------------------------------------------------------------------------


def test_media_outside_user_messages_are_rejected_by_build_sft_and_build_rl(media):
    question = msg("user", [image("a.png"), text("What colour?")])
    sft_lines = [
        {"messages": [msg("system", [image("b.png"), text("You see this.")]), msg("user", "Colour?"), msg("assistant", "Red.")]},
        {"messages": [msg("system", [{"type": "video", "video": "v.mp4"}]), msg("user", "What moves?"),
                      msg("assistant", "A bar.")]},
        {"messages": [msg("user", "Draw it."), msg("assistant", [text("Here:"), image("c.png")])]},
        {"messages": [msg("system", "Be brief."), question, msg("assistant", "Green.")]},
    ]
    build("sft", write_jsonl(media / "sft.jsonl", sft_lines), media / "sft_set")
    assert reasons_and_details(media / "sft_set") == {
        1: ("invalid_fields", "messages[0] (system): content[0] is image content, which is only allowed in user messages"),
        2: ("invalid_fields", "messages[0] (system): content[0] is video content, which is only allowed in user messages"),
        3: ("invalid_fields", "messages[1] (assistant): content[1] is image content, which is only allowed in user messages"),
    }
    assert [s.source.line for s in samples_of(media / "sft_set")] == [4]

    rl_lines = [
        {"messages": [msg("system", [image("d.png"), text("Look.")]), msg("user", "Which colour?")], "answer": "red"},
        {"messages": [msg("system", "One word."), msg("user", [image("e.png"), text("Which colour?")])], "answer": "red"},
    ]
    build("rl", write_jsonl(media / "rl.jsonl", rl_lines), media / "rl_set")
    assert reasons_and_details(media / "rl_set") == {
        1: ("invalid_fields", "messages[0] (system): content[0] is image content, which is only allowed in user messages")}


def import_sft(importer: str, records: list[dict], media: Path, out: Path):
    manifest = write_jsonl(out.parent / f"{out.name}.jsonl", records)
    config = BuildConfig(kind="sft", manifest=str(manifest), out=str(out), media_root=str(media), importer=importer,
                         workers=0, progress=False)
    return run_build(config)


def test_the_chat_importers_share_the_rule_and_ignore_their_other_fields(media, tmp_path):
    llava = [
        {"id": "system-image", "image": "a.png",
         "conversations": [{"from": "system", "value": "<image>\nYou see this."}, {"from": "human", "value": "Colour?"},
                           {"from": "gpt", "value": "Red."}]},
        # A dataset's own fields (LLaVA's "source", "meta") are not the importer's to check: ignored.
        {"id": "ok", "image": "b.png", "source": "coco", "meta": {"split": "train"},
         "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Green."}]},
    ]
    import_sft("llava", llava, media, tmp_path / "llava")
    ((line, (reason, detail)),) = reasons_and_details(tmp_path / "llava").items()
    assert (line, reason) == (1, "invalid_fields") and detail.startswith("messages[0] (system): content[0] is image")
    assert [s.source.id for s in samples_of(tmp_path / "llava")] == ["ok"]

    messages = [
        {"id": "system-image", "messages": [msg("system", [image("c.png")]), msg("user", "Colour?"), msg("assistant", "Red.")]},
        {"id": "swift", "images": ["d.png"], "dataset": "mine", "messages": [msg("user", "<image>Colour?"), msg("assistant", "Red.")]},
    ]
    import_sft("messages", messages, media, tmp_path / "messages")
    ((line, (reason, detail)),) = reasons_and_details(tmp_path / "messages").items()
    assert (line, reason) == (1, "invalid_fields") and detail.startswith("messages[0] (system): content[0] is image")
    assert [s.source.id for s in samples_of(tmp_path / "messages")] == ["swift"]


# ----------------------------------------------------------------------------------------------------
# Unknown top-level keys
# ----------------------------------------------------------------------------------------------------


def test_every_kind_rejects_unknown_keys_and_accepts_its_documented_ones(media, tmp_path):
    user = msg("user", [image("f.png"), text("Colour?")])
    cases = {  # kind: (a line with every documented key, the same with a misspelt one, the keys listed)
        "image_text": ({"id": "x", "image": "a.png", "text": "a shape"},
                       {"image": "b.png", "text": "a shape", "caption": "lost"}, "an image-text line", image_text.KEYS),
        "interleaved": ({"id": "x", "segments": [{"text": "Look:"}, {"image": "c.png"}]},
                        {"segments": [{"text": "Look:"}, {"image": "d.png"}], "title": "lost"}, "an interleaved line",
                        interleaved.KEYS),
        "video": ({"id": "x", "video": "v.mp4", "text": "a bar", "captions": [{"start": 0, "end": 1, "text": "moves"}]},
                  {"video": "v.mp4", "text": "a bar", "caption": [{"start": 0, "end": 1, "text": "lost"}]}, "a video line",
                  video.KEYS),
        "sft": ({"id": "x", "messages": [user, msg("assistant", "Red.")]},
                {"messages": [msg("user", "Hi."), msg("assistant", "Hello.")], "system": "lost"}, "an SFT line", sft.KEYS),
        "rl": ({"id": "x", "messages": [user], "answer": "red", "reward": "exact_match"},
               {"messages": [msg("user", "Say hi.")], "answer": None, "answers": ["lost"]}, "an RL prompt line", rl.KEYS),
    }
    for kind, (good, misspelt, what, keys) in cases.items():
        assert set(good) == set(keys), kind  # the good line uses every key the kind documents
        out = tmp_path / kind
        build(kind, write_jsonl(media / f"keys_{kind}.jsonl", [good, misspelt]), out)
        (extra,) = set(misspelt) - set(keys)
        assert reasons_and_details(out) == {
            2: ("invalid_fields", f"unknown field(s) ['{extra}']; {what} has {list(keys)}")}, kind
        assert [(s.source.line, s.source.id) for s in samples_of(out)] == [(1, "x")], kind


# ----------------------------------------------------------------------------------------------------
# A message's keys and ms-swift's per-message "loss"
# ----------------------------------------------------------------------------------------------------

# The sample JSON build-sft wrote for this line before messages could carry "loss" (captured then): a line
# without the flag must keep its bytes.
NO_LOSS_LINE = {"id": "a", "messages": [msg("system", "Be brief."), msg("user", "Hi."), msg("assistant", "Hello."),
                                        msg("user", "Colour?"), msg("assistant", [text("Red.")])]}
NO_LOSS_JSON = (b'{"key":"000000001","kind":"sft","media":[],"messages":[{"content":[{"text":"Be brief.","type":"text"}],'
                b'"role":"system"},{"content":[{"text":"Hi.","type":"text"}],"role":"user"},{"content":[{"text":"Hello.",'
                b'"type":"text"}],"role":"assistant"},{"content":[{"text":"Colour?","type":"text"}],"role":"user"},'
                b'{"content":[{"text":"Red.","type":"text"}],"role":"assistant"}],"schema_version":1,'
                b'"source":{"id":"a","line":1,"manifest":"m.jsonl"}}')


def untrained(role: str, content, loss=False) -> dict:
    return {**msg(role, content), "loss": loss}


def sample_jsons(out: Path) -> list[bytes]:
    index = json.loads((out / "index.json").read_text())
    return [parts["json"] for s in index["shards"] for _, parts in iter_shard(out / s["name"])]


def shard_bytes(out: Path) -> list[bytes]:
    return [(out / s["name"]).read_bytes() for s in json.loads((out / "index.json").read_text())["shards"]]


def test_message_keys_and_loss_are_checked_and_stored(tmp_path):
    lines = [
        {"id": "context-turn", "messages": [msg("user", "Hi."), untrained("assistant", "Hello."), msg("user", "Colour?"),
                                            msg("assistant", "Red.")]},
        {"messages": [msg("user", "Hi."), {**msg("assistant", "Hello."), "weight": 0.5}]},
        {"messages": [msg("user", "Hi."), untrained("assistant", "Hello.", loss="false")]},
        {"messages": [msg("user", "Hi."), untrained("assistant", "Hello.", loss=0)]},
        {"messages": [untrained("user", "Hi."), msg("assistant", "Hello.")]},
        {"messages": [msg("user", "Hi."), untrained("assistant", "Hello."), msg("user", "And?"),
                      untrained("assistant", "Bye.")]},
        {"id": "explicit", "messages": [msg("user", "Q"), untrained("assistant", "A", loss=True)]},
        {"id": "null", "messages": [untrained("user", "Q", loss=None), untrained("assistant", "A", loss=None)]},
    ]
    build("sft", write_jsonl(tmp_path / "m.jsonl", lines), tmp_path / "set")
    assert reasons_and_details(tmp_path / "set") == {
        2: ("invalid_fields", "unknown field(s) ['messages[1].weight']; a message has ['role', 'content', 'loss']"),
        3: ("invalid_fields", "field 'messages[1].loss' must be bool, got str"),
        4: ("invalid_fields", "field 'messages[1].loss' must be bool, got int"),
        5: ("invalid_fields", "messages[0].loss: only assistant messages are SFT targets and take 'loss', "
                              "this one is a user message"),
        6: ("invalid_fields", 'every assistant message has "loss": false: the conversation has no SFT target'),
    }
    first, explicit, null = sample_jsons(tmp_path / "set")
    assert [m.get("loss") for m in json.loads(first)["messages"]] == [None, False, None, None]  # written only when false
    assert [m.loss for m in sample_from_json(first).messages] == [True, False, True, True]
    # "loss": true (or null) is the default: the sample is the one the line without it gives, byte for byte.
    assert [m.loss for m in sample_from_json(explicit).messages] == [True, True] and b"loss" not in explicit + null


def test_a_line_without_loss_keeps_its_bytes_and_loss_true_changes_nothing(tmp_path):
    build("sft", write_jsonl(tmp_path / "m.jsonl", [NO_LOSS_LINE]), tmp_path / "plain")
    assert sample_jsons(tmp_path / "plain") == [NO_LOSS_JSON]
    marked = {**NO_LOSS_LINE, "messages": [m if m["role"] != "assistant" else {**m, "loss": True}
                                           for m in NO_LOSS_LINE["messages"]]}
    (tmp_path / "marked").mkdir()  # the same manifest name: it is in the sample JSON
    build("sft", write_jsonl(tmp_path / "marked" / "m.jsonl", [marked]), tmp_path / "marked_set")
    assert shard_bytes(tmp_path / "marked_set") == shard_bytes(tmp_path / "plain")


def test_import_messages_keeps_swift_loss_and_rl_rejects_it(media, tmp_path):
    records = [
        {"id": "swift", "messages": [msg("user", "Hi."), untrained("assistant", "Hello."), msg("user", "Bye."),
                                     msg("assistant", "Bye!")]},
        {"id": "extra", "messages": [msg("user", "Hi."), {**msg("assistant", "Hello."), "name": "bot"}]},
    ]
    import_sft("messages", records, media, tmp_path / "messages")
    assert reasons_and_details(tmp_path / "messages") == {
        2: ("invalid_fields", "unknown field(s) ['messages[1].name']; a message has ['role', 'content', 'loss']")}
    (sample,) = samples_of(tmp_path / "messages")
    assert [m.loss for m in sample.messages] == [True, False, True, True]

    prompts = [{"messages": [untrained("user", "Say hi.")], "answer": "hi"},
               {"messages": [msg("user", "Say hi."), untrained("assistant", "hi")], "answer": "hi"},
               {"messages": [msg("user", "Say hi.")], "answer": "hi"}]
    build("rl", write_jsonl(tmp_path / "rl.jsonl", prompts), tmp_path / "rl")
    assert reasons_and_details(tmp_path / "rl") == {
        1: ("invalid_fields", "messages[0].loss: only assistant messages are SFT targets and take 'loss', "
                              "this one is a user message"),
        2: ("invalid_fields", "messages[1]: an RL prompt has no assistant turn (the policy writes it)"),
    }


# ----------------------------------------------------------------------------------------------------
# train-tokenizer: times that are not finite
# ----------------------------------------------------------------------------------------------------


def test_train_tokenizer_skips_lines_whose_times_are_not_finite(tmp_path, capsys):
    lines = [json.dumps({"image": f"i{i}.png", "text": f"a {colour} circle on a white background"})
             for i, colour in enumerate(["red", "green", "blue", "yellow"] * 5)]
    lines += [
        '{"video": "v.mp4", "captions": [{"start": 0, "end": 1e999, "text": "a caption"}]}',  # inf: int(inf) overflowed
        '{"video": "v.mp4", "captions": [{"start": -1e999, "end": 1, "text": "a caption"}]}',
        '{"video": "v.mp4", "captions": [{"start": 0, "end": NaN, "text": "a caption"}]}',
        '{"video": "v.mp4", "text": "a bar moves", "duration": 1e999}',
        json.dumps({"video": "v.mp4", "captions": [{"start": 0, "end": 10 ** 400, "text": "a caption"}]}),
        json.dumps({"video": "v.mp4", "text": "a bar moves", "captions": [{"start": 0.5, "end": 2.0, "text": "it moves"}]}),
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    parser = argparse.ArgumentParser()
    train_tokenizer.add_arguments(parser)
    args = parser.parse_args(["--manifest", str(manifest), "--vocab-size", "400", "--min-frequency", "1",
                              "--out", str(tmp_path / "tok"), "--no-progress"])
    assert train_tokenizer.run(args) == 0
    assert "skipped 5 line(s)" in capsys.readouterr().out
    info = json.loads((tmp_path / "tok" / "tokenizer_info.json").read_text())
    assert sum(info["skipped"].values()) == 5
    assert all("is not a finite number of seconds" in reason for reason in info["skipped"])
    assert info["texts"] == 20 + 3  # the last video line: its text, its caption, its timestamps
