"""The full Qwen3-VL model (dense or MoE) on Megatron-Core: vision encoder, token embedding with the visual
embeddings placed at the image / video pad tokens, DeepStack injection, Qwen3 decoder with interleaved
MRoPE, LM head and per-token loss.

Build it with :func:`build_qwen3vl`; its ``forward`` contract::

    model(input_ids [b, s] int64,
          position_ids [3, b, s] int64 (t, h, w; common.tokens.positions) or [b, s] for text,
          document_ids=None,             # [b, s] int: packed documents (runs of equal ids), causal
                                         # within each; None: one document per row
          labels=None,                   # [b, s] int64 -> per-token losses [b, s / cp] (float32)
          pixel_values=None, image_grid_thw=None,          # (patches, 1536) float, (n_images, 3)
          pixel_values_videos=None, video_grid_thw=None,   # (patches, 1536) float, (n_videos, 3)
          packed_seq_params=None,        # transformer-engine THD path (b == 1, cu_seqlens)
          attention_mask=None,           # dense_mask backend only: bool [b, 1, s, s], True = masked
          padding_mask=None)             # bool [b, s], True = a pack's padding tail (MoE: see below)
      -> logits [b, s / cp, vocab] (vocab split over tensor-parallel ranks unless parallel_output=False)
         or, with labels, per-token losses [b, s / cp].

Padding (``padding_mask``): a pack's padding tokens still run through every layer (the shapes are
static), but MoE routers leave them out of their statistics: the load-balancing and z losses and the
tokens counted per expert are those of the real tokens only (Megatron's router ``padding_mask``). All
padding tokens are the same token at the same position, so they would all pick the same experts and
the auxiliary loss would push the router against those experts for real tokens as well; they are
dispatched spread evenly over the experts, with weight 0 (:mod:`model.moe_padding`).

Inputs always hold the full sequence ``s``. On a pipeline stage other than the last it returns the hidden
states to send on. Parallel layouts: tensor (``tp``), pipeline (``pp``, with the vision encoder on the
first stage), expert (``ep``/``etp``), sequence parallelism and context parallelism (``cp``).

Generation with a KV cache (``kv_cache=``, a :class:`model.kv_cache.KVCache`, in ``eval()`` mode): the
model hands the cache to its decoder layers' attention for the length of the forward. The prefill runs the
prompts packed into one row (``input_ids`` [1, L], ``document_ids`` numbering the prompts, each prompt's
own positions; the cache's ``decoding`` False) and every layer stores their keys and values; it returns
each prompt's last-token logits ([P, 1, vocab]). A decoding step feeds one new token per held row
(``input_ids`` [b, 1], ``position_ids`` [3, b, 1] of the new tokens only: cached keys are stored rotated;
no ``document_ids``) and each layer attends over the row's prompt and response in the cache; it returns
[b, 1, vocab]. The caller advances the cache. This path needs the ``document`` attention backend, no
sequence parallelism and cp = 1 (see ``pretrain.posttrain.rollout``, which arranges that for the length
of a generation).

Context parallelism: the CP ranks share the vision encoder's work (each image and video frame is
encoded by one rank, the features all-gathered) and every rank embeds the whole sequence; then the
embedded sequence, the DeepStack features, the rotary angles (from the 3-axis position ids) and the
labels are cut the same way (:mod:`model.context_parallel`), and attention all-gathers keys and values
inside the CP group (:mod:`model.attention`). The cut is per document (each is split into ``2 * cp``
chunks, Megatron's load-balanced pairing), so it depends on ``document_ids``. Outputs are this rank's
tokens, in sequence order; ``model.context_parallel.split_on_this_rank(t, dim, document_ids)`` cuts
loss weights to match and ``gather_on_this_rank(t, dim, document_ids)`` puts logits back together.

DeepStack across pipeline stages: the features for the decoder layers of later stages travel with the
hidden states, concatenated along the hidden dimension (``[s, b, h * (1 + n)]``); the builder switches on
Megatron's ``variable_seq_lengths`` so that the schedule sends tensors of that shape. Any split is
therefore legal; the cost is the extra activation traffic when a DeepStack layer lies beyond stage 0.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.transformer_block import TransformerBlock, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from common.megatron_fixes import apply_megatron_fixes
from model.config import ConfigError, Qwen3VLConfig
from model.text_config import runtime_settings
from model.context_parallel import cp_size_and_rank, encode_over_cp, split_sequence
from model.attention import thd_packed_seq_params
from model.kv_cache import KVCache
from model.layer_specs import qwen3vl_decoder_block_spec, resolve_attention_backend
from model.moe_padding import register_padding_spread
from model.rope import InterleavedMRoPE
from model.vision.vision_model import Qwen3VLVisionModel

FREEZABLE = ("vision", "merger", "language")


def part_of(name: str) -> str:
    """The part of :data:`FREEZABLE` that parameter ``name`` of :class:`Qwen3VLModel` belongs to."""
    if name.startswith("vision."):
        return "merger" if name.startswith(("vision.merger.", "vision.deepstack_merger_list.")) else "vision"
    return "language"


# ----------------------------------------------------------------------------------------------------
# Megatron-Core configs


def language_transformer_config(
    cfg: Qwen3VLConfig,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    **overrides,
) -> TransformerConfig:
    """The decoder's ``TransformerConfig`` in the initialised parallel state (see ``Qwen3TextConfig``)."""
    t = cfg.text
    extra = {}
    pattern = t.moe_layer_pattern()
    if t.is_moe and not all(pattern):
        extra["moe_layer_freq"] = pattern
    config = t.transformer_config(params_dtype=params_dtype, sequence_parallel=sequence_parallel,
                                  **extra, **overrides)
    if cfg.num_deepstack and config.pipeline_model_parallel_size > 1:
        first = get_num_layers_to_build(config, vp_stage=0 if config.virtual_pipeline_model_parallel_size else None,
                                        pp_rank=0)
        if first < cfg.num_deepstack and not config.variable_seq_lengths:
            # DeepStack features ride with the hidden states to later stages (see the module docstring).
            config.variable_seq_lengths = True
    return config


