"""Rewards registered by name and combined with weights.

A reward function scores one decoded response: ``fn(response, reference) -> float``, ``reference``
being the prompt's reference answer (None when the prompt has none). Register one with
``@register_reward("name", needs_reference=True|False)``; select them in the config as a list of names
or of ``{name, weight}`` (weight 1.0 when omitted)::

    rewards: [exact_match, format]
    rewards: [{name: exact_match, weight: 1.0}, {name: format, weight: 0.2}]

The total reward of a response is sum_k weight_k * reward_k over the rewards that score its prompt: an RL
prompt's record names its own reward (``reward``, default ``exact_match``); a selected reward that some
record names scores only the prompts that name it, one that no record names (``format``) scores all, so
one prompt set can mix tasks. Responses are decoded *with* their special
tokens (``skip_special_tokens=False``): ``format`` checks the end-of-turn marker.

Built in:

* ``exact_match`` (needs a reference): 1.0 when the response's final answer (:func:`extract_final_answer`)
  equals the reference after :func:`normalize_answer`, else 0.0.
* ``format``: 1.0 when the response is well formed (:func:`format_reward`), else 0.0.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch

from common.tokens.tokenizer import ENDOFTEXT, IM_END, SPECIAL_TOKENS
from pretrain.posttrain.advantages import check_group_size

RewardFn = Callable[[str, "str | None"], float]


@dataclass(frozen=True)
class _Registered:
    fn: RewardFn
    needs_reference: bool


_REWARDS: dict[str, _Registered] = {}


def register_reward(name: str, *, needs_reference: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``fn(response, reference) -> float`` selectable as ``name``."""

    def add(fn: RewardFn) -> RewardFn:
        if name in _REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        _REWARDS[name] = _Registered(fn, needs_reference)
        return fn

    return add


def reward_names() -> list[str]:
    return sorted(_REWARDS)


# --------------------------------------------------------------------------------------------------
# answers

_END_MARKERS = (IM_END, ENDOFTEXT)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_PREFIX = re.compile(r"answer\s*:", re.IGNORECASE)
_ANSWER_IS = re.compile(r"\banswer\s+is\b\s*:?", re.IGNORECASE)  # "So the answer is B."


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: not an answer


def extract_final_answer(response: str) -> str:
    """The final answer of a response, by the first rule that applies:

    0. the text is cut at the first end marker (``<|im_end|>`` / ``<|endoftext|>``) and, for a thinking
       response, everything up to the last ``</think>`` is dropped;
    1. the content of the last ``<answer>...</answer>``;
    2. the content of the last ``\\boxed{...}``;
    3. the rest of the line after the last ``answer:`` anywhere (any case; covers "Final answer: ...") or
       ``answer is`` in the last non-empty line ("So the answer is **B**." -> "**B**."), whichever comes
       last. ``answer is`` only counts in the last line: "The answer is below" is not an answer;
    4. the last non-empty line.
    """
    for marker in _END_MARKERS:
        response = response.split(marker, 1)[0]
    response = response.rsplit("</think>", 1)[-1]
    tags = _ANSWER_TAG.findall(response)
    if tags:
        return tags[-1].strip()
    boxed = _last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    response = response.rstrip()
    last_line = response.rfind("\n") + 1  # where the last non-empty line starts
    prefixes = [m.end() for m in _ANSWER_PREFIX.finditer(response)]
    prefixes += [last_line + m.end() for m in _ANSWER_IS.finditer(response[last_line:])]
    if prefixes:
        return response[max(prefixes):].split("\n", 1)[0].strip()
    lines = [line.strip() for line in response.splitlines() if line.strip()]
    return lines[-1] if lines else ""


