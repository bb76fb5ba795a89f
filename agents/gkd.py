"""Generalized Knowledge Distillation (GKD), Agarwal et al. 2023 (arXiv 2306.13649), Algorithm 1 and Eq. 5.

Each step, for a batch of prompts ``x``:

1. **Data.** With probability ``lmbda`` an example uses an on-policy completion ``y ~ pS(.|x)``
   sampled from the current student at ``temperature``; otherwise a fixed completion: the dataset
   reference (``off_policy="reference"``) or a teacher sample (``off_policy="teacher"``).
   No gradient flows through sampling.
2. **Divergence.** The token-level divergence of paper Eq. 2 on those sequences,
   ``D(pT || pS)(y|x) = 1/L_y sum_n D(pT(.|y<n, x) || pS(.|y<n, x))``,
   averaged over the batch's sequences: ``L_GKD`` of paper Sec. 3.1. ``D`` is any divergence from
   :mod:`rl_distill.divergences`; the student's distribution is taken at ``temperature`` (the
   temperature it samples at, so the loss is about the distribution that generated the data), the
   teacher's at ``teacher_temperature`` (default: the same). The divergences take one temperature
   ``T``, so the teacher's logits are passed scaled by ``T / T_teacher``:
   ``softmax(z * (T / T_teacher) / T) = softmax(z / T_teacher)``. With ``target="one_hot"`` the
   teacher distribution is replaced by the one-hot distribution of the sequence's own tokens
   (forward KL is then the cross-entropy: supervised fine-tuning).

   *Token importance* (``token_weighting``, tutorial ch. 7 "TIP"): each completion token gets the
   detached score ``w_n = (1 - H(pT_n) / log V) * KL(pT_n || pS_n)`` (both distributions at the
   temperatures above; :mod:`rl_distill.weighting`). ``tip_weight`` uses the scores as weights,
   ``tip_filter`` the weights ``1[w_n >= tip_threshold]``. Eq. 2 becomes the weighted mean over
   each sequence, ``D_w(y|x) = sum_n w_n D_n / sum_n w_n`` (with the filter: the mean over the
   sequence's kept tokens; skipped tokens count neither in the sum nor in the divisor), and
   ``L_GKD`` the mean of ``D_w`` over the sequences with ``sum_n w_n > 0``. A sequence without a kept
   token is left out of that mean; a batch without any gives ``L_GKD = 0`` (zero gradient).
   ``train/divergence`` (and the curriculum's measured difficulty) stays the unweighted Eq. 2.
3. **Reward (Eq. 5).** With ``alpha < 1`` and an external reward ``r``, the loss is::

       loss = alpha * L_GKD  -  (1 - alpha) * mean_i[(r_i - b_i) * sum_t log pS(y_i,t)]

   With ``beta_ext`` set (reward extrapolation, G-OPD; needs ``alpha = 1``) the weights are
   ``(1, beta_ext)`` instead: ``loss = L_GKD - beta_ext * PG(r)``, the Eq. 5 loss divided by alpha
   when ``beta_ext = (1 - alpha) / alpha`` (:func:`rl_distill.objective.objective_weights`).

   The second term is REINFORCE for ``E_{y~pS}[r(y)]`` on the **on-policy** samples only (mean over
   them): the reward term of Eq. 5 is an expectation under the student, and the fixed off-policy
   sequences would need importance weights, so they get no reward term. ``log pS`` is at the
   sampling temperature. The baseline ``b_i`` is ``baseline="leave_one_out"`` (default: the mean
   reward of the *other* on-policy samples of the batch, unbiased), ``"batch_mean"`` (the mean of
   all of them, slightly biased) or ``"none"``.

   *Groups* (``samples_per_prompt = k > 1``): each on-policy example is sampled ``k`` times (rows
   ``i*k .. i*k+k-1``) and the baselines are taken within each prompt's group instead of the batch:
   ``leave_one_out`` is per-prompt RLOO, ``batch_mean`` the group's mean, and ``"group_norm"``
   replaces ``r_i - b_i`` by GRPO's group-normalised advantage ``(r_i - mean_g) / (std_g + 1e-4)``
   (:func:`~rl_distill.agents.grpo.group_advantages`; needs ``k > 1``). Every sample is a sequence of
   ``L_GKD``'s mean (an on-policy example counts ``k`` times next to a fixed sequence's once). ``alpha = 1`` (default) is pure GKD and never calls
   the reward; ``alpha = 0`` drops the divergence from the loss (it is still logged); a reward
   identically 0 gives ``alpha * L_GKD``.
4. **Update.** One optimizer step on the student. With ``train.grad_accum_steps = k`` the batch is
   collected whole (samples, teacher scores, rewards and their baseline) and the gradient pass runs
   over ``k`` micro-batches of sequences, each backpropagated with its share of the loss: its rows'
   Eq. 2 divided by the batch's sequence count, its on-policy rows' policy-gradient terms by the
   batch's on-policy count. The update equals the whole batch's (TIP weighting, whose normaliser
   needs every sequence's weights, is refused with accumulation).

*Privileged teacher* (``teacher_template``; OPSD, tutorial ch. 6): the teacher scores every sequence,
on-policy or fixed, after its own prompt rendered from the example (e.g.
``"{prompt} [Answer: {answer}]"``), while the student reads the plain prompt; set on the rollout
engine by the build step (:meth:`~rl_distill.rollout.RolloutEngine.set_teacher_template`). With
``model.teacher: self`` the teacher is a frozen copy of the starting student.

Special cases (documented configurations, also in :data:`SPECIAL_CASES`):

- SFT: ``lmbda=0, off_policy="reference", target="one_hot", divergence="forward_kl"``
  (cross-entropy on the references);
- supervised KD: ``lmbda=0, off_policy="reference", divergence="forward_kl"`` (paper Eq. 3);
- SeqKD (Kim & Rush 2016; "SFT on teacher outputs" in the paper):
  ``lmbda=0, off_policy="teacher", target="one_hot", divergence="forward_kl"``;
- on-policy GKD: ``lmbda=1`` (the default);
- mixed: ``lmbda=0.5``.

The coin is flipped per example by default (``mixture="example"``); ``mixture="batch"`` flips
one coin per batch as in Algorithm 1 (and TRL). ``lmbda`` and ``alpha`` may be schedules over
training progress (``{preset: industrial}``: off-policy warmup, a mixed phase, then on-policy;
:mod:`rl_distill.schedules`); the agent reads their values for the current update
(``lmbda_now``, ``alpha_now``), logged as ``train/lmbda`` and ``train/alpha``.

*Sparse and cached teacher signals* (``teacher_topk``, ``teacher_cache``; docs/teacher_signals.md): with
``teacher_topk = k`` the teacher scores with its top-k log-probs (at ``teacher_temperature``) instead of full
logits, and ``D`` is :func:`~rl_distill.divergences.topk_divergence` (k tokens plus a tail bucket; never
above the full divergence, exact at k = V). With ``teacher_cache`` (supervised KD: ``lmbda=0``, references)
those top-k come from a cache written by ``rl-distill cache-teacher`` and the run loads no teacher.

*Flawed-prefix rejection* (``reject``, tutorial ch. 7): on-policy samples failing the
:class:`~rl_distill.filters.SampleFilter` (student perplexity, n-gram loops) are dropped before
the teacher scores them, after up to ``reject_resample`` fresh tries; their examples get no loss
and no reward this step. ``rollout/filter/rejected_fraction`` is the share of the first tries
rejected, ``rollout/filter/dropped_fraction`` the share finally dropped. When nothing is left in the
whole step (every process), the step is a no-op: no teacher call, no optimizer step, ``train/loss``
0, ``train/skipped`` 1 and the agent's ``empty_steps`` counter (``train/empty_steps``) grows; it is
not an error (``train.max_consecutive_skips`` counts only non-finite steps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from rl_distill.agents.base import (
    Agent,
    AgentConfig,
    group_baseline,
    sample_filter_from_spec,
    select_rows,
)
from rl_distill.agents.grpo import group_advantages
from rl_distill.divergences import DIVERGENCES, divergence, topk_divergence
from rl_distill.filters import SampleFilter
from rl_distill.objective import objective_weights
from rl_distill.rollout import Rollout
from rl_distill.rollout.engine import filtered_logprobs, template_fields
from rl_distill.tasks import Example
from rl_distill.teacher_cache import TeacherCache
from rl_distill.weighting import importance_filter, token_importance

TOKEN_WEIGHTINGS = ("none", "tip_weight", "tip_filter")


@dataclass
class GKDConfig(AgentConfig):
    """Hyper-parameters of :class:`GKDAgent` (shared fields: :class:`~rl_distill.agents.base.AgentConfig`).

    ``temperature`` is also the student's temperature in the divergence (the teacher's is
    ``teacher_temperature``, default the same).
    """

    divergence: str = "jsd"
    """Token-level divergence: ``forward_kl``, ``reverse_kl``, ``jsd`` (uses ``beta``) or ``tv``."""
    beta: float = 0.5
    """JSD(beta) mixture weight of the teacher, in [0, 1]; 0 is forward KL, 1 reverse KL."""
    lmbda: float | dict[str, Any] = 1.0
    """Fraction of on-policy (student-generated) data, in [0, 1] (the paper's lambda); a number or a
    schedule over training progress (``{schedule: [[p, v], ...]}``, ``{preset: industrial}``)."""
    mixture: Literal["example", "batch"] = "example"
    """Flip the lambda coin per example, or once per batch (paper Algorithm 1)."""
    off_policy: Literal["reference", "teacher"] = "reference"
    """Fixed sequences when the coin says off-policy: dataset references, or teacher samples (SeqKD)."""
    target: Literal["teacher", "one_hot"] = "teacher"
    """Target distribution: the teacher's, or one-hot on the sequence's own tokens (SFT, SeqKD; lmbda=0)."""
    baseline: Literal["leave_one_out", "batch_mean", "none", "group_norm"] = "leave_one_out"
    """Reward baseline over the batch's on-policy samples (each prompt's group when samples_per_prompt > 1):
    ``leave_one_out``, ``batch_mean``, ``none``, or ``group_norm`` ((r - mean) / (std + eps) per group; k > 1)."""
    samples_per_prompt: int = 1
    """On-policy samples per prompt, >= 1; k > 1 makes the reward baselines per-prompt groups."""
    teacher_template: str | None = None
    """Privileged teacher prompt (OPSD): a format string over ``prompt``, ``reference`` and metadata keys,
    e.g. ``"{prompt} [Answer: {answer}]"``; the teacher reads it, the student the plain prompt. null: same prompt."""
    token_weighting: Literal["none", "tip_weight", "tip_filter"] = "none"
    """Token importance (TIP): ``none``, ``tip_weight`` (weighted Eq. 2) or ``tip_filter`` (keep scores >= tip_threshold)."""
    tip_threshold: float = 0.3
    """``tip_filter``: the smallest kept score ``(1 - H(pT) / log V) * KL(pT || pS)``, >= 0."""
    reject: dict[str, Any] | None = None
    """Drop flawed on-policy samples before the teacher scores them: SampleFilter settings
    (``max_perplexity``, ``loop_repeats``, ``loop_ngram``, ``max_repeated_fraction``, ``repeat_ngram``); null: off."""
    reject_resample: int = 0
    """Extra sampling tries for rejected on-policy samples, >= 0 (still rejected after them: dropped)."""
    teacher_topk: int | None = None
    """Sparse teacher signal: the divergence on the teacher's top-k log-probs plus one tail bucket
    (:func:`~rl_distill.divergences.topk_divergence`: never above the full divergence, exact at k = V); a
    positive int <= the vocabulary size. null: the full distribution. See docs/teacher_signals.md."""
    teacher_cache: str | None = None
    """Folder written by ``rl-distill cache-teacher``: the teacher's top-k log-probs on the dataset references,
    for supervised KD (lmbda=0, off_policy=reference) without loading the teacher; ``model.teacher`` names the
    teacher it must match. null: score with the live teacher."""

    #: Fields that accept a schedule over training progress: the base's ``alpha``, and ``lmbda``.
    scheduled_fields: ClassVar[dict[str, tuple[float, float]]] = {
        **AgentConfig.scheduled_fields,
        "lmbda": (0.0, 1.0),
    }

    def __post_init__(self) -> None:
        super().__post_init__()  # also parses and range-checks alpha and lmbda
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if self.mixture not in ("example", "batch"):
            raise ValueError(f"mixture must be 'example' or 'batch', got {self.mixture!r}")
        if self.off_policy not in ("reference", "teacher"):
            raise ValueError(f"off_policy must be 'reference' or 'teacher', got {self.off_policy!r}")
        if self.target not in ("teacher", "one_hot"):
            raise ValueError(f"target must be 'teacher' or 'one_hot', got {self.target!r}")
        if self.target == "one_hot":
            if not self.is_constant("lmbda", 0.0):
                raise ValueError(
                    "target 'one_hot' (SFT/SeqKD) needs lmbda=0 (the constant): it trains on fixed sequences, "
                    f"got lmbda={self.lmbda}"
                )
            reverse = self.divergence == "reverse_kl" or (self.divergence == "jsd" and self.beta == 1.0)
            if reverse:
                raise ValueError(
                    "target 'one_hot' cannot be used with reverse KL: KL(pS || one-hot) is infinite"
                )
        no_samples = self.is_constant("lmbda", 0.0)  # lmbda = 0 at every step: no on-policy samples
        if self.uses_reward and no_samples:
            what = f"beta_ext > 0 ({self.beta_ext})" if self.beta_ext else f"alpha < 1 ({self.alpha})"
            raise ValueError(f"{what} weights a reward on on-policy samples, but lmbda=0 gives none")
        if self.baseline not in ("none", "batch_mean", "leave_one_out", "group_norm"):
            raise ValueError(
                f"baseline must be 'none', 'batch_mean', 'leave_one_out' or 'group_norm', got {self.baseline!r}"
            )
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.baseline == "group_norm" and self.samples_per_prompt < 2:
            raise ValueError(
                "baseline 'group_norm' normalises within each prompt's group: it needs samples_per_prompt >= 2, "
                f"got {self.samples_per_prompt}"
            )
        if self.samples_per_prompt > 1 and no_samples:
            raise ValueError(
                f"samples_per_prompt ({self.samples_per_prompt}) > 1 samples on-policy, but lmbda=0 gives none"
            )
        if self.samples_per_prompt > 1 and self.reject is not None:
            raise ValueError(
                "samples_per_prompt > 1 keeps groups of samples; reject would break them up: use one of the two"
            )
        if self.teacher_template is not None:
            template_fields(self.teacher_template)  # a malformed template fails at load time
        if self.token_weighting not in TOKEN_WEIGHTINGS:
            raise ValueError(
                f"token_weighting must be one of {', '.join(TOKEN_WEIGHTINGS)}, got {self.token_weighting!r}"
            )
        if not (math.isfinite(self.tip_threshold) and self.tip_threshold >= 0):
            raise ValueError(f"tip_threshold must be a finite number >= 0, got {self.tip_threshold}")
        if self.token_weighting != "none" and self.target != "teacher":
            raise ValueError(
                f"token_weighting {self.token_weighting!r} scores tokens with the teacher; target "
                f"{self.target!r} has no teacher distribution"
            )
        self.reject_filter: SampleFilter | None = sample_filter_from_spec(self.reject, "reject")
        if self.reject_resample < 0:
            raise ValueError(f"reject_resample must be >= 0, got {self.reject_resample}")
        if self.reject_filter is not None and no_samples:
            raise ValueError("reject filters on-policy samples, but lmbda=0 gives none")
        self._check_teacher_signals(no_samples)

    def _check_teacher_signals(self, no_samples: bool) -> None:
        """Range and compatibility checks of ``teacher_topk`` and ``teacher_cache``."""
        k = self.teacher_topk
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(
                f"teacher_topk must be a positive integer (or null: the full distribution), got {k!r}"
            )
        sparse = "teacher_cache" if self.teacher_cache is not None else "teacher_topk"
        if (k is not None or self.teacher_cache is not None) and self.target != "teacher":
            raise ValueError(
                f"{sparse} is a teacher signal; target {self.target!r} has no teacher distribution"
            )
        if (k is not None or self.teacher_cache is not None) and self.token_weighting != "none":
            raise ValueError(
                f"{sparse} keeps only the teacher's top-k; token_weighting {self.token_weighting!r} needs its full "
                "distribution (entropy): set one of them off"
            )
        if self.teacher_cache is None:
            return
        if not self.teacher_cache:
            raise ValueError(
                "teacher_cache must name a folder written by rl-distill cache-teacher (or be null)"
            )
        if not no_samples:
            raise ValueError(
                f"teacher_cache holds teacher scores of the dataset references only (supervised KD, lmbda=0); "
                f"lmbda={self.lmbda} samples on-policy, and those samples need the live teacher: set lmbda: 0 or "
                "teacher_cache: null"
            )
        if self.off_policy != "reference":
            raise ValueError(
                f"teacher_cache scores the dataset references; off_policy {self.off_policy!r} samples from the "
                "teacher, which needs the live teacher"
            )

    @property
    def eval_beta(self) -> float:
        """The JSD beta reported at evaluation: this config's ``beta``."""
        return self.beta

    @property
    def needs_teacher(self) -> bool:
        """SFT (one-hot targets on references) never calls the teacher; everything else does."""
        return self.target != "one_hot" or self.off_policy == "teacher"


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


