"""Prompt sources: examples with a deterministic train/eval split."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One prompt with what rewards and evaluation may need.

    Attributes:
        prompt: the user text given to the student (a chat template is applied at encoding time
            when the tokenizer has one).
        reference: a reference completion (ground truth), used for supervised data (lambda < 1).
        metadata: task-specific fields passed to rewards as keyword lists (e.g. ``answer``, ``source``).
    """

    prompt: str
    reference: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskData:
    """A task's examples, split into disjoint train and eval lists.

    Attributes:
        name: the task name.
        train: training examples.
        eval: held-out examples (no prompt also appears in ``train``).
    """

    name: str
    train: list[Example]
    eval: list[Example]


TaskFactory = Callable[..., TaskData]
_TASKS: dict[str, TaskFactory] = {}


def register_task(name: str) -> Callable[[TaskFactory], TaskFactory]:
    """Decorator registering a factory ``(seed, num_train, num_eval, **options) -> TaskData``."""

    def wrap(fn: TaskFactory) -> TaskFactory:
        _TASKS[name] = fn
        return fn

    return wrap


def available_tasks() -> list[str]:
    """Names accepted by :func:`load_task`."""
    return sorted(_TASKS)


#: Arguments every factory takes from ``data.seed``/``data.num_train``/``data.num_eval``, not from options.
SPLIT_ARGUMENTS = ("seed", "num_train", "num_eval")


def task_options(name: str) -> list[str] | None:
    """The options task ``name`` accepts: its factory's keyword arguments other than the split's.

    Returns:
        The sorted option names, or None when the factory takes ``**options`` (anything goes).
    """
    params = inspect.signature(_TASKS[name]).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return sorted(p.name for p in params if p.kind in keyword and p.name not in SPLIT_ARGUMENTS)


def load_task(
    name: str, *, seed: int = 0, num_train: int = 256, num_eval: int = 32, **options: Any
) -> TaskData:
    """Build a task's train/eval split; the same arguments always give the same examples.

    Args:
        name: one of :func:`available_tasks`.
        seed: seed of the split (and of generated examples).
        num_train: number of training examples.
        num_eval: number of held-out examples.
        **options: task-specific options.

    Raises:
        ValueError: unknown task name, or sizes that are not positive.
    """
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(available_tasks())}")
    if num_train < 1 or num_eval < 1:
        raise ValueError(f"num_train and num_eval must be >= 1, got {num_train} and {num_eval}")
    data = _TASKS[name](seed=seed, num_train=num_train, num_eval=num_eval, **options)
    if not data.train or not data.eval:
        raise ValueError(
            f"task {name!r} produced an empty split (train={len(data.train)}, eval={len(data.eval)})"
        )
    return data


def split_disjoint(items: list[Example], num_train: int, num_eval: int, seed: int, task: str) -> TaskData:
    """Shuffle unique-prompt examples with ``seed`` and cut them into disjoint eval and train lists.

    Raises:
        ValueError: if there are fewer unique prompts than ``num_train + num_eval``.
    """
    import random

    unique = list({ex.prompt: ex for ex in items}.values())
    if len(unique) < num_train + num_eval:
        raise ValueError(
            f"task {task!r} has {len(unique)} distinct prompts, fewer than num_train + num_eval = {num_train + num_eval}"
        )
    random.Random(seed).shuffle(unique)
    return TaskData(name=task, eval=unique[:num_eval], train=unique[num_eval : num_eval + num_train])
