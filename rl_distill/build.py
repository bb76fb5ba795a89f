"""Building a run's parts from a :class:`~rl_distill.config.Config`: models, checks, rewards, agent state.

The trainer (:mod:`rl_distill.trainer`) calls these once, before the loop; the ``eval`` and
``env-check`` commands reuse them.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rl_distill.config import TASK_EVAL_REWARDS, Config
from rl_distill.models import (
    check_tokenizers_match,
    load_causal_lm,
    load_tokenizer,
    make_kept_layer_student,
    resolve_dtype,
    student_from_config,
)
from rl_distill.rewards import CheckedReward
from rl_distill.rollout import PromptTooLongError, RolloutEngine
from rl_distill.tasks import TaskData


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (the one place where a run is seeded)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_models(
    config: Config, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the teacher, build or load the student, and check that they share a tokenizer.

    Returns:
        ``(teacher, student, tokenizer)``.
    """
    mc = config.model
    tokenizer = load_tokenizer(mc.teacher, trust_remote_code=mc.trust_remote_code)
    if mc.student is not None:
        # Check tokenizers before loading the (possibly large) student weights.
        check_tokenizers_match(tokenizer, load_tokenizer(mc.student, trust_remote_code=mc.trust_remote_code))
    teacher = load_causal_lm(
        mc.teacher, dtype=mc.dtype, device=device, trust_remote_code=mc.trust_remote_code
    )
    if mc.student is not None:
        student = load_causal_lm(
            mc.student, dtype=mc.dtype, device=device, trust_remote_code=mc.trust_remote_code
        )
    elif mc.student_config is not None:
        cfg = {"vocab_size": teacher.config.vocab_size, **mc.student_config}
        student = student_from_config(cfg, seed=config.train.seed, dtype=resolve_dtype(mc.dtype)).to(device)
    else:
        layers = mc.student_layers
        student = make_kept_layer_student(
            teacher,
            num_layers=layers if isinstance(layers, int) else None,
            layers=layers if isinstance(layers, list) else None,
        )
    teacher.eval().requires_grad_(False)
    student.train()
    return teacher, student, tokenizer


def check_prompts_fit(engine: RolloutEngine, task: TaskData, max_new_tokens: int) -> None:
    """Fail before any work if a prompt plus the completion budget exceeds the context length.

    Raises:
        PromptTooLongError: naming the split, the example and the sizes.
    """
    for split, examples in (("train", task.train), ("eval", task.eval)):
        for i, ex in enumerate(examples):
            length = len(engine.encoder.token_ids(ex.prompt))
            if length + max_new_tokens > engine.context_length:
                raise PromptTooLongError(
                    f"{split} prompt {i} has {length} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                    f"the models' context length {engine.context_length}: {ex.prompt[:60]!r}"
                )


def build_eval_reward(config: Config) -> CheckedReward | None:
    """The reward averaged into the evaluation metrics (``eval.reward``; ``auto`` resolved here)."""
    from rl_distill.rewards.registry import build_reward

    spec = config.eval.reward
    if spec == "auto":
        spec = getattr(config.agent, "reward", None) or TASK_EVAL_REWARDS.get(config.data.task)
    return build_reward(spec) if spec is not None else None


def agent_tensors(agent: Any) -> dict[str, torch.Tensor]:
    """The agent's own weights (value heads) as flat ``module/param`` tensors; empty for GKD."""
    state_dict = getattr(agent, "state_dict", None)
    if callable(state_dict):
        return {
            f"{name}/{key}": t
            for name, sd in state_dict().items()
            for key, t in sd.items()
            if torch.is_tensor(t)
        }
    params = getattr(agent, "extra_parameters", lambda: [])()
    return {f"extra/{i}": p for i, p in enumerate(params)}


def load_agent_tensors(agent: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`agent_tensors`."""
    if not tensors and not agent_tensors(agent):
        return
    if callable(getattr(agent, "load_state_dict", None)):
        nested: dict[str, dict[str, torch.Tensor]] = {}
        for flat, t in tensors.items():
            name, key = flat.split("/", 1)
            nested.setdefault(name, {})[key] = t
        agent.load_state_dict(nested)
        return
    with torch.no_grad():
        for name, param in agent_tensors(agent).items():
            param.copy_(tensors[name])
