"""Qwen3-VL on Megatron-Core vs the transformers reference: logits, losses and gradients, dense and MoE,
in the layouts TP1, TP2, PP2 (DeepStack crossing the stage boundary), TP2+SP, EP2 and TP2+EP2+SP."""

from __future__ import annotations

import pytest
import torch

from tests.model import tiny_hf
from tests.multirank import run_ranks

TOL = 1e-4


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return tiny_hf.save_reference("dense", tmp_path_factory.mktemp("hf") / "dense")


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return tiny_hf.save_reference("moe", tmp_path_factory.mktemp("hf") / "moe")


def _reference(hf_dir, grads_input):
    """Reference logits and mean next-token losses per input, and gradients on ``grads_input``."""
    from model.check_parity import parity_inputs
    from model.config import Qwen3VLConfig
    import json

    cfg = Qwen3VLConfig.from_hf(json.loads((hf_dir / "config.json").read_text()))
    ref = tiny_hf.reference_model(hf_dir)
    logits, losses, grads = {}, {}, {}
    for x in parity_inputs(cfg, seed=0, pad_multiple=2):
        with torch.no_grad():
            out = ref(**x.reference_kwargs(), labels=x.input_ids)
        logits[x.name], losses[x.name] = out.logits, out.loss
        if x.name == grads_input:
            ref.zero_grad()
            ref(**x.reference_kwargs(), labels=x.input_ids).loss.backward()
            grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
    return logits, losses, grads, cfg


def _check(results, layouts, ref_logits, ref_losses):
    for layout, result in zip(layouts, results):
        assert result is not None, f"no rank returned results for {layout}"
        for name, (logits, losses) in result.items():
            diff = (logits - ref_logits[name]).abs().max().item()
            assert diff <= TOL, f"{layout} {name}: max |logit diff| {diff:.3e}"
            # The loss of the batch: same in every layout, and equal to the reference's.
            loss = losses[:, :-1].mean().item()
            assert loss == pytest.approx(ref_losses[name].item(), abs=1e-5), (layout, name)


def _check_grads(ours, ref, cfg):
    assert ours is not None
    assert set(ours) == set(ref), set(ours) ^ set(ref)
    checked = 0
    for name, g_ref in ref.items():
        g = ours[name]
        if ".mlp.experts." in name and g.shape != g_ref.shape:
            g = g.transpose(1, 2)  # published layout -> in-memory
        diff = (g - g_ref).abs().max().item()
        scale = g_ref.abs().max().item()
        assert diff <= TOL, f"{name}: max |grad diff| {diff:.3e} (max |grad| {scale:.3e})"
        if scale > 1e-6:
            assert diff <= 1e-3 * scale, f"{name}: relative grad diff {diff / scale:.3e}"
            checked += 1
    # Not vacuous: the vision tower, the mergers and the decoder all received gradients.
    assert checked > 0.8 * len(ref)
    assert any(n.startswith("model.visual.blocks.") and ours[n].abs().max() > 0 for n in ours)
    assert all(ours[f"model.visual.deepstack_merger_list.{j}.linear_fc2.weight"].abs().max() > 0
               for j in range(len(cfg.vision.deepstack_visual_indexes)))


def test_dense_parity_in_tp1_tp2_pp2_sp_and_gradients(dense_dir):
    layouts = [{"tp": 1}, {"tp": 2}, {"pp": 2}, {"tp": 2, "sequence_parallel": True}]
    results = run_ranks(tiny_hf.layouts_body, 2, str(dense_dir), layouts, "interleaved")
    ref_logits, ref_losses, ref_grads, cfg = _reference(dense_dir, "interleaved")
    per_layout = [next(r["layouts"][i] for r in results if r["layouts"][i] is not None) for i in range(len(layouts))]
    _check(per_layout, layouts, ref_logits, ref_losses)
    _check_grads(results[0]["grads"], ref_grads, cfg)
    # Images matter: the visual inputs' logits differ from what the same tokens give without pixels.
    assert (ref_logits["one_image"] - ref_logits["text"][:, : ref_logits["one_image"].shape[1]]).abs().max() > 1e-3
    assert results[0]["freeze"] and all(n.startswith(("vision.merger.", "vision.deepstack_merger_list."))
                                        for n in results[0]["freeze"])


def test_moe_parity_in_ep2_tp2_ep2_sp_pp2_and_gradients(moe_dir):
    layouts = [{"tp": 1}, {"ep": 2}, {"tp": 2, "ep": 2, "etp": 1, "sequence_parallel": True}, {"pp": 2}]
    results = run_ranks(tiny_hf.layouts_body, 2, str(moe_dir), layouts, "interleaved")
    ref_logits, ref_losses, ref_grads, cfg = _reference(moe_dir, "interleaved")
    per_layout = [next(r["layouts"][i] for r in results if r["layouts"][i] is not None) for i in range(len(layouts))]
    _check(per_layout, layouts, ref_logits, ref_losses)
    _check_grads(results[0]["grads"], ref_grads, cfg)
    # The dense layer of the MoE model is really dense, the others have experts.
    assert "model.language_model.layers.1.mlp.gate_proj.weight" in ref_grads
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in ref_grads
