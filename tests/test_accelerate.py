"""Scale-out with Hugging Face Accelerate: two CPU processes (gloo) equal one process with the same global batch.

``accelerate launch --cpu --num_processes 2`` starts a single process unless MPI is available
(Accelerate's multi-CPU launcher is mpirun); ``--multi_gpu --num_processes 2`` uses torch's elastic
launcher, which works on CPU too: with ``model.device: cpu`` every process creates a CPU Accelerator
and the process group uses gloo. ``--use_fsdp --fsdp_version 2`` (instead of ``--multi_gpu``) shards
teacher and student with FSDP2 over the same gloo group.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import (
    final_weights,
    free_port,
    run_launcher,
    save_tiny_model,
    subprocess_env,
    tiny_config,
    write_yaml,
)

from rl_distill.config import config_from_dict
from rl_distill.distributed import Distributed, warn_if_single_cpu_launch
from rl_distill.trainer import Trainer

ACCELERATE = Path(sys.executable).with_name("accelerate")
LR = 1e-3


def _supervised_kd(teacher, out, batch_size):
    """Off-policy (lambda = 0) forward KL on references: no sampling, so both runs see the same sequences."""
    return tiny_config(
        teacher,
        out,
        agent={"lmbda": 0.0, "divergence": "forward_kl"},
        train={"steps": 1, "batch_size": batch_size, "lr": LR, "threads": 1, "tensorboard": False},
        eval={"num_samples": 0},
    )


def _greedy_on_policy(teacher, out, batch_size, steps):
    """On-policy GKD whose samples do not depend on the random stream (top_k = 1), saved every step.

    Each process samples with its own generator; with top-k 1 every stream draws the same tokens, so
    two processes of batch 2 see exactly the completions one process of batch 4 sees.
    """
    return tiny_config(
        teacher,
        out,
        agent={"lmbda": 1.0, "divergence": "forward_kl", "top_k": 1},
        train={
            "steps": steps,
            "batch_size": batch_size,
            "lr": LR,
            "threads": 1,
            "tensorboard": False,
            "save_every": 1,
        },
        eval={"num_samples": 0, "sampled": False, "greedy": True},
    )


def _losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [row["train/loss"] for row in rows if "train/loss" in row]


def _train_in_process(cfg):
    threads = torch.get_num_threads()
    try:
        Trainer(config_from_dict(cfg)).train()
    finally:
        torch.set_num_threads(threads)
    return final_weights(cfg["train"]["output_dir"])


@pytest.mark.skipif(not ACCELERATE.exists(), reason="the accelerate CLI is not installed next to this Python")
def test_two_processes_first_update_matches_one_process_with_the_same_global_batch(tmp_path):
    teacher = save_tiny_model(tmp_path / "teacher", sharpen=30.0)
    two = write_yaml(tmp_path / "two.yaml", _supervised_kd(teacher, tmp_path / "two", batch_size=2))
    cmd = [
        str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "rl_distill.cli", "train", str(two),
    ]  # fmt: skip
    run = run_launcher(cmd, env=subprocess_env(), timeout=300, clean=[tmp_path / "two"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("held-out divergence") == 1  # only the main process reports

    one = _train_in_process(_supervised_kd(teacher, tmp_path / "one", batch_size=4))
    shard = _train_in_process(_supervised_kd(teacher, tmp_path / "shard", batch_size=2))  # rank 0's half only
    both = final_weights(tmp_path / "two")
    initial = Trainer(config_from_dict(_supervised_kd(teacher, tmp_path / "x", 4))).student.state_dict()

    assert max(float((one[k] - initial[k]).abs().max()) for k in one) > LR / 2  # a real update happened
    assert all(torch.allclose(one[k], both[k], rtol=0, atol=1e-5) for k in one)  # all-reduced gradients
    assert not all(torch.allclose(shard[k], both[k], rtol=0, atol=1e-5) for k in shard)


@pytest.mark.skipif(not ACCELERATE.exists(), reason="the accelerate CLI is not installed next to this Python")
def test_fsdp_two_processes_train_like_one_process_and_resume_from_a_sharded_checkpoint(tmp_path):
    teacher = save_tiny_model(tmp_path / "teacher", sharpen=30.0)
    launch = [
        str(ACCELERATE), "launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    ]  # fmt: skip

    def fsdp_run(steps, *extra):
        cfg = write_yaml(
            tmp_path / f"fsdp{steps}.yaml", _greedy_on_policy(teacher, tmp_path / "fsdp", 2, steps)
        )
        port = ["--main_process_port", str(free_port())]
        cmd = [*launch, *port, "-m", "rl_distill.cli", "train", str(cfg), *extra]
        # The first run may be retried from scratch; the resumed one must not lose its checkpoint.
        clean = [] if "--resume" in extra else [tmp_path / "fsdp"]
        run = run_launcher(cmd, env=subprocess_env(), timeout=300, clean=clean, attempts=4 if clean else 1)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "sharded over 2 processes" in run.stdout
        return final_weights(tmp_path / "fsdp")

    sharded = fsdp_run(2)
    one = _train_in_process(_greedy_on_policy(teacher, tmp_path / "one", 4, 2))
    initial = Trainer(config_from_dict(_greedy_on_policy(teacher, tmp_path / "x", 4, 2))).student.state_dict()
    assert max(float((one[k] - initial[k]).abs().max()) for k in one) > LR / 2  # real updates happened
    assert sorted(sharded) == sorted(one)  # final/ holds the full, unsharded weights
    assert all(torch.allclose(one[k], sharded[k], rtol=0, atol=1e-5) for k in one)
    assert _losses(tmp_path / "fsdp") == pytest.approx(_losses(tmp_path / "one"), abs=1e-5)

    # One more step from the step-2 checkpoint, loaded into the sharded student and optimizer.
    resumed = fsdp_run(3, "--resume")
    three = _train_in_process(_greedy_on_policy(teacher, tmp_path / "three", 4, 3))
    assert all(torch.allclose(three[k], resumed[k], rtol=0, atol=1e-5) for k in three)
    assert not all(torch.allclose(one[k], resumed[k], rtol=0, atol=1e-5) for k in one)
    assert _losses(tmp_path / "fsdp") == pytest.approx(_losses(tmp_path / "three"), abs=1e-5)


def test_batches_are_shards_of_the_one_process_batch(tmp_path):
    teacher = save_tiny_model(tmp_path / "teacher")
    single = Trainer(config_from_dict(_supervised_kd(teacher, tmp_path / "a", batch_size=4)))
    ranks = [
        Trainer(config_from_dict(_supervised_kd(teacher, tmp_path / "b", batch_size=2))) for _ in range(2)
    ]
    for rank, trainer in enumerate(ranks):  # what each of two processes would do
        trainer.dist = Distributed(None, rank, 2, torch.device("cpu"))
    for _ in range(5):  # across an epoch boundary (16 examples, 4 per step)
        whole = [ex.prompt for ex in single.next_batch()]
        assert [ex.prompt for r in ranks for ex in r.next_batch()] == whole


def test_cpu_launch_that_started_one_process_says_so(monkeypatch):
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.warns(UserWarning, match="started only this one"):
        warn_if_single_cpu_launch()
    with pytest.warns(UserWarning, match="--multi_gpu --num_processes N"):
        assert Distributed.setup("cpu").world_size == 1
