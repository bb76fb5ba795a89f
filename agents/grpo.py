"""Verifier-only GRPO (SD-ZERO; tutorial ch. 6, "Mechanism 3"): no teacher, a reward and group-relative advantages.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, Sec. 4.1,
Eq. 3 with outcome supervision). There is no teacher model at all (``model.teacher: null`` works):
the student improves from a verifier's grades of its own samples. Each update, for a batch of
prompts:

1. **Group rollout.** ``samples_per_prompt = k`` completions per prompt from the student at
   ``temperature`` (rows ``i*k .. i*k+k-1`` are prompt ``i``'s group); ``k >= 2``, since one sample
   has no group to compare with.
2. **Rewards.** ``r_i = reward(x, y_i)`` (``exact_match`` by default: 1 when the final answer is
   right), through the one reward path of the agents.
3. **Group-relative advantages** (:func:`group_advantages`), one per sequence, given to each of its
   tokens: ``advantage="group_norm"``: ``A_i = (r_i - mean_group(r)) / (std_group(r) + adv_eps)``
   (GRPO; ``std`` is the sample standard deviation over the group's ``k`` rewards, as TRL);
   ``"group_mean"``: ``A_i = r_i - mean_group(r)`` (unnormalised, Dr. GRPO-style; no division by a
   small std on nearly unanimous groups). A group whose rewards are all equal gives 0 to all of its
   samples: nothing to learn from that prompt this step.
4. **Old and reference log-probs.** One no-grad student forward gives ``log pS_old`` of the sampled
   policy (temperature, top-k/top-p: :func:`~rl_distill.rollout.engine.filtered_logprobs`); with
   ``kl_coef > 0``, a frozen copy of the student taken when the agent is built (the SFT start) gives
   ``log pref`` of the same tokens.
5. **Update.** ``update_epochs`` passes over the sequences in ``num_minibatches`` shuffled
   minibatches; each is one optimizer step on GRPO's Eq. 3 (to minimise, per token ``t`` of ``y_i``)::

       l_it = -[ min(ratio_it A_i, clip(ratio_it, 1 - eps, 1 + eps) A_i) - kl_coef * KL_it ]
       ratio_it = pS(y_it) / pS_old(y_it)
       KL_it = pref/pS - log(pref/pS) - 1            (the unbiased, non-negative "k3" estimator)
       loss = mean_i [ 1/|y_i| sum_t l_it ]

   averaged over each sequence's tokens, then over sequences, as the paper writes it.

On the first minibatch of the first epoch the ratio is 1, so (``kl_coef = 0``) the gradient is
REINFORCE's with the group-relative advantages, each sequence's score function divided by its length.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rl_distill.agents.base import Agent, AgentConfig, masked_mean, select_rows
from rl_distill.rollout import Rollout
from rl_distill.rollout.engine import completion_forward, filtered_logprobs
from rl_distill.tasks import Example

#: The verifier GRPO uses when ``agent.reward`` is null: 1 when the final answer is right.
DEFAULT_REWARD = "exact_match"


@dataclass
class GRPOConfig(AgentConfig):
    """Hyper-parameters of :class:`GRPOAgent` (shared fields: :class:`~rl_distill.agents.base.AgentConfig`).

    ``alpha`` (Eq. 5's distillation weight) stays at 1 and is not used: GRPO has no distillation term.
    ``reward`` is the verifier; null means :data:`DEFAULT_REWARD` (``exact_match``).
    """

    samples_per_prompt: int = 4
    """Completions per prompt, k >= 2 (the group the advantages are relative to)."""
    advantage: Literal["group_norm", "group_mean"] = "group_norm"
    """``group_norm``: (r - mean) / (std + adv_eps) over the group (GRPO); ``group_mean``: r - mean."""
    adv_eps: float = 1e-4
    """Added to the group's reward std before dividing (``group_norm``), > 0."""
    update_epochs: int = 2
    """Passes over each batch of samples (GRPO's inner iterations mu), >= 1."""
    num_minibatches: int = 1
    """Minibatches per pass (sequences are split), >= 1 and at most the number of sequences."""
    clip_coef: float = 0.2
    """Clipping epsilon of the ratio, > 0."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the frozen starting student (GRPO's beta), >= 0; 0: no reference model."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.is_constant("alpha", 1.0):
            raise ValueError(
                f"alpha weights Eq. 5's distillation term, which GRPO does not have: leave it at 1, got {self.alpha}"
            )
        if self.beta_ext is not None:
            raise ValueError(
                "beta_ext weights a reward against a teacher; GRPO has no teacher: leave it null"
            )
        if self.samples_per_prompt < 2:
            raise ValueError(
                f"samples_per_prompt must be >= 2 (group-relative advantages compare a prompt's samples), "
                f"got {self.samples_per_prompt}"
            )
        if self.advantage not in ("group_norm", "group_mean"):
            raise ValueError(f"advantage must be 'group_norm' or 'group_mean', got {self.advantage!r}")
        if not self.adv_eps > 0:
            raise ValueError(f"adv_eps must be > 0, got {self.adv_eps}")
        for name in ("update_epochs", "num_minibatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.clip_coef > 0:
            raise ValueError(f"clip_coef must be > 0, got {self.clip_coef}")
        if not self.kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")

    @property
    def needs_teacher(self) -> bool:
        """GRPO never scores with a teacher (``model.teacher: null`` is allowed)."""
        return False


# ---------------------------------------------------------------------------------------------
# The pieces, in the order they run: group advantages, then the clipped objective with the KL term.
# ---------------------------------------------------------------------------------------------
def group_advantages(
    rewards: Tensor, group_size: int, *, normalize: bool = True, eps: float = 1e-4
) -> Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024, Sec. 4.1.2): ``(B,) -> (B,)``.

    Rows are consecutive groups of ``group_size`` samples of one prompt.
    ``A_i = r_i - mean_group(r)``, divided by ``std_group(r) + eps`` when ``normalize`` (the sample
    standard deviation, ``k - 1`` in the divisor).

    Raises:
        ValueError: ``group_size < 2`` or not dividing the number of rewards.
    """
    n = rewards.shape[0]
    if group_size < 2 or n % group_size:
        raise ValueError(f"group_size must be >= 2 and divide the {n} rewards, got {group_size}")
    groups = rewards.view(n // group_size, group_size)  # (G, k)
    adv = groups - groups.mean(1, keepdim=True)
    if normalize:
        adv = adv / (groups.std(1, keepdim=True) + eps)
    return adv.reshape(n)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token ``KL(pS || pref)`` estimate ``pref/pS - log(pref/pS) - 1`` (Schulman's k3): ``(B, T)``, >= 0."""
    log_ratio = ref_logprobs.to(logprobs.dtype) - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


def grpo_loss(
    newlogprob: Tensor,
    oldlogprob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_coef: float,
    *,
    ref_logprob: Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's objective (Shao et al. 2024, Eq. 3), negated: token losses averaged per sequence, then over sequences.

    Args:
        newlogprob: ``(B, T)`` current log-probs of the sampled tokens, with gradient.
        oldlogprob: ``(B, T)`` log-probs of the policy that sampled them.
        advantages: ``(B,)`` one advantage per sequence.
        mask: ``(B, T)`` True on completion tokens.
        clip_coef: epsilon.
        ref_logprob: ``(B, T)`` reference log-probs (needed when ``kl_coef > 0``).
        kl_coef: beta of the KL penalty.

    Returns:
        The loss and detached statistics ``pg_loss``, ``kl``, ``approx_kl``, ``clipfrac``.
    """
    m = mask.to(newlogprob.dtype)
    logratio = newlogprob - oldlogprob.to(newlogprob.dtype)
    ratio = logratio.exp()
    adv = advantages.detach().to(ratio.dtype)[:, None]  # (B, 1)
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef) * adv)  # (B, T)
    token_loss = -surrogate
    kl = torch.zeros_like(token_loss)
    if kl_coef > 0:
        if ref_logprob is None:
            raise ValueError("kl_coef > 0 needs ref_logprob")
        kl = k3_kl(newlogprob, ref_logprob)
        token_loss = token_loss + kl_coef * kl
    lengths = m.sum(-1).clamp(min=1)  # (B,)
    loss = ((token_loss * m).sum(-1) / lengths).mean()
    with torch.no_grad():
        stats = {
            "pg_loss": ((-surrogate * m).sum(-1) / lengths).mean(),
            "kl": ((kl * m).sum(-1) / lengths).mean(),
            "approx_kl": masked_mean((ratio - 1) - logratio, mask),  # http://joschu.net/blog/kl-approx.html
            "clipfrac": masked_mean(((ratio - 1.0).abs() > clip_coef).float(), mask),
        }
    return loss, stats


@dataclass
class GRPOBatch:
    """One group rollout and what GRPO computes from it before the update.

    Attributes:
        rollout: ``B * k`` sampled sequences (no teacher scores).
        rewards: ``(B * k,)`` verifier rewards.
        advantages: ``(B * k,)`` group-relative advantages.
        logprobs: ``(B * k, T)`` old log-probs of the sampled policy.
        ref_logprobs: ``(B * k, T)`` reference log-probs, or None (``kl_coef = 0``).
    """

    rollout: Rollout
    rewards: Tensor
    advantages: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor | None = None


class GRPOAgent(Agent):
    """GRPO with a verifier reward and no teacher (SD-ZERO).

    Args:
        engine: rollout engine (its teacher, if any, is never used).
        optimizer: optimizer over the student.
        config: :class:`GRPOConfig`.
        reward: the reward as a callable (default: built from ``config.reward``).
        **kwargs: passed to :class:`~rl_distill.agents.base.Agent`.
    """

    name = "grpo"

    config_cls = GRPOConfig
    config: GRPOConfig

    def __init__(self, engine, optimizer, config: GRPOConfig | None = None, *, reward=None, **kwargs) -> None:  # noqa: D417
        config = config if config is not None else self.config_cls()
        if reward is None:
            reward = getattr(config, "reward", None) or DEFAULT_REWARD
        super().__init__(engine, optimizer, config, reward=reward, **kwargs)
        # The KL reference: the student as it is now (the SFT start), frozen. A resumed run rebuilds
        # the student from its starting weights before loading the checkpoint, so this is the same model.
        self.reference = None
        if self.config.kl_coef > 0:
            self.reference = copy.deepcopy(self.student).eval().requires_grad_(False)

    def policy_logprobs(self, logits: Tensor, token_ids: Tensor) -> Tensor:
        """``log pS`` of ``token_ids`` under the sampled policy (temperature, top-k/top-p): ``(B, T)``."""
        cfg = self.config
        return filtered_logprobs(logits, token_ids, cfg.temperature, cfg.top_k, cfg.top_p)

    # --- rollout phase ----------------------------------------------------------------------
    def collect(self, batch: Sequence[Example]) -> GRPOBatch:
        """Sample ``k`` completions per prompt, grade them, and compute advantages and old log-probs."""
        cfg = self.config
        k = cfg.samples_per_prompt
        examples = [ex for ex in batch for _ in range(k)]
        rollout = self.engine.generate([ex.prompt for ex in examples], cfg.sampling, generator=self.generator)
        rewards = self.external_rewards(examples, rollout)  # (B * k,)
        advantages = group_advantages(
            rewards, k, normalize=cfg.advantage == "group_norm", eps=cfg.adv_eps
        )  # (B * k,)
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad():
            logits = self.engine.score_student(rollout)  # (B*k, T, V)
            logprobs = self.policy_logprobs(logits, rollout.completion_ids)  # (B*k, T)
            ref_logprobs = None
            if self.reference is not None:
                ref_logits, _ = completion_forward(
                    self.reference,
                    rollout.input_ids,
                    rollout.attention_mask,
                    rollout.completion_ids.shape[1],
                    self.engine.vocab_size,
                    dense_head_input=self.engine.dense_head_input,
                )
                ref_logprobs = self.policy_logprobs(ref_logits, rollout.completion_ids)
        self.student.train(was_training)
        return GRPOBatch(rollout, rewards, advantages, logprobs, ref_logprobs)

    # --- update phase ------------------------------------------------------------------------
    def minibatch_loss(self, data: GRPOBatch, mb_inds: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """GRPO's loss (:func:`grpo_loss`) on the rows ``mb_inds`` under the current student."""
        cfg = self.config
        mb = select_rows(data.rollout, mb_inds)
        width = mb.completion_ids.shape[1]
        logits = self.engine.score_student(mb)  # (b, T, V), with gradient
        newlogprob = self.policy_logprobs(logits, mb.completion_ids)  # (b, T)
        ref = data.ref_logprobs[mb_inds][:, :width] if data.ref_logprobs is not None else None
        return grpo_loss(
            newlogprob,
            data.logprobs[mb_inds][:, :width],
            data.advantages[mb_inds],
            mb.completion_mask,
            cfg.clip_coef,
            ref_logprob=ref,
            kl_coef=cfg.kl_coef,
        )

    def learn(self, data: GRPOBatch) -> dict[str, float]:
        """``update_epochs`` passes of ``num_minibatches`` clipped steps over the group rollout."""
        cfg = self.config
        n = len(data.rollout)
        if n < cfg.num_minibatches:
            raise ValueError(f"num_minibatches={cfg.num_minibatches} exceeds the {n} sequences of the batch")
        self.student.train()
        gen = self.generator
        clipfracs, grad_norms, skipped = [], [], 0.0
        for _epoch in range(cfg.update_epochs):
            b_inds = torch.randperm(n, generator=gen, device=gen.device).to(data.logprobs.device)
            for mb_inds in torch.tensor_split(b_inds, cfg.num_minibatches):
                loss, mb_stats = self.minibatch_loss(data, mb_inds)
                clipfracs.append(float(mb_stats["clipfrac"]))
                step = self.optimizer_step(loss)
                grad_norms.append(step["train/grad_norm"])
                skipped += step["train/skipped"]
        return {
            "train/loss": float(loss.detach()),
            "train/pg_loss": float(mb_stats["pg_loss"]),
            "train/kl_ref": float(mb_stats["kl"]),
            "train/approx_kl": float(mb_stats["approx_kl"]),
            "train/clipfrac": sum(clipfracs) / len(clipfracs),
            "train/grad_norm": sum(grad_norms) / len(grad_norms),
            "train/skipped": skipped,
        }

    def update(self, batch: Sequence[Example]) -> dict[str, float]:
        """One GRPO iteration: a group rollout graded by the reward, then the clipped updates on it."""
        t0 = time.perf_counter()
        data = self.collect(batch)
        t1 = time.perf_counter()
        stats = self.learn(data)
        t2 = time.perf_counter()
        k = self.config.samples_per_prompt
        groups = data.rewards.view(-1, k)
        r = data.rollout
        stats.update(
            {
                "rollout/external_reward": float(data.rewards.mean()),
                "rollout/group_reward_std": float(groups.std(1).mean()),
                "rollout/zero_advantage_groups": float(
                    (groups.max(1).values == groups.min(1).values).float().mean()
                ),
                "rollout/completion_length": float(r.lengths.float().mean()),
                "time/generate": r.timings.get("generate", 0.0),
                "time/teacher": 0.0,
                "time/student_update": t2 - t1,
                "time/step": t2 - t0,
                "time/tokens": float(r.lengths.sum()),
            }
        )
        return stats
