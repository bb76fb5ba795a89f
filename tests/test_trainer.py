import json
from pathlib import Path

import pytest
import torch
from run_helpers import save_tiny_model, tiny_config
from transformers import AutoModelForCausalLM

from rl_distill import checkpoint as ckpt
from rl_distill.cli import main
from rl_distill.config import config_from_dict
from rl_distill.logger import MetricsLogger, read_jsonl
from rl_distill.trainer import Trainer, TrainingAborted

README_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "onpolicy_gkd_smollm2.yaml"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "teacher", sharpen=10.0)


def test_readme_main_job_runs_through_rl_distill_train(tmp_path, teacher_dir, capsys):
    """The README's command on its example config, with a tiny teacher instead of SmolLM2."""
    overrides = [
        f"model.teacher={teacher_dir}", "model.student_layers=1", "model.device=cpu",
        "data.num_train=8", "data.num_eval=2", "agent.max_new_tokens=4", "train.steps=2",
        "train.batch_size=2", f"train.output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    assert main(["train", str(README_CONFIG), *(a for o in overrides for a in ("--set", o))]) == 0
    out = capsys.readouterr().out
    assert "held-out divergence to the teacher (2 prompts, student samples, nats/token):" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["metric", "before", "after"])
    assert [line.split()[0] for line in lines[header + 1 : header + 6]] == [
        "eval/jsd", "eval/forward_kl", "eval/reverse_kl", "eval/completion_length", "eval/teacher_logprob",
    ]  # fmt: skip
    assert "trained 2 steps in" in out and "logs and final model:" in out
    run = tmp_path / "run"
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert model.config.num_hidden_layers == 1
    assert (run / "final" / ckpt.FINAL_CONFIG).is_file() and (run / "final" / "tokenizer.json").is_file()


def test_logs_every_key_family_and_hparams_once(tmp_path, teacher_dir):
    cfg = tiny_config(
        teacher_dir, tmp_path / "run", train={"steps": 2, "eval_every": 1}, eval={"greedy": True}
    )
    Trainer(config_from_dict(cfg)).train()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    train_row = rows[1]
    for key in ("train/loss", "train/divergence", "train/grad_norm", "train/lr", "train/skipped_steps"):
        assert key in train_row, key
    for key in ("rollout/completion_length", "time/step", "time/tokens_per_s"):
        assert key in train_row, key
    for key in ("eval/jsd", "eval/exact_match", "eval/greedy/jsd", "eval/greedy/exact_match"):
        assert key in train_row, key  # eval_every=1
    hparams = json.loads((tmp_path / "run" / "hparams.json").read_text())
    assert hparams["train"]["eval_every"] == 1 and hparams["eval"]["greedy"] is True
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    # 2 samples per decoding per evaluation: before, after step 1, and after training
    assert len(samples) == 2 * 2 * 3
    assert {"prompt", "completion", "reference", "reward", "jsd"} <= set(samples[0])


def test_non_finite_steps_are_skipped_counted_and_abort_with_a_checkpoint(tmp_path, teacher_dir):
    cfg = tiny_config(teacher_dir, tmp_path / "run", train={"steps": 10, "max_consecutive_skips": 3})
    trainer = Trainer(config_from_dict(cfg))
    weights = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    score = trainer.engine.score_student
    trainer.engine.score_student = lambda rollout: score(rollout) * float("nan")
    with pytest.raises(TrainingAborted, match=r"3 consecutive steps \(up to step 3\) were skipped") as info:
        trainer.train()
    assert "checkpoint written to" in str(info.value) and "train.max_consecutive_skips" in str(info.value)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert [r["train/skipped_steps"] for r in rows] == [1.0, 2.0, 3.0]
    path = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert path.name == "step-3"
    state = ckpt.load_checkpoint(path, student=trainer.student, optimizer=trainer.optimizer)
    assert state["skipped_steps"] == 3
    assert all(torch.equal(weights[k], v) for k, v in trainer.student.state_dict().items())


def test_logger_resume_drops_rows_after_the_checkpoint(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(6):
        logger.record("train/loss", float(step))
        logger.dump(step)
    logger.close()
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 6, "train/lo')  # a line cut by a kill
    resumed = MetricsLogger(tmp_path, tensorboard=False, resume_step=3)
    resumed.record("train/loss", 40.0)
    resumed.dump(4)
    resumed.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="must start with one of"):
        MetricsLogger(None).record("loss", 1.0)


@pytest.mark.parametrize(
    ("task", "agent", "eval_reward", "expected"),
    [
        ("instructions", {}, "auto", None),
        ("arithmetic", {}, "auto", "exact_match"),
        ("factual_summary", {}, "auto", "factual_consistency"),
        (
            "instructions",
            {"alpha": 0.5, "reward": "fixtures_rewards:length_reward"},
            "auto",
            "fixtures_rewards:length_reward",
        ),
        ("arithmetic", {}, None, None),
        ("arithmetic", {}, {"name": "exact_match", "format_credit": 0.1}, "exact_match"),
    ],
)
def test_evaluation_reward_resolution(task, agent, eval_reward, expected):
    from rl_distill.trainer import build_eval_reward

    config = config_from_dict({"data": {"task": task}, "agent": agent, "eval": {"reward": eval_reward}})
    reward = build_eval_reward(config)
    assert (reward.name if reward is not None else None) == expected


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
        ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + 2**-0.5), 0.5, 0.5 * (1 - 2**-0.5)]),
    ],
)
def test_lr_factor_by_hand(schedule, expected):
    from rl_distill.trainer import lr_factor

    got = [lr_factor(s, warmup=2, total=6, schedule=schedule) for s in range(6)]
    assert got == pytest.approx(expected)


def test_trainer_follows_the_lr_schedule_and_rejects_unknown_ones(tmp_path, teacher_dir):
    cfg = tiny_config(
        teacher_dir,
        tmp_path / "run",
        train={"steps": 4, "lr": 1e-3, "warmup_steps": 0, "lr_schedule": "linear"},
    )
    cfg["train"].update(save_final=False, tensorboard=False)
    trainer = Trainer(config_from_dict(cfg))
    trainer.train()
    lrs = [row["train/lr"] for row in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/lr" in row]
    # the lr logged after update k is the one update k+1 uses: 1e-3 * (1 - k/4)
    assert lrs == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0])
    cfg["train"]["lr_schedule"] = "exponential"
    with pytest.raises(ValueError, match="lr_schedule"):
        config_from_dict(cfg)
