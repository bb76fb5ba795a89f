"""Verifier-only GRPO (SD-ZERO): group advantages by hand, the clipped objective, no teacher at all."""

import math
from pathlib import Path

import pytest
import torch

from rl_distill.agents import AGENTS, GRPOAgent, GRPOConfig
from rl_distill.agents.grpo import group_advantages, grpo_loss, k3_kl
from rl_distill.rollout import RolloutEngine
from rl_distill.tasks import Example

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = [
    Example("1+2=?", "1+2=3. #### 3", {"answer": 3}),
    Example("9-9=?", "9-9=0. #### 0", {"answer": 0}),
]


def test_registered():
    assert AGENTS["grpo"] == (GRPOAgent, GRPOConfig)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    # Group 1: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.57735; group 2: all equal; group 3: mean 0.25,
    # std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5.
    std1 = math.sqrt(1 / 3)
    eps = 1e-4
    expected = [
        0.5 / (std1 + eps),
        -0.5 / (std1 + eps),
        -0.5 / (std1 + eps),
        0.5 / (std1 + eps),
    ]
    expected += [0.0] * 4
    expected += [-0.25 / (0.5 + eps)] * 3 + [0.75 / (0.5 + eps)]
    got = group_advantages(rewards, 4, eps=eps)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)
    plain = group_advantages(rewards, 4, normalize=False)
    torch.testing.assert_close(
        plain,
        torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.25, -0.25, -0.25, 0.75]),
    )
    # Two samples per prompt: deviations +-0.5, sample std sqrt(0.5) -> advantages +-0.5 / 0.70711 = +-0.70711.
    torch.testing.assert_close(
        group_advantages(torch.tensor([2.0, 1.0]), 2, eps=0.0),
        torch.tensor([0.70710678, -0.70710678]),
    )
    with pytest.raises(ValueError, match="group_size must be >= 2 and divide the 3 rewards"):
        group_advantages(torch.zeros(3), 2)


