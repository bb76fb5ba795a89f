"""User rewards loaded by import path in tests (``fixtures_rewards:<name>``)."""

import math


def length_reward(prompts, completions, **metadata):
    """Length of each completion in characters."""
    return [float(len(c)) for c in completions]


def nan_reward(prompts, completions, **metadata):
    """NaN for the second completion."""
    return [1.0 if i != 1 else math.nan for i in range(len(completions))]


def short_reward(prompts, completions, **metadata):
    """One value too few."""
    return [0.0] * (len(completions) - 1)


def text_reward(prompts, completions, **metadata):
    """A string where a number should be, at index 0."""
    return ["high"] + [0.0] * (len(completions) - 1)


def failing_reward(prompts, completions, **metadata):
    """Raises inside the reward."""
    raise KeyError("facts")


def no_arguments():
    """Not a reward: takes no arguments."""
    return []


class ContainsReward:
    """1.0 when the completion contains ``word`` (a class reward with constructor arguments)."""

    def __init__(self, word: str = "yes", bonus: float = 1.0):
        self.word = word
        self.bonus = bonus

    def __call__(self, prompts, completions, **metadata):
        return [self.bonus if self.word in c else 0.0 for c in completions]


NOT_CALLABLE = 42
