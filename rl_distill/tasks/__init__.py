"""Built-in prompt sources with deterministic train/eval splits."""

from rl_distill.tasks import arithmetic, factual_summary, instructions, jsonl  # noqa: F401  (registers the tasks)
from rl_distill.tasks.base import (
    Example,
    TaskData,
    available_tasks,
    load_task,
    register_task,
    split_disjoint,
    task_options,
)

__all__ = [
    "Example",
    "TaskData",
    "available_tasks",
    "load_task",
    "register_task",
    "split_disjoint",
    "task_options",
]
