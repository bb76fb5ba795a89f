import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from rl_distill.cli import main
from rl_distill.models import char_tokenizer, tiny_llama


@pytest.fixture
def tiny_teacher_dir(tmp_path):
    tok = char_tokenizer()
    model = tiny_llama(len(tok), hidden_size=32, num_layers=2, seed=0)
    path = tmp_path / "teacher"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_config(tmp_path, teacher_dir, **train):
    cfg = {
        "model": {"teacher": str(teacher_dir), "student_layers": 1, "device": "cpu"},
        "data": {"task": "arithmetic", "num_train": 16, "num_eval": 4, "options": {"compact": True}},
        "agent": {"name": "gkd", "divergence": "jsd", "beta": 0.5, "max_new_tokens": 6},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "output_dir": str(tmp_path / "run"), **train},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_command_smoke(tmp_path, tiny_teacher_dir, capsys):
    config = write_config(tmp_path, tiny_teacher_dir)
    assert main(["train", str(config), "--set", "train.steps=2"]) == 0
    out = capsys.readouterr().out
    assert "eval/jsd" in out and "before" in out and "after" in out
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval/jsd" in rows[0]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())
    assert json.loads((run / "hparams.json").read_text())["agent"]["name"] == "gkd"
    final = AutoModelForCausalLM.from_pretrained(run / "final")  # plain Transformers loading
    assert final.config.num_hidden_layers == 1
    assert torch.isfinite(next(final.parameters())).all()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".tmp")]


def test_train_command_reports_bad_config(tmp_path, tiny_teacher_dir, capsys):
    config = write_config(tmp_path, tiny_teacher_dir)
    assert main(["train", str(config), "--set", "agent.beta=2"]) == 2
    assert "agent.beta must be in [0, 1]" in capsys.readouterr().err


def test_train_command_reports_missing_model(tmp_path, capsys):
    config = write_config(tmp_path, tmp_path / "no-such-teacher")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "no-such-teacher" in err and "does not exist" in err


def test_help_documents_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "train" in out and "prepare-teacher" in out
