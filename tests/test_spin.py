"""SPIN: the DPO loss by hand (tutorial ch. 6 worked example), rounds, the saturation check, state."""

import math

import pytest
import torch

from rl_distill.agents import AGENTS, SPINAgent, SPINConfig
from rl_distill.agents.base import token_logprobs
from rl_distill.agents.spin import sequence_logprobs, spin_loss
from rl_distill.rollout import RolloutEngine
from rl_distill.tasks import Example

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = [
    Example("1+2=?", "1+2=3. #### 3", {"answer": 3}),
    Example("9-9=?", "9-9=0. #### 0", {"answer": 0}),
]


def test_registered():
    assert AGENTS["spin"] == (SPINAgent, SPINConfig)


def test_tutorial_worked_example():
    t = torch.tensor
    loss, logits = spin_loss(t([-2.3]), t([-1.8]), t([-1.5]), t([-2.5]), beta=0.1)
    assert float(logits[0]) == pytest.approx(-0.15, abs=1e-6)
    assert float(loss) == pytest.approx(0.77096, abs=1e-5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(0.15)))


def test_gradient_raises_chosen_and_lowers_rejected_and_vanishes_on_equal_sequences():
    pc, pr = (
        torch.tensor([-2.3], requires_grad=True),
        torch.tensor([-1.8], requires_grad=True),
    )
    loss, _ = spin_loss(pc, pr, torch.tensor([-1.5]), torch.tensor([-2.5]), beta=0.1)
    loss.backward()
    sig = 1 / (1 + math.exp(-0.15))  # d/dh -log sigmoid(h) = -(1 - sigmoid(h)) = -sigmoid(-h)
    assert float(pc.grad) == pytest.approx(-0.1 * sig) and float(pr.grad) == pytest.approx(0.1 * sig)
    # A sample equal to its reference: the same log-probs on both sides, so h = 0 and no gradient.
    same = torch.tensor([-3.0], requires_grad=True)
    loss, logits = spin_loss(same, same, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    loss.backward()
    assert (
        float(logits) == 0.0
        and float(same.grad) == 0.0
        and float(loss.detach()) == pytest.approx(math.log(2))
    )


def test_sequence_logprobs_sum_the_real_tokens():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 2, 0], [4, 4, 4]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    expected = (token_logprobs(logits, ids) * mask).sum(-1)
    torch.testing.assert_close(sequence_logprobs(logits, ids, mask), expected)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"beta": 0.0}, "beta must be a finite number > 0"),
        ({"round_steps": 0}, "round_steps must be >= 1"),
        ({"alpha": 0.5}, "alpha weights Eq. 5's teacher term"),
        ({"saturation_kl": -1.0}, "saturation_kl must be > 0"),
        ({"saturation_kl": 0.1, "saturation_prompts": 0}, "saturation_prompts is 0"),
    ],
)
def test_config_checks(overrides, message):
    with pytest.raises(ValueError, match=message):
        SPINConfig(**overrides)


def make_agent(student, tokenizer, **config):
    engine = RolloutEngine(student, None, tokenizer)  # SPIN needs no teacher
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    cfg = SPINConfig(max_new_tokens=8, **config)
    return SPINAgent(engine, opt, cfg, generator=torch.Generator().manual_seed(0))


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_rounds_reference_and_saturation_kl(student, tokenizer):
    agent = make_agent(student, tokenizer, round_steps=2, saturation_prompts=2)
    agent.set_heldout(EXAMPLES)
    start = params(student)
    assert agent.saturation_kl(EXAMPLES) == 0.0  # the model is its own reference
    stats = []
    for step in range(4):
        agent.set_progress(step, 4)
        stats.append(agent.update(EXAMPLES))
        if step == 0:  # round 0's reference is the starting model
            assert all(torch.equal(a, b) for a, b in zip(start, agent.reference.parameters()))
    assert [s["train/round"] for s in stats] == [0.0, 0.0, 1.0, 1.0]
    assert "rollout/spin_kl" not in stats[0] and "rollout/spin_kl" not in stats[2]
    assert stats[1]["rollout/spin_kl"] > 0 and stats[3]["rollout/spin_kl"] > 0
    # Round 1's reference is the model after step 1 (2 updates), not the start.
    assert any(not torch.equal(a, b) for a, b in zip(start, agent.reference.parameters()))
    assert all(math.isfinite(s["train/loss"]) for s in stats)
    for key in (
        "rollout/dpo_logit",
        "rollout/reward_accuracy",
        "rollout/rejected_equals_chosen",
    ):
        assert key in stats[0]


