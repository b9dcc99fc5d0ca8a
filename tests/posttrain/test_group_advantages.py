"""Group-normalised advantages and prompt filtering on hand-made groups."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.posttrain.advantages import PromptFilter, filter_groups, group_advantages


def test_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0,   # group 0: mean 0.5
                            3.0, 1.0, 2.0, 2.0])  # group 1: mean 2
    adv = group_advantages(rewards, group_size=4, eps=0.0)
    std0 = math.sqrt(4 * 0.25 / 3)  # unbiased: sum of squares / (G - 1)
    std1 = math.sqrt((1 + 1 + 0 + 0) / 3)
    expected = [0.5 / std0, -0.5 / std0, -0.5 / std0, 0.5 / std0, 1 / std1, -1 / std1, 0.0, 0.0]
    torch.testing.assert_close(adv, torch.tensor(expected))

    population = group_advantages(rewards, group_size=4, eps=0.0, unbiased_std=False)
    torch.testing.assert_close(population[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]))  # std = 0.5

    with_eps = group_advantages(rewards, group_size=4, eps=0.1)
    assert with_eps[0].item() == pytest.approx(0.5 / (std0 + 0.1))


def test_an_all_equal_group_gets_zero_advantage_even_without_eps():
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), group_size=2, eps=0.0)
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0]
    # Rewards whose float32 mean is not themselves (1.2 = exact match + 0.2 format, six of them: the mean
    # misses by ~1e-7), for every group size up to 32; next to a group that does differ.
    for group_size in range(2, 33):
        for value in (0.1, 0.2, 0.3, 1 / 3, 0.6, 0.7, 0.9, 1.1, 1.2):
            rewards = torch.cat([torch.full((group_size,), value), torch.arange(group_size, dtype=torch.float32)])
            for eps in (1e-6, 0.0):
                adv = group_advantages(rewards, group_size, eps=eps)
                assert adv[:group_size].abs().max().item() == 0, (group_size, value, eps, adv[:group_size])
                assert adv[group_size:].abs().max().item() > 0.5  # the other group keeps its advantages


def test_filtering_drops_all_failed_and_nearly_all_succeeded_groups():
    G = 16
    groups = [
        [0.0] * 16,             # all fail -> dropped
        [1.0] * 15 + [0.0],     # 15 of 16 succeed -> too easy, dropped
        [1.0] * 16,             # 16 of 16 -> dropped
        [1.0] * 14 + [0.0] * 2,  # 14 of 16 -> kept
        [1.0] + [0.0] * 15,     # 1 of 16 -> kept
    ]
    result = filter_groups(torch.tensor(sum(groups, [])), G)
    assert result.keep.tolist() == [False, False, False, True, True]
    assert (result.all_failed, result.too_easy) == (1, 2)
    assert result.share_filtered == pytest.approx(3 / 5)
    assert result.response_keep().tolist() == [False] * 48 + [True] * 32


def test_filtering_thresholds_are_configurable():
    # partial credit: 0.5 is not a pass at the default threshold of 1.0, it is at 0.5
    rewards = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert filter_groups(rewards, 2).keep.tolist() == [False, False]  # both groups "all fail"
    loose = filter_groups(rewards, 2, PromptFilter(pass_threshold=0.5))
    assert loose.keep.tolist() == [False, False] and (loose.all_failed, loose.too_easy) == (1, 1)
    # easy_fraction = 1: only a group where every response passes is too easy
    rewards = torch.tensor([1.0] * 15 + [0.0])
    assert filter_groups(rewards, 16, PromptFilter(easy_fraction=1.0)).keep.tolist() == [True]


@pytest.mark.parametrize("call, message", [
    (lambda: group_advantages(torch.ones(4), group_size=1), "group size G=1 must be an integer >= 2"),
    (lambda: group_advantages(torch.ones(5), group_size=2), "5 responses do not split into groups of G=2"),
    (lambda: filter_groups(torch.ones(2, 2), 2), "rewards must be [B]"),
    (lambda: PromptFilter(easy_fraction=0.0), "easy_fraction=0.0 must be in (0, 1]"),
])
def test_bad_inputs_give_one_line_errors(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value) and "\n" not in str(info.value)
