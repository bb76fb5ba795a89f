"""PPO (Schulman et al. 2017) on the RL + distillation objective of GKD (Agarwal et al. 2023, Eq. 5).

Follows cleanrl's ``ppo.py`` (names and order: ``b_logprobs``, ``b_values``, GAE ``lastgaelam``,
``pg_loss``, ``v_loss``, ``approx_kl``, ``clipfrac``), with sequences of tokens instead of env steps.
Each update, for a batch of prompts:

1. **Rollout.** One completion per prompt from the student at ``temperature`` (``engine.rollout``),
   with the teacher's log-prob of every token at ``teacher_temp`` (``teacher_temperature``, by
   default the sampling temperature, as in GKD).
2. **Old log-probs and values.** One no-grad student forward (eval mode, as when sampling) gives
   ``log pS_old(y_t)`` of the sampled policy (``temperature``, ``top_k``/``top_p`` filtered and
   renormalised: :func:`~rl_distill.rollout.engine.filtered_logprobs`, also used for the new
   log-probs of the ratio) and ``V(s_t)`` from a linear value head on the
   last hidden state (:class:`~rl_distill.agents.base.ValueHead`; it reads detached hidden states,
   so the value loss trains only the head, which has its own param group in the optimizer).
3. **Rewards per token** as in the environment (:mod:`rl_distill.objective`): ``alpha * log pT(y_t)``
   plus ``(1 - alpha) * r(x, y)`` at the last token, plus the agent's own ``-alpha * log pS_old(y_t)``
   from the rollout-time (old) log-probs; optionally clipped to ``[-reward_clip, reward_clip]``.
   With ``beta_ext`` (reward extrapolation, G-OPD; ``alpha = 1``): ``log pT - log pS_old`` plus
   ``beta_ext * r`` at the last token (:mod:`rl_distill.objective`).
4. **GAE** (Schulman et al. 2016) with ``gamma``, ``gae_lambda``; the completion ends the episode
   (at EOS or at the token budget: the Eq. 5 objective is over the truncated completion), padded
   positions neither receive nor pass on value. ``returns = advantages + values``.
5. **Update.** ``update_epochs`` passes over the sequences in ``num_minibatches`` shuffled
   minibatches; each: a new forward (logits and hidden states in one call), ratio
   ``pS / pS_old``, clipped surrogate ``pg_loss``, (clipped) value loss ``v_loss``, entropy bonus;
   ``loss = pg_loss - ent_coef * entropy + vf_coef * v_loss``; one optimizer step. Advantages are
   whitened per minibatch (``norm_adv``). After an epoch, stop if ``approx_kl > target_kl``.

Token losses are summed over each sequence and averaged over sequences, as in the REINFORCE agent
(the sum form of Eq. 5): with one epoch, one minibatch and clipping inactive (ratio 1 at the first
step), the policy gradient is REINFORCE's with the same advantages. Like every estimator of the
sum form, PPO prefers shorter completions when the teacher gives EOS a fair probability (fewer
tokens, fewer nats of KL); see ``length_normalize`` in the REINFORCE agent for the remedy there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rl_distill.agents.base import (
    Agent,
    AgentConfig,
    ValueHead,
    explained_variance,
    hidden_size_of,
    masked_mean,
    masked_whiten,
    select_rows,
    sequence_loss,
)
from rl_distill.objective import env_token_rewards, objective_weights, student_token_rewards
from rl_distill.rollout import Rollout
from rl_distill.rollout.engine import filter_logits, filtered_logprobs
from rl_distill.tasks import Example


@dataclass
class PPOConfig(AgentConfig):
    """Hyper-parameters of :class:`PPOAgent` (cleanrl names)."""

    update_epochs: int = 4
    """Epochs over each rollout (K of the PPO paper), >= 1."""
    num_minibatches: int = 1
    """Minibatches per epoch (sequences are split, not tokens), >= 1 and at most the batch size."""
    clip_coef: float = 0.2
    """Surrogate clipping coefficient epsilon, > 0 (also clips the value change when clip_vloss)."""
    clip_vloss: bool = True
    """Clip the value function's change per update, as in the PPO paper's implementation."""
    vf_coef: float = 0.5
    """Weight of the value loss, >= 0."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus, >= 0 (the -alpha log pS reward already rewards entropy)."""
    gamma: float = 1.0
    """Discount, in [0, 1] (1 = the undiscounted Eq. 5)."""
    gae_lambda: float = 0.95
    """GAE lambda, in [0, 1] (1 = Monte Carlo returns minus the value, 0 = one-step TD)."""
    norm_adv: bool = True
    """Whiten the advantages of each minibatch over its tokens."""
    target_kl: float | None = None
    """Stop the epochs early when approx_kl exceeds this (> 0; None = never)."""
    reward_clip: float | None = None
    """Clip every per-token reward to [-reward_clip, reward_clip] (> 0; None = off)."""
    value_lr: float | None = None
    """Learning rate of the value head's param group (None: the optimizer's default), > 0."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("gamma", "gae_lambda"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name in ("update_epochs", "num_minibatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.clip_coef > 0:
            raise ValueError(f"clip_coef must be > 0, got {self.clip_coef}")
        for name in ("vf_coef", "ent_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("target_kl", "reward_clip", "value_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")


# ---------------------------------------------------------------------------------------------
# The pieces, in the order they run: GAE, then the clipped surrogate and the value loss.
# ---------------------------------------------------------------------------------------------
def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, gae_lambda: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, Eq. 16), by cleanrl's reverse recurrence.

    ``delta_t = r_t + gamma V(s_{t+1}) [t+1 real] - V(s_t)``,
    ``A_t = delta_t + gamma lambda [t+1 real] A_{t+1}``. A sequence ends after its last real token
    (EOS or budget); padded positions get 0 and their (arbitrary) values are never read.

    Args:
        rewards: ``(B, T)`` per-token rewards.
        values: ``(B, T)`` ``V(s_t)``.
        mask: ``(B, T)`` True on real completion tokens (a prefix of each row).
        gamma: discount.
        gae_lambda: GAE lambda.

    Returns:
        ``advantages`` and ``returns = advantages + values``, both ``(B, T)`` and 0 where masked.
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    rewards = torch.where(mask, rewards, zero)
    values = torch.where(mask, values.to(rewards.dtype), zero)
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    num_steps = rewards.shape[1]
    for t in reversed(range(num_steps)):
        if t == num_steps - 1:
            nextnonterminal = torch.zeros_like(lastgaelam)
            nextvalues = torch.zeros_like(lastgaelam)
        else:
            nextnonterminal = mask[:, t + 1].to(rewards.dtype)
            nextvalues = values[:, t + 1]
        delta = rewards[:, t] + gamma * nextvalues * nextnonterminal - values[:, t]
        lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
        advantages[:, t] = lastgaelam
    advantages = torch.where(mask, advantages, zero)
    return advantages, advantages + values


def clipped_surrogate_loss(
    newlogprob: Tensor,
    oldlogprob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_coef: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO-clip policy loss (PPO paper Eq. 7), ``max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))`` per token.

    Args:
        newlogprob: ``(B, T)`` current log-probs, with gradient.
        oldlogprob: ``(B, T)`` rollout-time log-probs.
        advantages: ``(B, T)``.
        mask: ``(B, T)``.
        clip_coef: epsilon.

    Returns:
        ``pg_loss``, ``logratio`` and ``ratio`` (``(B, T)``).
    """
    logratio = newlogprob - oldlogprob.to(newlogprob.dtype)
    ratio = logratio.exp()
    adv = advantages.detach().to(ratio.dtype)
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    pg_loss = sequence_loss(torch.max(pg_loss1, pg_loss2), mask)  # sum over tokens, mean over sequences
    return pg_loss, logratio, ratio


