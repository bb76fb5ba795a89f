"""The RL + distillation objective of GKD (Agarwal et al. 2023, Eq. 5) as per-token rewards.

Eq. 5:  ``max_theta  E_x[ (1 - alpha) E_{y~pS}[r(y)]  -  alpha E_{y~pS}[D(pT || pS)(y|x)] ]``.

With ``D`` the sequence-level reverse KL, the distillation term is an expectation over the student's
own samples, ``KL(pS || pT)(y|x) = E_{y~pS}[ sum_t log pS(y_t|.) - log pT(y_t|.) ]``, so it splits
into per-token rewards:

- the **environment reward** at step ``t``: ``alpha * log pT(a_t | s_t)``, plus ``(1 - alpha) * r(x, y)``
  at the terminal step (:func:`env_token_rewards`; what ``rl_distill.envs`` returns);
- the **agent's own term** ``-alpha * log pS(a_t | s_t)`` (:func:`student_token_rewards`), which only
  the agent can add because the environment does not know the student.

Their sum over a sampled sequence is an unbiased estimate of ``(1 - alpha) r(y) - alpha KL(pS||pT)``
(the sum over tokens, not the Eq.-2 mean; see ``length_normalize`` in the agents for the mean).
With ``alpha = 1`` or ``r == 0`` the objective is pure on-policy distillation with reverse KL.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def last_token_index(completion_mask: Tensor) -> Tensor:
    """Index of each sequence's last real completion token: ``(B,)`` (0 for an empty sequence)."""
    return (completion_mask.long().sum(-1) - 1).clamp(min=0)


def env_token_rewards(
    teacher_logprobs: Tensor, completion_mask: Tensor, alpha: float, external: Tensor | None = None
) -> Tensor:
    """Per-token environment rewards of Eq. 5: ``alpha * log pT`` plus ``(1 - alpha) * r`` at the end.

    Args:
        teacher_logprobs: ``(B, T)`` teacher log-probs of the generated tokens.
        completion_mask: ``(B, T)`` True on real completion tokens.
        alpha: weight of the distillation term, in [0, 1].
        external: ``(B,)`` external rewards ``r(x, y)``, or None for none.

    Returns:
        ``(B, T)`` float32 rewards, 0 at masked positions.
    """
    _check_alpha(alpha)
    mask = completion_mask.bool()
    rewards = torch.where(mask, alpha * teacher_logprobs.float(), torch.zeros((), device=mask.device))
    if external is not None and alpha < 1.0:
        ext = torch.as_tensor(external, dtype=torch.float32, device=rewards.device)
        if ext.shape != (rewards.shape[0],):
            raise ValueError(
                f"external rewards must have shape ({rewards.shape[0]},), got {tuple(ext.shape)}"
            )
        last = last_token_index(mask)
        bonus = torch.zeros_like(rewards).scatter(1, last[:, None], ((1.0 - alpha) * ext)[:, None])
        rewards = rewards + bonus * mask
    return rewards


def student_token_rewards(student_logprobs: Tensor, completion_mask: Tensor, alpha: float) -> Tensor:
    """The agent's own per-token term of Eq. 5: ``-alpha * log pS(a_t | s_t)`` (0 where masked)."""
    _check_alpha(alpha)
    mask = completion_mask.bool()
    return torch.where(mask, -alpha * student_logprobs.float(), torch.zeros((), device=mask.device))


def discounted_returns(rewards: Tensor, completion_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Reward-to-go ``G_t = sum_{k>=t} gamma^(k-t) r_k`` per token, by a reverse recurrence.

    Discounting is by relative position (no ``gamma**t`` powers that underflow on long sequences)
    and masked positions neither receive nor pass on return.

    Args:
        rewards: ``(B, T)``.
        completion_mask: ``(B, T)``.
        gamma: discount in [0, 1].

    Returns:
        ``(B, T)`` returns, 0 at masked positions.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    mask = completion_mask.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out
