"""RL prompt sets (pretrain.posttrain.prompt_set): build-rl -> load_prompt_set -> encode_rl_prompt, and PromptStream."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from data_tools.build import run_build
from data_tools.config import BuildConfig
from data_tools.synth import ImageSpec, VideoSpec, encode_image, encode_synth_video
from pretrain.data.encoding import SampleEncodingError
from pretrain.posttrain.prompt_set import (
    PromptBatch,
    PromptRecord,
    PromptSetError,
    PromptStream,
    encode_rl_prompt,
    encode_step_prompts,
    load_prompt_set,
)

QUESTION = "What colour is the shape?"
SYSTEM = "Answer with one word."


def _build(kind: str, manifest: Path, out: Path) -> None:
    run_build(BuildConfig(kind=kind, manifest=str(manifest), out=str(out), workers=0, progress=False))


@pytest.fixture(scope="module")
def prompt_set(tmp_path_factory) -> tuple[Path, Path]:
    """(raw folder, built set) of four prompts: image, video, system + image, text only."""
    root = tmp_path_factory.mktemp("rl_prompts")
    raw = root / "raw"
    raw.mkdir()
    (raw / "a.png").write_bytes(encode_image(ImageSpec("red", "circle", "white", 96, 72, 40, 36, 20, "png")))
    (raw / "b.jpg").write_bytes(encode_image(ImageSpec("blue", "star", "gray", 64, 120, 32, 60, 22, "jpg")))
    (raw / "c.mp4").write_bytes(encode_synth_video(VideoSpec("green", "square", "black", "up", 64, 64, 11, 2.0, 0.5, 30)))
    lines = [
        {"id": "image", "messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                                  {"type": "text", "text": QUESTION}]}], "answer": "red"},
        {"id": "video", "messages": [{"role": "user", "content": [{"type": "video", "video": "c.mp4"},
                                                                  {"type": "text", "text": "Which way does it move?"}]}],
         "answer": "up"},
        {"id": "system", "messages": [{"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": [{"type": "image", "image": "b.jpg"},
                                                                   {"type": "text", "text": QUESTION}]}], "answer": "blue"},
        {"id": "text", "messages": [{"role": "user", "content": "Say hello."}], "answer": None, "reward": "format"},
    ]
    (raw / "rl.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    _build("rl", raw / "rl.jsonl", root / "set")
    return raw, root / "set"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from common.media.vision_inputs import VisionInputConfig
    from common.tokens.tokenizer import Tokenizer, train_byte_level_bpe
    from pretrain.data.encoding import EncodingConfig, SampleEncoder

    words = "what colour is the shape which way does it move answer with one word say hello red blue up".split()
    texts = [" ".join(words[(i * 5 + j) % len(words)] for j in range(10)) for i in range(100)]
    tokenizer = Tokenizer.from_file(train_byte_level_bpe(texts, 300, tmp_path_factory.mktemp("tok")))
    vision = VisionInputConfig(image_min_pixels=1024, image_max_pixels=8192, video_min_pixels=1024, video_max_pixels=8192)
    return SampleEncoder(tokenizer, EncodingConfig(vision=vision))


def test_load_prompt_set_reads_every_prompt_in_order(prompt_set):
    raw, built = prompt_set
    records = load_prompt_set(built)
    assert [(r.id, r.answer, r.reward) for r in records] == [
        ("image", "red", "exact_match"), ("video", "up", "exact_match"), ("system", "blue", "exact_match"),
        ("text", None, "format")]
    assert [m.role for m in records[2].messages] == ["system", "user"]
    assert records[0].media == {"img0.png": (raw / "a.png").read_bytes()}  # the encoded bytes, decoded on use
    assert records[1].media == {"vid0.mp4": (raw / "c.mp4").read_bytes()} and records[3].media == {}
    assert records[0].source == "rl.jsonl:1"


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_encode_rl_prompt_gives_the_tensors_of_encode_prompt(prompt_set, encoder):
    from common.media.decode import load_image
    from pretrain.generate import InferenceModel, encode_prompt, encode_prompt_messages, load_media

    raw, built = prompt_set
    image, video, system, text = load_prompt_set(built)
    frames = encoder.config.frames
    im = InferenceModel(None, encoder.tokenizer, encoder, frames, None)
    from_image = encode_rl_prompt(encoder, image)
    _same(from_image, encode_prompt(im, load_media(raw / "a.png", "image", frames), "image", QUESTION))
    assert {"pixel_values", "image_grid_thw"} <= from_image.keys() and "pixel_values_videos" not in from_image
    from_video = encode_rl_prompt(encoder, video)
    _same(from_video, encode_prompt(im, load_media(raw / "c.mp4", "video", frames), "video", "Which way does it move?"))
    assert from_video["video_grid_thw"].shape[0] == 1
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "image", "image": load_image(str(raw / "b.jpg"))},
                                             {"type": "text", "text": QUESTION}]}]
    _same(encode_rl_prompt(encoder, system), encode_prompt_messages(encoder, messages))
    _same(encode_rl_prompt(encoder, text), encode_prompt_messages(encoder, [{"role": "user", "content": "Say hello."}]))
    # The prompt ends where the answer begins: "<|im_start|>assistant\n".
    prompt = encoder.tokenizer.decode(from_image["input_ids"].tolist(), skip_special_tokens=False)
    assert prompt.endswith(f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n")


def _records(n: int) -> list[PromptRecord]:
    return [PromptRecord(id=f"p{i}", messages=(), answer=str(i), reward="exact_match", media={}, key=f"{i:09d}",
                         source=f"m.jsonl:{i + 1}") for i in range(n)]


def _global_batches(records, steps, per_step, seed, dp_size, state=None) -> list[tuple[list[int], list[int]]]:
    """(prompt indices, keys) of each global batch, gathered over ``dp_size`` ranks in rank order."""
    streams = [PromptStream(records, per_step, seed, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    if state is not None:
        for s in streams:
            s.load_state_dict(state)
    out = []
    for _ in range(steps):
        batches = [next(s) for s in streams]
        assert all(len(b.records) == per_step // dp_size for b in batches)
        assert all([r.id for r in b.records] == [f"p{i}" for i in b.indices] for b in batches)
        out.append(([i for b in batches for i in b.indices], [k for b in batches for k in b.keys]))
    return out


def test_prompt_stream_deals_the_same_global_batches_whatever_the_data_parallel_size():
    records = _records(10)
    one = _global_batches(records, 7, 4, seed=3, dp_size=1)
    assert _global_batches(records, 7, 4, seed=3, dp_size=2) == one
    assert _global_batches(records, 7, 4, seed=3, dp_size=4) == one
    assert all(keys == [0, 1, 2, 3] for _, keys in one)  # index in the global batch: the rollout's prompt_keys
    flat = [i for indices, _ in one for i in indices]
    assert sorted(flat[:10]) == sorted(flat[10:20]) == list(range(10))  # each epoch deals every prompt once
    assert flat[:10] != flat[10:20]  # reshuffled per epoch (28 prompts: the third epoch is under way)
    assert [i for indices, _ in _global_batches(records, 7, 4, seed=4, dp_size=1) for i in indices] != flat


def test_prompt_stream_resumes_exactly_in_any_layout():
    records = _records(10)
    stream = PromptStream(records, 4, seed=5)
    for _ in range(3):  # 12 prompts: into the second epoch
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))  # checkpoints store it as JSON
    assert (state["epoch"], state["cursor"]) == (1, 2)
    expected = _global_batches(records, 8, 4, seed=5, dp_size=1)[3:]
    assert _global_batches(records, 5, 4, seed=5, dp_size=1, state=state) == expected
    assert _global_batches(records, 5, 4, seed=5, dp_size=2, state=state) == expected
    with pytest.raises(ValueError, match="another prompt set or seed"):
        PromptStream(records, 4, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="num_prompts"):
        PromptStream(_records(9), 4, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="multiple of the data-parallel size"):
        PromptStream(records, 3, seed=5, dp_rank=0, dp_size=2)


def test_load_prompt_set_refuses_what_is_not_an_rl_set_in_one_line(prompt_set, tmp_path):
    raw, built = prompt_set
    sft = raw / "sft.jsonl"
    sft.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}) + "\n")
    _build("sft", sft, tmp_path / "sft")
    (tmp_path / "empty").mkdir()
    for folder, words in ((tmp_path / "nowhere", "no such folder"), (tmp_path / "empty", "no index.json"),
                          (tmp_path / "sft", "a 'sft' shard set, not an RL prompt set")):
        with pytest.raises(PromptSetError) as info:
            load_prompt_set(folder)
        message = str(info.value)
        assert str(folder) in message and words in message and "\n" not in message


def _with_broken_media(record: PromptRecord, name: str) -> PromptRecord:
    return replace(record, id=name, media={part: b"not a medium" for part in record.media})


def _mixed_records(built: Path) -> list[PromptRecord]:
    """Three prompts that encode and two whose media do not decode (an image, a video)."""
    image, video, system, text = load_prompt_set(built)
    return [image, _with_broken_media(video, "bad-video"), system, text, _with_broken_media(image, "bad-image")]


def _encode_steps(encoder, records, steps: int, dp_rank: int = 0, dp_size: int = 1, group=None):
    """Per step: (prompt indices, keys, skipped prompt ids) of this rank; then the stream's state."""
    stream = PromptStream(records, 4, seed=1, dp_rank=dp_rank, dp_size=dp_size)
    out = []
    for _ in range(steps):
        batch, prompts, skipped = encode_step_prompts(encoder, stream, next(stream), group)
        assert len(prompts) == len(batch.records) == 4 // dp_size
        assert all("input_ids" in p for p in prompts)
        assert [r.id for r in batch.records] == [records[i].id for i in batch.indices]
        out.append((batch.indices, batch.keys, [s["prompt"] for s in skipped]))
    return out, stream.state_dict()