def value_loss(
    newvalue: Tensor, oldvalue: Tensor, returns: Tensor, mask: Tensor, clip_coef: float, clip_vloss: bool
) -> Tensor:
    """``0.5 * mean_t (V(s_t) - G_t)^2`` over real tokens; with ``clip_vloss`` the pessimistic clipped form."""
    v_loss_unclipped = (newvalue - returns) ** 2
    if not clip_vloss:
        return 0.5 * masked_mean(v_loss_unclipped, mask)
    v_clipped = oldvalue + torch.clamp(newvalue - oldvalue, -clip_coef, clip_coef)
    v_loss_clipped = (v_clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(v_loss_unclipped, v_loss_clipped), mask)


def masked_entropy(
    logits: Tensor, mask: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Tensor:
    """Mean entropy of the sampled policy over real tokens (``(B, T, V)`` -> scalar).

    The policy is ``softmax(logits / temperature)``, restricted by ``top_k``/``top_p`` and
    renormalised when they are on (dropped tokens contribute 0, also to the gradient).
    """
    scaled = filter_logits(logits.float() / temperature, top_k, top_p)  # (B, T, V), -inf if dropped
    logp = torch.log_softmax(scaled, dim=-1)  # (B, T, V)
    if top_k > 0 or top_p < 1.0:
        entropy = -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)  # 0 * -inf is NaN
    else:
        entropy = -(logp.exp() * logp).sum(-1)  # (B, T)
    return masked_mean(entropy, mask)


