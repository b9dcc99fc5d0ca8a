"""Rewards: answer extraction and normalisation, the format check, weights and the set-up errors."""

from __future__ import annotations

import pytest
import torch

from pretrain.posttrain.rewards import (
    RewardSet,
    answer_words,
    exact_match_reward,
    extract_final_answer,
    format_reward,
    normalize_answer,
    parse_reward_specs,
    WeightedReward,
)

END = "<|im_end|>"


@pytest.mark.parametrize("text, normal", [
    ("  The   Eiffel Tower. ", "eiffel tower"),
    ("PARIS!", "paris"),
    ("an apple, a pear", "apple pear"),
    ("1,000,000", "1000000"),
    ("3.5", "3.5"),
    ("1/2", "1/2"),
    ("-3", "-3"),
    ("x-3", "x 3"),
    ("$42.", "42"),
    ("don't", "dont"),
    ("ＡＢＣ", "abc"),  # full-width letters (NFKC)
    ("New-York", "new york"),
    ("A.", "a"),  # a multiple-choice letter, not an article
    ("(a)", "a"),
    ("The A", "the a"),
])
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


@pytest.mark.parametrize("response, answer", [
    ("Let me think.\n<answer> 42 </answer>" + END, "42"),
    ("so the result is \\boxed{\\frac{1}{2}} indeed", "\\frac{1}{2}"),
    ("Reasoning...\nFinal Answer: Paris\nThanks", "Paris"),
    ("answer: 1\nwait, answer: 2", "2"),
    ("step one\nstep two\n\n  7  \n" + END + "trailing garbage", "7"),
    ("<think>answer: no</think>\nThe answer is below\n12", "12"),
    ("", ""),
    # "answer is" in the last line: the usual closing sentence
    ("The answer is B.", "B."),
    ("Let me look.\nSo the correct answer is **B**." + END, "**B**."),
    ("the answer is: b\n", "b"),
    ("answer: 1\nwait, the answer is 2", "2"),
    ("The answer is 2.\nanswer: 3", "3"),
    ("The answer is B.\nI hope this helps.", "I hope this helps."),  # not the last line
    ("My answerisB", "My answerisB"),  # whole words only
])
def test_extract_final_answer(response, answer):
    assert extract_final_answer(response) == answer


@pytest.mark.parametrize("response", [
    "The answer is B.", "the answer is b", "Answer: (B)", "**B**", "B)", "b", "Answer: **B**", "So the answer is (B).",
])
def test_multiple_choice_phrasings_are_rewarded(response):
    assert exact_match_reward(response + END, "B") == 1.0


@pytest.mark.parametrize("answer, expected, correct", [
    # the phrasings of a multiple-choice letter, in any case
    ("The answer is B.", "B", True), ("Answer: (B)", "B", True), ("**B**", "B", True), ("B)", "B", True),
    ("b", "B", True), ("(A) circle", "A", True), ("The answer is A.", "a", True),
    # a letter inside a word is not an answer
    ("Blue", "B", False), ("An apple", "A", False), ("Because", "B", False), ("The answer is Blue.", "B", False),
    # the article "a" before a word is not choice A; the letter set off by punctuation is
    ("A circle", "A", False), ("The answer is a red circle.", "A", False), ("A. circle", "A", True),
    # closed-vocabulary words: the final answer, or its first words
    ("red", "red", True), ("Red.", "red", True), ("Red circle", "red", True), ("The answer is red.", "red", True),
    ("dark blue", "dark blue", True), ("dark", "dark blue", False), ("A circle.", "circle", True),
    ("It is red", "red", False), ("red", "blue", False), ("", "red", False), ("red", "", False),
    # numbers are answers too
    ("3 apples", "3", True), ("3.5", "3", False), ("Answer: 12", "12", True),
])
def test_evaluate_generated_answer(answer, expected, correct):
    from pretrain.evaluate import generated_answer_correct

    assert generated_answer_correct(answer, expected) is correct


def test_answer_words_keep_articles_and_numbers():
    assert answer_words("(B) The red, 3.5 cm.") == ["b", "the", "red", "3.5", "cm"]
    assert normalize_answer("(B) The red, 3.5 cm.") == "b red 3.5 cm"


def test_exact_match():
    assert exact_match_reward("Working...\nAnswer: The Eiffel Tower." + END, "eiffel tower") == 1.0
    assert exact_match_reward("Answer: -3" + END, "3") == 0.0
    assert exact_match_reward("Answer: 3.50", "3.5") == 0.0  # no numeric equivalence
    assert exact_match_reward("Answer: the", "a") == 0.0
    assert exact_match_reward("Answer: ", "") == 0.0  # an empty answer never matches
    # Multiple choice: every letter can be rewarded, A included (articles are only dropped beside words).
    for letter in "ABCD":
        assert exact_match_reward(f"Answer: {letter}." + END, letter) == 1.0
        assert exact_match_reward(f"Answer: ({letter.lower()})" + END, letter) == 1.0
    assert exact_match_reward("Answer: B" + END, "A") == 0.0


