"""import-llava and import-messages: other layouts in, the shard set build-sft writes out.

Small hand-made inputs with good and broken records: exact accounting and reasons, the same shards as
build-sft on the equivalent native manifest (written out by hand here, not by the importers), JSON
arrays, byte-identical output whatever --workers, --resume, and the trainer's loader on the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dt_helpers import build, read_jsonl
from test_dt_media import moving_frames, png_bytes
from test_dt_resume import _crash_after, shard_bytes

from data_tools.__main__ import main
from data_tools.build import BuildError, run_build
from data_tools.config import BuildConfig
from data_tools.schema import sample_from_json
from data_tools.shards import iter_shard
from data_tools.verify import verify
from common.media.encode import encode_video


def write_media(root: Path) -> Path:
    """Distinct images (the build rejects a medium seen in an earlier sample), two videos, a broken PNG."""
    root.mkdir(parents=True, exist_ok=True)
    colours = {"a": (0, 200, 0), "b": (200, 0, 0), "c": (0, 0, 200), "d": (200, 200, 0), "e": (0, 200, 200)}
    for name, colour in colours.items():
        (root / f"{name}.png").write_bytes(png_bytes(64 if name != "b" else 48, 64, color=colour))
    (root / "broken.png").write_bytes(png_bytes(64, 64, color=(9, 9, 9))[:60])  # truncated: does not decode
    (root / "v.mp4").write_bytes(encode_video(moving_frames(16), fps=8))
    (root / "v2.mp4").write_bytes(encode_video(moving_frames(12), fps=8))
    return root


def turn(speaker: str, value: str) -> dict:
    return {"from": speaker, "value": value}


def msg(role: str, content) -> dict:
    return {"role": role, "content": content}


def image(path: str) -> dict:
    return {"type": "image", "image": path}


def video(path: str) -> dict:
    return {"type": "video", "video": path}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


# LLaVA records, each with the build-sft record it must become (None: rejected, with that reason).
LLAVA = [
    ({"id": "single", "image": "a.png", "conversations": [turn("human", "<image>\nWhat colour is it?"), turn("gpt", "Green.")]},
     {"id": "single", "messages": [msg("user", [image("a.png"), text("What colour is it?")]), msg("assistant", "Green.")]}),
    ({"id": "multi", "images": ["b.png", "c.png"],
      "conversations": [turn("human", "Compare <image> with\n<image>\nWhich is wider?"), turn("gpt", "The second.")]},
     {"id": "multi", "messages": [msg("user", [text("Compare "), image("b.png"), text(" with"), image("c.png"),
                                               text("Which is wider?")]),
                                  msg("assistant", "The second.")]}),
    ({"id": 7, "video": "v.mp4",
      "conversations": [turn("system", "You describe videos."), turn("human", "<video>\nWhat moves?"), turn("gpt", "A bar.")]},
     {"id": 7, "messages": [msg("system", "You describe videos."), msg("user", [video("v.mp4"), text("What moves?")]),
                            msg("assistant", "A bar.")]}),
    ({"id": "text-only", "conversations": [turn("human", "Say hi."), turn("gpt", "Hi.")]},
     {"id": "text-only", "messages": [msg("user", "Say hi."), msg("assistant", "Hi.")]}),
    ({"id": "turns", "image": "d.png",
      "conversations": [turn("human", "<image>\nShape?"), turn("gpt", "Square."), turn("human", "Colour?"), turn("gpt", "Yellow.")]},
     {"id": "turns", "messages": [msg("user", [image("d.png"), text("Shape?")]), msg("assistant", "Square."),
                                  msg("user", "Colour?"), msg("assistant", "Yellow.")]}),
    ({"id": "no-media", "conversations": [turn("human", "<image>\nWhat is it?"), turn("gpt", "A cat.")]}, "placeholder_mismatch"),
    ({"id": "no-placeholder", "image": "e.png", "conversations": [turn("human", "What is it?"), turn("gpt", "A cat.")]},
     "placeholder_mismatch"),
    ({"id": "missing", "image": "nowhere.png", "conversations": [turn("human", "<image>\nAnd this?"), turn("gpt", "A dog.")]},
     "missing_file"),
    ({"id": "broken", "image": "broken.png", "conversations": [turn("human", "<image>\nAnd this?"), turn("gpt", "Grey.")]},
     "image_decode_error"),
    ({"id": "not-a-list", "conversations": "human: hi"}, "invalid_fields"),
    ('{"id": "cut", "conversations": [{"from": "human"', "malformed_json"),
    ({"id": "bad-from", "conversations": [turn("bot", "hi"), turn("gpt", "hello")]}, "invalid_fields"),
]

# Chat "messages" records (Qwen's typed parts, ms-swift's top-level lists), as LLAVA. "{media}" is the media folder.
MESSAGES = [
    ({"id": "qwen", "messages": [msg("system", "Be brief."), msg("user", [image("a.png"), text("Colour?")]),
                                 msg("assistant", "Green.")]},
     {"id": "qwen", "messages": [msg("system", "Be brief."), msg("user", [image("a.png"), text("Colour?")]),
                                 msg("assistant", "Green.")]}),
    ({"messages": [msg("user", [video("file://{media}/v.mp4"), text("What moves?")]), msg("assistant", "A bar.")]},
     {"messages": [msg("user", [video("{media}/v.mp4"), text("What moves?")]), msg("assistant", "A bar.")]}),
    ({"images": ["b.png", "c.png"], "messages": [msg("user", "<image><image>Which is wider?"), msg("assistant", "The second."),
                                                 msg("user", "And taller?"), msg("assistant", "The first.")]},
     {"messages": [msg("user", [image("b.png"), image("c.png"), text("Which is wider?")]), msg("assistant", "The second."),
                   msg("user", "And taller?"), msg("assistant", "The first.")]}),
    ({"videos": ["v2.mp4"], "messages": [msg("user", [text("<video>\nDescribe it.")]), msg("assistant", "It moves.")]},
     {"messages": [msg("user", [video("v2.mp4"), text("Describe it.")]), msg("assistant", "It moves.")]}),
    ({"messages": [msg("user", "hi"), msg("assistant", "hello")]}, {"messages": [msg("user", "hi"), msg("assistant", "hello")]}),
    ({"messages": [msg("user", "<image>What is it?"), msg("assistant", "A cat.")]}, "placeholder_mismatch"),
    ({"images": ["e.png"], "messages": [msg("user", "What is it?"), msg("assistant", "A cat.")]}, "placeholder_mismatch"),
    ({"messages": [msg("user", [image("nowhere.png"), text("And this?")]), msg("assistant", "A dog.")]}, "missing_file"),
    ({"images": ["broken.png"], "messages": [msg("user", "<image>And this?"), msg("assistant", "Grey.")]}, "image_decode_error"),
    ({"messages": {"role": "user", "content": "hi"}}, "invalid_fields"),
    ('{"messages": [', "malformed_json"),
    ({"messages": [msg("user", [image("https://example.com/x.png"), text("?")]), msg("assistant", "x")]}, "invalid_fields"),
]


def with_media(value, media: Path):
    """``value`` with "{media}" replaced by the media folder in every string."""
    return json.loads(json.dumps(value).replace("{media}", str(media))) if not isinstance(value, str) else value


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def native_manifest(path: Path, cases: list, media: Path) -> Path:
    """The build-sft manifest equivalent to ``cases``, line for line ("{}" for a rejected record)."""
    return write_jsonl(path, [with_media(want, media) if isinstance(want, dict) else {} for _, want in cases])


def import_set(importer: str, manifest: Path, media: Path, out: Path, **options):
    options.setdefault("workers", 0)
    config = BuildConfig(kind="sft", manifest=str(manifest), out=str(out), media_root=str(media), importer=importer,
                         progress=False, **options)
    return run_build(config)


def set_files(out: Path) -> dict[str, bytes]:
    """What the trainer reads of a built set: its shards and energon's description of them (not index.json,
    whose config names the input, nor rejected.jsonl, nor energon's random uuid and the index holding it)."""
    names = [p.name for p in sorted(out.glob("shard-*.tar"))]
    names += [f".nv-meta/{name}" for name in (".info.json", "split.yaml", "dataset.yaml")]
    return {name: (out / name).read_bytes() for name in names}


