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


def test_e1_smoke_resume_and_report_only(tmp_path, arithmetic_artifacts):
    e1 = load_example("e1_on_vs_off_policy")
    argv = (
        io_args(arithmetic_artifacts, tmp_path)
        + (
            f"--student {arithmetic_artifacts / 'student'} --seeds 0 --methods gkd_l0_jsd0.5 gkd_l1_jsd0.5 "
            "--length 2 --num-distill 8 --num-val 4 --num-eval 6 --lrs 1e-3 --train-steps 1 --batch-size 2 "
            "--eval-every 1"
        ).split()
    )
    data = e1.main(argv)
    runs = data["runs"]
    assert [(r["phase"], r["method"]) for r in runs] == [
        ("sweep", "gkd_l0_jsd0.5"),
        ("sweep", "gkd_l1_jsd0.5"),
        ("grid", "gkd_l0_jsd0.5"),
        ("grid", "gkd_l1_jsd0.5"),
    ]
    assert data["chosen_lr"] == {"0": 1e-3, "1": 1e-3}
    assert data["splits"]["sizes"] == {"sft": 96, "eval": 6, "val": 4, "distill": 8}
    assert not any(data["splits"]["overlap"].values())
    for r in runs:  # the validation curve: before, every step, after
        assert [c["step"] for c in r["curve"]] == [0, 1]
    for r in runs[2:]:  # grid runs are scored on the eval split, problem by problem
        assert all(len(r["extra"][d]["correct"]) == 6 for d in ("greedy", "sampled"))
    eb = data["exposure_bias"]
    assert eb["problems"] == 6 and eb["totals"]["teacher_forced"]["tokens"] > 0
    for name in (
        "e1_on_vs_off_policy.md",
        "e1_on_vs_off_policy_exposure.png",
        "e1_on_vs_off_policy_methods.png",
    ):
        assert (tmp_path / "res" / name).stat().st_size > 0
    md = (tmp_path / "res" / "e1_on_vs_off_policy.md").read_text()
    assert "| gkd_l1_jsd0.5 |" in md and "| jsd0.5 |" in md and "**Verdict.**" in md
    lines = (tmp_path / "runs" / "runs.jsonl").read_text().splitlines()
    again = e1.main(argv)  # everything is in runs.jsonl and start.json: nothing reruns
    assert (tmp_path / "runs" / "runs.jsonl").read_text().splitlines() == lines
    assert [r["key"] for r in again["runs"]] == [r["key"] for r in runs]
    e1.main(["--report-only", "--results", str(tmp_path / "res")])
    rebuilt = (tmp_path / "res" / "e1_on_vs_off_policy.md").read_text()
    assert rebuilt.split("- Raw data")[1] == md.split("- Raw data")[1]
    # --cached-only trains nothing and names the planned runs it leaves out (here seed 1's)
    part = e1.main([*argv, "--seeds", "0", "1", "--cached-only"])
    assert (tmp_path / "runs" / "runs.jsonl").read_text().splitlines() == lines
    assert part["not_run"] == ["grid|gkd_l0_jsd0.5|lr=0.001|seed=1", "grid|gkd_l1_jsd0.5|lr=0.001|seed=1"]
    assert "**Incomplete grid**: 2 planned runs" in (tmp_path / "res" / "e1_on_vs_off_policy.md").read_text()


def test_e1_method_grid_matches_the_issue():
    e1 = load_example("e1_on_vs_off_policy")
    grid = e1.methods()
    assert e1.DEFAULT_METHODS == [
        "seqkd",
        "gkd_l0_fkl",
        "gkd_l0_rkl",
        "gkd_l0_jsd0.5",
        "gkd_l1_fkl",
        "gkd_l1_rkl",
        "gkd_l1_jsd0.5",
    ]
    assert grid["gkd_l0_fkl"] == {"lmbda": 0.0, "off_policy": "reference", "divergence": "forward_kl"}
    assert grid["gkd_l1_jsd0.5"] == {"lmbda": 1.0, "divergence": "jsd", "beta": 0.5}
    assert grid["gkd_l0.5_rkl"]["lmbda"] == 0.5 and grid["seqkd"]["off_policy"] == "teacher"
    assert e1.max_new_tokens(2, 2) >= len("99+99=198. 198+99=297. #### 297") + 1
    assert (
        e1.lr_for("seqkd", {"0": 1.0, "1": 2.0}) == 1.0
        and e1.lr_for("gkd_l1_fkl", {"0": 1.0, "1": 2.0}) == 2.0
    )


