"""EncodedSample of every sample kind against transformers' Qwen3VLProcessor and get_rope_index."""

from __future__ import annotations


import numpy as np
import PIL.Image
import pytest
import torch

from pretrain.data.encoding import Caption, EncodingConfig, SampleEncoder
from pretrain.data.sample import IGNORE_INDEX
from common.media.frame_sampling import VideoClip, sample_frame_indices
from common.media.vision_inputs import VisionInputConfig
from common.tokens.chat_template import OFFICIAL_TEMPLATE_FILE

TEMPLATE = OFFICIAL_TEMPLATE_FILE.read_text(encoding="utf-8")
VIDEO_FPS = 10.0


def _image(seed, height, width):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, seed * 40 % 256)], -1)
    return PIL.Image.fromarray(np.clip(base + rng.normal(0, 15, base.shape), 0, 255).astype(np.uint8))


def _video(seed, frames, height, width):
    rng = np.random.default_rng(seed)
    t = np.arange(frames)[:, None, None]
    y, x = np.mgrid[0:height, 0:width]
    red = (x[None] * 2 + t * 9) % 256
    return np.clip(np.stack([red, np.broadcast_to(y * 3 % 256, red.shape), red // 2], -1)
                   + rng.normal(0, 8, (frames, height, width, 3)), 0, 255).astype(np.uint8)


def _clip(video):
    """What our loader does: sample at 2 fps, decode those frames, keep their times."""
    indices = sample_frame_indices(len(video), VIDEO_FPS)
    return VideoClip.from_indices(video[indices], indices, VIDEO_FPS)


def _reference(processor, rope_model, text, images=None, videos=None):
    from transformers.video_utils import VideoMetadata

    kwargs = {}
    if videos:
        kwargs = dict(
            videos=videos, do_sample_frames=True, cap_pixels_per_frame=False,
            video_metadata=[VideoMetadata(total_num_frames=len(v), fps=VIDEO_FPS) for v in videos],
        )
    out = processor(text=[text], images=images, return_tensors="pt", **kwargs)
    positions, _ = rope_model.get_rope_index(
        out["input_ids"], out["mm_token_type_ids"], out.get("image_grid_thw"),
        out["video_grid_thw"].clone() if "video_grid_thw" in out else None,
    )
    out["position_ids"] = positions[:, 0]
    return out


def _assert_same(sample, ref, *, drop_last=0):
    n = sample.num_tokens - drop_last
    assert sample.input_ids[:n].tolist() == ref["input_ids"][0].tolist()
    assert torch.equal(sample.mm_token_type_ids[:n], ref["mm_token_type_ids"][0].long())
    assert torch.equal(sample.position_ids[:, :n], ref["position_ids"])
    if "pixel_values" in ref:
        assert torch.equal(sample.image_grid_thw, ref["image_grid_thw"])
        assert torch.equal(sample.pixel_values, ref["pixel_values"])
    else:
        assert sample.pixel_values.shape == (0, 1536) and sample.image_grid_thw.shape == (0, 3)
    if "pixel_values_videos" in ref:
        assert torch.equal(sample.video_grid_thw, ref["video_grid_thw"])
        torch.testing.assert_close(sample.pixel_values_videos, ref["pixel_values_videos"], rtol=0, atol=2e-7)
    else:
        assert sample.pixel_values_videos.shape == (0, 1536)


@pytest.fixture(scope="module")
def encoder(qwen_tokenizer):
    return SampleEncoder(qwen_tokenizer)


def _assert_pretraining_labels(sample, tokenizer):
    ids, labels, types = sample.input_ids, sample.labels, sample.mm_token_type_ids
    assert labels[0] == IGNORE_INDEX
    assert torch.all(labels[types != 0] == IGNORE_INDEX)  # visual placeholders never
    text = (types == 0).clone()
    text[0] = False
    assert torch.equal(labels[text], ids[text])  # every other text token is a target
    assert ids[-1] == tokenizer.eos_id and labels[-1] == tokenizer.eos_id


def test_image_text(encoder, reference_processor, rope_model, qwen_tokenizer):
    image = _image(1, 120, 200)
    sample = encoder.encode_image_text(image, "a red circle on a white background", sample_id="s1")
    ref = _reference(reference_processor, rope_model, "<|vision_start|><|image_pad|><|vision_end|>a red circle on a white background", [image])
    _assert_same(sample, ref, drop_last=1)
    _assert_pretraining_labels(sample, qwen_tokenizer)
    assert sample.kind == "image_text" and sample.sample_id == "s1"
    assert sample.num_visual_tokens == int(sample.image_grid_thw.prod()) // 4
    assert sample.counts()["text_tokens"] == sample.num_tokens - sample.num_visual_tokens


def test_interleaved_multi_image(encoder, reference_processor, rope_model, qwen_tokenizer):
    images = [_image(2, 64, 64), _image(3, 300, 90), _image(4, 200, 333)]
    segments = ["Intro text. ", images[0], images[1], " middle\n\n", images[2], "The end."]
    sample = encoder.encode_interleaved(segments)
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    text = "Intro text. " + placeholder * 2 + " middle\n\n" + placeholder + "The end."
    _assert_same(sample, _reference(reference_processor, rope_model, text, images), drop_last=1)
    _assert_pretraining_labels(sample, qwen_tokenizer)
    assert sample.image_grid_thw.shape == (3, 3)


def test_video_with_captions(encoder, reference_processor, rope_model, qwen_tokenizer):
    video = _video(5, 37, 72, 120)  # 3.7 s at 10 fps -> 7 sampled frames -> 4 frame groups
    captions = [Caption(0.0, 1.5, "a blue square appears"), Caption(1.5, 3.7, "it moves left")]
    sample = encoder.encode_video(_clip(video), text="A square.", captions=captions)
    lines = "A square.\n<0.0 - 1.5 seconds> a blue square appears\n<1.5 - 3.7 seconds> it moves left"
    ref = _reference(reference_processor, rope_model, "<|video_pad|>" + lines, videos=[video])
    _assert_same(sample, ref, drop_last=1)
    _assert_pretraining_labels(sample, qwen_tokenizer)
    assert sample.video_grid_thw[0, 0] == 4
    # Layout: per frame group "<t seconds>" <|vision_start|> pads <|vision_end|>, never nested markers.
    text = qwen_tokenizer.decode(sample.input_ids.tolist())
    assert text.startswith("<0.3 seconds><|vision_start|><|video_pad|>")
    assert text.count("<|vision_start|>") == text.count("<|vision_end|>") == 4
    assert "<|vision_end|><1.5 seconds><|vision_start|>" in text  # frames 12 and 18 -> (1.2 + 1.8) / 2


def test_sft_conversation(encoder, reference_processor, rope_model, qwen_tokenizer):
    from transformers import PreTrainedTokenizerFast

    images = [_image(6, 100, 100), _image(7, 90, 160)]
    video = _video(8, 24, 64, 64)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "What colour is the shape?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "video", "video": _clip(video)}, {"type": "image", "image": images[1]},
                                     {"type": "text", "text": "Which way does it move?"}]},
        {"role": "assistant", "content": "left\n"},
    ]
    sample = encoder.encode_conversation(messages)
    # Reference: the official template, then the processor. Qwen3-VL's own processor replaces the whole
    # "<|vision_start|><|video_pad|><|vision_end|>" by the frame groups; transformers 5.24 replaces the
    # pad only (nesting the markers), so the triple is reduced to the bare pad before calling it.
    hf = PreTrainedTokenizerFast(tokenizer_file=qwen_tokenizer.source)
    text = hf.apply_chat_template(
        [{**m, "content": [{k: (v if k in ("type", "text") else "ref") for k, v in c.items()} for c in m["content"]]}
         if isinstance(m["content"], list) else m for m in messages],
        chat_template=TEMPLATE, tokenize=False,
    )
    text = text.replace("<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>")
    ref = _reference(reference_processor, rope_model, text, images, [video])
    _assert_same(sample, ref)
    # Targets: exactly the assistant turns' content and their <|im_end|>, nothing else.
    ids = sample.input_ids.tolist()
    expected = [IGNORE_INDEX] * len(ids)
    im_start, im_end = qwen_tokenizer.im_start_id, qwen_tokenizer.im_end_id
    header = qwen_tokenizer.encode("assistant\n")
    for i, tid in enumerate(ids):
        if tid == im_start and ids[i + 1 : i + 1 + len(header)] == header:
            j = i + 1 + len(header)
            while ids[j - 1] != im_end:
                expected[j] = ids[j]
                j += 1
    assert sample.labels.tolist() == expected
    assert qwen_tokenizer.decode([t for t in sample.labels.tolist() if t != IGNORE_INDEX]) == "red<|im_end|>left\n<|im_end|>"
    assert sample.kind == "sft" and ids[-1] == qwen_tokenizer.encode("\n")[0]