def vision_transformer_config(cfg: Qwen3VLConfig, params_dtype: torch.dtype = torch.float32,
                              **overrides) -> TransformerConfig:
    """The ViT's ``TransformerConfig``: LayerNorm, biases, GELU(tanh), tensor parallel, never pipelined
    nor sequence parallel."""
    v = cfg.vision
    tp = parallel_state.get_tensor_model_parallel_world_size()
    kwargs = dict(
        num_layers=v.depth,
        hidden_size=v.hidden_size,
        ffn_hidden_size=v.intermediate_size,
        num_attention_heads=v.num_heads,
        num_query_groups=v.num_heads,
        kv_channels=v.head_dim,
        normalization="LayerNorm",
        layernorm_epsilon=v.layer_norm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=partial(F.gelu, approximate="tanh"),
        **runtime_settings(params_dtype),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------
# Decoder block with DeepStack


class Qwen3VLDecoderBlock(TransformerBlock):
    """Megatron's ``TransformerBlock`` whose layers add DeepStack features (``DeepStackTransformerLayer``).

    ``context`` ``[n, s, b, h]`` holds the features of the global decoder layers ``offset .. offset+n-1``
    (``offset`` = this stage's first layer). Between pipeline stages they are concatenated to the hidden
    states along the last dimension.
    """

    def __init__(self, *args, num_deepstack: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_deepstack = num_deepstack
        self.layer_offset = get_transformer_layer_offset(self.config, self.vp_stage)
        for layer in self.layers:
            index = layer.layer_number - 1  # global, 0-based
            layer.deepstack_slot = index - self.layer_offset if index < num_deepstack else None
        # Features for the layers of later stages, passed on with the hidden states.
        self.deepstack_out = max(0, num_deepstack - self.layer_offset - len(self.layers))

    def forward(self, hidden_states, attention_mask, context=None, **kwargs):
        if not self.pre_process:
            received = self.input_tensor
            h = self.config.hidden_size
            extra = received.shape[-1] // h - 1
            if extra > 0:
                s, b = received.shape[:2]
                context = received[..., h:].reshape(s, b, extra, h).permute(2, 0, 1, 3).contiguous()
                self.input_tensor = received[..., :h].contiguous()
            out = super().forward(hidden_states, attention_mask, context=context, **kwargs)
            self.input_tensor = received
        else:
            out = super().forward(hidden_states, attention_mask, context=context, **kwargs)
        if self.deepstack_out and context is not None:
            rest = context[context.shape[0] - self.deepstack_out:]
            out = torch.cat([out, rest.permute(1, 2, 0, 3).reshape(*out.shape[:2], -1)], dim=-1)
        return out


# ----------------------------------------------------------------------------------------------------
# The model


class Qwen3VLModel(LanguageModule):
    """Qwen3-VL on one pipeline stage (see the module docstring for the forward contract)."""

    def __init__(
        self,
        cfg: Qwen3VLConfig,
        config: TransformerConfig,
        vision_config: TransformerConfig | None,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        vp_stage: int | None = None,
        attention: str = "document",
    ):
        super().__init__(config=config)
        self.cfg = cfg
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's pipeline schedules
        self.pre_process = pre_process
        self.post_process = post_process
        self.parallel_output = parallel_output
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = cfg.tie_word_embeddings
        self.attention = attention  # a backend of model.layer_specs.ATTENTION_BACKENDS
        t = cfg.text

        if pre_process:
            self.vision = Qwen3VLVisionModel(cfg.vision, vision_config, attention=attention)
            # Visual embeddings replace the image/video pad tokens before the sequence is split over
            # tensor-parallel ranks, so the embedding does not scatter; forward does.
            self.embedding = LanguageModelEmbedding(config=config, vocab_size=t.vocab_size,
                                                    max_sequence_length=t.max_position_embeddings,
                                                    position_embedding_type="none",
                                                    scatter_to_sequence_parallel=False)
        self.rotary_pos_emb = InterleavedMRoPE(t.head_dim, t.rope_theta, t.mrope_section)
        self.decoder = Qwen3VLDecoderBlock(
            config=config,
            spec=qwen3vl_decoder_block_spec(config, t.moe_layer_pattern(), attention, vp_stage=vp_stage),
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
            num_deepstack=cfg.num_deepstack,
        )
        if t.is_moe:
            register_padding_spread(self.decoder)
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, t.vocab_size, config=config, init_method=config.init_method, bias=False,
                skip_bias_add=False, gather_output=not parallel_output,
                skip_weight_param_allocation=pre_process and self.share_embeddings_and_output_weights,
            )
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    # -- pipeline plumbing

    def set_input_tensor(self, input_tensor) -> None:
        if not isinstance(input_tensor, list):
            input_tensor = [input_tensor]
        assert len(input_tensor) == 1, "Qwen3-VL takes one input tensor per stage"
        self.decoder.set_input_tensor(input_tensor[0])

    # -- freezing

    def freeze(self, parts: Iterable[str]) -> None:
        """Stop gradients of ``parts``: ``vision`` (patch embedding, positions, ViT layers), ``merger``
        (the patch merger and the DeepStack mergers) and ``language`` (embedding, decoder, LM head)."""
        parts = set(parts)
        unknown = sorted(parts - set(FREEZABLE))
        if unknown:
            raise ValueError(f"unknown freeze part(s) {unknown}; known: {list(FREEZABLE)}")
        for name, param in self.named_parameters():
            if part_of(name) in parts:
                param.requires_grad_(False)

    # -- forward

    def visual_embeddings(self, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                          image_index=None, video_index=None):
        """Run the ViT on this micro-batch's images and videos.

        ``image_index`` / ``video_index`` (optional, int [n]): the pad-token groups of the batch, in
        row-major order, take the features of image (video) ``index[k]`` of ``pixel_values`` (``_videos``):
        an image shared by several rows (the G responses of one prompt in RL) runs through the ViT once,
        and its gradient sums over the rows. Without an index each image fills one group, in order.
        Returns (embeds ``[b, s, h]`` with visual features at pad tokens and zeros elsewhere, mask
        ``[b, s]`` of visual tokens, DeepStack features ``[n, b, s, h]`` or None); None when no media.
        """
        cfg = self.cfg
        parts = []
        for kind, pixels, grid, token, index in (
                ("image", pixel_values, image_grid_thw, cfg.image_token_id, image_index),
                ("video", pixel_values_videos, video_grid_thw, cfg.video_token_id, video_index)):
            if pixels is None:
                continue
            if grid is None:
                raise ValueError(f"{kind} pixel values given without their {kind}_grid_thw")
            mask = input_ids == token
            # With context parallelism each image or frame is encoded by one rank of the group and the
            # features gathered (model.context_parallel.encode_over_cp); at cp = 1 the ViT runs on all.
            embeds, deep = encode_over_cp(self.vision, pixels, grid, cfg.vision.spatial_merge_size,
                                          cfg.vision.out_hidden_size, cfg.num_deepstack)
            if index is not None:
                tokens = (torch.as_tensor(grid).prod(dim=-1) // cfg.vision.spatial_merge_size ** 2).tolist()
                order = torch.as_tensor(index).tolist()
                embeds = torch.cat([embeds.split(tokens)[i] for i in order])
                deep = [torch.cat([f.split(tokens)[i] for i in order]) for f in deep]
            if int(mask.sum()) != embeds.shape[0]:
                raise ValueError(f"{int(mask.sum())} {kind} pad tokens (id {token}) in input_ids but the "
                                 f"{kind}s give {embeds.shape[0]} embeddings (grid_thw {torch.as_tensor(grid).tolist()})")
            parts.append((mask, embeds, deep))
        if not parts:
            return None
        b, s = input_ids.shape
        h = cfg.text.hidden_size
        dtype = parts[0][1].dtype
        dense = torch.zeros(b, s, h, dtype=dtype, device=input_ids.device)
        deep = [torch.zeros(b, s, h, dtype=dtype, device=input_ids.device) for _ in range(cfg.num_deepstack)]
        visual_mask = torch.zeros(b, s, dtype=torch.bool, device=input_ids.device)
        for mask, embeds, feats in parts:
            m = mask[..., None]
            dense = dense.masked_scatter(m, embeds)
            deep = [d.masked_scatter(m, f) for d, f in zip(deep, feats)]
            visual_mask = visual_mask | mask
        return dense, visual_mask, (torch.stack(deep) if deep else None)

    def _attention_input(self, document_ids, attention_mask, packed_seq_params, b: int, s: int):
        """What the decoder layers' attention takes: segment ids (``document``), a dense mask
        (``dense_mask``) or nothing (``te``: ``packed_seq_params`` carries the documents)."""
        if self.attention == "te":
            return None
        if packed_seq_params is not None:
            raise ValueError(f"packed_seq_params is for the 'te' attention backend; this model uses "
                             f"{self.attention!r}: pass document_ids")
        if document_ids is not None and tuple(document_ids.shape) != (b, s):
            raise ValueError(f"document_ids {tuple(document_ids.shape)} do not match input_ids {(b, s)}")
        if self.attention == "document":
            if attention_mask is not None:
                raise ValueError("the 'document' attention backend takes document_ids, not an attention_mask")
            return document_ids
        if attention_mask is None and document_ids is not None:
            attention_mask = dense_document_mask(document_ids)
        return attention_mask

    def _check_cache_path(self, labels, cp_size: int) -> None:
        """One-line errors for what the KV-cache path does not do."""
        if self.training:
            raise ValueError("the KV-cache path (kv_cache) is for generation: call model.eval() first")
        if labels is not None:
            raise ValueError("kv_cache and labels do not go together: the cache path "
                             "returns the last token's logits")
        if self.attention != "document":
            raise ValueError(f"the KV-cache path runs on the 'document' attention backend, this model uses "
                             f"{self.attention!r}")
        if self.config.sequence_parallel:
            raise ValueError("the KV-cache path runs without sequence parallelism (one new token per row "
                             "cannot be split over the tensor-parallel ranks): turn it off for generation")
        if cp_size > 1:
            raise ValueError(f"the KV-cache path runs with context parallelism 1, not cp={cp_size}")

    @contextmanager
    def _attention_with(self, kv_cache: KVCache | None) -> Iterator[None]:
        """The decoder layers' core attention uses ``kv_cache`` for the length of the block."""
        layers = self.decoder.layers if kv_cache is not None else []
        attentions = [layer.self_attention.core_attention for layer in layers]
        for attention in attentions:
            attention.kv_cache = kv_cache
        try:
            yield
        finally:
            for attention in attentions:
                attention.kv_cache = None

    def _router_padding(self, padding_mask, document_ids, b: int, s: int, cp_size: int, cp_rank: int):
        """The padding mask as the MoE routers take it: bool [b, tokens of this rank] (after the CP cut
        and the sequence-parallel split), True = padding; None for a dense decoder or without one."""
        if padding_mask is None or not self.cfg.text.is_moe:
            return None
        if tuple(padding_mask.shape) != (b, s):
            raise ValueError(f"padding_mask {tuple(padding_mask.shape)} must be [b, s] = {(b, s)} like input_ids")
        mask = split_sequence(padding_mask.to(torch.bool), 1, cp_size, cp_rank, document_ids, batch_dim=0)
        if self.config.sequence_parallel:
            mask = tensor_parallel.scatter_to_sequence_parallel_region(mask.t().contiguous()).t().contiguous()
        return mask

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        runtime_gather_output: bool | None = None,
        document_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        image_index: torch.Tensor | None = None,
        video_index: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, s = input_ids.shape
        cp_size, cp_rank = cp_size_and_rank()
        if cp_size > 1 and s % (2 * cp_size):
            raise ValueError(f"sequence length {s} is not divisible by 2*cp = {2 * cp_size} "
                             "(context parallelism cuts each sequence into 2*cp equal chunks)")
        if kv_cache is not None:
            self._check_cache_path(labels, cp_size)
        if position_ids is None:
            if pixel_values is not None or pixel_values_videos is not None:
                raise ValueError("position_ids [3, b, s] are required with images or videos "
                                 "(common.tokens.positions.mrope_position_ids)")
            if kv_cache is not None and kv_cache.decoding:
                raise ValueError("a decoding step with a KV cache needs the new tokens' position_ids [3, b, 1]")
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        rotary = self.rotary_pos_emb(position_ids.to(input_ids.device))
        if rotary.shape[0] != s or rotary.shape[1] != b:
            raise ValueError(f"position_ids {tuple(position_ids.shape)} do not match input_ids {(b, s)}")
        rotary = split_sequence(rotary, 0, cp_size, cp_rank, document_ids, batch_dim=1)
        if self.attention == "te" and packed_seq_params is None and document_ids is not None:
            # transformer-engine's attention sees documents only through THD parameters: without them a
            # pack would be one causal sequence (every row attending to the rows before it).
            packed_seq_params = thd_packed_seq_params(document_ids)
        attention_input = self._attention_input(document_ids, attention_mask, packed_seq_params, b, s)
        router_padding = self._router_padding(padding_mask, document_ids, b, s, cp_size, cp_rank)

        decoder_input, context = None, None
        if self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
            visual = self.visual_embeddings(input_ids, pixel_values, image_grid_thw,
                                            pixel_values_videos, video_grid_thw, image_index, video_index)
            if visual is not None:
                embeds, mask, deep = visual
                del visual  # with the names below: the full-sequence features are freed after the CP split
                # .contiguous(): torch.where takes the [b, s] memory order of the transposed mask; with
                # b > 1 the MoE router's .view() of the hidden states then fails.
                decoder_input = torch.where(mask.t()[..., None], embeds.transpose(0, 1).to(decoder_input.dtype),
                                            decoder_input).contiguous()
                if deep is not None:
                    context = deep.transpose(1, 2).to(decoder_input.dtype)  # [n, s, b, h]
                del embeds, deep
            # Context parallelism: this rank's tokens from here on (after the ViT and the embedding).
            decoder_input = split_sequence(decoder_input, 0, cp_size, cp_rank, document_ids, batch_dim=1)
            if context is not None:
                context = split_sequence(context, 1, cp_size, cp_rank, document_ids, batch_dim=2)
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
                if context is not None:
                    context = tensor_parallel.scatter_to_sequence_parallel_region(
                        context.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()

        with self._attention_with(kv_cache):
            hidden = self.decoder(hidden_states=decoder_input, attention_mask=attention_input, context=context,
                                  rotary_pos_emb=rotary, packed_seq_params=packed_seq_params,
                                  padding_mask=router_padding)
        if not self.post_process:
            return hidden
        if kv_cache is not None:
            hidden = kv_cache.last_tokens(hidden)  # generation needs the next tokens' logits only

        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        if labels is not None:
            # The vocabulary-parallel cross entropy needs the logits split over the vocabulary.
            logits, _ = self.output_layer(hidden, weight=weight, runtime_gather_output=False)
            labels = split_sequence(labels, 1, cp_size, cp_rank, document_ids, batch_dim=0)
            return self.compute_language_model_loss(labels, logits)
        logits, _ = self.output_layer(hidden, weight=weight, runtime_gather_output=runtime_gather_output)
        return logits.transpose(0, 1).contiguous()


def dense_document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """bool ``[b, 1, s, s]``, True = masked (the ``dense_mask`` backend): token ``i`` sees token ``j``
    iff ``j <= i`` and both have the same document id."""
    s = document_ids.shape[1]
    same = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    return (~(same & causal)).unsqueeze(1)


def build_qwen3vl(
    cfg: Qwen3VLConfig,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    freeze: Iterable[str] = (),
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    parallel_output: bool = True,
    attention: str | None = None,
    config_overrides: dict | None = None,
) -> Qwen3VLModel:
    """Qwen3-VL for this pipeline stage in the initialised Megatron parallel state.

    ``freeze``: parts whose parameters get no gradient (``vision``, ``merger``, ``language``).
    ``config_overrides``: extra ``TransformerConfig`` fields of the decoder (e.g. recomputation,
    ``moe_grouped_gemm``); the ViT takes the recomputation settings too.
    ``attention``: a backend of :data:`model.layer_specs.ATTENTION_BACKENDS`; default ``te`` when CUDA
    and transformer-engine are present and cp = 1, else ``document``.
    """
    apply_megatron_fixes()  # e.g. MoE routing without transformer-engine
    ps = parallel_state
    # Before Megatron's configs, whose own checks would say less.
    cfg.check_layout(ps.get_tensor_model_parallel_world_size(), ps.get_expert_model_parallel_world_size(),
                     ps.get_expert_tensor_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                     ps.get_virtual_pipeline_model_parallel_world_size())
    try:
        attention = resolve_attention_backend(attention, ps.get_context_parallel_world_size())
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    overrides = dict(config_overrides or {})
    if attention == "te":
        # The fused GPU path; bf16 numerics are set by params_dtype.
        overrides.setdefault("bias_activation_fusion", True)
        overrides.setdefault("masked_softmax_fusion", True)
        overrides.setdefault("bias_dropout_fusion", True)
        overrides.setdefault("moe_grouped_gemm", cfg.is_moe)
    if "moe_grouped_gemm" in overrides and not cfg.is_moe:
        overrides.pop("moe_grouped_gemm")
    config = language_transformer_config(cfg, params_dtype=params_dtype, sequence_parallel=sequence_parallel,
                                         **overrides)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    vision_config = None
    if pre_process:
        recompute = {k: overrides[k] for k in ("recompute_granularity", "recompute_method", "recompute_num_layers",
                                               "perform_initialization") if k in overrides}
        vision_config = vision_transformer_config(cfg, params_dtype=params_dtype, **recompute)
    model = Qwen3VLModel(cfg, config, vision_config, pre_process=pre_process, post_process=post_process,
                         parallel_output=parallel_output, vp_stage=vp_stage, attention=attention)
    if torch.cuda.is_available() and not config.use_cpu_initialization:
        # As Megatron-LM's get_model: its MoE router builds its weight on the CPU (router.py, moved only in
        # the first forward), where a frozen model or a non-distributed bf16 optimizer would meet it.
        model.cuda(torch.cuda.current_device())
    model.freeze(freeze)
    return model
