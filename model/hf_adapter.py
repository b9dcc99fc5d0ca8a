"""Weights between the Hugging Face Qwen3-VL layout and our Megatron-Core model.

Three namings meet here:

* **HF names** of the published safetensors (``model.language_model.layers.3.self_attn.q_proj.weight``,
  ``model.visual.blocks.0.attn.qkv.weight``, ``lm_head.weight``, ...).
* **Canonical names**: our model's parameter names in the single-rank layout (tp = pp = ep = 1), with
  global layer and expert indexes (``decoder.layers.3.self_attention.linear_qkv.weight``,
  ``decoder.layers.3.mlp.experts.local_experts.17.linear_fc1.weight``, ``vision.layers.0...``).
  Transformer-engine module names are mapped to the local ones (``...linear_qkv.layer_norm_weight`` ->
  ``input_layernorm.weight``).
* **Local names**: a rank's ``model.named_parameters()`` under tensor / pipeline / expert parallelism.

Transformations (exact: reshapes, concatenations and transposes only, so conversions are bit-exact):

* decoder Q, K, V -> one ``linear_qkv`` with rows grouped per KV group ``[q heads of the group, k, v]``;
  ViT ``qkv`` rows ``[3, heads, d]`` -> ``[heads, 3, d]``;
* decoder gate / up -> ``linear_fc1`` = ``[gate; up]``; under tensor parallelism each rank holds
  ``[gate_r; up_r]`` (Megatron's SwiGLU sharding);
* MoE experts: HF keeps one tensor per layer. The published checkpoints store ``gate_up_proj`` as
  ``(E, H, 2I)`` and ``down_proj`` as ``(E, I, H)``; transformers 5 keeps (and ``save_pretrained`` writes)
  the transposed in-memory layout ``(E, 2I, H)`` / ``(E, H, I)``. Reading accepts both (by shape), writing
  produces the published layout. A square tensor (``H == 2I`` or ``H == I``, never the case in a published
  model) cannot tell its layout; it is read and written in the in-memory layout, as transformers 5 loads it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from megatron.core import parallel_state

from model.config import Qwen3VLConfig

HF_LM = "model.language_model."
HF_VIS = "model.visual."

_TE_RENAMES = (
    (".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
    (".self_attention.linear_qkv.layer_norm_bias", ".input_layernorm.bias"),
    (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
    (".mlp.linear_fc1.layer_norm_bias", ".pre_mlp_layernorm.bias"),
)
_GROUPED_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(linear_fc[12])\.weight(\d+)$")
_LOCAL_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")
_DECODER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


# ----------------------------------------------------------------------------------------------------
# Reading HF checkpoints


class HFCheckpointReader:
    """Lazy access to the tensors of an HF checkpoint directory (``model.safetensors`` or an index).

    ``get(name)`` returns the tensor as stored; recently used tensors are kept (MoE expert tensors are
    read once per layer, not once per expert). ``read``: the names asked for so far
    (:func:`refuse_unused_tensors` checks that the model used them all).
    """

    def __init__(self, path: str | os.PathLike, cache_size: int = 4):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with _read_shard(safe_open, single) as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        self.weight_map: dict[str, str] = weight_map
        self._open = safe_open
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self.read: set[str] = set()
        config = self.path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{self.path}: no config.json")
        self.config_dict = json.loads(config.read_text())

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.path}")
        self.read.add(name)
        with _read_shard(self._open, self.path / self.weight_map[name]) as f:
            tensor = f.get_tensor(name)
        self._cache[name] = tensor
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return tensor

    def dtypes(self) -> set[torch.dtype]:
        out = set()
        for file in sorted(set(self.weight_map.values())):
            with _read_shard(self._open, self.path / file) as f:
                for k in f.keys():
                    out.add(f.get_slice(k).get_dtype())
        return {_safetensors_dtype(d) for d in out}


@contextmanager
def _read_shard(safe_open, path: Path):
    """``safe_open`` of one safetensors shard whose failures name it: safetensors' own errors (a file
    cut short: "incomplete metadata") name no file, in a checkpoint of dozens of shards."""
    try:
        with safe_open(str(path), "pt") as f:
            yield f
    except (OSError, ValueError, RuntimeError) as exc:  # SafetensorError is an Exception of its own
        raise ValueError(f"{path}: unreadable safetensors file ({type(exc).__name__}: {exc})") from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{path}: unreadable safetensors file ({exc})") from None


def _safetensors_dtype(name: str) -> torch.dtype:
    table = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    if name not in table:
        raise ValueError(f"unsupported tensor dtype {name} in the checkpoint")
    return table[name]


def _experts_in_memory_layout(cfg: Qwen3VLConfig) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """Function turning a stored expert tensor into the in-memory layout (E, 2I, H) / (E, H, I)."""
    t = cfg.text

    def fix(name: str, tensor: torch.Tensor) -> torch.Tensor:
        e, h, i = t.num_experts, t.hidden_size, t.moe_intermediate_size
        memory = (e, 2 * i, h) if name.endswith("gate_up_proj") else (e, h, i)
        published = (memory[0], memory[2], memory[1])
        shape = tuple(tensor.shape)
        if shape not in (memory, published):
            raise ValueError(f"{name}: shape {shape} is neither the published {published} nor the "
                             f"in-memory {memory} layout")
        # Square: the layouts are indistinguishable; like transformers 5, take it as in-memory.
        return tensor if shape == memory else tensor.transpose(1, 2)

    return fix


def _published_expert_layout(tensor: torch.Tensor) -> torch.Tensor:
    """(E, a, b) in-memory -> published (E, b, a); square tensors stay in-memory (see the module docstring)."""
    if tensor.shape[1] == tensor.shape[2]:
        return tensor.contiguous()
    return tensor.transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------
# Canonical <-> HF, one tensor at a time


def canonical_name(local_name: str, layer_offset: int = 0, expert_offset: int = 0) -> str:
    """Canonical name of a rank's parameter (see the module docstring)."""
    name = local_name
    for te, local in _TE_RENAMES:
        if name.endswith(te):
            name = name[: -len(te)] + local
    m = _DECODER_LAYER.match(name)
    if m:
        name = f"decoder.layers.{int(m.group(1)) + layer_offset}.{m.group(2)}"
    m = _GROUPED_EXPERT.match(name)
    if m:
        name = f"{m.group(1)}.local_experts.{int(m.group(3)) + expert_offset}.{m.group(2)}.weight"
    elif expert_offset:
        m = _LOCAL_EXPERT.match(name)
        if m:
            name = f"{m.group(1)}.local_experts.{int(m.group(2)) + expert_offset}.{m.group(3)}.weight"
    return name


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    q = q.reshape(groups, -1, *q.shape[1:])
    k = k.reshape(groups, -1, *k.shape[1:])
    v = v.reshape(groups, -1, *v.shape[1:])
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])