def test_e1_splits_are_disjoint_and_fresh():
    e1 = load_example("e1_on_vs_off_policy")
    sft = {
        "task": "arithmetic",
        "seed": 0,
        "num_train": 40,
        "num_eval": 4,
        "digits": 2,
        "steps": [1, 2],
        "compact": True,
    }
    spec = {"sft": sft, "length": 2, "split_seed": 7, "num_distill": 30, "num_val": 10, "num_eval": 20}
    splits = e1.make_splits(spec)
    facts = e1.split_facts(splits)
    assert facts["sizes"] == {"sft": 80, "eval": 20, "val": 10, "distill": 30}
    assert set(facts["overlap"].values()) == {0}
    tt = load_example("tiny_teachers")
    held_out = tt.task_data("arithmetic", 0, 40, 4, digits=2, steps=[1, 2], compact=True).eval
    assert not {e.prompt for e in held_out} & {
        e.prompt for k in ("distill", "val", "eval") for e in splits[k]
    }
    assert {tt.steps_of(e) for e in splits["eval"]} == {2}
    assert [e.prompt for e in e1.make_splits(spec)["eval"]] == [
        e.prompt for e in splits["eval"]
    ]  # deterministic


def test_e1_statistics_by_hand():
    e1 = load_example("e1_on_vs_off_policy")
    assert e1.step_accuracy("12+7=19. 19-5=13. #### 13") == (1, 2)
    assert e1.step_accuracy("#### 5") == (0, 0)
    from rl_distill.models import char_tokenizer

    tok = char_tokenizer()
    text = "1+2=3. 3-1=12."
    ids = torch.tensor([tok.convert_tokens_to_ids(list(text))])
    marks = e1.result_positions(ids, tok.convert_ids_to_tokens(list(range(len(tok)))))[0].tolist()
    assert "".join("r" if m else "." for m in marks) == "....rr.....rrr"  # after "=", to the closing "."
    # two seeds x four problems: per-problem means 1, .5, .5, 0 -> mean .5, sd sqrt(1/6); seeds .75 and .25
    s = e1.accuracy_summary([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert s["mean"] == 0.5 and s["seed_std"] == pytest.approx(0.5 / 2**0.5)
    assert s["ci_problems"] == pytest.approx(e1.Z975 * (1 / 6) ** 0.5 / 2)
    assert s["ci_seeds"] == pytest.approx(12.706 * (0.5 / 2**0.5) / 2**0.5)
    same = e1.paired_gain([[1, 0, 1], [0, 0, 1]], [[1, 0, 1], [0, 0, 1]], reps=50)
    assert (same["mean"], same["ci_low"], same["ci_high"], same["seed_std"]) == (0.0, 0.0, 0.0, 0.0)
    shift = e1.paired_gain([[1, 1, 1, 1]] * 3, [[0, 0, 0, 0]] * 3, reps=50)
    assert (shift["mean"], shift["ci_low"], shift["ci_high"]) == (1.0, 1.0, 1.0)
    g = e1.paired_gain([[1, 0, 1, 1], [1, 1, 0, 1]], [[0, 0, 1, 1], [1, 0, 0, 0]], reps=400)
    assert g["per_seed"] == [0.25, 0.5] and g["mean"] == 0.375 and g["ci_low"] <= 0.375 <= g["ci_high"]


def test_e1_exposure_bias_of_a_student_equal_to_its_teacher_and_of_another(arithmetic_artifacts):
    e1 = load_example("e1_on_vs_off_policy")
    examples = e1.make_splits(
        {
            "sft": e1.sft_spec(json.loads((arithmetic_artifacts / "report.json").read_text())),
            "length": 2,
            "split_seed": 3,
            "num_distill": 1,
            "num_val": 1,
            "num_eval": 5,
        }
    )["eval"]
    teacher, student, tok = load_example("_experiment").load_pair(
        str(arithmetic_artifacts / "teacher"), str(arithmetic_artifacts / "student")
    )
    self_eb = e1.exposure_bias(teacher, teacher, tok, examples, 12)
    assert self_eb["same_completion"] == 5 and self_eb["left_teacher_path"] == 0
    assert (
        self_eb["totals"]["teacher_forced"]["agree"] == 1.0
        and self_eb["totals"]["own_off_path"]["tokens"] == 0
    )
    eb = e1.exposure_bias(teacher, student.eval(), tok, examples, 12)
    pos = eb["positions"]
    # position 0 is the same state (the prompt) in both passes: same agreement, every prefix on the path
    assert pos["own_on_path"]["count"][0] == pos["teacher_forced"]["count"][0] == 5
    assert pos["own"]["agree"][0] == pos["teacher_forced"]["agree"][0]
    for n in range(12):
        assert pos["own_on_path"]["count"][n] + pos["own_off_path"]["count"][n] == pos["own"]["count"][n]


def test_e2_smoke(tmp_path, factual_artifacts):
    e2 = load_example("e2_factuality")
    assert e2.rouge_n("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(0.6)
    assert e2.rouge_n("Anna Berg wrote 12 books.", "anna berg wrote 12 books") == 1.0
    assert e2.rouge_n("", "a b") == 0.0
    data = e2.main(
        io_args(factual_artifacts, tmp_path)
        + "--seeds 0 --alphas 0 1 --train-steps 2 --batch-size 4 --max-new-tokens 16 --eval-samples 2 --workers 1"
        " --lr-sweep 1e-4 3e-4 --num-val 2 --rlef-alpha 0.5".split()
    )
    assert sorted(r["method"] for r in data["runs"]) == ["RLEF*", "alpha=0.0", "alpha=1.0"]
    sweep = data["sweep"]
    assert [row["lr"] for row in sweep["table"]] == [1e-4, 3e-4] and sweep["lr"] in (1e-4, 3e-4)
    assert {r["lr"] for r in data["runs"]} == {sweep["lr"]}
    rlef = next(r for r in data["runs"] if r["method"] == "RLEF*")
    assert rlef["job"]["teacher"] == rlef["job"]["student"] == str(factual_artifacts / "student")
    for r in data["runs"] + sweep["runs"]:
        for decoding in ("sampled", "greedy"):
            for key in (
                "hallucination_rate",
                "claim_hallucination",
                "claim_coverage",
                "rouge2",
                "rouge2_alt",
            ):
                assert 0.0 <= r["extra"][f"{decoding}/{key}"] <= 1.0
            multi = r["extra"][f"{decoding}/rouge2_multi"]
            assert (
                max(r["extra"][f"{decoding}/rouge2"], r["extra"][f"{decoding}/rouge2_alt"]) <= multi + 1e-12
            )
    # The sweep is evaluated on validation passages, the main runs on the held-out ones.
    assert {r["phase"] for r in sweep["runs"]} == {"sweep"} and {r["phase"] for r in data["runs"]} == {"main"}
    assert set(data["reference_points"]) == {
        "teacher", "student before", "teacher (validation)", "student before (validation)"
    }  # fmt: skip
    md = (tmp_path / "res" / "e2_factuality.md").read_text()
    assert "student, alpha = 0.0" in md and "RLEF* (KL to the start, alpha = 0.5)" in md and "(chosen)" in md
    assert (tmp_path / "res" / "e2_factuality.png").stat().st_size > 0
    again = e2.main(["--report-only", "--results", str(tmp_path / "res")])
    rebuilt = (tmp_path / "res" / "e2_factuality.md").read_text()
    assert again == data and rebuilt.split("- Raw data:")[1] == md.split("- Raw data:")[1]
    with pytest.raises(SystemExit, match="alphas"):
        e2.main(["--artifacts", str(factual_artifacts), "--alphas", "1.5"])


def test_e2_claim_check_and_references_by_hand():
    from rl_distill.tasks import load_task

    e2 = load_example("e2_factuality")
    source = "Anna Berg was born in Oslo in 1987. Berg later wrote 12 books."
    # Passage claims: Anna, Berg, Oslo, 1987, 12 ("Berg" twice is one claim).
    assert e2.claims(source) == {"Anna", "Berg", "Oslo", "1987", "12"}
    assert e2.claim_check("Anna Berg, born in Oslo in 1987, wrote 12 books.", source) == (False, 1.0)
    assert e2.claim_check("Anna Berg wrote 12 books.", source) == (False, 0.6)
    assert e2.claim_check("Anna Berg, born in Lima in 1987.", source) == (True, 0.6)
    assert e2.claim_check("The books: 1912.", source) == (True, 0.0)  # "12" inside "1912" is not "12"
    assert e2.claim_check("", source) == (False, 0.0)
    task = load_task("factual_summary", seed=0, num_train=40, num_eval=4, hallucination_rate=0.5)
    corrupted = [ex for ex in task.train if ex.metadata["hallucinated"]]
    for ex in corrupted[:5]:
        clean = e2.clean_reference(ex)
        assert clean != ex.reference and e2.claim_check(clean, ex.metadata["source"])[0] is False
        assert e2.claim_check(ex.reference, ex.metadata["source"])[0] is True
    for ex in task.eval:
        assert e2.clean_reference(ex) == ex.reference  # eval references are clean already
        alt = e2.alt_reference(ex)
        assert alt != ex.reference and e2.claim_check(alt, ex.metadata["source"]) == (False, 1.0)


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
