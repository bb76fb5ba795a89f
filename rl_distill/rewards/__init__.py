"""Rewards: plain callables ``(prompts, completions, **metadata) -> list[float]``.

The name-to-reward lookup used by configs and the CLI is :func:`rl_distill.rewards.registry.build_reward`.
"""

from rl_distill.rewards.base import (
    CheckedReward,
    RewardError,
    RewardFn,
    call_reward,
    checked,
    load_reward_from_path,
    reward_name,
    validate_rewards,
)
from rl_distill.rewards.compose import RunningNormalizedReward, WeightedSum
from rl_distill.rewards.factual import FactCheck, FactualConsistencyReward, hallucination_rate
from rl_distill.rewards.nli import NLIEntailmentReward, find_label_index, split_sentences
from rl_distill.rewards.verifier import ExactMatchVerifier, last_number, parse_number

__all__ = [
    "CheckedReward",
    "ExactMatchVerifier",
    "FactCheck",
    "FactualConsistencyReward",
    "NLIEntailmentReward",
    "RewardError",
    "RewardFn",
    "RunningNormalizedReward",
    "WeightedSum",
    "call_reward",
    "checked",
    "find_label_index",
    "hallucination_rate",
    "last_number",
    "load_reward_from_path",
    "parse_number",
    "reward_name",
    "split_sentences",
    "validate_rewards",
]
