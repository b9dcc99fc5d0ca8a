"""Parameter counts of the named configs: ``python -m model.sizes [NAME ...] [--no-reference]``.

For every config in ``conf/model`` (or those named) prints total and active parameters (active = what one
token uses: all non-expert parameters plus ``num_experts_per_tok / num_experts`` of the expert
parameters), counted on our Megatron-Core model built on the meta device in the single-rank layout, and
the same figures of the transformers reference, also built on the meta device. No memory is allocated.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from model.config import ConfigError, Qwen3VLConfig
from model.registry import get_config, list_configs


@dataclass
class Size:
    total: int
    active: int
    vision: int  # ViT + mergers


def _split(named_params, expert_marker: str, vision_prefix: str, cfg: Qwen3VLConfig) -> Size:
    total = experts = vision = 0
    for name, p in named_params:
        n = p.numel()
        total += n
        if expert_marker in name:
            experts += n
        if name.startswith(vision_prefix):
            vision += n
    active = total - experts
    if cfg.is_moe:
        active += experts * cfg.text.num_experts_per_tok // cfg.text.num_experts
    return Size(total, active, vision)


def ours(cfg: Qwen3VLConfig) -> Size:
    """Counts of our model (tp = pp = ep = 1) built on the meta device; needs an initialised single-rank
    parallel state."""
    from model.qwen3vl import build_qwen3vl

    with torch.device("meta"):
        model = build_qwen3vl(cfg, attention="document", config_overrides={"perform_initialization": False})
    return _split(model.named_parameters(), ".mlp.experts.", "vision.", cfg)


def reference(cfg: Qwen3VLConfig) -> Size:
    """Counts of transformers' Qwen3VL(Moe)ForConditionalGeneration built on the meta device."""
    import transformers

    hf = cfg.to_hf()
    cls, config_cls = ((transformers.Qwen3VLMoeForConditionalGeneration, transformers.Qwen3VLMoeConfig)
                       if cfg.is_moe else
                       (transformers.Qwen3VLForConditionalGeneration, transformers.Qwen3VLConfig))
    config = config_cls(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = cls(config)
    return _split(model.named_parameters(), ".mlp.experts.", "model.visual.", cfg)


def _fmt(n: int) -> str:
    return f"{n / 1e9:8.3f}B" if n >= 1e8 else f"{n / 1e6:8.3f}M"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.sizes", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help=f"config names (default: all of {list_configs()})")
    p.add_argument("--no-reference", action="store_true", help="skip the transformers reference count")
    args = p.parse_args(argv)
    try:  # every name first: a bad one is one line (exit 2), before any work
        configs = [(name, get_config(name)) for name in args.names or list_configs()]
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from common.distributed.parallel import destroy_distributed, initialize_distributed
    from common.distributed.spawn import free_port

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    initialize_distributed({"tp": 1}, environ=env)
    header = f"{'config':20s} {'total':>10s} {'active':>10s} {'vision':>10s}"
    if not args.no_reference:
        header += f" {'ref total':>10s} {'ref active':>10s}  match"
    print(header)
    ok = True
    try:
        for name, cfg in configs:
            s = ours(cfg)
            line = f"{name:20s} {_fmt(s.total)} {_fmt(s.active)} {_fmt(s.vision)}"
            if not args.no_reference:
                r = reference(cfg)
                same = (r.total, r.active) == (s.total, s.active)
                ok &= same
                line += f" {_fmt(r.total)} {_fmt(r.active)}  {'yes' if same else 'NO'}"
            print(line, flush=True)
    finally:
        destroy_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
