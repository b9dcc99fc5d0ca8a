"""The sample schema of shard sets built by ``python -m data_tools build-*``: what the training loader reads.

A shard is a WebDataset tar file. Members that share the text before the FIRST dot form one sample
(the WebDataset and energon convention), stored consecutively:

    <key>.json          the sample description: one of the dataclasses below, as UTF-8 JSON
    <key>.img0.jpg      the sample's first image, its original bytes (or downscaled, see Media)
    <key>.img1.png      the second image; the extension is the real format (PIL's), lower case
    <key>.vid0.mp4      the first video; the extension is the source file's (or mp4 for cut clips)

* ``key`` is ``f"{line:09d}"`` for the sample made from manifest line ``line`` (1-based), or
  ``f"{line:09d}_{clip:04d}"`` for clip ``clip`` of a video cut into clips. Keys hold only digits and
  ``_``: never a dot, a slash or anything taken from the input.
* Media are numbered per type in order of first reference within the sample (``img0``, ``img1``, ...,
  ``vid0``, ...). The JSON refers to them by PART NAME, the member name without ``"<key>."``
  (``"img0.jpg"``): the key under which WebDataset and energon's ``CrudeWebdataset`` hand out the bytes.
  The same bytes referenced twice in one sample are stored once.
* Times are seconds (float), sizes pixels, byte counts bytes. Text is NFC as given (never altered).

Readers: :func:`read_sample` turns a WebDataset/energon sample dict (part name -> bytes) into a
typed sample plus its media bytes, checking that every referenced member is present.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

SCHEMA_VERSION = 1
KINDS = ("image_text", "interleaved", "video", "sft", "rl")
PROMPT_ROLES = ("system", "user")  # the roles of an RL prompt: the policy writes the assistant turn
ROLES = ("system", "user", "assistant")
MEDIA_TYPES = ("image", "video")
JSON_PART = "json"


class SchemaError(ValueError):
    """A sample JSON that does not follow this schema (message says which field and why)."""


# ----------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where a sample came from: ``line`` (1-based) of ``manifest`` (its file name), and the line's ``id``."""

    line: int
    manifest: str
    id: str | None = None


@dataclass(frozen=True)
class Media:
    """One media member of a sample.

    name: part name ("img0.jpg"); type: "image" | "video"; format: "jpeg", "png", "mp4", ...;
    sha256: hex digest of the stored bytes; bytes: their length; width, height: pixels of the stored
    media (after EXIF rotation for images); source: the path as written in the manifest.
    Images downscaled at build time (``--downscale-pixels``) keep their original size in
    ``original_width``/``original_height``. Videos add num_frames, fps, duration (seconds,
    ``num_frames / fps``) and backend ("decord" | "pyav", the decoder that read it at build time).
    """

    name: str
    type: str
    format: str
    sha256: str
    bytes: int
    width: int
    height: int
    source: str
    original_width: int | None = None
    original_height: int | None = None
    num_frames: int | None = None
    fps: float | None = None
    duration: float | None = None
    backend: str | None = None


@dataclass(frozen=True)
class Part:
    """One piece of interleaved content: ``type`` "text" (with ``text``), "image" (with ``image``, a part
    name) or "video" (with ``video``, a part name). Used by interleaved segments and SFT messages."""

    type: str
    text: str | None = None
    image: str | None = None
    video: str | None = None


