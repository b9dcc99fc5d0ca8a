"""`python -m pretrain.demo --from-parents`: stage S0 from the model's two parents, as the report starts.

The report builds Qwen3-VL from a pretrained Qwen3 LLM and a pretrained SigLIP-2 vision encoder, then S0
trains only the merger to align them. This path runs that on CPU with stand-ins made here (no download):

1. the demo's data step (synthetic corpus, shard sets, tokenizer; ``pretrain/demo.py``);
2. ``python -m pretrain.demo_parents make --target T.yaml --out DIR``: a tiny random Qwen3-MoE causal LM
   and a tiny random SigLIP-2 vision model, built with transformers in the geometry of the demo's model
   (``conf/model/tiny_moe.yaml`` with the trained tokenizer's vocabulary and token ids, written to
   ``T.yaml``) and saved with ``save_pretrained``, as the published parents are;
3. ``python -m model.convert compose --llm DIR/llm --vision DIR/vision --model T.yaml --out CKPT --ep 2``;
4. ``python -m model.sizes --ckpt CKPT``: which part came from which parent;
5. ``torchrun -m pretrain.train stage=s0_align stage.init_from=CKPT ...`` on 2 gloo ranks: the ViT and the
   LLM stay frozen, the mergers train.

Needs transformers (the ``dev`` extra, which ``make demo`` installs) for step 2 only. Every command is
printed before it runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

PY = sys.executable


def target_mapping(base: str, overrides: list[str]) -> dict:
    """``conf/model/<base>.yaml`` with the ``model.*=value`` Hydra overrides among ``overrides`` applied."""
    from model.registry import CONF_DIR

    mapping = yaml.safe_load((CONF_DIR / f"{base}.yaml").read_text())
    for item in overrides:
        key, _, value = item.partition("=")
        if not key.startswith("model."):
            continue
        *path, last = key.split(".")[1:]
        node = mapping
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return mapping


def make_parents(target_yaml: str | Path, out: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Random parents in the target's geometry, saved with ``save_pretrained``: ``out/llm`` (Qwen3 or
    Qwen3-MoE causal LM) and ``out/vision`` (SigLIP-2 vision model with its pooling head, as published)."""
    import torch
    import transformers

    from model.config import Qwen3VLConfig

    cfg = Qwen3VLConfig.from_mapping(yaml.safe_load(Path(target_yaml).read_text()))
    t, v = cfg.text, cfg.vision
    torch.manual_seed(seed)
    text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps,
                rope_theta=t.rope_theta, tie_word_embeddings=t.tie_word_embeddings)
    if t.is_moe:
        llm = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **text, num_experts=t.num_experts, num_experts_per_tok=t.num_experts_per_tok,
            moe_intermediate_size=t.moe_intermediate_size, decoder_sparse_step=t.decoder_sparse_step,
            mlp_only_layers=list(t.mlp_only_layers), norm_topk_prob=True))
    else:
        llm = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**text))
    vision = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.depth,
        num_attention_heads=v.num_heads, patch_size=v.patch_size, num_channels=v.in_channels,
        num_patches=v.num_position_embeddings))
    out = Path(out)
    llm.save_pretrained(out / "llm")
    vision.save_pretrained(out / "vision")
    return out / "llm", out / "vision"


def run_from_parents(out: Path, common: list[str], torchrun: list[str], layout: str, quick: bool) -> int:
    """Steps 2-5 of the module docstring, after the demo's data step; ``common`` and ``torchrun`` are the
    demo's training overrides and launcher."""
    from pretrain.demo import STAGES, run, stage_table

    started = time.perf_counter()
    parents, runs = out / "parents", out / ("runs_from_parents_quick" if quick else "runs_from_parents")
    base = next(o.split("=", 1)[1] for o in common if o.startswith("model="))
    target = out / f"{base}_from_parents.yaml"
    target.write_text(yaml.safe_dump(target_mapping(base, common), sort_keys=False))
    composed = parents / "composed"

    print("\n== 2. parents: a Qwen3-MoE LLM and a SigLIP-2 vision encoder (tiny, random) -> composed Qwen3-VL")
    if not composed.is_dir():
        run([PY, "-m", "pretrain.demo_parents", "make", "--target", str(target), "--out", str(parents)])
        run([PY, "-m", "model.convert", "compose", "--llm", str(parents / "llm"), "--vision", str(parents / "vision"),
             "--model", str(target), "--out", str(composed), "--ep", "2"])
    else:
        print(f"({composed} exists: composed before)")
    run([PY, "-m", "model.sizes", "--ckpt", str(composed)])

    print("\n== 3. S0 from the composed checkpoint: only the mergers train")
    overrides = dict(STAGES)["s0_align"]
    if quick:
        overrides = [o for o in overrides if not o.startswith("stage.train_steps")] + ["stage.train_steps=3"]
    common = [o if not o.startswith("train.run_root=") else f"train.run_root={runs}" for o in common]
    run(torchrun + ["stage=s0_align", f"parallel={layout}", *common, *overrides, f"stage.init_from={composed}"],
        log=out / "logs" / "s0_from_parents.log")
    for r in stage_table(runs):
        print(f"{r['stage']} from parents ({r['layout']}): {r['steps']} steps, {r['tokens']} tokens, loss "
              f"{r['first']:.3f} -> {r['last']:.3f}, {r['seconds']:.1f} s")
    print(f"from-parents path finished in {time.perf_counter() - started:.0f} s (after the data step)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.demo_parents", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="tiny random parents in a target's geometry (needs transformers)")
    m.add_argument("--target", required=True, help="the target Qwen3-VL, a conf/model-style YAML file")
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    llm, vision = make_parents(args.target, args.out, args.seed)
    print(f"wrote {llm} and {vision}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
