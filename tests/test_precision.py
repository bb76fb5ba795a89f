"""train.precision (autocast, float32 master weights) and model.teacher_dtype."""

import math

import pytest
import torch
from run_helpers import save_tiny_model, tiny_config

from rl_distill.agents import GKDAgent, GKDConfig
from rl_distill.config import ConfigError, config_from_dict, load_config
from rl_distill.divergences import divergence
from rl_distill.models import char_tokenizer, tiny_llama
from rl_distill.precision import PrecisionError, autocast, check_precision
from rl_distill.rollout import RolloutEngine
from rl_distill.tasks import Example

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = [Example(prompt=f"{a}+{b}=", reference=f"{a + b}.") for a, b in ((1, 2), (3, 4), (5, 6))]


def agent_on_tiny(**cfg):
    tok = char_tokenizer()
    teacher = tiny_llama(len(tok) + 4, hidden_size=32, num_layers=2, seed=1)
    student = tiny_llama(len(tok) + 2, hidden_size=32, num_layers=2, seed=2)
    engine = RolloutEngine(student, teacher, tok, chat_template=False)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    return GKDAgent(
        engine, opt, GKDConfig(max_new_tokens=8, **cfg), generator=torch.Generator().manual_seed(0)
    )


@pytest.mark.parametrize(
    "cfg",
    [
        {"lmbda": 1.0, "divergence": "jsd"},
        {"lmbda": 0.0, "divergence": "forward_kl"},
        {"lmbda": 1.0, "divergence": "reverse_kl"},
        {"lmbda": 0.0, "target": "one_hot", "divergence": "forward_kl"},  # -inf target columns
    ],
    ids=["jsd", "forward_kl", "reverse_kl", "sft_one_hot"],
)
def test_bf16_autocast_loss_is_close_to_float32(cfg):
    agent = agent_on_tiny(**cfg)
    rollouts, n = agent.collect(EXAMPLES)  # the same sequences for both precisions
    loss32, _ = agent.objective(rollouts, n)
    with autocast("bf16", "cpu"):
        assert agent.engine.score_student(rollouts[0]).dtype == torch.bfloat16  # autocast is on
        loss16, _ = agent.objective(rollouts, n)
    assert loss16.dtype == torch.float32  # the divergence's log-space math stays float32
    assert math.isfinite(float(loss16.detach()))
    assert float(loss16.detach()) == pytest.approx(float(loss32.detach()), rel=3e-2, abs=1e-3)
    grads = torch.autograd.grad(loss16, list(agent.student.parameters()))
    assert all(torch.isfinite(g).all() for g in grads) and all(g.dtype == torch.float32 for g in grads)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_minus_inf_columns_give_no_nan_under_autocast(name):
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 11, generator=gen)
    teacher[..., 7:] = float("-inf")  # columns the teacher never emits (padding, filtered tokens)
    student = torch.randn(2, 5, 11, generator=gen)
    if name == "reverse_kl":  # KL(pS || pT) is finite only where pS has no mass outside pT's support
        student[..., 7:] = float("-inf")
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    exact = divergence(name, teacher, student, mask, beta=0.5)
    s16 = student.to(torch.bfloat16).requires_grad_(True)
    with autocast("bf16", "cpu"):
        low = divergence(name, teacher.to(torch.bfloat16), s16, mask, beta=0.5)
    low.backward()
    assert torch.isfinite(low) and torch.isfinite(s16.grad).all()
    assert float(low.detach()) == pytest.approx(float(exact), rel=3e-2, abs=1e-3)


def test_a_precision_the_device_cannot_run_names_the_field(monkeypatch):
    check_precision("fp32", "cpu")
    check_precision("bf16", "cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(
        PrecisionError,
        match=r"^train.precision: 'bf16' cannot run on device cuda \(this GPU does not support bfloat16\)",
    ):
        check_precision("bf16", "cuda")
    with pytest.raises(PrecisionError, match=r"^train.precision: 'fp16' cannot run on device meta"):
        check_precision("fp16", "meta")
    with pytest.raises(
        ConfigError, match=r"train.precision: expected one of 'fp32', 'bf16', 'fp16', got 'fp8'"
    ):
        config_from_dict({"train": {"precision": "fp8"}})
    with pytest.raises(ConfigError, match=r"model.teacher_dtype: expected"):
        config_from_dict({"model": {"teacher_dtype": "int8"}})


# --- from YAML, one trainer step ----------------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_a_step_with_float32_master_weights(tmp_path, precision):
    from pathlib import Path

    from rl_distill.trainer import Trainer

    example = load_config(Path(__file__).resolve().parents[1] / "examples" / "configs" / "bf16_smollm2.yaml")
    assert example.train.precision == "bf16" and example.model.teacher_dtype == "bfloat16"
    teacher = save_tiny_model(tmp_path / "teacher", num_layers=2)
    cfg = tiny_config(
        teacher,
        tmp_path / "run",
        train={"steps": 2, "precision": precision, "save_every": 1},
        model={"teacher_dtype": example.model.teacher_dtype},
    )
    trainer = Trainer(config_from_dict(cfg))
    assert next(trainer.run.teacher.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.student.parameters())
    result = trainer.train()
    assert result.steps == 2 and all(math.isfinite(v) for v in result.after.values())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.student.parameters())
    if precision == "fp16":  # the loss scale is part of the checkpoint
        state = torch.load(
            tmp_path / "run" / "checkpoints" / "step-2" / "trainer_state.pt", weights_only=True
        )
        assert "grad_scaler" in state and state["grad_scaler"]["scale"] > 0
