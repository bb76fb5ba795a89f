"""Bad inputs fail with a clear message before any work, and never corrupt a checkpoint."""

import pytest
from run_helpers import save_tiny_model, tiny_config, write_yaml

from rl_distill import checkpoint as ckpt
from rl_distill.cli import main


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "teacher")


def _run(tmp_path, cfg, *args):
    return main(["train", str(write_yaml(tmp_path / "cfg.yaml", cfg)), *args])


def test_empty_prompt_file(tmp_path, teacher_dir, capsys):
    (tmp_path / "prompts.jsonl").write_text("\n\n")
    data = {"task": "jsonl", "options": {"path": str(tmp_path / "prompts.jsonl")}}
    assert _run(tmp_path, tiny_config(teacher_dir, tmp_path / "run", data=data)) == 2
    assert "prompts.jsonl' has no examples (the file is empty or blank)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_student_path(tmp_path, teacher_dir, capsys):
    cfg = tiny_config(teacher_dir, tmp_path / "run", model={"student": str(tmp_path / "no-student")})
    assert _run(tmp_path, cfg) == 2
    assert f"model path '{tmp_path / 'no-student'}' does not exist" in capsys.readouterr().err


def test_mismatched_tokenizers(tmp_path, teacher_dir, capsys):
    student = save_tiny_model(tmp_path / "student", num_layers=1, chars="abcdefghij0123456789+-=?")
    assert _run(tmp_path, tiny_config(teacher_dir, tmp_path / "run", model={"student": str(student)})) == 2
    err = capsys.readouterr().err
    assert "teacher and student must share a tokenizer" in err and "vocabulary sizes differ" in err


def test_prompt_longer_than_the_context(tmp_path, capsys):
    teacher = save_tiny_model(tmp_path / "short", max_positions=24)
    lines = [f'{{"prompt": "{i}+{i}=?"}}' for i in range(10)] + ['{"prompt": "' + "1+" * 12 + '1=?"}']
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    data = {
        "task": "jsonl",
        "num_train": 9,
        "num_eval": 2,
        "options": {"path": str(tmp_path / "prompts.jsonl")},
    }
    assert _run(tmp_path, tiny_config(teacher, tmp_path / "run", data=data)) == 2
    err = capsys.readouterr().err
    assert "with max_new_tokens=6 it exceeds the models' context length 24" in err
    assert "1+1+1+" in err


def test_a_reward_that_raises_leaves_checkpoints_intact(tmp_path, teacher_dir, capsys):
    cfg = tiny_config(teacher_dir, tmp_path / "run", train={"steps": 2, "save_every": 1, "keep_last": 2})
    assert _run(tmp_path, cfg) == 0
    root = tmp_path / "run" / "checkpoints"
    before = {p.name: {f.name: f.read_bytes() for f in p.iterdir()} for _, p in ckpt.list_checkpoints(root)}
    cfg["train"].update({"steps": 4, "eval_every": 3})
    cfg["eval"]["reward"] = "fixtures_rewards:failing_reward"
    assert _run(tmp_path, cfg, "--resume", "--allow-code") == 2
    err = capsys.readouterr().err
    assert "reward 'fixtures_rewards:failing_reward' raised KeyError: 'facts'" in err
    assert f"latest usable checkpoint: {root / 'step-2'} (continue with --resume)" in err
    after = {p.name: {f.name: f.read_bytes() for f in p.iterdir()} for _, p in ckpt.list_checkpoints(root)}
    assert after == before and not [p for p in root.iterdir() if p.name.startswith(".")]
    cfg["eval"]["reward"] = "auto"
    assert _run(tmp_path, cfg, "--resume") == 0  # the fixed config resumes from the intact checkpoint
    assert "resumed from" in capsys.readouterr().out
