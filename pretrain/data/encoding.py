"""Text, conversations and media -> :class:`EncodedSample`, laid out exactly as Qwen3-VL's processor does.

Layout of visual content in the token sequence:

* image: ``<|vision_start|>`` + ``<|image_pad|>`` x (merged patch count) + ``<|vision_end|>``
* video: for every frame group (2 sampled frames): ``<{t:.1f} seconds>`` + ``<|vision_start|>`` +
  ``<|video_pad|>`` x (merged patches of one group) + ``<|vision_end|>``, with ``t`` the mean time of the
  group's two frames. This replaces the whole ``<|vision_start|><|video_pad|><|vision_end|>`` that the
  chat template writes (the official Qwen3-VL processor; no nested start/end tokens).

Text between structural tokens is tokenised as one run, as a tokenizer does on the fully expanded
prompt string, so token ids equal the reference's.

Sample kinds (the four that ``data_tools`` produces, plus plain text):

* ``encode_image_text(image, text)``: ``[image] text <|endoftext|>``
* ``encode_interleaved(segments)``: texts and images in reading order, then ``<|endoftext|>``
* ``encode_video(clip, text=..., captions=[...])``: ``[video] text\\n<s - e seconds> caption\\n...<|endoftext|>``
* ``encode_conversation(messages)``: the Qwen3-VL chat template; loss on assistant turns only (not on
  one with ``"loss": False``, ms-swift's flag for a turn kept as context).

Pretraining kinds put the loss on every text token (timestamps and vision start/end markers included)
except the sample's first token; visual placeholders never carry loss. See :class:`EncodedSample`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch

from common.tokens.chat_template import chat_segments
from common.tokens.positions import IMAGE, TEXT, VIDEO, mrope_position_ids
from pretrain.data.sample import IGNORE_INDEX, EncodedSample
from common.tokens.tokenizer import Tokenizer
from common.media.decode import ImageInfo
from common.media.frame_sampling import CAPTION_FORMAT, FrameSamplingConfig, VideoClip, VideoClipSize, format_timestamp
from common.media.vision_inputs import (VisionInputConfig, VisualPatches, image_patch_sizes, process_image, process_video,
                                        video_patch_sizes)

# What the encoders take as an image / a video: decoded, or only its size (then every count, id and position
# of the sample is exact and its pixel_values are zeros that take no memory: see SampleEncoder).
IMAGE_TYPES = (PIL.Image.Image, ImageInfo)
VIDEO_TYPES = (VideoClip, VideoClipSize)


@dataclass(frozen=True)
class EncodingConfig:
    """Sample encoding settings.

    vision: resize/patch/normalisation settings; frames: video frame sampling (used when videos are
        loaded from files).
    append_eos: end pretraining samples (not conversations) with ``<|endoftext|>`` as a target.
    caption_format: one timed caption line of a video sample; fields ``start``, ``end`` (seconds,
        from the clip start) and ``text``.
    max_tokens: raise ``ValueError`` for a sample longer than this many tokens (None: no limit).
    """

    vision: VisionInputConfig = field(default_factory=VisionInputConfig)
    frames: FrameSamplingConfig = field(default_factory=FrameSamplingConfig)
    append_eos: bool = True
    caption_format: str = CAPTION_FORMAT
    max_tokens: int | None = None


@dataclass(frozen=True)
class Caption:
    """A caption of a video time span; ``start`` <= ``end`` in seconds from the clip start."""

    start: float
    end: float
    text: str

    def __post_init__(self):
        if not (math.isfinite(self.start) and math.isfinite(self.end) and 0 <= self.start <= self.end):
            raise ValueError(f"caption times must satisfy 0 <= start <= end, got start={self.start}, end={self.end}")


class _SequenceBuilder:
    """Accumulates text runs, special tokens and visual placeholders, then tokenises in one pass."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self._ids: list[np.ndarray] = []
        self._targets: list[np.ndarray] = []
        self._types: list[np.ndarray] = []
        self._run: list[tuple[str, bool, str | None]] = []  # pending text pieces (text, is_target, data name)
        self.image_patches: list[VisualPatches] = []
        self.video_patches: list[VisualPatches] = []

    def text(self, text: str, target: bool, *, what: str = "text", check: bool = True) -> None:
        if check:
            self.tok.check_text(text, what)
        if text:
            self._run.append((text, target, what if check else None))

    def _flush(self) -> None:
        if not self._run:
            return
        pieces = [text for text, _, _ in self._run]
        # The run is tokenised with special tokens recognised, and data pieces were checked one by one
        # (text()): two of them, or one and a template piece, may still form a reserved token across their
        # boundary ("<|image" + "_pad|>" would be a placeholder without an image).
        for token, first, last in self.tok.structural_across(pieces):
            names = [name for _, _, name in self._run[first:last + 1] if name is not None]
            if names:
                raise ValueError(f"{names[0]} and the text after it join into the reserved token {token!r}; "
                                 "data text may not hold it")
        run = "".join(pieces)
        char_target = np.zeros(len(run) + 1, dtype=np.int64)  # prefix sums of "char is a target"
        pos = 0
        for text, target, _ in self._run:
            if target:
                char_target[pos + 1 : pos + 1 + len(text)] = 1
            pos += len(text)
        np.cumsum(char_target, out=char_target)
        ids, offsets = self.tok.encode_with_offsets(run, allow_special=True)
        spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        # A token is a target if any of its characters is (a token can straddle two pieces).
        targets = char_target[spans[:, 1]] - char_target[spans[:, 0]] > 0
        self._ids.append(np.asarray(ids, dtype=np.int64))
        self._targets.append(targets)
        self._types.append(np.full(len(ids), TEXT, dtype=np.int64))
        self._run = []

    def token(self, token_id: int, target: bool) -> None:
        self._flush()
        self._ids.append(np.asarray([token_id], dtype=np.int64))
        self._targets.append(np.asarray([target]))
        self._types.append(np.asarray([TEXT], dtype=np.int64))

    def _pads(self, token_id: int, count: int, kind: int) -> None:
        self._ids.append(np.full(count, token_id, dtype=np.int64))
        self._targets.append(np.zeros(count, dtype=bool))
        self._types.append(np.full(count, kind, dtype=np.int64))

    def image(self, patches: VisualPatches, target: bool) -> None:
        self.token(self.tok.vision_start_id, target)
        self._pads(self.tok.image_pad_id, patches.num_tokens, IMAGE)
        self.token(self.tok.vision_end_id, target)
        self.image_patches.append(patches)

    def video(self, patches: VisualPatches, group_times: Sequence[float], target: bool) -> None:
        if len(group_times) != patches.grid_thw[0]:
            raise ValueError(f"{len(group_times)} timestamps for {patches.grid_thw[0]} frame groups")
        for seconds in group_times:
            self.text(format_timestamp(seconds), target, check=False)
            self.token(self.tok.vision_start_id, target)
            self._pads(self.tok.video_pad_id, patches.tokens_per_frame_group, VIDEO)
            self.token(self.tok.vision_end_id, target)
        self.video_patches.append(patches)

    def build(self, kind: str, sample_id: str | None, merge_size: int, patch_dim: int, max_tokens: int | None) -> EncodedSample:
        self._flush()
        if not self._ids:
            raise ValueError(f"sample {sample_id or ''} encodes to no tokens")
        input_ids = torch.from_numpy(np.concatenate(self._ids))
        targets = torch.from_numpy(np.concatenate(self._targets))
        types = torch.from_numpy(np.concatenate(self._types))
        if max_tokens is not None and input_ids.numel() > max_tokens:
            raise ValueError(f"sample {sample_id or ''} has {input_ids.numel()} tokens, more than max_tokens={max_tokens}")
        labels = torch.where(targets, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        labels[0] = IGNORE_INDEX  # nothing in the sample predicts its first token

        def stack(items: list[VisualPatches]) -> tuple[torch.Tensor, torch.Tensor]:
            if not items:
                return torch.zeros((0, patch_dim), dtype=torch.float32), torch.zeros((0, 3), dtype=torch.int64)
            grid = torch.tensor([p.grid_thw for p in items], dtype=torch.int64)
            if any(p.pixel_values is None for p in items):  # sizes only: a zero row repeated, no memory
                return torch.zeros((1, patch_dim), dtype=torch.float32).expand(sum(p.num_patches for p in items), -1), grid
            return torch.cat([p.pixel_values for p in items]), grid

        pixel_values, image_grid_thw = stack(self.image_patches)
        pixel_values_videos, video_grid_thw = stack(self.video_patches)
        position_ids = mrope_position_ids(types, image_grid_thw, video_grid_thw, merge_size)
        return EncodedSample(
            input_ids=input_ids,
            labels=labels,
            position_ids=position_ids,
            mm_token_type_ids=types,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            kind=kind,
            sample_id=sample_id,
        )


def _require_text(text: Any, what: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{what} is empty")
    return text


class SampleEncoder:
    """Encodes the sample kinds of the training mix with one tokenizer and one :class:`EncodingConfig`.

    Images are PIL images, or an ``ImageInfo`` (width and height after EXIF rotation, pixels); videos are
    ``VideoClip``s, or a ``VideoClipSize`` (frame times and size). Given sizes only, the sample is the one
    its decoded media would give, except that ``pixel_values`` are zeros (a repeated row: no memory): how
    the packer plans its packs without decoding media (``pretrain.data.task_encoder``).
    """

    def __init__(self, tokenizer: Tokenizer, config: EncodingConfig = EncodingConfig()):
        self.tokenizer = tokenizer
        self.config = config

    # ------------------------------------------------------------------------------------ helpers
    def _builder(self) -> _SequenceBuilder:
        return _SequenceBuilder(self.tokenizer)

    def _finish(self, builder: _SequenceBuilder, kind: str, sample_id: str | None, eos: bool) -> EncodedSample:
        if eos and self.config.append_eos:
            builder.token(self.tokenizer.eos_id, True)
        vision = self.config.vision
        return builder.build(kind, sample_id, vision.merge_size, vision.patch_dim, self.config.max_tokens)

    def image_patches(self, image: PIL.Image.Image | ImageInfo) -> VisualPatches:
        if isinstance(image, ImageInfo):
            return image_patch_sizes(image.height, image.width, self.config.vision)
        return process_image(image, self.config.vision)

    def video_patches(self, clip: VideoClip | VideoClipSize) -> tuple[VisualPatches, list[float]]:
        """Vision input of a clip and the timestamp (seconds) of each of its frame groups."""
        if isinstance(clip, VideoClipSize):
            patches = video_patch_sizes(clip.num_frames, clip.height, clip.width, self.config.vision)
        elif isinstance(clip, VideoClip):
            patches = process_video(clip.frames, self.config.vision)
        else:
            raise ValueError(f"video must be a VideoClip, got {type(clip).__name__}")
        return patches, clip.group_timestamps(self.config.vision.temporal_patch_size)

    # ---------------------------------------------------------------------------------- encoders
    def encode_text(self, text: str, *, sample_id: str | None = None) -> EncodedSample:
        """A plain text document: ``text <|endoftext|>``."""
        builder = self._builder()
        builder.text(_require_text(text, "text"), True, what="text")
        return self._finish(builder, "text", sample_id, eos=True)

    def encode_image_text(self, image: PIL.Image.Image, text: str, *, sample_id: str | None = None) -> EncodedSample:
        """An image-caption pair: ``<|vision_start|> pads <|vision_end|> caption <|endoftext|>``."""
        text = _require_text(text, "caption")
        builder = self._builder()
        builder.image(self.image_patches(image), True)
        builder.text(text, True, what="caption")
        return self._finish(builder, "image_text", sample_id, eos=True)

    def encode_interleaved(
        self, segments: Sequence[str | PIL.Image.Image | VideoClip], *, sample_id: str | None = None
    ) -> EncodedSample:
        """An interleaved document: strings, PIL images and video clips in reading order, concatenated as given."""
        if isinstance(segments, (str, bytes)) or not segments:
            raise ValueError("interleaved document needs a non-empty list of text and image segments")
        builder = self._builder()
        has_text = False
        for i, segment in enumerate(segments):
            if isinstance(segment, str):
                builder.text(segment, True, what=f"segment {i}")
                has_text = has_text or bool(segment.strip())
            elif isinstance(segment, IMAGE_TYPES):
                builder.image(self.image_patches(segment), True)
            elif isinstance(segment, VIDEO_TYPES):
                builder.video(*self.video_patches(segment), True)
            else:
                raise ValueError(f"segment {i} must be a str, a PIL image or a VideoClip, got {type(segment).__name__}")
        if not has_text:
            raise ValueError("interleaved document has no text")
        return self._finish(builder, "interleaved", sample_id, eos=True)

    def encode_video(
        self,
        clip: VideoClip,
        *,
        text: str | None = None,
        captions: Sequence[Caption] = (),
        sample_id: str | None = None,
    ) -> EncodedSample:
        """A video with an optional description and timed captions.

        Layout: the video's frame groups, then ``text``, then one line per caption formatted with
        ``config.caption_format``, joined by newlines. Needs a text or at least one caption.
        """
        lines = []
        if text is not None:
            lines.append(_require_text(text, "video text"))
        for i, caption in enumerate(captions):
            if not isinstance(caption, Caption):
                raise ValueError(f"caption {i} must be a Caption, got {type(caption).__name__}")
            _require_text(caption.text, f"caption {i}")
            lines.append(self.config.caption_format.format(start=caption.start, end=caption.end, text=caption.text))
        if not lines:
            raise ValueError("video sample needs a text or captions")
        builder = self._builder()
        patches, times = self.video_patches(clip)
        builder.video(patches, times, True)
        builder.text("\n".join(lines), True, what="video text")
        return self._finish(builder, "video", sample_id, eos=True)

    def encode_conversation(
        self,
        messages: Sequence[Mapping],
        *,
        images: Sequence[PIL.Image.Image] = (),
        videos: Sequence[VideoClip] = (),
        sample_id: str | None = None,
    ) -> EncodedSample:
        """An SFT conversation rendered with the Qwen3-VL chat template; loss on assistant turns only:
        their content and ``<|im_end|>``, except for a turn with ``"loss": False`` (in the sequence as
        context, no target; common.tokens.chat_template). Raises ValueError for a conversation without
        a target (no assistant turn, or each has ``"loss": False``): it would train nothing.

        Media come inline (``{"type": "image", "image": PIL.Image}``, ``{"type": "video", "video":
        VideoClip}``) or, for items whose media is ``None``/a reference, from ``images``/``videos`` in
        order of appearance.
        """
        segments = chat_segments(messages)
        if not any(seg.target for seg in segments):
            raise ValueError("conversation has no SFT target: no assistant message, or each has \"loss\": false")
        builder = self._builder()
        specials = self.tokenizer.special_token_ids
        for seg in segments:
            if seg.kind == "special":
                builder.token(specials[seg.text], seg.target)
            elif seg.kind == "text":
                builder.text(seg.text, seg.target, what="message text", check=seg.is_content)
            elif seg.kind == "image":
                image = seg.media if isinstance(seg.media, IMAGE_TYPES) else _nth(images, seg.index, "image")
                builder.image(self.image_patches(image), False)
            else:
                clip = seg.media if isinstance(seg.media, VIDEO_TYPES) else _nth(videos, seg.index, "video")
                patches, times = self.video_patches(clip)
                builder.video(patches, times, False)
        for name, given, used in (("images", images, builder.image_patches), ("videos", videos, builder.video_patches)):
            if len(given) > len(used):
                raise ValueError(f"{len(given)} {name} given but the conversation references only {len(used)}")
        return self._finish(builder, "sft", sample_id, eos=False)


def _nth(items: Sequence, index: int, what: str):
    if index >= len(items):
        raise ValueError(f"conversation references {what} #{index + 1} but only {len(items)} {what}s were given")
    return items[index]


# ------------------------------------------------------------------------------------------------------
# Adapter from the shard schema of ``data_tools`` (data_tools/schema.py)
# ------------------------------------------------------------------------------------------------------


class SampleEncodingError(ValueError):
    """A shard sample that cannot be encoded; the message names the sample, ``reason`` is a short code
    (a ``MediaError`` reason such as ``"image_decode_error"``, or ``"invalid_sample"``)."""

    def __init__(self, message: str, reason: str = "invalid_sample"):
        super().__init__(message)
        self.reason = reason


class _MediaDecoder:
    """Decodes a sample's media members once each (a member referenced twice is decoded once).

    ``records``: the sample's ``data_tools.schema.Media`` records by part name (None: media outside a shard
    set); an image is decoded under the pixel limit its shard set was built with. ``decode=False``: the
    media are not decoded, only sized, by their records (what ``data_tools`` measured when it built the shard,
    with the loaders used here): an image by its width and height (after EXIF rotation, by
    ``load_image``), a video by its frame count, frame rate and size (``probe_video``) and its frames'
    timestamps (``video_frame_times``: the container is demuxed, nothing is decoded), from which
    :func:`video_clip_size` gives the frames :func:`load_video_clip` samples. No image is opened.
    """

    def __init__(self, media: Mapping[str, bytes], frames: FrameSamplingConfig, sample_key: str,
                 records: Mapping[str, Any] | None = None, decode: bool = True):
        if not decode and records is None:
            raise ValueError(f"sample {sample_key}: sizing media without decoding needs their records")
        self.media, self.frames, self.key, self.records, self.decode = media, frames, sample_key, records, decode
        self._cache: dict[str, Any] = {}

    def _bytes(self, name: str) -> bytes:
        if name not in self.media:
            raise ValueError(f"sample {self.key}: media member {name!r} is missing")
        return self.media[name]

    def image(self, name: str) -> PIL.Image.Image | ImageInfo:
        from common.media import decode as media

        if name not in self._cache:
            record = self.records.get(name) if self.records is not None else None
            if self.decode:
                limit = media.recorded_max_pixels(record.width, record.height) if record else media.DEFAULT_MAX_PIXELS
                self._cache[name] = media.load_image(self._bytes(name), max_pixels=limit)
            else:
                self._bytes(name)  # a missing member is the same error as when decoding
                self._cache[name] = ImageInfo(format=record.format, width=record.width, height=record.height)
        return self._cache[name]

    def video(self, name: str) -> VideoClip | VideoClipSize:
        from common.media.frame_sampling import load_video_clip, video_clip_size

        if name not in self._cache:
            if self.decode:
                self._cache[name] = load_video_clip(self._bytes(name), self.frames)
            else:
                from common.media.decode import video_frame_times

                # The frames' timestamps (a demux, no decoding) time a variable-frame-rate video as
                # load_video_clip will: its "<t seconds>" text, hence its token count, is the plan's.
                times = video_frame_times(self._bytes(name))
                self._cache[name] = video_clip_size(self.records[name], self.frames, frame_times=times)
        return self._cache[name]

    def part(self, part) -> Any:
        if part.type == "text":
            return part.text
        return self.image(part.image) if part.type == "image" else self.video(part.video)


def decode_messages(messages: Sequence, media: Mapping[str, bytes], frames: FrameSamplingConfig, sample_key: str) -> list[dict]:
    """``data_tools.schema`` Messages -> the messages :meth:`SampleEncoder.encode_conversation` takes, each
    media member decoded once (images with ``load_image``, videos sampled at ``frames``). Raises
    ``ValueError`` (``MediaError`` for bad media)."""
    return _messages(messages, _MediaDecoder(media, frames, sample_key))


def _messages(messages: Sequence, decode: _MediaDecoder) -> list[dict]:
    """Schema Messages as chat template messages, media decoded; ``"loss": False`` carried where the
    Message has it (only then: every other message is as it was before the flag existed)."""
    return [{"role": m.role, "content": [{"type": p.type, p.type: decode.part(p)} for p in m.content],
             **({} if m.loss else {"loss": False})} for m in messages]


def encode_schema_sample(encoder: SampleEncoder, sample, media: Mapping[str, bytes], *,
                         decode_media: bool = True) -> EncodedSample:
    """Encode a ``data_tools.schema`` sample with its media bytes (part name -> bytes).

    Images are decoded with ``common.media.decode.load_image``; videos are sampled at
    ``encoder.config.frames`` and decoded with ``media.read_video_frames`` (clips are stored as their own
    files, with captions already re-timed to the clip). ``decode_media=False``: media are only sized
    (:class:`_MediaDecoder`): the same sample with zero pixels, at a fraction of the cost (how packs are
    planned). Raises ``ValueError`` (``MediaError`` for bad media) naming the sample key.
    """
    from data_tools import schema

    decode = _MediaDecoder(media, encoder.config.frames, sample.key, {m.name: m for m in sample.media},
                           decode=decode_media)
    sample_id = sample.source.id or sample.key
    try:
        if isinstance(sample, schema.ImageTextSample):
            return encoder.encode_image_text(decode.image(sample.image), sample.text, sample_id=sample_id)
        if isinstance(sample, schema.InterleavedSample):
            return encoder.encode_interleaved([decode.part(p) for p in sample.segments], sample_id=sample_id)
        if isinstance(sample, schema.VideoSample):
            captions = [Caption(c.start, c.end, c.text) for c in sample.captions]
            return encoder.encode_video(decode.video(sample.video), text=sample.text, captions=captions, sample_id=sample_id)
        if isinstance(sample, schema.SftSample):
            return encoder.encode_conversation(_messages(sample.messages, decode), sample_id=sample_id)
    except ValueError as err:
        where = f"sample {sample.key} ({sample.source.manifest}:{sample.source.line})"
        raise SampleEncodingError(f"{where}: {err}", reason=getattr(err, "reason", "invalid_sample")) from err
    raise TypeError(f"not a data_tools.schema sample: {type(sample).__name__}")


def encode_shard_parts(encoder: SampleEncoder, parts: Mapping[str, object], *, decode_media: bool = True) -> EncodedSample:
    """Encode one WebDataset / energon sample dict (part name -> bytes, e.g. ``json``, ``img0.jpg``);
    ``decode_media`` as in :func:`encode_schema_sample`."""
    from data_tools import schema

    sample, media = schema.read_sample(parts)
    return encode_schema_sample(encoder, sample, media, decode_media=decode_media)
