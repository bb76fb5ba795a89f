"""MiniLLM (Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models", ICLR): reverse KL by policy gradient.

MiniLLM minimises the sequence-level reverse KL ``KL(pS || pT)(x) = E_{y~pS}[sum_t log pS(y_t|s_t) -
log pT(y_t|s_t)]`` (``s_t = (x, y_<t)``), i.e. it maximises the per-token rewards
``r_t = log pT(y_t|s_t) - log pS(y_t|s_t)`` (Sec. 2.2, "Policy Gradient"). Its gradient is

    grad KL = E_{y~pS}[ sum_t grad KL_t(s_t)  -  sum_t R_{t+1} grad log pS(y_t|s_t) ],

with ``KL_t(s_t) = sum_v pS(v|s_t) (log pS(v|s_t) - log pT(v|s_t))`` and ``R_{t+1} = sum_{t'>t} r_t'``.
The paper's three tricks (Sec. 2.2), and what this file adds, in the order they run each step:

1. **Rollout.** ``samples_per_prompt = k`` completions per prompt (rows ``i*k .. i*k+k-1``).
   *Teacher-mixed sampling*: with ``teacher_mix = m > 0`` every token is drawn from
   ``p_mix = m pT + (1 - m) pS`` (:class:`TeacherMixedPolicy`, passed as the ``model`` of
   :meth:`~rl_distill.rollout.RolloutEngine.generate`: same loop, same KV-cache handling, one cache
   per model). The teacher then scores the completions once with its full logits.
2. **Single-step term** (*single-step decomposition*). The immediate part of the gradient is taken
   exactly over the vocabulary: ``KL_t(s_t)`` is differentiated directly at every visited state
   (:func:`single_step_kl`), so no sampling noise enters it.
3. **Long-term return.** ``R_{t+1}``: the reward-to-go *from t + 1* of the per-token rewards
   ``w_d r_t``, discounted by relative position with a reverse recurrence (``gamma``) and masked by
   the completion mask (:func:`long_term_returns`; the absolute-position ``gamma**t`` and the padding
   leak of TRL's MiniLLM do not arise). *Length normalisation* (``length_normalize``) divides it by
   the number of tokens it sums, which removes the sum form's preference for short completions.
   The external reward of GKD Eq. 5 (Agarwal et al. 2023), ``w_r r(x, y)`` at the last token, is added to the return of every token up to and
   including the last, never normalised: there is no exact single-step form for it.
4. **Advantages.** ``A_t = R_{t+1} - b_t`` with ``baseline`` ``"none"`` or ``"leave_one_out"`` (the
   mean long-term return of the other ``k - 1`` samples of the prompt at the same position).
5. **Importance weights.** Under teacher-mixed sampling the token ``y_t`` came from ``p_mix``; the
   policy-gradient term is reweighted by ``w_t = pS(y_t|s_t) / p_mix(y_t|s_t)``, truncated at
   ``is_clip`` (:func:`importance_weights`). The single-step term is an exact expectation over
   ``y_t`` at the visited state and needs no such weight; the prefix weights ``prod_{t'<t} w_t'``
   are dropped in both terms (the paper's per-token approximation). ``w_t = 1`` exactly when
   ``teacher_mix = 0``.
6. **Loss.** Per sequence, summed over its tokens, then the mean over sequences:
   ``w_d KL_t(s_t) - ent_coef H(pS(.|s_t)) - w_t A_t log pS(y_t|s_t)``; one optimizer step.

Weights ``(w_d, w_r)`` (:func:`~rl_distill.objective.objective_weights`): ``(alpha, 1 - alpha)`` of
GKD Eq. 5 at the current ``alpha`` (``self.alpha_now``: it may follow a schedule), or
``(1, beta_ext)`` under reward extrapolation. ``pS`` is the policy actually sampled: the student's
softmax at ``temperature``, restricted by ``top_k``/``top_p`` (as in the engine); ``pT`` is the
teacher's softmax at ``teacher_temp``.

With ``teacher_mix = 0``, no length normalisation, ``ent_coef = 0``, ``gamma = 1`` and a baseline
independent of the sample (``none``, ``leave_one_out``), the expected gradient of the loss is exactly
``w_d grad KL(pS || pT) - w_r grad E[r]`` (GKD Eq. 5, sequence-sum form), the same as the
REINFORCE agent's; ``tests/test_minillm.py`` checks it by enumerating every completion of a tiny model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import torch
from torch import Tensor

from rl_distill.agents.base import (
    Agent,
    AgentConfig,
    group_baseline,
    masked_mean,
    sequence_loss,
    token_logprobs,
)
from rl_distill.divergences import reverse_kl
from rl_distill.objective import discounted_returns, last_token_index, objective_weights
from rl_distill.rollout import Rollout, SamplingConfig
from rl_distill.rollout.engine import filter_logits
from rl_distill.rollout.skinny_head import dense_head_input
from rl_distill.tasks import Example


@dataclass
class MiniLLMConfig(AgentConfig):
    """Hyper-parameters of :class:`MiniLLMAgent`."""

    samples_per_prompt: int = 4
    """Completions sampled per prompt (k of the leave-one-out baseline), >= 1."""
    baseline: Literal["none", "leave_one_out"] = "leave_one_out"
    """Baseline of the long-term return: none, or leave-one-out over the k samples of a prompt."""
    gamma: float = 1.0
    """Discount of the long-term return, in [0, 1] (1 = the undiscounted reverse KL)."""
    teacher_mix: float = 0.2
    """Teacher-mixed sampling: tokens are drawn from ``m pT + (1 - m) pS``, m in [0, 1] (0 = on-policy)."""
    is_clip: float | None = 2.0
    """Upper truncation of the importance weights pS / p_mix of the policy-gradient term (>= 1, None = off)."""
    length_normalize: bool = True
    """Divide the long-term return of the KL rewards by the number of tokens it sums (MiniLLM)."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus H(pS(.|s_t)) summed over tokens, >= 0."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.baseline not in ("none", "leave_one_out"):
            raise ValueError(f"baseline must be 'none' or 'leave_one_out', got {self.baseline!r}")
        if self.baseline == "leave_one_out" and self.samples_per_prompt < 2:
            raise ValueError(
                f"baseline 'leave_one_out' needs samples_per_prompt >= 2, got {self.samples_per_prompt}"
            )
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 <= self.teacher_mix <= 1.0:
            raise ValueError(f"teacher_mix must be in [0, 1], got {self.teacher_mix}")
        if self.is_clip is not None and not self.is_clip >= 1.0:
            raise ValueError(f"is_clip must be >= 1 (or null), got {self.is_clip}")
        if not self.ent_coef >= 0:
            raise ValueError(f"ent_coef must be >= 0, got {self.ent_coef}")


