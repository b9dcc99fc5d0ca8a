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
