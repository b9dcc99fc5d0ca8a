"""``model.convert compose``: Qwen3-VL from a Qwen3 LLM and a SigLIP-2 vision encoder (model/compose.py).

Tiny random parents are built with transformers here. The composed checkpoint (written by 2 ranks) is
loaded the way ``stage.init_from`` loads it, in TP1 / TP2 (and EP2 for MoE), and must give the LLM
parent's text logits; its ViT must embed a still image as SigLIP-2 does (patch embeddings, the position
table at the native grid) and, with the 2D rotary embedding switched off, compute SigLIP-2's encoder.
Every parent tensor goes to exactly one place or to the declared-unused list; parents that do not fit
are refused naming the tensor, before anything is written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from model.compose import compose, fresh_merger_tensor, plan_composition, target_shapes
from model.config import Qwen3VLConfig
from model.parents import LLM_DEFAULTS, SIGLIP2_VISION_DEFAULTS, ComposeError, open_llm, open_vision
from tests.multirank import run_ranks

ROOT = Path(__file__).resolve().parents[2]
LOGIT_TOL = 1e-5  # fp32, the parity tests' bound (model/README.md)
VIT_TOL = 1e-5
SEED = 77

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, patch_size=16,
              num_patches=64, num_channels=3)
LLM_DENSE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, rope_theta=5e6, tie_word_embeddings=True,
                 max_position_embeddings=4096, initializer_range=0.05)
# MoE with a dense layer (mlp_only_layers), untied, expert width 48 != hidden 64.
LLM_MOE = dict(LLM_DENSE, tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
               mlp_only_layers=[1], norm_topk_prob=True)


def target_config(llm: dict) -> Qwen3VLConfig:
    """The Qwen3-VL the parents make: the LLM's text architecture, SigLIP-2's ViT, Qwen3-VL's own choices."""
    text = {k: llm[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "head_dim")}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": llm["rope_theta"], "mrope_section": [2, 3, 3],
                               "mrope_interleaved": True}
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "mlp_only_layers"):
        if key in llm:
            text[key] = llm[key]
    vision = dict(depth=VISION["num_hidden_layers"], hidden_size=VISION["hidden_size"],
                  intermediate_size=VISION["intermediate_size"], num_heads=VISION["num_attention_heads"],
                  patch_size=VISION["patch_size"], num_position_embeddings=VISION["num_patches"],
                  out_hidden_size=llm["hidden_size"], deepstack_visual_indexes=[0, 2], temporal_patch_size=2,
                  spatial_merge_size=2, in_channels=3)
    return Qwen3VLConfig.from_mapping({
        "text": text, "vision": vision, "tie_word_embeddings": llm["tie_word_embeddings"], "image_token_id": 250,
        "video_token_id": 251, "vision_start_token_id": 252, "vision_end_token_id": 253})


def save_llm(path: Path, seed: int = 0, **changes) -> Path:
    import transformers

    torch.manual_seed(seed)
    values = dict(LLM_MOE if changes.pop("moe", False) else LLM_DENSE, **changes)
    cls, config = ((transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig) if "num_experts" in values
                   else (transformers.Qwen3ForCausalLM, transformers.Qwen3Config))
    cls(config(**values)).save_pretrained(path)
    return path


def save_siglip(path: Path, seed: int = 1, **changes) -> Path:
    import transformers

    torch.manual_seed(seed)
    transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**dict(VISION, **changes))).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    root = tmp_path_factory.mktemp("parents")
    return {"dense": save_llm(root / "qwen3", seed=3), "moe": save_llm(root / "qwen3_moe", seed=4, moe=True),
            "vision": save_siglip(root / "siglip2", seed=5)}


