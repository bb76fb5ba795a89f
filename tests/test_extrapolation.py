"""Reward extrapolation (G-OPD), the teacher's temperature and top-k/top-p sampling in the RL agents.

- ``beta_ext``: the return ``log pT - log pS + beta_ext * r``. Eq. 5 with ``alpha`` is the same
  objective times ``alpha`` when ``beta_ext = (1 - alpha) / alpha``: checked on REINFORCE's exact
  expected gradient (every completion of a tiny float64 model enumerated, as in
  ``tests/test_reinforce.py``), on sampled batches, in PPO's rewards and in the environment.
- ``teacher_temperature``: the teacher's log-probs in the rewards are ``log_softmax(logits / T)``.
- ``top_k``/``top_p``: the agents' log-probs are those of the filtered distribution actually
  sampled, so the exact gradient is that of the filtered policy and PPO's first ratio is 1.
"""

import gymnasium
import numpy as np
import pytest
import torch
from test_reinforce import (  # the enumeration machinery (and its module-scoped fixture)
    MAX_NEW,
    PROMPT,
    count_a_reward,
    enumerated_rollout,
    sequence_logprobs,
    tiny,  # noqa: F401
)

from rl_distill.agents import PPOAgent, PPOConfig, REINFORCEAgent, REINFORCEConfig
from rl_distill.agents.reinforce import policy_gradient_loss
from rl_distill.envs import ENV_ID, TokenGenerationEnv
from rl_distill.rollout.engine import filtered_logprobs
from rl_distill.tasks import Example

pytestmark = pytest.mark.usefixtures("one_thread")

TAGGED = Example(PROMPT, metadata={"tag": "t"})
PROMPTS = ["1+2=", "ab", "hello", "x y z"]
EOS = 2


def reinforce(engine, reward=count_a_reward, **cfg):
    config = REINFORCEConfig(**{"samples_per_prompt": 1, "max_new_tokens": MAX_NEW, **cfg})
    params = list(engine.student.parameters())
    agent = REINFORCEAgent(
        engine,
        torch.optim.SGD(params, lr=0.0),
        config,
        reward=reward,
        generator=torch.Generator().manual_seed(0),
    )
    if agent.value_head is not None:  # the same non-trivial value baseline in every agent
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            agent.value_head.linear.weight.copy_(
                torch.randn(agent.value_head.linear.weight.shape, generator=gen)
            )
            agent.value_head.linear.bias.fill_(0.3)
    return agent


def exact_gradient(agent, rollout, probs, external):
    """The gradient of the agent's loss with every enumerated sequence weighted by its exact probability."""
    loss, _ = agent.loss(rollout, external, weights=probs)
    return torch.autograd.grad(loss, list(agent.student.parameters()))


def max_abs(xs, ys):
    return max(float((x - y).abs().max()) for x, y in zip(xs, ys))


# --------------------------------------------------------------------------- equivalence with Eq. 5
@pytest.mark.parametrize(
    ("baseline", "return_type"), [("none", "reward_to_go"), ("none", "sequence"), ("value", "reward_to_go")]
)
@pytest.mark.parametrize("alpha", [0.8, 0.4, 0.25])  # beta_ext = 0.25, 1.5, 3
def test_extrapolated_exact_gradient_is_the_eq5_gradient_divided_by_alpha(tiny, alpha, baseline, return_type):  # noqa: F811
    engine = tiny
    rollout = enumerated_rollout(engine)
    params = list(engine.student.parameters())
    logp_s = sequence_logprobs(engine.student, rollout)  # (N,) every completion, with gradient
    with torch.no_grad():
        logp_t = sequence_logprobs(engine.teacher, rollout)
    probs = logp_s.exp()
    beta_ext = (1.0 - alpha) / alpha

    eq5 = reinforce(engine, alpha=alpha, baseline=baseline, return_type=return_type)
    extrapolated = reinforce(engine, beta_ext=beta_ext, baseline=baseline, return_type=return_type)
    external = extrapolated.external_rewards([TAGGED] * len(rollout), rollout).double()
    g_eq5 = exact_gradient(eq5, rollout, probs.detach(), external)
    g_ext = exact_gradient(extrapolated, rollout, probs.detach(), external)

    # The G-OPD objective in closed form: E_{y~pS}[log pT(y) - log pS(y) + beta_ext r(y)].
    objective = (probs * (logp_t - logp_s + beta_ext * external)).sum()
    expected = torch.autograd.grad(-objective, params)
    assert max(float(g.abs().max()) for g in g_ext) > 1e-3
    assert max_abs(g_ext, expected) < 1e-6
    # Eq. 5 with alpha is the same objective times alpha: the gradients differ by exactly that scale.
    assert max_abs(g_ext, [g / alpha for g in g_eq5]) < 1e-6


