"""The two parents of a composed Qwen3-VL (:mod:`model.compose`): a Qwen3 causal LM and a SigLIP-2 vision
encoder, read from Hugging Face folders, and the checks that they fit the target architecture.

:func:`open_llm` / :func:`open_vision` read a parent's ``config.json`` (the architecture fields, with
transformers' defaults for those it leaves out) and its safetensors headers; :func:`check_llm_fits` /
:func:`check_vision_fits` raise :class:`ComposeError` naming the first field that differs from the target
and a tensor it shapes. The ``UNUSED_*`` constants declare the parent tensors Qwen3-VL has no place for.
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.config import Qwen3VLConfig
from model.hf_adapter import HFCheckpointReader

# SigLIP-2 vision-tower tensors (names after the tower's prefix) the Qwen3-VL ViT has no place for: the
# attention-pooling head (SigLIP's one embedding per image) and the final LayerNorm (the Qwen3-VL
# merger normalises with its own LayerNorm, freshly initialised like the rest of the merger).
UNUSED_VISION_TENSORS = ("head.*", "post_layernorm.weight", "post_layernorm.bias")
# A whole Siglip2Model (text and vision towers): everything but the vision tower.
UNUSED_SIGLIP2_TEXT_TOWER = ("text_model.*", "logit_scale", "logit_bias")
# A tied LLM whose file still carries lm_head.weight: transformers ties it to the embedding on load
# (the file's copy is never used), so does the composed model.
UNUSED_TIED_LM_HEAD = ("lm_head.weight",)

# Defaults of the config fields read here when a config.json leaves them out (transformers 5.24's
# Qwen3Config / Qwen3MoeConfig / Siglip2VisionConfig; tests/model/test_compose.py checks them).
LLM_DEFAULTS = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
                "use_sliding_window": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
                "norm_topk_prob": False, "rope_theta": 10000.0}
SIGLIP2_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                           "num_attention_heads": 12, "num_channels": 3, "patch_size": 16,
                           "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "num_patches": 256}
_LLM_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


class ComposeError(ValueError):
    """Parents that do not make the target; the message names the parent, the tensor and the reason."""


@dataclass
class Parent:
    """One parent checkpoint: its tensors (``reader``), the architecture fields read from its config
    (defaults filled in), the prefix of the tower's tensor names and the patterns of declared-unused ones."""

    role: str  # "llm" | "vision"
    flag: str  # the command-line option that named it
    reader: HFCheckpointReader
    fields: dict
    model_type: str
    prefix: str = ""
    unused: tuple[str, ...] = ()
    _shapes: dict[str, list[int]] | None = field(default=None, repr=False)

    @property
    def path(self) -> Path:
        return self.reader.path

    def meta_tensor(self, name: str) -> torch.Tensor:
        """An empty tensor of ``name``'s shape on the meta device (read from the files' headers)."""
        if self._shapes is None:
            from safetensors import safe_open

            self._shapes = {}
            for file in sorted(set(self.reader.weight_map.values())):
                with safe_open(str(self.path / file), "pt") as f:
                    self._shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
        return torch.empty(self._shapes[name], device="meta")

    def describe(self) -> str:
        return f"{self.flag} {self.path}"

    def is_declared_unused(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.unused)


def open_llm(path: str | os.PathLike) -> Parent:
    reader = HFCheckpointReader(path)
    c = reader.config_dict
    model_type = c.get("model_type")
    if model_type not in ("qwen3", "qwen3_moe"):
        raise ComposeError(f"--llm {reader.path}: model_type {model_type!r} is not a Qwen3 causal LM "
                           "('qwen3' or 'qwen3_moe')")
    fields = {k: c.get(k, d) for k, d in LLM_DEFAULTS.items()}
    for key in _LLM_REQUIRED:
        if key not in c:
            raise ComposeError(f"--llm {reader.path}: config.json has no {key!r}")
        fields[key] = c[key]
    fields["num_key_value_heads"] = c.get("num_key_value_heads") or c["num_attention_heads"]
    fields["head_dim"] = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    fields["rope_theta"] = float(rope.get("rope_theta", c.get("rope_theta", LLM_DEFAULTS["rope_theta"])))
    fields["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    if model_type == "qwen3_moe":
        for key in ("num_experts_per_tok", "moe_intermediate_size"):
            if key not in c:
                raise ComposeError(f"--llm {reader.path}: config.json has no {key!r}")
            fields[key] = c[key]
        fields["num_experts"] = c.get("num_experts", c.get("num_local_experts"))
        if not fields["num_experts"]:
            raise ComposeError(f"--llm {reader.path}: a qwen3_moe config.json needs num_experts")
    unused = UNUSED_TIED_LM_HEAD if fields["tie_word_embeddings"] else ()
    return Parent("llm", "--llm", reader, fields, model_type, unused=unused)


def open_vision(path: str | os.PathLike) -> Parent:
    reader = HFCheckpointReader(path)
    c = reader.config_dict
    model_type = c.get("model_type")
    if model_type == "siglip2":  # a whole dual encoder: the vision tower is under vision_model.
        vision, prefix, unused = c.get("vision_config") or {}, "vision_model.", UNUSED_SIGLIP2_TEXT_TOWER
    elif model_type == "siglip2_vision_model":
        vision, unused = c, ()
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in reader.keys()) else ""
    else:
        raise ComposeError(f"--vision {reader.path}: model_type {model_type!r} is not SigLIP-2 "
                           "('siglip2_vision_model' or 'siglip2')")
    fields = {k: vision.get(k, d) for k, d in SIGLIP2_VISION_DEFAULTS.items()}
    if isinstance(fields["patch_size"], (list, tuple)):
        if len(set(fields["patch_size"])) != 1:
            raise ComposeError(f"--vision {reader.path}: patch_size {fields['patch_size']} is not square")
        fields["patch_size"] = fields["patch_size"][0]
    unused = unused + tuple(prefix + p for p in UNUSED_VISION_TENSORS)
    return Parent("vision", "--vision", reader, fields, model_type, prefix=prefix, unused=unused)


