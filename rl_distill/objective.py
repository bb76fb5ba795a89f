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

Reward extrapolation (G-OPD)
----------------------------
Reverse KL is entropy-regularised RL with the teacher's log-likelihood as the reward
(``-KL(pS||pT) = E_{y~pS}[log pT(y)] + H(pS)``). G-OPD adds an external signal to that reward with
a free, unbounded weight ``beta_ext >= 0``::

    max_theta  E_{y~pS}[ log pT(y) - log pS(y) + beta_ext * r(y) ]

Per token: ``log pT(a_t | s_t)`` (weight 1), ``beta_ext * r(x, y)`` at the terminal step, and the
agent's own ``-log pS(a_t | s_t)`` (weight 1). Pass ``beta_ext=`` (with ``alpha = 1``) to
:func:`env_token_rewards` and :func:`student_token_rewards`; :func:`objective_weights` gives the
pair ``(distill_weight, reward_weight)`` of either form.

Relation to Eq. 5: for ``alpha`` in (0, 1],
``(1 - alpha) r - alpha KL = alpha * (((1 - alpha) / alpha) r - KL)``, so Eq. 5 with ``alpha`` is the
same objective as reward extrapolation with ``beta_ext = (1 - alpha) / alpha``, up to the positive
scale ``alpha``: the same maximiser, every per-token reward and every policy gradient multiplied by
``alpha`` (``tests/test_extrapolation.py`` checks this on exact gradients). ``alpha = 1`` is
``beta_ext = 0``; ``alpha = 1/2`` is ``beta_ext = 1``; ``beta_ext > 1`` (``alpha < 1/2``) weights
the task reward above the teacher's log-likelihood, the regime meant to push the student past the
teacher on the task; ``alpha = 0`` (reward only) is the limit ``beta_ext -> inf``. What the ``beta_ext``
form changes is the scale: the distillation term keeps weight 1, so the size of the KL gradient
(and with it a tuned learning rate) does not shrink as the reward's weight grows.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def objective_weights(alpha: float, beta_ext: float | None = None) -> tuple[float, float]:
    """``(distill_weight, reward_weight)``: ``(alpha, 1 - alpha)`` (Eq. 5), or ``(1, beta_ext)`` (G-OPD).

    Args:
        alpha: weight of the distillation term of Eq. 5, in [0, 1].
        beta_ext: reward-extrapolation weight (>= 0, unbounded), or None for Eq. 5's convex form.
            It replaces alpha's weighting, so it needs ``alpha = 1``.

    Raises:
        ValueError: alpha outside [0, 1], a negative ``beta_ext``, or ``beta_ext`` with ``alpha != 1``.
    """
    _check_alpha(alpha)
    if beta_ext is None:
        return alpha, 1.0 - alpha
    if not beta_ext >= 0.0:
        raise ValueError(f"beta_ext must be >= 0, got {beta_ext}")
    if alpha != 1.0:
        raise ValueError(
            f"beta_ext ({beta_ext}) replaces Eq. 5's alpha weighting: alpha must be 1, got {alpha}"
        )
    return 1.0, float(beta_ext)


def last_token_index(completion_mask: Tensor) -> Tensor:
    """Index of each sequence's last real completion token: ``(B,)`` (0 for an empty sequence)."""
    return (completion_mask.long().sum(-1) - 1).clamp(min=0)


def env_token_rewards(
    teacher_logprobs: Tensor,
    completion_mask: Tensor,
    alpha: float,
    external: Tensor | None = None,
    *,
    beta_ext: float | None = None,
) -> Tensor:
    """Per-token environment rewards: ``w_d * log pT`` plus ``w_r * r`` at the last token.

    ``(w_d, w_r)`` is :func:`objective_weights`: ``(alpha, 1 - alpha)`` for Eq. 5, ``(1, beta_ext)``
    for reward extrapolation.

    Args:
        teacher_logprobs: ``(B, T)`` teacher log-probs of the generated tokens.
        completion_mask: ``(B, T)`` True on real completion tokens.
        alpha: weight of the distillation term, in [0, 1].
        external: ``(B,)`` external rewards ``r(x, y)``, or None for none.
        beta_ext: reward-extrapolation weight of ``r`` (>= 0; needs ``alpha = 1``), or None.

    Returns:
        ``(B, T)`` float32 rewards, 0 at masked positions.
    """
    distill_weight, reward_weight = objective_weights(alpha, beta_ext)
    mask = completion_mask.bool()
    rewards = torch.where(
        mask, distill_weight * teacher_logprobs.float(), torch.zeros((), device=mask.device)
    )
    if external is not None and reward_weight > 0.0:
        ext = torch.as_tensor(external, dtype=torch.float32, device=rewards.device)
        if ext.shape != (rewards.shape[0],):
            raise ValueError(
                f"external rewards must have shape ({rewards.shape[0]},), got {tuple(ext.shape)}"
            )
        last = last_token_index(mask)
        bonus = torch.zeros_like(rewards).scatter(1, last[:, None], (reward_weight * ext)[:, None])
        rewards = rewards + bonus * mask
    return rewards


def student_token_rewards(
    student_logprobs: Tensor, completion_mask: Tensor, alpha: float, *, beta_ext: float | None = None
) -> Tensor:
    """The agent's own per-token term: ``-w_d * log pS(a_t | s_t)`` (0 where masked).

    ``w_d`` is ``alpha`` for Eq. 5 and 1 with ``beta_ext`` (:func:`objective_weights`).
    """
    distill_weight, _ = objective_weights(alpha, beta_ext)
    mask = completion_mask.bool()
    return torch.where(mask, -distill_weight * student_logprobs.float(), torch.zeros((), device=mask.device))


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