@pytest.mark.parametrize("alpha", [0.6, 0.2])
def test_sampled_batch_losses_scale_by_alpha_with_rloo_discount_and_length_normalisation(tiny, alpha):  # noqa: F811
    engine = tiny
    cfg = {"samples_per_prompt": 4, "baseline": "leave_one_out", "gamma": 0.9, "length_normalize": True}
    eq5 = reinforce(engine, alpha=alpha, **cfg)
    extrapolated = reinforce(engine, beta_ext=(1.0 - alpha) / alpha, **cfg)
    rollout, external = eq5.collect([TAGGED] * 3)
    assert external is not None and len(rollout) == 12
    params = list(engine.student.parameters())
    loss_eq5, stats_eq5 = eq5.loss(rollout, external)
    loss_ext, stats_ext = extrapolated.loss(rollout, external)
    torch.testing.assert_close(loss_eq5, alpha * loss_ext, atol=1e-6, rtol=0)  # float32 rewards
    assert stats_eq5["rollout/return"] == pytest.approx(alpha * stats_ext["rollout/return"], abs=1e-6)
    g_eq5, g_ext = torch.autograd.grad(loss_eq5, params), torch.autograd.grad(loss_ext, params)
    assert max_abs(g_ext, [g / alpha for g in g_eq5]) < 1e-6


def test_beta_ext_collects_the_reward_and_alpha_one_does_not(tiny):  # noqa: F811
    calls = []

    def reward(prompts, completions, **metadata):
        calls.append(len(completions))
        return [1.0] * len(completions)

    _, external = reinforce(tiny, reward=reward, beta_ext=2.0, baseline="none").collect([Example(PROMPT)] * 2)
    assert external is not None and calls == [2]
    _, external = reinforce(tiny, reward=reward, beta_ext=0.0, baseline="none").collect([Example(PROMPT)] * 2)
    assert external is None and calls == [2]
    with pytest.raises(ValueError, match="beta_ext > 0"):
        reinforce(tiny, reward=None, beta_ext=1.0, baseline="none")
    with pytest.raises(ValueError, match="leave alpha at 1"):
        REINFORCEConfig(alpha=0.5, beta_ext=1.0)


def test_ppo_rewards_with_reward_extrapolation(engine):
    agent = PPOAgent(
        engine,
        torch.optim.SGD(engine.student.parameters(), lr=0.0),
        PPOConfig(max_new_tokens=6, beta_ext=2.5),
        reward=lambda prompts, completions, **_: [10.0] * len(completions),
        generator=torch.Generator().manual_seed(0),
    )
    data = agent.collect([Example(p) for p in PROMPTS])
    mask = data.rollout.completion_mask
    expected = (data.rollout.teacher_logprobs - data.logprobs) * mask  # weight 1 on both log-probs
    last = mask.sum(-1) - 1
    expected[torch.arange(len(last)), last] += 2.5 * 10.0
    torch.testing.assert_close(data.rewards, expected)


# --------------------------------------------------------------------------- the environment
class LengthReward:
    def __call__(self, prompts, completions, **metadata):
        return [0.1 * len(c) + 0.01 * len(p) for p, c in zip(prompts, completions)]


