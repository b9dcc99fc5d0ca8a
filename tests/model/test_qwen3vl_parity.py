"""Qwen3-VL on Megatron-Core vs the transformers reference: logits, losses and gradients, dense and MoE,
in every layout run here: TP1, TP2, PP2 (DeepStack crossing the stage boundary), TP2+SP, EP2,
TP2+EP2+SP, and with expert tensor parallelism (etp=2) on an uneven MoE (6 experts top-3, 37 tokens).

Gradients are those the optimizer sees (Megatron's DDP + ``finalize_model_grads``), compared per
parameter with the reference's, sliced to each rank's part by the weight-loading name mapping."""

from __future__ import annotations

import pytest

from tests.model import tiny_hf
from tests.multirank import run_ranks

# float32 throughout. Measured worst cases over all layouts here (CPU, transformers 5): logits 9.5e-7,
# loss 9.5e-7 (the loss is about 6, where one float32 step is 4.8e-7), gradients 5.7e-7 absolute and
# 2.0e-6 relative to the tensor's largest reference gradient, losses after an Adam step 5.7e-7 apart.
# The tolerances leave about ten times that; model/README.md states them.
LOGIT_TOL = 1e-5  # max |logit difference| per input
LOSS_TOL = 5e-6  # mean next-token loss per input
GRAD_ATOL = 5e-6  # max |ours - reference| per parameter tensor ...
GRAD_RTOL = 2e-5  # ... and relative to that tensor's max |reference gradient|
TRAIN_TOL = 1e-5  # the loss after an Adam step, between layouts
TIED = {"output_layer.weight"}  # the LM head's copy of a tied embedding (last pipeline stage)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return tiny_hf.save_reference("dense", tmp_path_factory.mktemp("hf") / "dense")


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return tiny_hf.save_reference("moe", tmp_path_factory.mktemp("hf") / "moe")


