"""Our chat template renderer against the official Qwen3-VL Instruct chat template (Jinja, via transformers)."""

from __future__ import annotations

import hashlib

import pytest

from common.tokens.chat_template import OFFICIAL_TEMPLATE_FILE, chat_segments, render_chat

# common/tokens/qwen3_vl_chat_template.jinja is the ``chat_template`` of the published Qwen3-VL Instruct
# checkpoints, byte for byte (5,292 bytes; the SHA-256 below is the one of the shipped template).
TEMPLATE_PATH = OFFICIAL_TEMPLATE_FILE
TEMPLATE_SHA256 = "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"

IMG = {"type": "image", "image": "img0.jpg"}
VID = {"type": "video", "video": "vid0.mp4"}

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [IMG, {"type": "text", "text": "What colour is the shape?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "text", "text": "And this one?\n"}, IMG, IMG]},
        {"role": "assistant", "content": [{"type": "text", "text": "blue"}, {"type": "text", "text": " and green"}]},
    ],
    [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": " Really."}]},
        {"role": "user", "content": [VID, {"type": "text", "text": "Which way does the square move?"}]},
        {"role": "assistant", "content": "left"},
    ],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": [{"image_url": "x.png"}, {"video": "v.mp4"}, {"text": "  spaces  \n\n"}]},
        {"role": "assistant", "content": "  \nmultiline\nanswer\n"},
        {"role": "user", "content": "中文？"},
    ],
]


@pytest.fixture(scope="module")
def official(qwen_tokenizer):
    """transformers' apply_chat_template with the official template (the processor's rendering path)."""
    from transformers import PreTrainedTokenizerFast

    template = TEMPLATE_PATH.read_text(encoding="utf-8")
    assert hashlib.sha256(template.encode()).hexdigest() == TEMPLATE_SHA256
    hf = PreTrainedTokenizerFast(tokenizer_file=qwen_tokenizer.source)

    def render(messages, **kwargs):
        return hf.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)

    return render


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("options", [{}, {"add_generation_prompt": True}, {"add_vision_id": True}])
def test_render_matches_official_template(official, index, options):
    messages = CONVERSATIONS[index]
    assert render_chat(messages, **options) == official(messages, **options)


def test_segments_mark_assistant_targets_and_media():
    segments = chat_segments(CONVERSATIONS[1])
    targets = "".join(s.text for s in segments if s.target)
    assert targets == "red<|im_end|>blue and green<|im_end|>"
    media = [(s.kind, s.index, s.media) for s in segments if s.kind in ("image", "video")]
    assert media == [("image", 0, "img0.jpg"), ("image", 1, "img0.jpg"), ("image", 2, "img0.jpg")]
    # Data text is marked as content (checked for reserved tokens); template text is not.
    assert [s.text for s in segments if s.is_content][:2] == ["You are a helpful assistant.", "What colour is the shape?"]


def test_an_assistant_turn_with_loss_false_is_context_not_target(official):
    messages = [dict(m) for m in CONVERSATIONS[1]]
    messages[2]["loss"] = False  # ms-swift's flag on the first assistant turn
    assert render_chat(messages) == official(messages) == render_chat(CONVERSATIONS[1])  # the text is unchanged
    assert "".join(s.text for s in chat_segments(messages) if s.target) == "blue and green<|im_end|>"
    messages[4] = {**messages[4], "loss": True}  # true: a target, as without the flag
    assert "".join(s.text for s in chat_segments(messages) if s.target) == "blue and green<|im_end|>"


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty"),
        ([{"role": "user", "content": "x", "loss": True}], "only assistant messages are SFT targets"),
        ([{"role": "assistant", "content": "x", "loss": 0}], "'loss' must be a bool, got int"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "tool", "content": "x"}], "role 'tool' is not supported"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "must be the first message"),
        ([{"role": "assistant", "content": [IMG]}], "only allowed in user messages"),
        ([{"role": "system", "content": [VID]}], "only allowed in user messages"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "neither text, image nor video"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "must hold a str"),
        ([{"role": "user", "content": 5}], "content must be a str or a list"),
        ([{"role": "assistant", "content": "x", "tool_calls": [{"name": "f"}]}], "tool_calls"),
    ],
)
def test_content_the_official_template_would_drop_is_an_error(messages, match):
    with pytest.raises(ValueError, match=match):
        chat_segments(messages)
