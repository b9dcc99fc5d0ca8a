"""A pack's padding tail in the MoE layers (model/qwen3vl.py ``padding_mask``, model/moe_padding.py).

The same two documents run once with a padding tail (document id -1, as the packer writes it) and
once without. With ``padding_mask``: the load-balancing loss (summed over the ranks) and the tokens
counted per expert (pretrain.metrics.ExpertLoadTracker) are the same; the real tokens' losses are the
same; the padding is dispatched evenly (every expert gets the same number of padding rows, give or
take one). Without it the padding, all one token at one position and hence all routed alike, changes
the statistics and lands on the same top-k experts. Checked in the layouts that cut the mask: context
parallelism (the per-document CP cut) and tensor parallelism with sequence parallelism (the mask split
over the TP ranks), on 2 gloo ranks.
"""

from __future__ import annotations

import torch

from tests.multirank import run_ranks

LAYOUTS = {"cp2": {"cp": 2}, "tp2_sp": {"tp": 2, "sequence_parallel": True}}


def _pack(cfg, padding: int) -> dict:
    """Two text documents (12 and 16 tokens) and ``padding`` pad tokens, as one packed row."""
    gen = torch.Generator().manual_seed(3)
    lengths = (12, 16)
    ids = [torch.randint(10, cfg.text.vocab_size, (n,), generator=gen) for n in lengths]
    tokens = torch.cat([*ids, torch.full((padding,), 1)])
    positions = torch.cat([*(torch.arange(n) for n in lengths), torch.zeros(padding, dtype=torch.long)])
    documents = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)] + [torch.full((padding,), -1)])
    return {"input_ids": tokens[None], "position_ids": positions[None], "document_ids": documents[None]}


def _router_statistics(model, tracker, pack: dict, with_mask: bool) -> dict:
    """One forward: the load-balancing loss per layer summed over the ranks (``aux``), the real tokens
    counted per expert and layer (``counts``), the rows dispatched to each expert of each layer
    (``dispatched``), both summed over the ranks, and this rank's per-token losses of the real tokens
    (``losses``)."""
    import torch.distributed as dist
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    from model.context_parallel import split_on_this_rank

    clear_aux_losses_tracker()
    dispatched = []
    hooks = [m.register_forward_hook(lambda router, args, output: dispatched.append(output[1].sum(0)))
             for name, m in model.named_modules() if name.endswith("mlp.router")]
    mask = {"padding_mask": pack["document_ids"] < 0} if with_mask else {}
    labels = torch.roll(pack["input_ids"], -1, dims=1)
    labels[0, 12 + 16 - 1] = 0  # the last real token's target: the same with or without padding after it
    losses = model(pack["input_ids"], pack["position_ids"], document_ids=pack["document_ids"], labels=labels,
                   **mask)
    for hook in hooks:
        hook.remove()
    real = split_on_this_rank(pack["document_ids"] >= 0, 1, pack["document_ids"])
    aux = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"].clone()
    dist.all_reduce(aux)
    counts = tracker.counts.clone()
    dist.all_reduce(counts)
    tracker.counts = None
    dispatched = torch.stack(dispatched)
    dist.all_reduce(dispatched)
    return {"aux": aux, "counts": counts, "dispatched": dispatched,
            "losses": losses.detach()[real]}


def _body(rank):
    from megatron.core import parallel_state

    from common.distributed.parallel import initialize_distributed
    from model.qwen3vl import build_qwen3vl
    from model.registry import get_config
    from pretrain.metrics import ExpertLoadTracker

    cfg = get_config("tiny_moe")
    out = {}
    for name, layout in LAYOUTS.items():
        initialize_distributed(layout)
        torch.manual_seed(0)
        model = build_qwen3vl(cfg, sequence_parallel=layout.get("sequence_parallel", False)).train()
        tracker = ExpertLoadTracker([model])
        out[name] = {
            "unpadded": _router_statistics(model, tracker, _pack(cfg, 0), with_mask=True),
            "masked": _router_statistics(model, tracker, _pack(cfg, 12), with_mask=True),
            "unmasked": _router_statistics(model, tracker, _pack(cfg, 12), with_mask=False),
        }
        parallel_state.destroy_model_parallel()
    return out


def test_padding_is_left_out_of_the_router_statistics_and_spread_over_the_experts():
    results = run_ranks(_body, 2)
    for name in LAYOUTS:
        for rank in (0, 1):
            unpadded, masked, unmasked = (results[rank][name][k] for k in ("unpadded", "masked", "unmasked"))
            assert unpadded["aux"].abs().sum() > 0 and unpadded["counts"].sum() > 0, name
            torch.testing.assert_close(masked["aux"], unpadded["aux"], rtol=1e-5, atol=1e-7, msg=f"{name}: aux")
            assert torch.equal(masked["counts"], unpadded["counts"]), f"{name}: tokens per expert"
            torch.testing.assert_close(masked["losses"], unpadded["losses"], rtol=1e-5, atol=1e-6)
            # Padding rows per expert and layer: the same for every expert, give or take one.
            padding_rows = masked["dispatched"] - unpadded["dispatched"]
            spread = padding_rows.amax(dim=1) - padding_rows.amin(dim=1)
            assert padding_rows.sum() > 0 and int(spread.max()) <= 1, (name, padding_rows)
            # Without the mask the 12 padding tokens are counted, shift the aux loss and all pick the
            # same experts (the checks have teeth).
            assert unmasked["counts"].sum() > unpadded["counts"].sum(), name
            assert (unmasked["aux"] - unpadded["aux"]).abs().max() > 1e-3 * unpadded["aux"].abs().max(), name
            piled = unmasked["dispatched"] - unpadded["dispatched"]
            assert int((piled.amax(dim=1) - piled.amin(dim=1)).max()) > 1, (name, piled)
