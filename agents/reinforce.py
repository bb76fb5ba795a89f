"""REINFORCE (Williams 1992) on the RL + distillation objective of GKD (Agarwal et al. 2023, Eq. 5).

Eq. 5 maximises ``(1 - alpha) E_{y~pS}[r(y)] - alpha E_{y~pS}[D(pT || pS)(y|x)]``. With ``D`` the
sequence-level reverse KL, everything is an expectation under the student's own samples, and
:mod:`rl_distill.objective` splits it into per-token rewards. Each step, for a batch of prompts:

1. **Rollout.** ``samples_per_prompt = k`` completions per prompt from the student at
   ``temperature`` (``engine.rollout``, KV cache), with the teacher's log-prob of every token at
   ``teacher_temp`` (``teacher_temperature``, by default the sampling temperature, as in GKD).
2. **Rewards per token.** The environment's ``alpha * log pT(y_t)`` plus ``(1 - alpha) * r(x, y)``
   at the last token (:func:`~rl_distill.objective.env_token_rewards`), and the agent's own
   ``-alpha * log pS(y_t)`` (:func:`~rl_distill.objective.student_token_rewards`, detached). With
   ``beta_ext`` (reward extrapolation, G-OPD; ``alpha = 1``) the weights are ``1`` on both log-probs
   and ``beta_ext`` on ``r``: Eq. 5 with ``alpha`` divided by ``alpha`` when
   ``beta_ext = (1 - alpha) / alpha`` (see :mod:`rl_distill.objective`).
3. **Returns.** ``return_type="reward_to_go"``: ``G_t = sum_{k>=t} gamma^(k-t) r_k`` for token ``t``
   (only later rewards: lower variance); ``"sequence"``: the whole return ``G_0`` for every token.
   ``length_normalize`` divides the distillation part of each return by the number of tokens it
   sums (``L - t``; ``L`` for the whole sequence), as MiniLLM does (Gu et al. 2024, Sec. 2.2): the
   sum form of Eq. 5 pays fewer nats of KL for fewer tokens, so it otherwise favours short
   completions whenever the teacher gives EOS a fair probability. The terminal external reward is
   never divided. This is a different, per-token objective (its estimator is biased for Eq. 5).
4. **Advantages.** ``A_t = G_t - b_t`` with ``baseline``: ``"none"``; ``"batch_mean"``;
   ``"leave_one_out"`` (RLOO: the mean return of the *other* ``k - 1`` samples of the same prompt,
   Kool et al. 2019, Ahmadian et al. 2024); ``"value"`` (a learned ``V(s_t)``: a linear
   :class:`~rl_distill.agents.base.ValueHead` on the student's last hidden state, from the same
   forward as the logits, trained by MSE on ``G_t`` with its own param group). Baselines of returns
   that vary per token are taken position by position. ``norm_adv`` whitens the advantages.
5. **Loss.** ``pg_loss = mean_i sum_t -A_it log pS(y_it)`` plus
   ``vf_coef * 0.5 * mean_t (V(s_t) - G_t)^2``; one optimizer step. With ``train.grad_accum_steps = k``
   the rollout is sampled and scored whole, and the loss runs over ``k`` micro-batches of whole
   prompt groups (so the RLOO and batch-mean baselines, taken within each prompt's ``k`` samples,
   are unchanged), each backpropagated with its share: ``pg_loss`` times its share of the
   sequences, the value loss times its share of the tokens. The update equals the whole batch's
   (``norm_adv``, which whitens over the whole batch, is refused with accumulation).

With ``gamma = 1``, a baseline independent of the token it multiplies and of later ones (``none``,
``leave_one_out``, ``value``), no whitening and no length normalisation, the expected gradient of
``pg_loss`` is exactly ``-grad`` of Eq. 5 (sequence-sum form): ``alpha * grad KL(pS || pT)`` for the
distillation part. ``tests/test_reinforce.py`` checks this by enumerating every completion of a tiny
model. The own term's direct dependence on the student is left out of the gradient: its
expectation, ``-alpha E[grad log pS(y)]``, is zero.

``log pS`` is always the log-prob of the distribution the rollout was sampled from: the student's
softmax at ``temperature`` restricted by ``top_k``/``top_p`` and renormalised
(:func:`~rl_distill.rollout.engine.filtered_logprobs`, the same function the engine records with),
so with a filter on the gradient is that of Eq. 5 for the filtered policy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rl_distill.agents.base import (
    Agent,
    AgentConfig,
    ValueHead,
    explained_variance,
    group_baseline,
    hidden_size_of,
    masked_mean,
    masked_whiten,
    select_rows,
    sequence_loss,
)
from rl_distill.objective import (
    discounted_returns,
    env_token_rewards,
    objective_weights,
    student_token_rewards,
)
from rl_distill.rollout import Rollout
from rl_distill.rollout.engine import filtered_logprobs
from rl_distill.tasks import Example


@dataclass
class REINFORCEConfig(AgentConfig):
    """Hyper-parameters of :class:`REINFORCEAgent`."""

    samples_per_prompt: int = 4
    """Completions sampled per prompt (k of RLOO), >= 1."""
    return_type: Literal["reward_to_go", "sequence"] = "reward_to_go"
    """Per-token return: the reward-to-go G_t, or the whole-sequence return G_0 for every token."""
    gamma: float = 1.0
    """Discount of the returns, in [0, 1] (1 = the undiscounted Eq. 5)."""
    baseline: Literal["none", "batch_mean", "leave_one_out", "value"] = "leave_one_out"
    """Baseline subtracted from the returns: none, batch mean, leave-one-out over the k samples, value head."""
    norm_adv: bool = False
    """Whiten the advantages over the batch's tokens (zero mean, unit std)."""
    length_normalize: bool = False
    """Divide the KL part of each return by the tokens it sums (MiniLLM); counters short completions."""
    vf_coef: float = 0.5
    """Weight of the value-head loss (baseline='value'), >= 0."""
    value_lr: float | None = None
    """Learning rate of the value head's param group (None: the optimizer's default), > 0."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.return_type not in ("reward_to_go", "sequence"):
            raise ValueError(f"return_type must be 'reward_to_go' or 'sequence', got {self.return_type!r}")
        if self.baseline not in ("none", "batch_mean", "leave_one_out", "value"):
            raise ValueError(
                f"baseline must be 'none', 'batch_mean', 'leave_one_out' or 'value', got {self.baseline!r}"
            )
        if self.baseline == "leave_one_out" and self.samples_per_prompt < 2:
            raise ValueError(
                f"baseline 'leave_one_out' needs samples_per_prompt >= 2, got {self.samples_per_prompt}"
            )
        if self.vf_coef < 0:
            raise ValueError(f"vf_coef must be >= 0, got {self.vf_coef}")
        if self.value_lr is not None and not self.value_lr > 0:
            raise ValueError(f"value_lr must be > 0 or None, got {self.value_lr}")


# ---------------------------------------------------------------------------------------------
# The estimator, in the order it runs: returns -> advantages -> policy-gradient loss.
# ---------------------------------------------------------------------------------------------
def compute_returns(
    token_rewards: Tensor,
    mask: Tensor,
    return_type: Literal["reward_to_go", "sequence"],
    gamma: float = 1.0,
    *,
    terminal_rewards: Tensor | None = None,
    length_normalize: bool = False,
) -> Tensor:
    """Per-token returns ``(B, T)`` (0 where masked): reward-to-go ``G_t``, or ``G_0`` on every token.

    Args:
        token_rewards: ``(B, T)`` per-token rewards (the distillation part ``alpha (log pT - log pS)``).
        mask: ``(B, T)`` completion mask.
        return_type: ``"reward_to_go"`` or ``"sequence"``.
        gamma: discount.
        terminal_rewards: ``(B, T)`` rewards paid once per sequence (``(1 - alpha) r`` at the last
            token), added to the returns but never length-normalised.
        length_normalize: divide the returns of ``token_rewards`` at ``t`` by the number of real
            tokens from ``t`` to the end (MiniLLM's length normalisation).
    """
    returns = discounted_returns(token_rewards, mask, gamma)  # (B, T)
    if length_normalize:
        remaining = mask.long().flip(-1).cumsum(-1).flip(-1)  # (B, T) tokens from t to the end
        returns = returns / remaining.clamp(min=1).to(returns.dtype)
    if terminal_rewards is not None:
        returns = returns + discounted_returns(terminal_rewards, mask, gamma)
    if return_type == "sequence":
        returns = returns[:, :1] * mask.to(returns.dtype)
    return returns


def compute_advantages(
    returns: Tensor,
    mask: Tensor,
    baseline: Literal["none", "batch_mean", "leave_one_out", "value"],
    *,
    group_size: int | None = None,
    values: Tensor | None = None,
    per_token: bool = True,
    norm_adv: bool = False,
) -> Tensor:
    """``A_t = G_t - b_t`` (0 where masked), optionally whitened.

    Args:
        returns: ``(B, T)`` from :func:`compute_returns`.
        mask: ``(B, T)`` completion mask.
        baseline: ``none``, ``batch_mean``, ``leave_one_out`` (over consecutive groups of
            ``group_size`` rows: the samples of one prompt) or ``value`` (uses ``values``).
        group_size: rows per group for ``leave_one_out`` (default: the whole batch).
        values: ``(B, T)`` value estimates ``V(s_t)`` for ``baseline="value"`` (detached here).
        per_token: baselines per position (reward-to-go); False: one per sequence, from ``G_0``.
        norm_adv: whiten the result over the masked tokens.
    """
    m = mask.to(returns.dtype)
    if baseline == "value":
        if values is None:
            raise ValueError("baseline='value' needs values")
        b = values.detach().to(returns.dtype) * m
    elif per_token:
        b = group_baseline(returns, mask, baseline, group_size)
    else:
        whole = torch.ones_like(returns[:, :1], dtype=torch.bool)
        b = group_baseline(returns[:, :1], whole, baseline, group_size) * m  # (B, 1) -> (B, T)
    advantages = (returns - b) * m
    return masked_whiten(advantages, mask) if norm_adv else advantages


def policy_gradient_loss(
    logprobs: Tensor, advantages: Tensor, mask: Tensor, *, weights: Tensor | None = None
) -> Tensor:
    """REINFORCE surrogate ``mean_i sum_t -A_it log pS(y_it)``; its gradient is the policy gradient.

    Args:
        logprobs: ``(B, T)`` student log-probs of the sampled tokens, with gradient.
        advantages: ``(B, T)`` (detached here).
        mask: ``(B, T)``.
        weights: ``(B,)`` sequence weights instead of ``1/B`` (see :func:`~rl_distill.agents.base.sequence_loss`).
    """
    token_losses = -advantages.detach().to(logprobs.dtype) * logprobs  # (B, T)
    return sequence_loss(token_losses, mask, weights=weights)


class REINFORCEAgent(Agent):
    """REINFORCE with baselines on the per-token rewards of Eq. 5 (module docstring).

    Args:
        engine: rollout engine (student, teacher, tokenizer).
        optimizer: optimizer over the student; with ``baseline="value"`` the agent adds the value
            head's parameters to it as a new param group (see :mod:`rl_distill.agents.base`).
        config: :class:`REINFORCEConfig`.
        reward: the external reward as a callable (default: built from ``config.reward``).
        **kwargs: passed to :class:`~rl_distill.agents.base.Agent`.

    Raises:
        ValueError: ``alpha < 1`` or ``beta_ext > 0`` without a reward.
    """

    name = "reinforce"

    config_cls = REINFORCEConfig
    config: REINFORCEConfig
    supports_grad_accum = True

    def __init__(self, engine, optimizer, config: REINFORCEConfig | None = None, **kwargs) -> None:  # noqa: D417
        super().__init__(engine, optimizer, config, **kwargs)
        config = self.config
        if self.grad_accum_steps > 1 and config.norm_adv:
            raise ValueError(
                f"train.grad_accum_steps: {self.grad_accum_steps} cannot be used with agent.norm_adv (it whitens "
                "over the whole batch's tokens); set one of them off"
            )
        self.value_head: ValueHead | None = None
        if config.baseline == "value":
            head = ValueHead(hidden_size_of(self.student))
            self.value_head = self.register_trainable("value_head", head, lr=config.value_lr)

    # --- data -----------------------------------------------------------------------------
    def collect(self, batch: Sequence[Example]) -> tuple[Rollout, Tensor | None]:
        """Sample ``k`` completions per prompt (rows ``i*k .. i*k+k-1``), teacher log-probs, rewards.

        Returns:
            The scored rollout (``B * k`` rows) and the external rewards ``(B * k,)`` (None when the
            reward has no weight: ``alpha = 1`` and no ``beta_ext``).
        """
        cfg = self.config
        examples = [ex for ex in batch for _ in range(cfg.samples_per_prompt)]
        rollout = self.engine.rollout(
            [ex.prompt for ex in examples],
            cfg.sampling,
            generator=self.generator,
            teacher_temperature=cfg.teacher_temp,
        )
        _, reward_weight = objective_weights(self.alpha_now, cfg.beta_ext)
        external = self.external_rewards(examples, rollout) if reward_weight > 0 else None
        return rollout, external

    # --- loss -----------------------------------------------------------------------------
    def loss(
        self,
        rollout: Rollout,
        external: Tensor | None = None,
        *,
        weights: Tensor | None = None,
        shares: tuple[float, float] = (1.0, 1.0),
    ) -> tuple[Tensor, dict[str, float]]:
        """Rewards, returns, advantages and the REINFORCE loss of one scored rollout.

        Args:
            rollout: from :meth:`collect` (needs ``teacher_logprobs``).
            external: ``(B,)`` external rewards, or None.
            weights: ``(B,)`` sequence weights for the policy-gradient term instead of ``1/B``
                (with exact sequence probabilities the loss's gradient is the exact expected gradient).
            shares: ``(sequences, tokens)``: this rollout's share of the whole batch's sequences and
                completion tokens (a micro-batch's); they scale the policy-gradient and value losses.

        Returns:
            The loss (policy gradient plus weighted value loss) and float statistics.
        """
        cfg = self.config
        mask = rollout.completion_mask
        # One student forward: logits for the policy, last hidden states for the value head.
        logits, hidden = self.engine.student_forward(
            rollout, output_hidden_states=self.value_head is not None
        )
        # log pS of the sampled policy (tempered, top-k/top-p filtered), with gradient: (B, T)
        logprobs = filtered_logprobs(logits, rollout.completion_ids, cfg.temperature, cfg.top_k, cfg.top_p)

        # Eq. 5 per token: the distillation part alpha (log pT - log pS), and (1 - alpha) r at the end
        # (weights 1 and beta_ext under reward extrapolation).
        teacher = rollout.teacher_logprobs
        alpha, beta_ext = self.alpha_now, cfg.beta_ext  # alpha may follow a schedule
        distill = env_token_rewards(teacher, mask, alpha, beta_ext=beta_ext) + student_token_rewards(
            logprobs.detach(), mask, alpha, beta_ext=beta_ext
        )  # (B, T)
        terminal = env_token_rewards(
            torch.zeros_like(teacher), mask, alpha, external, beta_ext=beta_ext
        )  # (B, T)
        returns = compute_returns(
            distill,
            mask,
            cfg.return_type,
            cfg.gamma,
            terminal_rewards=terminal,
            length_normalize=cfg.length_normalize,
        )  # (B, T)
        values = self.value_head(hidden) if self.value_head is not None else None  # (B, T)
        advantages = compute_advantages(
            returns,
            mask,
            cfg.baseline,
            group_size=cfg.samples_per_prompt,
            values=values,
            per_token=cfg.return_type == "reward_to_go",
            norm_adv=cfg.norm_adv,
        )
        pg_loss = policy_gradient_loss(logprobs, advantages, mask, weights=weights)
        seq_share, token_share = shares
        loss = pg_loss * seq_share
        stats = {"train/pg_loss": float(pg_loss.detach())}
        if values is not None:
            value_loss = 0.5 * masked_mean((values - returns.to(values.dtype)) ** 2, mask)
            loss = loss + cfg.vf_coef * value_loss * token_share
            stats["train/value_loss"] = float(value_loss.detach())
            stats["train/explained_variance"] = explained_variance(values.detach(), returns, mask)

        lengths = rollout.lengths.clamp(min=1).to(distill.dtype)
        log_ratio = ((logprobs.detach() - rollout.teacher_logprobs) * mask).sum(-1)  # (B,) log pS/pT of y
        stats.update(
            {
                "rollout/return": float(returns[:, 0].mean()),
                "rollout/reverse_kl": float(log_ratio.mean()),
                "rollout/teacher_logprob": float(
                    ((rollout.teacher_logprobs * mask).sum(-1) / lengths).mean()
                ),
            }
        )
        if external is not None:
            stats["rollout/external_reward"] = float(external.mean())
        return loss, stats

    def accumulated_loss(self, rollout: Rollout, external: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        """:meth:`loss` over ``grad_accum_steps`` micro-batches of whole prompt groups, each backpropagated.

        Returns:
            The step's loss (detached sum of the shares) and the statistics, each micro-batch's weighted
            by its share of the sequences (the value loss by its share of the tokens).
        """
        n, tokens = len(rollout), max(1, int(rollout.completion_mask.sum()))
        loss_sum, stats_sum = torch.zeros(()), {}
        for rows in self.micro_batches(n, group_size=self.config.samples_per_prompt):
            part = select_rows(rollout, rows.to(rollout.completion_ids.device))
            shares = (len(rows) / n, int(part.completion_mask.sum()) / tokens)
            loss, stats = self.loss(part, None if external is None else external[rows], shares=shares)
            self.accumulate_backward(loss)
            loss_sum = loss_sum + loss.detach().cpu()
            for key, value in stats.items():
                share = shares[1] if key == "train/value_loss" else shares[0]
                stats_sum[key] = stats_sum.get(key, 0.0) + share * value
        return loss_sum, stats_sum

    # --- step -----------------------------------------------------------------------------
    def update(self, batch: Sequence[Example]) -> dict[str, float]:
        """One REINFORCE step: sample k completions per prompt, then one gradient step."""
        t0 = time.perf_counter()
        rollout, external = self.collect(batch)
        t1 = time.perf_counter()
        self.student.train()
        if self.grad_accum_steps > 1:  # train.grad_accum_steps: backward per micro-batch
            loss, loss_stats = self.accumulated_loss(rollout, external)
            stats = self.optimizer_step()
        else:
            loss, loss_stats = self.loss(rollout, external)
            stats = self.optimizer_step(loss)
        t2 = time.perf_counter()
        stats.update(loss_stats)
        stats.update(
            {
                "train/loss": float(loss.detach()),
                "rollout/completion_length": float(rollout.lengths.float().mean()),
                "time/generate": rollout.timings.get("generate", 0.0),
                "time/teacher": rollout.timings.get("score", 0.0),
                "time/student_update": t2 - t1,
                "time/step": t2 - t0,
                "time/tokens": float(rollout.lengths.sum()),
            }
        )
        return stats
