import math

import pytest
import torch
from rl_distill.agents import GKDAgent, GKDConfig

from rl_distill.evaluation import heldout_divergence
from rl_distill.rollout import SamplingConfig
from rl_distill.tasks import Example

PROMPTS = ["1+2=", "ab", "hello", "x y z"]


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