def _check_fields(parent: Parent, checks: list[tuple[str, object, str, str]], target_name: str) -> None:
    """(parent field, value the target needs, target field, a tensor it shapes): the first that differs
    is a :class:`ComposeError`."""
    for key, needed, target_field, tensor in checks:
        have = parent.fields.get(key)
        if isinstance(needed, float) or isinstance(have, float):
            same = have is not None and math.isclose(float(have), float(needed), rel_tol=1e-9)
        else:
            same = (list(have) if isinstance(have, (list, tuple)) else have) == \
                (list(needed) if isinstance(needed, (list, tuple)) else needed)
        if not same:
            raise ComposeError(f"{parent.describe()}: {key} {have!r} does not fit the target {target_name} "
                               f"({target_field} {needed!r}; tensor {tensor})")


def check_llm_fits(llm: Parent, cfg: Qwen3VLConfig, target_name: str) -> None:
    t = cfg.text
    wanted = "qwen3_moe" if t.is_moe else "qwen3"
    if llm.model_type != wanted:
        raise ComposeError(f"{llm.describe()}: a {llm.model_type} model cannot be the language model of the "
                           f"{'MoE' if t.is_moe else 'dense'} target {target_name} (it needs {wanted}; "
                           f"tensor model.layers.0.mlp.{'experts' if t.is_moe else 'gate_proj'}...)")
    def same(key: str, tensor: str) -> tuple[str, object, str, str]:  # a field of the same name in `text`
        return key, getattr(t, key), f"text.{key}", tensor

    layers = "model.layers.*."
    checks = [
        same("vocab_size", "model.embed_tokens.weight"),
        same("hidden_size", "model.embed_tokens.weight"),
        same("num_hidden_layers", f"model.layers.{t.num_hidden_layers - 1}.*"),
        same("num_attention_heads", layers + "self_attn.q_proj.weight"),
        same("num_key_value_heads", layers + "self_attn.k_proj.weight"),
        same("head_dim", layers + "self_attn.q_norm.weight"),
        same("rms_norm_eps", "model.norm.weight"),
        ("tie_word_embeddings", t.tie_word_embeddings, "tie_word_embeddings", "lm_head.weight"),
        same("hidden_act", layers + "mlp"),
        ("attention_bias", False, "text.attention_bias", layers + "self_attn.q_proj.bias"),
        ("use_sliding_window", False, "full attention", layers + "self_attn"),
    ]
    pattern = t.moe_layer_pattern()
    if not all(pattern):
        checks.append(same("intermediate_size", f"model.layers.{pattern.index(0)}.mlp.gate_proj.weight"))
    if t.is_moe:
        checks += [
            same("num_experts", layers + "mlp.gate.weight"),
            same("num_experts_per_tok", layers + "mlp.gate.weight"),
            same("moe_intermediate_size", layers + "mlp.experts.*.gate_proj.weight"),
            same("decoder_sparse_step", layers + "mlp"),
            ("mlp_only_layers", list(t.mlp_only_layers), "text.mlp_only_layers", layers + "mlp"),
            # Qwen3-VL's router renormalises the top-k weights (softmax over the chosen experts).
            ("norm_topk_prob", True, "Qwen3-VL's renormalised top-k routing", layers + "mlp.gate.weight"),
        ]
    _check_fields(llm, checks, target_name)


def check_vision_fits(vision: Parent, cfg: Qwen3VLConfig, target_name: str) -> None:
    v, p = cfg.vision, vision.prefix
    _check_fields(vision, [
        ("hidden_size", v.hidden_size, "vision.hidden_size", p + "embeddings.patch_embedding.weight"),
        ("intermediate_size", v.intermediate_size, "vision.intermediate_size", p + "encoder.layers.*.mlp.fc1.weight"),
        ("num_hidden_layers", v.depth, "vision.depth", f"{p}encoder.layers.{v.depth - 1}.*"),
        ("num_attention_heads", v.num_heads, "vision.num_heads", p + "encoder.layers.*.self_attn.q_proj.weight"),
        ("patch_size", v.patch_size, "vision.patch_size", p + "embeddings.patch_embedding.weight"),
        ("num_channels", v.in_channels, "vision.in_channels", p + "embeddings.patch_embedding.weight"),
        ("num_patches", v.num_position_embeddings, "vision.num_position_embeddings",
         p + "embeddings.position_embedding.weight"),
        ("layer_norm_eps", v.layer_norm_eps, "the ViT's LayerNorm eps", p + "encoder.layers.*.layer_norm1.weight"),
        ("hidden_act", v.hidden_act, "vision.hidden_act", p + "encoder.layers.*.mlp.fc1.weight"),
    ], target_name)
    if v.temporal_patch_size != 2:
        raise ComposeError(f"the target {target_name} has vision.temporal_patch_size {v.temporal_patch_size}; "
                           f"a still image fills 2 temporal slots in Qwen3-VL ({p}embeddings.patch_embedding.weight)")
