"""Held-out accuracy of a checkpoint on closed-vocabulary questions about images and videos.

    python -m pretrain.evaluate --ckpt runs/sft/checkpoints --eval demo_out/raw/eval.jsonl

``eval.jsonl`` lines (as ``python -m data_tools synth`` writes them): ``{"media": path (relative to the
file), "media_type": "image" | "video", "question", "answer", "choices": [...]}``. Two scores:

* ``generated``: the greedy answer's final answer (as the RL ``exact_match`` reward reads it: "The answer
  is B.", "Answer: (B)", "**B**", a last line) equals the expected answer, or begins with its words
  ("Red circle" for "red"); case and punctuation ignored (:func:`generated_answer_correct`) — the model
  answers by itself;
* ``choice``: the expected answer is the most likely of the choices (sum of token log-probabilities),
  the usual multiple-choice scoring, less noisy for small models.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from pretrain.checkpoint import CheckpointError
from pretrain.generate import (
    InferenceModel,
    choice_log_likelihoods,
    encode_prompt,
    generate_answers,
    load_inference_model,
    load_media,
)
from pretrain.posttrain.rewards import answer_words, extract_final_answer, normalize_answer


MAX_ANSWER_TOKENS = 16  # room for "The answer is (B)." (4 tokens cut it to "The answer is")
# A final answer that opens with the article "a" before a word ("a circle", "A red square"): not choice A.
_ARTICLE_FIRST = re.compile(r"\W*a\s+\w", re.IGNORECASE)


def generated_answer_correct(answer: str, expected: str) -> bool:
    """Whether a generated ``answer`` gives the ``expected`` one: its final answer
    (:func:`~pretrain.posttrain.rewards.extract_final_answer`) equals it after
    :func:`~pretrain.posttrain.rewards.normalize_answer`, or the final answer's first words are its
    words (:func:`~pretrain.posttrain.rewards.answer_words`: "(A) circle" for "A", "3 apples" for "3";
    whole words only, so "Blue" never gives "B"; the article of "a circle" is not the letter "A"). An
    empty expected answer is never given."""
    final = extract_final_answer(answer)
    target = answer_words(expected)
    if not target:
        return False
    if normalize_answer(final) == normalize_answer(expected):
        return True
    if target == ["a"] and _ARTICLE_FIRST.match(final):
        return False
    return answer_words(final)[:len(target)] == target


def evaluate(im: InferenceModel, eval_file: str | Path, limit: int | None = None, batch_size: int = 32) -> dict:
    """Accuracy overall and per media type: {"all": {"n", "generated", "choice"}, "image": ..., ...}.

    Questions run ``batch_size`` at a time (one batched greedy generation and one packed forward for
    all their choices); the result does not depend on it beyond float rounding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or none: every question)")
    eval_file = Path(eval_file)
    items = [json.loads(line) for line in eval_file.read_text().splitlines() if line.strip()][:limit]
    if not items:
        raise ValueError(f"{eval_file}: no questions")
    hits: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for first in range(0, len(items), batch_size):
        batch = items[first:first + batch_size]
        prompts = [encode_prompt(im, load_media(eval_file.parent / item["media"], item["media_type"], im.frames),
                                 item["media_type"], item["question"]) for item in batch]
        answers = generate_answers(im, prompts, max_new_tokens=MAX_ANSWER_TOKENS)
        scores = choice_log_likelihoods(im, prompts, [item["choices"] for item in batch])
        for item, answer, score in zip(batch, answers, scores):
            generated = generated_answer_correct(answer, item["answer"])
            chosen = item["choices"][max(range(len(score)), key=score.__getitem__)].lower() == item["answer"].lower()
            hits[item["media_type"]].append((generated, chosen))
            hits["all"].append((generated, chosen))
    return {kind: {"n": len(v), "generated": sum(g for g, _ in v) / len(v), "choice": sum(c for _, c in v) / len(v)}
            for kind, v in hits.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoints folder (its latest) or a step directory")
    parser.add_argument("--eval", required=True, help="eval.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--batch-size", type=int, default=32, help="questions per batch (default 32)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        result = evaluate(load_inference_model(args.ckpt), args.eval, args.limit, args.batch_size)
    except (CheckpointError, OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        for kind, r in result.items():
            print(f"{kind:>6}: {r['n']:>4} questions, generated answer correct {r['generated']:.1%}, "
                  f"best choice correct {r['choice']:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
