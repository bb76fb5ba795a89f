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


# --- every command, tiny budget ---------------------------------------------------------------
def test_help_documents_each_command_s_options(capsys):
    for command, options in {
        "train": ["--resume", "--set"],
        "eval": ["CHECKPOINT|CONFIG", "--out", "--config"],
        "env-check": ["--num-prompts"],
        "compare": ["--seeds", "--metric", "--out"],
        "prepare-teacher": [],
    }.items():
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert all(option in out for option in options), (command, out)
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in ("train", "eval", "env-check", "compare", "prepare-teacher"))


def test_train_resume_and_eval_commands(tmp_path, tiny_teacher_dir, capsys):
    config = write_config(tmp_path, tiny_teacher_dir, save_every=1, keep_last=2)
    assert main(["train", str(config), "--set", "train.steps=2"]) == 0
    capsys.readouterr()
    assert main(["train", str(config), "--resume", "--set", "train.steps=3"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step-2" in out
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-2", "step-3"]

    # eval on the final save_pretrained model, on a step-N checkpoint, and on a config's models
    assert main(["eval", str(tmp_path / "run" / "final"), "--set", "eval.greedy=true"]) == 0
    out = capsys.readouterr().out
    assert "eval/jsd" in out and "eval/greedy/exact_match" in out
    metrics = json.loads((tmp_path / "run" / "eval-final" / "metrics.json").read_text())
    assert metrics["eval/completion_length"] > 0 and 0.0 <= metrics["eval/exact_match"] <= 1.0
    samples = (tmp_path / "run" / "eval-final" / "samples.jsonl").read_text().splitlines()
    assert {json.loads(s)["decoding"] for s in samples} == {"sampled", "greedy"}

    assert (
        main(["eval", str(tmp_path / "run" / "checkpoints" / "step-2"), "--out", str(tmp_path / "e2")]) == 0
    )
    assert json.loads((tmp_path / "e2" / "samples.jsonl").read_text().splitlines()[0])["step"] == 2
    assert main(["eval", str(config), "--out", str(tmp_path / "e3")]) == 0
    assert (tmp_path / "e3" / "metrics.json").is_file()


def test_eval_command_on_a_plain_model_folder(tmp_path, tiny_teacher_dir, capsys):
    assert main(["eval", str(tiny_teacher_dir)]) == 2
    assert "no rl_distill run configuration" in capsys.readouterr().err
    config = write_config(tmp_path, tiny_teacher_dir)
    # The teacher evaluated as the student: zero divergence to itself.
    assert main(["eval", str(tiny_teacher_dir), "--config", str(config), "--out", str(tmp_path / "e")]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["eval/jsd"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["eval/forward_kl"] == pytest.approx(0.0, abs=1e-5)


def test_env_check_command(tmp_path, tiny_teacher_dir, capsys):
    config = write_config(tmp_path, tiny_teacher_dir)
    assert main(["env-check", str(config), "--num-prompts", "2"]) == 0
    assert "rl_distill/TokenGeneration-v0: check_env passed" in capsys.readouterr().out


def test_env_check_with_the_id_unregistered_is_a_clear_error(tmp_path, tiny_teacher_dir, monkeypatch, capsys):
    import gymnasium

    from rl_distill.envs import ENV_ID

    monkeypatch.delitem(gymnasium.envs.registry, ENV_ID)
    config = write_config(tmp_path, tiny_teacher_dir)
    assert main(["env-check", str(config)]) == 2
    err = capsys.readouterr().err
    assert "rl_distill.envs does not register 'rl_distill/TokenGeneration-v0'" in err


def test_compare_command_writes_table_and_plot(tmp_path, tiny_teacher_dir, capsys):
    on_policy = write_config(tmp_path, tiny_teacher_dir, steps=2, eval_every=1, tensorboard=False)
    supervised = tmp_path / "supervised.yaml"
    cfg = yaml.safe_load(on_policy.read_text())
    cfg["agent"].update({"lmbda": 0.0, "divergence": "forward_kl"})
    supervised.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "cmp"
    args = ["compare", str(on_policy), str(supervised), "--seeds", "0", "1", "--out", str(out)]
    assert main([*args, "--set", "train.save_final=false"]) == 0
    table = (out / "comparison.md").read_text()
    assert "| config |" in table and "| supervised |" in table and "| config-2 |" not in table
    assert table.count("±") >= 2 * 5
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "comparison.json").read_text())
    assert [step for step, _ in data["config"]["curves"]["0"]] == [0, 1, 2]
    assert (out / "supervised" / "seed-1" / "metrics.jsonl").is_file()
    assert "comparison.md" in capsys.readouterr().out
    one_run = [
        "compare",
        str(supervised),
        "--seeds",
        "0",
        "--out",
        str(tmp_path / "cmp2"),
        "--set",
        "train.steps=1",
    ]
    assert main([*one_run, "--metric", "eval/nothing"]) == 2
    assert "no run logged the metric 'eval/nothing'" in capsys.readouterr().err