@pytest.mark.parametrize("alpha", [0.75, 0.3])
def test_env_rewards_are_alpha_times_the_extrapolated_rewards(teacher, tokenizer, alpha):
    pair, beta_ext = (teacher, tokenizer), (1.0 - alpha) / alpha
    eq5 = TokenGenerationEnv(pair, PROMPTS, max_new_tokens=5, alpha=alpha, reward=LengthReward())
    extrapolated = gymnasium.make(
        ENV_ID, teacher=pair, prompts=PROMPTS, max_new_tokens=5, beta_ext=beta_ext, reward=LengthReward()
    )
    assert extrapolated.unwrapped.beta_ext == beta_ext and extrapolated.unwrapped.alpha == 1.0
    completions = [[7, 8, EOS], [9, 10, 11, 12, 13], [EOS], [14, 15, 16, 17, EOS]]
    for prompt, tokens in zip(PROMPTS, completions):
        eq5.reset(options={"prompt": prompt})
        extrapolated.reset(options={"prompt": prompt})
        for a in tokens:
            _, r_eq5, *_, info_eq5 = eq5.step(a)
            _, r_ext, *_, info_ext = extrapolated.step(a)
            assert r_eq5 == pytest.approx(alpha * r_ext, abs=1e-6)
            assert info_ext["beta_ext"] == beta_ext and "beta_ext" not in info_eq5
        assert r_ext == pytest.approx(
            info_ext["teacher_logprob"] + beta_ext * info_ext["external_reward"], abs=1e-6
        )
    rollout = eq5.rollout_from_tokens(PROMPTS, completions)
    bulk_eq5 = eq5.bulk_rewards(rollout).rewards
    bulk_ext = extrapolated.unwrapped.bulk_rewards(rollout).rewards
    torch.testing.assert_close(bulk_eq5, alpha * bulk_ext, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta_ext": 1.0, "alpha": 0.5, "reward": LengthReward()}, "leave alpha at 1"),
        ({"beta_ext": -1.0, "reward": LengthReward()}, "beta_ext must be >= 0"),
        ({"beta_ext": 1.0}, "beta_ext=1.0 weights an external reward, but no reward was given"),
        ({"teacher_temperature": 0.0}, "teacher_temperature must be > 0"),
    ],
)
def test_env_bad_extrapolation_arguments(teacher, tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        gymnasium.make(ENV_ID, teacher=(teacher, tokenizer), prompts=PROMPTS, **kwargs)


def test_env_teacher_temperature(teacher, tokenizer):
    temperature = 2.0
    env = TokenGenerationEnv(
        (teacher, tokenizer),
        PROMPTS,
        max_new_tokens=4,
        teacher_temperature=temperature,
        return_teacher_logprobs=True,
    )
    assert env.teacher_temperature == temperature
    tokens = [7, 8, 9, EOS]
    env.reset(options={"prompt": PROMPTS[0]})
    stepped, infos = [], []
    for a in tokens:
        _, r, *_, info = env.step(a)
        stepped.append(r)
        infos.append(info)
    prompt_ids = env.engine.encoder.token_ids(PROMPTS[0])
    ids = torch.tensor([list(prompt_ids) + tokens])
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1, : len(tokenizer)].double()
    ref = (logits / temperature).log_softmax(-1)  # (T, V)
    want = ref.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(stepped, dtype=torch.float64), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        torch.tensor(np.stack([i["teacher_logprobs"] for i in infos])).double(), ref, atol=1e-5, rtol=0
    )
    bulk = env.bulk_rewards(env.rollout_from_tokens(PROMPTS[:1], [tokens]))
    torch.testing.assert_close(bulk.rewards[0].double(), want, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- teacher temperature
def tempered_sequence_logprobs(model, rollout, temperature):
    """log p(y|x) at ``temperature`` of every enumerated sequence, straight from the model."""
    prompt_len = rollout.prompt_ids.shape[1]
    logits = model(input_ids=rollout.input_ids).logits[:, prompt_len - 1 : -1, :6] / temperature
    logp = torch.log_softmax(logits, -1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    return (logp * rollout.completion_mask).sum(-1)


@pytest.mark.parametrize(("temperature", "teacher_temperature"), [(0.7, None), (0.7, 2.0), (1.0, 0.5)])
def test_reinforce_rewards_use_the_teacher_at_its_temperature(tiny, temperature, teacher_temperature):  # noqa: F811
    engine = tiny
    teacher_temp = temperature if teacher_temperature is None else teacher_temperature
    agent = reinforce(
        engine, reward=None, temperature=temperature, teacher_temperature=teacher_temperature, baseline="none"
    )
    assert agent.config.teacher_temp == teacher_temp

    # What collect records: log_softmax(teacher logits / T) at the sampled tokens.
    rollout, _ = agent.collect([Example(PROMPT)] * 6)
    prompt_len = rollout.prompt_ids.shape[1]
    with torch.no_grad():
        logits = engine.teacher(input_ids=rollout.input_ids).logits[:, prompt_len - 1 : -1, :6]
    want = (logits / teacher_temp).log_softmax(-1).gather(-1, rollout.completion_ids[..., None])[..., 0]
    torch.testing.assert_close(
        rollout.teacher_logprobs.double(), want * rollout.completion_mask, atol=1e-6, rtol=0
    )

    # And the rewards use them: the exact gradient is that of KL(pS at temperature || pT at T).
    rollout = engine.score(enumerated_rollout(engine), teacher_temperature=teacher_temp)
    params = list(engine.student.parameters())
    logp_s = tempered_sequence_logprobs(engine.student, rollout, temperature)
    with torch.no_grad():
        logp_t = tempered_sequence_logprobs(engine.teacher, rollout, teacher_temp)
    probs = logp_s.exp()
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-12, rtol=0)
    expected = torch.autograd.grad((probs * (logp_s - logp_t)).sum(), params)
    got = exact_gradient(agent, rollout, probs.detach(), None)
    assert max_abs(got, expected) < 1e-6


# --------------------------------------------------------------------------- top-k / top-p
def test_reinforce_exact_gradient_with_top_k_is_that_of_the_filtered_policy(tiny):  # noqa: F811
    engine, top_k, alpha = tiny, 3, 0.5
    rollout = enumerated_rollout(engine)
    params = list(engine.student.parameters())
    prompt_len = rollout.prompt_ids.shape[1]
    mask = rollout.completion_mask
    logits = engine.student(input_ids=rollout.input_ids).logits[:, prompt_len - 1 : -1, :6]  # (N, T, 6)
    # By hand: a kept token's log-prob is its logit minus the logsumexp of the top-k logits.
    top = logits.topk(top_k, dim=-1).values  # (N, T, k)
    tok = logits.gather(-1, rollout.completion_ids[..., None])[..., 0]  # (N, T)
    kept = (tok >= top[..., -1]) | ~mask  # every real token inside the top-k
    logp_f = ((tok - top.logsumexp(-1)) * mask).sum(-1)  # (N,)
    possible = kept.all(-1)
    assert 0 < int(possible.sum()) < len(rollout)  # the filter removes some completions
    probs = torch.where(possible, logp_f.exp(), torch.zeros((), dtype=logp_f.dtype))
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-12, rtol=0)
    with torch.no_grad():
        logp_t = sequence_logprobs(engine.teacher, rollout)

    agent = reinforce(engine, alpha=alpha, top_k=top_k, baseline="none")
    external = agent.external_rewards([TAGGED] * len(rollout), rollout).double()
    objective = (probs * (alpha * (logp_t - logp_f) + (1 - alpha) * external))[possible].sum()
    expected = torch.autograd.grad(-objective, params)
    got = exact_gradient(agent, rollout, probs.detach(), external)
    assert max_abs(got, expected) < 1e-6