def test_saturation_stops_training_and_state_round_trips(student, tokenizer):
    agent = make_agent(student, tokenizer, round_steps=1, saturation_prompts=2, saturation_kl=1e9)
    agent.set_progress(0, 3)
    first = agent.update(EXAMPLES)
    assert first["rollout/spin_kl"] < 1e9 and agent.saturated
    frozen = params(student)
    agent.set_progress(1, 3)
    stats = agent.update(EXAMPLES)
    assert stats["train/skipped"] == 1.0 and stats["train/saturated"] == 1.0 and agent.empty_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(frozen, student.parameters()))
    # The reference and the saturation flag are agent state (checkpointed), tied weights included.
    state = agent.state_dict()
    fresh = make_agent(
        type(student)(student.config),
        tokenizer,
        round_steps=1,
        saturation_prompts=2,
        saturation_kl=1e9,
    )
    assert not fresh.saturated
    fresh.load_state_dict(state)
    assert fresh.saturated
    for a, b in zip(agent.reference.state_dict().values(), fresh.reference.state_dict().values()):
        assert torch.equal(a, b)


def test_refuses_examples_without_references(student, tokenizer):
    agent = make_agent(student, tokenizer)
    with pytest.raises(ValueError, match="chosen sequences are the dataset references"):
        agent.update([Example("1+2=?")])


def test_spin_config_trains_one_step_without_a_teacher(tmp_path):
    from pathlib import Path

    from run_helpers import save_tiny_model

    from rl_distill.config import load_config
    from rl_distill.trainer import Trainer

    student = save_tiny_model(tmp_path / "student")
    overrides = [f"model.student={student}", "model.device=cpu", "data.num_train=8", "data.num_eval=2",
                 "data.options.compact=true", "agent.max_new_tokens=6", "agent.round_steps=1",
                 "agent.saturation_prompts=2", "train.steps=1", "train.batch_size=2", "train.save_every=0",
                 "train.eval_every=0", "train.tensorboard=false", "train.save_final=false",
                 f"train.output_dir={tmp_path / 'run'}", "eval.num_samples=0"]  # fmt: skip
    config = load_config(
        Path(__file__).resolve().parents[1] / "examples" / "configs" / "spin_arithmetic.yaml",
        overrides,
    )
    trainer = Trainer(config)
    assert trainer.run.teacher is None and trainer.agent.heldout == trainer.task.eval
    result = trainer.train()
    assert result.steps == 1 and "eval/exact_match" in result.after and "eval/jsd" not in result.after
    from rl_distill.logger import read_jsonl

    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert any("rollout/spin_kl" in r for r in rows)


def test_spin_raises_the_references_likelihood_on_a_toy_task(tokenizer):
    """A random tiny model and the reference '77': rounds of SPIN make the reference likely."""
    from rl_distill.models import tiny_llama

    student = tiny_llama(len(tokenizer), hidden_size=32, num_layers=1, seed=0)
    engine = RolloutEngine(student, None, tokenizer)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    config = SPINConfig(max_new_tokens=4, round_steps=10, saturation_prompts=2)
    agent = SPINAgent(engine, opt, config, generator=torch.Generator().manual_seed(0))
    examples = [Example("a", "77"), Example("b", "77")]
    chosen = engine.from_completions([ex.prompt for ex in examples], [ex.reference for ex in examples])
    with torch.no_grad():
        start = float(agent.sequence_logprobs_of(student, chosen).mean())
    logits = []
    for step in range(30):
        agent.set_progress(step, 30)
        logits.append(agent.update(examples)["rollout/dpo_logit"])
    with torch.no_grad():
        end = float(agent.sequence_logprobs_of(student, chosen).mean())
    assert start < -8 and end > -2  # log p(reference): from about -10 to above -2
    assert sum(logits) / len(logits) > 0  # the model prefers the references more than each round's reference
