"""The energon-backed loader on real built shard sets: contract, resume, blending, corrupt samples, ranks."""

from __future__ import annotations

import copy
import logging
import os
import pickle
import shutil
from collections import Counter

import pytest
import torch

from common.tokens.tokenizer import Tokenizer, train_byte_level_bpe
from pretrain.data.blend import BlendError
from pretrain.data.loader import build_eval_loader, build_train_loader
from pretrain.data.packing import first_fit_decreasing
from tests.data_pipeline.pipeline_helpers import all_keys, data_config, overwrite_member


def _loader(sets, tokenizer, *, stage=None, seq_length=256, micro_batch_size=2, dp_rank=0, dp_size=1, seed=5,
            weights=None, **options):
    options.setdefault("packing_buffer_size", 32)
    return build_train_loader(
        data_config(sets, weights, **options), stage or {"loss_normalization": "token"},
        seq_length=seq_length, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed,
        tokenizer=tokenizer,
    )


def _check_micro_batch(batch, b, s, tokenizer):
    assert batch["tokens"].shape == (b, s) and batch["tokens"].dtype == torch.int64
    assert batch["labels"].shape == (b, s) and batch["labels"].dtype == torch.int64
    assert batch["loss_mask"].shape == (b, s) and batch["loss_mask"].dtype == torch.float32
    assert batch["position_ids"].shape == (3, b, s) and batch["position_ids"].dtype == torch.int64
    assert "attention_mask" not in batch
    assert batch["cu_seqlens"].dtype == torch.int32 and int(batch["cu_seqlens"][-1]) == b * s
    ids, tokens, labels, mask = batch["document_ids"], batch["tokens"], batch["labels"], batch["loss_mask"].bool()
    for row in range(b):
        for i in range(s - 1):
            if mask[row, i]:  # a target is the next token of the same document
                assert ids[row, i] == ids[row, i + 1] and labels[row, i] == tokens[row, i + 1]
        starts = [i for i in range(s) if ids[row, i] >= 0 and (i == 0 or ids[row, i] != ids[row, i - 1])]
        assert len(starts) == len(batch["doc_ids"][row])
        for i in starts:
            assert bool((batch["position_ids"][:, row, i] == 0).all())  # positions restart per document
    image_tokens = int((batch["mm_token_type_ids"] == 1).sum())
    video_tokens = int((batch["mm_token_type_ids"] == 2).sum())
    assert int(batch["image_grid_thw"].prod(-1).sum()) == batch["pixel_values"].shape[0] == 4 * image_tokens
    assert int(batch["video_grid_thw"].prod(-1).sum()) == batch["pixel_values_videos"].shape[0] == 4 * video_tokens
    assert bool((tokens == tokenizer.image_pad_id).sum() == image_tokens)
    assert batch["num_real_tokens"] == int((ids >= 0).sum())


