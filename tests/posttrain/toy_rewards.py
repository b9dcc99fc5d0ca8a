"""A toy reward for RL tests (``stage.rl.reward_modules: [tests.posttrain.toy_rewards]``).

``vowel_share``: the share of a response's letters that are vowels. Unlike exact match it is graded and
never all-zero, so even a randomly initialised tiny model gets a learning signal: a working RL loop
raises it within a few steps (more vowel-heavy tokens).
"""

from __future__ import annotations

from pretrain.posttrain.rewards import register_reward


@register_reward("vowel_share")
def vowel_share(response: str, reference: str | None = None) -> float:
    letters = [c for c in response.lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0
