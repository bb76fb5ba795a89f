"""REINFORCE: the exact expected gradient by enumeration, returns, baselines and advantages by hand."""

import pytest
import torch

from rl_distill.agents import REINFORCEAgent, REINFORCEConfig
from rl_distill.agents.base import group_baseline, masked_whiten, sequence_loss
from rl_distill.agents.reinforce import compute_advantages, compute_returns, policy_gradient_loss
from rl_distill.models import char_tokenizer, tiny_llama
from rl_distill.rollout import Rollout, RolloutEngine
from rl_distill.tasks import Example

PROMPT = "ab"
MAX_NEW = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    """Vocabulary of 6 (<pad> <bos> <eos> <unk> a b), float64 student and teacher."""
    tok = char_tokenizer("ab")
    assert len(tok) == 6
    student = tiny_llama(6, hidden_size=8, num_layers=1, num_heads=2, seed=3).double()
    teacher = tiny_llama(6, hidden_size=8, num_layers=1, num_heads=2, seed=4).double()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(3.0)  # a teacher clearly different from the student
    return RolloutEngine(student, teacher, tok)


def all_completions(vocab_size, eos, max_len):
    """Every completion the engine can produce: EOS ends a sequence early, the budget ends it at max_len."""
    out = []

    def extend(prefix):
        for token in range(vocab_size):
            seq = [*prefix, token]
            if token == eos or len(seq) == max_len:
                out.append(seq)
            else:
                extend(seq)

    extend([])
    return out


def enumerated_rollout(engine):
    seqs = all_completions(engine.vocab_size, engine.tokenizer.eos_token_id, MAX_NEW)
    prompts = engine.encode([PROMPT] * len(seqs))
    ids = torch.full((len(seqs), MAX_NEW), engine.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), MAX_NEW), dtype=torch.bool)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = True
    rollout = Rollout(prompts.input_ids, prompts.attention_mask, ids, mask, torch.zeros(ids.shape))
    return engine.score(rollout)


def sequence_logprobs(model, rollout):
    """log p(y|x) of every enumerated sequence, straight from the model (same prompt, no padding)."""
    ids = rollout.input_ids
    prompt_len = rollout.prompt_ids.shape[1]
    logits = model(input_ids=ids).logits[:, prompt_len - 1 : -1, :6]
    logp = torch.log_softmax(logits, -1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    return (logp * rollout.completion_mask).sum(-1)


def count_a_reward(prompts, completions, **metadata):
    assert metadata["tag"] == ["t"] * len(completions)
    return [c.count("a") - 0.5 * c.count("b") + 0.25 for c in completions]


@pytest.mark.parametrize("return_type", ["reward_to_go", "sequence"])
@pytest.mark.parametrize("baseline", ["none", "value"])
@pytest.mark.parametrize("alpha", [1.0, 0.4, 0.0])
def test_exact_expected_gradient_is_the_gradient_of_eq5(tiny, alpha, baseline, return_type):
    engine = tiny
    rollout = enumerated_rollout(engine)
    assert len(rollout) == 1 + 5 + 5 * 5 * 6  # EOS first; one token then EOS; three tokens
    params = [p for p in engine.student.parameters()]

    # Closed form by enumeration: KL(pS || pT) over whole sequences and E_{y~pS}[r(y)].
    logp_s = sequence_logprobs(engine.student, rollout)
    with torch.no_grad():
        logp_t = sequence_logprobs(engine.teacher, rollout)
    probs = logp_s.exp()
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-12, rtol=0)
    agent = REINFORCEAgent(
        engine,
        torch.optim.SGD(params, lr=0.0),
        REINFORCEConfig(
            alpha=alpha,
            baseline=baseline,
            samples_per_prompt=1,
            return_type=return_type,
            max_new_tokens=MAX_NEW,
        ),
        reward=count_a_reward if alpha < 1 else None,
    )
    if agent.value_head is not None:  # any baseline of the state alone leaves the expectation unchanged
        torch.nn.init.normal_(agent.value_head.linear.weight, std=1.0)
        torch.nn.init.constant_(agent.value_head.linear.bias, 0.3)
    external = None
    objective = -alpha * (probs * (logp_s - logp_t)).sum()  # Eq. 5, sequence-level reverse KL
    if alpha < 1:
        examples = [Example(PROMPT, metadata={"tag": "t"})] * len(rollout)
        external = agent.external_rewards(examples, rollout).double()
        objective = objective + (1 - alpha) * (probs * external).sum()
    expected = torch.autograd.grad(-objective, params)

    # The agent's own loss on every sequence, weighted by its exact probability.
    loss, _ = agent.loss(rollout, external, weights=probs.detach())
    got = torch.autograd.grad(loss, params, allow_unused=True)
    assert any(float(g.abs().max()) > 1e-4 for g in expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_returns_reward_to_go_and_whole_sequence_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rtg = compute_returns(rewards, mask, "reward_to_go")
    torch.testing.assert_close(rtg, torch.tensor([[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]]))
    seq = compute_returns(rewards, mask, "sequence")
    torch.testing.assert_close(seq, torch.tensor([[6.0, 6.0, 6.0], [9.0, 9.0, 0.0]]))
    rtg_half = compute_returns(rewards, mask, "reward_to_go", gamma=0.5)
    torch.testing.assert_close(rtg_half[0], torch.tensor([1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0]))


def test_rloo_and_batch_mean_baselines_by_hand():
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0])[:, None]  # 2 prompts x k=4
    ones = torch.ones_like(returns, dtype=torch.bool)
    loo = group_baseline(returns, ones, "leave_one_out", group_size=4)[:, 0]
    torch.testing.assert_close(loo, torch.tensor([3.0, 8 / 3, 7 / 3, 2.0, 30.0, 80 / 3, 70 / 3, 20.0]))
    mean = group_baseline(returns, ones, "batch_mean")[:, 0]
    torch.testing.assert_close(mean, torch.full((8,), 13.75))
    assert torch.equal(group_baseline(returns, ones, "none"), torch.zeros_like(returns))


