"""Built-in prompt sources with deterministic train/eval splits."""

from rl_distill.tasks import (  # noqa: F401  (registers the tasks)
    arithmetic,
    factual_summary,
    few_shot_arithmetic,
    hf_dataset,
    instructions,
    jsonl,
)
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