def _run(hf_dir, layouts, world_size=2, train_steps=0):
    """Our model in ``layouts`` (spawned ranks) and the reference; checks logits, losses and gradients
    of every layout and returns (per-layout results merged over ranks, references by pad multiple)."""
    refs = {pad: tiny_hf.reference_outputs(hf_dir, pad) for pad in {tiny_hf.pad_multiple(l) for l in layouts}}
    results = run_ranks(tiny_hf.layouts_body, world_size, str(hf_dir), layouts,
                        {pad: r["grads"] for pad, r in refs.items()}, train_steps)
    merged = []
    for i, layout in enumerate(layouts):
        ref = refs[tiny_hf.pad_multiple(layout)]
        per_rank = [r["layouts"][i] for r in results]
        outputs = next((r["outputs"] for r in per_rank if r["outputs"] is not None), None)
        assert outputs is not None, f"no rank returned outputs for {layout}"
        worst = {"logits": 0.0, "loss": 0.0, "grad_abs": 0.0, "grad_rel": 0.0}
        for name, (logits, losses) in outputs.items():
            diff = (logits - ref["logits"][name]).abs().max().item()
            assert diff <= LOGIT_TOL, f"{layout} {name}: max |logit diff| {diff:.3e}"
            loss_diff = abs(losses[:, :-1].mean().item() - ref["loss"][name].item())
            assert loss_diff <= LOSS_TOL, f"{layout} {name}: loss differs by {loss_diff:.3e}"
            worst["logits"], worst["loss"] = max(worst["logits"], diff), max(worst["loss"], loss_diff)
        # A parameter split over ranks (or replicated) appears on several: keep the largest figures.
        grads: dict[str, tuple[float, float, float]] = {}
        for r in per_rank:
            for name, stats in r["grads"].items():
                grads[name] = tuple(max(a, b) for a, b in zip(grads.get(name, stats), stats))
        for name, (diff, scale, _) in grads.items():
            assert diff <= GRAD_ATOL and diff <= GRAD_RTOL * scale + 1e-10, \
                f"{layout} {name}: max |grad diff| {diff:.3e} (max |reference grad| {scale:.3e})"
            worst["grad_abs"] = max(worst["grad_abs"], diff)
            if scale > 0:
                worst["grad_rel"] = max(worst["grad_rel"], diff / scale)
        print(f"{layout}: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
        merged.append({"grads": grads, "train_losses": [r["train_losses"] for r in per_rank],
                       "freeze": results[0]["freeze"]})
    # Every layout covers every parameter (all ranks together), and the check is not vacuous.
    covered = [set(m["grads"]) - TIED for m in merged]
    assert all(c == covered[0] for c in covered), [sorted(c ^ covered[0]) for c in covered]
    for m in merged:
        grads = m["grads"]
        assert sum(scale > 1e-6 for _, scale, _ in grads.values()) > 0.8 * len(grads)
        assert any(n.startswith("vision.layers.") and ours > 0 for n, (_, _, ours) in grads.items())
        assert all(ours > 0 for n, (_, _, ours) in grads.items() if n.startswith("vision.deepstack_merger_list."))
    return merged, refs


def test_dense_parity_in_tp1_tp2_pp2_sp_with_gradients(dense_dir):
    layouts = [{"tp": 1}, {"tp": 2}, {"pp": 2}, {"tp": 2, "sequence_parallel": True}]
    merged, refs = _run(dense_dir, layouts)
    ref_logits = refs[1]["logits"]
    # Images matter: the visual inputs' logits differ from what the same tokens give without pixels.
    assert (ref_logits["one_image"] - ref_logits["text"][:, : ref_logits["one_image"].shape[1]]).abs().max() > 1e-3
    freeze = merged[0]["freeze"]
    assert freeze and all(n.startswith(("vision.merger.", "vision.deepstack_merger_list.")) for n in freeze)
    # PP2 covers the tied LM head on the last stage, with the embedding's full gradient.
    assert "output_layer.weight" in merged[2]["grads"]


def test_moe_parity_in_ep2_tp2_ep2_sp_pp2_with_gradients(moe_dir):
    layouts = [{"tp": 1}, {"ep": 2}, {"tp": 2, "ep": 2, "etp": 1, "sequence_parallel": True}, {"pp": 2}]
    merged, refs = _run(moe_dir, layouts)
    # The dense layer of the MoE model is really dense, the others have experts.
    grads = merged[0]["grads"]
    assert "decoder.layers.1.mlp.linear_fc1.weight" in grads
    assert "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight" in grads


def test_uneven_moe_with_expert_tensor_parallelism_matches_and_trains_alike(tmp_path):
    """6 experts top-3 with etp=2: the expert-tensor-parallel ranks exchange different token counts
    (uneven all-gather / reduce-scatter, which gloo needs the CPU runtime for); TP2xEP2 (SP, 38-token
    padded input) and EP2xETP2 with TP1 (the 37-token input unpadded), on 4 ranks."""
    hf_dir = tiny_hf.save_reference("moe_uneven", tmp_path / "moe_uneven")
    layouts = [{"tp": 2, "ep": 2, "sequence_parallel": True}, {"ep": 2, "etp": 2}]
    merged, refs = _run(hf_dir, layouts, world_size=4, train_steps=2)
    assert refs[1]["logits"][tiny_hf.GRADS_INPUT].shape[1] == 37
    assert refs[2]["logits"][tiny_hf.GRADS_INPUT].shape[1] == 38
    # Two Adam steps on the same input: every rank reports the same losses, the first is the reference's
    # loss, the second is lower, and both layouts train alike.
    ref_loss = refs[1]["loss"][tiny_hf.TRAIN_INPUT].item()
    runs = []
    for layout, m in zip(layouts, merged):
        losses = m["train_losses"]
        assert all(run == losses[0] for run in losses), losses
        assert losses[0][0] == pytest.approx(ref_loss, abs=LOSS_TOL) and losses[0][1] < losses[0][0], losses[0]
        runs.append(losses[0])
    print("train losses", runs)
    assert runs[0] == pytest.approx(runs[1], abs=TRAIN_TOL)


def _load_balancing_body(rank, hf_dir):
    """Our per-layer load-balancing losses (without the coefficient, as Megatron's tracker keeps them)
    and transformers' ``load_balancing_loss_func`` on each MoE layer's router logits, same weights."""
    import torch
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import load_balancing_loss_func

    from common.distributed.parallel import initialize_distributed
    from model.config import Qwen3VLConfig
    from model.hf_adapter import HFCheckpointReader, load_hf_weights
    from model.qwen3vl import build_qwen3vl

    initialize_distributed({"tp": 1})
    reader = HFCheckpointReader(hf_dir)
    cfg = Qwen3VLConfig.from_hf(reader.config_dict)
    model = build_qwen3vl(cfg)
    load_hf_weights(model, reader)
    ids = torch.randint(10, cfg.text.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    clear_aux_losses_tracker()
    model.train()  # Megatron computes the load-balancing loss in training only
    model(ids, labels=tiny_hf.shifted_labels(ids))
    ours = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"].clone()
    ref = tiny_hf.reference_model(hf_dir)(input_ids=ids, output_router_logits=True)
    t = cfg.text
    per_layer = [load_balancing_loss_func((logits,), t.num_experts, t.num_experts_per_tok)
                 for logits in ref.router_logits]
    return ours, torch.stack(per_layer), ref.aux_loss, t.moe_layer_pattern(), t.num_experts_per_tok


def test_moe_load_balancing_loss_is_the_reference_per_layer_loss_over_top_k(moe_dir):
    """The relation model/text_config.py documents for ``router_aux_loss_coef``: Megatron's loss of a
    MoE layer is the reference's loss of that layer's router logits divided by top-k, and the layers'
    losses add up (the reference takes one loss over all layers, about their mean)."""
    import torch

    ours, per_layer, ref_aux, pattern, top_k = run_ranks(_load_balancing_body, 1, str(moe_dir))[0]
    moe_layers = [i for i, p in enumerate(pattern) if p]
    assert ours[[i for i, p in enumerate(pattern) if not p]].eq(0).all()  # dense layers: none
    torch.testing.assert_close(ours[moe_layers] * top_k, per_layer, rtol=1e-5, atol=1e-6)
    ratio = float(ours.sum() / ref_aux)  # the objective's weight relative to the reference's
    assert abs(ratio - len(moe_layers) / top_k) < 0.1 * len(moe_layers) / top_k, ratio
