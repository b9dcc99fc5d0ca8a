"""inspect, stats and verify on built sets."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

from dt_helpers import build
from test_dt_media import moving_frames, png_bytes

from data_tools.__main__ import main
from data_tools.shards import iter_shard
from data_tools.stats import collect
from data_tools.verify import verify
from common.media import decode as media
from common.media.encode import encode_video


def test_inspect_shows_samples_and_dumps_members(built_sets, tmp_path, capsys):
    out = built_sets["video"]
    index = json.loads((out / "index.json").read_text())
    first_key, first_parts = next(iter_shard(out / index["shards"][0]["name"]))
    assert main(["inspect", str(out), "--limit", "2", "--dump-media", str(tmp_path / "dump")]) == 0
    text = capsys.readouterr().out
    assert f"{first_key}  [video]  line 1 of video.jsonl" in text and "vid0.mp4: mp4" in text and " s] " in text
    for part, data in first_parts.items():
        assert (tmp_path / "dump" / f"{first_key}.{part}").read_bytes() == data
    assert len(list((tmp_path / "dump").iterdir())) == 4  # 2 samples x (json + video)
    assert main(["inspect", str(out), "--rejected"]) == 0
    assert "video_decode_error" in capsys.readouterr().out
    assert main(["inspect", str(out), "--key", "999999999"]) == 1


def test_stats_counts_and_token_estimates(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN3VL_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "a.png").write_bytes(png_bytes(64, 64))
    (tmp_path / "v.mp4").write_bytes(encode_video(moving_frames(32, 64, 64), fps=8))  # 4 s, 64x64
    manifest = tmp_path / "sft.jsonl"
    messages = [
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "video", "video": "v.mp4"},
                                     {"type": "text", "text": "What colour is the shape?"}]},
        {"role": "assistant", "content": "red"},
    ]
    manifest.write_text(json.dumps({"messages": messages}) + "\n")
    build("sft", manifest, tmp_path / "set")
    stats = collect([str(tmp_path / "set")], tokenizer="qwen")
    # Image 64x64 -> smart_resize up to min_pixels 65,536 -> 256x256 -> 16x16 patches -> 64 tokens.
    # Video: 4 s at 2 fps -> 8 frames, 64x64 kept -> grid (4, 4, 4) -> 16 tokens.
    assert stats["visual_tokens"] == {"image": 64, "video": 16, "total": 80}
    from common.tokens.tokenizer import Tokenizer

    tokenizer = Tokenizer.qwen()
    assert stats["text_tokens"] == len(tokenizer.encode("What colour is the shape?")) + len(tokenizer.encode("red"))
    assert stats["samples_by_kind"] == {"sft": 1} and stats["media_by_type"] == {"image": 1, "video": 1}
    assert stats["longer_side_histogram"] == {"64-128px": 2}
    assert stats["video_duration_histogram"] == {"2-5s": 1}
    assert stats["tokens_per_sample"]["max"] == 80 + stats["text_tokens"]
    assert collect([str(tmp_path / "set")], tokenizer="none")["text_tokens"] is None


def test_stats_cli_over_several_sets(built_sets, capsys):
    assert main(["stats", str(built_sets["image_text"]), str(built_sets["interleaved"]), "--json", "--tokenizer", "none"]) == 0
    stats = json.loads(capsys.readouterr().out)
    totals = [json.loads((built_sets[k] / "index.json").read_text())["totals"]["samples"] for k in ("image_text", "interleaved")]
    assert stats["samples_by_kind"] == {"image_text": totals[0], "interleaved": totals[1]}
    assert stats["visual_tokens"]["video"] == 0 and stats["visual_tokens"]["image"] > 0


def _rewrite_member(shard: Path, member_name: str, data: bytes) -> None:
    """Replace one member's bytes in place (same size), as silent disk corruption would."""
    with tarfile.open(shard) as tar:
        member = tar.getmember(member_name)
        offset, size = member.offset_data, member.size
    assert len(data) == size
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_verify_catches_tampering(built_sets, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(built_sets["image_text"], out)
    assert verify(out, decode=True)[0] == []
    assert main(["verify", str(out), "--no-progress"]) == 0
    index = json.loads((out / "index.json").read_text())
    shard = out / index["shards"][1]["name"]
    key, parts = next(iter_shard(shard))
    media_name = next(p for p in parts if p != "json")
    corrupt = bytearray(parts[media_name])
    corrupt[len(corrupt) // 2] ^= 0xFF
    _rewrite_member(shard, f"{key}.{media_name}", bytes(corrupt))
    (out / "shard-000099.tar").write_bytes(b"")
    problems, _ = verify(out)
    assert any("sha256 differs" in p for p in problems)
    assert any(f"{key}: media {media_name!r} bytes differ" in p for p in problems)
    assert any("shard-000099.tar lies in the folder" in p for p in problems)
    assert main(["verify", str(out), "--no-progress"]) == 1
    assert "FAILED" in capsys.readouterr().out

    other = tmp_path / "other"
    shutil.copytree(built_sets["sft"], other)
    (other / index["shards"][0]["name"]).unlink()
    (other / "rejected.jsonl").write_text("")
    problems, _ = verify(other)
    assert any("missing" in p for p in problems) and any("rejected.jsonl lists 0 lines" in p for p in problems)
    assert verify(tmp_path / "nothing")[0][0].endswith("the build did not finish (run it again with --resume)")