@dataclass
class PPOBatch:
    """One rollout and what PPO computes from it before the update (cleanrl's ``b_*`` tensors).

    Attributes:
        rollout: the scored rollout (``B`` sequences, ``T`` completion positions).
        logprobs: ``(B, T)`` old log-probs of the sampled tokens under the sampled (filtered) policy.
        values: ``(B, T)`` old values ``V(s_t)``.
        rewards: ``(B, T)`` per-token rewards (after clipping).
        advantages: ``(B, T)`` GAE advantages.
        returns: ``(B, T)`` ``advantages + values``.
        external: ``(B,)`` external rewards, or None.
    """

    rollout: Rollout
    logprobs: Tensor
    values: Tensor
    rewards: Tensor
    advantages: Tensor
    returns: Tensor
    external: Tensor | None = None


class PPOAgent(Agent):
    """PPO-clip with GAE and a value head on the student, on the per-token rewards of Eq. 5.

    Args:
        engine: rollout engine (student, teacher, tokenizer).
        optimizer: optimizer over the student; the agent adds the value head's parameters to it as
            a new param group (see :mod:`rl_distill.agents.base`).
        config: :class:`PPOConfig`.
        reward: the external reward as a callable (default: built from ``config.reward``).
        **kwargs: passed to :class:`~rl_distill.agents.base.Agent`.

    Raises:
        ValueError: ``alpha < 1`` or ``beta_ext > 0`` without a reward.
    """

    name = "ppo"

    config_cls = PPOConfig
    config: PPOConfig

    def __init__(self, engine, optimizer, config: PPOConfig | None = None, **kwargs) -> None:  # noqa: D417
        super().__init__(engine, optimizer, config, **kwargs)
        config = self.config
        head = ValueHead(hidden_size_of(self.student))
        self.value_head = self.register_trainable("value_head", head, lr=config.value_lr)

    # --- rollout phase: samples, old log-probs and values, rewards, GAE -------------------
    def collect(self, batch: Sequence[Example]) -> PPOBatch:
        """Sample, score, and compute rewards and GAE advantages (steps 1-4 of the module docstring)."""
        cfg = self.config
        rollout = self.engine.rollout(
            [ex.prompt for ex in batch],
            cfg.sampling,
            generator=self.generator,
            teacher_temperature=cfg.teacher_temp,
        )
        _, reward_weight = objective_weights(self.alpha_now, cfg.beta_ext)
        external = self.external_rewards(batch, rollout) if reward_weight > 0 else None
        mask = rollout.completion_mask

        was_training = self.student.training
        self.student.eval()
        with torch.no_grad():
            logits, hidden = self.engine.student_forward(rollout, output_hidden_states=True)
            logprobs = self.policy_logprobs(logits, rollout.completion_ids)  # (B, T)
            values = self.value_head(hidden) * mask  # (B, T)
        self.student.train(was_training)

        alpha, beta_ext = self.alpha_now, cfg.beta_ext  # alpha may follow a schedule
        rewards = env_token_rewards(
            rollout.teacher_logprobs, mask, alpha, external, beta_ext=beta_ext
        ) + student_token_rewards(logprobs, mask, alpha, beta_ext=beta_ext)  # (B, T)
        if cfg.reward_clip is not None:
            rewards = rewards.clamp(-cfg.reward_clip, cfg.reward_clip) * mask
        advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)
        return PPOBatch(rollout, logprobs, values, rewards, advantages, returns, external)

    def policy_logprobs(self, logits: Tensor, token_ids: Tensor) -> Tensor:
        """``log pS`` of ``token_ids`` under the sampled policy (temperature, top-k/top-p): ``(B, T)``."""
        cfg = self.config
        return filtered_logprobs(logits, token_ids, cfg.temperature, cfg.top_k, cfg.top_p)

    # --- update phase: epochs of minibatches -----------------------------------------------
    def minibatch_loss(self, data: PPOBatch, mb_inds: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The PPO loss of the rows ``mb_inds`` of ``data`` under the current student and value head.

        ``pg_loss + vf_coef * v_loss - ent_coef * entropy`` (the entropy is detached when
        ``ent_coef == 0``). On the first minibatch of the first epoch the ratio is 1, so its gradient
        is the policy gradient with whitened GAE advantages (plus the value loss's).

        Returns:
            The loss and detached statistics: ``pg_loss``, ``v_loss``, ``entropy``, ``old_approx_kl``,
            ``approx_kl``, ``clipfrac``.
        """
        cfg = self.config
        mb = select_rows(data.rollout, mb_inds)
        width = mb.completion_ids.shape[1]
        mb_mask = mb.completion_mask
        mb_logprobs, mb_values, mb_returns, mb_advantages = (
            x[mb_inds][:, :width] for x in (data.logprobs, data.values, data.returns, data.advantages)
        )

        logits, hidden = self.engine.student_forward(mb, output_hidden_states=True)
        newlogprob = self.policy_logprobs(logits, mb.completion_ids)  # (b, T)
        newvalue = self.value_head(hidden)  # (b, T)

        if cfg.norm_adv:
            mb_advantages = masked_whiten(mb_advantages, mb_mask)
        pg_loss, logratio, ratio = clipped_surrogate_loss(
            newlogprob,
            mb_logprobs,
            mb_advantages,
            mb_mask,
            cfg.clip_coef,
        )
        with torch.no_grad():
            # http://joschu.net/blog/kl-approx.html
            old_approx_kl = masked_mean(-logratio, mb_mask)
            approx_kl = masked_mean((ratio - 1) - logratio, mb_mask)
            clipfrac = masked_mean(((ratio - 1.0).abs() > cfg.clip_coef).float(), mb_mask)

        v_loss = value_loss(newvalue, mb_values, mb_returns, mb_mask, cfg.clip_coef, cfg.clip_vloss)
        if cfg.ent_coef > 0:
            entropy_loss = masked_entropy(logits, mb_mask, cfg.temperature, cfg.top_k, cfg.top_p)
            loss = pg_loss - cfg.ent_coef * entropy_loss + v_loss * cfg.vf_coef
        else:
            with torch.no_grad():
                entropy_loss = masked_entropy(logits, mb_mask, cfg.temperature, cfg.top_k, cfg.top_p)
            loss = pg_loss + v_loss * cfg.vf_coef
        stats = {
            "pg_loss": pg_loss.detach(),
            "v_loss": v_loss.detach(),
            "entropy": entropy_loss.detach(),
            "old_approx_kl": old_approx_kl,
            "approx_kl": approx_kl,
            "clipfrac": clipfrac,
        }
        return loss, stats

    def learn(self, data: PPOBatch) -> dict[str, float]:
        """``update_epochs`` epochs of ``num_minibatches`` clipped-surrogate steps (step 5)."""
        cfg = self.config
        n = len(data.rollout)
        if n < cfg.num_minibatches:
            raise ValueError(f"num_minibatches={cfg.num_minibatches} exceeds the {n} sequences of the batch")
        self.student.train()
        clipfracs, grad_norms, skipped, epochs = [], [], 0.0, 0
        gen = self.generator
        for _epoch in range(cfg.update_epochs):
            epochs += 1
            b_inds = torch.randperm(n, generator=gen, device=gen.device).to(data.logprobs.device)
            for mb_inds in torch.tensor_split(b_inds, cfg.num_minibatches):
                loss, mb_stats = self.minibatch_loss(data, mb_inds)
                clipfracs.append(float(mb_stats["clipfrac"]))
                step = self.optimizer_step(loss)
                grad_norms.append(step["train/grad_norm"])
                skipped += step["train/skipped"]

            # The same decision in every process (a lone early stop would hang DDP's all-reduce).
            if (
                cfg.target_kl is not None
                and self.mean_across_processes(mb_stats["approx_kl"]) > cfg.target_kl
            ):
                break

        mask = data.rollout.completion_mask
        return {
            "train/loss": float(loss.detach()),
            "train/pg_loss": float(mb_stats["pg_loss"]),
            "train/value_loss": float(mb_stats["v_loss"]),
            "train/entropy": float(mb_stats["entropy"]),
            "train/old_approx_kl": float(mb_stats["old_approx_kl"]),
            "train/approx_kl": float(mb_stats["approx_kl"]),
            "train/clipfrac": sum(clipfracs) / len(clipfracs),
            "train/explained_variance": explained_variance(data.values, data.returns, mask),
            "train/epochs": float(epochs),
            "train/grad_norm": sum(grad_norms) / len(grad_norms),
            "train/skipped": skipped,
        }

    def update(self, batch: Sequence[Example]) -> dict[str, float]:
        """One PPO iteration: collect a rollout, then several epochs of minibatch updates on it."""
        t0 = time.perf_counter()
        data = self.collect(batch)
        t1 = time.perf_counter()
        stats = self.learn(data)
        t2 = time.perf_counter()
        r, mask = data.rollout, data.rollout.completion_mask
        lengths = r.lengths.clamp(min=1).float()
        stats.update(
            {
                "rollout/return": float(data.rewards.sum(-1).mean()),
                "rollout/reverse_kl": float(((data.logprobs - r.teacher_logprobs) * mask).sum(-1).mean()),
                "rollout/teacher_logprob": float(((r.teacher_logprobs * mask).sum(-1) / lengths).mean()),
                "rollout/completion_length": float(r.lengths.float().mean()),
                "time/generate": r.timings.get("generate", 0.0),
                "time/teacher": r.timings.get("score", 0.0),
                "time/student_update": t2 - t1,
                "time/step": t2 - t0,
                "time/tokens": float(r.lengths.sum()),
            }
        )
        if data.external is not None:
            stats["rollout/external_reward"] = float(data.external.mean())
        return stats
