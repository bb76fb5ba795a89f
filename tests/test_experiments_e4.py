"""Smoke test of experiment E4 (``examples/e4_smollm2.py``) with a tiny budget on the real SmolLM2 teacher."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACC = "eval/greedy/exact_match"


def smollm2_missing() -> str | None:
    """Why the built-in SmolLM2 teacher cannot be loaded here (None when it can)."""
    from rl_distill.models import smollm2_gguf_path
    from rl_distill.models.builtin import SMOLLM2_NAME, cache_dir

    if (cache_dir() / SMOLLM2_NAME / "model.safetensors").is_file():
        return None
    try:
        smollm2_gguf_path()  # not converted yet, but convertible on first use
    except FileNotFoundError as err:
        return f"SmolLM2 teacher not prepared (run `make install` or `rl-distill prepare-teacher`): {err}"
    return None


def load_e4():
    spec = importlib.util.spec_from_file_location("e4_smollm2", ROOT / "examples" / "e4_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_e4_smoke_report_and_resume(tmp_path, capsys):
    reason = smollm2_missing()
    if reason is not None:
        pytest.skip(reason)
    e4 = load_e4()
    results, out = tmp_path / "results", tmp_path / "out"
    argv = ["--out", str(out), "--results", str(results), "--steps", "2", "--batch-size", "1", "--k", "2",
            "--num-train", "4", "--num-val", "2", "--num-eval", "3", "--warm-steps", "1", "--warm-batch-size", "2",
            "--student-layers", "2", "--eval-samples", "2", "--seeds", "0", "--alphas", "1", "0.5",
            "--threads", "1"]  # fmt: skip
    data = e4.main(argv)

    for suffix in ("md", "json", "png"):
        assert (results / f"e4_smollm2.{suffix}").stat().st_size > 0
    saved = json.loads((results / "e4_smollm2.json").read_text())
    runs, teacher, warm = saved["runs"], saved["teacher"], saved["warm"]
    assert sorted((r["alpha"], r["seed"]) for r in runs) == [(0.5, 0), (1.0, 0)]
    assert teacher["n"] == 3 and teacher["n_val"] == 2 and 0.0 <= teacher["accuracy"] <= 1.0
    assert "train_completions" not in teacher  # cached in runs/, not published
    for who in ("fresh", "warm"):
        assert len(warm[who]["greedy_per_prompt"]) == 3 and len(warm[who]["sampled_per_prompt"]) == 3
        # Two samples per prompt: each prompt's sampled accuracy is 0, 0.5 or 1.
        assert set(warm[who]["sampled_per_prompt"]) <= {0.0, 0.5, 1.0}
    for run in runs:
        assert run["job"]["student"] == str(out / "warm" / "model")
        assert run["job"]["agent"]["samples_per_prompt"] == 2 and run["job"]["model"] == {
            "chat_template": False
        }
        extra = run["extra"]
        assert extra["greedy"] == sum(extra["greedy_per_prompt"]) / 3
        assert [p["step"] for p in extra["train_curve"]] == [1, 2]
        rewards = [p["reward"] for p in extra["train_curve"]]
        # The verifier reward is only computed when it enters the loss (alpha < 1).
        assert (
            all(r is None for r in rewards) if run["alpha"] == 1.0 else all(0.0 <= r <= 1.0 for r in rewards)
        )
        for key in ("eval/jsd", "eval/forward_kl", "eval/reverse_kl"):
            assert math.isfinite(run["after"][key]) and run["after"][key] > -1e-6
    # Every run starts from the same warm student: identical "before" metrics.
    assert runs[0]["before"] == pytest.approx(runs[1]["before"])
    md = (results / "e4_smollm2.md").read_text()
    assert "student after warm-up (start of every run)" in md and "RL + GKD (alpha=0.5)" in md
    assert "chance: always the most frequent answer" in md

    # Resuming: nothing is retrained; teacher pass and warm student are reused from the cache.
    log = (out / "runs.jsonl").read_text()
    mtimes = [(out / f).stat().st_mtime_ns for f in ("teacher.json", "warm.json", "warm/model/config.json")]
    capsys.readouterr()
    again = e4.main(argv)
    assert "2 already in" in capsys.readouterr().out
    assert (out / "runs.jsonl").read_text() == log
    assert [
        (out / f).stat().st_mtime_ns for f in ("teacher.json", "warm.json", "warm/model/config.json")
    ] == mtimes
    assert again["runs"] == data["runs"]

    # Other settings in the same --out are refused instead of being mixed in.
    with pytest.raises(SystemExit, match="other settings"):
        e4.main([*argv, "--lr", "0.001"])


# --- statistics and baselines, by hand (no model) ---------------------------------------------------
def test_wilson_interval_by_hand():
    e4 = load_e4()
    # p = 0.5, n = 10, z = 1.96: centre 0.5, half = z*sqrt(0.025 + z^2/400)/(1 + z^2/10) = 0.2634.
    lo, hi = e4.wilson(5, 10)
    assert lo == pytest.approx(0.5 - 0.26340, abs=1e-4) and hi == pytest.approx(0.5 + 0.26340, abs=1e-4)
    # 0 of 200: the interval starts at 0 and its upper end is z^2/(n + z^2) = 0.01884.
    assert e4.wilson(0, 200) == pytest.approx((0.0, 3.8415 / 203.8415), abs=1e-5)
    assert e4.wilson(200, 200)[1] == pytest.approx(1.0) and e4.wilson(200, 200)[0] == pytest.approx(
        200 / 203.8415
    )
    with pytest.raises(ValueError, match="n must be >= 1"):
        e4.wilson(0, 0)


def test_paired_change_and_mean_ci_by_hand():
    e4 = load_e4()
    # Differences (1, 0, 0, 1, -1, 0): mean 1/6, sample variance (4*(1/6)^2... ) computed directly.
    diffs = [1.0, 0.0, 0.0, 1.0, -1.0, 0.0]
    mean = 1 / 6
    var = sum((d - mean) ** 2 for d in diffs) / 5
    assert e4.mean_ci(diffs) == pytest.approx((mean, 1.959964 * math.sqrt(var / 6)))
    run = {"extra": {"greedy_per_prompt": [1, 1, 0, 1, 0, 0]}}
    warm = {"greedy_per_prompt": [0, 1, 0, 0, 1, 0]}
    assert e4.paired_change(run, warm, "greedy") == pytest.approx(e4.mean_ci(diffs))
    with pytest.raises(ValueError, match="at least 2"):
        e4.mean_ci([1.0])


def test_chance_baselines_by_hand():
    from rl_distill.tasks import Example

    e4 = load_e4()

    def ex(a, answer):
        return Example(prompt=f"{a} + 1 =", metadata={"answer": answer, "equation": f"{a}+1"})

    examples = [ex(5, 6), ex(7, 8), ex(5, 6), ex(9, 9)]  # the last "answer" equals its first operand
    assert e4.chance_baselines(examples) == {"most_frequent": 0.5, "first_operand": 0.25}


def test_e4_flags_are_checked():
    e4 = load_e4()
    with pytest.raises(SystemExit):
        e4.parse_args(["--k", "1", "--alphas", "0.5"])  # leave-one-out needs k >= 2
    with pytest.raises(SystemExit):
        e4.parse_args(["--alphas", "1.5"])
    with pytest.raises(SystemExit):
        e4.parse_args(["--num-eval", "1"])
    assert e4.parse_args(["--fixed-b", "0"]).fixed_b is None
    assert e4.parse_layers("0,5,29") == [0, 5, 29] and e4.parse_layers("12") == 12
