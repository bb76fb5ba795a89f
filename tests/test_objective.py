import pytest
import torch

from rl_distill.objective import (
    discounted_returns,
    env_token_rewards,
    objective_weights,
    student_token_rewards,
)

TLP = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, 0.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_env_rewards_by_hand():
    r = env_token_rewards(TLP, MASK, alpha=0.5, external=torch.tensor([2.0, 4.0]))
    expected = torch.tensor([[-0.5, -1.0, -1.5 + 1.0], [-0.25, -0.125 + 2.0, 0.0]])
    torch.testing.assert_close(r, expected)


def test_alpha_one_has_no_external_component_and_alpha_zero_only_the_terminal_one():
    ext = torch.tensor([2.0, 4.0])
    torch.testing.assert_close(env_token_rewards(TLP, MASK, 1.0, ext), TLP * MASK)
    only_ext = env_token_rewards(TLP, MASK, 0.0, ext)
    torch.testing.assert_close(only_ext, torch.tensor([[0.0, 0.0, 2.0], [0.0, 4.0, 0.0]]))


def test_student_term_and_errors():
    slp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -7.0]])
    torch.testing.assert_close(
        student_token_rewards(slp, MASK, 0.5), torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 0.0]])
    )
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        env_token_rewards(TLP, MASK, 1.5)
    with pytest.raises(ValueError, match="external rewards must have shape"):
        env_token_rewards(TLP, MASK, 0.5, external=torch.tensor([1.0]))


def test_reward_extrapolation_by_hand():
    ext = torch.tensor([2.0, 4.0])
    r = env_token_rewards(TLP, MASK, 1.0, ext, beta_ext=3.0)
    expected = torch.tensor([[-1.0, -2.0, -3.0 + 6.0], [-0.5, -0.25 + 12.0, 0.0]])
    torch.testing.assert_close(r, expected)
    # beta_ext = 0 (or no external reward) is pure distillation; the own term has weight 1.
    torch.testing.assert_close(env_token_rewards(TLP, MASK, 1.0, ext, beta_ext=0.0), TLP * MASK)
    slp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -7.0]])
    torch.testing.assert_close(student_token_rewards(slp, MASK, 1.0, beta_ext=3.0), -slp * MASK)
    assert objective_weights(0.25) == (0.25, 0.75)
    assert objective_weights(1.0, 3.0) == (1.0, 3.0)


@pytest.mark.parametrize("alpha", [0.8, 0.5, 0.25, 0.1])
def test_eq5_rewards_are_alpha_times_the_extrapolated_ones(alpha):
    """Eq. 5 with alpha == alpha * (reward extrapolation with beta_ext = (1 - alpha) / alpha), per token."""
    ext, beta_ext = torch.tensor([2.0, -4.0]), (1.0 - alpha) / alpha
    slp = torch.tensor([[-1.5, -0.2, -3.0], [-2.0, -0.7, -7.0]])
    eq5 = env_token_rewards(TLP, MASK, alpha, ext) + student_token_rewards(slp, MASK, alpha)
    extrapolated = env_token_rewards(TLP, MASK, 1.0, ext, beta_ext=beta_ext) + student_token_rewards(
        slp, MASK, 1.0, beta_ext=beta_ext
    )
    torch.testing.assert_close(eq5, alpha * extrapolated, atol=1e-6, rtol=0)


def test_reward_extrapolation_errors():
    with pytest.raises(ValueError, match="alpha must be 1"):
        env_token_rewards(TLP, MASK, 0.5, beta_ext=1.0)
    with pytest.raises(ValueError, match="alpha must be 1"):
        student_token_rewards(TLP, MASK, 0.5, beta_ext=1.0)
    with pytest.raises(ValueError, match="beta_ext must be >= 0"):
        objective_weights(1.0, -0.5)


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 99.0]])
    g = discounted_returns(rewards, MASK, gamma=0.5)
    expected = torch.tensor([[1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3.0], [1 + 0.5 * 1, 1.0, 0.0]])
    torch.testing.assert_close(g, expected)
    # gamma = 1 on a long sequence: plain suffix sums, no underflow or NaN
    long = torch.full((1, 4000), -1.0)
    g = discounted_returns(long, torch.ones_like(long, dtype=torch.bool), gamma=1.0)
    assert g[0, 0] == -4000.0 and g[0, -1] == -1.0