# ---------------------------------------------------------------------------------------------
# Teacher-mixed sampling: a "model" for RolloutEngine.generate whose next-token law is p_mix.
# ---------------------------------------------------------------------------------------------
class TeacherMixedPolicy:
    """The next-token distribution ``mix pT + (1 - mix) pS``, callable like a causal LM with a KV cache.

    :meth:`RolloutEngine.generate` calls it exactly as it calls a model (prompt forward, then one
    token at a time with ``past_key_values``); it runs student and teacher side by side, each with
    its own cache (carried as the pair ``(student_cache, teacher_cache)``), and returns as "logits"
    ``temperature * log p_mix``, so that the engine's division by its sampling temperature gives
    back ``log p_mix``: samples follow ``p_mix`` and the rollout's ``logprobs`` are ``log p_mix``.
    ``top_k`` / ``top_p`` filter the student's part (``pS`` is the student's sampling policy); call
    the engine without filters, or it would filter the mixture as well.

    Args:
        student: the student (its train/eval mode is what the engine saves and restores).
        teacher: the frozen teacher.
        mix: teacher weight ``m`` in (0, 1].
        vocab_size: the shared vocabulary (wider logits are cut).
        temperature: the student's temperature in ``pS`` (the engine's sampling temperature).
        teacher_temperature: the teacher's temperature in ``pT``.
        top_k: the student's top-k filter (0 = off).
        top_p: the student's nucleus filter (1.0 = off).
        dense_head_input: both models' prefills hand their output head a dense copy of the kept
            position (:func:`~rl_distill.rollout.skinny_head.dense_head_input`; the engine's switch).
    """

    def __init__(
        self,
        student: torch.nn.Module,
        teacher: torch.nn.Module,
        mix: float,
        vocab_size: int,
        temperature: float,
        teacher_temperature: float,
        *,
        top_k: int = 0,
        top_p: float = 1.0,
        dense_head_input: bool = True,
    ) -> None:
        if not 0.0 < mix <= 1.0:
            raise ValueError(f"mix must be in (0, 1], got {mix}")
        self.student, self.teacher, self.mix, self.vocab_size = student, teacher, mix, vocab_size
        self.temperature, self.teacher_temperature = temperature, teacher_temperature
        self.top_k, self.top_p = top_k, top_p
        self.dense_head_input = dense_head_input

    @property
    def training(self) -> bool:
        """The student's mode (what the engine saves before sampling and restores after)."""
        return self.student.training

    def eval(self) -> TeacherMixedPolicy:
        """Put the student in eval mode for sampling."""
        self.student.eval()  # the teacher is always in eval mode
        return self

    def train(self, mode: bool = True) -> TeacherMixedPolicy:
        """Restore the student's mode (the teacher stays in eval mode)."""
        self.student.train(mode)
        return self

    def __call__(
        self,
        *,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        past_key_values: tuple[Any, Any] | None = None,
        use_cache: bool = True,
        logits_to_keep: int = 1,
    ) -> SimpleNamespace:
        """One step of both models: ``.logits`` ``(B, 1, V)`` = ``temperature * log p_mix``, ``.past_key_values``.

        The signature is the subset of a causal LM's that :meth:`RolloutEngine.generate` uses;
        ``use_cache`` and ``logits_to_keep`` are accepted for it (both models always cache and keep
        the last position only).
        """
        student_cache, teacher_cache = past_key_values if past_key_values is not None else (None, None)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        dense = self.dense_head_input and past_key_values is None  # only the prefill slices strided
        with dense_head_input(self.student, dense), dense_head_input(self.teacher, dense):
            s = self.student(**inputs, past_key_values=student_cache, use_cache=True, logits_to_keep=1)
            t = self.teacher(**inputs, past_key_values=teacher_cache, use_cache=True, logits_to_keep=1)
        v = self.vocab_size
        dtype = torch.promote_types(s.logits.dtype, torch.float32)
        student_logits = filter_logits(
            s.logits[:, -1:, :v].to(dtype) / self.temperature, self.top_k, self.top_p
        )
        log_s = torch.log_softmax(student_logits, dim=-1)  # (B, 1, V)
        log_t = torch.log_softmax(t.logits[:, -1:, :v].to(dtype) / self.teacher_temperature, dim=-1)
        log_mix = torch.logaddexp(math.log(self.mix) + log_t, _log1m(self.mix) + log_s)  # (B, 1, V)
        return SimpleNamespace(
            logits=self.temperature * log_mix, past_key_values=(s.past_key_values, t.past_key_values)
        )


