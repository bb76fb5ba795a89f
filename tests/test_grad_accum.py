"""train.grad_accum_steps (2 x B/2 == 1 x B) and train.gradient_checkpointing (cache kept, same gradient)."""

import copy

import pytest
import torch
from run_helpers import save_tiny_model, tiny_config

from rl_distill.agents import GKDAgent, GKDConfig, PPOAgent, PPOConfig, REINFORCEAgent, REINFORCEConfig
from rl_distill.config import ConfigError, config_from_dict
from rl_distill.models import char_tokenizer, tiny_llama
from rl_distill.rollout import RolloutEngine, SamplingConfig
from rl_distill.tasks import Example

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = [
    Example(prompt=f"{a}+{b}=", reference=f"{a + b}.", metadata={"answer": str(a + b)})
    for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))
]


def length_reward(prompts, completions, **_):
    return [float(len(c) % 3) for c in completions]


def models():
    tok = char_tokenizer()
    teacher = tiny_llama(len(tok) + 4, hidden_size=32, num_layers=2, seed=1)
    student = tiny_llama(len(tok) + 2, hidden_size=32, num_layers=2, seed=2)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(3.0)  # a sharper teacher: gradients far from float noise
    return teacher, student, tok


def step_delta(agent_cls, config, accum, *, reward=None):
    """The parameter change of one update with SGD(lr=1), no clipping: exactly minus the gradient."""
    teacher, student, tok = models()
    engine = RolloutEngine(student, teacher, tok, chat_template=False)
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1.0)
    agent = agent_cls(
        engine, opt, config, max_grad_norm=0.0, generator=torch.Generator().manual_seed(0), reward=reward,
        **({"grad_accum_steps": accum} if accum > 1 else {}),
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    stats = agent.update(EXAMPLES)
    after = dict(student.named_parameters())
    extra = [p.detach().clone() for p in agent.extra_parameters()]
    return {n: after[n].detach() - before[n] for n in before}, stats, extra, agent


def assert_same_step(a, b):
    (da, sa, ea, _), (db, sb, eb, _) = a, b
    assert sa["train/skipped"] == sb["train/skipped"] == 0.0
    assert max(float(d.abs().max()) for d in da.values()) > 1e-4  # the step moved the weights
    for name in da:
        torch.testing.assert_close(da[name], db[name], atol=1e-6, rtol=0, msg=name)
    for x, y in zip(ea, eb):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    torch.testing.assert_close(sa["train/loss"], sb["train/loss"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        {"lmbda": 1.0},  # on-policy GKD, JSD
        {"lmbda": 0.5, "divergence": "forward_kl"},  # mixed: an on-policy and a reference rollout
        {"lmbda": 1.0, "alpha": 0.5, "divergence": "reverse_kl"},  # Eq. 5 with a leave-one-out baseline
        {"lmbda": 0.0, "target": "one_hot", "divergence": "forward_kl"},  # SFT
    ],
    ids=["on_policy", "mixed", "eq5_rloo", "sft"],
)
def test_gkd_two_half_batches_equal_one_batch(overrides):
    config = GKDConfig(max_new_tokens=6, **overrides)
    reward = length_reward if overrides.get("alpha", 1.0) < 1 else None
    assert_same_step(
        step_delta(GKDAgent, config, 1, reward=reward), step_delta(GKDAgent, config, 2, reward=reward)
    )
    assert_same_step(
        step_delta(GKDAgent, config, 1, reward=reward), step_delta(GKDAgent, config, 4, reward=reward)
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"baseline": "leave_one_out", "samples_per_prompt": 2},
        {"baseline": "batch_mean", "samples_per_prompt": 3, "return_type": "sequence"},
        {"baseline": "value", "samples_per_prompt": 1, "alpha": 0.5, "reward": None},
    ],
    ids=["rloo", "batch_mean_sequence", "value_head_eq5"],
)
def test_reinforce_two_half_batches_equal_one_batch(overrides):
    reward = length_reward if overrides.get("alpha", 1.0) < 1 else None
    config = REINFORCEConfig(max_new_tokens=6, **overrides)
    assert_same_step(
        step_delta(REINFORCEAgent, config, 1, reward=reward),
        step_delta(REINFORCEAgent, config, 2, reward=reward),
    )


def test_micro_batches_keep_rloo_groups_whole():
    *_, agent = step_delta(REINFORCEAgent, REINFORCEConfig(max_new_tokens=2, samples_per_prompt=2), 2)
    parts = [p.tolist() for p in agent.micro_batches(6, group_size=2)]
    assert parts == [[0, 1, 2, 3], [4, 5]]
    assert [p.tolist() for p in agent.micro_batches(3)] == [[0, 1], [2]]


