"""What an environment is built from: the teacher and the prompt source (rewards: ``rl_distill.rewards.registry``).

Each helper turns a user-facing argument into a checked object and fails with a message that names
the argument, before any model is run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rl_distill.models import BUILTIN_MODELS, load_causal_lm, load_tokenizer
from rl_distill.tasks import Example, TaskData, available_tasks, load_task

#: What ``teacher=`` accepts: a model name or path, or an already loaded ``(model, tokenizer)`` pair.
TeacherSpec = str | tuple[PreTrainedModel, PreTrainedTokenizerBase]
#: What ``prompts=`` accepts: prompt strings, Examples, a task name, or a task's data.
PromptSource = str | TaskData | Sequence[str | Example]


def resolve_teacher(
    teacher: TeacherSpec, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` for a teacher given by name/path or as a loaded pair.

    Args:
        teacher: a built-in name (``smollm2-135m-instruct``), a local checkpoint folder, a hub id
            already in the local Hugging Face cache, or a ``(model, tokenizer)`` pair.
        dtype: dtype of a teacher loaded by name.
        device: device of a teacher loaded by name.

    Raises:
        ValueError: a name that is neither built in, a local path, nor in the local cache.
        FileNotFoundError: a local path that does not exist or is not a checkpoint.
        TypeError: anything else than a string or a pair.
    """
    if isinstance(teacher, str):
        _check_known_model(teacher)
        return load_causal_lm(teacher, dtype=dtype, device=device), load_tokenizer(teacher)
    if isinstance(teacher, tuple | list) and len(teacher) == 2:
        model, tokenizer = teacher
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"teacher[0] must be a Hugging Face causal LM, got {type(model).__name__}")
        if not hasattr(tokenizer, "get_vocab") or not callable(tokenizer):
            raise TypeError(f"teacher[1] must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
        return model, tokenizer
    raise TypeError(
        f"teacher must be a model name or path, or a (model, tokenizer) pair; got {type(teacher).__name__}"
    )


def _check_known_model(name: str) -> None:
    """Fail fast, without touching the network, on a teacher name nothing can load."""
    if name in BUILTIN_MODELS:
        return
    if name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists():
        return  # a local path: load_causal_lm names a missing or invalid folder itself
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id at all
        cached = None
    if isinstance(cached, str):
        return
    raise ValueError(
        f"unknown teacher {name!r}: not a built-in model ({', '.join(BUILTIN_MODELS)}), not a local "
        "checkpoint folder, and not a Hugging Face hub id in the local cache (models cannot be "
        "downloaded at run time); or pass teacher=(model, tokenizer)"
    )


def resolve_prompts(prompts: PromptSource, *, split: str = "train") -> list[Example]:
    """The prompt source as a list of Examples.

    Args:
        prompts: prompt strings, Examples (their metadata reaches the reward), a task name
            (:func:`rl_distill.tasks.load_task` with its defaults) or a :class:`TaskData`.
        split: ``"train"`` or ``"eval"``, for a task.

    Raises:
        ValueError: an empty source, an unknown task name, or a bad split.
        TypeError: items that are neither strings nor Examples.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if isinstance(prompts, str):
        try:
            prompts = load_task(prompts)
        except ValueError as exc:
            raise ValueError(
                f"prompts={prompts!r}: a string names a task, and there is no such task "
                f"(available: {', '.join(available_tasks())}); pass a list to give prompts directly"
            ) from exc
    if isinstance(prompts, TaskData):
        prompts = prompts.train if split == "train" else prompts.eval
    examples = []
    for i, item in enumerate(prompts):
        if isinstance(item, str):
            examples.append(Example(prompt=item))
        elif isinstance(item, Example):
            examples.append(item)
        else:
            raise TypeError(f"prompts[{i}] must be a str or an Example, got {type(item).__name__}")
    if not examples:
        raise ValueError(
            "the prompt source is empty: give at least one prompt (a list of strings or Examples, "
            "or a task name)"
        )
    return examples