@pytest.fixture(scope="module")
def composed(parents, tmp_path_factory):
    """Dense composed by the Python API at TP2; MoE by the command line (target as a YAML file) at EP2."""
    root = tmp_path_factory.mktemp("composed")
    dense = compose(parents["dense"], parents["vision"], root / "dense", target_config(LLM_DENSE), tp=2, seed=SEED)
    target = root / "moe_target.yaml"
    target.write_text(yaml.safe_dump(target_config(LLM_MOE).to_mapping()))
    proc = subprocess.run([sys.executable, "-m", "model.convert", "compose", "--llm", str(parents["moe"]),
                           "--vision", str(parents["vision"]), "--model", str(target), "--out", str(root / "moe"),
                           "--ep", "2", "--seed", str(SEED)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"dense": dense, "moe_dir": root / "moe", "moe_stdout": proc.stdout}


# ----------------------------------------------------------------------------------------------------
# Rank body (module level: spawned processes import it)


def _image() -> torch.Tensor:
    """A still image at the SigLIP-2 parent's native grid (8 x 8 patches), already normalised."""
    side = int(VISION["num_patches"] ** 0.5) * VISION["patch_size"]
    return torch.rand(3, side, side, generator=torch.Generator().manual_seed(11)) * 2 - 1


def _vision_outputs(model, cfg) -> dict:
    """Our ViT on :func:`_image` (frame repeated over the 2 temporal slots), patches in row-major order:
    the patch embeddings, the input of the first layer (patches + positions) and the layers' output with
    the rotary angles zero (no rotation)."""
    from common.media.vision_inputs import patchify
    from model.vision import geometry

    v = cfg.vision
    pixels, grid = patchify(_image()[None].numpy(), v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
    pixels, grid = torch.from_numpy(pixels), torch.tensor([grid])
    # the patch embedding as the Conv3d it is stored as (the forward computes it as a matrix product)
    seen = {"patch": model.vision.patch_embed(pixels.view(-1, v.in_channels, v.temporal_patch_size, v.patch_size,
                                                          v.patch_size)).reshape(-1, v.hidden_size)}
    hook = model.vision.layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.__setitem__("embedded", k["hidden_states"][:, 0]), with_kwargs=True)
    model.vision(pixels, grid)
    hook.remove()
    hidden = seen["embedded"][:, None]
    no_rotation = torch.zeros(hidden.shape[0], 1, 1, v.head_dim)
    for layer in model.vision.layers:
        hidden, _ = layer(hidden_states=hidden, attention_mask=geometry.frame_segment_ids(grid),
                          rotary_pos_emb=no_rotation)
    rows, cols = geometry.patch_rows_cols(grid, v.spatial_merge_size)
    order = torch.argsort(rows * int(grid[0, 2]) + cols)
    return {"patch": seen["patch"][order], "embedded": seen["embedded"][order], "encoder": hidden[:, 0][order]}


def composed_body(rank: int, jobs: list[dict]) -> list[dict]:
    """For each job (a composed checkpoint, its target config and a layout): text logits of ``input_ids``
    (on the rank that has them), and with ``vision``: :func:`_vision_outputs`, the mergers' weights
    (TP1) and the parameters left trainable by S0's freezing."""
    from megatron.core import parallel_state as ps

    from model.checkpoint_io import load_weights
    from model.qwen3vl import build_qwen3vl
    from tests.model.tiny_hf import _reinit

    out = []
    for job in jobs:
        _reinit(job["layout"])
        cfg = Qwen3VLConfig.from_hf(job["target"])
        # S0 builds the model with vision and language frozen and loads stage.init_from like this.
        model = build_qwen3vl(cfg, parallel_output=False, freeze=("vision", "language"),
                              sequence_parallel=job["layout"].get("sequence_parallel", False))
        load_weights(job["ckpt"], [model])
        model.eval()
        keeper = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        result = {}
        with torch.no_grad():
            logits = model(job["input_ids"])
            if keeper:
                result["logits"] = logits.float()
            if job.get("vision"):
                vision = _vision_outputs(model, cfg)
                if keeper:
                    result["vision"] = vision
                    result["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
                    if ps.get_tensor_model_parallel_world_size() == 1:
                        result["mergers"] = {n: p.detach().clone() for n, p in model.named_parameters()
                                             if n.startswith(("vision.merger.", "vision.deepstack_merger_list."))}
        out.append(result)
    return out


def _parent_logits(llm_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids).logits


def _siglip_outputs(vision_dir: Path) -> dict:
    import transformers
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    model = transformers.Siglip2VisionModel.from_pretrained(vision_dir, dtype=torch.float32).eval()
    # The image processor's own patch cutting: columns in (py, px, c) order.
    pixels = torch.from_numpy(convert_image_to_patches(_image().numpy(), VISION["patch_size"]))[None]
    side = int(VISION["num_patches"] ** 0.5)
    spatial = torch.tensor([[side, side]])
    with torch.no_grad():
        out = model(pixel_values=pixels, pixel_attention_mask=torch.ones(1, side * side, dtype=torch.long),
                    spatial_shapes=spatial, output_hidden_states=True)
        return {"patch": model.embeddings.patch_embedding(pixels)[0],
                "embedded": model.embeddings(pixels, spatial)[0],
                "positions": model.embeddings.position_embedding.weight,
                "encoder": out.hidden_states[-1][0]}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------------
# Tests


def test_composed_models_give_the_parents_text_logits_and_siglip2_vision(parents, composed):
    """Dense in TP1 / TP2 (with the ViT checks), MoE in TP1 / TP2 / EP2, one spawn of 2 ranks."""
    input_ids = torch.randint(0, LLM_DENSE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    dense_hf, moe_hf = target_config(LLM_DENSE).to_hf(), target_config(LLM_MOE).to_hf()
    jobs = [dict(ckpt=str(composed["dense"].out), target=dense_hf, layout={"tp": 1}, input_ids=input_ids, vision=True),
            dict(ckpt=str(composed["dense"].out), target=dense_hf, layout={"tp": 2}, input_ids=input_ids, vision=True)]
    jobs += [dict(ckpt=str(composed["moe_dir"]), target=moe_hf, layout=layout, input_ids=input_ids)
             for layout in ({"tp": 1}, {"tp": 2, "sequence_parallel": True}, {"ep": 2})]
    results = run_ranks(composed_body, 2, jobs)
    per_job = [next(r[i] for r in results if r[i]) for i in range(len(jobs))]

    expected = {"dense": _parent_logits(parents["dense"], input_ids), "moe": _parent_logits(parents["moe"], input_ids)}
    siglip = _siglip_outputs(parents["vision"])
    for job, result in zip(jobs, per_job):
        kind = "moe" if job["ckpt"] == str(composed["moe_dir"]) else "dense"
        diff = _max_diff(result["logits"], expected[kind])
        print(f"{kind} {job['layout']}: max |logit diff| {diff:.2e}")
        assert diff <= LOGIT_TOL, (kind, job["layout"], diff)
        if not job.get("vision"):
            continue
        ours = result["vision"]
        # A still image's patch embeddings, and the position table at the native grid, are SigLIP-2's.
        assert _max_diff(ours["patch"], siglip["patch"]) <= VIT_TOL
        assert _max_diff(ours["embedded"] - ours["patch"], siglip["positions"]) <= VIT_TOL
        assert _max_diff(ours["embedded"], siglip["embedded"]) <= VIT_TOL
        # Without the rotation Qwen3-VL adds, the layers compute SigLIP-2's encoder (before post_layernorm).
        encoder = _max_diff(ours["encoder"], siglip["encoder"])
        print(f"  ViT {job['layout']}: patch {_max_diff(ours['patch'], siglip['patch']):.1e}, encoder {encoder:.1e}")
        assert encoder <= VIT_TOL
        # S0 (stage s0_align, trainable: [merger]) trains the mergers only.
        assert result["trainable"] and all(n.startswith(("vision.merger.", "vision.deepstack_merger_list."))
                                           for n in result["trainable"])
        if "mergers" in result:
            # The mergers are the recorded seed's, whatever layout wrote them (TP2 here, read at TP1).
            depth = VISION["num_hidden_layers"]
            for name, value in result["mergers"].items():
                hf_name = "model.visual." + name[len("vision."):]
                assert torch.equal(value, fresh_merger_tensor(hf_name, tuple(value.shape), SEED, depth)), name
    assert yaml.safe_load((ROOT / "conf/stage/s0_align.yaml").read_text())["trainable"] == ["merger"]


def test_every_parent_tensor_is_used_exactly_once_or_declared_unused(parents, composed):
    for kind in ("dense", "moe"):
        llm, vision = open_llm(parents[kind]), open_vision(parents["vision"])
        plan = plan_composition(llm, vision, target_config(LLM_DENSE if kind == "dense" else LLM_MOE), "t", SEED)
        for role, parent in (("llm", llm), ("vision", vision)):
            uses = plan.uses()[role]
            assert set(uses.values()) == {1}, role  # none duplicated
            assert sorted(set(uses) | set(plan.unused[role])) == sorted(parent.reader.keys())  # none dropped
            assert not set(uses) & set(plan.unused[role])
        assert plan.unused["llm"] == []
        assert plan.unused["vision"] == sorted(n for n in vision.reader.keys()
                                               if n.startswith(("head.", "post_layernorm.")))
        assert sum(p.parent == "init" for p in plan.pieces.values()) == 6 * 3  # merger + 2 DeepStack mergers

    meta = json.loads((composed["moe_dir"] / "qwen3vl_convert.json").read_text())["composed"]
    assert meta["seed"] == SEED and meta["parents"]["llm"]["path"] == str(parents["moe"].resolve())
    assert meta["unused"]["vision"] == plan.unused["vision"]
    assert "head.* (11), post_layernorm.bias, post_layernorm.weight" in composed["moe_stdout"]

    # A tied LLM whose file still carries lm_head.weight: that copy is declared unused, as transformers ignores it.
    tied = parents["dense"].parent / "qwen3_tied_with_head"
    tied.mkdir()
    tensors = load_file(str(parents["dense"] / "model.safetensors"))
    save_file(dict(tensors, **{"lm_head.weight": tensors["model.embed_tokens.weight"].clone()}),
              str(tied / "model.safetensors"))
    (tied / "config.json").write_text((parents["dense"] / "config.json").read_text())
    plan = plan_composition(open_llm(tied), open_vision(parents["vision"]), target_config(LLM_DENSE), "t", SEED)
    assert plan.unused["llm"] == ["lm_head.weight"]


def test_a_whole_siglip2_model_gives_its_vision_tower(parents, tmp_path):
    """A published SigLIP-2 checkpoint is the dual encoder: its vision tower (``vision_model.``) is used,
    the text tower is declared unused, tensor by tensor the same plan as the vision model alone."""
    import transformers

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
    transformers.Siglip2Model(transformers.Siglip2Config(vision_config=VISION, text_config=text)).save_pretrained(
        tmp_path / "siglip2")
    whole = open_vision(tmp_path / "siglip2")
    plan = plan_composition(open_llm(parents["dense"]), whole, target_config(LLM_DENSE), "t", SEED)
    alone = plan_composition(open_llm(parents["dense"]), open_vision(parents["vision"]), target_config(LLM_DENSE),
                             "t", SEED)
    assert {t: tuple(s.removeprefix("vision_model.") for s in p.sources) for t, p in plan.pieces.items()} == \
        {t: p.sources for t, p in alone.pieces.items()}
    assert set(plan.uses()["vision"].values()) == {1}
    assert sorted(plan.unused["vision"]) == sorted(
        n for n in whole.reader.keys()
        if n.startswith(("text_model.", "vision_model.head.", "vision_model.post_layernorm.")) or n.startswith("logit_"))


def test_sizes_shows_which_part_came_from_which_parent(parents, composed):
    proc = subprocess.run([sys.executable, "-m", "model.sizes", "--ckpt", str(composed["dense"].out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    part = {line.split()[0]: line for line in lines[1:4]}
    assert str(parents["dense"].resolve()) in part["language"] and "qwen3" in part["language"]
    assert str(parents["vision"].resolve()) in part["vision"]
    assert f"seed {SEED}" in part["merger"]
    assert any(line.strip().startswith("unused, declared (--vision parent): 13 tensors") for line in lines)


def _edited(src: Path, dst: Path, drop: str | None = None, add: dict | None = None,
            replace: dict | None = None) -> Path:
    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    if drop:
        del tensors[drop]
    tensors.update(add or {})
    tensors.update(replace or {})
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


@pytest.mark.parametrize("case, message", [
    ("vision_hidden", "--vision {vision}: hidden_size 48 does not fit the target t (vision.hidden_size 32; "
                      "tensor embeddings.patch_embedding.weight)"),
    ("vision_patch", "--vision {vision}: patch_size 14 does not fit the target t (vision.patch_size 16; "
                     "tensor embeddings.patch_embedding.weight)"),
    ("vision_heads", "--vision {vision}: num_attention_heads 4 does not fit the target t (vision.num_heads 2; "
                     "tensor encoder.layers.*.self_attn.q_proj.weight)"),
    ("llm_hidden", "--llm {llm}: hidden_size 32 does not fit the target t (text.hidden_size 64; "
                   "tensor model.embed_tokens.weight)"),
    ("llm_router", "--llm {llm}: norm_topk_prob False does not fit the target t (Qwen3-VL's renormalised top-k "
                   "routing True; tensor model.layers.*.mlp.gate.weight)"),
    ("missing", "--llm {llm}: missing tensor model.layers.2.mlp.down_proj.weight (for the target's "
                "model.language_model.layers.2.mlp.down_proj.weight)"),
    ("unexpected", "--llm {llm}: unexpected tensor model.layers.0.self_attn.q_proj.bias: the target t has no "
                   "place for it"),
    ("shape", "--vision {vision}: tensor embeddings.position_embedding.weight [64, 16] does not fit the target's "
              "model.visual.pos_embed.weight [64, 32] (gives (64, 16))"),
])
def test_parents_that_do_not_fit_are_refused_naming_the_tensor(parents, tmp_path, case, message):
    llm, vision, target = parents["dense"], parents["vision"], target_config(LLM_DENSE)
    if case == "vision_hidden":
        vision = save_siglip(tmp_path / "v", hidden_size=48)
    elif case == "vision_patch":
        vision = save_siglip(tmp_path / "v", patch_size=14)
    elif case == "vision_heads":
        vision = save_siglip(tmp_path / "v", num_attention_heads=4)
    elif case == "llm_hidden":
        llm = save_llm(tmp_path / "l", hidden_size=32, head_dim=8)
    elif case == "llm_router":
        llm, target = save_llm(tmp_path / "l", moe=True, norm_topk_prob=False), target_config(LLM_MOE)
    elif case == "missing":
        llm = _edited(llm, tmp_path / "l", drop="model.layers.2.mlp.down_proj.weight")
    elif case == "unexpected":
        llm = _edited(llm, tmp_path / "l", add={"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    elif case == "shape":
        vision = _edited(vision, tmp_path / "v", replace={"embeddings.position_embedding.weight": torch.zeros(64, 16)})
    out = tmp_path / "out"
    with pytest.raises(ComposeError) as err:
        compose(llm, vision, out, target, tp=2, target_name="t")
    assert str(err.value) == message.format(llm=Path(llm).resolve(), vision=Path(vision).resolve())
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))  # nothing written


def test_the_command_reports_a_misfit_as_one_line_and_writes_nothing(parents, tmp_path):
    vision = save_siglip(tmp_path / "v", num_patches=256)  # a 16 x 16 position grid, the target has 8 x 8
    target = tmp_path / "target.yaml"
    target.write_text(yaml.safe_dump(target_config(LLM_DENSE).to_mapping()))
    proc = subprocess.run([sys.executable, "-m", "model.convert", "compose", "--llm", str(parents["dense"]),
                           "--vision", str(vision), "--model", str(target), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --vision {vision.resolve()}: num_patches 256 does not fit the target {target.resolve()} "
        "(vision.num_position_embeddings 64; tensor embeddings.position_embedding.weight)")
    assert not (tmp_path / "out").exists()


def test_target_shapes_and_config_defaults_are_transformers(tmp_path):
    """The target tensor list is the reference Qwen3-VL's (names and shapes), and the defaults read for
    fields a config.json leaves out are transformers' own."""
    import transformers

    for llm in (LLM_DENSE, LLM_MOE):
        cfg = target_config(llm)
        hf = cfg.to_hf()
        cls, config = ((transformers.Qwen3VLMoeForConditionalGeneration, transformers.Qwen3VLMoeConfig) if cfg.is_moe
                       else (transformers.Qwen3VLForConditionalGeneration, transformers.Qwen3VLConfig))
        with torch.device("meta"):
            ref = cls(config(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")}))
        assert target_shapes(cfg) == {n: tuple(p.shape) for n, p in ref.named_parameters()}
    dense, moe, vision = transformers.Qwen3Config(), transformers.Qwen3MoeConfig(), transformers.Siglip2VisionConfig()
    for key, value in LLM_DEFAULTS.items():
        if key == "rope_theta":
            assert dense.rope_parameters["rope_theta"] == moe.rope_parameters["rope_theta"] == value
        elif key in ("decoder_sparse_step", "mlp_only_layers", "norm_topk_prob"):
            assert getattr(moe, key) == value, key
        else:
            assert getattr(dense, key) == getattr(moe, key) == value, key
    for key, value in SIGLIP2_VISION_DEFAULTS.items():
        assert getattr(vision, key) == value, key


def test_the_demo_parents_fit_the_demo_model(tmp_path):
    """``python -m pretrain.demo --from-parents`` makes its parents in the demo model's geometry (tiny_moe
    with the trained tokenizer's vocabulary and ids): they compose with only SigLIP-2's head and final
    norm left over (checked here without ranks; the demo runs the whole path)."""
    from pretrain.demo_parents import make_parents, target_mapping

    mapping = target_mapping("tiny_moe", ["model=tiny_moe", "model.text.vocab_size=640", "model.image_token_id=500",
                                          "train.seed=3"])
    assert mapping["text"]["vocab_size"] == 640 and mapping["image_token_id"] == 500
    (tmp_path / "target.yaml").write_text(yaml.safe_dump(mapping))
    llm, vision = make_parents(tmp_path / "target.yaml", tmp_path / "parents")
    plan = plan_composition(open_llm(llm), open_vision(vision), Qwen3VLConfig.from_mapping(mapping), "demo", SEED)
    assert plan.unused["llm"] == [] and all(n.startswith(("head.", "post_layernorm.")) for n in plan.unused["vision"])
    assert not plan.notes
