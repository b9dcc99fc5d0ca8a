"""Write a deterministic synthetic corpus (raw images, videos, five manifests, a held-out eval file).

Made to be LEARNABLE by a tiny Qwen3-VL in minutes on a CPU: every image shows one simple shape
(8 colour words x 4 shape words) on a plain background (3 background words), 64-160 px with varied
aspect ratios; captions come from a few templates ("a red circle on a white background"). Videos
(H.264 MP4, 8 fps, 2-6 s, 64-128 px) show a shape that stays still, then moves left, right, up or down,
with timestamped captions for both phases. Interleaved documents mix such images with sentences that
describe them; SFT conversations ask closed-vocabulary questions ("What colour is the shape?" -> "red",
"Which way does the square move?" -> "left"). ``eval.jsonl`` asks the same kinds of questions about
media that no manifest uses, with the answer choices. ``rl.jsonl`` is a ``build-rl`` prompt set for RL
post-training: the same closed-vocabulary questions (colour, shape, background; direction and colour
for videos) about media of its own (used by no other manifest, eval included), as a user turn without
the answer, with the single-word reference ``answer`` and ``reward: exact_match``. ``text.jsonl`` holds
text-only SFT conversations about the same vocabulary (``build-sft``; the distillation stage's text data).

A few deliberately bad inputs sit in the manifests so builds show rejection: in image_text.jsonl a
truncated image, a missing file, an empty text and a malformed JSON line; in interleaved.jsonl a
missing image; in video.jsonl a corrupt video and a caption past the end; in sft.jsonl an empty
answer; in rl.jsonl a missing image and an answer that is not a string. ``synth.json`` lists the
vocabulary, the counts and these bad lines.

Output folder: images/, videos/, docs/, sft_media/, eval_media/, rl_media/, image_text.jsonl,
interleaved.jsonl, video.jsonl, sft.jsonl, eval.jsonl, rl.jsonl, text.jsonl, synth.json. Paths in
manifests are relative to the folder. The same seed and counts give byte-identical files; each manifest
draws from its own random stream (``f"{seed}/<name>"``) in a fixed order, rl then text last, so adding
them left the other files as they were.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "pink": (245, 130, 190),
    "brown": (130, 80, 40),
}
SHAPES = ("circle", "square", "triangle", "star")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
CAPTION_TEMPLATES = (
    "a {colour} {shape} on a {background} background",
    "a picture of a {colour} {shape}",
    "there is a {colour} {shape} on a {background} background",
    "a {colour} {shape}",
)
VIDEO_FPS = 8
SYSTEM_PROMPT = "You are a helpful assistant that answers questions about images and videos."
SUBDIRS = ("images", "videos", "docs", "sft_media", "eval_media", "rl_media")
MANIFESTS = ("image_text.jsonl", "interleaved.jsonl", "video.jsonl", "sft.jsonl", "eval.jsonl", "rl.jsonl",
             "text.jsonl")
#: The manifests with deliberately bad lines (synth.json's ``bad_lines``), built by build-* commands.
BUILD_MANIFESTS = ("image_text.jsonl", "interleaved.jsonl", "video.jsonl", "sft.jsonl", "rl.jsonl")


@dataclass(frozen=True)
class SynthConfig:
    """out: output folder; seed: everything is a function of it; the counts are manifest lines
    (good ones: the deliberately bad lines come on top)."""

    out: str
    seed: int = 0
    images: int = 400
    videos: int = 48
    docs: int = 120
    sft: int = 300
    eval: int = 80
    rl: int = 96
    text: int = 200
    overwrite: bool = False


@dataclass(frozen=True)
class ImageSpec:
    colour: str
    shape: str
    background: str
    width: int
    height: int
    cx: int
    cy: int
    radius: int
    fmt: str  # "png" | "jpg"

    def caption(self, template: str = CAPTION_TEMPLATES[0]) -> str:
        return template.format(colour=self.colour, shape=self.shape, background=self.background)


@dataclass(frozen=True)
class VideoSpec:
    colour: str
    shape: str
    background: str
    direction: str
    width: int
    height: int
    radius: int
    seconds: float  # duration
    still: float  # seconds before the shape starts moving
    cross: int  # the fixed coordinate across the motion, pixels

    @property
    def num_frames(self) -> int:
        return round(self.seconds * VIDEO_FPS)

    def text(self) -> str:
        return f"a {self.colour} {self.shape} moves {self.direction} on a {self.background} background"

    def captions(self) -> list[dict]:
        return [
            {"start": 0.0, "end": self.still, "text": f"a {self.colour} {self.shape} on a {self.background} background"},
            {"start": self.still, "end": self.seconds, "text": f"the {self.colour} {self.shape} moves {self.direction}"},
        ]


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85  # about the area of the circle
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def render(shape: str, colour: str, background: str, width: int, height: int, cx: float, cy: float, radius: float):
    """A PIL RGB image of one shape of ``radius`` pixels centred at (cx, cy) on a plain background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=COLOURS[colour])
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, radius), fill=COLOURS[colour])
    return image


