"""Built-in prompt sources with deterministic train/eval splits."""

from rl_distill.tasks import instructions  # noqa: F401  (registers the task)
from rl_distill.tasks.base import Example, TaskData, available_tasks, load_task, register_task, split_disjoint

__all__ = ["Example", "TaskData", "available_tasks", "load_task", "register_task", "split_disjoint"]
