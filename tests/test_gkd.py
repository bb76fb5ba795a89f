import math

import pytest
import torch

from rl_distill.agents import SPECIAL_CASES, GKDAgent, GKDConfig
from rl_distill.evaluation import heldout_divergence
from rl_distill.rollout import SamplingConfig
from rl_distill.tasks import Example

PROMPTS = ["1+2=", "ab", "hello", "x y z"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_agent(engine, lr=1e-3, **cfg):
    opt = torch.optim.SGD(engine.student.parameters(), lr=lr)
    return GKDAgent(
        engine, opt, GKDConfig(max_new_tokens=8, **cfg), generator=torch.Generator().manual_seed(0)
    )


def per_token_reference(name, t_logits, s_logits, beta=0.5):
    """Per-token divergence written out from the definitions (paper Eq. 1 for JSD)."""
    t, s = t_logits.log_softmax(-1).exp(), s_logits.log_softmax(-1).exp()
    if name == "forward_kl":
        return (t * (t.log() - s.log())).sum(-1)
    if name == "reverse_kl":
        return (s * (s.log() - t.log())).sum(-1)
    if name == "jsd":
        m = beta * t + (1 - beta) * s
        return beta * (t * (t.log() - m.log())).sum(-1) + (1 - beta) * (s * (s.log() - m.log())).sum(-1)
    return 0.5 * (t - s).abs().sum(-1)


def unpadded_logits(model, prompt_ids, completion_ids, vocab):
    """Logits predicting each completion token, one sequence alone (no padding at all)."""
    ids = torch.cat([prompt_ids, completion_ids])[None]
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1, :vocab]
    return logits


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_gkd_loss_is_the_batch_mean_of_eq2(engine, name):
    agent = make_agent(engine, divergence=name, beta=0.3)
    rollouts, num_on = agent.collect([Example(p) for p in PROMPTS])
    assert num_on == len(PROMPTS) and len(rollouts) == 1
    loss, per_seq = agent.loss(rollouts)
    r, vocab = rollouts[0], engine.vocab_size
    expected = []
    for i in range(len(PROMPTS)):
        prompt = r.prompt_ids[i][r.prompt_mask[i].bool()]
        n = int(r.lengths[i])
        comp = r.completion_ids[i, :n]
        with torch.no_grad():
            t = unpadded_logits(engine.teacher, prompt, comp, vocab)
            s = unpadded_logits(engine.student, prompt, comp, vocab)
        expected.append(per_token_reference(name, t, s, beta=0.3).mean())  # paper Eq. 2
    expected = torch.stack(expected)
    torch.testing.assert_close(per_seq, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss.detach(), expected.mean(), atol=2e-5, rtol=1e-4)
    assert loss.requires_grad


def test_on_policy_gkd_lowers_heldout_divergence(engine):
    torch.manual_seed(0)
    opt = torch.optim.Adam(engine.student.parameters(), lr=3e-3)
    agent = GKDAgent(
        engine, opt, GKDConfig(divergence="jsd", max_new_tokens=8), generator=torch.Generator().manual_seed(0)
    )
    train = [Example(f"{a}+{b}=") for a in range(6) for b in range(6)]
    held_out = [Example(f"{a}-{b}=") for a in range(4) for b in range(2)]
    sampling = SamplingConfig(max_new_tokens=8)
    before = heldout_divergence(engine, held_out, sampling=sampling, seed=1)
    for step in range(30):
        stats = agent.update(train[(step * 4) % 36 : (step * 4) % 36 + 4])
        assert math.isfinite(stats["train/loss"]) and stats["train/skipped"] == 0.0
    after = heldout_divergence(engine, held_out, sampling=sampling, seed=1)
    assert after["eval/jsd"] < 0.7 * before["eval/jsd"], (before, after)
    assert after["eval/reverse_kl"] < before["eval/reverse_kl"]


