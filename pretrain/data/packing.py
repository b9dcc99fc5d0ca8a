"""Sequence packing: which samples share a packed sequence, how over-long samples are cut, and the pack itself.

Three pure functions, no energon and no I/O (the task encoder calls them, tests call them directly):

* :func:`fit_sample` makes one :class:`EncodedSample` fit a pack: a sample longer than ``seq_length``
  tokens, or with more visual patches than ``max_visual_patches``, is truncated at a *safe boundary*
  (never inside an image or inside one temporal frame group of a video) or dropped, per
  :attr:`PackingConfig.overlong`.
* :func:`first_fit_decreasing` groups sample sizes into packs (first-fit decreasing over a buffer, with a
  token capacity and an optional visual-patch capacity).
* :func:`pack_documents` concatenates the documents of one pack into a :class:`PackedSequence` of exactly
  ``seq_length`` tokens, shifting labels to next-token targets *inside* each document and padding the end.

Label convention of a pack (Megatron's): ``labels[i]`` is the token the model must predict at position
``i``, i.e. the next token of the same document. :class:`EncodedSample` labels are Hugging Face style
(``labels[i]`` is token ``i`` when it is a target, predicted from position ``i - 1``), so inside each
document ``labels[i] = hf_labels[i + 1]``; the last position of a document and padding have no target
(``loss_mask`` 0, ``labels`` = ``pad_id``, a valid id because Megatron's cross entropy indexes with it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from common.media import resize
from pretrain.data.sample import IGNORE_INDEX, EncodedSample

OVERLONG_POLICIES = ("truncate", "drop")
IMAGE, VIDEO = 1, 2  # mm_token_type_ids values (common.tokens.positions)


@dataclass(frozen=True)
class PackingConfig:
    """How samples are packed.

    seq_length: tokens per packed sequence.
    max_visual_patches: bound on the ViT patches (images + videos, before the 2x2 merge) of one pack,
        which bounds the vision encoder's activation memory per pack; None = no bound.
    overlong: what happens to a sample that cannot fit one pack (too many tokens or patches):
        "truncate" keeps its longest prefix that ends at a safe boundary and still has a target,
        "drop" drops it. Either way it is counted.
    merge_size: ViT patches merged per side into one LLM token (Qwen3-VL: 2).
    """

    seq_length: int
    max_visual_patches: int | None = None
    overlong: str = "truncate"
    merge_size: int = resize.MERGE_SIZE

    def __post_init__(self):
        if self.seq_length < 2:
            raise ValueError(f"PackingConfig.seq_length must be at least 2 tokens, got {self.seq_length}")
        if self.max_visual_patches is not None and self.max_visual_patches < 0:
            raise ValueError(f"PackingConfig.max_visual_patches must be >= 0 or None, got {self.max_visual_patches}")
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"PackingConfig.overlong must be one of {OVERLONG_POLICIES}, got {self.overlong!r}")


# ------------------------------------------------------------------------------------------------------
# Over-long samples
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _VisualUnit:
    """One indivisible visual span: ``<|vision_start|>`` pads ``<|vision_end|>`` of an image or of one
    video frame group. Token range ``[start, end)``; ``media`` indexes image_grid_thw / video_grid_thw."""

    start: int
    end: int
    kind: int  # IMAGE or VIDEO
    media: int
    patches: int


def _visual_units(sample: EncodedSample, merge_size: int) -> list[_VisualUnit]:
    """The visual spans of a sample in token order, checked against its grids."""
    types = sample.mm_token_type_ids
    visual = (types != 0).to(torch.int8)
    edges = torch.diff(visual, prepend=visual.new_zeros(1), append=visual.new_zeros(1))
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    merge = merge_size * merge_size
    images = sample.image_grid_thw.tolist()
    videos = sample.video_grid_thw.tolist()
    units: list[_VisualUnit] = []
    image_i = video_i = group_i = 0
    for start, end in zip(starts, ends):
        kind = int(types[start])
        if not bool((types[start:end] == kind).all()):
            raise ValueError(f"sample {sample.sample_id}: image and video placeholders touch at token {start}")
        if kind == IMAGE:
            if image_i >= len(images):
                raise ValueError(f"sample {sample.sample_id}: more image spans than image_grid_thw rows")
            t, h, w = images[image_i]
            patches, media = t * h * w, image_i
            image_i += 1
        else:
            if video_i >= len(videos):
                raise ValueError(f"sample {sample.sample_id}: more video spans than video_grid_thw groups")
            t, h, w = videos[video_i]
            patches, media = h * w, video_i
            group_i += 1
            if group_i == t:
                video_i, group_i = video_i + 1, 0
        if (end - start) * merge != patches:
            raise ValueError(
                f"sample {sample.sample_id}: visual span at token {start} has {end - start} placeholders, "
                f"grid says {patches // merge}"
            )
        # The span includes its <|vision_start|> and <|vision_end|> markers.
        units.append(_VisualUnit(start - 1, end + 1, kind, media, patches))
    if image_i != len(images) or video_i != len(videos) or group_i != 0:
        raise ValueError(f"sample {sample.sample_id}: visual spans do not match image_grid_thw / video_grid_thw")
    return units


def _prefix(sample: EncodedSample, length: int, units: list[_VisualUnit]) -> EncodedSample:
    """The first ``length`` tokens of ``sample`` (``length`` on a safe boundary), with its media cut to match.

    MRoPE positions of a prefix do not depend on what follows, so they are sliced as they are.
    """
    kept = [u for u in units if u.end <= length]
    image_rows = sample.image_grid_thw[: sum(1 for u in kept if u.kind == IMAGE)]
    video_groups: dict[int, int] = {}
    for u in kept:
        if u.kind == VIDEO:
            video_groups[u.media] = video_groups.get(u.media, 0) + 1
    video_rows = sample.video_grid_thw[: len(video_groups)].clone()
    for media, groups in video_groups.items():
        video_rows[media, 0] = groups  # a video cut between frame groups keeps its first groups
    # Patches are ordered media by media, and inside a video time group first (vision_inputs.patchify).
    image_patches = int(image_rows.prod(-1).sum()) if len(image_rows) else 0
    video_pixel_rows = []
    offset = 0
    for media, (t, h, w) in enumerate(sample.video_grid_thw.tolist()):
        if media in video_groups:
            video_pixel_rows.append(sample.pixel_values_videos[offset : offset + video_groups[media] * h * w])
        offset += t * h * w
    pixel_values_videos = (
        torch.cat(video_pixel_rows) if video_pixel_rows else sample.pixel_values_videos[:0]
    )
    return EncodedSample(
        input_ids=sample.input_ids[:length],
        labels=sample.labels[:length],
        position_ids=sample.position_ids[:, :length],
        mm_token_type_ids=sample.mm_token_type_ids[:length],
        pixel_values=sample.pixel_values[:image_patches],
        image_grid_thw=image_rows,
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_rows,
        kind=sample.kind,
        sample_id=sample.sample_id,
    )


def safe_prefix_length(
    sample: EncodedSample, max_tokens: int, max_patches: int | None, merge_size: int = resize.MERGE_SIZE
) -> int:
    """Longest prefix length <= ``max_tokens`` that ends outside every visual span and whose visual
    patches total at most ``max_patches`` (None: no bound). Returns ``sample.num_tokens`` when it fits.

    A visual span is ``<|vision_start|>`` pads ``<|vision_end|>`` of one image or of one video frame
    group, so a video may be cut between frame groups (it keeps its first groups); the ``<t seconds>``
    text announcing the first dropped group then ends the prefix.
    """
    units = _visual_units(sample, merge_size)
    length = min(sample.num_tokens, max_tokens)
    for unit in units:
        if unit.start < length < unit.end:
            length = unit.start
            break
    if max_patches is not None:
        total = 0
        for unit in units:
            if unit.end > length:
                break
            total += unit.patches
            if total > max_patches:
                length = unit.start
                break
    return length


@dataclass(frozen=True)
class FitResult:
    """Outcome of :func:`fit_sample`: the sample to pack (None when dropped) and what was done:
    "fits", "truncated" or "dropped" (with ``reason``)."""

    sample: EncodedSample | None
    action: str
    reason: str | None = None


def fit_sample(sample: EncodedSample, config: PackingConfig) -> FitResult:
    """Make ``sample`` fit one pack of ``config.seq_length`` tokens and ``config.max_visual_patches``.

    A sample that fits is returned unchanged. Otherwise, with ``overlong="truncate"``, its longest safe
    prefix (:func:`safe_prefix_length`) is kept if that prefix still has a prediction target; else, or
    with ``overlong="drop"``, it is dropped (reason "too_many_tokens" or "too_many_patches").
    """
    patches = sample.num_image_patches + sample.num_video_patches
    too_long = sample.num_tokens > config.seq_length
    too_many = config.max_visual_patches is not None and patches > config.max_visual_patches
    if not (too_long or too_many):
        return FitResult(sample, "fits")
    reason = "too_many_tokens" if too_long else "too_many_patches"
    if config.overlong == "drop":
        return FitResult(None, "dropped", reason)
    length = safe_prefix_length(sample, config.seq_length, config.max_visual_patches, config.merge_size)
    # labels are HF-style: a target at token i is predicted inside the prefix only if i < length.
    if length < 2 or not bool((sample.labels[1:length] != IGNORE_INDEX).any()):
        return FitResult(None, "dropped", reason)
    return FitResult(_prefix(sample, length, _visual_units(sample, config.merge_size)), "truncated", reason)


# ------------------------------------------------------------------------------------------------------
# Selecting packs
# ------------------------------------------------------------------------------------------------------


def first_fit_decreasing(
    tokens: Sequence[int], patches: Sequence[int], token_capacity: int, patch_capacity: int | None = None
) -> list[list[int]]:
    """Group items into bins: first-fit decreasing by token count.

    Items are taken largest first (ties: earlier first) and put in the first bin (in creation order)
    with room for both their tokens and their patches; otherwise a new bin is opened. Returns the bins
    as lists of item indices, each sorted ascending (stream order inside a pack), bins in creation order.
    Every item must fit an empty bin (see :func:`fit_sample`); zero-token items go to the first bin.
    """
    if len(tokens) != len(patches):
        raise ValueError(f"{len(tokens)} token counts but {len(patches)} patch counts")
    for i, (t, p) in enumerate(zip(tokens, patches)):
        if t > token_capacity or (patch_capacity is not None and p > patch_capacity):
            raise ValueError(
                f"item {i} ({t} tokens, {p} patches) exceeds a bin ({token_capacity} tokens, {patch_capacity} patches)"
            )
    order = sorted(range(len(tokens)), key=lambda i: (-tokens[i], i))
    room_tokens: list[int] = []
    room_patches: list[float] = []
    bins: list[list[int]] = []
    for i in order:
        for b in range(len(bins)):
            if tokens[i] <= room_tokens[b] and patches[i] <= room_patches[b]:
                bins[b].append(i)
                room_tokens[b] -= tokens[i]
                room_patches[b] -= patches[i]
                break
        else:
            bins.append([i])
            room_tokens.append(token_capacity - tokens[i])
            room_patches.append((float("inf") if patch_capacity is None else patch_capacity) - patches[i])
    return [sorted(b) for b in bins]


# ------------------------------------------------------------------------------------------------------
# Building a pack
# ------------------------------------------------------------------------------------------------------


@dataclass
class PackedSequence:
    """One packed sequence of ``seq_length`` tokens: documents back to back, then padding. S = seq_length.

    tokens, labels, loss_mask (float 0/1), document_ids (0, 1, ... per document, -1 padding),
    mm_token_type_ids: [S]; position_ids: int64 [3, S], restarting at 0 in every document (padding: 0).
    pixel_values / image_grid_thw / pixel_values_videos / video_grid_thw: the documents' media
    concatenated in token order. doc_lengths, doc_kinds, doc_sources, doc_ids: per document.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    document_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    doc_lengths: list[int] = field(default_factory=list)
    doc_kinds: list[str] = field(default_factory=list)
    doc_sources: list[str] = field(default_factory=list)
    doc_ids: list[str] = field(default_factory=list)

    @property
    def seq_length(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_real_tokens(self) -> int:
        return sum(self.doc_lengths)


def next_token_labels(hf_labels: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style labels of ONE document -> (Megatron labels, loss_mask): ``labels[i] = hf_labels[i + 1]``.

    The last position predicts nothing (the next document is not its continuation).
    """
    targets = torch.full_like(hf_labels, IGNORE_INDEX)
    targets[:-1] = hf_labels[1:]
    mask = targets != IGNORE_INDEX
    return torch.where(mask, targets, torch.full_like(targets, pad_id)), mask.to(torch.float32)


def pack_documents(
    documents: Sequence[EncodedSample],
    seq_length: int,
    pad_id: int,
    sources: Sequence[str] | None = None,
    patch_dim: int | None = None,
    doc_ids: Sequence[str] | None = None,
) -> PackedSequence:
    """Concatenate ``documents`` (in the given order) into one :class:`PackedSequence` of ``seq_length``.

    ``sources`` names each document's data source (for counters); ``doc_ids`` identifies each document
    in logs (default: its ``sample_id``). ``patch_dim`` (columns of pixel
    values) is needed only when no document carries media and there is none to copy it from: then the
    empty media tensors get shape ``[0, patch_dim]`` (default 1536).
    """
    total = sum(d.num_tokens for d in documents)
    if total > seq_length:
        raise ValueError(f"documents hold {total} tokens, more than seq_length={seq_length}")
    sources = list(sources) if sources is not None else [""] * len(documents)
    if len(sources) != len(documents):
        raise ValueError(f"{len(sources)} source names for {len(documents)} documents")
    tokens = torch.full((seq_length,), pad_id, dtype=torch.int64)
    labels = torch.full((seq_length,), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros(seq_length, dtype=torch.float32)
    position_ids = torch.zeros((3, seq_length), dtype=torch.int64)
    document_ids = torch.full((seq_length,), -1, dtype=torch.int64)
    types = torch.zeros(seq_length, dtype=torch.int64)
    offset = 0
    for index, doc in enumerate(documents):
        end = offset + doc.num_tokens
        tokens[offset:end] = doc.input_ids
        labels[offset:end], loss_mask[offset:end] = next_token_labels(doc.labels, pad_id)
        position_ids[:, offset:end] = doc.position_ids
        document_ids[offset:end] = index
        types[offset:end] = doc.mm_token_type_ids
        offset = end

    width = patch_dim or next(
        (t.shape[1] for d in documents for t in (d.pixel_values, d.pixel_values_videos)), 3 * 2 * 16 * 16
    )

    def cat(items: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.cat(items) if items else torch.zeros(shape, dtype=dtype)

    return PackedSequence(
        tokens=tokens,
        labels=labels,
        loss_mask=loss_mask,
        position_ids=position_ids,
        document_ids=document_ids,
        mm_token_type_ids=types,
        pixel_values=cat([d.pixel_values for d in documents], (0, width), torch.float32),
        image_grid_thw=cat([d.image_grid_thw for d in documents], (0, 3), torch.int64),
        pixel_values_videos=cat([d.pixel_values_videos for d in documents], (0, width), torch.float32),
        video_grid_thw=cat([d.video_grid_thw for d in documents], (0, 3), torch.int64),
        doc_lengths=[d.num_tokens for d in documents],
        doc_kinds=[d.kind for d in documents],
        doc_sources=sources,
        doc_ids=list(doc_ids) if doc_ids is not None else [d.sample_id or "" for d in documents],
    )