def test_grpo_loss_by_hand():
    mask = torch.tensor([[True, True, False], [True, True, True]])
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -2.0])
    # Ratio 1 everywhere: loss = -mean_i A_i = 0.5, the clipped term inactive.
    new = torch.zeros(2, 3, requires_grad=True)
    loss, stats = grpo_loss(new, old, adv, mask, 0.2)
    assert float(loss.detach()) == pytest.approx(0.5)
    loss.backward()
    # d loss / d logp_it = -A_i / |y_i| / B on real tokens (REINFORCE, length-normalised).
    torch.testing.assert_close(new.grad, torch.tensor([[-0.25, -0.25, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    # Ratio 1.5 with A > 0 is clipped to 1.2; ratio 0.5 with A < 0 is clipped to 0.8 (pessimistic: min).
    new = torch.tensor([[math.log(1.5), math.log(1.5), 0.0], [math.log(0.5)] * 3])
    loss, stats = grpo_loss(new, old, adv, mask, 0.2)
    assert float(loss) == pytest.approx(-(1.2 * 1.0 + 0.8 * -2.0) / 2)
    assert float(stats["clipfrac"]) == 1.0


def test_k3_kl_and_the_penalty():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    kl = k3_kl(logp, ref)
    torch.testing.assert_close(kl, torch.tensor([[0.5 - math.log(0.5) - 1, 0.0]]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    base, _ = grpo_loss(logp, logp, torch.tensor([0.0]), mask, 0.2)
    with_kl, stats = grpo_loss(logp, logp, torch.tensor([0.0]), mask, 0.2, ref_logprob=ref, kl_coef=0.1)
    assert float(with_kl - base) == pytest.approx(0.1 * float(kl.mean()))
    assert float(stats["kl"]) == pytest.approx(float(kl.mean()))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"samples_per_prompt": 1},
            r"samples_per_prompt must be >= 2 \(group-relative advantages",
        ),
        (
            {"alpha": 0.5},
            "alpha weights Eq. 5's distillation term, which GRPO does not have",
        ),
        ({"beta_ext": 1.0}, "beta_ext"),
        ({"advantage": "whiten"}, "advantage must be 'group_norm' or 'group_mean'"),
        ({"clip_coef": 0.0}, "clip_coef must be > 0"),
        ({"kl_coef": -1.0}, "kl_coef must be >= 0"),
        ({"update_epochs": 0}, "update_epochs must be >= 1"),
        ({"adv_eps": 0.0}, "adv_eps must be > 0"),
    ],
)
def test_config_checks(overrides, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**overrides)


def test_config_layer_names_the_field():
    from rl_distill.config import ConfigError, build_dataclass

    with pytest.raises(ConfigError, match=r"agent.samples_per_prompt must be >= 2"):
        build_dataclass(GRPOConfig, {"samples_per_prompt": 1}, "agent")


@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_update_without_a_teacher(student, tokenizer, kl_coef):
    engine = RolloutEngine(student, None, tokenizer)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    calls = []

    def reward(prompts, completions, answer):
        calls.append(len(completions))
        return [float(len(c) % 2) for c in completions]  # varies within groups: non-zero advantages

    config = GRPOConfig(
        samples_per_prompt=3,
        max_new_tokens=6,
        update_epochs=2,
        num_minibatches=2,
        kl_coef=kl_coef,
    )
    agent = GRPOAgent(engine, opt, config, reward=reward, generator=torch.Generator().manual_seed(0))
    assert (agent.reference is not None) == (kl_coef > 0)
    before = [p.detach().clone() for p in student.parameters()]
    stats = agent.update(EXAMPLES)
    assert calls == [6]
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    for key in (
        "train/loss",
        "train/pg_loss",
        "train/clipfrac",
        "rollout/external_reward",
        "train/kl_ref",
    ):
        assert math.isfinite(stats[key]), key
    assert stats["time/teacher"] == 0.0
    if kl_coef > 0:  # the reference is the starting student, not moved by the update
        assert all(torch.equal(a, b) for a, b in zip(before, agent.reference.parameters()))


def test_default_reward_is_exact_match(student, tokenizer):
    agent = GRPOAgent(
        RolloutEngine(student, None, tokenizer),
        torch.optim.SGD(student.parameters(), lr=0.1),
    )
    assert agent.reward.name == "exact_match"
    assert agent.config.reward is None


# --- end to end without a teacher, and GKD's Eq. 5 reward term with groups ---------------------
ROOT = Path(__file__).resolve().parents[1]


def config_file(name, tmp_path, *overrides):
    from run_helpers import save_tiny_model

    from rl_distill.config import load_config

    student = tmp_path / "student"
    if not student.is_dir():
        save_tiny_model(student)
    base = [
        f"model.student={student}",
        "model.device=cpu",
        "data.num_train=8",
        "data.num_eval=2",
        "data.options.compact=true",
        "agent.max_new_tokens=6",
        "train.steps=1",
        "train.batch_size=2",
        "train.save_every=0",
        "train.tensorboard=false",
        "train.save_final=false",
        f"train.output_dir={tmp_path / 'run'}",
        "eval.num_samples=1",
    ]
    return load_config(ROOT / "examples" / "configs" / name, [*base, *overrides])


def test_grpo_config_trains_one_step_without_loading_a_teacher(tmp_path, monkeypatch):
    import rl_distill.build as build
    from rl_distill.trainer import Trainer

    loaded = []
    real = build.load_causal_lm
    monkeypatch.setattr(
        build,
        "load_causal_lm",
        lambda path, **kw: loaded.append(str(path)) or real(path, **kw),
    )
    trainer = Trainer(config_file("grpo_arithmetic.yaml", tmp_path))
    assert trainer.run.teacher is None and trainer.engine.teacher is None
    assert loaded == [str(tmp_path / "student")]  # the student only
    result = trainer.train()
    assert result.steps == 1
    for metrics in (result.before, result.after):
        assert "eval/exact_match" in metrics and "eval/greedy/exact_match" in metrics
        assert "eval/completion_length" in metrics
        assert not any(k.endswith(("jsd", "forward_kl", "reverse_kl", "teacher_logprob")) for k in metrics)


def test_a_divergence_agent_without_a_teacher_is_a_config_error(tmp_path):
    from rl_distill.config import ConfigError, config_from_dict

    def config(**agent):
        model = {"teacher": None, "student": str(tmp_path / "student")}
        return config_from_dict({"model": model, "data": {"task": "arithmetic"}, "agent": agent})

    for agent in ("gkd", "reinforce", "ppo", "minillm"):
        with pytest.raises(
            ConfigError,
            match=rf"model.teacher: null \(no teacher\), but agent '{agent}'",
        ):
            config(name=agent)
    # SFT never calls the teacher, and SPIN and GRPO have none: allowed without one.
    assert (
        config(name="gkd", lmbda=0.0, target="one_hot", divergence="forward_kl").agent.needs_teacher is False
    )
    assert not config(name="spin").agent.needs_teacher and not config(name="grpo").agent.needs_teacher


def gkd_agent(student, teacher, tokenizer, reward, **config):
    from rl_distill.agents import GKDAgent, GKDConfig

    engine = RolloutEngine(student, teacher, tokenizer)
    cfg = GKDConfig(max_new_tokens=6, alpha=0.5, **config)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    return GKDAgent(engine, opt, cfg, reward=reward, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("baseline", "expected"),
    [
        ("leave_one_out", [1.0, -1 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0, 0.0]),
        ("batch_mean", [0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]),
        (
            "group_norm",
            [
                0.75 / (0.5 + 1e-4),
                -0.25 / (0.5 + 1e-4),
                -0.25 / (0.5 + 1e-4),
                -0.25 / (0.5 + 1e-4),
                0,
                0,
                0,
                0,
            ],
        ),
        ("none", [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_gkd_group_advantages_by_hand(student, teacher, tokenizer, baseline, expected):
    agent = gkd_agent(
        student,
        teacher,
        tokenizer,
        "exact_match",
        samples_per_prompt=4,
        baseline=baseline,
    )
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(agent.reward_advantages(rewards), torch.tensor(expected), atol=1e-5, rtol=0)


def test_gkd_groups_sample_k_per_prompt(student, teacher, tokenizer):
    seen = []

    def reward(prompts, completions, answer):
        seen.append(list(prompts))
        return [float(len(c) % 2) for c in completions]

    agent = gkd_agent(student, teacher, tokenizer, reward, samples_per_prompt=3, baseline="group_norm")
    stats = agent.update(EXAMPLES)
    assert seen == [[EXAMPLES[0].prompt] * 3 + [EXAMPLES[1].prompt] * 3]
    assert stats["rollout/on_policy_fraction"] == 1.0 and math.isfinite(stats["train/pg_loss"])
    assert len(agent.example_scores) == 2 and all(math.isfinite(v) for v in agent.example_scores)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"baseline": "group_norm"},
            "baseline 'group_norm' normalises within each prompt's group",
        ),
        ({"samples_per_prompt": 0}, "samples_per_prompt must be >= 1"),
        ({"samples_per_prompt": 2, "lmbda": 0.0, "alpha": 1.0}, "lmbda=0 gives none"),
        (
            {"samples_per_prompt": 2, "reject": {"loop_repeats": 3}},
            "reject would break them up",
        ),
    ],
)
def test_gkd_group_config_checks(overrides, message):
    from rl_distill.agents import GKDConfig

    with pytest.raises(ValueError, match=message):
        GKDConfig(**overrides)


@pytest.mark.parametrize("advantage", ["group_norm", "group_mean"])
def test_grpo_learns_a_toy_reward_without_a_teacher(tokenizer, advantage):
    """Reward: the share of '7's in a 4-character completion. A random tiny model gets ~1%; GRPO learns it."""
    from rl_distill.models import tiny_llama

    student = tiny_llama(len(tokenizer), hidden_size=32, num_layers=1, seed=0)
    engine = RolloutEngine(student, None, tokenizer)

    def sevens(prompts, completions):
        return [c.count("7") / max(1, len(c)) for c in completions]

    config = GRPOConfig(samples_per_prompt=8, max_new_tokens=4, advantage=advantage)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    agent = GRPOAgent(engine, opt, config, reward=sevens, generator=torch.Generator().manual_seed(0))
    rewards = [agent.update([Example("a"), Example("b")])["rollout/external_reward"] for _ in range(30)]
    assert sum(rewards[:5]) / 5 < 0.1 and sum(rewards[-5:]) / 5 > 0.8