def test_per_token_leave_one_out_counts_only_rows_with_a_token():
    returns = torch.tensor([[1.0, 2.0, 3.0], [5.0, 6.0, 0.0], [9.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    b = group_baseline(returns, mask, "leave_one_out", group_size=3)
    expected = torch.tensor([[7.0, 6.0, 0.0], [5.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    torch.testing.assert_close(b, expected)


def test_advantages_with_rloo_and_whitening_by_hand():
    mask = torch.tensor([[True, True], [True, True], [True, False], [True, False]])
    seq = compute_returns(torch.tensor([[2.0, 1.0], [0.0, 1.0], [2.0, 0.0], [6.0, 0.0]]), mask, "sequence")
    torch.testing.assert_close(seq, torch.tensor([[3.0, 3.0], [1.0, 1.0], [2.0, 0.0], [6.0, 0.0]]))
    adv = compute_advantages(seq, mask, "leave_one_out", group_size=2, per_token=False)
    torch.testing.assert_close(adv, torch.tensor([[2.0, 2.0], [-2.0, -2.0], [-4.0, 0.0], [4.0, 0.0]]))
    white = masked_whiten(torch.tensor([[1.0, 2.0], [3.0, 7.0]]), torch.tensor([[True, True], [True, False]]))
    torch.testing.assert_close(white, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))


def test_length_normalized_returns_by_hand():
    distill = torch.tensor([[1.0, 2.0, 3.0], [4.0, 6.0, 99.0]])
    terminal = torch.tensor([[0.0, 0.0, 10.0], [0.0, 20.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rtg = compute_returns(distill, mask, "reward_to_go", terminal_rewards=terminal, length_normalize=True)
    # KL part divided by the tokens it sums (3, 2, 1 / 2, 1); the terminal reward is not divided.
    expected = torch.tensor([[6 / 3 + 10, 5 / 2 + 10, 3 / 1 + 10], [10 / 2 + 20, 6 / 1 + 20, 0.0]])
    torch.testing.assert_close(rtg, expected)
    seq = compute_returns(distill, mask, "sequence", terminal_rewards=terminal, length_normalize=True)
    torch.testing.assert_close(seq, torch.tensor([[12.0, 12.0, 12.0], [25.0, 25.0, 0.0]]))
    plain = compute_returns(distill, mask, "reward_to_go", terminal_rewards=terminal)
    torch.testing.assert_close(plain, compute_returns(distill + terminal, mask, "reward_to_go"))


def test_policy_gradient_loss_sums_tokens_and_averages_sequences():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss = policy_gradient_loss(logprobs, adv, mask)
    torch.testing.assert_close(loss, torch.tensor((6.0 + 4.0) / 2))
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, torch.tensor([[-0.5, -0.5, -0.5], [-1.0, -1.0, 0.0]]))
    weighted = sequence_loss(torch.ones(2, 3), mask, weights=torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(weighted, torch.tensor(0.25 * 3 + 0.75 * 2))


def test_value_baseline_trains_only_the_head(tiny):
    engine = tiny
    opt = torch.optim.SGD(engine.student.parameters(), lr=0.0)
    agent = REINFORCEAgent(
        engine,
        opt,
        REINFORCEConfig(baseline="value", samples_per_prompt=1, max_new_tokens=MAX_NEW, value_lr=0.5),
        generator=torch.Generator().manual_seed(0),
    )
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.5
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in agent.extra_parameters()}
    rollout, _ = agent.collect([Example(PROMPT)] * 4)
    params = list(engine.student.parameters())
    grads = []
    for vf_coef in (0.0, 5.0):
        agent.config.vf_coef = vf_coef
        loss, stats = agent.loss(rollout)
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)  # the value loss does not reach the student
    before = agent.value_head.linear.bias.detach().clone()
    stats = agent.update([Example(PROMPT)] * 4)
    assert "train/value_loss" in stats and "train/explained_variance" in stats
    assert not torch.equal(before, agent.value_head.linear.bias)