def test_a_prompt_that_does_not_encode_is_recorded_and_the_next_one_takes_its_place(prompt_set, encoder):
    records = _mixed_records(prompt_set[1])
    steps, state = _encode_steps(encoder, records, 3)
    trained = [i for indices, _, _ in steps for i in indices]
    skipped = [name for _, _, names in steps for name in names]
    assert all(keys == [0, 1, 2, 3] for _, keys, _ in steps)  # each place keeps its sampling stream
    assert {records[i].id for i in trained} == {"image", "system", "text"}
    # No good prompt lost: the prompts trained are the good ones of the stream's first draws, in any order.
    drawn = PromptStream(records, 4, seed=1).draw(len(trained) + len(skipped))
    assert sorted(trained) == sorted(i for i in drawn if not records[i].id.startswith("bad"))
    assert sorted(skipped) == sorted(records[i].id for i in drawn if records[i].id.startswith("bad"))
    assert skipped and state["epoch"] * 5 + state["cursor"] == len(drawn)
    with pytest.raises(SampleEncodingError, match="none of the 1 RL prompts can be encoded"):
        encode_step_prompts(encoder, PromptStream(records[1:2], 1, seed=0), PromptBatch(records[1:2], [0], [0]))


def _encode_on_two_ranks(rank, encoder, records):
    import torch.distributed as dist

    dist.init_process_group("gloo")  # data parallelism alone: the world is the data-parallel group
    return _encode_steps(encoder, records, 3, rank, 2, dist.group.WORLD)


def test_skipped_prompts_are_replaced_alike_on_every_data_parallel_rank(prompt_set, encoder):
    """dp = 2: each rank encodes its half; a failure on one rank is replaced from the stream on both, so
    the global batches, the skipped prompts and the stream's state are those of one process."""
    from tests.multirank import run_ranks

    records = _mixed_records(prompt_set[1])
    one, state = _encode_steps(encoder, records, 3)
    (first, state0), (second, state1) = run_ranks(_encode_on_two_ranks, 2, encoder, records)
    assert state0 == state1 == state
    for step, (a, b) in enumerate(zip(first, second)):
        assert (a[0] + b[0], a[1] + b[1]) == one[step][:2], step
        assert a[2] == b[2] == one[step][2], step  # every rank learns every skipped prompt