def test_sft_turn_with_loss_false_is_context_without_targets(encoder, qwen_tokenizer):
    """ms-swift's ``"loss": false``: the first assistant turn stays in the sequence, only the second is learnt."""
    messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello.", "loss": False},
                {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "red"}]
    sample = encoder.encode_conversation(messages)
    plain = encoder.encode_conversation([{k: v for k, v in m.items() if k != "loss"} for m in messages])
    assert torch.equal(sample.input_ids, plain.input_ids)  # the same tokens: context is kept
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    second = len(ids) - 1 - ids[::-1].index(qwen_tokenizer.im_start_id)  # the <|im_start|> of the last turn
    assert all(label == IGNORE_INDEX for label in labels[:second])  # nothing of the first turn, <|im_end|> included
    assert qwen_tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "red<|im_end|>"
    assert qwen_tokenizer.decode([t for t in plain.labels.tolist() if t != IGNORE_INDEX]) == "Hello.<|im_end|>red<|im_end|>"
    with pytest.raises(ValueError, match="no SFT target"):
        encoder.encode_conversation([*messages[:3], {**messages[3], "loss": False}])


def test_sft_media_from_lists_and_generation_kinds(encoder, qwen_tokenizer):
    image = _image(9, 64, 64)
    inline = encoder.encode_conversation(
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "?"}]},
         {"role": "assistant", "content": "ok"}]
    )
    listed = encoder.encode_conversation(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
         {"role": "assistant", "content": "ok"}], images=[image]
    )
    assert torch.equal(inline.input_ids, listed.input_ids) and torch.equal(inline.pixel_values, listed.pixel_values)
    with pytest.raises(ValueError, match="only 0 images were given"):
        encoder.encode_conversation([{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="2 images given"):
        encoder.encode_conversation([{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}],
                                    images=[image, image])
    with pytest.raises(ValueError, match="no assistant message"):
        encoder.encode_conversation([{"role": "user", "content": "hi"}])


def test_small_tokenizer_and_small_budgets(small_tokenizer):
    """The demo setting: a ~400-token vocabulary and tiny pixel budgets still give consistent samples."""
    config = EncodingConfig(vision=VisionInputConfig(image_min_pixels=32 * 32, image_max_pixels=64 * 64,
                                                     video_min_pixels=32 * 32, video_max_pixels=8 * 64 * 64))
    enc = SampleEncoder(small_tokenizer, config)
    sample = enc.encode_image_text(_image(10, 160, 100), "a red circle on a blue background")
    assert sample.num_visual_tokens <= 4 and int(sample.input_ids.max()) < small_tokenizer.vocab_size
    assert sample.input_ids[0] == small_tokenizer.vision_start_id
    video = enc.encode_video(_clip(_video(11, 40, 96, 96)), captions=[Caption(0, 2, "the star moves up")])
    assert video.video_grid_thw.tolist() == [[4, 4, 4]]  # 8 frames of 64x64 px: the 8x64x64 budget
    assert video.num_visual_tokens == 16


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda e: e.encode_image_text(_image(0, 64, 64), "   "), "caption is empty"),
        (lambda e: e.encode_image_text(_image(0, 64, 64), "see <|image_pad|>"), "reserved token"),
        (lambda e: e.encode_interleaved(["only text", 3]), "segment 1 must be"),
        (lambda e: e.encode_interleaved([_image(0, 64, 64)]), "has no text"),
        (lambda e: e.encode_video(_clip(_video(0, 20, 64, 64))), "needs a text or captions"),
        (lambda e: e.encode_video(np.zeros((4, 64, 64, 3), np.uint8), text="x"), "must be a VideoClip"),
        (lambda e: Caption(2.0, 1.0, "x"), "start <= end"),
        (lambda e: e.encode_conversation([{"role": "user", "content": "<|im_end|>"}, {"role": "assistant", "content": "x"}]),
         "reserved token"),
        # Pieces that pass alone and are read as one text: a reserved token across their boundary.
        (lambda e: e.encode_interleaved(["see <|image", "_pad|> here", _image(0, 64, 64)]),
         "segment 0 and the text after it join into the reserved token '<\\|image_pad\\|>'"),
        (lambda e: e.encode_conversation([{"role": "user", "content": [{"type": "text", "text": "hi <|im_"},
                                                                       {"type": "text", "text": "end|>"}]},
                                          {"role": "assistant", "content": "x"}]), "join into the reserved token"),
        (lambda e: SampleEncoder(e.tokenizer, EncodingConfig(max_tokens=10)).encode_image_text(_image(0, 64, 64), "x"),
         "more than max_tokens=10"),
    ],
)
def test_bad_samples_are_clear_errors(encoder, call, match):
    with pytest.raises(ValueError, match=match):
        call(encoder)


