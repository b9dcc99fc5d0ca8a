"""Weights checkpoints carry the model's config, and one written for another architecture is refused."""

from __future__ import annotations

from tests.model import tiny_hf
from tests.multirank import run_ranks


def _variant(base: dict, text: dict | None = None, vision: dict | None = None) -> dict:
    return dict(base, text_config=dict(base["text_config"], **(text or {})),
                vision_config=dict(base["vision_config"], **(vision or {})))


def _load_variants_body(rank, ckpt):
    import torch

    from common.distributed.parallel import initialize_distributed
    from model.checkpoint_io import CONFIG_FILE, CheckpointError, load_weights, save_weights
    from model.config import Qwen3VLConfig
    from model.qwen3vl import build_qwen3vl

    initialize_distributed({})
    base = dict(tiny_hf.DENSE, model_type="qwen3_vl")
    torch.manual_seed(0)
    saved = build_qwen3vl(Qwen3VLConfig.from_hf(base))
    save_weights(ckpt, [saved])
    rope = dict(base["text_config"]["rope_parameters"], rope_theta=1e6, mrope_section=[4, 2, 2])
    variants = {
        "vocab": _variant(base, text=dict(vocab_size=640)),
        "vit": _variant(base, vision=dict(depth=2, deepstack_visual_indexes=[0, 1])),
        "rope": _variant(base, text=dict(rope_parameters=rope)),
        "tokens": dict(base, image_token_id=499),
        # A limit, not part of the function (MRoPE has no position table): loads.
        "positions": _variant(base, text=dict(max_position_embeddings=8192)),
    }
    out = {}
    for name, hf in variants.items():
        try:
            load_weights(ckpt, [build_qwen3vl(Qwen3VLConfig.from_hf(hf))])
            out[name] = None
        except CheckpointError as exc:
            out[name] = str(exc)
    # A checkpoint written before the config was recorded: nothing to compare, the weights load.
    (ckpt / CONFIG_FILE).unlink()
    model = build_qwen3vl(Qwen3VLConfig.from_hf(base))
    load_weights(ckpt, [model])
    out["old"] = all(torch.equal(a, b) for a, b in zip(saved.parameters(), model.parameters()))
    return out


def test_load_weights_refuses_a_checkpoint_of_another_architecture(tmp_path):
    """stage.init_from into a model with a larger vocabulary (zero rows appended), fewer ViT layers and
    DeepStack mergers (some weights left out) or other rotary settings loaded without a word."""
    ckpt = tmp_path / "ckpt"
    out, = run_ranks(_load_variants_body, 1, ckpt)
    lead = f"checkpoint {ckpt} was written for a different model (checkpoint vs this model): "
    assert out["vocab"] == lead + "text.vocab_size 512 vs 640"
    assert out["vit"] == lead + "vision.depth 3 vs 2, vision.deepstack_visual_indexes [0, 1, 2] vs [0, 1]"
    assert out["rope"] == lead + "text.rope_theta 5000000.0 vs 1000000.0, text.mrope_section [2, 3, 3] vs [4, 2, 2]"
    assert out["tokens"] == lead + "image_token_id 500 vs 499"
    assert out["positions"] is None
    assert out["old"] is True


def _truncate(file, fraction: float = 0.5) -> None:
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(int(size * fraction))


def _load_damaged_body(rank, ckpt):
    import shutil

    import torch

    from common.distributed.parallel import initialize_distributed
    from model.checkpoint_io import CheckpointError, load_weights, save_weights
    from model.config import Qwen3VLConfig
    from model.qwen3vl import build_qwen3vl

    initialize_distributed({})
    cfg = Qwen3VLConfig.from_hf(dict(tiny_hf.DENSE, model_type="qwen3_vl"))
    torch.manual_seed(0)
    save_weights(ckpt, [build_qwen3vl(cfg)])
    shard = max(ckpt.glob("*.distcp"), key=lambda f: f.stat().st_size)
    damage = {"shard": lambda d: _truncate(d / shard.name), "common": lambda d: _truncate(d / "common.pt", 0.0),
              "index": lambda d: (d / ".metadata").unlink()}
    out = {"shard_name": shard.name, "shard_size": shard.stat().st_size}
    for name, spoil in damage.items():
        copy = ckpt.parent / name
        shutil.copytree(ckpt, copy)
        spoil(copy)
        try:
            load_weights(copy, [build_qwen3vl(cfg)])
            out[name] = None
        except CheckpointError as exc:
            out[name] = str(exc)
    return out


def test_a_damaged_checkpoint_is_named_with_its_file(tmp_path):
    """A shard cut short (a copy or a write interrupted) came out of torch's reader as a BaseException
    whose text is a bare 'EOFError', naming neither the checkpoint nor the file; an empty common.pt the
    same. Each is one line naming the damaged file; mcore-to-hf reports it as a user error."""
    import pytest

    from model.convert import mcore_to_hf

    ckpt = tmp_path / "ckpt"
    out, = run_ranks(_load_damaged_body, 1, ckpt)
    size = out["shard_size"]
    assert out["shard"] == (f"checkpoint {tmp_path / 'shard'} is damaged: {out['shard_name']}: {size // 2} bytes, "
                            f"the checkpoint's index needs {size} (truncated)")
    assert out["common"] == (f"checkpoint {tmp_path / 'common'} is damaged: common.pt: unreadable "
                             "(EOFError: Ran out of input)")
    assert out["index"] == f"checkpoint {tmp_path / 'index'} is damaged: .metadata: missing"
    (tmp_path / "shard" / "qwen3vl_convert.json").write_text('{"dtype": "float32"}')
    with pytest.raises(ValueError, match=f"{tmp_path / 'shard'} is damaged: {out['shard_name']}: "):
        mcore_to_hf(tmp_path / "shard", tmp_path / "hf")
