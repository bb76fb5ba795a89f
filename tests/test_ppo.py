"""PPO: GAE by hand (with padding), the clipped surrogate, the reduction to REINFORCE, early stopping."""

import math

import pytest
import torch

from rl_distill.agents import PPOAgent, PPOConfig
from rl_distill.agents.base import masked_whiten, token_logprobs
from rl_distill.agents.ppo import clipped_surrogate_loss, compute_gae, value_loss
from rl_distill.agents.reinforce import policy_gradient_loss
from rl_distill.objective import discounted_returns
from rl_distill.tasks import Example

PROMPTS = ["1+2=", "ab", "hello", "x y z"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_gae_matches_values_computed_by_hand():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0, 0.5, -1.0], [2.0, 3.0, 7.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [1.0, 1.5, float("nan")]])  # padding holds garbage
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)

    # Row 0: three steps, terminal after the last.
    d2 = -1.0 - 0.6
    d1 = 0.5 + gamma * 0.6 - 0.4
    d0 = 1.0 + gamma * 0.4 - 0.2
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    # Row 1: two real steps; the padded third never enters.
    e1 = 3.0 - 1.5
    e0 = 2.0 + gamma * 1.5 - 1.0
    b1 = e1
    b0 = e0 + gamma * lam * b1
    expected = torch.tensor([[a0, a1, a2], [b0, b1, 0.0]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + torch.tensor([[0.2, 0.4, 0.6], [1.0, 1.5, 0.0]]))
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()


def test_gae_with_lambda_one_is_the_monte_carlo_return():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.arange(5)[None] < torch.tensor([[5], [3], [1]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.95, gae_lambda=1.0)
    torch.testing.assert_close(ret, discounted_returns(rewards, mask, 0.95))
    _, one_step = compute_gae(rewards, values, mask, gamma=1.0, gae_lambda=0.0)
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(3, 1)], dim=1)
    torch.testing.assert_close(one_step, (rewards + next_values) * mask)  # TD(0) targets


def test_clipped_surrogate_stops_the_gradient_outside_the_trust_region():
    old = torch.zeros(1, 3)
    new = torch.tensor([[0.5, 0.5, 0.0]], requires_grad=True)  # ratios e^0.5 = 1.65, 1.65, 1
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, logratio, ratio = clipped_surrogate_loss(new, old, adv, mask, clip_coef=0.2)
    (grad,) = torch.autograd.grad(loss, new)
    # A > 0 and ratio > 1 + eps: clipped, no gradient; A < 0: the unclipped (larger) loss wins.
    torch.testing.assert_close(grad, torch.tensor([[0.0, math.exp(0.5), -1.0]]))
    expected = -(1.2) + math.exp(0.5) - 1.0
    torch.testing.assert_close(loss.detach(), torch.tensor(expected))


def test_clipped_value_loss_by_hand():
    new, old, ret = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    mask = torch.tensor([[True, False]])
    # Unclipped (2 - 1)^2 = 1; clipped value 1 + 0.2 gives 0.04; the max is kept.
    torch.testing.assert_close(value_loss(new, old, ret, mask, 0.2, True), torch.tensor(0.5))
    torch.testing.assert_close(value_loss(new, old, ret, mask, 0.2, False), torch.tensor(0.5))
    new = torch.tensor([[0.0, 5.0]])
    torch.testing.assert_close(value_loss(new, old, ret, mask, 0.2, True), torch.tensor(0.5 * 1.0))


def make_ppo(engine, lr=0.0, **cfg):
    opt = torch.optim.SGD(engine.student.parameters(), lr=lr)
    return PPOAgent(
        engine,
        opt,
        PPOConfig(max_new_tokens=6, **cfg),
        max_grad_norm=0.0,
        generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize("norm_adv", [False, True])
def test_one_epoch_one_minibatch_ppo_is_reinforce(engine, norm_adv):
    agent = make_ppo(engine, update_epochs=1, num_minibatches=1, norm_adv=norm_adv)
    data = agent.collect([Example(p) for p in PROMPTS])
    mask = data.rollout.completion_mask
    params = list(engine.student.parameters())

    # REINFORCE with the same advantages (whitened as PPO whitens its single minibatch).
    advantages = masked_whiten(data.advantages, mask) if norm_adv else data.advantages
    logprobs = token_logprobs(engine.score_student(data.rollout), data.rollout.completion_ids)
    reinforce = policy_gradient_loss(logprobs, advantages, mask)
    expected = torch.autograd.grad(reinforce, params)

    stats = agent.learn(data)  # SGD with lr=0: the gradients stay in .grad
    assert stats["train/clipfrac"] == 0.0 and abs(stats["train/approx_kl"]) < 1e-6
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, atol=1e-6, rtol=1e-4)
    assert any(float(e.abs().max()) > 1e-4 for e in expected)


def test_rewards_use_the_old_logprobs_and_reward_clipping(engine):
    with pytest.raises(ValueError, match="alpha < 1"):
        make_ppo(engine, alpha=0.5)
    agent = PPOAgent(
        engine,
        torch.optim.SGD(engine.student.parameters(), lr=0.0),
        PPOConfig(max_new_tokens=6, alpha=0.5, reward_clip=2.0),
        reward=lambda prompts, completions, **_: [10.0] * len(completions),
        generator=torch.Generator().manual_seed(0),
    )
    data = agent.collect([Example(p) for p in PROMPTS])
    mask = data.rollout.completion_mask
    raw = 0.5 * (data.rollout.teacher_logprobs - data.logprobs) * mask
    last = mask.sum(-1) - 1
    raw[torch.arange(len(last)), last] += 0.5 * 10.0
    torch.testing.assert_close(data.rewards, raw.clamp(-2.0, 2.0) * mask)
    assert data.rewards.max() == 2.0


def test_target_kl_stops_the_epochs_early(engine):
    agent = make_ppo(engine, lr=0.05, update_epochs=4, target_kl=1e-12)
    stats = agent.update([Example(p) for p in PROMPTS])
    # Epoch 1 starts at ratio 1 (approx_kl 0); epoch 2 sees the first step's change and stops.
    assert stats["train/epochs"] == 2.0
    for key in ("approx_kl", "clipfrac", "explained_variance", "pg_loss", "value_loss", "old_approx_kl"):
        assert f"train/{key}" in stats
    full = make_ppo(engine, lr=0.0, update_epochs=3, num_minibatches=2).update([Example(p) for p in PROMPTS])
    assert full["train/epochs"] == 3.0


def test_value_head_is_in_the_optimizer_and_in_the_agent_state(engine):
    opt = torch.optim.AdamW(engine.student.parameters(), lr=1e-3)
    agent = PPOAgent(engine, opt, PPOConfig(max_new_tokens=4))
    head = agent.extra_parameters()
    assert len(head) == 2 and len(opt.param_groups) == 2
    assert [id(p) for p in opt.param_groups[1]["params"]] == [id(p) for p in head]
    assert opt.param_groups[1]["lr"] == 1e-3  # the optimizer's defaults
    agent.update([Example(p) for p in PROMPTS])
    state = agent.state_dict()
    assert set(state) == {"value_head"} and state["value_head"]["linear.weight"].abs().sum() > 0
    other = PPOAgent(engine, torch.optim.AdamW(engine.student.parameters()), PPOConfig(max_new_tokens=4))
    other.load_state_dict(state)
    torch.testing.assert_close(other.value_head.linear.weight, agent.value_head.linear.weight)
    with pytest.raises(ValueError, match="num_minibatches=8 exceeds the 4 sequences"):
        make_ppo(engine, num_minibatches=8).update([Example(p) for p in PROMPTS])
