"""``python -m data_tools train-tokenizer``: the command module on manifests and on a built shard set."""

from __future__ import annotations

import argparse
import io
import json
import tarfile

import pytest

from data_tools import train_tokenizer
from common.tokens.tokenizer import Tokenizer

COLOURS = "red green blue yellow purple orange black white".split()
SHAPES = "circle square triangle star".split()


def _write_manifests(folder):
    lines = {
        "image_text.jsonl": [{"image": f"i{i}.png", "text": f"a {c} {s} on a white background"}
                             for i, (c, s) in enumerate((c, s) for c in COLOURS for s in SHAPES)],
        "interleaved.jsonl": [{"segments": [{"text": f"Look at the {c} shape. "}, {"image": "x.png"}, {"text": "It is round."}]}
                              for c in COLOURS],
        "video.jsonl": [{"video": "v.mp4", "text": f"a {s} moves left",
                         "captions": [{"start": 0.0, "end": 1.5, "text": f"the {s} appears"}]} for s in SHAPES],
        "sft.jsonl": [{"messages": [{"role": "user", "content": [{"type": "image", "image": "x.png"},
                                                                  {"type": "text", "text": "What colour is the shape?"}]},
                                    {"role": "assistant", "content": c}]} for c in COLOURS],
    }
    paths = []
    for name, records in lines.items():
        path = folder / name
        with open(path, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
            if name == "sft.jsonl":
                f.write("{not json\n")  # deliberately bad lines: skipped and counted
                f.write(json.dumps({"messages": "oops"}) + "\n")
        paths.append(path)
    return paths


def _run(argv):
    parser = argparse.ArgumentParser()
    train_tokenizer.add_arguments(parser)
    return train_tokenizer.run(parser.parse_args(argv + ["--no-progress"]))


def test_train_tokenizer_from_manifests(tmp_path, capsys):
    manifests = _write_manifests(tmp_path)
    argv = sum((["--manifest", str(p)] for p in manifests), []) + ["--vocab-size", "600", "--min-frequency", "1"]
    assert _run(argv + ["--out", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 line(s)" in out and "wrote" in out
    tok = Tokenizer.from_dir(tmp_path / "tok")
    assert tok.vocab_size <= 600
    # Corpus words became single tokens, including the role headers and the video timestamp text.
    for word in (" circle", " background", "assistant", " seconds", " colour"):
        assert len(tok.encode(word)) == 1, word
    info = json.loads((tmp_path / "tok" / "tokenizer_info.json").read_text())
    assert info["vocab_size"] == tok.vocab_size and info["texts"] > 50 and sum(info["skipped"].values()) == 2
    # Deterministic: same inputs, byte-identical tokenizer.json.
    assert _run(argv + ["--out", str(tmp_path / "tok2")]) == 0
    assert (tmp_path / "tok2" / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()


def test_train_tokenizer_from_shards(tmp_path):
    from data_tools import schema

    folder = tmp_path / "set"
    folder.mkdir()
    with tarfile.open(folder / "shard-000000.tar", "w") as tar:
        for line, (c, s) in enumerate(((c, s) for c in COLOURS for s in SHAPES), start=1):
            media = schema.Media(name="img0.png", type="image", format="png", sha256="0" * 64, bytes=1, width=64,
                                 height=64, source="x.png")
            sample = schema.ImageTextSample(key=schema.sample_key(line), source=schema.Source(line, "m.jsonl"),
                                            media=(media,), text=f"a {c} {s}", image="img0.png")
            for part, data in (("json", schema.sample_to_json(sample)), ("img0.png", b"x")):
                info = tarfile.TarInfo(f"{sample.key}.{part}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert _run(["--shards", str(folder), "--vocab-size", "400", "--min-frequency", "1", "--out", str(tmp_path / "tok")]) == 0
    info = json.loads((tmp_path / "tok" / "tokenizer_info.json").read_text())
    assert info["texts"] == len(COLOURS) * len(SHAPES)
    assert len(Tokenizer.from_dir(tmp_path / "tok").encode(" triangle")) == 1


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["--vocab-size", "500"], 2, "at least one --manifest"),
        (["--manifest", "/nonexistent.jsonl", "--vocab-size", "500"], 2, "does not exist"),
        (["--vocab-size", "100"], 2, "vocab_size must exceed"),
    ],
)
def test_train_tokenizer_bad_arguments(tmp_path, capsys, argv, code, message):
    if "--manifest" not in argv and message != "at least one --manifest":
        argv = ["--manifest", str(_write_manifests(tmp_path)[0])] + argv
    assert _run(argv + ["--out", str(tmp_path / "o")]) == code
    assert message in capsys.readouterr().out
