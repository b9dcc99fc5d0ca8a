"""Named configs, HF config reading/writing, the MRoPE layout and the ViT geometry (single process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import ConfigError, Qwen3VLConfig
from model.registry import PUBLISHED, get_config, list_configs

ROOT = Path(__file__).resolve().parents[2]

# (layers, hidden, heads, kv heads, ffn, experts, top-k, expert ffn, tied, ViT depth, ViT width, DeepStack)
OFFICIAL = {
    "qwen3vl_2b": (28, 2048, 16, 8, 6144, 0, 0, 0, True, 24, 1024, (5, 11, 17)),
    "qwen3vl_4b": (36, 2560, 32, 8, 9728, 0, 0, 0, True, 24, 1024, (5, 11, 17)),
    "qwen3vl_8b": (36, 4096, 32, 8, 12288, 0, 0, 0, False, 27, 1152, (8, 16, 24)),
    "qwen3vl_32b": (64, 5120, 64, 8, 25600, 0, 0, 0, False, 27, 1152, (8, 16, 24)),
    "qwen3vl_30b_a3b": (48, 2048, 32, 4, 6144, 128, 8, 768, False, 27, 1152, (8, 16, 24)),
    "qwen3vl_235b_a22b": (94, 4096, 64, 4, 12288, 128, 8, 1536, False, 27, 1152, (8, 16, 24)),
}


def test_every_published_size_has_the_official_architecture():
    assert list_configs()[:6] == list(PUBLISHED)
    for name, numbers in OFFICIAL.items():
        c = get_config(name)
        t, v = c.text, c.vision
        got = (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads,
               t.intermediate_size, t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size,
               c.tie_word_embeddings, v.depth, v.hidden_size, v.deepstack_visual_indexes)
        assert got == numbers, name
        assert (t.vocab_size, t.head_dim, t.rope_theta, t.mrope_section) == (151936, 128, 5e6, (24, 20, 20))
        assert t.max_position_embeddings == 262144 and v.out_hidden_size == t.hidden_size
        assert Qwen3VLConfig.from_mapping(c.to_mapping()) == c


def test_reads_the_transformers_4_57_spelling_of_a_published_config_and_writes_one_transformers_loads():
    import transformers

    published = {  # Qwen3-VL-4B-Instruct's config.json (as written by transformers 4.57)
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "tie_word_embeddings": True,
        "text_config": {"model_type": "qwen3_vl_text", "vocab_size": 151936, "hidden_size": 2560,
                        "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
                        "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 5000000,
                        "max_position_embeddings": 262144, "tie_word_embeddings": True,
                        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                         "rope_type": "default"}},
        "vision_config": {"model_type": "qwen3_vl", "depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
                          "num_heads": 16, "out_hidden_size": 2560, "num_position_embeddings": 2304,
                          "deepstack_visual_indexes": [5, 11, 17], "patch_size": 16, "temporal_patch_size": 2,
                          "spatial_merge_size": 2, "in_channels": 3, "hidden_act": "gelu_pytorch_tanh"},
    }
    cfg = Qwen3VLConfig.from_hf(published)
    assert cfg == get_config("qwen3vl_4b")
    assert cfg.to_hf() == published  # the source config is kept verbatim for export
    fresh = get_config("qwen3vl_30b_a3b").to_hf()
    hf = transformers.Qwen3VLMoeConfig(**{k: v for k, v in fresh.items() if k not in ("architectures", "model_type")})
    assert Qwen3VLConfig.from_hf({**hf.to_dict(), "model_type": "qwen3_vl_moe"}) == get_config("qwen3vl_30b_a3b")


@pytest.mark.parametrize("change, message", [
    (lambda m: m["text"].update(rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                 "mrope_section": [2, 2, 2]}), "mrope_section"),
    (lambda m: m["text"].update(bogus=1), "bogus"),
    # Left out of a MoE config it read as 0: experts of width 0, every MoE layer silently added nothing.
    (lambda m: m["text"].pop("moe_intermediate_size"), "moe_intermediate_size"),
    (lambda m: m["vision"].update(out_hidden_size=32), "out_hidden_size"),
    (lambda m: m["vision"].update(deepstack_visual_indexes=[1, 0]), "deepstack"),
    (lambda m: m["vision"].update(num_position_embeddings=60), "square"),
])
def test_bad_configs_are_refused_with_the_field_named(change, message):
    m = get_config("tiny_moe").to_mapping()
    change(m)
    with pytest.raises(ConfigError, match=message):
        Qwen3VLConfig.from_mapping(m)


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="qwen3vl_8b"):
        get_config("qwen3vl_7b")


def test_interleaved_mrope_equals_the_reference_rotary_embedding():
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from model.rope import InterleavedMRoPE

    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20]}
    ref = Qwen3VLTextRotaryEmbedding(Qwen3VLTextConfig(head_dim=128, rope_parameters=rope))
    pos = torch.randint(0, 200_000, (3, 2, 9))
    cos, sin = ref(torch.zeros(1), pos)
    ours = InterleavedMRoPE(128, 5e6, (24, 20, 20))(pos)[:, :, 0].transpose(0, 1)
    assert torch.equal(ours.cos(), cos) and torch.equal(ours.sin(), sin)
    # Not the chunked Qwen2-VL layout: height drives frequency 1, width frequency 2.
    axes = torch.zeros(3, 1, 1, dtype=torch.long)
    axes[1] = 7
    angles = InterleavedMRoPE(128, 5e6, (24, 20, 20))(axes)[0, 0, 0]
    assert angles[0] == 0 and angles[1] != 0 and angles[2] == 0


def test_vit_geometry_equals_the_reference_helpers():
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
    )

    from model.vision import geometry

    grid = torch.tensor([[1, 4, 6], [3, 2, 8], [1, 10, 2]])
    idx, w = geometry.interpolation_taps(grid, 48, 2)
    ref_idx, ref_w = get_vision_interpolation_indices_and_weights(grid, num_grid_per_side=48, mode="bilinear",
                                                                  align_corners=True, spatial_merge_size=2)
    assert torch.equal(idx, ref_idx) and torch.equal(w, ref_w)
    rows, cols = geometry.patch_rows_cols(grid, 2)
    assert torch.equal(torch.stack([rows, cols], -1), get_vision_position_ids(grid, 2))
    assert torch.equal(geometry.cu_seqlens(grid), get_vision_cu_seqlens(grid))
    mask = geometry.block_diagonal_mask(grid)[0, 0]
    assert not mask[24:40, 24:40].any() and mask[24:40, 40:56].all()  # video frame groups are separate


def test_sizes_command_counts_ours_and_the_reference_on_the_meta_device():
    proc = subprocess.run([sys.executable, "-m", "model.sizes", "qwen3vl_8b", "qwen3vl_235b_a22b", "tiny_moe"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:]}
    assert lines["qwen3vl_8b"][1:3] == ["8.767B", "8.767B"] and lines["qwen3vl_8b"][-1] == "yes"
    assert lines["qwen3vl_235b_a22b"][1:3] == ["235.670B", "22.767B"] and lines["qwen3vl_235b_a22b"][-1] == "yes"
    assert lines["tiny_moe"][-1] == "yes"