def samples_of(out: Path) -> list:
    index = json.loads((out / "index.json").read_text())
    return [sample_from_json(parts["json"]) for s in index["shards"] for _, parts in iter_shard(out / s["name"])]


def check_accounting(out: Path, summary, cases: list, input_lines: list[str]) -> None:
    expected = {line: want for line, (_, want) in enumerate(cases, start=1) if isinstance(want, str)}
    rejected = read_jsonl(out / "rejected.jsonl")
    assert {r["line"]: r["reason"] for r in rejected} == expected
    for r in rejected:  # the input record is recorded as written, with a sentence saying what is wrong
        assert r["input"] == input_lines[r["line"] - 1] and r["detail"]
    accepted = len(cases) - len(expected)
    assert (summary.input_lines, summary.accepted_lines, summary.rejected_lines) == (len(cases), accepted, len(expected))
    assert sorted(s.source.line for s in samples_of(out)) == sorted(set(range(1, len(cases) + 1)) - set(expected))
    index = json.loads((out / "index.json").read_text())
    assert index["kind"] == "sft" and index["totals"]["failed_lines"] == 0
    assert verify(out, decode=True)[0] == []


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    return write_media(tmp_path_factory.mktemp("import_media") / "media")


@pytest.fixture(scope="module")
def llava_set(media, tmp_path_factory) -> tuple[Path, Path, object]:
    """(input, set, summary): the LLaVA cases as JSONL, imported in-process."""
    root = tmp_path_factory.mktemp("llava")
    records = write_jsonl(root / "in" / "train.jsonl", [record for record, _ in LLAVA])
    summary = import_set("llava", records, media, root / "set", max_samples_per_shard=2)
    return records, root / "set", summary


