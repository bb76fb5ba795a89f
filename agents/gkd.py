"""Generalized Knowledge Distillation (GKD), Agarwal et al. 2023 (arXiv 2306.13649), Algorithm 1.

Each step, for a batch of prompts ``x``:

1. **Data.** With probability ``lmbda`` an example uses an on-policy completion ``y ~ pS(.|x)``
   sampled from the current student at ``temperature``; otherwise a fixed completion: the dataset
   reference (``off_policy="reference"``) or a teacher sample (``off_policy="teacher"``, SeqKD).
   No gradient flows through sampling.
2. **Loss.** The token-level divergence of paper Eq. 2 on those sequences,
   ``D(pT || pS)(y|x) = 1/L_y sum_n D(pT(.|y<n, x) || pS(.|y<n, x))``,
   averaged over the batch's sequences: ``L_GKD`` of paper Sec. 3.1. ``D`` is any divergence from
   :mod:`rl_distill.divergences`; teacher and student distributions are both taken at
   ``temperature`` (the same temperature the student samples at, so the loss is about the
   distribution that generated the data).
3. **Update.** One optimizer step on the student.

Special cases (documented configurations):

- on-policy GKD: ``lmbda=1`` (the default);
- mixed: ``lmbda=0.5``;
- supervised KD: ``lmbda=0, divergence="forward_kl", off_policy="reference"``;
- SeqKD: ``lmbda=0, divergence="forward_kl", off_policy="teacher"``.

The coin is flipped per example by default (``mixture="example"``); ``mixture="batch"`` flips
one coin per batch as in Algorithm 1 (and TRL).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from rl_distill.agents.base import Agent
from torch import Tensor

from rl_distill.divergences import DIVERGENCES, divergence
from rl_distill.rollout import Rollout, SamplingConfig
from rl_distill.tasks import Example


@dataclass
class GKDConfig:
    """Hyper-parameters of :class:`GKDAgent`."""

    divergence: str = "jsd"
    """Token-level divergence: ``forward_kl``, ``reverse_kl``, ``jsd`` (uses ``beta``) or ``tv``."""
    beta: float = 0.5
    """JSD(beta) mixture weight of the teacher, in [0, 1]; 0 is forward KL, 1 reverse KL."""
    lmbda: float = 1.0
    """Fraction of on-policy (student-generated) data, in [0, 1] (the paper's lambda)."""
    mixture: Literal["example", "batch"] = "example"
    """Flip the lambda coin per example, or once per batch (paper Algorithm 1)."""
    off_policy: Literal["reference", "teacher"] = "reference"
    """Fixed sequences when the coin says off-policy: dataset references, or teacher samples (SeqKD)."""
    temperature: float = 1.0
    """Student sampling temperature, also used for both distributions in the divergence (> 0)."""
    top_k: int = 0
    """Top-k filter for on-policy sampling (0 = off)."""
    top_p: float = 1.0
    """Nucleus filter for on-policy sampling (1.0 = off)."""
    max_new_tokens: int = 32
    """Completion budget for sampled sequences."""

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        for name in ("beta", "lmbda"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.mixture not in ("example", "batch"):
            raise ValueError(f"mixture must be 'example' or 'batch', got {self.mixture!r}")
        if self.off_policy not in ("reference", "teacher"):
            raise ValueError(f"off_policy must be 'reference' or 'teacher', got {self.off_policy!r}")
        if not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 (training samples are stochastic), got {self.temperature}"
            )
        SamplingConfig(self.max_new_tokens, self.temperature, self.top_k, self.top_p)  # range checks

    @property
    def sampling(self) -> SamplingConfig:
        """The on-policy sampling settings."""
        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_k, self.top_p)