@pytest.mark.parametrize("response, ok", [
    ("The answer is 4." + END, True),
    ("The answer is 4." + END + "\n", True),
    ("<think>2 + 2</think>\n4" + END, True),
    ("The answer is 4.", False),  # cut at the length limit: no end of turn
    ("4" + END + "more" + END, False),  # two turns' worth
    ("4<|im_start|>user" + END, False),  # template leaked
    ("4<|endoftext|>" + END, False),
    ("4 \ufffd" + END, False),  # broken bytes
    ("   " + END, False),  # empty
    ("<think>2 + 2</think>" + END, False),  # thought, never answered
    ("</think>4<think>" + END, False),
    ("<think>a</think><think>b</think>4" + END, False),
])
def test_format_reward(response, ok):
    assert format_reward(response) == float(ok)


def test_weighted_total_and_parts():
    rewards = RewardSet(["exact_match", {"name": "format", "weight": 0.25}])
    responses = ["Answer: 4" + END, "Answer: 5" + END, "Answer: Paris", "answer: paris." + END]
    total, parts = rewards.score(responses, references=["4", "Paris"], group_size=2)
    assert parts["exact_match"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert parts["format"].tolist() == [1.0, 1.0, 0.0, 1.0]
    torch.testing.assert_close(total, torch.tensor([1.25, 0.25, 1.0, 1.25]))


def test_specs_accept_names_and_mappings():
    assert parse_reward_specs(["exact_match", "format"]) == (WeightedReward("exact_match"), WeightedReward("format"))
    assert parse_reward_specs([{"name": "format", "weight": 2}]) == (WeightedReward("format", 2.0),)
    from omegaconf import OmegaConf  # as it comes from the Hydra config

    spec = OmegaConf.create({"rewards": ["exact_match", {"name": "format", "weight": 0.5}]}).rewards
    assert parse_reward_specs(spec) == (WeightedReward("exact_match"), WeightedReward("format", 0.5))


@pytest.mark.parametrize("call, message", [
    (lambda: RewardSet(["exact_match", "bleu"]), "unknown reward 'bleu'; known: ['exact_match', 'format']"),
    (lambda: RewardSet([{"name": "format", "scale": 2}]), "must have a 'name' and optionally a 'weight'"),
    (lambda: RewardSet([{"name": "format", "weight": float("nan")}]), "it must be a finite number"),
    (lambda: RewardSet(["format", {"name": "format", "weight": 2}]), "['format'] selected more than once"),
    (lambda: RewardSet([]), "rewards is empty"),
    (lambda: RewardSet("format"), "rewards must be a list"),
    (lambda: RewardSet(["exact_match"]).validate(4, ["4", None, " ", "x"]),
     "reward(s) ['exact_match'] need a reference answer per prompt, but 2 of 4 prompts have none (first: prompt 1)"),
    (lambda: RewardSet(["exact_match"]).validate(4, None),
     "need a reference answer per prompt, but the prompts have none"),
    (lambda: RewardSet(["format"]).validate(1), "group size G=1 must be an integer >= 2"),
    (lambda: RewardSet(["format"]).score(["a" + END], None, group_size=1), "group size G=1"),
    (lambda: RewardSet(["exact_match"]).score(["a", "b"], [None], group_size=2),
     "1 of 1 prompts have none"),
])
def test_set_up_errors_are_one_line(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_format_alone_needs_no_references():
    total, _ = RewardSet(["format"]).score(["a" + END, "b"], None, group_size=2)
    assert total.tolist() == [1.0, 0.0]


def test_each_prompt_is_scored_by_its_own_reward_and_the_shared_ones():
    """A prompt set mixing tasks: exact-match questions (with answers) beside open prompts of another reward
    (without): each prompt is scored by its record's reward, ``format`` (no record names it) by all."""
    from tests.posttrain import toy_rewards  # noqa: F401  (registers vowel_share)

    rewards = RewardSet(["exact_match", "vowel_share", {"name": "format", "weight": 0.5}],
                        task_rewards={"exact_match", "vowel_share"})
    rewards.validate(2, ["4", None], ["exact_match", "vowel_share"])  # the open prompt needs no answer
    responses = ["Answer: 4" + END, "Answer: 5" + END, "aaa" + END, "xyz"]
    total, parts = rewards.score(responses, ["4", None], 2, prompt_rewards=["exact_match", "vowel_share"])
    assert parts["exact_match"][:2].tolist() == [1.0, 0.0] and parts["exact_match"][2:].isnan().all()
    vowels = [toy_rewards.vowel_share(r) for r in responses[2:]]  # 0.625 ("aaa" and the end marker's), 0
    assert parts["vowel_share"][:2].isnan().all() and parts["vowel_share"][2:].tolist() == vowels
    assert parts["format"].tolist() == [1.0, 1.0, 1.0, 0.0]
    torch.testing.assert_close(total, torch.tensor([1.5, 0.5, vowels[0] + 0.5, vowels[1]]))
    with pytest.raises(ValueError, match=r"1 of 2 prompts have none \(first: prompt 0\)"):
        rewards.validate(2, [None, None], ["exact_match", "vowel_share"])


def test_a_reward_that_is_not_a_number_is_named():
    from pretrain.posttrain.rewards import register_reward

    register_reward("test_nan_reward")(lambda response, reference=None: float("nan"))
    with pytest.raises(ValueError, match=r"reward 'test_nan_reward' gave nan for response 0 \(prompt 0\)"):
        RewardSet(["test_nan_reward"]).score(["a", "b"], None, group_size=2)
