"""Smoke tests of the experiment scripts E1-E3 (tiny budgets; the real runs are in docs/results/)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_examples import load_example


def io_args(artifacts, tmp_path):
    """The artifacts, runs and results folders of a smoke run."""
    return [
        "--artifacts",
        str(artifacts),
        "--out",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "res"),
    ]


def make_artifacts(out, task_args):
    """Tiny (untrained) teacher and student for the smoke tests: a few SFT steps each."""
    common = "--teacher-steps 2 --student-steps 2 --batch-size 8 --max-new-tokens 8 --threads 1"
    load_example("tiny_teachers").main([*task_args.split(), *common.split(), "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def arithmetic_artifacts(tmp_path_factory):
    args = "--task arithmetic --compact --steps 1,2 --num-train 48 --num-eval 4"
    return make_artifacts(tmp_path_factory.mktemp("art") / "arithmetic", args)


@pytest.fixture(scope="module")
def factual_artifacts(tmp_path_factory):
    args = "--task factual_summary --hallucination-rate 0.5 --num-train 32 --num-eval 3"
    return make_artifacts(tmp_path_factory.mktemp("art") / "factual", args)


def test_tiny_teachers_mixed_lengths_keep_per_length_splits(arithmetic_artifacts):
    tt = load_example("tiny_teachers")
    mixed = tt.task_data("arithmetic", 0, 48, 4, digits=2, steps=[1, 2], compact=True)
    single = tt.task_data("arithmetic", 0, 48, 4, digits=2, steps=2, compact=True)
    assert [e.prompt for e in mixed.eval[4:]] == [e.prompt for e in single.eval]
    assert {tt.steps_of(e) for e in mixed.train} == {1, 2}
    assert not {e.prompt for e in mixed.eval} & {e.prompt for e in mixed.train}
    report = json.loads((arithmetic_artifacts / "report.json").read_text())
    assert set(report["teacher"]["metrics"]) == {"accuracy", "accuracy_steps1", "accuracy_steps2"}


def test_e1_smoke_and_resume(tmp_path, arithmetic_artifacts):
    e1 = load_example("e1_on_vs_off_policy")
    argv = (
        io_args(arithmetic_artifacts, tmp_path)
        + (
            "--seeds 0 --methods sft seqkd gkd_l0.5_jsd0.9 --lengths 1 2 --length-methods supervised_kd gkd_l1_fkl "
            "--train-steps 2 --batch-size 4 --workers 2"
        ).split()
    )
    data = e1.main(argv)
    runs = data["runs"]
    # main grid at length 2 (3 methods) + length grid (2 methods x 2 lengths) = 7 runs
    assert sorted((r["method"], r["length"]) for r in runs) == sorted(
        [
            ("sft", 2),
            ("seqkd", 2),
            ("gkd_l0.5_jsd0.9", 2),
            ("supervised_kd", 1),
            ("gkd_l1_fkl", 1),
            ("supervised_kd", 2),
            ("gkd_l1_fkl", 2),
        ]  # fmt: skip
    )
    for length in (1, 2):
        # same starting student, same held-out prompts and evaluation seed, in different processes
        # (the JSDs are left out: they are taken at each method's own beta)
        befores = [
            {k: v for k, v in r["before"].items() if not k.endswith("jsd")}
            for r in runs
            if r["length"] == length
        ]
        assert len(befores[0]) >= 5 and all(b == befores[0] for b in befores)
    for r in runs:
        assert 0.0 <= r["after"]["eval/greedy/exact_match"] <= 1.0
        assert r["after"]["eval/forward_kl"] >= 0.0
    for name in (
        "e1_on_vs_off_policy.md",
        "e1_on_vs_off_policy.json",
        "e1_on_vs_off_policy_methods.png",
        "e1_on_vs_off_policy_length.png",
    ):
        assert (tmp_path / "res" / name).stat().st_size > 0
    md = (tmp_path / "res" / "e1_on_vs_off_policy.md").read_text()
    assert "| gkd_l0.5_jsd0.9 |" in md and "Command:" in md
    lines = (tmp_path / "runs" / "runs.jsonl").read_text().splitlines()
    again = e1.main(argv)  # everything is in runs.jsonl: nothing reruns
    assert (tmp_path / "runs" / "runs.jsonl").read_text().splitlines() == lines
    assert [r["key"] for r in again["runs"]] == [r["key"] for r in runs]


def test_e1_method_grid_matches_the_issue():
    e1 = load_example("e1_on_vs_off_policy")
    grid = e1.methods()
    assert len(grid) == 3 + 2 * 5
    assert grid["supervised_kd"] == {"lmbda": 0.0, "off_policy": "reference", "divergence": "forward_kl"}
    assert grid["gkd_l0.5_jsd0.1"] == {"lmbda": 0.5, "divergence": "jsd", "beta": 0.1}
    assert e1.max_new_tokens(2, 2) >= len("99+99=198. 198+99=297. #### 297") + 1


def test_e2_smoke(tmp_path, factual_artifacts):
    e2 = load_example("e2_factuality")
    assert e2.rouge_n("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(0.6)
    assert e2.rouge_n("Anna Berg wrote 12 books.", "anna berg wrote 12 books") == 1.0
    assert e2.rouge_n("", "a b") == 0.0
    data = e2.main(
        io_args(factual_artifacts, tmp_path)
        + "--seeds 0 --alphas 0 1 --train-steps 2 --batch-size 4 --max-new-tokens 16 --eval-samples 2 --workers 1".split()
    )
    assert sorted(r["alpha"] for r in data["runs"]) == [0.0, 1.0]
    for r in data["runs"]:
        for decoding in ("sampled", "greedy"):
            assert 0.0 <= r["extra"][f"{decoding}/hallucination_rate"] <= 1.0
            assert 0.0 <= r["extra"][f"{decoding}/rouge2"] <= 1.0
    assert set(data["reference_points"]) == {"teacher", "student before"}
    md = (tmp_path / "res" / "e2_factuality.md").read_text()
    assert "student, alpha = 0.0" in md and "Claim" in md
    assert (tmp_path / "res" / "e2_factuality.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="alphas"):
        e2.main(["--artifacts", str(factual_artifacts), "--alphas", "1.5"])


def test_e3_smoke(tmp_path, arithmetic_artifacts):
    e3 = load_example("e3_estimators")
    data = e3.main(
        io_args(arithmetic_artifacts, tmp_path)
        + "--seeds 0 --train-steps 2 --eval-every 1 --samples 8 --grad-draws 3 --workers 1 --threads 1".split()
    )
    assert sorted(r["method"] for r in data["runs"]) == sorted(e3.METHODS)
    variance = data["variance"]
    assert variance["gkd_rkl"]["cosine_to_gkd_mean"] == pytest.approx(1.0, abs=1e-9)
    for stats in variance.values():
        assert stats["relative_variance"] >= 0.0
        assert -1.0 <= stats["mean_pairwise_cosine"] <= 1.0
    for r in data["runs"]:
        assert [row["step"] for row in r["curve"]] == [0, 1, 2]
    assert (tmp_path / "res" / "e3_curves.png").stat().st_size > 0
    # every estimator draws the same number of completions per step
    assert {e3.prompts_per_step(m, 32) * e3.METHODS[m].get("samples_per_prompt", 1) for m in e3.METHODS} == {
        32
    }


def test_e3_variance_stats_by_hand():
    e3 = load_example("e3_estimators")
    draws = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    stats = e3.variance_stats(draws, torch.tensor([1.0, 1.0], dtype=torch.float64))
    # mean (2/3, 2/3); squared deviations 5/9 + 5/9 + 2/9 = 4/3, unbiased / 2 = 2/3; ||mean||^2 = 8/9
    assert stats["relative_variance"] == pytest.approx((2 / 3) / (8 / 9))
    # pairwise cosines: 0, 1/sqrt2, 1/sqrt2 -> mean sqrt(2)/3
    assert stats["mean_pairwise_cosine"] == pytest.approx(2**0.5 / 3)
    assert stats["cosine_to_gkd_mean"] == pytest.approx(1.0)


CHILD = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
sys.path.insert(0, {examples!r})
import _experiment

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=_experiment.die_with_parent) as pool:
        print(pool.submit(os.getpid).result(), flush=True)
        pool.submit(time.sleep, 60)
        time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_pool_workers_die_with_a_killed_experiment(tmp_path):
    from test_examples import ROOT

    script = tmp_path / "child.py"
    script.write_text(CHILD.format(examples=str(ROOT / "examples")))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    for _ in range(50):  # the worker gets SIGTERM when its parent dies
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the pool worker outlived its killed parent")