@dataclass
class Collected:
    """The sequences of one GKD step (:meth:`GKDAgent.gather`).

    Attributes:
        rollouts: scored sequences (teacher logits unless ``target="one_hot"``), on-policy part first.
        rows: the batch index of each of their rows, in order (rejected on-policy examples missing).
        num_on_policy: the kept on-policy rows (the first rows of ``rollouts[0]``).
        stats: ``rollout/filter/...`` metrics when rejection is on.
        rejected: the on-policy samples when every one of them was rejected, else None.
    """

    rollouts: list[Rollout]
    rows: list[int]
    num_on_policy: int
    stats: dict[str, float] = field(default_factory=dict)
    rejected: Rollout | None = None


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
    supports_grad_accum = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sample_filter = self.config.reject_filter
        self.teacher_cache: TeacherCache | None = None
        #: k of the sparse teacher signal (``teacher_topk``, or the cache's k); None: full distributions.
        self.topk: int | None = self.config.teacher_topk
        if self.topk is not None and self.topk > self.engine.vocab_size:
            raise ValueError(
                f"agent.teacher_topk: must be <= the vocabulary size {self.engine.vocab_size}, got {self.topk}"
            )
        if self.config.teacher_cache is not None:
            self.teacher_cache = TeacherCache.open(self.config.teacher_cache)
            self.teacher_cache.check_agent(self.config, self.engine)
            self.topk = self.teacher_cache.k
        if self.grad_accum_steps > 1 and self.config.token_weighting != "none":
            raise ValueError(
                f"train.grad_accum_steps: {self.grad_accum_steps} cannot be used with agent.token_weighting "
                f"{self.config.token_weighting!r} (its normaliser needs the whole batch's weights); set one of them off"
            )

    @property
    def lmbda_now(self) -> float:
        """The on-policy fraction lambda for the current update (``agent.lmbda``, scheduled or constant)."""
        return self.scheduled_values["lmbda"]

    # --- data -----------------------------------------------------------------------------
    def _on_policy_rows(self, batch_size: int) -> Tensor:
        """Boolean ``(B,)``: which examples use student samples (the lambda coin)."""
        cfg, gen, lmbda = self.config, self.generator, self.lmbda_now
        if lmbda in (0.0, 1.0):
            return torch.full((batch_size,), lmbda == 1.0)
        n = 1 if cfg.mixture == "batch" else batch_size
        coins = torch.rand(n, generator=gen, device=gen.device).cpu() < lmbda
        return coins.expand(batch_size) if n == 1 else coins

    def _fixed_sequences(self, examples: Sequence[Example]) -> Rollout:
        """Off-policy data: dataset references, or teacher samples (SeqKD).

        A privileged teacher (``teacher_template``) samples from its own prompt; the sequences are then
        set after the student's prompt (its completion tokens as sampled, EOS only where it stopped).
        """
        prompts = [ex.prompt for ex in examples]
        if self.config.off_policy == "teacher":
            teacher_prompts = self.engine.teacher_prompts_for(prompts)
            sampled = self.engine.generate(
                teacher_prompts or prompts,
                self.config.sampling,
                model=self.engine.teacher,
                generator=self.generator,
            )
            if teacher_prompts is None:
                return sampled
            ids = [row[mask].tolist() for row, mask in zip(sampled.completion_ids, sampled.completion_mask)]
            return self.engine.from_completions(prompts, ids, append_eos=False)
        missing = [ex.prompt for ex in examples if ex.reference is None]
        if missing:
            raise ValueError(
                f"GKD with lmbda < 1 and off_policy='reference' needs reference completions, but "
                f"{len(missing)} example(s) have none (first: {missing[0][:60]!r}); use a task with references "
                "or off_policy='teacher'"
            )
        return self.engine.from_completions(prompts, [ex.reference for ex in examples])

    def gather(self, examples: Sequence[Example], on_policy: Tensor | None = None) -> Collected:
        """Sequences for one step: sample, reject flawed samples, add fixed sequences, score.

        On-policy samples go through :meth:`~rl_distill.agents.base.Agent.reject_flawed` (when
        ``reject`` is set) *before* the teacher's forward, so the teacher scores only kept rows.

        Args:
            examples: the batch.
            on_policy: boolean ``(B,)`` choice of on-policy rows; default: flip the lambda coin.
        """
        cfg = self.config
        on = self._on_policy_rows(len(examples)) if on_policy is None else on_policy
        on_rows = [i for i in range(len(examples)) if on[i]]
        off_rows = [i for i in range(len(examples)) if not on[i]]
        got = Collected([], [], 0)
        if on_rows:
            k = cfg.samples_per_prompt  # each on-policy example's group of samples: rows i*k .. i*k+k-1
            sampled_rows = [i for i in on_rows for _ in range(k)]
            prompts = [examples[i].prompt for i in sampled_rows]
            sampled = self.engine.generate(prompts, cfg.sampling, generator=self.generator)
            kept, first, rows = self.reject_flawed(sampled, resample=cfg.reject_resample)
            if self.sample_filter is not None:
                got.stats.update(first.metrics())
                got.stats["rollout/filter/dropped_fraction"] = 1.0 - len(rows) / len(on_rows)
            if kept is None:
                got.rejected = sampled
            else:
                got.rollouts.append(kept)
                got.rows += [sampled_rows[j] for j in rows.tolist()]
                got.num_on_policy = len(rows)
        if off_rows:
            off_examples = [examples[i] for i in off_rows]
            fixed = self._fixed_sequences(off_examples)
            if self.teacher_cache is not None:  # supervised KD from the cache: no teacher forward
                fixed = self.teacher_cache.fill(fixed, off_examples)
            got.rollouts.append(fixed)
            got.rows += off_rows
        # SFT / SeqKD (one-hot targets) need no teacher scores; from a cache they are filled in already.
        if cfg.target != "one_hot" and self.teacher_cache is None:
            if self.topk is None:
                got.rollouts = [self.engine.score(r, teacher_output="full") for r in got.rollouts]
            else:  # sparse signal: the top-k log-probs at the teacher's temperature
                got.rollouts = [
                    self.engine.score(
                        r, teacher_output="topk", top_k=self.topk, teacher_temperature=cfg.teacher_temp
                    )
                    for r in got.rollouts
                ]
        return got

    def collect(
        self, examples: Sequence[Example], on_policy: Tensor | None = None
    ) -> tuple[list[Rollout], int]:
        """Sequences for one step, scored by the teacher with full logits (on-policy part first).

        Args:
            examples: the batch.
            on_policy: boolean ``(B,)`` choice of on-policy rows; default: flip the lambda coin.

        Returns:
            The rollouts (none, one or two) and the number of (kept) on-policy examples.
        """
        got = self.gather(examples, on_policy)
        return got.rollouts, got.num_on_policy

    # --- loss -----------------------------------------------------------------------------
    def teacher_target(self, rollout: Rollout, vocab_size: int) -> Tensor:
        """The target logits ``(B, T, V)`` to pass to a divergence taken at ``temperature``.

        The teacher's logits scaled by ``temperature / teacher_temperature`` (so the divergence's
        ``softmax(. / temperature)`` is the teacher at ``teacher_temperature``; unscaled when the two
        are equal), or the one-hot logits of the sequence's tokens (``target="one_hot"``).
        """
        cfg = self.config
        if cfg.target == "one_hot":
            return one_hot_logits(rollout.completion_ids, vocab_size)  # (B, T, V)
        target = rollout.teacher_logits  # (B, T, V)
        if cfg.teacher_temp != cfg.temperature:
            target = target.to(torch.promote_types(target.dtype, torch.float32))
            target = target * (cfg.temperature / cfg.teacher_temp)
        return target

    def sequence_divergence(self, rollout: Rollout, student_logits: Tensor | None = None) -> Tensor:
        """Paper Eq. 2 for each sequence of ``rollout``, differentiable w.r.t. the student: ``(B,)``.

        Args:
            rollout: scored sequences (``teacher_logits`` needed unless ``target="one_hot"``).
            student_logits: ``(B, T, V)`` from :meth:`RolloutEngine.score_student`; computed if None.
        """
        return self._divergence(rollout, student_logits, "sequence")

    def _divergence(self, rollout: Rollout, student_logits: Tensor | None, reduction: str) -> Tensor:
        cfg = self.config
        if student_logits is None:
            student_logits = self.engine.score_student(rollout)  # (B, T, V), with gradient
        if self.topk is not None and cfg.target == "teacher":
            assert rollout.teacher_topk_logprobs is not None and rollout.teacher_topk_ids is not None
            return topk_divergence(
                cfg.divergence,
                rollout.teacher_topk_logprobs,  # (B, T, k), at teacher_temperature already
                rollout.teacher_topk_ids,  # (B, T, k)
                student_logits,
                rollout.completion_mask,
                beta=cfg.beta,
                temperature=cfg.temperature,
                reduction=reduction,  # type: ignore[arg-type]
            )
        return divergence(
            cfg.divergence,
            self.teacher_target(rollout, student_logits.shape[-1]),
            student_logits,
            rollout.completion_mask,
            beta=cfg.beta,
            temperature=cfg.temperature,
            reduction=reduction,  # type: ignore[arg-type]
        )

    def weighted_sequence_divergence(
        self, rollout: Rollout, student_logits: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """TIP-weighted Eq. 2 per sequence (module docstring, step 2): ``sum_n w_n D_n / sum_n w_n``.

        Args:
            rollout: scored sequences.
            student_logits: ``(B, T, V)`` with gradient.

        Returns:
            ``(weighted, has_weight, plain, weights)``: the weighted divergence ``(B,)`` (0, with a
            zero gradient, where ``sum_n w_n = 0``), whether each sequence has a non-zero weight
            ``(B,)``, the unweighted Eq. 2 ``(B,)`` (detached), and the weights ``(B, T)``
            (TIP scores, or 0/1 for the filter; 0 where masked; detached).
        """
        cfg, mask = self.config, rollout.completion_mask
        target = self.teacher_target(rollout, student_logits.shape[-1])  # (B, T, V)
        tokens = divergence(
            cfg.divergence,
            target,
            student_logits,
            mask,
            beta=cfg.beta,
            temperature=cfg.temperature,
            reduction="token",
        )  # (B, T), 0 where masked
        # The score's KL(pT || pS) at the loss's temperatures: the same scaled target, detached student.
        scores = token_importance(
            target, student_logits.detach(), mask, temperature=cfg.temperature
        )  # (B, T)
        if cfg.token_weighting == "tip_filter":
            weights = importance_filter(scores, mask, cfg.tip_threshold)[0].to(tokens.dtype)  # (B, T)
        else:
            weights = scores.to(tokens.dtype)  # (B, T), 0 where masked
        num, den = (weights * tokens).sum(-1), weights.sum(-1)  # (B,)
        has = den > 0
        weighted = torch.where(has, num / torch.where(has, den, torch.ones_like(den)), num * 0.0)
        plain = tokens.detach().sum(-1) / mask.sum(-1).clamp(min=1)  # (B,) paper Eq. 2
        return weighted, has, plain, weights

    def divergence_terms(
        self, rollouts: Sequence[Rollout], student_logits: Sequence[Tensor | None] | None = None
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        """``L_GKD`` (TIP-weighted when ``token_weighting`` is on), each sequence's Eq. 2, TIP metrics.

        Without weighting ``L_GKD`` is the mean over all sequences of their Eq. 2 divergence; with it,
        the mean of :meth:`weighted_sequence_divergence` over the sequences with a non-zero weight
        (0 with a zero gradient when there are none).

        Returns:
            ``(loss, per_sequence, stats)``: per-sequence unweighted Eq. 2 values ``(B,)`` (detached,
            in the order of the rollouts' rows) and ``rollout/tip_...`` floats.
        """
        logits = student_logits if student_logits is not None else [None] * len(rollouts)
        if self.config.token_weighting == "none":
            per_seq = torch.cat([self.sequence_divergence(r, s) for r, s in zip(rollouts, logits)])  # (B,)
            return per_seq.mean(), per_seq.detach(), {}
        parts = [
            self.weighted_sequence_divergence(r, s if s is not None else self.engine.score_student(r))
            for r, s in zip(rollouts, logits)
        ]
        weighted, has, plain = (torch.cat([p[k] for p in parts]) for k in range(3))  # (B,) each
        loss = weighted.sum() / has.sum().clamp(min=1)
        tokens = sum(int(r.completion_mask.sum()) for r in rollouts)
        weights = [p[3][r.completion_mask] for p, r in zip(parts, rollouts)]
        stats = {"rollout/tip_sequences_fraction": float(has.float().mean())}
        if self.config.token_weighting == "tip_filter":
            stats["rollout/tip_kept_fraction"] = sum(int((w > 0).sum()) for w in weights) / max(1, tokens)
        else:
            stats["rollout/tip_weight_mean"] = float(sum(w.sum() for w in weights)) / max(1, tokens)
        return loss, plain, stats

    def loss(
        self, rollouts: Sequence[Rollout], student_logits: Sequence[Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``L_GKD`` (:meth:`divergence_terms`). Returns (loss, per-sequence Eq. 2, detached)."""
        loss, per_seq, _ = self.divergence_terms(rollouts, student_logits)
        return loss, per_seq

    def reward_loss(
        self,
        rollout: Rollout,
        student_logits: Tensor,
        rewards: Tensor | None,
        *,
        advantages: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Eq. 5's reward term by REINFORCE on on-policy samples: ``-mean_i[(r_i - b_i) sum_t log pS(y_i,t)]``.

        Args:
            rollout: on-policy sequences.
            student_logits: ``(B, T, V)`` student logits on them, with gradient.
            rewards: ``(B,)`` external rewards.
            advantages: ``(B,)`` advantages computed beforehand (a micro-batch's rows of the batch's);
                ``rewards`` is then not read.

        Returns:
            The loss (to minimise) and the advantages ``r - b`` ``(B,)``.
        """
        cfg = self.config
        mask = rollout.completion_mask
        # The policy that sampled: temperature, then the top-k / top-p filter (renormalised).
        logp = filtered_logprobs(
            student_logits, rollout.completion_ids, cfg.temperature, cfg.top_k, cfg.top_p
        )
        seq_logp = (logp * mask).sum(-1)  # (B,) log pS(y|x) of the sampling policy
        advantages = self.reward_advantages(rewards) if advantages is None else advantages  # (B,)
        return -(advantages.to(seq_logp.dtype) * seq_logp).mean(), advantages

    def reward_advantages(self, rewards: Tensor) -> Tensor:
        """``r_i - b_i`` with the configured baseline over the given on-policy rewards: ``(B,) -> (B,)``.

        Over the whole batch, or within each prompt's group of ``samples_per_prompt`` rows (k > 1;
        ``group_norm``: ``(r - mean_g) / (std_g + eps)``).
        """
        k = self.config.samples_per_prompt
        if self.config.baseline == "group_norm":
            return group_advantages(rewards, k)
        ones = torch.ones_like(rewards[:, None], dtype=torch.bool)
        group = k if k > 1 else None  # k = 1: the whole batch's on-policy samples
        return rewards - group_baseline(rewards[:, None], ones, self.config.baseline, group)[:, 0]

    def objective(
        self, rollouts: Sequence[Rollout], num_on_policy: int, rewards: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """The Eq. 5 loss ``alpha * L_GKD - (1 - alpha) * PG(r)`` (module docstring, step 3).

        With ``beta_ext`` set: ``L_GKD - beta_ext * PG(r)``. ``alpha`` is its value for the
        current update (:attr:`alpha_now`).

        Args:
            rollouts: from :meth:`collect` (on-policy rollout first when ``num_on_policy > 0``).
            num_on_policy: number of on-policy sequences (the rows of ``rollouts[0]``).
            rewards: ``(num_on_policy,)`` external rewards; None means no reward term.

        Returns:
            The loss and float statistics.
        """
        loss, stats, _ = self._objective(rollouts, num_on_policy, rewards)
        return loss, stats

    def _objective(
        self, rollouts: Sequence[Rollout], num_on_policy: int, rewards: Tensor | None
    ) -> tuple[Tensor, dict[str, float], Tensor]:
        """:meth:`objective`, plus each sequence's unweighted Eq. 2 divergence ``(B,)`` (detached)."""
        distill_weight, reward_weight = objective_weights(self.alpha_now, self.config.beta_ext)
        logits = [self.engine.score_student(r) for r in rollouts]  # one gradient forward per rollout
        divergence_loss, per_seq, tip_stats = self.divergence_terms(rollouts, logits)
        stats = {"train/divergence": float(per_seq.mean()), **tip_stats}
        # A zero weight removes the term rather than multiplying it by 0 (0 * inf would be NaN).
        loss = distill_weight * divergence_loss if distill_weight > 0 else None
        if reward_weight > 0 and rewards is not None and num_on_policy > 0:
            pg_loss, advantages = self.reward_loss(rollouts[0], logits[0], rewards)
            weighted = reward_weight * pg_loss
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
        return loss, stats, per_seq

    def _accumulated_objective(
        self, rollouts: Sequence[Rollout], num_on_policy: int, rewards: Tensor | None
    ) -> tuple[Tensor, dict[str, float], Tensor]:
        """:meth:`_objective` over ``grad_accum_steps`` micro-batches of rows, each backpropagated at once.

        The advantages are computed on the whole batch first (their baseline spans every on-policy
        row); each micro-batch's loss is its share of the Eq. 5 loss (module docstring, step 4).

        Returns:
            The step's loss (detached sum of the shares), statistics, and each sequence's Eq. 2 (detached).
        """
        distill_weight, reward_weight = objective_weights(self.alpha_now, self.config.beta_ext)
        total = sum(len(r) for r in rollouts)
        use_reward = reward_weight > 0 and rewards is not None and num_on_policy > 0
        advantages = self.reward_advantages(rewards) if use_reward else None  # (num_on_policy,)
        starts = [0]
        for r in rollouts:
            starts.append(starts[-1] + len(r))
        loss_sum, pg_sum, per_seq = torch.zeros(()), 0.0, []
        for rows in self.micro_batches(total):
            loss: Tensor | None = None
            for k, rollout in enumerate(rollouts):
                local = rows[(rows >= starts[k]) & (rows < starts[k + 1])] - starts[k]
                if local.numel() == 0:
                    continue
                part_rollout = select_rows(rollout, local)
                logits = self.engine.score_student(part_rollout)  # (b, T, V), with gradient
                div = self.sequence_divergence(part_rollout, logits)  # (b,) paper Eq. 2
                per_seq.append(div.detach())
                part = distill_weight * div.sum() / total if distill_weight > 0 else 0.0 * div.sum()
                if use_reward and k == 0:  # the on-policy rollout comes first
                    pg, _ = self.reward_loss(part_rollout, logits, None, advantages=advantages[local])
                    pg = pg * (local.numel() / num_on_policy)  # its share of the on-policy mean
                    pg_sum += float(pg.detach())
                    part = part + reward_weight * pg
                loss = part if loss is None else loss + part
            assert loss is not None
            self.accumulate_backward(loss)
            loss_sum = loss_sum + loss.detach().cpu()
        per_seq_all = torch.cat(per_seq)
        stats = {"train/divergence": float(per_seq_all.mean())}
        if use_reward:
            assert advantages is not None and rewards is not None
            stats.update(
                {
                    "train/pg_loss": pg_sum,
                    "rollout/external_reward": float(rewards.mean()),
                    "rollout/advantage_std": float(advantages.std()) if len(advantages) > 1 else 0.0,
                }
            )
        return loss_sum, stats, per_seq_all

    # --- step -----------------------------------------------------------------------------
    def update(self, batch: Sequence[Example]) -> dict[str, float]:
        """One GKD step (Algorithm 1, Eq. 5): collect sequences, score rewards, minimise the loss.

        Sets :attr:`example_scores` to each example's Eq. 2 divergence (NaN for a rejected sample).
        """
        t0 = time.perf_counter()
        on = self._on_policy_rows(len(batch))
        got = self.gather(batch, on)
        rollouts, num_on_policy = got.rollouts, got.num_on_policy
        if self.sample_filter is not None:
            # Decided together: a process with nothing left still joins the others' all-reduce.
            nothing = torch.tensor(0.0 if got.rows else 1.0, device=self.engine.device)
            if float(self.mean_across_processes(nothing)) == 1.0:
                return self._empty_step(batch, got, t0)
        rewards = None
        _, reward_weight = objective_weights(self.alpha_now, self.config.beta_ext)
        if reward_weight > 0 and num_on_policy > 0:
            on_examples = [batch[i] for i in got.rows[:num_on_policy]]
            rewards = self.external_rewards(on_examples, rollouts[0])  # (num_on_policy,)
        t1 = time.perf_counter()
        self.student.train()
        if got.rows and self.grad_accum_steps > 1:  # train.grad_accum_steps: backward per micro-batch
            loss, loss_stats, per_seq = self._accumulated_objective(rollouts, num_on_policy, rewards)
            stats = self.optimizer_step()
        else:
            if got.rows:
                loss, loss_stats, per_seq = self._objective(rollouts, num_on_policy, rewards)
            else:  # every sample of this process was rejected, not those of others: a zero loss
                assert got.rejected is not None
                one = select_rows(got.rejected, torch.zeros(1, dtype=torch.long))
                loss, loss_stats, per_seq = 0.0 * self.engine.score_student(one).sum(), {}, torch.zeros(0)
            stats = self.optimizer_step(loss)
        t2 = time.perf_counter()

        self.example_scores = [math.nan] * len(batch)
        values: dict[int, list[float]] = {}
        for row, value in zip(got.rows, per_seq.tolist()):  # k samples of one example: their mean
            values.setdefault(row, []).append(value)
        for row, vs in values.items():
            self.example_scores[row] = sum(vs) / len(vs)
        generated = sum(int(r.lengths.sum()) for r in rollouts)
        stats.update(loss_stats)
        stats.update(got.stats)
        stats.update(
            {
                "train/loss": float(loss.detach()),
                "rollout/on_policy_fraction": num_on_policy / self.config.samples_per_prompt / len(batch),
                "time/generate": sum(r.timings.get("generate", 0.0) for r in rollouts),
                "time/teacher": sum(r.timings.get("score", 0.0) for r in rollouts),
                "time/student_update": t2 - t1,
                "time/step": t2 - t0,
                "time/tokens": float(generated),
            }
        )
        if rollouts:
            stats["rollout/completion_length"] = float(
                torch.cat([r.lengths for r in rollouts]).float().mean()
            )
        if rollouts and all(r.teacher_logprobs is not None for r in rollouts):
            stats["rollout/teacher_logprob"] = float(
                torch.cat([r.teacher_logprobs.sum(-1) / r.lengths.clamp(min=1) for r in rollouts]).mean()
            )
        return stats

    def _empty_step(self, batch: Sequence[Example], got: Collected, t0: float) -> dict[str, float]:
        """Every sample of the step was rejected (on every process): no teacher call, no optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.empty_steps += 1
        self.example_scores = [math.nan] * len(batch)
        sampled = got.rejected
        return {
            **got.stats,
            "train/loss": 0.0,
            "train/grad_norm": 0.0,
            "train/skipped": 1.0,
            "rollout/on_policy_fraction": 0.0,
            "time/generate": sampled.timings.get("generate", 0.0) if sampled is not None else 0.0,
            "time/teacher": 0.0,
            "time/student_update": 0.0,
            "time/step": time.perf_counter() - t0,
            "time/tokens": float(sampled.lengths.sum()) if sampled is not None else 0.0,
        }
