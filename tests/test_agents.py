"""What the agents share: the registry, configs (and the config layer), rewards, learning a tiny teacher."""

import dataclasses
import math

import pytest
import torch

from rl_distill.agents import AGENTS, GKDAgent, GKDConfig, PPOConfig, REINFORCEAgent, REINFORCEConfig
from rl_distill.agents.base import AgentConfig, select_rows
from rl_distill.config import ConfigError, build_dataclass
from rl_distill.evaluation import heldout_divergence
from rl_distill.models import char_tokenizer, tiny_llama
from rl_distill.rewards import CheckedReward, RewardError
from rl_distill.rollout import RolloutEngine, SamplingConfig
from rl_distill.tasks import Example

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_names_and_configs():
    assert {"gkd", "reinforce", "ppo"} <= set(AGENTS)
    shared = {f.name for f in dataclasses.fields(AgentConfig)}
    assert shared == {
        "alpha",
        "reward",
        "temperature",
        "top_k",
        "top_p",
        "max_new_tokens",
        "beta_ext",
        "teacher_temperature",
    }
    for name, (cls, config_cls) in AGENTS.items():
        assert cls.name == name and cls.config_cls is config_cls
        assert issubclass(config_cls, AgentConfig), name
        config = config_cls()  # defaults are valid
        assert config.alpha == 1.0 and config.reward is None
        assert config.sampling == SamplingConfig(32, 1.0, 0, 1.0)
        # The shared checks run in every agent's config (super().__post_init__()).
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
            config_cls(alpha=1.5)
        with pytest.raises(ValueError, match="temperature must be > 0"):
            config_cls(temperature=0.0)
    assert GKDConfig(beta=0.9).eval_beta == 0.9 and REINFORCEConfig().eval_beta == 0.5


def test_an_agent_refuses_a_config_not_derived_from_the_base(engine):
    @dataclasses.dataclass
    class Loose:
        alpha: float = 1.0

    with pytest.raises(TypeError, match="needs a config derived from AgentConfig, got Loose"):
        GKDAgent(engine, torch.optim.SGD(engine.student.parameters(), lr=0.1), Loose())


@pytest.mark.parametrize("config_cls", [AgentConfig, GKDConfig, REINFORCEConfig, PPOConfig])
def test_every_config_field_has_a_docstring(config_cls):
    import ast
    import inspect
    import textwrap

    own, inherited = set(), set()
    for cls in config_cls.__mro__:
        if not dataclasses.is_dataclass(cls):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        documented = {
            node.target.id
            for node, nxt in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        }
        (own if cls is config_cls else inherited).update(documented)
    assert own | inherited == {f.name for f in dataclasses.fields(config_cls)}
    assert not own & {f.name for f in dataclasses.fields(AgentConfig)} or config_cls is AgentConfig