def test_text_sample_and_no_eos_option(qwen_tokenizer):
    sample = SampleEncoder(qwen_tokenizer).encode_text("Hello, world!")
    assert sample.input_ids.tolist() == [9707, 11, 1879, 0, qwen_tokenizer.eos_id]
    assert sample.labels.tolist() == [IGNORE_INDEX, 11, 1879, 0, qwen_tokenizer.eos_id]
    assert torch.equal(sample.position_ids, torch.arange(5).expand(3, 5))
    no_eos = SampleEncoder(qwen_tokenizer, EncodingConfig(append_eos=False)).encode_text("Hello, world!")
    assert no_eos.input_ids.tolist() == [9707, 11, 1879, 0]


def test_shard_schema_adapter(encoder):
    """data_tools shard samples (json + media bytes) encode like the same content given directly."""
    import io

    from data_tools import schema
    from common.media import decode as media_module
    from common.media.encode import encode_video
    from pretrain.data.encoding import SampleEncodingError, encode_shard_parts

    image = _image(12, 80, 120)
    png = io.BytesIO()
    image.save(png, format="PNG")
    png = png.getvalue()
    video = _video(13, 20, 64, 96)
    mp4 = encode_video(list(video), fps=VIDEO_FPS)
    img_media = schema.Media("img0.png", "image", "png", "0" * 64, len(png), 120, 80, "a.png")
    vid_media = schema.Media("vid0.mp4", "video", "mp4", "0" * 64, len(mp4), 96, 64, "v.mp4",
                             num_frames=20, fps=VIDEO_FPS, duration=2.0, backend="decord")
    src = schema.Source(1, "m.jsonl", "id-1")

    def parts(sample, **media):
        return {"json": schema.sample_to_json(sample), "__key__": sample.key, **media}

    text = encode_shard_parts(encoder, parts(schema.ImageTextSample("000000001", src, (img_media,), "a caption", "img0.png"),
                                             **{"img0.png": png}))
    assert torch.equal(text.input_ids, encoder.encode_image_text(image, "a caption").input_ids)
    assert torch.equal(text.pixel_values, encoder.encode_image_text(image, "a caption").pixel_values)
    assert text.sample_id == "id-1"

    inter = schema.InterleavedSample("000000002", src, (img_media,), (
        schema.Part("text", text="Before "), schema.Part("image", image="img0.png"), schema.Part("text", text=" after"),
        schema.Part("image", image="img0.png")))
    got = encode_shard_parts(encoder, parts(inter, **{"img0.png": png}))
    assert torch.equal(got.input_ids, encoder.encode_interleaved(["Before ", image, " after", image]).input_ids)

    vid = schema.VideoSample("000000003", src, (vid_media,), "vid0.mp4", text="moving",
                             captions=(schema.Caption(0.0, 1.0, "left"),))
    got = encode_shard_parts(encoder, parts(vid, **{"vid0.mp4": mp4}))
    decoded = media_module.read_video_frames(mp4, sample_frame_indices(20, VIDEO_FPS).tolist())
    clip = VideoClip.from_indices(decoded, sample_frame_indices(20, VIDEO_FPS), VIDEO_FPS)
    direct = encoder.encode_video(clip, text="moving", captions=[Caption(0.0, 1.0, "left")])
    assert torch.equal(got.input_ids, direct.input_ids) and torch.equal(got.pixel_values_videos, direct.pixel_values_videos)

    sft = schema.SftSample("000000004", src, (img_media, vid_media), (
        schema.Message("user", (schema.Part("image", image="img0.png"), schema.Part("video", video="vid0.mp4"),
                                schema.Part("text", text="what?"))),
        schema.Message("assistant", (schema.Part("text", text="a square"),))))
    got = encode_shard_parts(encoder, parts(sft, **{"img0.png": png, "vid0.mp4": mp4}))
    assert got.kind == "sft" and got.image_grid_thw.shape == (1, 3) and got.video_grid_thw.shape == (1, 3)
    assert encoder.tokenizer.decode([t for t in got.labels.tolist() if t != IGNORE_INDEX]) == "a square<|im_end|>"
    context = schema.SftSample("000000005", src, (), (
        schema.Message("user", (schema.Part("text", text="hi"),)),
        schema.Message("assistant", (schema.Part("text", text="hello"),), loss=False),
        schema.Message("user", (schema.Part("text", text="and?"),)),
        schema.Message("assistant", (schema.Part("text", text="bye"),))))
    got = encode_shard_parts(encoder, parts(context))
    assert encoder.tokenizer.decode(got.input_ids.tolist()).count("hello") == 1  # in the sequence, as context
    assert encoder.tokenizer.decode([t for t in got.labels.tolist() if t != IGNORE_INDEX]) == "bye<|im_end|>"

    with pytest.raises(SampleEncodingError, match="sample 000000001 \\(m.jsonl:1\\)") as err:
        encode_shard_parts(encoder, parts(schema.ImageTextSample("000000001", src, (img_media,), "a caption", "img0.png"),
                                          **{"img0.png": png[:100]}))
    assert err.value.reason != "invalid_sample"  # the media module's reason code is kept


