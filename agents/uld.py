"""Cross-tokenizer distillation by Universal Logit Distillation (ULD; Boizard et al. 2024, arXiv 2402.12030).

For a teacher whose tokenizer differs from the student's (``model.cross_tokenizer: uld``). Each step,
for a batch of prompts ``x``:

1. **Data** (as GKD's lambda, paper 2306.13649 Sec. 3.1): with probability ``lmbda`` an example uses
   an on-policy completion ``y ~ pS(.|x)`` sampled by the rollout engine at ``temperature``; otherwise
   a fixed completion: a teacher sample (``off_policy="teacher"``, the teacher's text re-tokenised by
   the student: SeqKD) or the dataset reference. The coin is flipped per example.
2. **Teacher reading.** Every completion is decoded to text; the teacher reads its own encoding of the
   prompt followed by its own tokens of that text, in one forward
   (:meth:`~rl_distill.cross_tokenizer.CrossTokenizerTeacher.read`).
3. **Alignment.** Student and teacher tokens are grouped into the smallest runs covering the same
   characters (:func:`~rl_distill.cross_tokenizer.align_spans`; the two EOS tokens pair up); each
   group's vector is its first position's distribution times the probability of its remaining tokens
   (:func:`~rl_distill.cross_tokenizer.group_logprobs`).
4. **Loss** (Boizard et al.'s ``L = L_CE + lambda * L_ULD``, per sequence)::

       loss = 1/B * sum_i [ uld_weight * ULD_i  +  ce_weight * CE_i * [i is off-policy] ]

   ``ULD_i`` is the mean over row ``i``'s aligned groups of the sorted-probability distance
   (:func:`~rl_distill.cross_tokenizer.uld_distance`), the student at ``temperature`` and the teacher
   at ``teacher_temperature``; ``CE_i`` is the mean token cross-entropy of the fixed completion (the
   identity signal ULD lacks: ULD compares sorted probabilities, so it cannot say *which* token is
   right; on the student's own samples cross-entropy would only reinforce them, so on-policy rows get
   none). Each row counts once; a row without any aligned group contributes only its CE.

   *Span-reward policy gradient* (``pg_weight > 0``, on-policy rows; this toolkit's extension, not part
   of ULD): ULD cannot tell the student *which* token is right, and on its own samples nothing else
   does. The identity-aware on-policy signal across tokenizers is the sequence-level reverse KL
   ``KL(pS || pT)`` over texts, whose gradient REINFORCE estimates with the per-token reward
   ``-log pS(y_t)`` plus the teacher's log-prob of each aligned span at the span's last student token
   (paper 2306.13649 Eq. 5's environment reward ``log pT(a_t | s_t)`` with spans in place of shared
   tokens; MiniLLM's sequence-level reverse KL, Gu et al. 2024): return-to-go, a leave-one-out baseline
   per position, ``pg_weight * (-1/L sum_t (G_t - b_t) log pS(y_t))`` added to the row's loss.

Special cases: SeqKD across tokenizers (``lmbda=0, off_policy=teacher, uld_weight=0``: text-only,
any tokenizer pair), the ULD paper's setting (``lmbda=0, off_policy=teacher``: teacher-generated
text, CE + ULD), on-policy ULD (``lmbda=1``: ULD on the student's own samples only), and the span-reward
policy gradient alone (``lmbda=1, uld_weight=0, pg_weight=1``).

Not supported here (refused at load time): an external reward (``alpha < 1``, ``beta_ext``),
privileged teacher prompts, gradient accumulation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from rl_distill.agents.base import Agent, AgentConfig, group_baseline
from rl_distill.cross_tokenizer import (
    CrossTokenizerTeacher,
    RowAlignment,
    TeacherView,
    align_rollout,
    sequence_logprob_gap,
    span_teacher_rewards,
    student_rollout_from_texts,
    uld_terms,
)
from rl_distill.rollout import Rollout
from rl_distill.rollout.engine import filtered_logprobs
from rl_distill.tasks import Example

#: The documented configurations as ``ULDConfig`` overrides.
SPECIAL_CASES: dict[str, dict[str, Any]] = {
    "seqkd": {"lmbda": 0.0, "off_policy": "teacher", "uld_weight": 0.0, "ce_weight": 1.0},
    "uld_off_policy": {"lmbda": 0.0, "off_policy": "teacher", "uld_weight": 1.0, "ce_weight": 1.0},
    "uld_on_policy": {"lmbda": 1.0, "uld_weight": 1.0},
    "span_pg": {"lmbda": 1.0, "uld_weight": 0.0, "pg_weight": 1.0},
}


@dataclass
class ULDConfig(AgentConfig):
    """Hyper-parameters of :class:`ULDAgent` (shared fields: :class:`~rl_distill.agents.base.AgentConfig`).

    ``temperature`` is the student's sampling temperature and its temperature in the ULD term; the
    teacher's is ``teacher_temperature`` (default the same).
    """

    lmbda: float = 1.0
    """Fraction of on-policy (student-sampled) examples, in [0, 1]; the coin is flipped per example."""
    off_policy: Literal["teacher", "reference"] = "teacher"
    """Fixed completions of off-policy examples: teacher samples (as text) or dataset references."""
    uld_weight: float = 1.0
    """Weight of the ULD term (Boizard et al.'s lambda), >= 0; 0 with ce_weight > 0 is SeqKD."""
    ce_weight: float = 1.0
    """Weight of the cross-entropy on off-policy completions, >= 0 (on-policy rows never get it)."""
    pg_weight: float = 0.0
    """Weight of the span-reward policy gradient on on-policy rows, >= 0 (an identity-aware on-policy term that
    ULD lacks: REINFORCE on ``log pT(span) - log pS``, the sequence-level reverse KL); 0: off."""

    scheduled_fields: ClassVar[dict[str, tuple[float, float]]] = AgentConfig.scheduled_fields

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {self.lmbda}")
        if self.off_policy not in ("teacher", "reference"):
            raise ValueError(f"off_policy must be 'teacher' or 'reference', got {self.off_policy!r}")
        for name in ("uld_weight", "ce_weight", "pg_weight"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        off_term = self.ce_weight > 0 and self.lmbda < 1.0
        on_term = self.pg_weight > 0 and self.lmbda > 0.0
        if self.uld_weight == 0 and not (off_term or on_term):
            raise ValueError(
                "uld_weight 0 leaves no loss: it needs ce_weight > 0 with lmbda < 1 (off-policy rows) or "
                f"pg_weight > 0 with lmbda > 0 (on-policy rows), got ce_weight={self.ce_weight}, "
                f"pg_weight={self.pg_weight}, lmbda={self.lmbda}"
            )
        if self.uses_reward:
            raise ValueError(
                "the uld agent has no reward term: leave alpha at 1 and beta_ext unset "
                f"(got alpha={self.alpha}, beta_ext={self.beta_ext})"
            )


class ULDAgent(Agent):
    """Distillation from a teacher with another tokenizer: ULD on span-aligned positions (+ CE off-policy).

    Args:
        engine: the student's rollout engine (no teacher: the teacher cannot read student token ids).
        optimizer: optimizer over the student.
        config: :class:`ULDConfig`.
        cross_teacher: the teacher with its own tokenizer (built by :mod:`rl_distill.build` from
            ``model.teacher`` when ``model.cross_tokenizer: uld``).
        **kwargs: passed to :class:`~rl_distill.agents.base.Agent`.

    Raises:
        ValueError: no ``cross_teacher``.
    """

    name = "uld"

    config_cls = ULDConfig
    config: ULDConfig

    def __init__(self, *args: Any, cross_teacher: CrossTokenizerTeacher | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if cross_teacher is None:
            raise ValueError(
                "the uld agent needs a teacher with its own tokenizer: set model.cross_tokenizer: uld "
                "(or pass cross_teacher=CrossTokenizerTeacher(...))"
            )
        self.cross_teacher = cross_teacher

    # --- data -----------------------------------------------------------------------------
    def _on_policy_rows(self, batch_size: int) -> list[bool]:
        lmbda = self.config.lmbda
        if lmbda in (0.0, 1.0):
            return [lmbda == 1.0] * batch_size
        gen = self.generator
        return (torch.rand(batch_size, generator=gen, device=gen.device).cpu() < lmbda).tolist()

    def _fixed_sequences(self, examples: Sequence[Example]) -> Rollout:
        """Off-policy completions as student tokens: teacher samples (text) or references."""
        prompts = [ex.prompt for ex in examples]
        if self.config.off_policy == "teacher":
            texts, ended = self.cross_teacher.sample_texts(prompts, self.config.sampling, self.generator)
        else:
            missing = [ex.prompt for ex in examples if ex.reference is None]
            if missing:
                raise ValueError(
                    f"agent.off_policy 'reference' needs reference completions; {len(missing)} example(s) have "
                    f"none (first: {missing[0][:60]!r})"
                )
            texts, ended = [str(ex.reference) for ex in examples], [True] * len(examples)
        return student_rollout_from_texts(self.engine, prompts, texts, ended)

    def collect(self, examples: Sequence[Example]) -> list[tuple[Rollout, bool]]:
        """The step's sequences as ``(rollout, on_policy)`` pairs (on-policy first), not yet scored."""
        on = self._on_policy_rows(len(examples))
        out = []
        on_ex = [ex for ex, o in zip(examples, on) if o]
        off_ex = [ex for ex, o in zip(examples, on) if not o]
        if on_ex:
            r = self.engine.generate(
                [ex.prompt for ex in on_ex], self.config.sampling, generator=self.generator
            )
            out.append((r, True))
        if off_ex:
            out.append((self._fixed_sequences(off_ex), False))
        return out

    # --- loss -----------------------------------------------------------------------------
    def span_policy_gradient(
        self, rollout: Rollout, logits: Tensor, view: TeacherView, alignments: Sequence[RowAlignment]
    ) -> Tensor:
        """Per-row REINFORCE loss for the sequence-level reverse KL with span rewards: ``(B,)``.

        Per-token reward ``r_t = -log pS(y_t) + [t ends an aligned span] log pT(span)``
        (:func:`~rl_distill.cross_tokenizer.span_teacher_rewards`; its sum over a row is
        ``log pT(text) - log pS(y)``), return-to-go ``G_t``, leave-one-out baseline per position over the
        batch, loss ``-1/L sum_t (G_t - b_t) log pS(y_t)`` (``log pS`` of the sampling policy).
        """
        cfg = self.config
        mask = rollout.completion_mask
        logp = filtered_logprobs(
            logits, rollout.completion_ids, cfg.temperature, cfg.top_k, cfg.top_p
        )  # (B, T)
        assert view.rollout.teacher_logprobs is not None
        shape = (mask.shape[0], mask.shape[1])
        teacher = span_teacher_rewards(view.rollout.teacher_logprobs, alignments, shape)  # (B, T)
        rewards = (teacher.to(logp.device) - logp.detach()) * mask  # (B, T)
        returns = rewards.flip(-1).cumsum(-1).flip(-1) * mask  # (B, T) reward-to-go
        advantages = returns - group_baseline(returns, mask, "leave_one_out")  # (B, T)
        return -(advantages * logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)

    def row_losses(
        self, rollout: Rollout, on_policy: bool
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, float]]:
        """Per-row loss terms of one rollout: ``(uld, ce, pg, stats)``, each ``(B,)``.

        ``ce`` is 0 on on-policy rows, ``pg`` 0 on off-policy rows.
        """
        cfg = self.config
        logits = self.engine.score_student(rollout)  # (B, T, Vs), with gradient
        mask = rollout.completion_mask
        uld = logits.new_zeros(len(rollout))
        pg = logits.new_zeros(len(rollout))
        stats: dict[str, float] = {}
        use_pg = on_policy and cfg.pg_weight > 0
        if cfg.uld_weight > 0 or use_pg:
            view = self.cross_teacher.read(
                rollout, self.engine, teacher_temperature=cfg.teacher_temp, full_logits=cfg.uld_weight > 0
            )
            alignments = align_rollout(
                rollout, self.engine.tokenizer, view.rollout, self.cross_teacher.tokenizer
            )
            if cfg.uld_weight > 0:
                uld, _ = uld_terms(
                    logits,
                    rollout,
                    view,
                    alignments,
                    temperature=cfg.temperature,
                    teacher_temperature=cfg.teacher_temp,
                )
            if use_pg:
                pg = self.span_policy_gradient(rollout, logits, view, alignments)
                stats["train/pg_loss"] = float(pg.detach().mean())
            tokens = sum(a.student_tokens for a in alignments)
            stats["rollout/aligned_fraction"] = sum(a.student_aligned for a in alignments) / max(1, tokens)
            stats["rollout/groups_per_sequence"] = sum(a.num_groups for a in alignments) / len(alignments)
            stats["time/teacher"] = view.rollout.timings.get("score", 0.0)
            if on_policy:
                stats["rollout/reverse_kl_seq"] = float(
                    sequence_logprob_gap(rollout.logprobs, mask, view).mean()
                )
        ce = logits.new_zeros(len(rollout))
        if not on_policy and cfg.ce_weight > 0:
            logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, Vs)
            nll = -logp.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)  # (B, T)
            ce = (nll * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
        return uld, ce, pg, stats

    def update(self, batch: Sequence[Example]) -> dict[str, float]:
        """One step: collect sequences, read them with the teacher, minimise ULD (+ CE off-policy)."""
        cfg = self.config
        t0 = time.perf_counter()
        parts = self.collect(batch)
        t1 = time.perf_counter()
        self.student.train()
        total, uld_all, ce_all, stats = None, [], [], {}
        teacher_time = 0.0
        for rollout, on_policy in parts:
            uld, ce, pg, s = self.row_losses(rollout, on_policy)
            teacher_time += s.pop("time/teacher", 0.0)
            for k, v in s.items():  # row-weighted mean over the parts
                stats[k] = stats.get(k, 0.0) + v * len(rollout)
            part = (cfg.uld_weight * uld + cfg.ce_weight * ce + cfg.pg_weight * pg).sum()
            total = part if total is None else total + part
            uld_all.append(uld.detach())
            if not on_policy:
                ce_all.append(ce.detach())
        assert total is not None
        loss = total / len(batch)  # every row counts once in one mean
        out = self.optimizer_step(loss)
        t2 = time.perf_counter()
        on_rows = sum(len(r) for r, on in parts if on)
        for k in list(stats):
            rows = on_rows if k in ("rollout/reverse_kl_seq", "train/pg_loss") else len(batch)
            stats[k] /= max(1, rows)
        out.update(stats)
        out.update(
            {
                "train/loss": float(loss.detach()),
                "train/uld": float(torch.cat(uld_all).mean()),
                "rollout/on_policy_fraction": on_rows / len(batch),
                "rollout/completion_length": float(torch.cat([r.lengths for r, _ in parts]).float().mean()),
                "time/generate": sum(r.timings.get("generate", 0.0) for r, _ in parts),
                "time/teacher": teacher_time,
                "time/collect": t1 - t0,
                "time/student_update": t2 - t1,
                "time/step": t2 - t0,
            }
        )
        if ce_all:
            out["train/ce"] = float(torch.cat(ce_all).mean())
        return out