@dataclass(frozen=True)
class Caption:
    """A caption of the span ``[start, end]`` seconds of the sample's video (clip-relative for clips)."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Clip:
    """Clip ``index`` of ``count`` cut from a longer video: it shows source seconds ``[start, end)``."""

    index: int
    count: int
    start: float
    end: float


@dataclass(frozen=True)
class Message:
    """One chat turn: ``role`` in ROLES; ``content`` a tuple of Parts (a plain string becomes one text Part);
    ``loss``: False only on an assistant turn that is not an SFT target (ms-swift's ``"loss": false``: its
    content and closing ``<|im_end|>`` stay as context, not trained; common.tokens.chat_template), True
    otherwise (an assistant turn is then a target; other roles never are). In the JSON only when False, so
    a sample without such a turn has the bytes it had before the field existed."""

    role: str
    content: tuple[Part, ...]
    loss: bool = True


# ----------------------------------------------------------------------------------------------------
# The sample kinds
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTextSample:
    """An image with its caption. ``image`` is the part name of the image."""

    key: str
    source: Source
    media: tuple[Media, ...]
    text: str
    image: str
    kind: str = "image_text"


@dataclass(frozen=True)
class InterleavedSample:
    """A document: text and image Parts in reading order."""

    key: str
    source: Source
    media: tuple[Media, ...]
    segments: tuple[Part, ...]
    kind: str = "interleaved"


@dataclass(frozen=True)
class VideoSample:
    """A video (``video``: part name) with an optional description and timestamped captions.

    For a clip cut from a longer video, ``clip`` says which part of the source it is, captions are
    re-timed to the clip (0 = clip start) and ``text`` is the source's description.
    """

    key: str
    source: Source
    media: tuple[Media, ...]
    video: str
    text: str | None = None
    captions: tuple[Caption, ...] = ()
    clip: Clip | None = None
    kind: str = "video"


@dataclass(frozen=True)
class SftSample:
    """A conversation for supervised fine-tuning."""

    key: str
    source: Source
    media: tuple[Media, ...]
    messages: tuple[Message, ...]
    kind: str = "sft"


@dataclass(frozen=True)
class RlSample:
    """A prompt for RL post-training: system/user ``messages`` ending with a user turn (no assistant
    turn: the policy writes it), the reference ``answer`` (None when the prompt has none) and the name
    of the ``reward`` the responses are scored with (stored as given; the trainer checks it exists)."""

    key: str
    source: Source
    media: tuple[Media, ...]
    messages: tuple[Message, ...]
    answer: str | None
    reward: str
    kind: str = "rl"


Sample = ImageTextSample | InterleavedSample | VideoSample | SftSample | RlSample


# ----------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------


def sample_key(line: int, clip: int | None = None) -> str:
    """The tar key of the sample from manifest ``line`` (1-based), or of clip ``clip`` of that line."""
    return f"{line:09d}" if clip is None else f"{line:09d}_{clip:04d}"


def media_part_name(media_type: str, index: int, ext: str) -> str:
    """Part name of the ``index``-th (0-based) media of ``media_type`` in a sample: "img0.jpg", "vid1.mp4"."""
    prefix = {"image": "img", "video": "vid"}[media_type]
    if not ext.isalnum():
        raise ValueError(f"media extension must be alphanumeric, got {ext!r}")
    return f"{prefix}{index}.{ext.lower()}"


def split_member_name(name: str) -> tuple[str, str]:
    """``"000000012.img0.jpg"`` -> ``("000000012", "img0.jpg")``. Raises SchemaError for a bad name."""
    key, dot, part = name.partition(".")
    if not dot or not key or not part or "/" in name:
        raise SchemaError(f"tar member {name!r} is not <key>.<part>")
    return key, part


# ----------------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------------


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _media_to_dict(m: Media) -> dict:
    return _drop_none(dict(m.__dict__))


def _part_to_dict(p: Part) -> dict:
    return _drop_none(dict(p.__dict__))


def _message_to_dict(m: Message) -> dict:
    d: dict = {"role": m.role, "content": [_part_to_dict(p) for p in m.content]}
    if not m.loss:
        d["loss"] = False
    return d


def _messages_to_list(messages: tuple[Message, ...]) -> list[dict]:
    return [_message_to_dict(m) for m in messages]


def sample_to_dict(sample: Sample) -> dict:
    """The JSON object of a sample (with ``schema_version``)."""
    d: dict = {
        "schema_version": SCHEMA_VERSION,
        "kind": sample.kind,
        "key": sample.key,
        "source": _drop_none(dict(sample.source.__dict__)),
        "media": [_media_to_dict(m) for m in sample.media],
    }
    if isinstance(sample, ImageTextSample):
        d.update(text=sample.text, image=sample.image)
    elif isinstance(sample, InterleavedSample):
        d.update(segments=[_part_to_dict(p) for p in sample.segments])
    elif isinstance(sample, VideoSample):
        d.update(video=sample.video, captions=[dict(c.__dict__) for c in sample.captions])
        if sample.text is not None:
            d["text"] = sample.text
        if sample.clip is not None:
            d["clip"] = dict(sample.clip.__dict__)
    elif isinstance(sample, SftSample):
        d.update(messages=_messages_to_list(sample.messages))
    elif isinstance(sample, RlSample):
        d.update(messages=_messages_to_list(sample.messages), answer=sample.answer, reward=sample.reward)
    else:
        raise TypeError(f"not a sample: {type(sample).__name__}")
    return d


def sample_to_json(sample: Sample) -> bytes:
    """Canonical UTF-8 JSON of a sample: sorted keys, no spaces, so equal samples give equal bytes."""
    return json.dumps(sample_to_dict(sample), ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


def _get(d: Mapping, field: str, types, where: str, *, optional: bool = False):
    if field not in d or d[field] is None:
        if optional:
            return None
        raise SchemaError(f"{where}: missing field {field!r}")
    value = d[field]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise SchemaError(f"{where}: field {field!r} must be {types}, got a bool")
    if not isinstance(value, types):
        raise SchemaError(f"{where}: field {field!r} must be {types}, got {type(value).__name__}")
    return value


def _number(d: Mapping, field: str, where: str, *, optional: bool = False) -> float | None:
    value = _get(d, field, (int, float), where, optional=optional)
    if value is not None and not math.isfinite(value):
        raise SchemaError(f"{where}: field {field!r} must be finite, got {value}")
    return None if value is None else float(value)


def _media_from_dict(d: Mapping, where: str) -> Media:
    if not isinstance(d, Mapping):
        raise SchemaError(f"{where}: media entry must be an object")
    media_type = _get(d, "type", str, where)
    if media_type not in MEDIA_TYPES:
        raise SchemaError(f"{where}: media type must be one of {MEDIA_TYPES}, got {media_type!r}")
    m = Media(
        name=_get(d, "name", str, where),
        type=media_type,
        format=_get(d, "format", str, where),
        sha256=_get(d, "sha256", str, where),
        bytes=_get(d, "bytes", int, where),
        width=_get(d, "width", int, where),
        height=_get(d, "height", int, where),
        source=_get(d, "source", str, where),
        original_width=_get(d, "original_width", int, where, optional=True),
        original_height=_get(d, "original_height", int, where, optional=True),
        num_frames=_get(d, "num_frames", int, where, optional=media_type == "image"),
        fps=_number(d, "fps", where, optional=media_type == "image"),
        duration=_number(d, "duration", where, optional=media_type == "image"),
        backend=_get(d, "backend", str, where, optional=media_type == "image"),
    )
    return m


def _part_from_dict(d: Mapping, where: str) -> Part:
    if not isinstance(d, Mapping):
        raise SchemaError(f"{where}: must be an object")
    part_type = _get(d, "type", str, where)
    if part_type not in ("text", "image", "video"):
        raise SchemaError(f"{where}: type must be text, image or video, got {part_type!r}")
    return Part(type=part_type, **{part_type: _get(d, part_type, str, where)})


def _messages_from_list(d: Mapping, where: str, roles: tuple[str, ...]) -> tuple[Message, ...]:
    messages = []
    for i, m in enumerate(_get(d, "messages", list, where)):
        mw = f"{where}.messages[{i}]"
        if not isinstance(m, Mapping):
            raise SchemaError(f"{mw}: must be an object")
        role = _get(m, "role", str, mw)
        if role not in roles:
            raise SchemaError(f"{mw}: role must be one of {roles}, got {role!r}")
        content = tuple(_part_from_dict(p, f"{mw}.content[{j}]") for j, p in enumerate(_get(m, "content", list, mw)))
        loss = _get(m, "loss", bool, mw, optional=True)
        if loss is not None and role != "assistant":
            raise SchemaError(f"{mw}: only assistant messages take 'loss', this one is a {role} message")
        messages.append(Message(role, content, True if loss is None else loss))
    return tuple(messages)


def sample_from_dict(d: Mapping) -> Sample:
    """Parse and check a sample JSON object. Raises SchemaError naming the bad field."""
    if not isinstance(d, Mapping):
        raise SchemaError("sample JSON must be an object")
    version = d.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SchemaError(f"schema_version {version!r} is not supported (this reader knows {SCHEMA_VERSION})")
    key = _get(d, "key", str, "sample")
    where = f"sample {key}"
    kind = _get(d, "kind", str, where)
    src = _get(d, "source", Mapping, where)
    source = Source(
        line=_get(src, "line", int, f"{where}.source"),
        manifest=_get(src, "manifest", str, f"{where}.source"),
        id=_get(src, "id", str, f"{where}.source", optional=True),
    )
    media = tuple(_media_from_dict(m, f"{where}.media[{i}]") for i, m in enumerate(_get(d, "media", list, where)))
    names = [m.name for m in media]
    if len(set(names)) != len(names):
        raise SchemaError(f"{where}: duplicate media names {names}")
    if kind == "image_text":
        sample: Sample = ImageTextSample(key, source, media, text=_get(d, "text", str, where), image=_get(d, "image", str, where))
    elif kind == "interleaved":
        segments = tuple(_part_from_dict(p, f"{where}.segments[{i}]") for i, p in enumerate(_get(d, "segments", list, where)))
        sample = InterleavedSample(key, source, media, segments=segments)
    elif kind == "video":
        captions = []
        for i, c in enumerate(_get(d, "captions", list, where)):
            cw = f"{where}.captions[{i}]"
            if not isinstance(c, Mapping):
                raise SchemaError(f"{cw}: must be an object")
            captions.append(Caption(_number(c, "start", cw), _number(c, "end", cw), _get(c, "text", str, cw)))
        clip = None
        if d.get("clip") is not None:
            c = _get(d, "clip", Mapping, where)
            cw = f"{where}.clip"
            clip = Clip(_get(c, "index", int, cw), _get(c, "count", int, cw), _number(c, "start", cw), _number(c, "end", cw))
        sample = VideoSample(
            key, source, media, video=_get(d, "video", str, where), text=_get(d, "text", str, where, optional=True),
            captions=tuple(captions), clip=clip,
        )
    elif kind == "sft":
        sample = SftSample(key, source, media, messages=_messages_from_list(d, where, ROLES))
    elif kind == "rl":
        messages = _messages_from_list(d, where, PROMPT_ROLES)
        if not messages or messages[-1].role != "user":
            raise SchemaError(f"{where}: an RL prompt must end with a user message")
        sample = RlSample(key, source, media, messages=messages, answer=_get(d, "answer", str, where, optional=True),
                          reward=_get(d, "reward", str, where))
    else:
        raise SchemaError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    missing = sorted(set(referenced_media(sample)) - set(names))
    if missing:
        raise SchemaError(f"{where}: refers to media {missing} that its media list does not describe")
    return sample


def sample_from_json(data: bytes | str) -> Sample:
    """Parse a sample's JSON member. Raises SchemaError."""
    try:
        d = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SchemaError(f"sample JSON does not parse: {e}") from None
    return sample_from_dict(d)