def test_variable_frame_rate_shard_video_is_planned_as_decoded(encoder, vfr_mp4):
    """A VFR video in a shard: the plan (media sized from the record and the container's timestamps, no
    decoding) has the decoded sample's tokens, and both announce the frames' true times."""
    from data_tools import schema
    from common.media import decode as media_module
    from pretrain.data.encoding import encode_shard_parts

    info = media_module.probe_video(vfr_mp4)
    record = schema.Media("vid0.mp4", "video", "mp4", "0" * 64, len(vfr_mp4), info.width, info.height, "v.mp4",
                          num_frames=info.num_frames, fps=info.fps, duration=info.duration, backend=info.backend)
    sample = schema.VideoSample("000000001", schema.Source(1, "m.jsonl", "vfr"), (record,), "vid0.mp4", text="dusk")
    parts = {"json": schema.sample_to_json(sample), "__key__": sample.key, "vid0.mp4": vfr_mp4}
    planned = encode_shard_parts(encoder, parts, decode_media=False)
    decoded = encode_shard_parts(encoder, parts, decode_media=True)
    assert torch.equal(planned.input_ids, decoded.input_ids) and torch.equal(planned.position_ids, decoded.position_ids)
    text = encoder.tokenizer.decode(decoded.input_ids.tolist())
    assert "<2.7 seconds>" in text and "<5.8 seconds>" in text  # frames at 2.4 and 3.0 s; the last one
    assert "<1.8 seconds>" not in text  # frames 17 and 35 timed at i / average fps
