"""HF <-> Megatron checkpoint conversion (bit-exact round trip, resharding) and the parity command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.model import tiny_hf

ROOT = Path(__file__).resolve().parents[2]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _run(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def test_moe_round_trip_through_tp2_ep2_is_bit_exact_and_writes_the_published_layout(tmp_path):
    from model.convert import hf_to_mcore, mcore_to_hf

    src = tiny_hf.save_reference("moe", tmp_path / "hf", seed=3)
    hf_to_mcore(src, tmp_path / "mcore", tp=2, ep=2, etp=1)  # written by 2 ranks, each its shard
    assert (tmp_path / "mcore" / "metadata.json").is_file()
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back")  # read back in the single-rank layout

    a, b = _tensors(src), _tensors(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for name, x in a.items():
        y = b[name]
        if ".mlp.experts." in name:
            # transformers 5 saves (E, 2I, H) / (E, H, I); the published checkpoints (and we) (E, H, 2I) / (E, I, H).
            assert y.shape == (x.shape[0], x.shape[2], x.shape[1]), name
            y = y.transpose(1, 2)
        assert y.dtype == x.dtype and torch.equal(x, y), name
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == \
        json.loads((src / "config.json").read_text())
    assert (tmp_path / "back" / "generation_config.json").is_file()  # carried through hf_extra/

    # A published-layout checkpoint converts to exactly itself, byte for byte (into a folder not made yet).
    hf_to_mcore(tmp_path / "back", tmp_path / "mcore2", pp=2)
    mcore_to_hf(tmp_path / "mcore2", tmp_path / "exports" / "again")
    assert (tmp_path / "exports" / "again" / "model.safetensors").read_bytes() == \
        (tmp_path / "back" / "model.safetensors").read_bytes()

    # An existing output is refused, not overwritten.
    with pytest.raises(FileExistsError):
        mcore_to_hf(tmp_path / "mcore", tmp_path / "back")


@pytest.mark.slow
def test_parity_command_on_a_converted_checkpoint_passes_and_fails_above_tolerance(tmp_path):
    from model.convert import hf_to_mcore, mcore_to_hf

    src = tiny_hf.save_reference("dense", tmp_path / "hf", seed=5)
    hf_to_mcore(src, tmp_path / "mcore", tp=2)
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back")

    # The exported (published-layout) checkpoint, loaded by transformers and by us at PP=2.
    proc = _run("-m", "model.check_parity", "--hf", str(tmp_path / "back"), "--pp", "2",
                "--json", str(tmp_path / "report.json"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["inputs"]) == {"text", "one_image", "two_images", "video", "interleaved"}
    assert report["worst"] <= 1e-4
    assert "interleaved" in proc.stdout and "FAIL" not in proc.stdout

    # Above the tolerance the command fails (exit 1) and says which inputs. (TP2: its sums run in another
    # order than the reference's, so the logits differ in the last bits; TP1 can match exactly.)
    proc = _run("-m", "model.check_parity", "--hf", str(tmp_path / "back"), "--tp", "2", "--tolerance", "0",
                check=False)
    assert proc.returncode == 1 and "FAIL" in proc.stdout


def test_converter_command_line_errors_are_clear(tmp_path):
    proc = _run("-m", "model.convert", "mcore-to-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o"),
                check=False)
    assert proc.returncode == 2 and "qwen3vl_config.json" in proc.stderr


def test_an_export_without_generation_config_stops_at_the_end_of_a_turn(tmp_path):
    """A stage trained from `compose` or from scratch carries only its tokenizer in hf_extra/: its export had
    no generation_config.json, so transformers' generate knew no end token and wrote max_new_tokens every
    time. The export adds the published Qwen3-VL's end tokens; a source's own generation config is kept."""
    from transformers import GenerationConfig

    from common.tokens.tokenizer import Tokenizer, train_byte_level_bpe
    from model.convert import exported_extra_files

    extra, staging = tmp_path / "hf_extra", tmp_path / "staging"
    staging.mkdir()
    tokenizer = Tokenizer.from_file(train_byte_level_bpe(["red green blue"] * 20, 300, extra))
    assert exported_extra_files(extra, staging) == staging
    assert (staging / "tokenizer.json").read_bytes() == (extra / "tokenizer.json").read_bytes()
    generation = GenerationConfig.from_pretrained(staging)
    assert generation.eos_token_id == [tokenizer.im_end_id, tokenizer.eos_id]
    assert generation.pad_token_id == tokenizer.pad_id

    (extra / "generation_config.json").write_text('{"eos_token_id": 7}')
    kept = tmp_path / "kept"
    kept.mkdir()
    assert exported_extra_files(extra, kept) == kept  # still without the processor files: they are added
    assert (kept / "generation_config.json").read_text() == '{"eos_token_id": 7}'
    for name in ("preprocessor_config.json", "video_preprocessor_config.json", "chat_template.jinja",
                 "tokenizer_config.json"):
        (extra / name).write_text((staging / name).read_text())
    assert exported_extra_files(extra, tmp_path) == extra  # a published checkpoint's files: kept as they are


def test_an_export_without_processor_files_preprocesses_and_formats_chats_as_training(tmp_path):
    """An export from `compose` or from scratch had no preprocessor configs, tokenizer config or chat
    template: transformers' processors did not load. The added ones reproduce this stack's preprocessing
    (an image's grid and pixel values, through transformers' own image processor) and chat formatting (the
    published template, through transformers' tokenizer: the ids of our renderer)."""
    import numpy as np
    import PIL.Image
    from transformers import AutoImageProcessor, AutoTokenizer

    from common.media.vision_inputs import VisionInputConfig, process_image
    from common.tokens.chat_template import render_chat
    from common.tokens.tokenizer import Tokenizer, train_byte_level_bpe
    from model.convert import exported_extra_files

    extra, staging = tmp_path / "hf_extra", tmp_path / "staging"
    staging.mkdir()
    ours = Tokenizer.from_file(train_byte_level_bpe(["what colour is the shape? red"] * 20, 300, extra))
    exported = exported_extra_files(extra, staging)

    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 451, 3), dtype=np.uint8))
    theirs = AutoImageProcessor.from_pretrained(exported)(images=[image], return_tensors="pt")
    mine = process_image(image, VisionInputConfig())
    assert theirs["image_grid_thw"].tolist() == [list(mine.grid_thw)]
    assert np.abs(theirs["pixel_values"].numpy() - mine.pixel_values.numpy()).max() < 1e-5

    chat = [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                         {"type": "text", "text": "what colour is the shape?"}]},
            {"role": "assistant", "content": "red"}]
    tokenizer = AutoTokenizer.from_pretrained(exported)
    template = (exported / "chat_template.jinja").read_text()
    ids = tokenizer.apply_chat_template(chat, chat_template=template, tokenize=True, return_dict=False)
    assert list(ids) == ours.encode(render_chat(chat), allow_special=True)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
