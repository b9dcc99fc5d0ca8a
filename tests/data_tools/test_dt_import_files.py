"""import-webdataset and import-parquet: tar sets and parquet files in, the shard sets build-image-text and
build-sft write out; and the trainer's loader on the result, quiet by default.

Small hand-made inputs with good and broken records: exact accounting and reasons, a truncated tar that
keeps the samples before the damage, the same shards as build-image-text on the equivalent native
manifest, byte-identical output whatever --workers, --resume, parquet row groups and struct columns.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dt_helpers import build, read_jsonl
from PIL import Image
from test_dt_import_chat import samples_of, set_files
from test_dt_resume import _crash_after, shard_bytes

from data_tools.__main__ import main
from data_tools.build import BuildError, run_build
from data_tools.config import BuildConfig
from data_tools.importers.parquet_rows import ParquetSource, translate_sft
from data_tools.importers.tar_samples import TarSource
from data_tools.shards import iter_shard
from data_tools.verify import verify


def image_bytes(fmt: str, color: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


RED, BLUE, GREEN = image_bytes("JPEG", (220, 20, 20)), image_bytes("PNG", (20, 20, 220)), image_bytes("WEBP", (20, 200, 20))
YELLOW, CYAN, MAGENTA = image_bytes("JPEG", (220, 220, 20)), image_bytes("PNG", (20, 220, 220)), image_bytes("PNG", (220, 20, 220))
NOT_AN_IMAGE = b"these bytes are no image at all" * 4

# (key, members) of the two tars in file order, and what becomes of each sample (None: accepted).
TAR_A = [
    ("k1", [("jpg", RED), ("txt", b"a red rectangle\n")]),  # txt caption, trailing newline dropped
    ("k2", [("png", BLUE), ("json", json.dumps({"caption": "a blue rectangle", "url": "http://x"}).encode()),
            ("txt", b"not this one")]),  # the json's caption wins over the txt
    ("k3", [("webp", GREEN), ("json", b'{"url": "http://y"}')]),  # no caption anywhere
    ("k4", [("jpg", NOT_AN_IMAGE), ("txt", b"broken")]),
    ("k5", [("jpg", RED), ("txt", b"the red one again")]),  # the same image bytes as k1
]
TAR_B = [
    ("k6", [("txt", b"a yellow rectangle"), ("jpg", YELLOW)]),
    ("k7", [("txt", b"cut short"), ("png", CYAN)]),  # the file is cut inside this png
]
TAR_REASONS = {1: None, 2: None, 3: "invalid_fields", 4: "image_decode_error", 5: "duplicate_media", 6: None,
               7: "unreadable_file"}
CAPTIONS = {1: "a red rectangle", 2: "a blue rectangle", 6: "a yellow rectangle"}


def write_tar(path: Path, samples: list, cut_last_member_by: int = 0) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if cut_last_member_by:
        with tarfile.open(path) as tar:
            last = tar.getmembers()[-1]
        with open(path, "r+b") as f:
            f.truncate(last.offset_data + last.size - cut_last_member_by)
    return path


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tars")
    write_tar(root / "a-00000.tar", TAR_A)
    write_tar(root / "b-00001.tar", TAR_B, cut_last_member_by=10)
    return root


def import_tars(pattern: Path | str, out: Path, caption_field: str = "caption", **options):
    options.setdefault("workers", 0)
    config = BuildConfig(kind="image_text", manifest=str(pattern), out=str(out), progress=False, **options)
    return run_build(config, TarSource(str(pattern), caption_field))


def check_rejections(out: Path, summary, reasons: dict[int, str | None]) -> list[dict]:
    expected = {line: reason for line, reason in reasons.items() if reason}
    rejected = read_jsonl(out / "rejected.jsonl")
    assert {r["line"]: r["reason"] for r in rejected} == expected
    assert all(r["detail"] and r["input"] for r in rejected)
    accepted = len(reasons) - len(expected)
    assert (summary.input_lines, summary.accepted_lines, summary.rejected_lines, summary.samples) == (
        len(reasons), accepted, len(expected), accepted)
    assert sorted(s.source.line for s in samples_of(out)) == [line for line, r in reasons.items() if r is None]
    index = json.loads((out / "index.json").read_text())
    assert index["totals"]["failed_lines"] == 0 and index["totals"]["input_lines"] == len(reasons)
    assert verify(out, decode=True)[0] == []
    return rejected


def media_bytes(out: Path) -> dict[str, bytes]:
    """{sample key: its image's bytes} over a set's shards."""
    found = {}
    for shard in sorted(out.glob("shard-*.tar")):
        for key, parts in iter_shard(shard):
            found[key] = next(data for part, data in parts.items() if part.startswith("img0"))
    return found


def test_webdataset_import_accounts_for_every_sample_and_keeps_what_precedes_the_damage(tars, tmp_path, capsys):
    outs = []
    for workers in (1, 2):  # through the command line, as a user runs it
        outs.append(tmp_path / f"w{workers}")
        assert main(["import-webdataset", "--tars", str(tars / "*.tar"), "--out", str(outs[-1]),
                     "--max-samples-per-shard", "2", "--workers", str(workers)]) == 0
    printed = capsys.readouterr()
    assert "import webdataset" in printed.err  # the progress bar
    assert "7 input lines -> 3 samples from 3 lines in 2 shards" in printed.out
    assert "rejected by reason: invalid_fields 1, unreadable_file 1, image_decode_error 1, duplicate_media 1" in printed.out
    one, two = set_files(outs[0]), set_files(outs[1])  # byte-identical whatever --workers
    for name in ("index.json", "rejected.jsonl"):
        one[name], two[name] = (outs[0] / name).read_bytes(), (outs[1] / name).read_bytes()
    assert one == two

    summary = import_tars(tars / "*.tar", outs[0], max_samples_per_shard=2, resume=True)  # finished: reads the result
    rejected = {r["line"]: r for r in check_rejections(outs[0], summary, TAR_REASONS)}
    assert rejected[3]["detail"] == "sample 'k3' has no caption: no k3.txt and no field 'caption' in k3.json"
    assert json.loads(rejected[3]["input"]) == {"tar": "a-00000.tar", "key": "k3", "members": ["k3.webp", "k3.json"]}
    assert "line 1" in rejected[5]["detail"]
    assert re.fullmatch(r"the tar file is damaged at byte \d+: member 'k7.png' of \d+ bytes is cut short "
                        r"\(unexpected end of data\); the rest of the file is skipped", rejected[7]["detail"])
    samples = {s.source.line: s for s in samples_of(outs[0])}
    assert {line: s.text for line, s in samples.items()} == CAPTIONS
    assert {line: (s.source.manifest, s.source.id, s.media[0].source) for line, s in samples.items()} == {
        1: ("a-00000.tar", "k1", "k1.jpg"), 2: ("a-00000.tar", "k2", "k2.png"), 6: ("b-00001.tar", "k6", "k6.jpg")}
    assert media_bytes(outs[0]) == {"000000001": RED, "000000002": BLUE, "000000006": YELLOW}  # stored as read


def test_webdataset_import_writes_what_build_image_text_writes(tars, tmp_path):
    # The native equivalent of the first tar: its members as files, a manifest of the same name (a sample's
    # source.manifest), one line per sample ("{}" for the rejected ones: same line numbers).
    media = tmp_path / "media"
    media.mkdir()
    lines = []
    for (key, members), line in zip(TAR_A, range(1, 6)):
        for ext, data in members:
            (media / f"{key}.{ext}").write_bytes(data)
        image = next(f"{key}.{ext}" for ext, _ in members if ext in ("jpg", "png", "webp"))
        lines.append({"image": image, "text": CAPTIONS[line], "id": key} if line in CAPTIONS else {})
    (media / "a-00000.tar").write_text("".join(json.dumps(line) + "\n" for line in lines))
    build("image_text", media / "a-00000.tar", tmp_path / "native", max_samples_per_shard=1)
    import_tars(tars / "a-*.tar", tmp_path / "imported", max_samples_per_shard=1)
    assert set_files(tmp_path / "imported") == set_files(tmp_path / "native") and len(set_files(tmp_path / "native")) == 5


def test_webdataset_caption_field_and_resume(tars, tmp_path):
    # --caption-field names the json field (k2 and k3 have a "url"); k1 has no json: its txt.
    summary = import_tars(tars / "*.tar", tmp_path / "url", caption_field="url")
    assert {s.source.line: s.text for s in samples_of(tmp_path / "url")} == {
        1: "a red rectangle", 2: "http://x", 3: "http://y", 6: "a yellow rectangle"}
    assert summary.rejected_by_reason == {"unreadable_file": 1, "image_decode_error": 1, "duplicate_media": 1}

    reference = tmp_path / "reference"
    import_tars(tars / "*.tar", reference, max_samples_per_shard=1)
    out = tmp_path / "crashed"
    import_tars(tars / "*.tar", out, max_samples_per_shard=1)
    _crash_after(out, keep_shards=1)
    summary = import_tars(tars / "*.tar", out, max_samples_per_shard=1, resume=True, workers=2)
    assert summary.samples_this_run == summary.samples - 1 == 2 and summary.input_lines == 7
    assert shard_bytes(out) == shard_bytes(reference)
    assert (out / "rejected.jsonl").read_bytes() == (reference / "rejected.jsonl").read_bytes()
    with pytest.raises(BuildError, match="caption_field"):  # an option of the build, like any other
        import_tars(tars / "*.tar", out, caption_field="url", max_samples_per_shard=1, resume=True)


def test_tar_damage_anywhere_keeps_the_samples_before_it(tmp_path):
    whole = write_tar(tmp_path / "whole.tar", TAR_A[:2]).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        members = tar.getmembers()
    cuts = {
        "header": members[2].offset + 100,  # inside the header after k1's members: k1 may have had more
        "boundary": members[4].offset_data + 512,  # after the last member, before the end-of-archive blocks
    }
    for name, cut in cuts.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.tar").write_bytes(whole[:cut])
        summary = import_tars(tmp_path / name / "x.tar", tmp_path / f"{name}-set")
        rejected = read_jsonl(tmp_path / f"{name}-set" / "rejected.jsonl")
        # The sample read last may have lost members: rejected, with the byte where the damage is.
        last = 1 if name == "header" else 2
        assert [(r["line"], r["reason"]) for r in rejected] == [(last, "unreadable_file")]
        assert f"damaged at byte {members[2].offset if name == 'header' else cut}" in rejected[0]["detail"]
        assert summary.input_lines == last and summary.samples == last - 1
    (tmp_path / "gz").mkdir()  # compressed tars read the same
    (tmp_path / "gz" / "x.tar.gz").write_bytes(gzip.compress(whole))
    import_tars(tmp_path / "gz" / "*.tar.gz", tmp_path / "gz-set")
    assert [(s.source.line, s.text) for s in samples_of(tmp_path / "gz-set")] == [(1, CAPTIONS[1]), (2, CAPTIONS[2])]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(BuildError, match=r"x.tar is not a readable tar file"):
        import_tars(tmp_path / "junk" / "x.tar", tmp_path / "junk-set")
    assert not (tmp_path / "junk-set").exists()  # refused before anything is written
    with pytest.raises(BuildError, match="matches no file"):
        import_tars(tmp_path / "nowhere" / "*.tar", tmp_path / "none")


# ------------------------------------------------------------------------------------------------------
# parquet
# ------------------------------------------------------------------------------------------------------

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
# (file, rows, what becomes of each row): p1 has a binary image column in 3 row groups, p2 the datasets
# Image feature's {bytes, path} struct, p3 a text column of the wrong type.
PARQUET_REASONS = {
    1: None, 2: None, 3: "image_decode_error", 4: "invalid_fields", 5: None,  # p1
    6: None, 7: None, 8: "invalid_fields", 9: "duplicate_media",  # p2
    10: "invalid_fields",  # p3
}


@pytest.fixture(scope="module")
def parquet_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parquet")
    p1 = pa.table({"image": pa.array([RED, BLUE, NOT_AN_IMAGE, GREEN, YELLOW], pa.binary()),
                   "caption": ["red", "blue", "broken", None, "yellow"]})
    pq.write_table(p1, root / "p1.parquet", row_group_size=2)
    (root / "beside.png").write_bytes(MAGENTA)  # a struct without bytes names a file next to the parquet file
    p2 = pa.table({"image": pa.array([{"bytes": CYAN, "path": "cyan.png"}, {"bytes": None, "path": "beside.png"},
                                      {"bytes": None, "path": None}, {"bytes": RED, "path": "again.jpg"}], IMAGE_STRUCT),
                   "caption": ["cyan", "magenta", "nothing", "red again"]})
    pq.write_table(p2, root / "p2.parquet")
    p3 = pa.table({"image": pa.array([image_bytes("PNG", (90, 90, 90))], pa.binary()), "caption": pa.array([7], pa.int64())})
    pq.write_table(p3, root / "p3.parquet")
    return root


def import_parquet(pattern: Path, out: Path, kind: str = "image_text", image_column: str = "image",
                   text_column: str = "caption", messages_column: str = "messages", **options):
    options.setdefault("workers", 0)
    config = BuildConfig(kind=kind, manifest=str(pattern), out=str(out), progress=False, **options)
    return run_build(config, ParquetSource(str(pattern), kind, image_column, text_column, messages_column))


def test_parquet_import_accounts_for_every_row(parquet_files, tmp_path, capsys):
    assert pq.ParquetFile(parquet_files / "p1.parquet").num_row_groups == 3
    outs = []
    for workers in (1, 2):
        outs.append(tmp_path / f"w{workers}")
        assert main(["import-parquet", "--files", str(parquet_files / "*.parquet"), "--image-column", "image",
                     "--text-column", "caption", "--out", str(outs[-1]), "--max-samples-per-shard", "2",
                     "--workers", str(workers)]) == 0
    printed = capsys.readouterr()
    assert "import parquet" in printed.err and "10 input lines -> 5 samples from 5 lines in 3 shards" in printed.out
    assert "rejected by reason: invalid_fields 3, image_decode_error 1, duplicate_media 1" in printed.out
    one, two = set_files(outs[0]), set_files(outs[1])
    for name in ("index.json", "rejected.jsonl"):
        one[name], two[name] = (outs[0] / name).read_bytes(), (outs[1] / name).read_bytes()
    assert one == two

    summary = import_parquet(parquet_files / "*.parquet", outs[0], max_samples_per_shard=2, resume=True)
    rejected = {r["line"]: r for r in check_rejections(outs[0], summary, PARQUET_REASONS)}
    assert rejected[4]["detail"] == "column 'caption' is null"
    assert rejected[8]["detail"] == "column 'image' has neither image bytes nor a path"
    assert rejected[10]["detail"] == "column 'caption' must hold a string, got int"
    assert json.loads(rejected[3]["input"]) == {"file": "p1.parquet", "row": 2, "image": "<124 bytes>", "text": "broken"}
    samples = {s.source.line: s for s in samples_of(outs[0])}
    assert {line: (s.text, s.source.manifest, s.source.id, s.media[0].source) for line, s in samples.items()} == {
        1: ("red", "p1.parquet", "0", "image"), 2: ("blue", "p1.parquet", "1", "image"),
        5: ("yellow", "p1.parquet", "4", "image"), 6: ("cyan", "p2.parquet", "0", "cyan.png"),
        7: ("magenta", "p2.parquet", "1", "beside.png")}
    assert media_bytes(outs[0]) == {"000000001": RED, "000000002": BLUE, "000000005": YELLOW, "000000006": CYAN,
                                    "000000007": MAGENTA}
    crashed = tmp_path / "crashed"  # --resume, from the journal of a build killed after its first shard
    import_parquet(parquet_files / "*.parquet", crashed, max_samples_per_shard=2)
    _crash_after(crashed, keep_shards=1)
    summary = import_parquet(parquet_files / "*.parquet", crashed, max_samples_per_shard=2, resume=True)
    assert summary.samples_this_run == 3 and shard_bytes(crashed) == shard_bytes(outs[0])
    assert (crashed / "rejected.jsonl").read_bytes() == (outs[0] / "rejected.jsonl").read_bytes()
    with pytest.raises(BuildError, match=r"p1.parquet has no column 'img' \(columns: image, caption\)"):
        import_parquet(parquet_files / "*.parquet", tmp_path / "x", image_column="img")
    assert not (tmp_path / "x").exists()


def test_parquet_sft_rows_with_typed_image_parts_or_placeholders(tmp_path):
    user_parts = pa.list_(pa.struct([("type", pa.string()), ("text", pa.string())]))
    messages_type = pa.list_(pa.struct([("role", pa.string()), ("content", user_parts)]))

    def turn(role, *parts):
        return {"role": role, "content": [{"type": t, "text": x} for t, x in parts]}

    trl = pa.table({
        "messages": pa.array([
            [turn("user", ("image", None), ("text", "What colour?")), turn("assistant", ("text", "Red."))],
            [turn("user", ("image", None), ("image", None), ("text", "Same?")), turn("assistant", ("text", "No."))],
        ], messages_type),
        "images": pa.array([[{"bytes": RED, "path": None}], [{"bytes": BLUE, "path": None}]], pa.list_(IMAGE_STRUCT)),
    })
    pq.write_table(trl, tmp_path / "a.parquet")
    swift = json.dumps([{"role": "user", "content": "<image>\nAnd this one?"}, {"role": "assistant", "content": "Green."}])
    pq.write_table(pa.table({"messages": [swift], "images": pa.array([[GREEN]], pa.list_(pa.binary()))}), tmp_path / "b.parquet")
    out = tmp_path / "sft"
    summary = import_parquet(tmp_path / "*.parquet", out, kind="sft", image_column="images")
    check_rejections(out, summary, {1: None, 2: "placeholder_mismatch", 3: None})
    first, third = samples_of(out)
    assert [(m.role, [(p.type, p.text or p.image) for p in m.content]) for m in first.messages] == [
        ("user", [("image", "img0.jpg"), ("text", "What colour?")]), ("assistant", [("text", "Red.")])]
    assert [(p.type, p.text or p.image) for p in third.messages[0].content] == [("image", "img0.webp"), ("text", "And this one?")]
    assert media_bytes(out) == {"000000001": RED, "000000003": GREEN}


def test_parquet_sft_row_naming_one_file_twice_or_a_file_and_bytes_under_its_name(tmp_path):
    """Image cells that name a file (no bytes) keep its path: the same file twice in a row was numbered
    ``images[1]`` like two in-memory images under one name, and rejected as a missing file; bytes
    under a file's name of the same row are numbered, so that each reference reads its own image."""
    (tmp_path / "shared.png").write_bytes(BLUE)
    parts = pa.list_(pa.struct([("type", pa.string()), ("text", pa.string())]))
    messages = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "image", "text": None},
                                             {"type": "text", "text": "Same?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Maybe."}]}]
    on_disk = {"bytes": None, "path": "shared.png"}
    table = pa.table({
        "messages": pa.array([messages, messages], pa.list_(pa.struct([("role", pa.string()), ("content", parts)]))),
        "images": pa.array([[on_disk, on_disk], [{"bytes": RED, "path": "shared.png"}, on_disk]], pa.list_(IMAGE_STRUCT)),
    })
    pq.write_table(table, tmp_path / "rows.parquet")
    out = tmp_path / "sft"
    summary = import_parquet(tmp_path / "*.parquet", out, kind="sft", image_column="images")
    check_rejections(out, summary, {1: None, 2: "duplicate_media"})  # row 2's file is row 1's image
    (sample,) = samples_of(out)
    assert [(p.type, p.image) for p in sample.messages[0].content[:2]] == [("image", "img0.png"), ("image", "img0.png")]
    assert media_bytes(out) == {"000000001": BLUE}
    second = {"row": 1, "messages": messages, "images": [{"bytes": RED, "path": "shared.png"}, on_disk]}
    record, media = translate_sft("messages", "images", second)
    content = record["messages"][0]["content"]
    assert [part["image"] for part in content[:2]] == ["images[0]", "shared.png"] and media == {"images[0]": RED}


