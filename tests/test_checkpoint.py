import json
import random
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from run_helpers import cli_command, final_weights, save_tiny_model, subprocess_env, tiny_config, write_yaml

from rl_distill import checkpoint as ckpt
from rl_distill.config import config_from_dict
from rl_distill.trainer import Trainer


def _complete(path, step):
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": step, "format": 1}))


def test_atomic_directory_leaves_target_untouched_on_failure(tmp_path):
    target = tmp_path / "step-1"
    with ckpt.atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), ckpt.atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("second, half written")
        raise RuntimeError("killed mid-save")
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]


def test_only_complete_step_dirs_are_read_and_leftovers_are_removed(tmp_path):
    _complete(tmp_path / "step-2", 2)
    _complete(tmp_path / "step-10", 10)
    (tmp_path / "step-12").mkdir()  # no meta.json: never produced by a save, and never read
    (tmp_path / ".tmp-step-14-abc").mkdir()  # a save killed before its rename
    (tmp_path / ".tmp-step-14-abc" / "student.safetensors").write_bytes(b"\0" * 10)
    (tmp_path / ".old-step-2-99").mkdir()  # a prune killed before its delete
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 10]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-10"
    removed = ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".old-step-2-99", ".tmp-step-14-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-10", "step-12", "step-2"]
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _complete(tmp_path / f"step-{step}", step)
    ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3", "step-4"]


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    gen = torch.Generator().manual_seed(7)
    torch.save(ckpt.capture_rng(gen), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(2).tolist(), torch.rand(2, generator=gen).tolist())
    ckpt.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True), gen)
    again = (random.random(), np.random.rand(), torch.rand(2).tolist(), torch.rand(2, generator=gen).tolist())
    assert first == again


@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "teacher", sharpen=30.0)


def _train(cfg, **kwargs):
    threads = torch.get_num_threads()
    try:
        return Trainer(config_from_dict(cfg)).train(**kwargs)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "agent",
    [
        {"name": "gkd", "lmbda": 0.5},  # coin flips, student samples and references
        {"name": "ppo", "num_minibatches": 2, "update_epochs": 2},  # value head: extra parameters
    ],
    ids=["gkd", "ppo"],
)
def test_resume_in_process_equals_an_uninterrupted_run(tmp_path, sharp_teacher, agent):
    def cfg(out, steps):
        return tiny_config(
            sharp_teacher,
            out,
            agent=agent,
            train={"steps": steps, "save_every": 2, "keep_last": 1, "threads": 1},
        )

    _train(cfg(tmp_path / "straight", 5))
    _train(cfg(tmp_path / "split", 3))  # checkpoints at step 2 (kept) ...
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "split" / "checkpoints")] == [2]
    result = _train(cfg(tmp_path / "split", 5), resume=True)  # ... resumed from step 2, not 3
    assert result.resumed_from.name == "step-2" and result.steps == 5
    straight, split = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert all(torch.equal(straight[k], split[k]) for k in straight)
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [
        1,
        2,
        3,
        4,
        5,
    ]  # step 3 of the first run dropped
    if agent["name"] == "ppo":
        files = {p.name for p in (tmp_path / "split" / "checkpoints" / "step-4").iterdir()}
        assert "extra.safetensors" in files


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, sharp_teacher):
    """A training process killed with SIGKILL after its first checkpoint resumes to the same weights."""
    cfg = tiny_config(
        sharp_teacher,
        tmp_path / "killed",
        agent={"lmbda": 1.0},  # on-policy: the sampling generator's state must be restored
        train={"steps": 40, "save_every": 4, "keep_last": 2, "threads": 1, "tensorboard": False},
        eval={"num_samples": 0},
    )
    killed_cfg = write_yaml(tmp_path / "killed.yaml", cfg)
    env = subprocess_env()
    victim = subprocess.Popen(
        cli_command("train", killed_cfg), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    root = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 600  # generous: a loaded CI machine starts slowly
    while ckpt.latest_checkpoint(root) is None and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final").exists(), "the run finished before it could be killed"
    # Whatever the kill interrupted, every step-N folder resume could read is complete.
    for step, path in ckpt.list_checkpoints(root):
        files = {p.name for p in path.iterdir()}
        assert {
            "student.safetensors",
            "optimizer.pt",
            "trainer_state.pt",
            "config.yaml",
            "meta.json",
        } <= files
        assert ckpt.read_meta(path)["step"] == step
    (root / ".tmp-step-999-junk").mkdir()  # a save that was cut short: hidden, ignored, cleaned
    (root / ".tmp-step-999-junk" / "student.safetensors").write_bytes(b"garbage")

    resumed = subprocess.run(
        cli_command("train", killed_cfg, "--resume"), env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "step-999" not in resumed.stdout
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    cfg["train"]["output_dir"] = str(tmp_path / "straight")
    _train(cfg)  # the uninterrupted run, in this process (one thread, like the subprocesses)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