@pytest.mark.parametrize(
    ("config_cls", "overrides", "message"),
    [
        (REINFORCEConfig, {"alpha": 2}, r"alpha must be in \[0, 1\], got 2"),
        (REINFORCEConfig, {"gamma": -0.1}, r"gamma must be in \[0, 1\]"),
        (REINFORCEConfig, {"samples_per_prompt": 0}, "samples_per_prompt must be >= 1"),
        (
            REINFORCEConfig,
            {"samples_per_prompt": 1},
            "baseline 'leave_one_out' needs samples_per_prompt >= 2",
        ),
        (REINFORCEConfig, {"baseline": "median"}, "baseline must be"),
        (REINFORCEConfig, {"return_type": "tokens"}, "return_type must be"),
        (REINFORCEConfig, {"vf_coef": -1.0}, "vf_coef must be >= 0"),
        (REINFORCEConfig, {"value_lr": 0.0}, "value_lr must be > 0"),
        (REINFORCEConfig, {"temperature": 0.0}, "temperature must be > 0"),
        (REINFORCEConfig, {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        (REINFORCEConfig, {"reward": 1.5}, "reward must be a name"),
        (PPOConfig, {"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        (PPOConfig, {"gae_lambda": 2.0}, r"gae_lambda must be in \[0, 1\]"),
        (PPOConfig, {"update_epochs": 0}, "update_epochs must be >= 1"),
        (PPOConfig, {"num_minibatches": 0}, "num_minibatches must be >= 1"),
        (PPOConfig, {"clip_coef": 0.0}, "clip_coef must be > 0"),
        (PPOConfig, {"ent_coef": -0.01}, "ent_coef must be >= 0"),
        (PPOConfig, {"target_kl": 0.0}, "target_kl must be > 0 or None"),
        (PPOConfig, {"reward_clip": -1.0}, "reward_clip must be > 0 or None"),
        (PPOConfig, {"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ],
)
def test_config_range_checks(config_cls, overrides, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        config_cls(**overrides)


def test_the_config_layer_prefixes_the_section():
    with pytest.raises(ConfigError, match=r"^agent\.alpha must be in \[0, 1\], got 2"):
        build_dataclass(PPOConfig, {"alpha": 2}, "agent")
    with pytest.raises(ConfigError, match=r"^agent\.baseline 'leave_one_out' needs samples_per_prompt"):
        build_dataclass(REINFORCEConfig, {"samples_per_prompt": 1}, "agent")
    config = build_dataclass(
        REINFORCEConfig,
        {"alpha": 0.5, "reward": {"name": "exact_match", "answer_format": "last_number"}},
        "agent",
    )
    assert config.reward == {"name": "exact_match", "answer_format": "last_number"}


# --- rewards -------------------------------------------------------------------------------
def test_reward_spec_is_resolved_when_the_agent_is_built(engine):
    opt = torch.optim.SGD(engine.student.parameters(), lr=0.0)
    config = REINFORCEConfig(alpha=0.5, reward="exact_match", samples_per_prompt=2, max_new_tokens=4)
    agent = REINFORCEAgent(engine, opt, config, generator=torch.Generator().manual_seed(0))
    assert isinstance(agent.reward, CheckedReward) and agent.reward.name == "exact_match"
    rollout, external = agent.collect([Example("1+1=", metadata={"answer": "2"})])
    assert external.shape == (2,) and set(external.tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="unknown reward"):
        REINFORCEAgent(engine, opt, REINFORCEConfig(alpha=0.5, reward="no_such_reward"))
    # A callable passed to the constructor wins over the config's spec.
    agent = REINFORCEAgent(engine, opt, config, reward=lambda p, c, **_: [0.5] * len(c))
    assert agent.external_rewards([Example("a")], select_rows(rollout, torch.tensor([0]))).tolist() == [0.5]


def test_bad_reward_outputs_and_metadata_clashes_are_clear_errors(engine):
    opt = torch.optim.SGD(engine.student.parameters(), lr=0.0)
    config = REINFORCEConfig(alpha=0.5, samples_per_prompt=2, max_new_tokens=4)
    agent = REINFORCEAgent(engine, opt, config, reward=lambda p, c, **_: [float("nan")] * len(c))
    with pytest.raises(RewardError, match="non-finite"):
        agent.collect([Example("a")])
    agent = REINFORCEAgent(engine, opt, config, reward=lambda p, c, **_: [0.0] * len(c))
    with pytest.raises(ValueError, match="metadata key 'name' clashes"):
        agent.collect([Example("a", metadata={"name": "x"})])


def test_select_rows_trims_padding():
    from rl_distill.rollout import Rollout

    prompt_ids = torch.tensor([[0, 0, 5], [6, 7, 8]])
    prompt_mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    ids = torch.tensor([[4, 2, 0], [4, 4, 2]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    r = Rollout(prompt_ids, prompt_mask, ids, mask, torch.zeros(2, 3), teacher_logprobs=torch.ones(2, 3))
    sub = select_rows(r, torch.tensor([0]))
    assert sub.prompt_ids.tolist() == [[5]] and sub.completion_ids.tolist() == [[4, 2]]
    assert sub.teacher_logprobs.shape == (1, 2)


# --- every agent learns a tiny teacher ----------------------------------------------------------
def peaked_teacher_that_does_not_stop(tok):
    """A sharp teacher (several nats of reverse KL to learn) that gives EOS almost no mass.

    With EOS unlikely under the teacher, stopping early costs the student dearly, so the sum form of
    Eq. 5 (REINFORCE, PPO) and the per-token mean of Eq. 2 (GKD, the evaluation) agree on what to learn.
    """
    teacher = tiny_llama(len(tok), hidden_size=32, num_layers=2, seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20.0)
    eos = tok.eos_token_id

    def lower_eos(module, inputs, logits):
        return logits.index_add(-1, torch.tensor([eos]), torch.full((*logits.shape[:-1], 1), -30.0))

    teacher.lm_head.register_forward_hook(lower_eos)
    return teacher


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("gkd", {}),
        ("reinforce", {"samples_per_prompt": 4}),
        ("reinforce", {"samples_per_prompt": 2, "baseline": "value", "return_type": "sequence"}),
        ("ppo", {"update_epochs": 2, "num_minibatches": 2}),
    ],
)
def test_each_agent_lowers_the_heldout_divergence(name, overrides):
    tok = char_tokenizer("0123456789+-=")
    teacher = peaked_teacher_that_does_not_stop(tok)
    student = tiny_llama(len(tok), hidden_size=32, num_layers=1, seed=2)
    engine = RolloutEngine(student, teacher, tok)
    agent_cls, config_cls = AGENTS[name]
    agent = agent_cls(
        engine,
        torch.optim.Adam(student.parameters(), lr=3e-3),
        config_cls(max_new_tokens=6, **overrides),
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
    assert after["eval/jsd"] < before["eval/jsd"], (before, after)


def test_multi_process_hooks_average_the_value_head_and_shared_decisions(engine):
    """With Accelerate and several processes, the value head's gradients and PPO's stop are all-reduced."""
    from rl_distill.agents import PPOAgent

    class TwoProcesses:  # the parts of accelerate.Accelerator the agents use
        num_processes = 2

        def __init__(self):
            self.reduced = []

        def backward(self, loss):
            loss.backward()

        def reduce(self, tensor, reduction="sum"):
            self.reduced.append((tuple(tensor.shape), reduction))
            return tensor

    acc = TwoProcesses()
    agent = PPOAgent(
        engine,
        torch.optim.SGD(engine.student.parameters(), lr=1e-3),
        PPOConfig(max_new_tokens=4, update_epochs=2, target_kl=10.0),
        accelerator=acc,
        generator=torch.Generator().manual_seed(0),
    )
    agent.update([Example("ab"), Example("cd")])
    shapes = {shape for shape, reduction in acc.reduced if reduction == "mean"}
    assert {tuple(p.shape) for p in agent.extra_parameters()} <= shapes  # value-head gradients
    assert () in shapes  # the finite-loss check and approx_kl
