"""Reward composition: weighted sums and running normalisation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from rl_distill.rewards.base import call_reward, reward_name


class WeightedSum:
    """``sum_i weight_i * reward_i``; every component is checked (see :func:`call_reward`).

    The components' values of the last call are kept in :attr:`last_components` (name -> list), so a
    trainer can log each term, not only the total.

    Args:
        terms: ``(weight, reward)`` pairs; weights may be negative (a penalty).
        name: the name used in errors and logs.

    Raises:
        ValueError: no terms, a non-finite weight, or a reward that is not callable.
    """

    def __init__(self, terms: Sequence[tuple[float, Callable[..., Any]]], name: str = "weighted_sum") -> None:
        if not terms:
            raise ValueError("WeightedSum needs at least one (weight, reward) term")
        names: list[str] = []
        for weight, reward in terms:
            if not math.isfinite(weight):
                raise ValueError(
                    f"WeightedSum weight for {reward_name(reward)!r} must be finite, got {weight}"
                )
            if not callable(reward):
                raise ValueError(f"WeightedSum term {reward!r} is not callable")
            base = reward_name(reward)
            # Two terms of the same reward (e.g. two NLI models) still get distinct log keys.
            names.append(base if base not in names else f"{base}_{len(names)}")
        self.terms = [(float(w), r) for w, r in terms]
        self.term_names = names
        self.name = name
        self.last_components: dict[str, list[float]] = {}

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **metadata: Any) -> list[float]:
        """The weighted sum of the components' scores, one per completion."""
        total = [0.0] * len(completions)
        components = {}
        for (weight, reward), name in zip(self.terms, self.term_names, strict=True):
            values = call_reward(reward, prompts, completions, name=name, **metadata)
            components[name] = values
            total = [t + weight * v for t, v in zip(total, values, strict=True)]
        self.last_components = components
        return total


class RunningNormalizedReward:
    """Standardise a reward with a running mean and standard deviation (Welford's algorithm).

    Each call first adds the batch's raw values to the running statistics, then returns
    ``(r - mean) / (std + eps)`` (population std over every value seen so far), optionally clipped to
    ``[-clip, clip]``. The raw values of the last call are in :attr:`last_raw`. Save and restore the
    statistics with :meth:`state_dict`/:meth:`load_state_dict` so a resumed run continues unchanged.

    Args:
        reward: the reward to normalise (checked on every call).
        eps: added to the std, so a constant reward maps to 0 rather than dividing by zero.
        clip: optional bound on the absolute normalised value.
        update: whether calls update the statistics (``False`` for evaluation).
    """

    def __init__(
        self, reward: Callable[..., Any], *, eps: float = 1e-8, clip: float | None = None, update: bool = True
    ) -> None:
        if eps <= 0 or (clip is not None and clip <= 0):
            raise ValueError(f"eps and clip must be > 0, got eps={eps}, clip={clip}")
        self.reward = reward
        self.name = f"normalized_{reward_name(reward)}"
        self.eps = eps
        self.clip = clip
        self.update = update
        self.count = 0
        self.mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the running mean
        self.last_raw: list[float] = []

    @property
    def std(self) -> float:
        """Population standard deviation of the values seen so far (0.0 before any)."""
        return math.sqrt(self._m2 / self.count) if self.count else 0.0

    def observe(self, values: Sequence[float]) -> None:
        """Add values to the running statistics (Welford's update, one value at a time)."""
        for x in values:
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self._m2 += delta * (x - self.mean)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **metadata: Any) -> list[float]:
        """The normalised reward, one per completion."""
        raw = call_reward(self.reward, prompts, completions, name=reward_name(self.reward), **metadata)
        self.last_raw = raw
        if self.update:
            self.observe(raw)
        out = [(x - self.mean) / (self.std + self.eps) for x in raw]
        if self.clip is not None:
            out = [min(max(x, -self.clip), self.clip) for x in out]
        return out

    def state_dict(self) -> dict[str, float]:
        """The running statistics, for checkpoints."""
        return {"count": self.count, "mean": self.mean, "m2": self._m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore statistics saved by :meth:`state_dict`."""
        self.count, self.mean, self._m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
