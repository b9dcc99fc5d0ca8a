"""A pack's padding tokens, spread evenly over the experts instead of all sent to the same ones.

Megatron's dropless token dispatchers move a static ``tokens * top_k`` rows per MoE layer, so padding
tokens cannot simply be left out of the dispatch. Left to the router, they would all pick the same
``top_k`` experts: every padding token is the same token at the same position (pad id, position 0),
so the experts that pad routes to get all of the padding's work (with 5 % padding, 128 experts and
top-8, each of those 8 gets about 1.8 times the tokens of an average expert) and, with expert
parallelism, the step waits for the ranks that hold them. :func:`spread_padding_over_experts` gives
padding token ``i`` (its index in the router's flattened ``[s, b]`` order) the experts
``i*k .. i*k + k-1`` modulo the expert count, so padding adds the same load to every expert and every
expert-parallel rank, and sets its weights to 0 so that the experts' outputs for padding are zero.
Real tokens' routing, outputs and gradients do not change. The router's statistics leave padding out
already (Megatron's ``padding_mask``).
"""

from __future__ import annotations

import torch


def router_padding_mask(args, kwargs):
    """The ``padding_mask`` a router forward hook's call received (``[s, b]`` bool, True = padding; None
    without one): Megatron's MoE layer passes it positionally, after the hidden states."""
    return kwargs.get("padding_mask", args[1] if len(args) > 1 else None)


def spread_padding_over_experts(router, args, kwargs, output):
    """Forward hook of a Megatron ``TopKRouter`` (registered ``with_kwargs=True``): ``output`` is
    ``(probs [tokens, experts], routing_map [tokens, experts] bool)``; the router's ``padding_mask``
    argument (``[s, b]`` bool, True = padding) names the rows to rewrite. None (output unchanged)
    when there is no mask."""
    padding = router_padding_mask(args, kwargs)
    if padding is None or not isinstance(output, tuple):
        return None
    probs, routing_map = output
    tokens, experts = routing_map.shape
    pad = padding.reshape(-1, 1).to(routing_map.device)
    first = torch.arange(tokens, device=routing_map.device)[:, None] * router.topk
    chosen = (first + torch.arange(router.topk, device=routing_map.device)) % experts
    spread = torch.zeros_like(routing_map).scatter_(1, chosen, True)
    return probs.masked_fill(pad, 0.0), torch.where(pad, spread, routing_map)


def register_padding_spread(decoder) -> None:
    """Hook :func:`spread_padding_over_experts` on the router of every MoE layer of ``decoder``."""
    for name, module in decoder.named_modules():
        if name.endswith("mlp.router"):
            module.register_forward_hook(spread_padding_over_experts, with_kwargs=True)
