"""The reward contract: plain callables, checked outputs, and user rewards loaded by import path.

A reward is any callable ``reward(prompts, completions, **metadata) -> list[float]``. Each metadata
keyword is a list aligned with ``completions`` (``answer=[...]``, ``source=[...]``, ``facts=[...]``);
a reward takes the keys it needs and ignores the rest (so it must accept ``**metadata``).

Nothing downstream trusts a reward's output: :func:`call_reward` (and :func:`checked`, its wrapper
form) checks that there is exactly one finite float per completion, and turns any failure into a
:class:`RewardError` naming the reward, so a NaN from a user reward is caught at the step it appears,
not thousands of steps later as a NaN loss.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol


class RewardFn(Protocol):
    """The reward signature: one float per completion."""

    def __call__(self, prompts: list[str], completions: list[str], **metadata: list[Any]) -> list[float]:
        """Score ``completions`` (``metadata`` values are lists aligned with them)."""
        ...


class RewardError(RuntimeError):
    """A reward failed or returned something other than one finite float per completion."""


def reward_name(reward: Callable[..., Any]) -> str:
    """A readable name for error messages: ``reward.name``, else the function or class name."""
    name = getattr(reward, "name", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(reward, functools.partial):
        return reward_name(reward.func)
    return getattr(reward, "__qualname__", None) or type(reward).__name__


def _check_inputs(
    name: str, prompts: Sequence[str], completions: Sequence[str], metadata: dict[str, Any]
) -> None:
    n = len(completions)
    if len(prompts) != n:
        raise RewardError(f"reward {name!r}: got {len(prompts)} prompts for {n} completions")
    for key, values in metadata.items():
        # Lists, tuples, NumPy arrays and tensors are fine; a string or a dict is a caller bug.
        if not hasattr(values, "__len__") or isinstance(values, str | bytes | Mapping):
            raise RewardError(
                f"reward {name!r}: metadata {key!r} must be a list aligned with the completions"
            )
        if len(values) != n:
            raise RewardError(
                f"reward {name!r}: metadata {key!r} has {len(values)} values for {n} completions"
            )


def _as_float(value: Any) -> float | None:
    """``value`` as a float if it is a real number (Python, NumPy or 0-d tensor), else ``None``."""
    if isinstance(value, numbers.Real):
        return float(value)
    # NumPy 0-d arrays and torch scalars: numeric, but not registered as numbers.Real.
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        item = value.item()
        if isinstance(item, numbers.Real):
            return float(item)
    return None


def validate_rewards(name: str, values: Any, n: int) -> list[float]:
    """Check a reward's output and return it as a list of Python floats.

    Args:
        name: the reward's name, for the error message.
        values: what the reward returned (a list, tuple, 1-D array or tensor).
        n: the number of completions.

    Raises:
        RewardError: wrong type or length, a non-numeric value, NaN or infinity; the message names the
            reward and the offending index.
    """
    if hasattr(values, "tolist") and getattr(values, "ndim", 1) == 1:
        values = values.tolist()  # NumPy arrays and tensors
    if not isinstance(values, Sequence) or isinstance(values, str | bytes):
        raise RewardError(f"reward {name!r} returned {type(values).__name__}, expected a list of {n} floats")
    if len(values) != n:
        raise RewardError(f"reward {name!r} returned {len(values)} values for {n} completions")
    out = []
    for i, value in enumerate(values):
        number = _as_float(value)
        if number is None:
            raise RewardError(f"reward {name!r} returned a non-numeric value at index {i}: {value!r}")
        if not math.isfinite(number):
            raise RewardError(f"reward {name!r} returned a non-finite value at index {i}: {number}")
        out.append(number)
    return out


def call_reward(
    reward: Callable[..., Any],
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    name: str | None = None,
    **metadata: Any,
) -> list[float]:
    """Call ``reward`` and check its output: exactly one finite float per completion.

    Args:
        reward: a reward callable.
        prompts: the prompts, one per completion.
        completions: the texts to score.
        name: the name used in errors (default: :func:`reward_name`).
        **metadata: lists aligned with ``completions``.

    Returns:
        One Python float per completion.

    Raises:
        RewardError: misaligned inputs, an exception inside the reward (chained as the cause), or a bad
            output; the message names the reward.
    """
    name = name or reward_name(reward)
    _check_inputs(name, prompts, completions, metadata)
    try:
        values = reward(list(prompts), list(completions), **metadata)
    except RewardError:
        raise  # already names the (inner) reward that failed
    except Exception as exc:
        raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {exc}") from exc
    return validate_rewards(name, values, len(completions))


class CheckedReward:
    """A reward whose every call goes through :func:`call_reward`.

    Attributes:
        reward: the wrapped callable.
        name: the name used in error messages.
    """

    def __init__(self, reward: Callable[..., Any], name: str | None = None) -> None:
        if not callable(reward):
            raise TypeError(f"reward {name or reward!r} is not callable")
        self.reward = reward
        self.name = name or reward_name(reward)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **metadata: Any) -> list[float]:
        """Score ``completions``; see :func:`call_reward`."""
        return call_reward(self.reward, prompts, completions, name=self.name, **metadata)

    def __repr__(self) -> str:
        return f"CheckedReward({self.name!r})"


def checked(reward: Callable[..., Any], name: str | None = None) -> CheckedReward:
    """Wrap ``reward`` so that its output is always validated (idempotent on checked rewards)."""
    if isinstance(reward, CheckedReward) and (name is None or name == reward.name):
        return reward
    return CheckedReward(reward, name)


def load_reward_from_path(path: str, **kwargs: Any) -> Callable[..., list[float]]:
    """Load a user reward given as ``"package.module:attribute"``, validated now rather than at first use.

    The attribute may be a reward function, or a class, which is instantiated with ``kwargs`` (a
    reward with state or a model). For a function, ``kwargs`` are bound with :func:`functools.partial`.

    Args:
        path: ``module:attribute``; the attribute may be dotted (``module:Class.method``).
        **kwargs: constructor arguments (class) or fixed keyword arguments (function).

    Returns:
        The reward callable (not yet wrapped with :func:`checked`).

    Raises:
        ValueError: malformed path, missing module or attribute, an attribute that is not callable, or a
            callable that cannot be called as ``reward(prompts, completions)``.
    """
    module_name, sep, attr_path = path.partition(":")
    if not sep or not module_name or not attr_path or ":" in attr_path:
        raise ValueError(f"reward path {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a missing module, or one that fails while importing
        raise ValueError(
            f"reward {path!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})"
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {path!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward {path!r}: {attr_path!r} is a {type(obj).__name__}, not a callable")
    if inspect.isclass(obj):
        try:
            reward = obj(**kwargs)
        except TypeError as exc:
            raise ValueError(
                f"reward {path!r}: cannot construct {attr_path} with {sorted(kwargs)}: {exc}"
            ) from exc
        if not callable(reward):
            raise ValueError(f"reward {path!r}: instances of {attr_path!r} are not callable (no __call__)")
    else:
        reward = functools.partial(obj, **kwargs) if kwargs else obj
    _check_signature(path, reward)
    return reward


def _check_signature(path: str, reward: Callable[..., Any]) -> None:
    """Fail at load time if ``reward(prompts, completions)`` could not even be bound."""
    try:
        signature = inspect.signature(reward)
    except (TypeError, ValueError):
        return  # builtins without introspectable signatures: checked at call time instead
    try:
        signature.bind([], [])
    except TypeError as exc:
        raise ValueError(
            f"reward {path!r} must accept (prompts, completions, **metadata); its signature is {signature}"
        ) from exc