def test_supervised_kd_is_forward_kl_on_references(engine):
    examples = [Example("1+2=", reference="3"), Example("ab", reference="cd ef")]
    agent = make_agent(engine, lmbda=0.0, divergence="forward_kl", off_policy="reference")
    rollouts, num_on = agent.collect(examples)
    assert num_on == 0
    ref = engine.score(
        engine.from_completions([e.prompt for e in examples], ["3", "cd ef"]), teacher_output="full"
    )
    assert torch.equal(rollouts[0].completion_ids, ref.completion_ids)
    loss, _ = agent.loss(rollouts)
    expected = []
    for i in range(2):
        n = int(ref.lengths[i])
        prompt = ref.prompt_ids[i][ref.prompt_mask[i].bool()]
        with torch.no_grad():
            t = unpadded_logits(engine.teacher, prompt, ref.completion_ids[i, :n], engine.vocab_size)
            s = unpadded_logits(engine.student, prompt, ref.completion_ids[i, :n], engine.vocab_size)
        expected.append(per_token_reference("forward_kl", t, s).mean())
    torch.testing.assert_close(loss.detach(), torch.stack(expected).mean(), atol=2e-5, rtol=1e-4)


def test_seqkd_trains_on_teacher_samples(engine):
    agent = make_agent(engine, lmbda=0.0, divergence="forward_kl", off_policy="teacher")
    rollouts, _ = agent.collect([Example(p) for p in PROMPTS])
    again = engine.generate(
        PROMPTS, agent.config.sampling, model=engine.teacher, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(rollouts[0].completion_ids, again.completion_ids)


def test_lambda_coin_per_example_and_per_batch(engine):
    examples = [Example(p, reference="ok") for p in PROMPTS] * 4  # 16 examples
    per_example = make_agent(engine, lmbda=0.5, mixture="example")
    fractions = [per_example.update(examples)["rollout/on_policy_fraction"] for _ in range(6)]
    assert any(0.0 < f < 1.0 for f in fractions)  # mixed inside one batch
    assert 0.25 < sum(fractions) / len(fractions) < 0.75
    per_batch = make_agent(engine, lmbda=0.5, mixture="batch")
    fractions = [per_batch.update(examples)["rollout/on_policy_fraction"] for _ in range(8)]
    assert set(fractions) <= {0.0, 1.0} and len(set(fractions)) == 2


def test_missing_references_are_a_clear_error(engine):
    agent = make_agent(engine, lmbda=0.0)
    with pytest.raises(ValueError, match="needs reference completions.*2 example"):
        agent.update([Example("a"), Example("b")])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("beta", 1.5, r"beta must be in \[0, 1\]"),
        ("lmbda", -0.1, r"lmbda must be in \[0, 1\]"),
        ("divergence", "kl", "divergence must be one of forward_kl, reverse_kl, jsd, tv"),
        ("temperature", 0.0, "temperature must be > 0"),
        ("mixture", "token", "mixture must be"),
        ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
    ],
)
def test_gkd_config_range_checks(field, value, message):
    with pytest.raises(ValueError, match=message):
        GKDConfig(**{field: value})


def test_non_finite_loss_skips_the_step(engine):
    agent = make_agent(engine)
    before = [p.detach().clone() for p in engine.student.parameters()]
    stats = agent.optimizer_step(torch.tensor(float("nan"), requires_grad=True))
    assert stats["train/skipped"] == 1.0 and agent.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, engine.student.parameters()))


# --- Eq. 5: the reward term ----------------------------------------------------------------
def eq5_agent(engine, alpha, reward, **cfg):
    opt = torch.optim.SGD(engine.student.parameters(), lr=0.0)
    config = GKDConfig(max_new_tokens=8, alpha=alpha, divergence="reverse_kl", **cfg)
    return GKDAgent(engine, opt, config, reward=reward, generator=torch.Generator().manual_seed(0))


def grads_of(loss, engine):
    return torch.autograd.grad(loss, list(engine.student.parameters()), allow_unused=True)


def hand_pg_loss(engine, rollout, rewards, baseline):
    """-mean_i[(r_i - b_i) sum_t log pS(y_i,t)], written out."""
    n = len(rewards)
    if baseline == "leave_one_out":
        b = (rewards.sum() - rewards) / (n - 1)
    elif baseline == "batch_mean":
        b = rewards.mean().expand(n)
    else:
        b = torch.zeros(n)
    logp = engine.score_student(rollout).log_softmax(-1)
    tok = logp.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    seq = (tok * rollout.completion_mask).sum(-1)
    return -((rewards - b) * seq).mean()