def test_micro_batches_follow_the_contract(shard_sets, tokenizer):
    loader = _loader(shard_sets, tokenizer, stage={"loss_normalization": "sample"})
    kinds = Counter()
    for _ in range(4):
        batch = next(loader)
        _check_micro_batch(batch, 2, 256, tokenizer)
        kinds.update(batch["documents_per_kind"])
        # "sample" normalisation: every document with targets weighs 1 in total.
        docs_with_targets = sum(
            len(set(batch["document_ids"][r][batch["loss_mask"][r].bool()].tolist())) for r in range(2)
        )
        assert float(batch["loss_weights"].sum()) == pytest.approx(docs_with_targets, rel=1e-5)
    assert len(kinds) >= 3  # the blend mixes the kinds
    assert loader.counters["micro_batches"] == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_uninterrupted_batches(shard_sets, tokenizer, workers, tmp_path):
    sets = {k: shard_sets[k] for k in ("image_text", "interleaved")}
    total, first = 7, 3
    with _loader(sets, tokenizer, num_workers=workers) as reference:
        expected = [next(reference) for _ in range(total)]
        reference_documents = reference.counters["num_documents"]

    interrupted = _loader(sets, tokenizer, num_workers=workers)
    for _ in range(first):
        next(interrupted)
    state = pickle.loads(pickle.dumps(interrupted.save_state()))  # as stored in a checkpoint
    interrupted.close()

    resumed = _loader(sets, tokenizer, num_workers=workers)
    resumed.restore_state(state)
    for want in expected[first:]:
        got = next(resumed)
        assert got["doc_ids"] == want["doc_ids"]
        for key in ("tokens", "labels", "loss_mask", "position_ids", "pixel_values", "image_grid_thw"):
            assert torch.equal(got[key], want[key]), key
        assert got["micro_batches_total"] == want["micro_batches_total"]
    assert resumed.counters["num_documents"] == reference_documents
    resumed.close()

    with pytest.raises(ValueError, match="seq_length: saved 256, now 128"):
        _loader(sets, tokenizer, num_workers=workers, seq_length=128).restore_state(state)
    # How samples are encoded decides their sizes, which the restored packing buffers' plans hold.
    with pytest.raises(ValueError, match='encoding: saved .*"image_min_pixels": 4096.*"image_min_pixels": 8192'):
        _loader(sets, tokenizer, num_workers=workers, image_min_pixels=8192).restore_state(state)
    other = Tokenizer.from_file(train_byte_level_bpe(["another corpus of words"] * 50, 300, tmp_path / "other"))
    with pytest.raises(ValueError, match=f"tokenizer: saved '{tokenizer.fingerprint}', now '{other.fingerprint}'"):
        _loader(sets, other, num_workers=workers).restore_state(state)
    # A state saved before these were recorded restores.
    old = copy.deepcopy(state)
    for stream in old.values():
        del stream["settings"]["encoding"], stream["settings"]["tokenizer"]
    _loader(sets, tokenizer, num_workers=workers).restore_state(old)


def test_blend_proportions_match_the_weights(shard_sets, tokenizer):
    # data weights x stage weights: image_text 2 x 1.5, interleaved 1 x 1 -> 3 : 1; sft is not in the stage.
    stage = {"data_weights": {"image_text": 1.5, "interleaved": 1.0}, "loss_normalization": "token"}
    sets = {k: shard_sets[k] for k in ("image_text", "sft", "interleaved")}
    loader = _loader(sets, tokenizer, stage=stage, weights={"image_text": 2.0, "sft": 1.0, "interleaved": 1.0},
                     seq_length=512, micro_batch_size=4, packing_buffer_size=64)
    counts = Counter()
    while sum(counts.values()) < 1200:
        counts.update(next(loader)["documents_per_source"])
    total = sum(counts.values())
    assert set(counts) == {"image_text", "interleaved"}
    # Binomial standard deviation sqrt(.75 * .25 / 1200) = 0.0125: 4 sigma.
    assert counts["image_text"] / total == pytest.approx(0.75, abs=0.05)


