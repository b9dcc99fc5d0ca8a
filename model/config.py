"""Architecture of a Qwen3-VL model (dense or MoE): text decoder + vision encoder, with the HF field names.

:class:`Qwen3VLConfig` is the one description of the architecture used everywhere: named configs in
``conf/model/*.yaml`` (:meth:`Qwen3VLConfig.from_mapping`), Hugging Face ``config.json`` files
(:meth:`Qwen3VLConfig.from_hf` / :meth:`Qwen3VLConfig.to_hf`), and the Megatron-Core
``TransformerConfig`` of the language model and of the vision encoder (:mod:`model.qwen3vl`).

``from_hf`` accepts both spellings of the published configs: transformers 4.57 (``rope_theta`` +
``rope_scaling`` with ``mrope_section``) and transformers 5 (``rope_parameters``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping

from model.text_config import Qwen3TextConfig


class ConfigError(ValueError):
    """An architecture that Qwen3-VL (or this implementation) cannot have; the message names the field."""


@dataclass
class Qwen3VLTextConfig(Qwen3TextConfig):
    """The language decoder: :class:`model.text_config.Qwen3TextConfig` plus Qwen3-VL's 3D rotary layout.

    ``mrope_section`` splits the ``head_dim / 2`` rotary frequencies between time, height and width
    (interleaved: frequency ``i`` belongs to height when ``i % 3 == 1`` and ``i < 3 * section[1]``, to width
    when ``i % 3 == 2`` and ``i < 3 * section[2]``, else to time). MoE only: ``decoder_sparse_step`` and
    ``mlp_only_layers`` choose which layers are MoE (the reference's rule), the others are dense SwiGLU
    of width ``intermediate_size``.
    """

    mrope_section: tuple[int, int, int] = (24, 20, 20)
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    hidden_act: str = "silu"
    attention_bias: bool = False

    def moe_layer_pattern(self) -> list[int]:
        """1 for a MoE layer, 0 for a dense one, per decoder layer (the reference's rule)."""
        if not self.is_moe:
            return [0] * self.num_hidden_layers
        return [
            int(i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0)
            for i in range(self.num_hidden_layers)
        ]


@dataclass
class Qwen3VLVisionConfig:
    """The ViT: sizes in elements, patches in pixels (``patch_size`` x ``patch_size`` x ``temporal_patch_size``
    frames), ``num_position_embeddings`` learned positions forming a square grid."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    out_hidden_size: int = 3584
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    num_position_embeddings: int = 2304
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6  # fixed in the reference (nn.LayerNorm(eps=1e-6)), not a config field

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_grid_per_side(self) -> int:
        return int(self.num_position_embeddings**0.5)

    @property
    def patch_dim(self) -> int:
        """Values of one flattened patch: channels x temporal x patch x patch (1536)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merged_hidden_size(self) -> int:
        """Width of a 2x2 block of patch features, the merger's input."""
        return self.hidden_size * self.spatial_merge_size**2


@dataclass
class Qwen3VLConfig:
    """A whole Qwen3-VL model. Token ids are those of the Qwen tokenizer unless a config says otherwise."""

    text: Qwen3VLTextConfig
    vision: Qwen3VLVisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    # The HF config this was read from, kept so that an exported checkpoint carries it unchanged.
    hf_source: dict | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.validate()

    @property
    def is_moe(self) -> bool:
        return self.text.is_moe

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    @property
    def num_deepstack(self) -> int:
        return len(self.vision.deepstack_visual_indexes)

    def validate(self) -> None:
        t, v = self.text, self.vision
        if t.head_dim % 2 or sum(t.mrope_section) != t.head_dim // 2:
            raise ConfigError(
                f"text.mrope_section {list(t.mrope_section)} must sum to head_dim/2 = {t.head_dim // 2}"
            )
        if t.num_attention_heads % t.num_key_value_heads:
            raise ConfigError(
                f"text.num_attention_heads {t.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {t.num_key_value_heads}"
            )
        if t.hidden_act != "silu":
            raise ConfigError(f"text.hidden_act must be 'silu' (SwiGLU), got {t.hidden_act!r}")
        if t.attention_bias:
            raise ConfigError("text.attention_bias=true is not part of Qwen3-VL")
        if t.is_moe and not 0 < t.num_experts_per_tok <= t.num_experts:
            raise ConfigError(
                f"text.num_experts_per_tok {t.num_experts_per_tok} must be in 1..num_experts {t.num_experts}"
            )
        if t.is_moe and t.moe_intermediate_size <= 0:
            # Left out, it reads as 0: Megatron builds experts of width 0 and every MoE layer adds zero.
            raise ConfigError(f"text.moe_intermediate_size must be > 0 in a MoE model (num_experts "
                              f"{t.num_experts}), got {t.moe_intermediate_size}")
        if t.is_moe and t.decoder_sparse_step < 1:
            raise ConfigError(f"text.decoder_sparse_step must be >= 1, got {t.decoder_sparse_step}")
        if v.hidden_size % v.num_heads:
            raise ConfigError(f"vision.hidden_size {v.hidden_size} is not a multiple of num_heads {v.num_heads}")
        if v.head_dim % 4:
            raise ConfigError(f"vision head_dim {v.head_dim} must be a multiple of 4 (2D rotary)")
        if v.num_grid_per_side**2 != v.num_position_embeddings:
            raise ConfigError(f"vision.num_position_embeddings {v.num_position_embeddings} is not a square")
        if v.hidden_act != "gelu_pytorch_tanh":
            raise ConfigError(f"vision.hidden_act must be 'gelu_pytorch_tanh', got {v.hidden_act!r}")
        if v.out_hidden_size != t.hidden_size:
            raise ConfigError(
                f"vision.out_hidden_size {v.out_hidden_size} must equal text.hidden_size {t.hidden_size}"
            )
        ds = list(v.deepstack_visual_indexes)
        if sorted(set(ds)) != ds or (ds and not 0 <= ds[0] <= ds[-1] < v.depth):
            raise ConfigError(
                f"vision.deepstack_visual_indexes {ds} must be increasing ViT layer indexes in 0..{v.depth - 1}"
            )
        if len(ds) > t.num_hidden_layers:
            raise ConfigError(
                f"{len(ds)} DeepStack features need at least as many decoder layers, got {t.num_hidden_layers}"
            )

    def check_layout(self, tp: int = 1, ep: int = 1, etp: int | None = None, pp: int = 1,
                     vpp: int | None = None) -> None:
        """Raise :class:`ConfigError` when the architecture cannot be split over tensor parallel size
        ``tp``, expert parallel size ``ep``, expert tensor parallel size ``etp`` (None: ``tp``) and
        ``pp`` pipeline stages of ``vpp`` virtual stages each (None: one).

        Checked before any rank starts (the tools) and when a model is built: attention heads, KV heads
        (a multiple or a divisor of tp), vocabulary and dense SwiGLU width over tp, ViT heads and MLP
        width over tp, experts over ep, the expert width over etp, decoder layers over pp * vpp.
        """
        t, v = self.text, self.vision
        etp = tp if etp is None else etp
        tensor, expert, expert_tensor = (("tensor parallel size", tp), ("expert parallel size", ep),
                                         ("expert tensor parallel size", etp))
        pattern = t.moe_layer_pattern()
        splits = [
            ("text.num_attention_heads", t.num_attention_heads, tensor),
            ("text.vocab_size", t.vocab_size, tensor),
            ("vision.num_heads", v.num_heads, tensor),
            ("vision.intermediate_size", v.intermediate_size, tensor),
        ]
        if not all(pattern):  # some decoder layers are dense
            splits.append(("text.intermediate_size", t.intermediate_size, tensor))
        if any(pattern):
            splits += [("text.num_experts", t.num_experts, expert),
                       ("text.moe_intermediate_size", t.moe_intermediate_size, expert_tensor)]
        for field_name, value, (what, size) in splits:
            if value % size:
                raise ConfigError(f"{field_name} {value} is not divisible by the {what} {size}")
        chunks = pp * (vpp or 1)
        if t.num_hidden_layers % chunks:
            where = f"pp * vpp = {pp} * {vpp}" if vpp else f"pp = {pp}"
            raise ConfigError(f"text.num_hidden_layers {t.num_hidden_layers} do not split evenly over {where} "
                              "pipeline stages")
        if t.num_key_value_heads % tp and tp % t.num_key_value_heads:
            raise ConfigError(f"text.num_key_value_heads {t.num_key_value_heads} is neither a multiple nor a "
                              f"divisor of the tensor parallel size {tp}")

    # ------------------------------------------------------------------ named configs (YAML)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "Qwen3VLConfig":
        """From a named config (``conf/model/*.yaml``): ``text`` and ``vision`` sections with the field
        names of the HF ``text_config`` / ``vision_config``, the token ids at the top level. ``family``
        (``dense`` / ``moe``) is implied by ``text.num_experts``. Unknown keys are an error naming them."""
        cfg = dict(cfg)
        for key in ("name", "description", "family"):
            cfg.pop(key, None)
        for part in ("text", "vision"):
            if not isinstance(cfg.get(part), Mapping):
                raise ConfigError(f"model config needs a {part!r} section")
        text, vision = dict(cfg.pop("text")), dict(cfg.pop("vision"))
        _check_keys(text, _TEXT_KEYS, "text")
        _check_keys(vision, _VISION_KEYS, "vision")
        top = {"image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
               "tie_word_embeddings"}
        _check_keys(cfg, top, "model")
        moe = int(text.get("num_experts", 0) or 0) > 0
        if "tie_word_embeddings" not in cfg:
            cfg["tie_word_embeddings"] = bool(text.get("tie_word_embeddings", False))
        hf = dict(cfg, model_type="qwen3_vl_moe" if moe else "qwen3_vl", text_config=text, vision_config=vision)
        out = cls.from_hf(hf)
        out.hf_source = None
        return out

    def to_mapping(self) -> dict:
        """The inverse of :meth:`from_mapping` (plain Python values, YAML-ready)."""
        hf = Qwen3VLConfig(text=self.text, vision=self.vision, image_token_id=self.image_token_id,
                           video_token_id=self.video_token_id, vision_start_token_id=self.vision_start_token_id,
                           vision_end_token_id=self.vision_end_token_id).to_hf()
        text = {k: v for k, v in hf["text_config"].items() if k not in ("model_type", "attention_dropout")}
        vision = {k: v for k, v in hf["vision_config"].items() if k != "model_type"}
        out = {"text": text, "vision": vision}
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                    "tie_word_embeddings"):
            out[key] = hf[key]
        return out

    # ------------------------------------------------------------------ Hugging Face config.json

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "Qwen3VLConfig":
        """From a Qwen3-VL / Qwen3-VL-MoE ``config.json`` dict (transformers 4.57 or 5 spelling)."""
        model_type = hf.get("model_type")
        if model_type not in ("qwen3_vl", "qwen3_vl_moe"):
            raise ConfigError(f"config model_type must be 'qwen3_vl' or 'qwen3_vl_moe', got {model_type!r}")
        if "text_config" not in hf or "vision_config" not in hf:
            raise ConfigError("a Qwen3-VL config.json needs 'text_config' and 'vision_config'")
        t = dict(hf["text_config"])
        v = dict(hf["vision_config"])
        rope = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
        theta = rope.get("rope_theta", t.get("rope_theta"))
        if theta is None:
            raise ConfigError("text_config has no rope_theta (in rope_parameters or at the top level)")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"text rope_type {rope_type!r} is not supported (only 'default' MRoPE)")
        if rope.get("mrope_interleaved") is False:
            raise ConfigError("mrope_interleaved=false is Qwen2-VL's layout, not Qwen3-VL's")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if key not in t:
                raise ConfigError(f"text_config is missing {key!r}")
        hidden = t["hidden_size"]
        heads = t["num_attention_heads"]
        num_experts = 0
        if model_type == "qwen3_vl_moe":
            num_experts = int(t.get("num_experts", t.get("num_local_experts", 0)) or 0)
            if num_experts <= 0:
                raise ConfigError("a qwen3_vl_moe text_config needs num_experts > 0")
        text = Qwen3VLTextConfig(
            vocab_size=t["vocab_size"],
            hidden_size=hidden,
            num_hidden_layers=t["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=t.get("num_key_value_heads") or heads,
            head_dim=t.get("head_dim") or hidden // heads,
            intermediate_size=t["intermediate_size"],
            rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_position_embeddings=t.get("max_position_embeddings", 262_144),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            num_experts=num_experts,
            num_experts_per_tok=t.get("num_experts_per_tok", 0) if num_experts else 0,
            moe_intermediate_size=t.get("moe_intermediate_size", 0) if num_experts else 0,
            router_aux_loss_coef=float(t.get("router_aux_loss_coef", 1e-3)),
            mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
            decoder_sparse_step=(t.get("decoder_sparse_step", 1) or 1) if num_experts else 1,
            mlp_only_layers=tuple(t.get("mlp_only_layers") or ()) if num_experts else (),
            hidden_act=t.get("hidden_act", "silu"),
            attention_bias=bool(t.get("attention_bias", False)),
        )
        vrope = v.get("rope_parameters") or {}
        vision = Qwen3VLVisionConfig(
            depth=v.get("depth", 27),
            hidden_size=v.get("hidden_size", 1152),
            intermediate_size=v.get("intermediate_size", 4304),
            num_heads=v.get("num_heads", 16),
            out_hidden_size=v.get("out_hidden_size", 3584),
            deepstack_visual_indexes=tuple(v.get("deepstack_visual_indexes", (8, 16, 24))),
            patch_size=v.get("patch_size", 16),
            temporal_patch_size=v.get("temporal_patch_size", 2),
            spatial_merge_size=v.get("spatial_merge_size", 2),
            in_channels=v.get("in_channels", 3),
            num_position_embeddings=v.get("num_position_embeddings", 2304),
            hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
        )
        return cls(
            text=text,
            vision=vision,
            image_token_id=hf.get("image_token_id", 151655),
            video_token_id=hf.get("video_token_id", 151656),
            vision_start_token_id=hf.get("vision_start_token_id", 151652),
            vision_end_token_id=hf.get("vision_end_token_id", 151653),
            hf_source=copy.deepcopy(dict(hf)),
        )

    def to_hf(self) -> dict:
        """A transformers-5 ``config.json`` dict for this architecture (the kept source one when there is one)."""
        if self.hf_source is not None:
            return copy.deepcopy(self.hf_source)
        t, v = self.text, self.vision
        moe = self.is_moe
        text = {
            "model_type": "qwen3_vl_moe_text" if moe else "qwen3_vl_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps,
            "attention_bias": t.attention_bias,
            "attention_dropout": 0.0,
            "tie_word_embeddings": t.tie_word_embeddings,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": t.rope_theta,
                "mrope_section": list(t.mrope_section),
                "mrope_interleaved": True,
            },
        }
        if moe:
            text.update(
                num_experts=t.num_experts,
                num_experts_per_tok=t.num_experts_per_tok,
                moe_intermediate_size=t.moe_intermediate_size,
                decoder_sparse_step=t.decoder_sparse_step,
                mlp_only_layers=list(t.mlp_only_layers),
                router_aux_loss_coef=t.router_aux_loss_coef,
            )
        vision = {
            "model_type": "qwen3_vl_moe_vision" if moe else "qwen3_vl_vision",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "out_hidden_size": v.out_hidden_size,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "in_channels": v.in_channels,
            "num_position_embeddings": v.num_position_embeddings,
            "hidden_act": v.hidden_act,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        }
        return {
            "architectures": ["Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"],
            "model_type": "qwen3_vl_moe" if moe else "qwen3_vl",
            "text_config": text,
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": t.tie_word_embeddings,
        }


# Field names a named config may use (those of the HF text_config / vision_config that matter here).
_TEXT_KEYS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling", "max_position_embeddings",
    "tie_word_embeddings", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "router_aux_loss_coef",
    "decoder_sparse_step", "mlp_only_layers", "hidden_act", "attention_bias",
}
_VISION_KEYS = {
    "depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "deepstack_visual_indexes",
    "patch_size", "temporal_patch_size", "spatial_merge_size", "in_channels", "num_position_embeddings",
    "hidden_act", "rope_parameters",
}


def _check_keys(values: Mapping[str, Any], known: set[str], section: str) -> None:
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {section} config key(s) {unknown}; known: {sorted(known)}")
