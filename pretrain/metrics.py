"""Training metrics: a console line per interval, a progress bar, TensorBoard, a JSONL file, a summary.

Only rank 0 writes. Every step's metrics go to ``<run_dir>/metrics.jsonl`` (one JSON object per line,
appended across restarts) and to TensorBoard (``<run_dir>/tensorboard``); the console gets one line
per ``log_interval`` steps above a tqdm progress bar, and a rich table at the end of the stage.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.distributed.comm import communication_device
from model.attention import padding_mask
from model.moe_padding import router_padding_mask

# Dense bf16 tensor-core peak per GPU (FLOP/s), by device-name fragment, for MFU.
# Dense bf16 peaks (NVIDIA's data sheets), matched as substrings of the device name in this order: the
# PCIe and NVL variants before the SXM parts' plain names ("NVIDIA H100 80GB HBM3" is an SXM H100).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H200": 989e12, "H100": 989e12,
                   "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops_per_gpu() -> float | None:
    """The GPU's bf16 dense peak, or None without a GPU or for an unknown one (MFU is then omitted)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def causal_pairs(document_ids: torch.Tensor) -> int:
    """The (query, key) pairs causal attention computes inside the documents of packed rows
    ``document_ids`` [b, s]: n (n + 1) / 2 for each run of n tokens of one document; the padding
    (:func:`model.attention.padding_mask`) counts for none, as its tokens count for none in the MFU's
    linear layers (whatever a backend spends on it)."""
    pairs = 0
    for row in document_ids:
        ids, counts = torch.unique_consecutive(row, return_counts=True)
        counts = counts[~padding_mask(ids)].long()
        pairs += int((counts * (counts + 1) // 2).sum())
    return pairs


# The model's parts in the order the forward runs them (the stage's ``trainable`` names them).
MODEL_PARTS = ("vision", "merger", "language")


def pass_factors(trainable) -> dict[str, tuple[int, int]]:
    """Per part, how many forward-sized passes a training step makes of its (linear layers, attention):
    the forward, the activation gradients where a gradient passes through (the part or one before it
    trains), the weight gradients where the part trains (attention has no weights; its backward is two
    forwards). Everything trained: (3, 3) each; S0 (the merger only): the ViT (1, 1), the merger (3, 3),
    the frozen LLM (2, 3)."""
    unknown = set(trainable) - set(MODEL_PARTS)
    if unknown:
        raise ValueError(f"trainable parts {sorted(unknown)}: the parts are {list(MODEL_PARTS)}")
    factors, upstream = {}, False
    for part in MODEL_PARTS:
        trains = part in trainable
        through = upstream or trains
        factors[part] = (1 + through + trains, 1 + 2 * through)
        upstream = through
    return factors


def qwen3vl_train_flops(cfg, real_tokens: int, attention_token_pairs: int, visual_patches: int,
                        vision_attention_pairs: int, trainable=MODEL_PARTS) -> float:
    """Model FLOPs of one training step, as MFU counts them: 3x the forward when everything trains
    (backward = 2x forward), less for frozen parts (:func:`pass_factors` of ``trainable``).

    ``cfg`` is a ``model.config.Qwen3VLConfig``. Matmul FLOPs only: 2 per multiply-add (the ViT's
    layers, patch embedding, patch merger and DeepStack mergers; the LLM's
    weights are counted with the top-k experts a token actually uses; attention costs
    ``4 * head_dim * heads`` per attended (query, key) pair, with ``attention_token_pairs`` the causal
    pairs inside the step's documents and ``vision_attention_pairs`` the ViT's pairs inside images or
    frames.
    """
    t, v = cfg.text, cfg.vision
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    attn_weights = t.hidden_size * (q + 2 * kv) + q * t.hidden_size
    dense_mlp = 3 * t.hidden_size * t.intermediate_size
    moe_mlp = (3 * t.hidden_size * t.moe_intermediate_size * t.num_experts_per_tok + t.hidden_size * t.num_experts
               if t.is_moe else 0)
    # Layer by layer: an MoE model may keep dense MLPs in some layers (mlp_only_layers, decoder_sparse_step).
    mlps = sum(moe_mlp if sparse else dense_mlp for sparse in t.moe_layer_pattern()) if t.is_moe \
        else t.num_hidden_layers * dense_mlp
    llm_per_token = t.num_hidden_layers * attn_weights + mlps + t.hidden_size * t.vocab_size
    vision_layer = 4 * v.hidden_size * v.hidden_size + 2 * v.hidden_size * v.intermediate_size
    merged = v.hidden_size * v.spatial_merge_size**2  # one merger input: a merge x merge block of patches
    mergers_per_patch = (1 + cfg.num_deepstack) * (merged * merged + merged * v.out_hidden_size) \
        / v.spatial_merge_size**2
    factors = pass_factors(trainable)
    vit, merger, llm = factors["vision"], factors["merger"], factors["language"]
    flops = 2 * visual_patches * (vit[0] * (v.depth * vision_layer + v.patch_dim * v.hidden_size)
                                  + merger[0] * mergers_per_patch)
    flops += 2 * llm[0] * llm_per_token * real_tokens
    flops += llm[1] * 4 * q * t.num_hidden_layers * attention_token_pairs
    flops += vit[1] * 4 * v.hidden_size * v.depth * vision_attention_pairs
    return float(flops)


def training_step_flops(cfg, real_tokens: int, attention_token_pairs: int, visual_patches: int,
                        vision_attention_pairs: int, trainable=MODEL_PARTS, teacher=None) -> float:
    """Model FLOPs of one training step of a stage, as its MFU counts them (and the planner's step time):
    :func:`qwen3vl_train_flops` of the model, plus, in a distillation stage, the forward pass of the
    frozen ``teacher`` (its ``Qwen3VLConfig``) over the same tokens, which runs inside the timed step."""
    counts = (real_tokens, attention_token_pairs, visual_patches, vision_attention_pairs)
    flops = qwen3vl_train_flops(cfg, *counts, trainable)
    if teacher is not None:
        flops += qwen3vl_train_flops(teacher, *counts, trainable=())
    return flops


class ExpertLoadTracker:
    """Tokens routed to each expert of each MoE layer, from forward hooks on Megatron's routers; a pack's
    padding (the routers' ``padding_mask``, see :mod:`model.qwen3vl`) is not counted.

    Counts accumulate on the routers' device (no host copy, hence no GPU sync, per router call);
    :meth:`imbalance` reads them once per log interval and returns, per decoder layer (1-based global
    number), ``max / mean`` of the expert loads counted since its last call over all ranks (1.0:
    perfectly balanced). Collective.
    """

    def __init__(self, model_chunks: list[torch.nn.Module]):
        config = model_chunks[0].config  # the same TransformerConfig on every rank and chunk
        self.shape = (config.num_layers + 1, config.num_moe_experts)  # row 0 unused: layers are 1-based
        self.counts: torch.Tensor | None = None
        for chunk in model_chunks:
            for name, module in chunk.named_modules():
                if name.endswith("mlp.router"):
                    module.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, router, args, kwargs, output) -> None:
        if not router.training or not isinstance(output, tuple):
            return
        routing_map = output[1].detach()  # [tokens, experts], tokens in the order of padding_mask [s, b]
        padding = router_padding_mask(args, kwargs)
        if padding is not None:
            routing_map = routing_map & ~padding.reshape(-1, 1)
        if self.counts is None:
            self.counts = torch.zeros(self.shape, dtype=torch.float32, device=routing_map.device)
        self.counts[int(getattr(router, "layer_number", 0) or 0)] += routing_map.sum(0)

    def imbalance(self) -> dict[int, float]:
        totals = self.counts if self.counts is not None else torch.zeros(self.shape)
        if dist.is_initialized():
            totals = totals.to(communication_device())
            dist.all_reduce(totals)
        self.counts = None
        totals = totals.cpu()
        return {layer: float(c.max() / c.mean()) for layer, c in enumerate(totals) if c.sum() > 0}


class MetricsLogger:
    """Writes the step metrics of one stage (rank 0 only; other ranks' calls do nothing)."""

    def __init__(self, run_dir: str | Path, stage: str, total_steps: int, start_step: int,
                 log_interval: int, enabled: bool):
        self.enabled = enabled
        self.stage = stage
        self.total_steps = total_steps
        self.log_interval = log_interval
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        self.bar = tqdm(total=total_steps, initial=start_step, desc=stage, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"stage": self.stage, "step": step, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tensorboard.add_scalar(f"{self.stage}/{key}", value, step)
        self.bar.update(1)
        if step % self.log_interval == 0 or step == self.total_steps:
            self.bar.write(self.format_line(step, metrics))

    def format_line(self, step: int, m: dict[str, Any]) -> str:
        parts = [f"{self.stage} step {step}/{self.total_steps}", f"loss {m['loss']:.4f}"]
        if m.get("grad_norm") is not None:
            parts.append(f"grad norm {m['grad_norm']:.3f}")
        parts.append(f"lr {m['lr']:.3e}")
        if m.get("reward_mean") is not None:  # an RL step (pretrain/posttrain/rl_stage.py)
            parts.append(f"reward {m['reward_mean']:.3f}")
            parts.append(f"pass {m['pass_rate']:.1%}")
            parts.append(f"filtered {m['filtered_share']:.0%}")
            if m.get("ratio_dev_max") is not None:
                parts.append(f"|r-1| max {m['ratio_dev_max']:.3f}")
            parts.append(f"len {m['response_length']:.1f}")
            parts.append(f"rollout {m['rollout_s']:.1f}s train {m['train_s']:.1f}s")
        parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
        if m.get("mfu") is not None:
            parts.append(f"MFU {m['mfu']:.1%}")
        if m.get("moe_aux_loss") is not None:
            parts.append(f"aux {m['moe_aux_loss']:.4f}")
        if m.get("expert_imbalance") is not None:
            parts.append(f"expert max/mean {m['expert_imbalance']:.2f}")
        parts.append(f"skipped {m['skipped_steps']}")
        return " | ".join(parts)

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.tensorboard.flush()
        self.tensorboard.close()
        self.jsonl.close()
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"stage {self.stage}")
        for key in summary:
            table.add_column(key)
        table.add_row(*[_fmt(v) for v in summary.values()])
        Console().print(table)


def close_progress_bars() -> None:
    """End the open progress bars' lines (a stage stopped by an error did not close its logger), so that
    the error printed next starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