class GKDAgent(Agent):
    """On-policy / mixed / supervised distillation by direct gradient of the token-level divergence.

    Args:
        engine: rollout engine (student, teacher, tokenizer).
        optimizer: optimizer over the student.
        config: :class:`GKDConfig`.
        **kwargs: passed to :class:`~rl_distill.agents.base.Agent` (``max_grad_norm``, ``generator``...).
    """

    name = "gkd"

    def __init__(self, engine, optimizer, config: GKDConfig | None = None, **kwargs) -> None:  # noqa: D417
        super().__init__(engine, optimizer, **kwargs)
        self.config = config or GKDConfig()

    # --- data -----------------------------------------------------------------------------
    def _on_policy_rows(self, batch_size: int) -> Tensor:
        """Boolean ``(B,)``: which examples use student samples (the lambda coin)."""
        cfg, gen = self.config, self.generator
        if cfg.lmbda in (0.0, 1.0):
            return torch.full((batch_size,), cfg.lmbda == 1.0)
        n = 1 if cfg.mixture == "batch" else batch_size
        coins = torch.rand(n, generator=gen, device=gen.device).cpu() < cfg.lmbda
        return coins.expand(batch_size) if n == 1 else coins

    def _fixed_sequences(self, examples: Sequence[Example]) -> Rollout:
        """Off-policy data: dataset references, or teacher samples (SeqKD)."""
        prompts = [ex.prompt for ex in examples]
        if self.config.off_policy == "teacher":
            return self.engine.generate(
                prompts, self.config.sampling, model=self.engine.teacher, generator=self.generator
            )
        missing = [ex.prompt for ex in examples if ex.reference is None]
        if missing:
            raise ValueError(
                f"GKD with lmbda < 1 and off_policy='reference' needs reference completions, but "
                f"{len(missing)} example(s) have none (first: {missing[0][:60]!r}); use a task with references "
                "or off_policy='teacher'"
            )
        return self.engine.from_completions(prompts, [ex.reference for ex in examples])

    def collect(self, examples: Sequence[Example]) -> tuple[list[Rollout], int]:
        """Sequences for one step, scored by the teacher with full logits (on-policy part first).

        Returns:
            The rollouts (one or two) and the number of on-policy examples.
        """
        on = self._on_policy_rows(len(examples))
        parts = []
        on_rows = [i for i in range(len(examples)) if on[i]]
        off_rows = [i for i in range(len(examples)) if not on[i]]
        if on_rows:
            prompts = [examples[i].prompt for i in on_rows]
            parts.append(self.engine.generate(prompts, self.config.sampling, generator=self.generator))
        if off_rows:
            parts.append(self._fixed_sequences([examples[i] for i in off_rows]))
        return [self.engine.score(r, teacher_output="full") for r in parts], len(on_rows)

    # --- loss -----------------------------------------------------------------------------
    def sequence_divergence(self, rollout: Rollout) -> Tensor:
        """Paper Eq. 2 for each sequence of ``rollout``, differentiable w.r.t. the student: ``(B,)``."""
        cfg = self.config
        student_logits = self.engine.score_student(rollout)  # (B, T, V), with gradient
        return divergence(
            cfg.divergence,
            rollout.teacher_logits,
            student_logits,
            rollout.completion_mask,
            beta=cfg.beta,
            temperature=cfg.temperature,
            reduction="sequence",
        )

    def loss(self, rollouts: Sequence[Rollout]) -> tuple[Tensor, Tensor]:
        """``L_GKD``: the mean over all sequences of their Eq. 2 divergence. Returns (loss, per-sequence)."""
        per_seq = torch.cat([self.sequence_divergence(r) for r in rollouts])  # (B,)
        return per_seq.mean(), per_seq.detach()

    # --- step -----------------------------------------------------------------------------
    def update(self, batch: Sequence[Example]) -> dict[str, float]:
        """One GKD step (Algorithm 1): collect sequences, minimise the divergence on them."""
        t0 = time.perf_counter()
        rollouts, num_on_policy = self.collect(batch)
        t1 = time.perf_counter()
        self.student.train()
        loss, per_seq = self.loss(rollouts)
        stats = self.optimizer_step(loss)
        t2 = time.perf_counter()

        lengths = torch.cat([r.lengths for r in rollouts]).float()
        generated = sum(int(r.lengths.sum()) for r in rollouts)
        stats.update(
            {
                "train/loss": float(loss.detach()),
                "train/divergence": float(per_seq.mean()),
                "rollout/on_policy_fraction": num_on_policy / len(batch),
                "rollout/completion_length": float(lengths.mean()),
                "rollout/teacher_logprob": float(
                    torch.cat([r.teacher_logprobs.sum(-1) / r.lengths.clamp(min=1) for r in rollouts]).mean()
                ),
                "time/generate": sum(r.timings.get("generate", 0.0) for r in rollouts),
                "time/teacher": sum(r.timings.get("score", 0.0) for r in rollouts),
                "time/student_update": t2 - t1,
                "time/step": t2 - t0,
                "time/tokens": float(generated),
            }
        )
        return stats
