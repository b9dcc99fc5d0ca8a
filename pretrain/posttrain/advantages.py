"""Group-relative advantages and the filtering of prompts that teach nothing.

Rewards are one scalar per response, [B] with B = prompts * G and the G responses of prompt p at rows
``p*G .. p*G + G - 1`` (the layout of the whole package).

Advantage (GRPO's outcome supervision, DeepSeekMath arXiv 2402.03300 Sec. 4.1.2; GSPO arXiv 2507.18071
Eq. 6; the A_i of SAPO arXiv 2511.20347 Eq. 5): A_i = (R_i - mean_group R) / (std_group R + eps), the
same for every token of response i. The papers write "std" without saying which estimator; verl
(``compute_grpo_outcome_advantage``) and TRL use ``torch.std``, the unbiased one (divide by G - 1), so
that is the default here; ``unbiased_std=False`` divides by G (with G = 16 the advantages are
sqrt(16/15) = 1.033 times larger). A group whose rewards are all equal gets A = 0 for every response.

Filtering (the Qwen3-VL report's prompt filtering for RL, arXiv 2511.21631): a group where every
response fails has nothing to learn from, and neither has one where (nearly) all succeed; both are dropped. A
response *succeeds* when its reward >= ``pass_threshold``. A group is too easy when at least
``easy_fraction * G`` responses succeed (default 15/16: with G = 16, 15 or 16 successes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def check_group_size(group_size: int, batch: int | None = None) -> None:
    """One-line ValueError unless ``group_size`` >= 2 (and divides ``batch`` when given)."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2:
        raise ValueError(
            f"group size G={group_size!r} must be an integer >= 2: a group-relative advantage needs at "
            "least two responses per prompt"
        )
    if batch is not None and batch % group_size:
        raise ValueError(f"{batch} responses do not split into groups of G={group_size} (B must be prompts * G)")


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B] (one per response), got shape {tuple(rewards.shape)}")
    check_group_size(group_size, rewards.numel())
    return rewards.reshape(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6,
                     unbiased_std: bool = True) -> torch.Tensor:
    """A_i = (R_i - group mean) / (group std + eps), [B] float32 (see the module docstring)."""
    if not eps >= 0:
        raise ValueError(f"advantage eps={eps!r} must be >= 0")
    grouped = _groups(rewards, group_size).to(torch.float32)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, correction=1 if unbiased_std else 0)
    centred = grouped - mean
    # An all-equal group gets A = 0, also with eps = 0 (no 0/0). Asked of the rewards themselves: the
    # float32 mean of G equal rewards is often not that reward (G = 6 rewards of 1.2 miss it by ~1e-7),
    # and that residue over a std of its own size (or over eps) would be one large common advantage.
    equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    adv = torch.where(equal, torch.zeros_like(centred), centred / (std + eps))
    return adv.reshape(-1)


@dataclass(frozen=True)
class PromptFilter:
    """Which groups to drop: ``pass_threshold`` makes a success, ``easy_fraction`` of G makes too easy."""

    pass_threshold: float = 1.0
    easy_fraction: float = 15 / 16

    def __post_init__(self) -> None:
        if not 0 < self.easy_fraction <= 1:
            raise ValueError(f"easy_fraction={self.easy_fraction!r} must be in (0, 1]")
        if not math.isfinite(self.pass_threshold):
            raise ValueError(f"pass_threshold={self.pass_threshold!r} must be a finite number")


@dataclass(frozen=True)
class GroupFilterResult:
    """``keep`` [P] bool per prompt; counts of the two kinds of dropped groups; ``share_filtered`` in [0, 1]."""

    keep: torch.Tensor
    all_failed: int
    too_easy: int
    group_size: int

    @property
    def share_filtered(self) -> float:
        return (self.all_failed + self.too_easy) / max(1, self.keep.numel())

    def response_keep(self) -> torch.Tensor:
        """[B] bool: ``keep`` repeated for each of a group's G responses."""
        return self.keep.repeat_interleave(self.group_size)


def filter_groups(rewards: torch.Tensor, group_size: int, cfg: PromptFilter = PromptFilter()) -> GroupFilterResult:
    """Mark the groups where every response fails or at least ``easy_fraction * G`` succeed."""
    grouped = _groups(rewards, group_size)
    successes = (grouped >= cfg.pass_threshold).sum(dim=1)
    # smallest success count that is "too easy": ceil(fraction * G), robust to 15/16*16 = 14.999...
    easy_at = math.ceil(cfg.easy_fraction * group_size - 1e-9)
    all_failed = successes == 0
    too_easy = successes >= easy_at
    keep = ~(all_failed | too_easy)
    return GroupFilterResult(keep=keep, all_failed=int(all_failed.sum()), too_easy=int((too_easy & ~all_failed).sum()),
                             group_size=group_size)
