"""Generalized Knowledge Distillation (GKD), Agarwal et al. 2023 (arXiv 2306.13649), Algorithm 1 and Eq. 5.

Each step, for a batch of prompts ``x``:

1. **Data.** With probability ``lmbda`` an example uses an on-policy completion ``y ~ pS(.|x)``
   sampled from the current student at ``temperature``; otherwise a fixed completion: the dataset
   reference (``off_policy="reference"``) or a teacher sample (``off_policy="teacher"``).
   No gradient flows through sampling.
2. **Divergence.** The token-level divergence of paper Eq. 2 on those sequences,
   ``D(pT || pS)(y|x) = 1/L_y sum_n D(pT(.|y<n, x) || pS(.|y<n, x))``,
   averaged over the batch's sequences: ``L_GKD`` of paper Sec. 3.1. ``D`` is any divergence from
   :mod:`rl_distill.divergences`; teacher and student distributions are both taken at
   ``temperature`` (the same temperature the student samples at, so the loss is about the
   distribution that generated the data). With ``target="one_hot"`` the teacher distribution is
   replaced by the one-hot distribution of the sequence's own tokens (forward KL is then the
   cross-entropy: supervised fine-tuning).
3. **Reward (Eq. 5).** With ``alpha < 1`` and an external reward ``r``, the loss is::

       loss = alpha * L_GKD  -  (1 - alpha) * mean_i[(r_i - b_i) * sum_t log pS(y_i,t)]

   The second term is REINFORCE for ``E_{y~pS}[r(y)]`` on the **on-policy** samples only (mean over
   them): the reward term of Eq. 5 is an expectation under the student, and the fixed off-policy
   sequences would need importance weights, so they get no reward term. ``log pS`` is at the
   sampling temperature. The baseline ``b_i`` is ``baseline="leave_one_out"`` (default: the mean
   reward of the *other* on-policy samples of the batch, unbiased), ``"batch_mean"`` (the mean of
   all of them, slightly biased) or ``"none"``. ``alpha = 1`` (default) is pure GKD and never calls
   the reward; ``alpha = 0`` drops the divergence from the loss (it is still logged); a reward
   identically 0 gives ``alpha * L_GKD``.
4. **Update.** One optimizer step on the student.

Special cases (documented configurations, also in :data:`SPECIAL_CASES`):

- SFT: ``lmbda=0, off_policy="reference", target="one_hot", divergence="forward_kl"``
  (cross-entropy on the references);
- supervised KD: ``lmbda=0, off_policy="reference", divergence="forward_kl"`` (paper Eq. 3);
- SeqKD (Kim & Rush 2016; "SFT on teacher outputs" in the paper):
  ``lmbda=0, off_policy="teacher", target="one_hot", divergence="forward_kl"``;
- on-policy GKD: ``lmbda=1`` (the default);
- mixed: ``lmbda=0.5``.

The coin is flipped per example by default (``mixture="example"``); ``mixture="batch"`` flips
one coin per batch as in Algorithm 1 (and TRL).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from rl_distill.agents.base import Agent, AgentConfig, group_baseline, token_logprobs
from rl_distill.divergences import DIVERGENCES, divergence
from rl_distill.rollout import Rollout
from rl_distill.tasks import Example


@dataclass
class GKDConfig(AgentConfig):
    """Hyper-parameters of :class:`GKDAgent` (shared fields: :class:`~rl_distill.agents.base.AgentConfig`).

    ``temperature`` is also the temperature of both distributions in the divergence.
    """

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
    target: Literal["teacher", "one_hot"] = "teacher"
    """Target distribution: the teacher's, or one-hot on the sequence's own tokens (SFT, SeqKD; lmbda=0)."""
    baseline: Literal["leave_one_out", "batch_mean", "none"] = "leave_one_out"
    """Reward baseline over the batch's on-policy samples: ``leave_one_out``, ``batch_mean`` or ``none``."""

    def __post_init__(self) -> None:
        super().__post_init__()
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
        if self.target not in ("teacher", "one_hot"):
            raise ValueError(f"target must be 'teacher' or 'one_hot', got {self.target!r}")
        if self.target == "one_hot":
            if self.lmbda != 0.0:
                raise ValueError(
                    f"target 'one_hot' (SFT/SeqKD) needs lmbda=0: it trains on fixed sequences, got lmbda={self.lmbda}"
                )
            reverse = self.divergence == "reverse_kl" or (self.divergence == "jsd" and self.beta == 1.0)
            if reverse:
                raise ValueError(
                    "target 'one_hot' cannot be used with reverse KL: KL(pS || one-hot) is infinite"
                )
        if self.alpha < 1.0 and self.lmbda == 0.0:
            raise ValueError(
                f"alpha < 1 ({self.alpha}) weights a reward on on-policy samples, but lmbda=0 gives none"
            )
        if self.baseline not in ("none", "batch_mean", "leave_one_out"):
            raise ValueError(
                f"baseline must be 'none', 'batch_mean' or 'leave_one_out', got {self.baseline!r}"
            )

    @property
    def eval_beta(self) -> float:
        """The JSD beta reported at evaluation: this config's ``beta``."""
        return self.beta