def test_corrupt_samples_are_skipped_counted_and_logged(corrupt_set, tokenizer, caplog):
    path, broken = corrupt_set
    sets = {"image_text": path}
    caplog.set_level(logging.WARNING, logger="pretrain.data")
    # One ordered pass over the set: every good sample exactly once, every broken one skipped.
    passes = build_eval_loader(data_config(sets, packing_buffer_size=16), {}, seq_length=256, micro_batch_size=2,
                               dp_rank=0, dp_size=1, tokenizer=tokenizer, split_part="train")
    seen, skipped = Counter(), []
    for batch in passes:
        seen.update(doc.split("/")[-1] for row in batch["doc_ids"] for doc in row)
        skipped += batch["skipped"]
    assert sorted(r["key"] for r in skipped) == sorted(broken)
    assert {r["key"]: r["shard"] for r in skipped} == broken
    assert {r["reason"] for r in skipped} <= {"image_decode_error", "schema_error", "invalid_sample"}
    assert set(seen) == all_keys(path) - set(broken) and set(seen.values()) == {1}
    for key, shard in broken.items():
        assert any(key in m and shard in m for m in caplog.messages)

    # Training goes on through the broken samples (several epochs of this small set) and counts them;
    # a resumed run reports the same skips at the same micro-batches.
    train = _loader(sets, tokenizer, seq_length=256, micro_batch_size=2)
    expected = [next(train) for _ in range(12)]
    assert expected[-1]["samples_skipped_total"] >= 2 and train.counters["skipped_by_reason"]
    assert any(batch["skipped"] for batch in expected[5:])
    interrupted = _loader(sets, tokenizer, seq_length=256, micro_batch_size=2)
    for _ in range(5):
        next(interrupted)
    resumed = _loader(sets, tokenizer, seq_length=256, micro_batch_size=2)
    resumed.restore_state(interrupted.save_state())
    for want in expected[5:]:
        got = next(resumed)
        assert got["skipped"] == want["skipped"] and got["doc_ids"] == want["doc_ids"]
        assert got["samples_skipped_total"] == want["samples_skipped_total"]