def random_image_spec(rng: random.Random) -> ImageSpec:
    width, height = rng.randint(64, 160), rng.randint(64, 160)
    if rng.random() < 0.15:  # some clearly wide or tall images
        width, height = (rng.randint(128, 160), rng.randint(56, 72)) if rng.random() < 0.5 else (rng.randint(56, 72), rng.randint(128, 160))
    radius = max(10, int(min(width, height) * rng.uniform(0.28, 0.42)))
    return ImageSpec(
        colour=rng.choice(list(COLOURS)),
        shape=rng.choice(SHAPES),
        background=rng.choice(list(BACKGROUNDS)),
        width=width,
        height=height,
        cx=rng.randint(radius + 1, width - radius - 1),
        cy=rng.randint(radius + 1, height - radius - 1),
        radius=radius,
        fmt="jpg" if rng.random() < 0.4 else "png",
    )


def encode_image(spec: ImageSpec) -> bytes:
    image = render(spec.shape, spec.colour, spec.background, spec.width, spec.height, spec.cx, spec.cy, spec.radius)
    buffer = io.BytesIO()
    if spec.fmt == "jpg":
        image.save(buffer, format="JPEG", quality=92)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def random_video_spec(rng: random.Random) -> VideoSpec:
    width, height = rng.choice([(96, 64), (64, 64), (128, 96), (80, 112), (112, 80)])
    radius = max(8, int(min(width, height) * 0.18))
    direction = rng.choice(list(DIRECTIONS))
    dx, _ = DIRECTIONS[direction]
    across = height if dx else width
    return VideoSpec(
        colour=rng.choice(list(COLOURS)),
        shape=rng.choice(SHAPES),
        background=rng.choice(list(BACKGROUNDS)),
        direction=direction,
        width=width,
        height=height,
        radius=radius,
        seconds=rng.choice([2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0]),
        still=rng.choice([0.5, 0.75, 1.0]),
        cross=rng.randint(radius + 2, across - radius - 2),
    )


def video_frames(spec: VideoSpec):
    """The frames of ``spec`` as (H, W, 3) uint8 arrays: still until ``still`` s, then a linear move
    from one edge to the other, ending at the last frame."""
    import numpy as np

    dx, dy = DIRECTIONS[spec.direction]
    length = spec.width if dx else spec.height
    margin = spec.radius + 2
    start, end = (length - margin, margin) if (dx or dy) < 0 else (margin, length - margin)
    frames = spec.num_frames
    still_frames = round(spec.still * VIDEO_FPS)
    for i in range(frames):
        progress = 0.0 if i < still_frames else (i - still_frames + 1) / max(1, frames - still_frames)
        along = start + (end - start) * progress
        cx, cy = (along, spec.cross) if dx else (spec.cross, along)
        yield np.asarray(render(spec.shape, spec.colour, spec.background, spec.width, spec.height, cx, cy, spec.radius))