def _log1m(x: float) -> float:
    """``log(1 - x)``, -inf at ``x = 1``."""
    return math.log1p(-x) if x < 1.0 else float("-inf")


# ---------------------------------------------------------------------------------------------
# The estimator, in the order it runs: single-step term -> long-term return -> weights -> loss.
# ---------------------------------------------------------------------------------------------
def single_step_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """``KL_t(s_t) = sum_v pS(v|s_t) (log pS(v|s_t) - log pT(v|s_t))`` per position: ``(B, T)``, 0 where masked.

    The exact expectation over the next token (MiniLLM's single-step decomposition); differentiable
    in the student. Both inputs are logits already divided by their temperatures.

    Args:
        student_logits: ``(B, T, V)`` with gradient.
        teacher_logits: ``(B, T, V)``.
        mask: ``(B, T)`` completion mask.
    """
    # reverse_kl takes (teacher, student) and computes KL(student || teacher).
    return reverse_kl(teacher_logits, student_logits, mask, reduction="token")


def long_term_returns(
    distill_rewards: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    *,
    terminal_rewards: Tensor | None = None,
    length_normalize: bool = False,
) -> Tensor:
    """MiniLLM's long-term return ``R_{t+1}`` per token: ``(B, T)``, 0 where masked.

    ``gamma * G_{t+1}`` where ``G_t = r_t + gamma G_{t+1}`` is the reward-to-go of ``distill_rewards``
    (reverse recurrence, relative positions); with ``length_normalize`` divided by the number of real
    tokens after ``t`` (0 at the last token, which has none). Plus the reward-to-go *from t* of
    ``terminal_rewards``, never normalised. Masked positions of the inputs are never read (a NaN
    there does not leak).

    Args:
        distill_rewards: ``(B, T)`` per-token rewards ``w_d (log pT - log pS)``.
        mask: ``(B, T)`` completion mask (real tokens first, then padding).
        gamma: discount in [0, 1].
        terminal_rewards: ``(B, T)`` the external reward at each sequence's last token, or None.
        length_normalize: divide the KL part by the number of tokens it sums.
    """
    m = mask.bool()
    zero = torch.zeros((), dtype=distill_rewards.dtype, device=distill_rewards.device)
    rtg = discounted_returns(torch.where(m, distill_rewards, zero), mask, gamma)  # (B, T) G_t
    future = torch.zeros_like(rtg)
    future[:, :-1] = gamma * rtg[:, 1:]  # (B, T) gamma G_{t+1}; 0 after the last token
    if length_normalize:
        after = mask.long().flip(-1).cumsum(-1).flip(-1) - 1  # (B, T) real tokens after t
        future = future / after.clamp(min=1).to(future.dtype)
    if terminal_rewards is not None:
        future = future + discounted_returns(
            torch.where(m, terminal_rewards.to(rtg.dtype), zero), mask, gamma
        )
    return torch.where(m, future, zero)