def ppo(engine, **cfg):
    return PPOAgent(
        engine,
        torch.optim.SGD(engine.student.parameters(), lr=0.0),
        PPOConfig(**{"max_new_tokens": 6, **cfg}),
        max_grad_norm=0.0,
        generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.8)])
def test_ppo_with_a_filter_starts_at_ratio_one_on_the_sampled_policy(engine, top_k, top_p):
    agent = ppo(engine, temperature=0.8, top_k=top_k, top_p=top_p, update_epochs=1, norm_adv=False)
    data = agent.collect([Example(p) for p in PROMPTS * 2])
    mask = data.rollout.completion_mask
    # PPO's old log-probs are those the engine recorded while sampling (the filtered policy) ...
    torch.testing.assert_close(data.logprobs * mask, data.rollout.logprobs, atol=1e-5, rtol=0)
    unfiltered = filtered_logprobs(
        engine.score_student(data.rollout).detach(), data.rollout.completion_ids, 0.8
    )
    assert ((data.logprobs - unfiltered) * mask).max() > 1e-3
    # ... and the first minibatch's ratio is exactly 1.
    _, stats = agent.minibatch_loss(data, torch.arange(len(data.rollout)))
    assert float(stats["old_approx_kl"]) == 0.0 and float(stats["approx_kl"]) == 0.0
    assert float(stats["clipfrac"]) == 0.0

    # One epoch, one minibatch: REINFORCE with the filtered log-probs.
    params = list(engine.student.parameters())
    logp = filtered_logprobs(
        engine.score_student(data.rollout), data.rollout.completion_ids, 0.8, top_k, top_p
    )
    expected = torch.autograd.grad(policy_gradient_loss(logp, data.advantages, mask), params)
    agent.learn(data)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, atol=1e-6, rtol=1e-4)


def test_ppo_with_top_k_stays_finite_over_epochs_with_an_entropy_bonus(engine):
    agent = ppo(engine, top_k=4, update_epochs=3, num_minibatches=2, ent_coef=0.01)
    agent.optimizer.param_groups[0]["lr"] = 0.5  # move the policy: sampled tokens may leave the top-k
    stats = agent.update([Example(p) for p in PROMPTS])
    for key in ("train/loss", "train/approx_kl", "train/entropy", "train/grad_norm"):
        assert np.isfinite(stats[key]), key
    assert stats["train/skipped"] == 0.0