@pytest.mark.parametrize("kind, field, pattern, wrong", [
    ("image_text", "width", r"1\d\d", "999"),  # an image of 100 px or more across, said to be 999 px across
    # a video of 10 to 89 frames said to have 99: longer, more frames sampled (a misstated fps is not this
    # case: the container's timestamps, read when planning, then time the frames as decoding does)
    ("video", "num_frames", r"[1-8]\d", "99"),
])
def test_media_whose_record_misstates_them_are_skipped_when_realised(shard_sets, tokenizer, tmp_path, caplog,
                                                                    kind, field, pattern, wrong):
    """Packs are planned from the media's shard records; a sample whose record says another image size or
    video frame count than its media have (a hand-edited or foreign shard) is caught when the pack is
    realised: skipped with reason ``realise_failed``, logged, and every other sample still trained on
    exactly once."""
    import re
    import tarfile

    path = tmp_path / kind
    shutil.copytree(shard_sets[kind], path)
    shard = sorted(path.glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        jsons = [(m, tar.extractfile(m).read().decode()) for m in tar.getmembers() if m.name.endswith(".json")]
    member, text = next((m, t) for m, t in jsons if re.search(rf'"{field}":({pattern})\b', t))
    stated = re.search(rf'"{field}":({pattern})\b', text).group(1)
    overwrite_member(shard, member.name, text.replace(f'"{field}":{stated}', f'"{field}":{wrong}', 1).encode())
    key = member.name.split(".")[0]
    caplog.set_level(logging.WARNING, logger="pretrain.data")
    passes = build_eval_loader(data_config({kind: path}, packing_buffer_size=16), {}, seq_length=256,
                               micro_batch_size=2, dp_rank=0, dp_size=1, tokenizer=tokenizer, split_part="train")
    seen, skipped = Counter(), []
    for batch in passes:
        seen.update(doc.split("/")[-1] for row in batch["doc_ids"] for doc in row)
        skipped += batch["skipped"]
    assert [(r["key"], r["reason"]) for r in skipped] == [(key, "realise_failed")]
    assert "the plan had" in skipped[0]["detail"] and any(key in m for m in caplog.messages)
    assert set(seen) == all_keys(path) - {key} and set(seen.values()) == {1}


def test_data_parallel_ranks_read_disjoint_samples(shard_sets, tokenizer):
    sets = {"image_text": shard_sets["image_text"]}
    seen = []
    for rank in range(2):
        loader = _loader(sets, tokenizer, dp_rank=rank, dp_size=2, micro_batch_size=1)
        seen.append({doc for _ in range(3) for row in next(loader)["doc_ids"] for doc in row})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_each_buffer_becomes_exactly_its_first_fit_decreasing_packs(shard_sets, tokenizer):
    """Every sample of a packing buffer lands in one of that buffer's packs, and those packs are the
    bins of first-fit decreasing over the buffer's sizes: the loader's fill is the packing's
    (test_dp_packing checks the README's figure on it)."""
    size = 48
    loader = _loader(shard_sets, tokenizer, seq_length=512, micro_batch_size=1, packing_buffer_size=size)
    for _ in range(2):
        lengths, packs = [], []
        while len(lengths) < size:
            ids = next(loader)["document_ids"][0]
            pack = [int((ids == d).sum()) for d in range(int(ids.max()) + 1)]
            lengths += pack
            packs.append(sum(pack))
        assert len(lengths) == size  # the buffer's packs came out before any of the next buffer's
        bins = first_fit_decreasing(lengths, [0] * size, 512)
        assert sorted(packs) == sorted(sum(lengths[i] for i in b) for b in bins)
    loader.close()


def test_bad_configuration_is_a_clear_error(shard_sets, tokenizer, tmp_path):
    with pytest.raises(BlendError, match="'missing'.*does not exist"):
        _loader({"missing": tmp_path / "nope"}, tokenizer)
    (tmp_path / "plain").mkdir()
    with pytest.raises(BlendError, match="not a prepared shard set"):
        _loader({"plain": tmp_path / "plain"}, tokenizer)
    with pytest.raises(BlendError, match="unknown source"):
        _loader(shard_sets, tokenizer, stage={"data_weights": {"books": 1.0}})
    with pytest.raises(BlendError, match="no data source has shards in split 'val'"):
        build_eval_loader(data_config(shard_sets), {}, seq_length=64, micro_batch_size=1, dp_rank=0, dp_size=1,
                          tokenizer=tokenizer)
    # An RL prompt set (prompts, no targets) is a stage's stage.rl.prompts, never training data.
    prompts = tmp_path / "prompts"
    shutil.copytree(shard_sets["image_text"], prompts)
    meta = prompts / ".nv-meta" / "dataset.yaml"
    meta.write_text(meta.read_text().replace("kind: image_text", "kind: rl"))
    with pytest.raises(BlendError, match="is an RL prompt set"):
        _loader({"prompts": prompts}, tokenizer)
    # A shard truncated after the build (energon cannot read past it): the job stops before it starts.
    truncated = tmp_path / "truncated"
    shutil.copytree(shard_sets["image_text"], truncated)
    shard = truncated / "shard-000001.tar"
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(BlendError, match="shard-000001.tar has .* bytes, index.json says"):
        _loader({"image_text": truncated}, tokenizer)
    loader = _loader(shard_sets, tokenizer)
    next(loader)
    with pytest.raises(RuntimeError, match="before the first micro-batch"):
        loader.restore_state(loader.save_state())


def test_loader_from_the_hydra_job_config(shard_sets, tokenizer):
    """The typed ``data`` and ``stage`` sections of a composed job drive the loader (as the trainer calls it)."""
    from pretrain.cli import load_job

    root = shard_sets["image_text"].parent
    _, job = load_job(["stage=s0_align", f"data.root={root}", "data.packing_buffer_size=24",
                       "data.image_max_pixels=16384"])
    loader = build_train_loader(job.data, job.stage, seq_length=256, micro_batch_size=1, dp_rank=0, dp_size=1,
                                seed=job.train.seed, tokenizer=tokenizer)
    # S0 trains on image-text and interleaved data only, with square-root loss normalisation.
    assert [s.name for s in loader.sources] == ["image_text", "interleaved"]
    assert loader.settings.loss_normalization == "square_root"
    sources = Counter()
    for _ in range(3):
        batch = next(loader)
        sources.update(batch["documents_per_source"])
        weights = batch["loss_weights"][batch["loss_mask"] > 0]
        assert weights.max() <= 1.0 and weights.min() < 1.0  # 1/sqrt(n) per target of an n-target document
    assert set(sources) <= {"image_text", "interleaved"}