def test_llava_import_accounts_for_every_record_and_writes_what_build_sft_writes(llava_set, media, tmp_path):
    records, out, summary = llava_set
    check_accounting(out, summary, LLAVA, records.read_text().splitlines())
    details = {r["line"]: r["detail"] for r in read_jsonl(out / "rejected.jsonl")}
    assert details[6] == "1 <image> placeholders in the text but 0 images listed"
    assert details[7] == "0 <image> placeholders in the text but 1 images listed"
    # build-sft on the hand-written native manifest (same file name, in the media folder) writes the same bytes.
    native = native_manifest(media / "train.jsonl", LLAVA, media)
    build("sft", native, tmp_path / "native", max_samples_per_shard=2)
    assert set_files(out).keys() == set_files(tmp_path / "native").keys() and len(set_files(out)) > 4
    assert set_files(out) == set_files(tmp_path / "native")
    multi = next(s for s in samples_of(out) if s.source.id == "multi")
    assert [(p.type, p.text or p.image) for p in multi.messages[0].content] == [
        ("text", "Compare "), ("image", "img0.png"), ("text", " with"), ("image", "img1.png"), ("text", "Which is wider?")]
    assert [m.source for m in multi.media] == ["b.png", "c.png"]


def test_messages_import_accounts_for_every_record_and_writes_what_build_sft_writes(media, tmp_path):
    records = write_jsonl(tmp_path / "in" / "chat.jsonl", [with_media(record, media) for record, _ in MESSAGES])
    summary = import_set("messages", records, media, tmp_path / "set", max_samples_per_shard=2)
    check_accounting(tmp_path / "set", summary, MESSAGES, records.read_text().splitlines())
    native = native_manifest(media / "chat.jsonl", MESSAGES, media)
    build("sft", native, tmp_path / "native", max_samples_per_shard=2)
    assert set_files(tmp_path / "set") == set_files(tmp_path / "native")
    swift = next(s for s in samples_of(tmp_path / "set") if s.source.line == 3)
    assert [m.role for m in swift.messages] == ["user", "assistant", "user", "assistant"]
    assert [m.source for m in swift.media] == ["b.png", "c.png"]