def test_unsupported_combinations_are_clear_errors():
    teacher, student, tok = models()
    engine = RolloutEngine(student, teacher, tok, chat_template=False)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"train.grad_accum_steps: the ppo agent does not accumulate"):
        PPOAgent(engine, opt, PPOConfig(max_new_tokens=2), grad_accum_steps=2)
    with pytest.raises(ValueError, match=r"train.grad_accum_steps.*token_weighting"):
        GKDAgent(engine, opt, GKDConfig(max_new_tokens=2, token_weighting="tip_weight"), grad_accum_steps=2)
    with pytest.raises(ValueError, match=r"train.grad_accum_steps.*norm_adv"):
        REINFORCEAgent(engine, opt, REINFORCEConfig(max_new_tokens=2, norm_adv=True), grad_accum_steps=2)
    with pytest.raises(
        ConfigError, match=r"train.grad_accum_steps: must be <= train.batch_size \(2\), got 4"
    ):
        config_from_dict({"train": {"grad_accum_steps": 4, "batch_size": 2}})
    with pytest.raises(ConfigError, match=r"train.grad_accum_steps: must be >= 1"):
        config_from_dict({"train": {"grad_accum_steps": 0}})


# --- gradient checkpointing -------------------------------------------------------------------
def checkpointed(student):
    from rl_distill.config import ModelConfig, TrainConfig
    from rl_distill.models.lora import prepare_models

    _, student = prepare_models(
        ModelConfig(), TrainConfig(gradient_checkpointing=True), None, student, torch.device("cpu")
    )
    return student


def test_gradient_checkpointing_keeps_the_kv_cache_when_sampling():
    teacher, student, tok = models()
    student = checkpointed(student).train()
    assert student.is_activation_checkpointing
    engine = RolloutEngine(student, teacher, tok, chat_template=False)
    calls = []

    def record(module, args, kwargs, output):
        calls.append(
            (kwargs["input_ids"].shape[1], kwargs.get("use_cache"), output.past_key_values is not None)
        )

    handle = student.register_forward_hook(record, with_kwargs=True)
    rollout = engine.generate(
        [ex.prompt for ex in EXAMPLES],
        SamplingConfig(max_new_tokens=5),
        generator=torch.Generator().manual_seed(0),
    )
    handle.remove()
    width = rollout.prompt_ids.shape[1]
    # One prefill over the prompts, then one token per call, each with the cache on and returned.
    assert calls[0] == (width, True, True)
    assert all(c == (1, True, True) for c in calls[1:]) and len(calls) == rollout.completion_ids.shape[1]
    assert student.training  # generate restores training mode


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradient(lora):
    from rl_distill.models.lora import LoraSpec, apply_lora

    def grads(use_checkpointing):
        teacher, student, tok = models()
        if lora:
            torch.manual_seed(0)  # lora_A's initialisation draws from the global generator
            student = apply_lora(student, LoraSpec(r=4))
            with torch.no_grad():  # B = 0 at the start would give lora_A a zero gradient
                for name, p in student.named_parameters():
                    if "lora_B" in name:
                        p.copy_(torch.linspace(-0.2, 0.2, p.numel()).view_as(p))
        if use_checkpointing:
            student = checkpointed(student)
        student.train()
        engine = RolloutEngine(student, teacher, tok, chat_template=False)
        agent = GKDAgent(
            engine,
            torch.optim.SGD(student.parameters(), lr=0.0),
            GKDConfig(max_new_tokens=6),
            generator=torch.Generator().manual_seed(0),
        )
        rollouts, n = agent.collect(EXAMPLES)
        loss, _ = agent.objective(rollouts, n)
        return torch.autograd.grad(loss, [p for p in student.parameters() if p.requires_grad])

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# --- from YAML, one trainer step ----------------------------------------------------------------
def test_grad_accum_and_checkpointing_train_a_step_from_config(tmp_path):
    from pathlib import Path

    from rl_distill.config import load_config
    from rl_distill.trainer import Trainer

    teacher = save_tiny_model(tmp_path / "teacher", num_layers=2)
    example = load_config(
        Path(__file__).resolve().parents[1] / "examples" / "configs" / "grad_accum_smollm2.yaml"
    )
    cfg = tiny_config(
        teacher,
        tmp_path / "run",
        train={
            "steps": 1,
            "batch_size": 4,
            "grad_accum_steps": example.train.grad_accum_steps,
            "gradient_checkpointing": example.train.gradient_checkpointing,
        },
    )
    assert example.train.grad_accum_steps > 1 and example.train.gradient_checkpointing
    trainer = Trainer(config_from_dict(cfg))
    before = copy.deepcopy(trainer.student.state_dict())
    result = trainer.train()
    assert result.steps == 1
    assert any(not torch.equal(before[k], v) for k, v in trainer.student.state_dict().items())