def _split_qkv(qkv: torch.Tensor, groups: int, q_rows: int, kv_rows: int):
    per = qkv.reshape(groups, -1, *qkv.shape[1:])
    q, k, v = per.split([q_rows // groups, kv_rows // groups, kv_rows // groups], dim=1)
    return (q.reshape(q_rows, *qkv.shape[1:]), k.reshape(kv_rows, *qkv.shape[1:]),
            v.reshape(kv_rows, *qkv.shape[1:]))


def _vision_qkv_to_megatron(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.reshape(3, heads, -1, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


def _vision_qkv_to_hf(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.reshape(heads, 3, -1, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


_VISION_LAYER_MAP = {
    "input_layernorm": "norm1",
    "pre_mlp_layernorm": "norm2",
    "self_attention.linear_qkv": "attn.qkv",
    "self_attention.linear_proj": "attn.proj",
    "mlp.linear_fc1": "mlp.linear_fc1",
    "mlp.linear_fc2": "mlp.linear_fc2",
}
_TEXT_LAYER_MAP = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "mlp.router.weight": "mlp.gate.weight",
}


def hf_tensor_for(name: str, get: Callable[[str], torch.Tensor], cfg: Qwen3VLConfig,
                  expert_layout: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The full (single-rank) tensor of canonical parameter ``name``, built from HF tensors via ``get``."""
    t, v = cfg.text, cfg.vision
    if name == "embedding.word_embeddings.weight":
        return get(HF_LM + "embed_tokens.weight")
    if name == "output_layer.weight":
        return get(HF_LM + "embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight")
    if name == "decoder.final_layernorm.weight":
        return get(HF_LM + "norm.weight")
    if name.startswith("vision."):
        rest = name[len("vision."):]
        if rest.startswith("patch_embed."):
            return get(HF_VIS + "patch_embed.proj." + rest.split(".", 1)[1])
        if rest.startswith(("pos_embed.", "merger.", "deepstack_merger_list.")):
            return get(HF_VIS + rest)
        m = re.match(r"^layers\.(\d+)\.(.+)\.(weight|bias)$", rest)
        if m and m.group(2) in _VISION_LAYER_MAP:
            tensor = get(f"{HF_VIS}blocks.{m.group(1)}.{_VISION_LAYER_MAP[m.group(2)]}.{m.group(3)}")
            if m.group(2) == "self_attention.linear_qkv":
                tensor = _vision_qkv_to_megatron(tensor, v.num_heads)
            return tensor
        raise KeyError(f"no HF tensor for {name!r}")
    m = _DECODER_LAYER.match(name)
    if not m:
        raise KeyError(f"no HF tensor for {name!r}")
    layer, rest = int(m.group(1)), m.group(2)
    prefix = f"{HF_LM}layers.{layer}."
    if rest in _TEXT_LAYER_MAP:
        return get(prefix + _TEXT_LAYER_MAP[rest])
    if rest == "self_attention.linear_qkv.weight":
        return _interleave_qkv(get(prefix + "self_attn.q_proj.weight"), get(prefix + "self_attn.k_proj.weight"),
                               get(prefix + "self_attn.v_proj.weight"), t.num_key_value_heads)
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([get(prefix + "mlp.gate_proj.weight"), get(prefix + "mlp.up_proj.weight")], dim=0)
    m = re.match(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$", rest)
    if m:
        hf = prefix + ("mlp.experts.gate_up_proj" if m.group(2) == "linear_fc1" else "mlp.experts.down_proj")
        stored = get(hf)
        layout = expert_layout or (lambda _n, x: x)
        return layout(hf, stored)[int(m.group(1))]
    raise KeyError(f"no HF tensor for {name!r}")


def _is_swiglu_fc1(name: str) -> bool:
    return name.startswith("decoder.") and name.endswith("linear_fc1.weight")


def _expert_param(name: str) -> bool:
    return ".mlp.experts." in name


def _split_dim(full_shape: tuple[int, ...], param: torch.Tensor, size: int) -> int | None:
    """The dimension along which a tensor of ``full_shape`` is split over ``size`` ranks to give
    ``param``: the one dimension where ``param`` holds ``1/size`` of it; None when ``param`` has the
    full shape (nothing to split). Only when the shapes cannot tell (another rank count, several
    candidate dimensions) does ``param.partition_dim`` decide.

    The shapes decide first because ``partition_dim`` is not always right: transformer-engine marks
    every weight of a grouped expert linear with ``partition_dim = 0`` when Megatron passes it
    ``parallel_mode=None`` (explicit expert communication), although ``linear_fc2`` is split along its
    input, dim 1.
    """
    full_shape = tuple(full_shape)
    if full_shape == tuple(param.shape):
        return None
    if len(full_shape) == param.dim():
        split = [d for d, (f, p) in enumerate(zip(full_shape, param.shape)) if f != p]
        if len(split) == 1 and full_shape[split[0]] == param.shape[split[0]] * size:
            return split[0]
    return param.partition_dim


def local_shard(name: str, full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of canonical tensor ``full`` for parameter ``param`` (tensor-parallel slicing;
    expert parameters use the expert-tensor-parallel group; the dimension: :func:`_split_dim`)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    if _expert_param(name):
        size = parallel_state.get_expert_tensor_parallel_world_size()
        rank = parallel_state.get_expert_tensor_parallel_rank()
    else:
        size = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
    if size == 1:
        return full
    dim = _split_dim(full.shape, param, size)
    if dim is None:
        return full
    if _is_swiglu_fc1(name):  # [gate; up], each split over the ranks (Megatron's SwiGLU sharding)
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return full.chunk(size, dim=dim)[rank]


def _offsets(model) -> tuple[int, int]:
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    layer_offset = get_transformer_layer_offset(model.config, model.vp_stage)
    local_experts = model.cfg.text.num_experts // max(parallel_state.get_expert_model_parallel_world_size(), 1)
    expert_offset = parallel_state.get_expert_model_parallel_rank() * local_experts if model.cfg.is_moe else 0
    return layer_offset, expert_offset


def hf_shards(model, get: Callable[[str], torch.Tensor], progress: bool = False
              ) -> Iterator[tuple[str, str, torch.nn.Parameter, torch.Tensor]]:
    """For each parameter of this rank's ``model``: (local name, canonical name, the parameter, this
    rank's part of the HF tensor(s) behind it, read with ``get(hf_name)``).

    ``get`` serves HF-named tensors of the full model: a checkpoint's weights (:func:`load_hf_weights`),
    or e.g. the reference model's gradients to compare with ours in any parallel layout. Raises
    ``ValueError`` when a part's shape differs from the parameter's.
    """
    cfg = model.cfg
    layout = _experts_in_memory_layout(cfg) if cfg.is_moe else None
    layer_offset, expert_offset = _offsets(model)
    params = list(model.named_parameters())
    if progress:
        from tqdm import tqdm

        params = tqdm(params, desc="hf->mcore", unit="tensor")
    for local, param in params:
        name = canonical_name(local, layer_offset, expert_offset)
        shard = local_shard(name, hf_tensor_for(name, get, cfg, layout), param)
        if shard.shape != param.shape:
            raise ValueError(f"{local} ({name}): checkpoint gives {tuple(shard.shape)}, model has {tuple(param.shape)}")
        yield local, name, param, shard


@torch.no_grad()
def load_hf_weights(model, reader: HFCheckpointReader, progress: bool = False) -> int:
    """Copy the HF checkpoint into this rank's ``model`` (a :class:`model.qwen3vl.Qwen3VLModel`), exactly.

    Every parameter must be found (a missing tensor raises ``KeyError`` naming it; a shape mismatch
    raises ``ValueError``). Returns the number of parameters set.
    """
    count = 0
    for _, _, param, shard in hf_shards(model, reader.get, progress=progress):
        param.copy_(shard)
        count += 1
    return count


def refuse_unused_tensors(reader: HFCheckpointReader, cfg: Qwen3VLConfig) -> None:
    """Raise ``ValueError`` (on every rank) when a tensor of ``reader``'s checkpoint was read by no rank:
    its ``config.json`` then describes a smaller model (e.g. fewer layers) and the conversion would drop
    weights silently. ``lm_head.weight`` may be left when the embeddings are tied (the output layer is the
    embedding). Collective over all ranks, after each has loaded its part (:func:`load_hf_weights`).
    """
    import torch.distributed as dist

    read = set(reader.read)
    if dist.is_initialized() and dist.get_world_size() > 1:
        # Each rank reads only its stage's and its experts' tensors; together they must cover all.
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(read))
        read = read.union(*gathered)
    allowed = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unused = sorted(set(reader.keys()) - read - allowed)
    if unused:
        more = f" (and {len(unused) - 3} more)" if len(unused) > 3 else ""
        raise ValueError(f"{reader.path}: {len(unused)} tensor(s) have no place in the model its config.json "
                         f"describes: {', '.join(unused[:3])}{more}; does config.json belong to these weights?")


# ----------------------------------------------------------------------------------------------------
# Export (single-rank model) -> HF published layout


@torch.no_grad()
def export_hf_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors of a single-rank ``model`` (tp = pp = ep = 1), published layout, grouped by layer."""
    if (parallel_state.get_tensor_model_parallel_world_size() != 1
            or parallel_state.get_pipeline_model_parallel_world_size() != 1
            or parallel_state.get_expert_model_parallel_world_size() != 1):
        raise RuntimeError("export_hf_tensors needs the model in the single-rank layout (tp = pp = ep = 1)")
    cfg = model.cfg
    t, v = cfg.text, cfg.vision
    state = {canonical_name(n): p.detach() for n, p in model.named_parameters()}

    yield HF_LM + "embed_tokens.weight", state["embedding.word_embeddings.weight"]
    yield from _export_vision(state, v)
    for layer in range(t.num_hidden_layers):
        prefix = f"decoder.layers.{layer}."
        hf = f"{HF_LM}layers.{layer}."
        for ours, theirs in _TEXT_LAYER_MAP.items():
            if prefix + ours in state:
                yield hf + theirs, state[prefix + ours]
        q_rows = t.num_attention_heads * t.head_dim
        kv_rows = t.num_key_value_heads * t.head_dim
        q, k, vv = _split_qkv(state[prefix + "self_attention.linear_qkv.weight"], t.num_key_value_heads,
                              q_rows, kv_rows)
        yield hf + "self_attn.q_proj.weight", q
        yield hf + "self_attn.k_proj.weight", k
        yield hf + "self_attn.v_proj.weight", vv
        if prefix + "mlp.linear_fc1.weight" in state:
            gate, up = state[prefix + "mlp.linear_fc1.weight"].chunk(2, dim=0)
            yield hf + "mlp.gate_proj.weight", gate
            yield hf + "mlp.up_proj.weight", up
        if prefix + "mlp.router.weight" in state:
            fc1 = [state[f"{prefix}mlp.experts.local_experts.{e}.linear_fc1.weight"] for e in range(t.num_experts)]
            fc2 = [state[f"{prefix}mlp.experts.local_experts.{e}.linear_fc2.weight"] for e in range(t.num_experts)]
            # Published layout: (E, H, 2I) and (E, I, H).
            yield hf + "mlp.experts.gate_up_proj", _published_expert_layout(torch.stack(fc1))
            yield hf + "mlp.experts.down_proj", _published_expert_layout(torch.stack(fc2))
    yield HF_LM + "norm.weight", state["decoder.final_layernorm.weight"]
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", state["output_layer.weight"]


def _export_vision(state: dict, v) -> Iterator[tuple[str, torch.Tensor]]:
    yield HF_VIS + "patch_embed.proj.weight", state["vision.patch_embed.weight"]
    yield HF_VIS + "patch_embed.proj.bias", state["vision.patch_embed.bias"]
    yield HF_VIS + "pos_embed.weight", state["vision.pos_embed.weight"]
    for i in range(v.depth):
        for ours, theirs in _VISION_LAYER_MAP.items():
            for kind in ("weight", "bias"):
                tensor = state[f"vision.layers.{i}.{ours}.{kind}"]
                if ours == "self_attention.linear_qkv":
                    tensor = _vision_qkv_to_hf(tensor, v.num_heads)
                yield f"{HF_VIS}blocks.{i}.{theirs}.{kind}", tensor
    for name in sorted(state):
        if name.startswith(("vision.merger.", "vision.deepstack_merger_list.")):
            yield HF_VIS + name[len("vision."):], state[name]


def write_hf_checkpoint(out_dir: str | os.PathLike, tensors: Iterator[tuple[str, torch.Tensor]],
                        config_dict: dict, extra_dir: str | os.PathLike | None = None,
                        max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write ``config.json`` and safetensors shards (+ index when several) to ``out_dir`` atomically:
    everything goes to ``out_dir.tmp-<pid>`` first, which is renamed when complete. Files of
    ``extra_dir`` (tokenizer, processor configs) are copied alongside."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new output directory")
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / file), metadata={"format": "pt"})
            for name, tensor in shard.items():
                weight_map[name] = file
                total += tensor.numel() * tensor.element_size()
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if extra_dir is not None and Path(extra_dir).is_dir():
        for f in Path(extra_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    (tmp / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    os.replace(tmp, out)
    return out