_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_KEEP_IN_NUMBER = re.compile(r"(?<=\d)[./](?=\d)")  # 3.5, 1/2
_NEGATIVE = re.compile(r"(?<![\w.])-(?=\d)")  # -3 (not the hyphen of "x-3")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Canonical form for comparing answers (SQuAD-style, kept safe for numbers):

    Unicode NFKC and lower case; thousands separators dropped (``1,000`` -> ``1000``); apostrophes
    dropped (``don't`` -> ``dont``); every other punctuation or symbol character becomes a space,
    except a ``.`` or ``/`` between digits (``3.5``, ``1/2``) and a minus sign before a number (``-3``
    stays different from ``3``); the articles a / an / the removed unless nothing else is left (``A.``
    -> ``a``: a multiple-choice letter); whitespace collapsed. No numeric
    equivalence: ``3.50`` and ``3.5`` differ.
    """
    text = " ".join(answer_words(text))
    # An answer that is nothing but an article keeps it: "A" is the first choice of a multiple-choice
    # question, not an empty answer (which never matches).
    without_articles = _ARTICLES.sub(" ", text)
    return " ".join((without_articles if without_articles.split() else text).split())


def answer_words(text: str) -> list[str]:
    """The words of ``text`` as :func:`normalize_answer` sees them, articles kept: ``"(B) red."`` ->
    ``["b", "red"]``, ``"3.5 cm"`` -> ``["3.5", "cm"]``. Punctuation separates words; a letter inside
    a word stays in it (``"Blue"`` is one word, never ``"b"``)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _THOUSANDS.sub("", text)
    text = text.replace("'", "").replace("\u2019", "")
    keep = {m.start() for m in _KEEP_IN_NUMBER.finditer(text)} | {m.start() for m in _NEGATIVE.finditer(text)}
    return "".join(
        ch if i in keep or not unicodedata.category(ch).startswith(("P", "S")) else " "
        for i, ch in enumerate(text)
    ).split()


@register_reward("exact_match", needs_reference=True)
def exact_match_reward(response: str, reference: str | None) -> float:
    """1.0 when normalize(extract_final_answer(response)) == normalize(reference) (non-empty), else 0.0."""
    predicted = normalize_answer(extract_final_answer(response))
    return float(bool(predicted) and predicted == normalize_answer(reference or ""))


_SPECIAL = tuple(token for token, special in SPECIAL_TOKENS if special)


@register_reward("format")
def format_reward(response: str, reference: str | None = None) -> float:
    """1.0 when the response is well formed, else 0.0. Well formed means all of:

    * it ends with ``<|im_end|>`` (trailing whitespace allowed): the model closed its turn instead of
      being cut at the length limit;
    * no other special token anywhere (one ``<|im_end|>`` only, no ``<|im_start|>``, ``<|endoftext|>``,
      vision placeholders...): nothing leaked from the chat template;
    * no U+FFFD replacement character (a decode of broken bytes);
    * non-empty text before ``<|im_end|>``;
    * if it thinks: exactly one ``<think>`` ... ``</think>``, in that order, with text after ``</think>``.
    """
    body = response.rstrip()
    if not body.endswith(IM_END):
        return 0.0
    body = body[: -len(IM_END)]
    if any(token in body for token in _SPECIAL) or "\ufffd" in body or not body.strip():
        return 0.0
    opens, closes = body.count("<think>"), body.count("</think>")
    if opens or closes:
        if opens != 1 or closes != 1 or body.index("<think>") > body.index("</think>"):
            return 0.0
        if not body.split("</think>", 1)[1].strip():
            return 0.0
    return 1.0


# --------------------------------------------------------------------------------------------------
# selection and scoring


@dataclass(frozen=True)
class WeightedReward:
    name: str
    weight: float = 1.0


def parse_reward_specs(spec: Any) -> tuple[WeightedReward, ...]:
    """``[name, ...]`` or ``[{name: ..., weight: ...}, ...]`` (mixed is fine) -> validated entries."""
    if isinstance(spec, (str, Mapping)) or not isinstance(spec, Sequence):
        raise ValueError(f"rewards must be a list of names or {{name, weight}} entries, got {spec!r}")
    if not spec:
        raise ValueError("rewards is empty: select at least one reward, e.g. [exact_match]")
    entries = []
    for item in spec:
        if isinstance(item, str):
            entry = WeightedReward(item)
        elif isinstance(item, Mapping):
            unknown = sorted(set(item) - {"name", "weight"})
            if unknown or "name" not in item:
                raise ValueError(
                    f"reward entry {dict(item)!r} must have a 'name' and optionally a 'weight' (unknown: {unknown})"
                )
            weight = item.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"reward {item['name']!r} has weight {weight!r}; it must be a finite number")
            entry = WeightedReward(str(item["name"]), float(weight))
        else:
            raise ValueError(f"reward entry {item!r} must be a name or a {{name, weight}} mapping")
        if entry.name not in _REWARDS:
            raise ValueError(f"unknown reward {entry.name!r}; known: {reward_names()}")
        entries.append(entry)
    names = [e.name for e in entries]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"reward(s) {duplicated} selected more than once; give one entry with its weight")
    return tuple(entries)


