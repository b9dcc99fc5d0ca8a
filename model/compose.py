"""Qwen3-VL from its two pretrained parents: a Qwen3 language model and a SigLIP-2 vision encoder.

    python -m model.convert compose --llm DIR --vision DIR --model NAME|YAML --out DIR
                                    [--tp N --pp N --ep N --etp N] [--seed N] [--dtype float32|bfloat16]

The Qwen3-VL report starts every model from a Qwen3 LLM (dense or MoE) and a SigLIP-2 vision encoder
(SO-400M; Large-300M for the 2B/4B); stage S0 then trains only the merger to align them. ``compose``
writes that starting point: a Megatron distributed checkpoint of the target architecture (``--model``, a
``conf/model`` name or a YAML file of that form: its ``text`` section must describe the LLM parent, its
``vision`` section the SigLIP-2 parent), in the layout and format of ``hf-to-mcore`` (any layout loads
it; ``stage=s0_align stage.init_from=DIR`` trains from it). ``qwen3vl_convert.json`` records the
parents, the merger's seed and the parent tensors left unused (``python -m model.sizes --ckpt DIR``
shows them); ``hf_extra/`` holds the LLM parent's tokenizer files.

Parents (Hugging Face folders: ``config.json`` + safetensors):

* ``--llm``: ``Qwen3ForCausalLM`` (model_type ``qwen3``) or ``Qwen3MoeForCausalLM`` (``qwen3_moe``; experts
  one tensor each, ``experts.{e}.gate_proj`` ..., as published and as transformers saves them, or fused).
* ``--vision``: ``Siglip2VisionModel`` (``siglip2_vision_model``; names with or without the
  ``vision_model.`` prefix) or a whole ``Siglip2Model`` (``siglip2``, its text tower unused).

What maps to what (targets are Qwen3-VL's Hugging Face names; L: the LLM, V: SigLIP-2's vision tower):

* ``model.language_model.X`` <- L ``model.X``, as it is; ``lm_head.weight`` <- L ``lm_head.weight`` (none
  when tied: the two ``tie_word_embeddings`` must agree);
* MoE ``...mlp.experts.gate_up_proj`` (E, 2I, H) <- L ``[experts.{e}.gate_proj; experts.{e}.up_proj]``
  stacked over e; ``...mlp.experts.down_proj`` (E, H, I) <- L ``experts.{e}.down_proj`` stacked;
* ``model.visual.patch_embed.proj.weight``, a Conv3d ``[H, C, 2, P, P]`` <- V
  ``embeddings.patch_embedding.weight``, a linear ``[H, P*P*C]`` whose input columns are ``(py, px, c)``
  (the order of SigLIP-2's image processor), reshaped to ``[H, C, P, P]`` and halved into both temporal
  slots: a still image (Qwen3-VL repeats its frame over the 2 slots) gets SigLIP-2's patch embedding
  (up to float rounding: the Conv3d sums the two halves); ``patch_embed.proj.bias`` <- V
  ``embeddings.patch_embedding.bias``;
* ``model.visual.pos_embed.weight`` <- V ``embeddings.position_embedding.weight`` as it is (both read it
  as a row-major square grid; the target's ``num_position_embeddings`` must be the parent's ``num_patches``);
* ``model.visual.blocks.i.{norm1, norm2, attn.qkv, attn.proj, mlp.linear_fc1, mlp.linear_fc2}`` <- V
  ``encoder.layers.i.{layer_norm1, layer_norm2, [self_attn.q_proj; k_proj; v_proj], self_attn.out_proj,
  mlp.fc1, mlp.fc2}`` (weights and biases);
* ``model.visual.merger.*`` and ``model.visual.deepstack_merger_list.*``: fresh
  (:func:`fresh_merger_tensor`, ``--seed``).

Parent tensors with no place in Qwen3-VL are declared in :data:`model.parents.UNUSED_VISION_TENSORS`
(SigLIP-2's attention-pooling head and final LayerNorm), ``UNUSED_SIGLIP2_TEXT_TOWER`` and
``UNUSED_TIED_LM_HEAD``; any other parent tensor without a place, any missing one, and any whose shape
(or head count, patch size, norm eps, routing: :mod:`model.parents`) does not fit is a one-line error
naming it, raised before anything is written.

What the composed model does not inherit exactly (the report accepts it: S0 trains the merger on top of
these, later stages train the ViT itself):

* Qwen3-VL's ViT applies 2D rotary embeddings (patch row / column) in every attention layer; SigLIP-2 has
  none. From the first layer on, the composed ViT's features therefore differ from SigLIP-2's: the
  patch embeddings, the position table and every weight are SigLIP-2's, but attention sees rotated
  queries and keys. (With the rotation switched off, the composed ViT computes SigLIP-2's encoder:
  ``tests/model/test_compose.py``.)
* The position table is resampled to each image's patch grid with bilinear ``align_corners=True``
  interpolation (SigLIP-2: antialiased bilinear, ``align_corners=False``); both are the table itself
  at the native grid (``num_patches`` patches, square) and differ elsewhere.
* Videos: a temporal patch holds two frames; the halved weights give the mean of the two frames' SigLIP-2
  patch embeddings. Pixel normalisation is the same (mean 0.5, std 0.5 per channel).
* Text positions: Qwen3-VL's interleaved MRoPE equals Qwen3's RoPE on text with the same ``rope_theta``;
  the target's ``rope_theta`` is used, and when it differs from the LLM parent's (Qwen3: 1e6, Qwen3-VL:
  5e6) ``compose`` says so, as the text logits then differ from the parent's.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import zlib
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from model.config import ConfigError, Qwen3VLConfig
from model.hf_adapter import HF_LM, HF_VIS, _experts_in_memory_layout
from model.parents import ComposeError, Parent, check_llm_fits, check_vision_fits, open_llm, open_vision

# How the mergers start (recorded in the checkpoint's metadata with the seed).
MERGER_INIT = ("LayerNorm weights 1 and biases 0; linear biases 0; linear_fc1 weights N(0, 0.02); "
               "linear_fc2 weights N(0, 0.02 / sqrt(2 * vision depth)) (Megatron's init_method / "
               "output_layer_init_method); each tensor drawn from torch.Generator seeded with "
               "seed + crc32(its Hugging Face name)")
INIT_STD = 0.02


# ----------------------------------------------------------------------------------------------------
# The target's tensors


def target_shapes(cfg: Qwen3VLConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of Qwen3-VL ``cfg`` by Hugging Face name with its shape (MoE experts in transformers'
    in-memory layout, (E, 2I, H) / (E, H, I)); no lm_head when the embeddings are tied."""
    t, v = cfg.text, cfg.vision
    h, hd = t.hidden_size, t.head_dim
    out: dict[str, tuple[int, ...]] = {HF_LM + "embed_tokens.weight": (t.vocab_size, h)}
    for i, sparse in enumerate(t.moe_layer_pattern()):
        p = f"{HF_LM}layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": (t.num_attention_heads * hd, h),
            p + "self_attn.k_proj.weight": (t.num_key_value_heads * hd, h),
            p + "self_attn.v_proj.weight": (t.num_key_value_heads * hd, h),
            p + "self_attn.o_proj.weight": (h, t.num_attention_heads * hd),
            p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
        if sparse:
            e, i_ = t.num_experts, t.moe_intermediate_size
            out.update({p + "mlp.gate.weight": (e, h), p + "mlp.experts.gate_up_proj": (e, 2 * i_, h),
                        p + "mlp.experts.down_proj": (e, h, i_)})
        else:
            out.update({p + "mlp.gate_proj.weight": (t.intermediate_size, h),
                        p + "mlp.up_proj.weight": (t.intermediate_size, h),
                        p + "mlp.down_proj.weight": (h, t.intermediate_size)})
    out[HF_LM + "norm.weight"] = (h,)
    if not t.tie_word_embeddings:
        out["lm_head.weight"] = (t.vocab_size, h)

    hv = v.hidden_size
    out[HF_VIS + "patch_embed.proj.weight"] = (hv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    out[HF_VIS + "patch_embed.proj.bias"] = (hv,)
    out[HF_VIS + "pos_embed.weight"] = (v.num_position_embeddings, hv)
    for i in range(v.depth):
        p = f"{HF_VIS}blocks.{i}."
        out.update({
            p + "norm1.weight": (hv,), p + "norm1.bias": (hv,), p + "norm2.weight": (hv,), p + "norm2.bias": (hv,),
            p + "attn.qkv.weight": (3 * hv, hv), p + "attn.qkv.bias": (3 * hv,),
            p + "attn.proj.weight": (hv, hv), p + "attn.proj.bias": (hv,),
            p + "mlp.linear_fc1.weight": (v.intermediate_size, hv), p + "mlp.linear_fc1.bias": (v.intermediate_size,),
            p + "mlp.linear_fc2.weight": (hv, v.intermediate_size), p + "mlp.linear_fc2.bias": (hv,),
        })
    merged = v.merged_hidden_size
    mergers = [("merger.", hv)] + [(f"deepstack_merger_list.{j}.", merged) for j in range(cfg.num_deepstack)]
    for prefix, norm in mergers:
        p = HF_VIS + prefix
        out.update({p + "norm.weight": (norm,), p + "norm.bias": (norm,),
                    p + "linear_fc1.weight": (merged, merged), p + "linear_fc1.bias": (merged,),
                    p + "linear_fc2.weight": (v.out_hidden_size, merged), p + "linear_fc2.bias": (v.out_hidden_size,)})
    return out


def is_merger_tensor(hf_name: str) -> bool:
    return hf_name.startswith((HF_VIS + "merger.", HF_VIS + "deepstack_merger_list."))


def fresh_merger_tensor(hf_name: str, shape: tuple[int, ...], seed: int, vision_depth: int) -> torch.Tensor:
    """float32 initial value of merger tensor ``hf_name`` (see :data:`MERGER_INIT`): the same whatever
    the layout, the rank or the order in which tensors are asked for."""
    if hf_name.endswith(".norm.weight"):
        return torch.ones(shape)
    if hf_name.endswith(".bias"):
        return torch.zeros(shape)
    std = INIT_STD if ".linear_fc1." in hf_name else INIT_STD / math.sqrt(2 * vision_depth)
    generator = torch.Generator().manual_seed(seed + zlib.crc32(hf_name.encode()))
    return torch.randn(shape, generator=generator) * std


# ----------------------------------------------------------------------------------------------------
# Target tensor <- parent tensors


@dataclass(frozen=True)
class Piece:
    """How target tensor ``target`` is made: ``build(*tensors)`` of parent ``parent``'s ``sources``
    (``parent == "init"``: no sources, a fresh merger tensor)."""

    target: str
    parent: str
    sources: tuple[str, ...]
    build: Callable[..., torch.Tensor]


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _cat_rows(*xs: torch.Tensor) -> torch.Tensor:
    return torch.cat(xs, dim=0)


def linear_patch_to_conv3d(weight: torch.Tensor, channels: int, temporal: int, patch: int) -> torch.Tensor:
    """SigLIP-2's patch embedding ``[H, P*P*C]`` (input columns ``(py, px, c)``) -> the Conv3d weight
    ``[H, C, T, P, P]`` that gives the same embedding for a frame repeated over the ``T`` temporal slots
    (each slot holds ``1/T`` of the weight; exact for T = 2)."""
    h = weight.shape[0]
    spatial = weight.reshape(h, patch, patch, channels).permute(0, 3, 1, 2)  # [H, C, py, px]
    return (spatial.unsqueeze(2).expand(h, channels, temporal, patch, patch) / temporal).contiguous()


def piece_for(target: str, shape: tuple[int, ...], cfg: Qwen3VLConfig, llm: Parent, vision: Parent,
              seed: int) -> Piece:
    """The :class:`Piece` of target tensor ``target`` (a name of :func:`target_shapes`)."""
    if is_merger_tensor(target):
        return Piece(target, "init", (), lambda: fresh_merger_tensor(target, shape, seed, cfg.vision.depth))
    if target == "lm_head.weight":
        return Piece(target, "llm", ("lm_head.weight",), _same)
    if target.startswith(HF_LM):
        rest = "model." + target[len(HF_LM):]
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$", rest)
        if m is None:
            return Piece(target, "llm", (rest,), _same)
        if rest in llm.reader:  # a fused experts tensor: either stored layout
            fix = _experts_in_memory_layout(cfg)
            return Piece(target, "llm", (rest,), lambda x: fix(rest, x))
        experts = range(cfg.text.num_experts)
        if m.group(2) == "gate_up_proj":
            sources = tuple(f"{m.group(1)}.{e}.{w}_proj.weight" for e in experts for w in ("gate", "up"))
            return Piece(target, "llm", sources,
                         lambda *xs: torch.stack([torch.cat(xs[i:i + 2]) for i in range(0, len(xs), 2)]))
        sources = tuple(f"{m.group(1)}.{e}.down_proj.weight" for e in experts)
        return Piece(target, "llm", sources, lambda *xs: torch.stack(xs))

    p, v = vision.prefix, cfg.vision
    rest = target[len(HF_VIS):]
    if rest == "patch_embed.proj.weight":
        return Piece(target, "vision", (p + "embeddings.patch_embedding.weight",),
                     lambda w: linear_patch_to_conv3d(w, v.in_channels, v.temporal_patch_size, v.patch_size))
    if rest == "patch_embed.proj.bias":
        return Piece(target, "vision", (p + "embeddings.patch_embedding.bias",), _same)
    if rest == "pos_embed.weight":
        return Piece(target, "vision", (p + "embeddings.position_embedding.weight",), _same)
    m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", rest)
    if m:
        layer, module, kind = f"{p}encoder.layers.{m.group(1)}.", m.group(2), m.group(3)
        if module == "attn.qkv":
            return Piece(target, "vision", tuple(f"{layer}self_attn.{x}_proj.{kind}" for x in "qkv"), _cat_rows)
        theirs = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
                  "mlp.linear_fc1": "mlp.fc1", "mlp.linear_fc2": "mlp.fc2"}.get(module)
        if theirs:
            return Piece(target, "vision", (f"{layer}{theirs}.{kind}",), _same)
    raise KeyError(f"compose has no parent tensor for the target's {target}")


