"""Config layer: build a reward from a name, an import path or a spec (the CLI and YAML configs call this).

Rewards themselves are plain callables and know nothing of this table; it lives here, apart, so that
the name-to-callable lookup stays in one place.

Accepted specs::

    "exact_match" | "nli" | "factual_consistency"        # built-in rewards
    "my_package.my_module:my_reward"                      # a user reward (function or class)
    {"name": "nli", "model": "path/to/nli", "hard": true} # name plus constructor arguments
    {"weighted_sum": [{"weight": 1.0, "name": "exact_match"},
                      {"weight": 0.5, "name": "nli", "model": "..."}]}
    any of the dict forms with "normalize": true (or {"clip": 5.0, ...}) for a RunningNormalizedReward
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from rl_distill.rewards.base import CheckedReward, checked, load_reward_from_path
from rl_distill.rewards.compose import RunningNormalizedReward, WeightedSum
from rl_distill.rewards.factual import FactualConsistencyReward
from rl_distill.rewards.nli import NLIEntailmentReward
from rl_distill.rewards.verifier import ExactMatchVerifier

BUILTIN_REWARDS: dict[str, Callable[..., Any]] = {
    "exact_match": ExactMatchVerifier,
    "nli": NLIEntailmentReward,
    "factual_consistency": FactualConsistencyReward,
}


#: What an agent or environment accepts as ``reward=``: a callable, a name, ``module:function``, a spec dict.
RewardSpec = Callable[..., Any] | str | Mapping[str, Any] | None

#: Keyword names of :func:`rl_distill.rewards.call_reward` that example metadata must not use.
RESERVED_KEYWORDS = ("reward", "name", "prompts", "completions")


class _ExampleLike(Protocol):
    prompt: str
    metadata: Mapping[str, Any]


def resolve_reward(reward: RewardSpec) -> CheckedReward | None:
    """A checked reward from a callable, a name / import path / spec dict (:func:`build_reward`), or None.

    Raises:
        TypeError: anything else.
        ValueError: an unknown name or a malformed spec.
    """
    if reward is None:
        return None
    if isinstance(reward, str | Mapping):
        return build_reward(reward)
    if callable(reward):
        return checked(reward)
    raise TypeError(
        f"reward must be a callable (prompts, completions, **metadata) -> list[float], a reward name, "
        f"'module:function' or a spec dict; got {type(reward).__name__}"
    )


def reward_keywords(examples: Sequence[_ExampleLike]) -> dict[str, list[Any]]:
    """The metadata keyword lists a reward is called with, aligned with ``examples``.

    Every metadata key that any example of the batch has becomes one list, with None where an
    example lacks it. This is the only place that builds them: training, evaluation and the
    environments call a reward identically.

    Raises:
        ValueError: a metadata key that clashes with an argument of ``call_reward``.
    """
    keys = sorted({key for ex in examples for key in ex.metadata})
    clash = [key for key in keys if key in RESERVED_KEYWORDS]
    if clash:
        raise ValueError(
            f"example metadata key {clash[0]!r} clashes with an argument of the reward call "
            f"({', '.join(RESERVED_KEYWORDS)}); rename it in the data"
        )
    return {key: [ex.metadata.get(key) for ex in examples] for key in keys}


def score_examples(
    reward: Callable[..., Any], examples: Sequence[_ExampleLike], completions: Sequence[str]
) -> list[float]:
    """``reward(prompts, completions, **metadata)`` for a batch of examples, checked.

    Args:
        reward: a reward callable (wrapped with :func:`checked` unless it already is).
        examples: objects with ``prompt`` and ``metadata`` (:class:`rl_distill.tasks.Example`).
        completions: one decoded completion per example.

    Returns:
        One finite float per completion.

    Raises:
        RewardError: the reward failed or returned a bad value (the message names it).
    """
    return checked(reward)([ex.prompt for ex in examples], list(completions), **reward_keywords(examples))


def available_rewards() -> list[str]:
    """Built-in reward names (import paths ``module:function`` are accepted too)."""
    return sorted(BUILTIN_REWARDS)


def build_reward(name_or_spec: str | Mapping[str, Any], **kwargs: Any) -> CheckedReward:
    """Build a checked reward from a name, an import path or a spec (see the module docstring).

    Args:
        name_or_spec: the reward name, ``module:attribute`` path, or a dict spec.
        **kwargs: constructor arguments; they override those in a dict spec.

    Returns:
        The reward wrapped with :func:`checked`, so every call validates its output.

    Raises:
        ValueError: unknown name, malformed spec, or a user reward that fails validation at load time.
    """
    if isinstance(name_or_spec, str):
        return checked(_build_named(name_or_spec, kwargs), name_or_spec)
    if not isinstance(name_or_spec, Mapping):
        raise ValueError(f"a reward spec must be a name or a dict, got {type(name_or_spec).__name__}")
    spec = {**name_or_spec, **kwargs}
    normalize = spec.pop("normalize", False)
    if "weighted_sum" in spec:
        reward, name = _build_weighted_sum(spec), "weighted_sum"
    elif "name" in spec:
        name = spec.pop("name")
        reward = _build_named(name, spec)
    else:
        raise ValueError(f"a reward spec needs 'name' or 'weighted_sum', got keys {sorted(spec)}")
    if normalize:
        options = dict(normalize) if isinstance(normalize, Mapping) else {}
        reward, name = RunningNormalizedReward(reward, **options), f"normalized_{name}"
    return checked(reward, name)


def _build_named(name: str, kwargs: dict[str, Any]) -> Callable[..., Any]:
    if name in BUILTIN_REWARDS:
        try:
            return BUILTIN_REWARDS[name](**kwargs)
        except TypeError as exc:
            raise ValueError(f"reward {name!r}: bad arguments {sorted(kwargs)}: {exc}") from exc
    if ":" in name:
        return load_reward_from_path(name, **kwargs)
    raise ValueError(
        f"unknown reward {name!r}; use one of {', '.join(available_rewards())} "
        "or an import path 'module:function'"
    )


def _build_weighted_sum(spec: dict[str, Any]) -> WeightedSum:
    terms_spec = spec.pop("weighted_sum")
    if spec:
        raise ValueError(f"a weighted_sum spec takes no other keys than 'normalize', got {sorted(spec)}")
    if not isinstance(terms_spec, list) or not terms_spec:
        raise ValueError("weighted_sum must be a non-empty list of {'weight': w, 'name': ..., ...} items")
    terms = []
    for i, term in enumerate(terms_spec):
        if not isinstance(term, Mapping) or "weight" not in term:
            raise ValueError(f"weighted_sum item {i} must be a dict with a 'weight', got {term!r}")
        term = dict(term)
        weight = term.pop("weight")
        terms.append((float(weight), build_reward(term)))
    return WeightedSum(terms)
