"""A pack's padding tail is left out of the MoE routers' statistics (model/qwen3vl.py, ``padding_mask``).

The same two documents run once with a padding tail (document id -1, as the packer writes it) and
once without: with ``padding_mask`` the load-balancing loss (summed over the ranks) and the tokens
counted per expert (pretrain.metrics.ExpertLoadTracker) are the same; without it the padding, all
one token at one position and hence all routed alike, changes them. Checked in the layouts that cut
the mask: context parallelism (the per-document CP cut) and tensor parallelism with sequence
parallelism (the mask split over the TP ranks), on 2 gloo ranks.
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


def _router_statistics(model, tracker, pack: dict, with_mask: bool):
    """(load-balancing loss per layer summed over the ranks, tokens per expert per layer) of one forward."""
    import torch.distributed as dist
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    clear_aux_losses_tracker()
    mask = {"padding_mask": pack["document_ids"] < 0} if with_mask else {}
    model(pack["input_ids"], pack["position_ids"], document_ids=pack["document_ids"], **mask)
    aux = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"].clone()
    dist.all_reduce(aux)
    counts = tracker.counts.clone()
    dist.all_reduce(counts)
    tracker.counts = None
    return aux, counts


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


def test_padding_is_left_out_of_the_moe_router_statistics():
    results = run_ranks(_body, 2)
    for name in LAYOUTS:
        for rank in (0, 1):
            r = results[rank][name]
            (aux, counts), (aux_masked, counts_masked), (aux_unmasked, counts_unmasked) = (
                r["unpadded"], r["masked"], r["unmasked"])
            assert aux.abs().sum() > 0 and counts.sum() > 0, name
            torch.testing.assert_close(aux_masked, aux, rtol=1e-5, atol=1e-7, msg=f"{name}: aux loss")
            assert torch.equal(counts_masked, counts), f"{name}: tokens per expert"
            # Without the mask the 12 padding tokens are routed and counted (the check has teeth).
            assert counts_unmasked.sum() > counts.sum(), name
            assert (aux_unmasked - aux).abs().max() > 1e-3 * aux.abs().max(), name
