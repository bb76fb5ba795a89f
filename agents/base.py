"""What every agent shares: the optimizer step around a loss, and the ``update()`` interface."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from rl_distill.rollout import RolloutEngine
from rl_distill.tasks import Example


class Agent(ABC):
    """An algorithm that improves the student from a batch of prompts.

    Subclasses implement :meth:`update`: collect what they need through the rollout engine,
    build a loss, and call :meth:`optimizer_step`. The trainer only ever calls ``update``.

    Args:
        engine: the rollout engine holding student, teacher and tokenizer.
        optimizer: optimizer over the student's trainable parameters.
        max_grad_norm: gradient-norm clipping threshold (``<= 0`` disables clipping).
        generator: RNG for sampling and coin flips (seeded by the trainer).
        accelerator: optional ``accelerate.Accelerator``; its ``backward`` is used when given.
    """

    #: Registry name (``agent.name`` in configs).
    name: str = ""

    def __init__(
        self,
        engine: RolloutEngine,
        optimizer: torch.optim.Optimizer,
        *,
        max_grad_norm: float = 1.0,
        generator: torch.Generator | None = None,
        accelerator: Any | None = None,
    ) -> None:
        self.engine = engine
        self.student = engine.student
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.generator = generator if generator is not None else torch.Generator(device=engine.device)
        self.accelerator = accelerator
        self.skipped_steps = 0

    @abstractmethod
    def update(self, batch: Sequence[Example]) -> dict[str, float]:
        """One training step on a batch of examples; returns metrics keyed ``rollout/...``, ``train/...``."""

    def optimizer_step(self, loss: Tensor) -> dict[str, float]:
        """Backward, clip, and step; a non-finite loss or gradient skips the step.

        Returns:
            ``train/grad_norm`` and ``train/skipped`` (1.0 if the step was skipped).
        """
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss.detach()):
            self.skipped_steps += 1
            return {"train/grad_norm": float("nan"), "train/skipped": 1.0}
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()
        params = [p for p in self.student.parameters() if p.grad is not None]
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return {"train/grad_norm": grad_norm, "train/skipped": 1.0}
        self.optimizer.step()
        return {"train/grad_norm": grad_norm, "train/skipped": 0.0}