def test_llava_json_array_is_byte_identical_whatever_the_workers(llava_set, media, tmp_path, capsys):
    # The same records, minus the malformed line (an array cannot hold one), as one pretty-printed JSON array.
    cases = [case for case in LLAVA if not isinstance(case[0], str)]
    array = tmp_path / "llava.json"
    array.write_text(json.dumps([record for record, _ in cases], indent=2))
    outs = []
    for workers in (1, 2):
        outs.append(tmp_path / f"w{workers}")
        argv = ["import-llava", "--json", str(array), "--media-root", str(media), "--out", str(outs[-1]),
                "--max-samples-per-shard", "2", "--workers", str(workers)]
        assert main(argv) == 0
    printed = capsys.readouterr()
    assert "import llava" in printed.err  # the progress bar
    assert f"{len(cases)} input lines -> 5 samples from 5 lines in 3 shards" in printed.out
    assert "rejected by reason: invalid_fields 2, placeholder_mismatch 2, missing_file 1, image_decode_error 1" in printed.out
    one, two = set_files(outs[0]), set_files(outs[1])
    for name in ("index.json", "rejected.jsonl"):
        one[name], two[name] = (outs[0] / name).read_bytes(), (outs[1] / name).read_bytes()
    assert one == two
    # Element n is "line" n; a rejected element's input is its text as written in the array.
    elements = [json.dumps(record, indent=2) for record, _ in cases]
    summary = run_build(BuildConfig(kind="sft", manifest=str(array), out=str(outs[0]), media_root=str(media),
                                    importer="llava", max_samples_per_shard=2, resume=True, progress=False))
    check_accounting(outs[0], summary, cases, [e.replace("\n", "\n  ") for e in elements])
    # The samples are those of the JSONL import (but for their line numbers and file name).
    def content(out):
        return [(s.source.id, s.messages, [(m.source, m.sha256) for m in s.media]) for s in samples_of(out)]
    assert content(outs[0]) == content(llava_set[1])


def test_llava_import_resumes_to_the_uninterrupted_result(llava_set, media, tmp_path):
    records, reference, _ = llava_set
    out = tmp_path / "crashed"
    import_set("llava", records, media, out, max_samples_per_shard=2)
    _crash_after(out, keep_shards=1)
    summary = import_set("llava", records, media, out, max_samples_per_shard=2, resume=True, workers=2)
    assert summary.samples_this_run == summary.samples - 2 == 3
    assert shard_bytes(out) == shard_bytes(reference)
    assert (out / "rejected.jsonl").read_bytes() == (reference / "rejected.jsonl").read_bytes()
    assert verify(out)[0] == []
    with pytest.raises(BuildError, match="media_root"):  # the media folder is part of the build's options
        import_set("llava", records, media.parent, out, max_samples_per_shard=2, resume=True)


def test_input_errors_name_the_input(media, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"conversations": []},\n {"conversations": [}]')
    with pytest.raises(BuildError, match=r"bad.json starts with '\[' but is not a JSON array of records: element 2"):
        import_set("llava", bad, media, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written
    with pytest.raises(BuildError, match="--media-root .*nowhere does not exist"):
        import_set("llava", bad, tmp_path / "nowhere", tmp_path / "out")


def test_the_trainers_loader_reads_an_imported_set(llava_set, tmp_path):
    import torch

    from common.tokens.tokenizer import Tokenizer, train_byte_level_bpe
    from pretrain.data.loader import build_train_loader
    from tests.data_pipeline.pipeline_helpers import data_config

    _, out, summary = llava_set
    words = "what colour is it green compare with which wider the second you describe videos moves a bar say hi shape " \
            "square yellow".split()
    texts = [" ".join(words[(i * 5 + j) % len(words)] for j in range(10)) for i in range(200)]
    tokenizer = Tokenizer.from_file(train_byte_level_bpe(texts, 300, tmp_path / "tok"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loader = build_train_loader(data_config({"llava": out}, packing_buffer_size=8), {"loss_normalization": "token"}, seq_length=256,
                                    micro_batch_size=1, dp_rank=0, dp_size=1, seed=0, tokenizer=tokenizer)
        keys, image_tokens, video_tokens = set(), 0, 0
        with loader:
            for _ in range(20):
                batch = next(loader)
                keys.update(doc.rsplit("/", 1)[-1] for row in batch["doc_ids"] for doc in row)
                image_tokens += int((batch["mm_token_type_ids"] == 1).sum())
                video_tokens += int((batch["mm_token_type_ids"] == 2).sum())
                assert batch["loss_mask"].sum() > 0  # the assistant turns are targets
                if len(keys) == summary.samples:
                    break
    finally:
        torch.set_num_threads(threads)
    assert keys == {f"{line:09d}" for line in (1, 2, 3, 4, 5)}
    assert image_tokens > 0 and video_tokens > 0
