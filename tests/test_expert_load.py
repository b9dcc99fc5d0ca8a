"""ExpertLoadTracker: per-layer expert loads counted from the routers, read once per interval."""

from __future__ import annotations

import torch

from tests.multirank import run_ranks


def _tracked_and_direct(rank):
    from common.distributed.parallel import initialize_distributed
    from model.check_parity import parity_inputs
    from model.qwen3vl import build_qwen3vl
    from model.registry import get_config
    from pretrain.metrics import ExpertLoadTracker

    initialize_distributed({})
    cfg = get_config("tiny_moe")
    torch.manual_seed(0)
    model = build_qwen3vl(cfg).train()
    tracker = ExpertLoadTracker([model])
    direct: dict[int, torch.Tensor] = {}

    def record(router, inputs, output):
        layer = router.layer_number
        direct[layer] = direct.get(layer, 0) + output[1].sum(0).float()

    for name, module in model.named_modules():
        if name.endswith("mlp.router"):
            module.register_forward_hook(record)
    for x in parity_inputs(cfg, seed=1)[:3]:
        model(x.input_ids, **x.model_kwargs())
    first = tracker.imbalance()
    expected = {layer: float(c.max() / c.mean()) for layer, c in direct.items()}
    second = tracker.imbalance()  # nothing routed since the first read
    return first, expected, second, sorted(direct)


def test_expert_imbalance_per_layer_matches_the_routing_maps():
    first, expected, second, layers = run_ranks(_tracked_and_direct, 1)[0]
    assert layers and sorted(first) == layers
    for layer in layers:
        assert first[layer] == expected[layer] and first[layer] >= 1.0
    assert second == {}