def test_alpha_one_is_pure_gkd_and_never_calls_the_reward(engine):
    def fail(*args, **kwargs):
        raise AssertionError("alpha=1 must not call the reward")

    agent = eq5_agent(engine, 1.0, fail)
    stats = agent.update([Example(p) for p in PROMPTS])
    assert "train/pg_loss" not in stats
    rollouts, n = agent.collect([Example(p) for p in PROMPTS])
    loss, _ = agent.objective(rollouts, n, torch.ones(n))
    gkd, _ = agent.loss(rollouts)
    assert torch.equal(loss.detach(), gkd.detach())
    for a, b in zip(grads_of(loss, engine), grads_of(gkd, engine)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("reward_value", [0.0, 3.0])
def test_zero_or_constant_reward_gives_alpha_times_on_policy_gkd(engine, reward_value):
    # r == 0 removes the reward term; a constant r is removed by the leave-one-out baseline.
    agent = eq5_agent(engine, 0.3, lambda prompts, completions, **_: [reward_value] * len(completions))
    examples = [Example(p) for p in PROMPTS]
    rollouts, n = agent.collect(examples)
    rewards = agent.external_rewards(examples, rollouts[0])
    assert torch.equal(rewards, torch.full((4,), reward_value))
    loss, stats = agent.objective(rollouts, n, rewards)
    gkd, _ = agent.loss(rollouts)
    torch.testing.assert_close(loss, 0.3 * gkd, atol=1e-7, rtol=1e-6)
    for a, b in zip(grads_of(loss, engine), grads_of(gkd, engine)):
        torch.testing.assert_close(a, 0.3 * b, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("baseline", ["leave_one_out", "batch_mean", "none"])
def test_alpha_zero_is_the_policy_gradient_alone(engine, baseline):
    def reward(prompts, completions, **_):
        return [float(len(c)) + i for i, c in enumerate(completions)]

    agent = eq5_agent(engine, 0.0, reward, baseline=baseline)
    examples = [Example(p) for p in PROMPTS]
    rollouts, n = agent.collect(examples)
    rewards = agent.external_rewards(examples, rollouts[0])
    loss, stats = agent.objective(rollouts, n, rewards)
    expected = hand_pg_loss(engine, rollouts[0], rewards, baseline)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_of(loss, engine), grads_of(expected, engine)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert stats["train/divergence"] > 0  # still logged, not optimised


def test_eq5_loss_is_alpha_gkd_minus_weighted_policy_gradient(engine):
    agent = eq5_agent(engine, 0.6, lambda prompts, completions, **_: [c.count("a") for c in completions])
    examples = [Example(p) for p in PROMPTS]
    rollouts, n = agent.collect(examples)
    rewards = torch.tensor([1.0, 0.0, 2.0, 5.0])
    loss, stats = agent.objective(rollouts, n, rewards)
    gkd, _ = agent.loss(rollouts)
    pg = hand_pg_loss(engine, rollouts[0], rewards, "leave_one_out")
    torch.testing.assert_close(loss, 0.6 * gkd + 0.4 * pg, atol=1e-5, rtol=1e-5)
    assert stats["rollout/external_reward"] == 2.0


def test_reward_gets_prompts_completions_metadata_of_on_policy_rows_only(engine):
    calls = []

    def reward(prompts, completions, **metadata):
        calls.append((list(prompts), list(completions), metadata))
        return [1.0] * len(completions)

    opt = torch.optim.SGD(engine.student.parameters(), lr=0.0)
    agent = GKDAgent(
        engine,
        opt,
        GKDConfig(max_new_tokens=8, alpha=0.5, lmbda=0.5),
        reward=reward,
        generator=torch.Generator().manual_seed(3),
    )
    examples = [Example(p, reference="ok", metadata={"answer": str(i)}) for i, p in enumerate(PROMPTS)] * 2
    examples[0] = Example(PROMPTS[0], reference="ok")  # no metadata: None in the list
    on = torch.tensor([True, False, True, False, False, True, True, False])
    rollouts, n = agent.collect(examples, on)
    on_examples = [ex for ex, o in zip(examples, on.tolist()) if o]
    agent.external_rewards(on_examples, rollouts[0])
    prompts, completions, metadata = calls[-1]
    assert prompts == [ex.prompt for ex in on_examples]
    assert completions == engine.decode(rollouts[0])
    assert metadata == {"answer": [None, "2", "1", "2"]}
    stats = agent.update(examples)  # the update path: only on-policy rows are scored
    assert len(calls[-1][1]) == round(stats["rollout/on_policy_fraction"] * len(examples))


def test_alpha_below_one_needs_a_reward_and_on_policy_data(engine):
    with pytest.raises(ValueError, match="alpha < 1 .* but none was given"):
        make_agent(engine, alpha=0.5)
    with pytest.raises(ValueError, match="alpha < 1 .* lmbda=0"):
        GKDConfig(alpha=0.5, lmbda=0.0)


# --- special cases ---------------------------------------------------------------------------
def hand_cross_entropy(engine, rollout):
    """Mean over sequences of the per-token cross-entropy -1/L sum_t log pS(y_t), sequence by sequence."""
    out = []
    for i in range(len(rollout)):
        prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()]
        comp = rollout.completion_ids[i, : int(rollout.lengths[i])]
        with torch.no_grad():
            s = unpadded_logits(engine.student, prompt, comp, engine.vocab_size)
        out.append(-s.log_softmax(-1).gather(-1, comp[:, None]).mean())
    return torch.stack(out).mean()


def test_sft_is_cross_entropy_on_references(engine):
    examples = [Example("1+2=", reference="3"), Example("ab", reference="cd ef")]
    agent = make_agent(engine, **SPECIAL_CASES["sft"])
    rollouts, num_on = agent.collect(examples)
    assert num_on == 0 and rollouts[0].teacher_logits is None  # the teacher is not needed
    ref = engine.from_completions([e.prompt for e in examples], ["3", "cd ef"])
    assert torch.equal(rollouts[0].completion_ids, ref.completion_ids)
    loss, _ = agent.loss(rollouts)
    torch.testing.assert_close(loss.detach(), hand_cross_entropy(engine, ref), atol=2e-5, rtol=1e-4)
    stats = agent.update(examples)
    assert math.isfinite(stats["train/loss"]) and stats["train/skipped"] == 0.0


def test_seqkd_is_cross_entropy_on_teacher_samples(engine):
    agent = make_agent(engine, **SPECIAL_CASES["seqkd"])
    rollouts, _ = agent.collect([Example(p) for p in PROMPTS])
    again = engine.generate(
        PROMPTS, agent.config.sampling, model=engine.teacher, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(rollouts[0].completion_ids, again.completion_ids)
    loss, _ = agent.loss(rollouts)
    torch.testing.assert_close(loss.detach(), hand_cross_entropy(engine, again), atol=2e-5, rtol=1e-4)


def test_supervised_kd_special_case_is_forward_kl_on_references(engine):
    assert SPECIAL_CASES["supervised_kd"] == {
        "lmbda": 0.0,
        "off_policy": "reference",
        "divergence": "forward_kl",
    }
    agent = make_agent(engine, **SPECIAL_CASES["supervised_kd"])
    rollouts, _ = agent.collect([Example("ab", reference="cd")])
    assert rollouts[0].teacher_logits is not None


def test_mixed_batch_loss_averages_both_parts(engine):
    agent = make_agent(engine, divergence="forward_kl", **SPECIAL_CASES["mixed"])
    assert agent.config.lmbda == 0.5
    examples = [Example(p, reference="zz") for p in PROMPTS]
    on = torch.tensor([True, False, False, True])
    rollouts, n = agent.collect(examples, on)
    assert n == 2 and len(rollouts) == 2
    refs = engine.from_completions([PROMPTS[1], PROMPTS[2]], ["zz", "zz"])
    assert torch.equal(rollouts[1].completion_ids, refs.completion_ids)
    loss, per_seq = agent.loss(rollouts)
    expected = []
    for r in rollouts:
        for i in range(len(r)):
            prompt = r.prompt_ids[i][r.prompt_mask[i].bool()]
            comp = r.completion_ids[i, : int(r.lengths[i])]
            with torch.no_grad():
                t = unpadded_logits(engine.teacher, prompt, comp, engine.vocab_size)
                s = unpadded_logits(engine.student, prompt, comp, engine.vocab_size)
            expected.append(per_token_reference("forward_kl", t, s).mean())
    torch.testing.assert_close(loss.detach(), torch.stack(expected).mean(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"alpha": 2}, r"alpha must be in \[0, 1\], got 2"),
        ({"target": "soft"}, "target must be 'teacher' or 'one_hot'"),
        ({"target": "one_hot", "lmbda": 0.5}, "target 'one_hot' .* needs lmbda=0"),
        ({"target": "one_hot", "lmbda": 0.0, "divergence": "reverse_kl"}, "target 'one_hot' cannot"),
        ({"baseline": "median"}, "baseline must be"),
        ({"reward": 3}, "reward must be a name"),
    ],
)
def test_gkd_eq5_config_range_checks(overrides, message):
    with pytest.raises(ValueError, match=message):
        GKDConfig(**overrides)