def encode_synth_video(spec: VideoSpec) -> bytes:
    from common.media.encode import encode_video

    return encode_video(video_frames(spec), VIDEO_FPS)


# ----------------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------------


class _Writer:
    """Writes files under the output folder (atomically) and keeps every image unique."""

    def __init__(self, out: Path):
        self.out = out
        self.used: set[tuple] = set()
        self.files = 0
        self.bytes = 0

    def unique_image(self, rng: random.Random) -> ImageSpec:
        while True:
            spec = random_image_spec(rng)
            key = (spec.colour, spec.shape, spec.background, spec.width, spec.height, spec.cx, spec.cy, spec.radius)
            if key not in self.used:
                self.used.add(key)
                return spec

    def unique_video(self, rng: random.Random) -> VideoSpec:
        while True:
            spec = random_video_spec(rng)
            key = asdict(spec)
            key = tuple(sorted(key.items()))
            if key not in self.used:
                self.used.add(key)
                return spec

    def file(self, relative: str, data: bytes) -> str:
        from data_tools.atomic import write_atomic

        write_atomic(self.out / relative, data, durable=False)
        self.files += 1
        self.bytes += len(data)
        return relative

    def image(self, relative_stem: str, spec: ImageSpec) -> str:
        return self.file(f"{relative_stem}.{spec.fmt}", encode_image(spec))

    def video(self, relative: str, spec: VideoSpec) -> str:
        return self.file(relative, encode_synth_video(spec))

    def manifest(self, name: str, records: list) -> None:
        lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
        self.file(name, ("\n".join(lines) + "\n").encode())


def _plant_bad(records: list, bad: list[dict], position_fraction: float, item, reason: str) -> None:
    """Insert the bad ``item`` at a fixed fraction of ``records`` and record its 1-based manifest line
    and expected rejection ``reason`` in ``bad``, moving the bad lines recorded earlier that it pushes down."""
    index = int(len(records) * position_fraction)
    records.insert(index, item)
    line = index + 1
    for b in bad:
        b["line"] += b["line"] >= line
    bad.append({"line": line, "reason": reason})


def _image_questions(spec: ImageSpec) -> list[tuple[str, str]]:
    return [
        ("What colour is the shape?", spec.colour),
        ("What shape is it?", spec.shape),
        ("What colour is the background?", spec.background),
        ("Describe the image.", spec.caption()),
    ]


def _video_questions(spec: VideoSpec) -> list[tuple[str, str]]:
    return [
        (f"Which way does the {spec.shape} move?", spec.direction),
        ("What colour is the moving shape?", spec.colour),
        ("Describe the video.", spec.text()),
    ]


def _chat_medium(w: _Writer, rng: random.Random, video: bool, stem: str) -> tuple[dict, list[tuple[str, str]]]:
    """A new video (``stem``.mp4) or image (``stem`` + its format's suffix) as a chat content item, and
    the questions about it (the last one, "Describe ...", open-ended)."""
    if video:
        spec_v = w.unique_video(rng)
        return {"type": "video", "video": w.video(f"{stem}.mp4", spec_v)}, _video_questions(spec_v)
    spec_i = w.unique_image(rng)
    return {"type": "image", "image": w.image(stem, spec_i)}, _image_questions(spec_i)


