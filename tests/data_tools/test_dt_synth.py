"""data_tools synth: deterministic, learnable (captions and answers match the pixels), held-out eval, bad lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dt_helpers import read_jsonl

from data_tools.synth import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, VIDEO_FPS, SynthConfig, generate
from common.media import decode as media


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_corpus(tmp_path):
    counts = dict(images=6, videos=2, docs=2, sft=5, eval=4, rl=4)
    generate(SynthConfig(out=str(tmp_path / "a"), seed=1, **counts), progress=False)
    generate(SynthConfig(out=str(tmp_path / "b"), seed=1, **counts), progress=False)
    generate(SynthConfig(out=str(tmp_path / "c"), seed=2, **counts), progress=False)
    a = files(tmp_path / "a")
    assert a == files(tmp_path / "b")
    assert a["image_text.jsonl"] != files(tmp_path / "c")["image_text.jsonl"]
    with pytest.raises(FileExistsError):
        generate(SynthConfig(out=str(tmp_path / "a"), seed=1, **counts), progress=False)
    generate(SynthConfig(out=str(tmp_path / "a"), seed=1, overwrite=True, **counts), progress=False)
    assert files(tmp_path / "a") == a


def test_the_rl_manifest_leaves_every_other_file_as_it_was(tmp_path):
    """rl.jsonl draws from its own random stream, after the others: corpora with and without it agree
    byte for byte on everything else (synth.json aside: it lists the rl counts)."""
    counts = dict(seed=3, images=5, videos=2, docs=2, sft=5, eval=4)
    generate(SynthConfig(out=str(tmp_path / "without"), rl=0, **counts), progress=False)
    generate(SynthConfig(out=str(tmp_path / "with"), rl=6, **counts), progress=False)
    without, with_rl = files(tmp_path / "without"), files(tmp_path / "with")
    rl_files = {name for name in with_rl if name == "rl.jsonl" or name.startswith("rl_media/")}
    assert len(rl_files) == 1 + 6 + 1  # the manifest, 6 media and the medium of the wrong-type answer line
    others = set(with_rl) - rl_files - {"synth.json"}
    assert others == set(without) - {"rl.jsonl", "rl_media/bad_answer_type.png", "synth.json"} and len(others) > 20
    assert [name for name in others if without[name] != with_rl[name]] == []


def close_to(pixels: np.ndarray, rgb, tol: int = 40) -> np.ndarray:
    return np.abs(pixels.astype(int) - np.array(rgb)).max(axis=-1) <= tol


def test_captions_describe_the_pixels(corpus):
    for record in read_jsonl_good(corpus / "image_text.jsonl"):
        if not record["id"].startswith("img-"):
            continue
        pixels = np.asarray(media.load_image(corpus / record["image"]))
        words = record["text"].split()
        colour = next(w for w in words if w in COLOURS)
        assert next(w for w in words if w in SHAPES)
        assert close_to(pixels, COLOURS[colour]).mean() > 0.03  # the shape covers part of the image
        if "background" in words:
            background = words[words.index("background") - 1]
            assert close_to(pixels, BACKGROUNDS[background]).mean() > 0.3


def read_jsonl_good(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def centroid(frame: np.ndarray, background) -> np.ndarray:
    ys, xs = np.nonzero(~close_to(frame, background, tol=60))
    return np.array([xs.mean(), ys.mean()])


def test_videos_move_the_way_their_captions_say(corpus):
    for record in read_jsonl(corpus / "video.jsonl"):
        if not record["id"].startswith("vid-"):
            continue
        info = media.probe_video(corpus / record["video"])
        assert info.fps == VIDEO_FPS and 2.0 <= info.duration <= 6.0 and max(info.width, info.height) <= 128
        still, moving = record["captions"]
        assert still["start"] == 0.0 and still["end"] == moving["start"] and moving["end"] == info.duration
        direction = record["text"].split(" moves ")[1].split()[0]
        background = record["text"].split(" on a ")[1].split()[0]
        first, at_still_end, last = media.read_video_frames(
            corpus / record["video"], [0, round(still["end"] * VIDEO_FPS) - 1, info.num_frames - 1])
        start, held, end = (centroid(f, BACKGROUNDS[background]) for f in (first, at_still_end, last))
        assert np.abs(held - start).max() < 2  # still during the first caption
        motion = end - start
        dx, dy = DIRECTIONS[direction]
        assert np.sign(motion[0] if dx else motion[1]) == (dx or dy)
        assert abs(motion[0] if dx else motion[1]) > 20 and abs(motion[1] if dx else motion[0]) < 3


def test_sft_answers_and_held_out_eval(corpus):
    for record in read_jsonl(corpus / "sft.jsonl"):
        if not record["id"].startswith("sft-"):
            continue
        messages = [m for m in record["messages"] if m["role"] != "system"]
        question = messages[0]["content"][1]["text"]
        answer = messages[1]["content"]
        if question == "What colour is the shape?":
            assert answer in COLOURS
        elif question.startswith("Which way"):
            assert answer in DIRECTIONS
    referenced = set()
    for name in ("image_text.jsonl", "interleaved.jsonl", "video.jsonl", "sft.jsonl", "rl.jsonl"):
        referenced |= {v for v in _paths((corpus / name).read_text())}
    evaluation = read_jsonl(corpus / "eval.jsonl")
    assert len(evaluation) == 8
    for item in evaluation:
        assert item["answer"] in item["choices"] and item["media"] not in referenced
        assert (corpus / item["media"]).is_file() and item["media_type"] in ("image", "video")
    synth = json.loads((corpus / "synth.json").read_text())
    assert sum(len(v) for v in synth["bad_lines"].values()) == 10
    assert synth["vocabulary"]["colours"] == list(COLOURS) and len(COLOURS) == 8 and len(SHAPES) == 4


def _paths(text: str):
    import re

    return re.findall(r'"((?:images|videos|docs|sft_media|eval_media|rl_media)/[^"]+)"', text)