def _missing(reference: str | None) -> bool:
    return reference is None or not str(reference).strip()


class RewardSet:
    """The selected rewards: validate the setup once, then score each rollout batch."""

    def __init__(self, spec: Any, task_rewards: Sequence[str] = ()):
        """``spec``: the stage's ``rewards``. ``task_rewards``: the rewards the prompt set's records name
        (each record's ``reward``). A selected reward that a record names scores only the prompts that name
        it; one that no record names (e.g. ``format``) scores every prompt. So a set that mixes tasks
        (exact-match questions beside prompts of another reward) is scored by each prompt's own reward."""
        self.rewards = parse_reward_specs(spec)
        self.task_rewards = frozenset(task_rewards)

    def applies(self, name: str, prompt_reward: str | None) -> bool:
        """Whether reward ``name`` scores a prompt whose record names ``prompt_reward`` (None: unknown,
        every selected reward scores it)."""
        return prompt_reward is None or name == prompt_reward or name not in self.task_rewards

    @property
    def needing_reference(self) -> list[str]:
        return [r.name for r in self.rewards if _REWARDS[r.name].needs_reference]

    def validate(self, group_size: int, references: Sequence[str | None] | None = None,
                 prompt_rewards: Sequence[str] | None = None) -> None:
        """One-line ValueError for G < 2, or a prompt lacking the reference answer one of its rewards needs.

        ``references``: one per prompt (None / blank = no reference); None = the prompts have none.
        ``prompt_rewards``: each prompt's own reward (its record's), see :meth:`applies`; None = all apply.
        """
        check_group_size(group_size)
        needing = self.needing_reference
        if not needing:
            return
        if references is None and prompt_rewards is None:
            raise ValueError(f"reward(s) {needing} need a reference answer per prompt, but the prompts have none")
        count = len(references) if references is not None else len(prompt_rewards)
        refs = list(references) if references is not None else [None] * count
        own = list(prompt_rewards) if prompt_rewards is not None else [None] * count
        missing = [i for i in range(count)
                   if _missing(refs[i]) and any(self.applies(name, own[i]) for name in needing)]
        if missing:
            raise ValueError(
                f"reward(s) {needing} need a reference answer per prompt, but {len(missing)} of "
                f"{count} prompts have none (first: prompt {missing[0]})"
            )

    def score(self, responses: Sequence[str], references: Sequence[str | None] | None, group_size: int,
              prompt_rewards: Sequence[str] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total [B], {name: unweighted reward [B]}) for B = P * G responses; ``references`` and
        ``prompt_rewards`` (each prompt's own reward, see :meth:`applies`) have P entries. A reward that
        does not score a prompt adds nothing to its total and is NaN in its part."""
        check_group_size(group_size, len(responses))
        prompts = len(responses) // group_size
        for name, given in (("references", references), ("prompt rewards", prompt_rewards)):
            if given is not None and len(given) != prompts:
                raise ValueError(
                    f"{len(given)} {name} for {prompts} prompts ({len(responses)} responses, G={group_size})"
                )
        self.validate(group_size, references, prompt_rewards)
        refs = [None] * prompts if references is None else list(references)
        own = [None] * prompts if prompt_rewards is None else list(prompt_rewards)
        parts = {}
        total = torch.zeros(len(responses), dtype=torch.float32)
        for r in self.rewards:
            fn = _REWARDS[r.name].fn
            scored = torch.tensor([self.applies(r.name, own[i // group_size]) for i in range(len(responses))])
            parts[r.name] = torch.tensor([float(fn(resp, refs[i // group_size])) if scored[i] else math.nan
                                          for i, resp in enumerate(responses)], dtype=torch.float32)
            bad = (scored & ~parts[r.name].isfinite()).nonzero()
            if len(bad):
                i = int(bad[0])
                raise ValueError(f"reward {r.name!r} gave {parts[r.name][i].item()} for response {i} (prompt "
                                 f"{i // group_size}): a reward must be a finite number")
            total += torch.where(scored, r.weight * parts[r.name], 0.0)
        return total, parts
