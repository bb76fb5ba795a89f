"""Runs never mix; damaged checkpoints fall back; Ctrl-C checkpoints (issue #12, robustness 1-3)."""

import json
import signal
import subprocess
import time

import pytest
import torch
from run_helpers import cli_command, save_tiny_model, subprocess_env, tiny_config, write_yaml

from rl_distill import checkpoint as ckpt
from rl_distill.cli import main
from rl_distill.compare import compare
from rl_distill.config import config_from_dict
from rl_distill.trainer import OutputDirInUseError, Trainer


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "teacher", sharpen=30.0)


def _cfg(teacher_dir, out, **train):
    return tiny_config(
        teacher_dir,
        out,
        train={"steps": 4, "save_every": 2, "keep_last": 2, "threads": 1, "tensorboard": False, **train},
        eval={"num_samples": 0},
    )


def _train(cfg, **kwargs):
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(config_from_dict(cfg))
        return trainer, trainer.train(**kwargs)
    finally:
        torch.set_num_threads(threads)


# --- 1. runs never mix -----------------------------------------------------------------------
def test_a_fresh_run_refuses_a_folder_holding_another_run(tmp_path, teacher_dir):
    out = tmp_path / "run"
    _train(_cfg(teacher_dir, out))
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(OutputDirInUseError, match=r"already holds a run \(run.json, metrics.jsonl.*--resume"):
        _train(_cfg(teacher_dir, out))
    assert (out / "metrics.jsonl").read_text() == before  # nothing of the old run was touched
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2, 4]


def test_overwrite_moves_the_old_run_aside_and_keeps_other_files(tmp_path, teacher_dir):
    out = tmp_path / "run"
    _, first = _train(_cfg(teacher_dir, out))
    old_id = json.loads((out / "run.json").read_text())["run_id"]
    (out / "notes.txt").write_text("mine")
    _train(_cfg(teacher_dir, out, overwrite=True, steps=2))
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run-old-")]
    assert json.loads((aside / "run.json").read_text())["run_id"] == old_id
    assert [s for s, _ in ckpt.list_checkpoints(aside / "checkpoints")] == [2, 4]
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2]
    assert (out / "notes.txt").read_text() == "mine"
    new_id = json.loads((out / "run.json").read_text())["run_id"]
    assert new_id != old_id and ckpt.read_meta(out / "checkpoints" / "step-2")["run_id"] == new_id


def test_resume_refuses_a_checkpoint_of_another_run_or_configuration(tmp_path, teacher_dir):
    out = tmp_path / "run"
    _train(_cfg(teacher_dir, out, steps=2))
    (out / "run.json").write_text(json.dumps({"run_id": "someone-else"}))
    with pytest.raises(OutputDirInUseError, match="belongs to run .* but .*run.json is run someone-else"):
        _train(_cfg(teacher_dir, out, steps=4), resume=True)
    (out / "run.json").unlink()  # an older run folder without run.json: adopts the checkpoint's id
    changed = _cfg(teacher_dir, out, steps=4)
    changed["agent"]["beta"] = 0.9
    changed["train"]["lr"] = 5e-4
    with pytest.raises(
        OutputDirInUseError, match=r"another configuration \(agent.beta: 0.5 -> 0.9; train.lr"
    ):
        _train(changed, resume=True)
    trainer, result = _train(_cfg(teacher_dir, out, steps=4), resume=True)  # the budget may grow
    assert result.resumed_from.name == "step-2" and result.steps == 4
    assert json.loads((out / "run.json").read_text())["run_id"] == trainer.run_id


def test_resume_without_a_checkpoint_says_it_starts_fresh(tmp_path, teacher_dir, capsys):
    _, result = _train(_cfg(teacher_dir, tmp_path / "run", steps=1, save_every=0), resume=True)
    assert result.resumed_from is None
    assert (
        f"--resume: no checkpoint in {tmp_path / 'run' / 'checkpoints'}; starting fresh"
        in capsys.readouterr().out
    )


def test_compare_refuses_an_out_folder_with_a_previous_comparison(tmp_path, teacher_dir):
    config = write_yaml(tmp_path / "a.yaml", _cfg(teacher_dir, tmp_path / "unused", steps=1, save_every=0))
    out = tmp_path / "cmp"
    (out / "a" / "seed-0").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"already holds a comparison \(a\)"):
        compare([config], [0], out_dir=out, overrides=["train.save_final=false"])


