"""Parameter counts of the named configs: ``python -m model.sizes [NAME ...] [--no-reference]``.

For every config in ``conf/model`` (or those named) prints total and active parameters (active = what one
token uses: all non-expert parameters plus ``num_experts_per_tok / num_experts`` of the expert
parameters), counted on our Megatron-Core model built on the meta device in the single-rank layout, and
the same figures of the transformers reference, also built on the meta device. No memory is allocated.

``python -m model.sizes --ckpt DIR``: the parts of a checkpoint's model (language, vision, merger) with
their counts and where each came from: for a checkpoint of ``model.convert compose``, the LLM parent,
the SigLIP-2 parent and the mergers' seed, and the parent tensors left unused (its
``qwen3vl_convert.json``); for any other, its recorded source.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

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
    return _split(_meta_model(cfg).named_parameters(), ".mlp.experts.", "vision.", cfg)


def _meta_model(cfg: Qwen3VLConfig):
    from model.qwen3vl import build_qwen3vl

    with torch.device("meta"):
        return build_qwen3vl(cfg, attention="document", config_overrides={"perform_initialization": False})


def part_sizes(cfg: Qwen3VLConfig) -> dict[str, int]:
    """Parameters per part (``model.qwen3vl.FREEZABLE``: vision, merger, language); single-rank state."""
    from model.qwen3vl import FREEZABLE, part_of

    counts = dict.fromkeys(FREEZABLE, 0)
    for name, p in _meta_model(cfg).named_parameters():
        counts[part_of(name)] += p.numel()
    return counts


def checkpoint_lines(ckpt: str) -> list[str]:
    """The ``--ckpt`` report (see the module docstring); needs an initialised single-rank parallel state."""
    import json

    from model.checkpoint_io import resolve_checkpoint
    from model.compose import read_composition, unused_lines
    from model.convert import META_FILE, read_checkpoint_config

    path = resolve_checkpoint(ckpt) or Path(ckpt)
    cfg, dtype = read_checkpoint_config(path)
    composed = read_composition(path)
    size = ours(cfg)
    dtype_name = str(dtype).replace("torch.", "")
    lines = [f"{path}: total {_fmt(size.total).strip()}, active {_fmt(size.active).strip()} ({dtype_name})"]
    if composed is None:
        source = json.loads((path / META_FILE).read_text()).get("source", "?")
        origins = dict.fromkeys(("language", "vision", "merger"), source)
    else:
        origins = composed["parts"]
        lines[0] += f", composed for {composed['target']}"
    counts = part_sizes(cfg)
    for part in ("language", "vision", "merger"):
        lines.append(f"  {part:9s}{_fmt(counts[part])}  from {origins[part]}")
    if composed is not None:
        lines += [f"  {line}" for line in unused_lines(composed)]
        lines += [f"  note: {note}" for note in composed["notes"]]
    return lines


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
    p.add_argument("--ckpt", help="a checkpoint folder: its parts and where they came from (no names then)")
    args = p.parse_args(argv)
    if args.ckpt and args.names:
        p.error("give config names or --ckpt, not both")
    try:  # every name first: a bad one is one line (exit 2), before any work
        configs = [(name, get_config(name)) for name in args.names or list_configs()] if not args.ckpt else []
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from common.distributed.parallel import destroy_distributed, initialize_distributed
    from common.distributed.spawn import call_reporting_user_errors, free_port

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    initialize_distributed({"tp": 1}, environ=env)
    if args.ckpt:
        try:
            print("\n".join(call_reporting_user_errors(checkpoint_lines, args.ckpt)))
        finally:
            destroy_distributed()
        return 0
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
