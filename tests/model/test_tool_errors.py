"""The model tools refuse bad input with one line (``error: ...``, exit 2) and no traceback: a layout the
architecture cannot be split over is refused before any rank starts, and a user error raised inside a
rank (here a checkpoint whose tensors do not match its config) comes back as that rank's one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import ConfigError, Qwen3VLConfig
from tests.model import tiny_hf

ROOT = Path(__file__).resolve().parents[2]


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _assert_one_line_error(proc: subprocess.CompletedProcess, expected: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {expected}"], proc.stderr


def _edited_checkpoint(path: Path, text: dict | None = None, vision: dict | None = None) -> Path:
    """The dense test checkpoint with config.json fields changed (the tensors stay as saved)."""
    tiny_hf.save_reference("dense", path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"].update(text or {})
    config["vision_config"].update(vision or {})
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("layout, message", [
    ({"tp": 2}, "vision.num_heads 3 is not divisible by the tensor parallel size 2"),
    ({"tp": 4}, "text.num_attention_heads 6 is not divisible by the tensor parallel size 4"),
    ({"tp": 3}, "text.num_key_value_heads 2 is neither a multiple nor a divisor of the tensor parallel size 3"),
    ({"ep": 4}, "text.num_experts 6 is not divisible by the expert parallel size 4"),
    ({"ep": 2, "etp": 5}, "text.moe_intermediate_size 48 is not divisible by the expert tensor parallel size 5"),
    ({"pp": 3}, "text.num_hidden_layers 4 do not split evenly over pp = 3 pipeline stages"),
    ({"pp": 2, "vpp": 4}, "text.num_hidden_layers 4 do not split evenly over pp * vpp = 2 * 4 pipeline stages"),
])
def test_layouts_the_architecture_cannot_be_split_over_are_named(layout, message):
    text = dict(tiny_hf.MOE_UNEVEN["text_config"], num_attention_heads=6, vocab_size=768)
    vision = dict(tiny_hf.MOE_UNEVEN["vision_config"], hidden_size=48, num_heads=3, intermediate_size=96)
    cfg = Qwen3VLConfig.from_hf(dict(tiny_hf.MOE_UNEVEN, model_type="qwen3_vl_moe", text_config=text,
                                     vision_config=vision))
    cfg.check_layout(tp=1, ep=2, etp=1, pp=2, vpp=2)  # a layout that fits
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg.check_layout(**layout)


def test_parity_refuses_a_layout_before_starting_ranks(tmp_path):
    hf = _edited_checkpoint(tmp_path / "hf", vision={"num_heads": 1})  # ViT heads do not split over tp=2
    proc = _run("model.check_parity", "--hf", str(hf), "--tp", "2")
    _assert_one_line_error(proc, "vision.num_heads 1 is not divisible by the tensor parallel size 2")


def test_convert_reports_an_error_raised_in_a_rank_as_one_line(tmp_path):
    hf = _edited_checkpoint(tmp_path / "hf", text={"intermediate_size": 80})  # tensors are 96 wide
    proc = _run("model.convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "out"), "--tp", "2")
    _assert_one_line_error(proc, "decoder.layers.0.mlp.linear_fc1.weight (decoder.layers.0.mlp.linear_fc1.weight): "
                                 "checkpoint gives (96, 64), model has (80, 64)")
    assert not (tmp_path / "out").exists()


def test_sizes_names_an_unknown_config():
    proc = _run("model.sizes", "no_such_model", "--no-reference")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: no model config named 'no_such_model'"), proc.stderr


def test_parity_fails_on_nan_logits(tmp_path, monkeypatch, capsys):
    """A NaN difference (weights never loaded, a broken kernel) is a failure, not a pass: max() and <=
    had let it through with exit 0."""
    from common.distributed import spawn
    from model import check_parity

    (tmp_path / "config.json").write_text("{}")
    report = {"text": {"tokens": 24, "max_abs_diff": float("nan")}, "one_image": {"tokens": 40, "max_abs_diff": 2e-6}}
    monkeypatch.setattr(spawn, "call_reporting_user_errors", lambda *args: report)
    assert check_parity.main(["--hf", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "nan  FAIL" in out and "worst nan" in out
    report["text"]["max_abs_diff"] = 3e-6
    assert check_parity.main(["--hf", str(tmp_path)]) == 0


def test_evaluate_refuses_a_limit_below_one_and_an_empty_question_file(tmp_path):
    from pretrain.evaluate import evaluate

    questions = tmp_path / "eval.jsonl"
    questions.write_text(json.dumps({"media": "a.png", "media_type": "image", "question": "q", "choices": ["a"],
                                     "answer": "a"}) + "\n")
    for limit in (0, -1):
        with pytest.raises(ValueError, match=f"limit={limit} must be >= 1"):
            evaluate(None, questions, limit=limit)
    questions.write_text("\n")
    with pytest.raises(ValueError, match="eval.jsonl: no questions"):
        evaluate(None, questions)


def test_a_truncated_safetensors_file_is_named(tmp_path):
    """safetensors' error for a file cut short ("incomplete metadata") names no file, in a checkpoint of
    dozens of shards; the conversion's one line names it."""
    hf = tmp_path / "hf"
    tiny_hf.save_reference("dense", hf)
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    proc = _run("model.convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {weights}: unreadable safetensors file ("), errors