def referenced_media(sample: Sample) -> list[str]:
    """Part names the sample's text structure refers to, in order of first reference, without repeats."""
    names: list[str] = []
    if isinstance(sample, ImageTextSample):
        names.append(sample.image)
    elif isinstance(sample, VideoSample):
        names.append(sample.video)
    else:
        parts = sample.segments if isinstance(sample, InterleavedSample) else [p for m in sample.messages for p in m.content]
        names.extend(p.image or p.video for p in parts if p.type != "text")
    return list(dict.fromkeys(names))


def read_sample(parts: Mapping[str, object]) -> tuple[Sample, dict[str, bytes]]:
    """A WebDataset/energon sample dict (part name -> bytes, plus ``__key__`` etc.) -> (sample, media bytes).

    ``parts["json"]`` may be bytes, str or an already decoded dict. Checks that every media the JSON
    describes is present as bytes; returns them keyed by part name. Raises SchemaError.
    """
    raw = parts.get(JSON_PART)
    if raw is None:
        raise SchemaError(f"sample {parts.get('__key__', '?')} has no {JSON_PART!r} member")
    sample = sample_from_dict(raw) if isinstance(raw, Mapping) else sample_from_json(raw)  # type: ignore[arg-type]
    media: dict[str, bytes] = {}
    for m in sample.media:
        data = parts.get(m.name)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SchemaError(f"sample {sample.key}: media member {m.name!r} is missing (or already decoded)")
        media[m.name] = bytes(data)
    return sample, media