def importance_weights(
    student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor, mix: float, clip: float | None
) -> Tensor:
    """``w_t = pS(y_t) / (mix pT(y_t) + (1 - mix) pS(y_t))`` truncated at ``clip``: ``(B, T)``, 0 where masked.

    Computed in log space (no overflow when ``pT >> pS``); exactly 1 on real tokens when ``mix = 0``.

    Args:
        student_logprobs: ``(B, T)`` ``log pS(y_t)`` at the sampling temperature.
        teacher_logprobs: ``(B, T)`` ``log pT(y_t)`` at the teacher's temperature.
        mask: ``(B, T)``.
        mix: teacher weight of the sampling mixture, in [0, 1].
        clip: upper truncation (None = none).
    """
    m = mask.bool()
    if mix == 0.0:
        return m.to(student_logprobs.dtype)
    log_s = student_logprobs.detach()
    log_mix = torch.logaddexp(math.log(mix) + teacher_logprobs.to(log_s.dtype), _log1m(mix) + log_s)
    w = torch.exp(log_s - log_mix)
    if clip is not None:
        w = w.clamp(max=clip)
    return torch.where(m, w, torch.zeros((), dtype=w.dtype, device=w.device))


def terminal_token_rewards(external: Tensor, mask: Tensor, weight: float) -> Tensor:
    """``weight * r(x, y)`` at each sequence's last real token, 0 elsewhere: ``(B,), (B, T) -> (B, T)``."""
    dtype = torch.promote_types(external.dtype, torch.float32)
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    last = last_token_index(mask)
    out.scatter_(1, last[:, None], (weight * external.to(out.dtype))[:, None])
    return out * mask.to(out.dtype)