# ----------------------------------------------------------------------------------------------------
# The plan: checked in full before anything is written


@dataclass
class ComposePlan:
    """Every target tensor's :class:`Piece`, checked: all sources exist, each parent tensor is the
    source of exactly one target tensor or declared unused, and every piece builds the target's shape."""

    cfg: Qwen3VLConfig
    target_name: str
    llm: Parent
    vision: Parent
    seed: int
    pieces: dict[str, Piece] = field(default_factory=dict)
    unused: dict[str, list[str]] = field(default_factory=dict)  # role -> parent tensor names
    notes: list[str] = field(default_factory=list)

    def parent(self, role: str) -> Parent:
        return self.llm if role == "llm" else self.vision

    def uses(self) -> dict[str, Counter]:
        """How many target tensors take each parent tensor, per parent role."""
        out = {"llm": Counter(), "vision": Counter()}
        for piece in self.pieces.values():
            if piece.parent != "init":
                out[piece.parent].update(piece.sources)
        return out


def plan_composition(llm: Parent, vision: Parent, cfg: Qwen3VLConfig, target_name: str, seed: int) -> ComposePlan:
    """Check the parents against the target and plan every tensor (reads only the files' headers)."""
    check_llm_fits(llm, cfg, target_name)
    check_vision_fits(vision, cfg, target_name)
    plan = ComposePlan(cfg, target_name, llm, vision, seed)
    for target, shape in target_shapes(cfg).items():
        piece = piece_for(target, shape, cfg, llm, vision, seed)
        parent = None if piece.parent == "init" else plan.parent(piece.parent)
        for source in piece.sources:
            if source not in parent.reader:
                raise ComposeError(f"{parent.describe()}: missing tensor {source} (for the target's {target})")
        sources = [parent.meta_tensor(s) for s in piece.sources] if parent is not None else []
        try:
            built = tuple(piece.build(*sources).shape) if parent is not None else shape
        except (RuntimeError, ValueError) as exc:
            built = f"no tensor ({str(exc).splitlines()[0]})"
        if built != shape:
            given = ", ".join(f"{s} {list(t.shape)}" for s, t in zip(piece.sources, sources))
            raise ComposeError(f"{parent.describe()}: tensor {given} does not fit the target's {target} "
                               f"{list(shape)} (gives {built})")
        plan.pieces[target] = piece
    for role, counts in plan.uses().items():
        parent = plan.parent(role)
        twice = sorted(n for n, c in counts.items() if c > 1)
        if twice:  # a bug in the mapping, not in the parent
            raise RuntimeError(f"compose would use {parent.describe()}'s {twice[0]} for {counts[twice[0]]} tensors")
        left = [n for n in parent.reader.keys() if n not in counts]
        unexpected = sorted(n for n in left if not parent.is_declared_unused(n))
        if unexpected:
            raise ComposeError(f"{parent.describe()}: unexpected tensor {unexpected[0]}: the target "
                               f"{target_name} has no place for it"
                               + (f" ({len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        plan.unused[role] = sorted(left)
    if llm.fields["rope_theta"] != cfg.text.rope_theta or llm.fields["rope_type"] != "default":
        plan.notes.append(
            f"RoPE: the LLM parent has rope_theta {llm.fields['rope_theta']:g} ({llm.fields['rope_type']}), the "
            f"target {cfg.text.rope_theta:g} (interleaved MRoPE): text logits differ from the parent's until "
            "training adapts")
    return plan


class ParentTensors:
    """``get(target name)``: the target tensor built from the parents (the ``get`` of
    :func:`model.hf_adapter.hf_shards`). Keeps the last few built tensors (MoE expert tensors are asked
    for once per expert) and records which parent tensors it read (``read``)."""

    def __init__(self, plan: ComposePlan, cache_size: int = 4):
        self.plan = plan
        self.read: set[tuple[str, str]] = set()
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    def get(self, target: str) -> torch.Tensor:
        if target in self._cache:
            self._cache.move_to_end(target)
            return self._cache[target]
        piece = self.plan.pieces.get(target)
        if piece is None:
            raise KeyError(f"the target {self.plan.target_name} has no tensor {target}")
        if piece.parent == "init":
            tensor = piece.build()
        else:
            reader = self.plan.parent(piece.parent).reader
            tensor = piece.build(*(reader.get(s) for s in piece.sources))
            self.read.update((piece.parent, s) for s in piece.sources)
        self._cache[target] = tensor
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return tensor


# ----------------------------------------------------------------------------------------------------
# The command


def load_target(model: str | os.PathLike) -> tuple[Qwen3VLConfig, str]:
    """``--model``: a ``conf/model`` name or a YAML file of that form -> (config, how it was named)."""
    import yaml

    from model.registry import get_config

    path = Path(model)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"--model {path}: no such file")
        try:
            return Qwen3VLConfig.from_mapping(yaml.safe_load(path.read_text())), str(path.resolve())
        except ConfigError as exc:
            raise ConfigError(f"--model {path}: {exc}") from None
    return get_config(str(model)), str(model)


def _compose_rank(rank: int, tmp_out: str, llm_dir: str, vision_dir: str, target_hf: dict, target_name: str,
                  seed: int, layout: dict, dtype: str) -> list[tuple[str, str]]:
    import torch.distributed as dist

    from common.distributed.parallel import initialize_distributed
    from model.checkpoint_io import save_weights
    from model.convert import _DTYPES
    from model.hf_adapter import hf_shards
    from model.qwen3vl import build_qwen3vl

    initialize_distributed(layout)
    cfg = Qwen3VLConfig.from_hf(target_hf)
    tensors = ParentTensors(plan_composition(open_llm(llm_dir), open_vision(vision_dir), cfg, target_name, seed))
    model = build_qwen3vl(cfg, params_dtype=_DTYPES[dtype], sequence_parallel=layout["sequence_parallel"])
    with torch.no_grad():
        for _, _, param, shard in hf_shards(model, tensors.get, progress=rank == 0):
            param.copy_(shard)
    save_weights(tmp_out, [model])
    dist.barrier()
    return sorted(tensors.read)


@dataclass
class ComposeReport:
    out: Path
    plan: ComposePlan
    meta: dict

    def lines(self) -> list[str]:
        m = self.meta["composed"]
        lines = [f"composed {m['target']} -> {self.out} ({self.meta['dtype']})"]
        for part in ("language", "vision", "merger"):
            lines.append(f"  {part:9s}<- {m['parts'][part]}")
        lines += [f"  {line}" for line in unused_lines(m)]
        lines += [f"  note: {n}" for n in m["notes"]]
        return lines


def compose(llm_dir: str | os.PathLike, vision_dir: str | os.PathLike, out_dir: str | os.PathLike,
            model: str | os.PathLike | Qwen3VLConfig, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
            seed: int = 1234, dtype: str | None = None, target_name: str = "config") -> ComposeReport:
    """Write the composed checkpoint (see the module docstring); every check runs before any rank starts.

    ``model``: the target, a ``conf/model`` name, a YAML path or a :class:`Qwen3VLConfig` (then called
    ``target_name`` in messages and metadata). ``dtype``: of the written weights; default the LLM
    parent's (one dtype), vision tensors cast to it.
    """
    from model.convert import _DTYPES, _dtype_name, checked_layout, write_mcore_checkpoint

    out = Path(out_dir).resolve()
    if out.exists():
        raise FileExistsError(f"--out {out} exists; choose a new directory")
    cfg, target_name = (model, target_name) if isinstance(model, Qwen3VLConfig) else load_target(model)
    llm, vision = open_llm(llm_dir), open_vision(vision_dir)
    plan = plan_composition(llm, vision, cfg, target_name, seed)
    if dtype is None:
        dtypes = llm.reader.dtypes()
        if len(dtypes) != 1:
            raise ComposeError(f"--llm {llm.path}: tensors of several dtypes {sorted(map(str, dtypes))}; "
                               "choose the checkpoint's with --dtype")
        dtype = _dtype_name(dtypes.pop())
    if dtype not in _DTYPES:
        raise ComposeError(f"--dtype {dtype!r}: choose one of {sorted(_DTYPES)}")
    layout = checked_layout(cfg, tp, pp, ep, etp)
    cast = sorted(str(d).replace("torch.", "") for d in vision.reader.dtypes() if d != _DTYPES[dtype])
    if cast:
        plan.notes.append(f"vision tensors cast from {', '.join(cast)} to {dtype}")
    parts = {
        "language": f"{llm.path} ({llm.model_type}: embedding, decoder, final norm, LM head)",
        "vision": f"{vision.path} ({vision.model_type}: patch embedding, position table, ViT layers)",
        "merger": f"fresh initialisation, seed {seed}",
    }
    meta = {
        "dtype": dtype, "source": "model.convert compose",
        "composed": {
            "target": target_name, "parts": parts, "seed": seed, "merger_init": MERGER_INIT,
            "parents": {
                "llm": {"path": str(llm.path), "model_type": llm.model_type, "tensors": len(llm.reader.keys())},
                "vision": {"path": str(vision.path), "model_type": vision.model_type,
                           "tensors": len(vision.reader.keys())},
            },
            "unused": {"llm": plan.unused["llm"], "vision": plan.unused["vision"]},
            "unused_patterns": {"llm": list(llm.unused), "vision": list(vision.unused)},
            "notes": plan.notes,
        },
    }
    results = write_mcore_checkpoint(
        out, layout, _compose_rank,
        (str(llm.path), str(vision.path), cfg.to_hf(), target_name, seed, layout, dtype),
        cfg.to_hf(), meta, extra_from=llm.path)
    # Every planned parent tensor went into the checkpoint (some rank read it).
    read = {tuple(x) for rank in results for x in rank}
    planned = {(role, n) for role, counts in plan.uses().items() for n in counts}
    if read != planned:
        missing = sorted(planned - read)[:3]
        raise RuntimeError(f"compose: the ranks did not read the planned parent tensors {missing}")
    return ComposeReport(out, plan, meta)


def unused_lines(composed: dict) -> list[str]:
    """The declared-unused parent tensors of a ``composed`` record, one line per parent, grouped by the
    declared pattern (a whole text tower is hundreds of names)."""
    lines = []
    for role, names in composed["unused"].items():
        if names:
            patterns = composed["unused_patterns"][role]
            counts = Counter(next(p for p in patterns if fnmatch.fnmatchcase(n, p)) for n in names)
            lines.append(f"unused, declared (--{role} parent): {len(names)} tensors: "
                         + ", ".join(f"{p} ({c})" if "*" in p else p for p, c in counts.items()))
    return lines


def read_composition(ckpt_dir: str | os.PathLike) -> dict | None:
    """The ``composed`` record of a checkpoint's ``qwen3vl_convert.json``; None when it was not composed."""
    from model.convert import META_FILE

    meta = Path(ckpt_dir) / META_FILE
    if not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("composed")