#: The paper's special cases as ``GKDConfig`` overrides: ``GKDConfig(**SPECIAL_CASES["sft"])``.
SPECIAL_CASES: dict[str, dict[str, Any]] = {
    "sft": {"lmbda": 0.0, "off_policy": "reference", "target": "one_hot", "divergence": "forward_kl"},
    "supervised_kd": {"lmbda": 0.0, "off_policy": "reference", "divergence": "forward_kl"},
    "seqkd": {"lmbda": 0.0, "off_policy": "teacher", "target": "one_hot", "divergence": "forward_kl"},
    "on_policy": {"lmbda": 1.0},
    "mixed": {"lmbda": 0.5},
}


def one_hot_logits(token_ids: Tensor, vocab_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Logits of the one-hot distribution on ``token_ids``: 0 at the token, ``-inf`` elsewhere: ``(B, T, V)``."""
    out = torch.full((*token_ids.shape, vocab_size), float("-inf"), dtype=dtype, device=token_ids.device)
    return out.scatter_(-1, token_ids[..., None], 0.0)


class GKDAgent(Agent):
    """On-policy / mixed / supervised distillation by direct gradient of the token-level divergence.

    Args:
        engine: rollout engine (student, teacher, tokenizer).
        optimizer: optimizer over the student.
        config: :class:`GKDConfig`.
        reward: the external reward of Eq. 5 as a callable (default: built from ``config.reward``).
        **kwargs: passed to :class:`~rl_distill.agents.base.Agent` (``max_grad_norm``, ``generator``...).

    Raises:
        ValueError: ``alpha < 1`` without a reward.
    """

    name = "gkd"

    config_cls = GKDConfig
    config: GKDConfig

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

    def collect(
        self, examples: Sequence[Example], on_policy: Tensor | None = None
    ) -> tuple[list[Rollout], int]:
        """Sequences for one step, scored by the teacher with full logits (on-policy part first).

        Args:
            examples: the batch.
            on_policy: boolean ``(B,)`` choice of on-policy rows; default: flip the lambda coin.

        Returns:
            The rollouts (one or two) and the number of on-policy examples.
        """
        on = self._on_policy_rows(len(examples)) if on_policy is None else on_policy
        parts = []
        on_rows = [i for i in range(len(examples)) if on[i]]
        off_rows = [i for i in range(len(examples)) if not on[i]]
        if on_rows:
            prompts = [examples[i].prompt for i in on_rows]
            parts.append(self.engine.generate(prompts, self.config.sampling, generator=self.generator))
        if off_rows:
            parts.append(self._fixed_sequences([examples[i] for i in off_rows]))
        if self.config.target == "one_hot":
            return parts, len(on_rows)  # SFT / SeqKD: the teacher's scores are not needed
        return [self.engine.score(r, teacher_output="full") for r in parts], len(on_rows)

    # --- loss -----------------------------------------------------------------------------
    def sequence_divergence(self, rollout: Rollout, student_logits: Tensor | None = None) -> Tensor:
        """Paper Eq. 2 for each sequence of ``rollout``, differentiable w.r.t. the student: ``(B,)``.

        Args:
            rollout: scored sequences (``teacher_logits`` needed unless ``target="one_hot"``).
            student_logits: ``(B, T, V)`` from :meth:`RolloutEngine.score_student`; computed if None.
        """
        cfg = self.config
        if student_logits is None:
            student_logits = self.engine.score_student(rollout)  # (B, T, V), with gradient
        if cfg.target == "one_hot":
            target = one_hot_logits(rollout.completion_ids, student_logits.shape[-1])  # (B, T, V)
        else:
            target = rollout.teacher_logits
        return divergence(
            cfg.divergence,
            target,
            student_logits,
            rollout.completion_mask,
            beta=cfg.beta,
            temperature=cfg.temperature,
            reduction="sequence",
        )

    def loss(
        self, rollouts: Sequence[Rollout], student_logits: Sequence[Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``L_GKD``: the mean over all sequences of their Eq. 2 divergence. Returns (loss, per-sequence)."""
        logits = student_logits if student_logits is not None else [None] * len(rollouts)
        per_seq = torch.cat([self.sequence_divergence(r, s) for r, s in zip(rollouts, logits)])  # (B,)
        return per_seq.mean(), per_seq.detach()

    def reward_loss(self, rollout: Rollout, student_logits: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. 5's reward term by REINFORCE on on-policy samples: ``-mean_i[(r_i - b_i) sum_t log pS(y_i,t)]``.

        Args:
            rollout: on-policy sequences.
            student_logits: ``(B, T, V)`` student logits on them, with gradient.
            rewards: ``(B,)`` external rewards.

        Returns:
            The loss (to minimise) and the advantages ``r - b`` ``(B,)``.
        """
        cfg = self.config
        mask = rollout.completion_mask
        logp = token_logprobs(student_logits, rollout.completion_ids, cfg.temperature)  # (B, T)
        seq_logp = (logp * mask).sum(-1)  # (B,) log pS(y|x) at the sampling temperature
        ones = torch.ones_like(rewards[:, None], dtype=torch.bool)
        advantages = rewards - group_baseline(rewards[:, None], ones, cfg.baseline)[:, 0]  # (B,)
        return -(advantages.to(seq_logp.dtype) * seq_logp).mean(), advantages

    def objective(
        self, rollouts: Sequence[Rollout], num_on_policy: int, rewards: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """The Eq. 5 loss ``alpha * L_GKD - (1 - alpha) * PG(r)`` (module docstring, step 3).

        Args:
            rollouts: from :meth:`collect` (on-policy rollout first when ``num_on_policy > 0``).
            num_on_policy: number of on-policy sequences (the rows of ``rollouts[0]``).
            rewards: ``(num_on_policy,)`` external rewards; None means no reward term.

        Returns:
            The loss and float statistics.
        """
        alpha = self.config.alpha
        logits = [self.engine.score_student(r) for r in rollouts]  # one gradient forward per rollout
        divergence_loss, per_seq = self.loss(rollouts, logits)
        stats = {"train/divergence": float(per_seq.mean())}
        # alpha == 0 removes the term rather than multiplying it by 0 (0 * inf would be NaN).
        loss = alpha * divergence_loss if alpha > 0 else None
        if alpha < 1.0 and rewards is not None and num_on_policy > 0:
            pg_loss, advantages = self.reward_loss(rollouts[0], logits[0], rewards)
            weighted = (1.0 - alpha) * pg_loss
            loss = weighted if loss is None else loss + weighted
            stats.update(
                {
                    "train/pg_loss": float(pg_loss.detach()),
                    "rollout/external_reward": float(rewards.mean()),
                    "rollout/advantage_std": float(advantages.std()) if len(advantages) > 1 else 0.0,
                }
            )
        if loss is None:  # alpha = 0 and no on-policy sample this step: nothing to learn from
            loss = 0.0 * divergence_loss
        return loss, stats

    # --- step -----------------------------------------------------------------------------
    def update(self, batch: Sequence[Example]) -> dict[str, float]:
        """One GKD step (Algorithm 1, Eq. 5): collect sequences, score rewards, minimise the loss."""
        t0 = time.perf_counter()
        on = self._on_policy_rows(len(batch))
        rollouts, num_on_policy = self.collect(batch, on)
        rewards = None
        if self.config.alpha < 1.0 and num_on_policy > 0:
            on_examples = [ex for ex, is_on in zip(batch, on.tolist()) if is_on]
            rewards = self.external_rewards(on_examples, rollouts[0])  # (num_on_policy,)
        t1 = time.perf_counter()
        self.student.train()
        loss, loss_stats = self.objective(rollouts, num_on_policy, rewards)
        stats = self.optimizer_step(loss)
        t2 = time.perf_counter()

        lengths = torch.cat([r.lengths for r in rollouts]).float()
        generated = sum(int(r.lengths.sum()) for r in rollouts)
        stats.update(loss_stats)
        stats.update(
            {
                "train/loss": float(loss.detach()),
                "rollout/on_policy_fraction": num_on_policy / len(batch),
                "rollout/completion_length": float(lengths.mean()),
                "time/generate": sum(r.timings.get("generate", 0.0) for r in rollouts),
                "time/teacher": sum(r.timings.get("score", 0.0) for r in rollouts),
                "time/student_update": t2 - t1,
                "time/step": t2 - t0,
                "time/tokens": float(generated),
            }
        )
        if all(r.teacher_logprobs is not None for r in rollouts):
            stats["rollout/teacher_logprob"] = float(
                torch.cat([r.teacher_logprobs.sum(-1) / r.lengths.clamp(min=1) for r in rollouts]).mean()
            )
        return stats