class MiniLLMAgent(Agent):
    """MiniLLM: reverse-KL policy gradient with the paper's three tricks (module docstring).

    Args:
        engine: rollout engine (student, teacher, tokenizer).
        optimizer: optimizer over the student.
        config: :class:`MiniLLMConfig`.
        reward: the external reward as a callable (default: built from ``config.reward``).
        **kwargs: passed to :class:`~rl_distill.agents.base.Agent`.

    Raises:
        ValueError: ``alpha < 1`` (or ``beta_ext > 0``) without a reward.
    """

    name = "minillm"

    config_cls = MiniLLMConfig
    config: MiniLLMConfig

    # --- data -----------------------------------------------------------------------------
    def collect(self, batch: Sequence[Example]) -> tuple[Rollout, Tensor | None]:
        """Sample ``k`` completions per prompt (from ``p_mix`` when ``teacher_mix > 0``), full teacher logits.

        Returns:
            The scored rollout (``B * k`` rows, ``teacher_logits`` filled) and the external rewards
            ``(B * k,)`` (None when the objective has no external reward).
        """
        cfg = self.config
        examples = [ex for ex in batch for _ in range(cfg.samples_per_prompt)]
        prompts = [ex.prompt for ex in examples]
        model, sampling = None, cfg.sampling
        if cfg.teacher_mix > 0:
            # The policy filters the student's part itself (top-k/top-p), so the engine must not
            # filter the mixture: p_mix = m pT + (1 - m) pS exactly, as the importance weights assume.
            model = TeacherMixedPolicy(
                self.student, self.engine.teacher, cfg.teacher_mix, self.engine.vocab_size,
                cfg.temperature, cfg.teacher_temp, top_k=cfg.top_k, top_p=cfg.top_p,
                dense_head_input=self.engine.dense_head_input,
            )  # fmt: skip
            sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature)
        rollout = self.engine.generate(prompts, sampling, model=model, generator=self.generator)
        rollout = self.engine.score(rollout, teacher_output="full", teacher_temperature=cfg.teacher_temp)
        _, reward_weight = objective_weights(self.alpha_now, cfg.beta_ext)
        uses_reward = self.reward is not None and reward_weight > 0
        external = self.external_rewards(examples, rollout) if uses_reward else None
        return rollout, external

    # --- loss -----------------------------------------------------------------------------
    def loss(
        self, rollout: Rollout, external: Tensor | None = None, *, weights: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """The MiniLLM loss of one scored rollout (needs ``teacher_logits``).

        Args:
            rollout: from :meth:`collect`.
            external: ``(B,)`` external rewards, or None.
            weights: ``(B,)`` sequence weights instead of ``1/B`` (with exact sequence probabilities the
                loss's gradient is the exact expected gradient).

        Returns:
            The loss and float statistics.
        """
        cfg = self.config
        # (alpha, 1 - alpha) of Eq. 5 at the current (possibly scheduled) alpha, or (1, beta_ext).
        distill_weight, reward_weight = objective_weights(self.alpha_now, cfg.beta_ext)
        if rollout.teacher_logits is None:
            raise ValueError("MiniLLM needs the teacher's full logits: score with teacher_output='full'")
        mask = rollout.completion_mask  # (B, T)
        ids = rollout.completion_ids
        logits, _ = self.engine.student_forward(rollout)  # (B, T, V), with gradient
        # Both distributions at their temperatures (no extra (B, T, V) copy at temperature 1); pS is
        # the policy actually sampled: tempered, then top-k/top-p filtered (the token itself kept).
        student_logits = logits if cfg.temperature == 1.0 else logits / cfg.temperature
        if cfg.top_k > 0 or cfg.top_p < 1.0:
            student_logits = filter_logits(student_logits, cfg.top_k, cfg.top_p, keep=ids)
        teacher_logits = rollout.teacher_logits  # (B, T, V)
        if cfg.teacher_temp != 1.0:
            teacher_logits = teacher_logits / cfg.teacher_temp
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        logp_all = torch.log_softmax(student_logits.to(dtype), dim=-1)  # (B, T, V), with gradient
        logprobs = logp_all.gather(-1, ids[..., None]).squeeze(-1)  # (B, T) log pS(y_t)
        with torch.no_grad():  # log pT(y_t), 0 on padding (whatever the teacher said there)
            teacher_logprobs = token_logprobs(teacher_logits, ids).to(logprobs.dtype)  # (B, T)
            teacher_logprobs = torch.where(mask, teacher_logprobs, torch.zeros_like(teacher_logprobs))

        # (a) Single-step decomposition: the immediate KL, exact over the vocabulary.
        kl_t = single_step_kl(student_logits, teacher_logits, mask)  # (B, T)

        # (c) Long-term return R_{t+1} of the rewards w_d (log pT - log pS), plus the terminal reward.
        distill = distill_weight * (teacher_logprobs - logprobs.detach())  # (B, T)
        terminal = None
        if external is not None:
            terminal = terminal_token_rewards(external, mask, reward_weight)
        returns = long_term_returns(
            distill, mask, cfg.gamma, terminal_rewards=terminal, length_normalize=cfg.length_normalize
        )  # (B, T)
        advantages = returns - group_baseline(returns, mask, cfg.baseline, cfg.samples_per_prompt)

        # (b) Importance weights of teacher-mixed sampling, on the policy-gradient term only.
        is_w = importance_weights(logprobs, teacher_logprobs, mask, cfg.teacher_mix, cfg.is_clip)  # (B, T)

        pg_tokens = -(is_w * advantages).detach() * logprobs  # (B, T)
        single_tokens = distill_weight * kl_t.to(logprobs.dtype)
        token_losses = single_tokens + pg_tokens
        entropy = None
        if cfg.ent_coef > 0:
            finite = logp_all.masked_fill(torch.isinf(logp_all), 0.0)  # 0 log 0 = 0 for filtered tokens
            entropy = -(logp_all.exp() * finite).sum(-1)  # (B, T)
            token_losses = token_losses - cfg.ent_coef * entropy
        loss = sequence_loss(token_losses, mask, weights=weights)

        lengths = rollout.lengths.clamp(min=1).to(logprobs.dtype)
        sampled_return = distill * mask if terminal is None else (distill + terminal) * mask  # (B, T)
        # (B,) log pS(y) / pT(y) of the samples (drawn from p_mix when teacher_mix > 0)
        log_ratio = ((logprobs.detach() - teacher_logprobs) * mask).sum(-1)
        stats = {
            "train/pg_loss": float(sequence_loss(pg_tokens.detach(), mask, weights=weights)),
            "train/single_step_loss": float(sequence_loss(single_tokens.detach(), mask, weights=weights)),
            "train/single_step_kl": float(masked_mean(kl_t.detach(), mask)),
            "train/importance_weight": float(masked_mean(is_w, mask)),
            "rollout/return": float(sampled_return.sum(-1).mean()),
            "rollout/long_term_return": float(masked_mean(returns, mask)),
            "rollout/reverse_kl": float(log_ratio.mean()),
            "rollout/teacher_logprob": float(((teacher_logprobs * mask).sum(-1) / lengths).mean()),
        }
        if cfg.is_clip is not None and cfg.teacher_mix > 0:
            stats["train/is_clipfrac"] = float(masked_mean((is_w >= cfg.is_clip).to(is_w.dtype), mask))
        if entropy is not None:
            stats["train/entropy"] = float(masked_mean(entropy.detach(), mask))
        if external is not None:
            stats["rollout/external_reward"] = float(external.mean())
        return loss, stats

    # --- step -----------------------------------------------------------------------------
    def update(self, batch: Sequence[Example]) -> dict[str, float]:
        """One MiniLLM step: sample k completions per prompt, then one gradient step."""
        t0 = time.perf_counter()
        rollout, external = self.collect(batch)
        t1 = time.perf_counter()
        self.student.train()
        loss, loss_stats = self.loss(rollout, external)
        stats = self.optimizer_step(loss)
        t2 = time.perf_counter()
        stats.update(loss_stats)
        stats.update(
            {
                "train/loss": float(loss.detach()),
                "rollout/completion_length": float(rollout.lengths.float().mean()),
                "rollout/teacher_mix": self.config.teacher_mix,
                "time/generate": rollout.timings.get("generate", 0.0),
                "time/teacher": rollout.timings.get("score", 0.0),
                "time/student_update": t2 - t1,
                "time/step": t2 - t0,
                "time/tokens": float(rollout.lengths.sum()),
            }
        )
        return stats