def test_the_trainers_loader_reads_an_imported_set_quietly(tars, tmp_path, capfd):
    import torch

    from common.tokens.tokenizer import Tokenizer, train_byte_level_bpe
    from pretrain.data.loader import build_train_loader
    from tests.data_pipeline.pipeline_helpers import data_config

    out = tmp_path / "set"
    import_tars(tars / "*.tar", out, max_samples_per_shard=2)
    words = "a red blue yellow rectangle the one again".split()
    texts = [" ".join(words[(i * 3 + j) % len(words)] for j in range(8)) for i in range(200)]
    tokenizer = Tokenizer.from_file(train_byte_level_bpe(texts, 300, tmp_path / "tok"))

    def loader(verbose: bool):  # one worker process: energon's bars came from every worker
        config = data_config({"tars": out}, packing_buffer_size=8, num_workers=1, verbose_loader=verbose)
        return build_train_loader(config, {"loss_normalization": "token"}, seq_length=128, micro_batch_size=1,
                                  dp_rank=0, dp_size=1, seed=0, tokenizer=tokenizer)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        capfd.readouterr()
        with loader(verbose=False) as quiet:  # the default
            batches = [next(quiet) for _ in range(6)]
            state = quiet.save_state()
            expected = [next(quiet)["tokens"] for _ in range(2)]
        printed = capfd.readouterr()
        assert "Filling reading buffer" not in printed.out + printed.err
        keys = {doc.rsplit("/", 1)[-1] for batch in batches for row in batch["doc_ids"] for doc in row}
        assert keys == {"000000001", "000000002", "000000006"}
        assert all(int((batch["mm_token_type_ids"] == 1).sum()) > 0 for batch in batches)  # images and text
        assert re.fullmatch(r"loader: 1 source\(s\), 2 shards, 3 samples; 1 worker\(s\) x 1 stream\(s\) on this "
                            r"rank; first micro-batch ready in \d+\.\d s", quiet.ready_message)
        with loader(verbose=True) as verbose:  # energon's bars back; the quiet loader's state continues exactly
            verbose.restore_state(state)
            resumed = [next(verbose)["tokens"] for _ in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(resumed, expected, strict=True))
        printed = capfd.readouterr()
        assert "Filling reading buffer" in printed.out + printed.err
    finally:
        torch.set_num_threads(threads)