def generate(config: SynthConfig, *, progress: bool = True) -> dict:
    """Write the corpus; return the summary also written to ``synth.json``."""
    from tqdm import tqdm

    out = Path(config.out)
    if out.exists() and any(out.iterdir()):
        if not config.overwrite:
            raise FileExistsError(f"--out {out} is not empty (pass --overwrite to replace a previous corpus)")
        for name in (*SUBDIRS, *MANIFESTS, "synth.json"):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    for sub in SUBDIRS:
        (out / sub).mkdir(parents=True, exist_ok=True)
    w = _Writer(out)
    seed = config.seed
    total = config.images + config.videos + config.docs + config.sft + config.eval + config.rl + config.text
    bar = tqdm(total=total, desc="synth", unit="item", disable=not progress, dynamic_ncols=True)
    bad: dict[str, list[dict]] = {m: [] for m in BUILD_MANIFESTS}

    # Image-text pairs.
    rng = random.Random(f"{seed}/image_text")
    image_text = []
    for i in range(config.images):
        spec = w.unique_image(rng)
        path = w.image(f"images/img_{i:06d}", spec)
        image_text.append({"id": f"img-{i:06d}", "image": path, "text": spec.caption(rng.choice(CAPTION_TEMPLATES))})
        bar.update()
    truncated = encode_image(w.unique_image(rng))
    w.file("images/bad_truncated.png", truncated[: len(truncated) // 2])
    empty = w.image("images/bad_empty_text", w.unique_image(rng))
    for fraction, record, reason in (
        (0.25, {"id": "bad-truncated", "image": "images/bad_truncated.png", "text": "a red circle on a white background"}, "image_decode_error"),
        (0.5, {"id": "bad-missing", "image": "images/does_not_exist.png", "text": "a blue square"}, "missing_file"),
        (0.75, {"id": "bad-empty-text", "image": empty, "text": "   "}, "empty_text"),
        (0.9, '{"id": "bad-json", "image": "images/img_000000.png", "text": ', "malformed_json"),
    ):
        _plant_bad(image_text, bad["image_text.jsonl"], fraction, record, reason)
    w.manifest("image_text.jsonl", image_text)

    # Videos with timestamped captions.
    rng = random.Random(f"{seed}/video")
    videos = []
    for i in range(config.videos):
        spec = w.unique_video(rng)
        path = w.video(f"videos/vid_{i:06d}.mp4", spec)
        videos.append({"id": f"vid-{i:06d}", "video": path, "text": spec.text(), "captions": spec.captions()})
        bar.update()
    w.file("videos/bad_corrupt.mp4", bytes(rng.getrandbits(8) for _ in range(4096)))
    late = w.unique_video(rng)
    late_path = w.video("videos/bad_late_caption.mp4", late)
    for fraction, record, reason in (
        (0.3, {"id": "bad-corrupt", "video": "videos/bad_corrupt.mp4", "text": "a green star moves up"}, "video_decode_error"),
        (0.7, {"id": "bad-late-caption", "video": late_path,
               "captions": [{"start": late.seconds + 1.0, "end": late.seconds + 3.0, "text": late.text()}]}, "caption_out_of_range"),
    ):
        _plant_bad(videos, bad["video.jsonl"], fraction, record, reason)
    w.manifest("video.jsonl", videos)

    # Interleaved documents.
    rng = random.Random(f"{seed}/interleaved")
    docs = []
    openers = ("Here is a picture.", "Look at this image.", "This page shows some shapes.", "A short note about shapes.")
    for i in range(config.docs):
        segments: list[dict] = [{"text": rng.choice(openers)}]
        specs = [w.unique_image(rng) for _ in range(rng.randint(1, 3))]
        for j, spec in enumerate(specs):
            segments.append({"image": w.image(f"docs/doc_{i:06d}_{j}", spec)})
            lead = "It shows" if j == 0 else "The next one shows"
            segments.append({"text": f"{lead} {spec.caption()}."})
        if len(specs) > 1:
            segments.append({"text": f"There are {len(specs)} shapes: " + ", ".join(s.shape for s in specs) + "."})
        docs.append({"id": f"doc-{i:06d}", "segments": segments})
        bar.update()
    _plant_bad(docs, bad["interleaved.jsonl"], 0.5,
               {"id": "bad-missing-image", "segments": [{"text": "Look at this image."}, {"image": "docs/does_not_exist.png"}]},
               "missing_file")
    w.manifest("interleaved.jsonl", docs)

    # SFT conversations (one medium each; every fifth is a video).
    rng = random.Random(f"{seed}/sft")
    sft = []
    for i in range(config.sft):
        medium, questions = _chat_medium(w, rng, i % 5 == 0, f"sft_media/sft_{i:06d}")
        asked = rng.sample(questions, k=rng.choice([1, 1, 2]))
        messages: list[dict] = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.3 else []
        messages.append({"role": "user", "content": [medium, {"type": "text", "text": asked[0][0]}]})
        messages.append({"role": "assistant", "content": asked[0][1]})
        for question, answer in asked[1:]:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        sft.append({"id": f"sft-{i:06d}", "messages": messages})
        bar.update()
    spec_bad = w.unique_image(rng)
    bad_path = w.image("sft_media/bad_empty_answer", spec_bad)
    _plant_bad(sft, bad["sft.jsonl"], 0.5, {"id": "bad-empty-answer", "messages": [
        {"role": "user", "content": [{"type": "image", "image": bad_path}, {"type": "text", "text": "What colour is the shape?"}]},
        {"role": "assistant", "content": ""},
    ]}, "empty_text")
    w.manifest("sft.jsonl", sft)

    # Held-out evaluation: media that no manifest refers to.
    rng = random.Random(f"{seed}/eval")
    evaluation = []
    for i in range(config.eval):
        if i % 4 == 3:
            spec_v = w.unique_video(rng)
            path = w.video(f"eval_media/eval_{i:06d}.mp4", spec_v)
            question, answer, choices = rng.choice([
                (f"Which way does the {spec_v.shape} move?", spec_v.direction, list(DIRECTIONS)),
                ("What colour is the moving shape?", spec_v.colour, list(COLOURS)),
            ])
            media_type = "video"
        else:
            spec_i = w.unique_image(rng)
            path = w.image(f"eval_media/eval_{i:06d}", spec_i)
            question, answer, choices = rng.choice([
                ("What colour is the shape?", spec_i.colour, list(COLOURS)),
                ("What shape is it?", spec_i.shape, list(SHAPES)),
                ("What colour is the background?", spec_i.background, list(BACKGROUNDS)),
            ])
            media_type = "image"
        evaluation.append({
            "id": f"eval-{i:06d}", "media": path, "media_type": media_type, "question": question,
            "answer": answer, "choices": choices,
        })
        bar.update()
    w.manifest("eval.jsonl", evaluation)

    # RL prompts: the eval kinds of questions about media of their own, every fourth a video.
    rng = random.Random(f"{seed}/rl")
    rl = []
    for i in range(config.rl):
        medium, questions = _chat_medium(w, rng, i % 4 == 3, f"rl_media/rl_{i:06d}")
        question, answer = rng.choice(questions[:-1])  # the closed questions, not "Describe ..."
        messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.3 else []
        messages.append({"role": "user", "content": [medium, {"type": "text", "text": question}]})
        rl.append({"id": f"rl-{i:06d}", "messages": messages, "answer": answer, "reward": "exact_match"})
        bar.update()
    wrong_type = w.image("rl_media/bad_answer_type", w.unique_image(rng))
    for fraction, record, reason in (
        (0.4, {"id": "bad-missing-image", "messages": [{"role": "user", "content": [
            {"type": "image", "image": "rl_media/does_not_exist.png"}, {"type": "text", "text": "What shape is it?"}]}],
            "answer": "star", "reward": "exact_match"}, "missing_file"),
        (0.8, {"id": "bad-answer-type", "messages": [{"role": "user", "content": [
            {"type": "image", "image": wrong_type}, {"type": "text", "text": "What colour is the shape?"}]}],
            "answer": ["red"], "reward": "exact_match"}, "invalid_fields"),
    ):
        _plant_bad(rl, bad["rl.jsonl"], fraction, record, reason)
    w.manifest("rl.jsonl", rl)

    # Text-only conversations about the corpus' vocabulary (build-sft; the distillation stage's `text` source).
    rng = random.Random(f"{seed}/text")
    kinds = {**{c: "a colour" for c in COLOURS}, **{s: "a shape" for s in SHAPES}, **{d: "a direction" for d in DIRECTIONS}}
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    text = []
    for i in range(config.text):
        colour, shape, background = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
        word = rng.choice(list(kinds))
        others = rng.sample([c for c in COLOURS] + list(DIRECTIONS), 2)
        direction = rng.choice(list(DIRECTIONS))
        question, answer = rng.choice([
            (f"Is {word} a colour, a shape or a direction?", kinds[word]),
            (f"Which of these is a shape: {others[0]}, {shape} or {others[1]}?", shape),
            (f"What is the opposite of {direction}?", opposite[direction]),
            (f"Describe a {colour} {shape} on a {background} background in a few words.",
             rng.choice(CAPTION_TEMPLATES).format(colour=colour, shape=shape, background=background)),
        ])
        messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.3 else []
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        text.append({"id": f"text-{i:06d}", "messages": messages})
        bar.update()
    w.manifest("text.jsonl", text)
    bar.close()

    summary = {
        "seed": seed,
        "counts": {"image_text": config.images, "videos": config.videos, "docs": config.docs, "sft": config.sft, "eval": config.eval,
                   "rl": config.rl, "text": config.text},
        "manifest_lines": {"image_text.jsonl": len(image_text), "video.jsonl": len(videos), "interleaved.jsonl": len(docs),
                           "sft.jsonl": len(sft), "eval.jsonl": len(evaluation), "rl.jsonl": len(rl),
                           "text.jsonl": len(text)},
        "bad_lines": bad,
        "vocabulary": {"colours": list(COLOURS), "shapes": list(SHAPES), "backgrounds": list(BACKGROUNDS),
                       "directions": list(DIRECTIONS)},
        "caption_templates": list(CAPTION_TEMPLATES),
        "video_fps": VIDEO_FPS,
        "files": w.files + 1,
        "bytes": w.bytes,
    }
    w.file("synth.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (must be empty, or pass --overwrite)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--images", type=int, default=400, help="image-caption pairs (default 400)")
    parser.add_argument("--videos", type=int, default=48, help="captioned videos (default 48)")
    parser.add_argument("--docs", type=int, default=120, help="interleaved documents (default 120)")
    parser.add_argument("--sft", type=int, default=300, help="SFT conversations (default 300)")
    parser.add_argument("--eval", type=int, default=80, help="held-out eval questions (default 80)")
    parser.add_argument("--rl", type=int, default=96, help="RL prompts with reference answers (default 96)")
    parser.add_argument("--text", type=int, default=200, help="text-only conversations (default 200)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous corpus in --out")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    counts = [args.images, args.videos, args.docs, args.sft, args.eval, args.rl, args.text]
    if min(counts) < 0:
        print("synth: error: counts must not be negative", file=sys.stderr)
        return 2
    config = SynthConfig(args.out, args.seed, *counts, overwrite=args.overwrite)
    started = time.monotonic()
    try:
        summary = generate(config, progress=args.progress)
    except FileExistsError as e:
        print(f"synth: error: {e}", file=sys.stderr)
        return 2
    lines = summary["manifest_lines"]
    print(
        f"synth: wrote {summary['files']} files ({summary['bytes'] / 1e6:.1f} MB) to {args.out} in "
        f"{time.monotonic() - started:.1f} s\n  manifests: " + ", ".join(f"{k} {v} lines" for k, v in lines.items())
        + f"\n  deliberately bad lines: {sum(len(v) for v in summary['bad_lines'].values())} (see synth.json)"
    )
    return 0
