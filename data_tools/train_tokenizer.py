"""Train a small byte-level BPE tokenizer (Qwen pre-tokeniser, NFC, Qwen3-VL special tokens) on corpus text.

Reads the texts of manifests (``--manifest``, the JSONL inputs of the build-* commands) and/or of built
shard sets (``--shards``): captions, interleaved text segments, video descriptions and timed captions
(as the sample encoder writes them, with ``<t seconds>`` frame timestamps), and SFT messages (with their
role headers). Writes ``OUT/tokenizer.json`` (load it with ``common.tokens.tokenizer.Tokenizer.from_dir``)
and ``OUT/tokenizer_info.json`` (sources, counts, vocabulary size). Unreadable lines are skipped and
counted, never fatal. The same inputs and options give a byte-identical tokenizer.json.

Example: python -m data_tools train-tokenizer --manifest synth/image_text.jsonl --manifest synth/sft.jsonl \\
    --vocab-size 2048 --out tokenizers/demo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", action="append", default=[], metavar="M.jsonl",
                        help="a JSONL manifest of any build-* kind (repeatable)")
    parser.add_argument("--shards", action="append", default=[], metavar="DIR",
                        help="a built shard set folder with shard-*.tar (repeatable)")
    parser.add_argument("--vocab-size", type=int, required=True,
                        help="total ids: 256 bytes + merges + 26 special tokens (e.g. 2048)")
    parser.add_argument("--min-frequency", type=int, default=2, help="least occurrences of a pair to merge it")
    parser.add_argument("--out", required=True, help="output folder for tokenizer.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------------------------------------
# Text extraction
# --------------------------------------------------------------------------------------------------------


def _timestamps_text(duration: float) -> str:
    """Frame-group timestamps a 2 fps video of ``duration`` seconds gets in its encoded text."""
    from common.media.frame_sampling import format_timestamp

    count = max(1, int(duration))  # one frame group per second at 2 fps
    return "".join(format_timestamp(i + 0.25) for i in range(min(count, 600)))


def _seconds(value: object, name: str) -> float:
    """A caption or video time as a finite float. Raises ValueError (the line is skipped and counted)
    for anything else: a non-number, an infinity (JSON's ``1e999``) or NaN, whose timestamp text could
    not be written (``int(inf)`` raised OverflowError, which ended the command)."""
    try:
        seconds = float(value)
    except OverflowError:  # an integer too large for a float
        raise ValueError(f"{name} {value!r:.40} is not a finite number of seconds") from None
    if not math.isfinite(seconds):
        raise ValueError(f"{name} {value!r} is not a finite number of seconds")
    return seconds


def _content_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a str or a list")
    parts = []
    for item in content:
        if isinstance(item, Mapping) and isinstance(item.get("text"), str):
            parts.append(item["text"])
    return "".join(parts)


def texts_of_record(record: Mapping) -> list[str]:
    """The texts one manifest line or sample JSON contributes (see the module docstring)."""
    from common.media.frame_sampling import CAPTION_FORMAT

    if not isinstance(record, Mapping):
        raise ValueError("line is not a JSON object")
    texts: list[str] = []
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise ValueError("'messages' must be a list")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise ValueError(f"message {i} has no role")
            texts.append(f"{message['role']}\n{_content_text(message.get('content', ''), f'message {i}')}")
    elif "segments" in record:
        if not isinstance(record["segments"], list):
            raise ValueError("'segments' must be a list")
        texts.append("".join(s["text"] for s in record["segments"] if isinstance(s, Mapping) and isinstance(s.get("text"), str)))
    else:
        if isinstance(record.get("text"), str):
            texts.append(record["text"])
        captions = record.get("captions") or []
        if not isinstance(captions, list):
            raise ValueError("'captions' must be a list")
        end = 0.0
        for c in captions:
            if isinstance(c, Mapping) and isinstance(c.get("text"), str):
                start, stop = _seconds(c.get("start", 0.0), "caption start"), _seconds(c.get("end", 0.0), "caption end")
                texts.append(CAPTION_FORMAT.format(start=start, end=stop, text=c["text"]))
                end = max(end, stop)
        if "video" in record:
            texts.append(_timestamps_text(end or _seconds(record.get("duration", 1.0) or 1.0, "duration")))
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("no text")
    return texts


def iter_manifest_texts(path: Path, skipped: Counter) -> Iterator[str]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                yield from texts_of_record(record)
            except (UnicodeDecodeError, json.JSONDecodeError):
                skipped[f"{path.name}: malformed JSON/UTF-8"] += 1
            except (ValueError, TypeError) as err:
                skipped[f"{path.name}: {err}"] += 1


def iter_shard_texts(folder: Path, skipped: Counter) -> Iterator[str]:
    from data_tools.schema import JSON_PART, SchemaError
    from data_tools.shards import iter_shard

    shards = sorted(folder.glob("shard-*.tar"))
    if not shards:
        raise FileNotFoundError(f"{folder}: no shard-*.tar files")
    for shard in shards:
        for key, parts in iter_shard(shard):
            try:
                yield from texts_of_record(json.loads(parts[JSON_PART]))
            except (KeyError, ValueError, SchemaError) as err:
                skipped[f"{shard.name}: {type(err).__name__}: {err}"] += 1


# --------------------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".info-", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from common.tokens.tokenizer import Tokenizer, train_byte_level_bpe

    sources = [("manifest", Path(p)) for p in args.manifest] + [("shards", Path(p)) for p in args.shards]
    if not sources:
        print("train-tokenizer: give at least one --manifest or --shards")
        return 2
    for kind, path in sources:
        if (kind == "manifest" and not path.is_file()) or (kind == "shards" and not path.is_dir()):
            print(f"train-tokenizer: {kind} {path} does not exist")
            return 2
    skipped: Counter = Counter()
    stats = {"texts": 0, "chars": 0}
    progress = tqdm(desc="reading texts", unit=" texts", disable=args.no_progress)

    def corpus() -> Iterable[str]:
        for kind, path in sources:
            texts = iter_manifest_texts(path, skipped) if kind == "manifest" else iter_shard_texts(path, skipped)
            for text in texts:
                stats["texts"] += 1
                stats["chars"] += len(text)
                progress.update()
                yield text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        path = train_byte_level_bpe(corpus(), args.vocab_size, out, min_frequency=args.min_frequency)
    except ValueError as err:
        progress.close()
        print(f"train-tokenizer: {err}")
        return 2
    progress.close()
    if stats["texts"] == 0:
        path.unlink(missing_ok=True)
        print("train-tokenizer: no usable text in the inputs")
        return 1
    tokenizer = Tokenizer.from_file(path)
    info = {
        "vocab_size": tokenizer.vocab_size,
        "requested_vocab_size": args.vocab_size,
        "min_frequency": args.min_frequency,
        "special_token_ids": tokenizer.special_token_ids,
        "sources": [f"{kind}:{p}" for kind, p in sources],
        "texts": stats["texts"],
        "chars": stats["chars"],
        "skipped": dict(sorted(skipped.items())),
    }
    _write_json_atomic(out / "tokenizer_info.json", info)
    print(f"train-tokenizer: {stats['texts']} texts ({stats['chars']} chars) from {len(sources)} source(s); "
          f"vocabulary {tokenizer.vocab_size} ids (asked {args.vocab_size}); skipped {sum(skipped.values())} line(s)")
    for reason, count in sorted(skipped.items())[:10]:
        print(f"  skipped {count} x {reason}")
    print(f"train-tokenizer: wrote {path}")
    return 0