# --- 2. damaged checkpoints fall back ------------------------------------------------------
def _two_checkpoints(tmp_path, teacher_dir):
    out = tmp_path / "run"
    _train(_cfg(teacher_dir, out, steps=4))
    return out, out / "checkpoints" / "step-2", out / "checkpoints" / "step-4"


def test_checkpoint_meta_records_run_id_hash_and_sizes(tmp_path, teacher_dir):
    out, _, step4 = _two_checkpoints(tmp_path, teacher_dir)
    meta = ckpt.read_meta(step4)
    assert meta["format"] == 2 and meta["run_id"] == json.loads((out / "run.json").read_text())["run_id"]
    assert meta["files"] == {p.name: p.stat().st_size for p in step4.iterdir() if p.name != "meta.json"}
    assert len(meta["config_hash"]) == 16 and ckpt.validate_checkpoint(step4) is None


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _rig_missing_optimizer(p):
    (p / "optimizer.pt").unlink()


def _rig_size(p):
    with open(p / "trainer_state.pt", "ab") as fh:
        fh.write(b"x")


def _rig_header(p):
    (p / "student.safetensors").write_bytes(b"\xff" * 8 + b"{}")


def _rig_meta(p):
    (p / "meta.json").write_text("{not json")


@pytest.mark.parametrize(
    ("rig", "problem"),
    [
        (lambda p: _truncate(p / "student.safetensors"), "student.safetensors has"),
        (_rig_missing_optimizer, "optimizer.pt is missing"),
        (_rig_size, "trainer_state.pt has"),
        (_rig_header, "student.safetensors has"),
        (_rig_meta, "meta.json is not valid"),
        (lambda p: (p / "meta.json").unlink(), "meta.json is missing"),
    ],
    ids=["truncated-weights", "missing-file", "size", "header", "meta", "no-meta"],
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, teacher_dir, capsys, rig, problem):
    out, step2, step4 = _two_checkpoints(tmp_path, teacher_dir)
    rig(step4)
    assert problem in ckpt.validate_checkpoint(step4)
    assert ckpt.latest_usable_checkpoint(out / "checkpoints") == step2
    capsys.readouterr()
    _, result = _train(_cfg(teacher_dir, out, steps=4), resume=True)
    assert result.resumed_from == step2 and result.steps == 4
    printed = capsys.readouterr().out
    assert f"checkpoint {step4} is damaged ({problem}" in printed


def test_safetensors_header_check_sees_truncated_data(tmp_path):
    # A well-formed header whose tensor data runs past the end of the file.
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    blob = struct.pack("<Q", len(header)) + header + b"\0" * 8
    path = tmp_path / "student.safetensors"
    path.write_bytes(blob)
    assert "truncated" in ckpt._safetensors_problem(path)


def test_all_checkpoints_damaged_is_one_clear_error(tmp_path, teacher_dir, capsys):
    out, step2, step4 = _two_checkpoints(tmp_path, teacher_dir)
    _truncate(step2 / "student.safetensors")
    _truncate(step4 / "student.safetensors")
    config = write_yaml(tmp_path / "c.yaml", _cfg(teacher_dir, out, steps=4))
    assert main(["train", str(config), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "step-4: student.safetensors has" in err
    assert "continue with --resume" not in err  # never points at a broken checkpoint


def test_atomic_write_text_replaces_and_leaves_no_temporaries(tmp_path):
    ckpt.atomic_write_text(tmp_path / "run.json", "a")
    ckpt.atomic_write_text(tmp_path / "run.json", "b")
    assert (tmp_path / "run.json").read_text() == "b" and [p.name for p in tmp_path.iterdir()] == ["run.json"]


# --- 3. Ctrl-C --------------------------------------------------------------------------------
def test_ctrl_c_checkpoints_the_step_and_exits_with_one_line(tmp_path, teacher_dir):
    cfg = _cfg(teacher_dir, tmp_path / "run", steps=400, save_every=0)
    config = write_yaml(tmp_path / "c.yaml", cfg)
    proc = subprocess.Popen(
        cli_command("train", config),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and '"train/loss"' in metrics.read_text():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.startswith("rl-distill:")]
    assert len(lines) == 1 and "interrupted (Ctrl-C) after step" in lines[0] and "--resume" in lines[0]
    assert "Traceback" not in err
    (path,) = [p for _, p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert ckpt.validate_checkpoint(path) is None and f"checkpoint written to {path}" in lines[0]
