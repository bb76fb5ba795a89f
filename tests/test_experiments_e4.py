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
    argv = ["--out", str(out), "--results", str(results), "--steps", "2", "--batch-size", "2",
            "--num-eval", "3", "--eval-batch-size", "3", "--num-train", "8", "--max-new-tokens", "8",
            "--seeds", "0", "--alphas", "1", "0.5", "--threads", "1"]  # fmt: skip
    data = e4.main(argv)

    for suffix in ("md", "json", "png"):
        assert (results / f"e4_smollm2.{suffix}").stat().st_size > 0
    saved = json.loads((results / "e4_smollm2.json").read_text())
    runs = saved["runs"]
    assert sorted((r["alpha"], r["seed"]) for r in runs) == [(0.5, 0), (1.0, 0)]
    for run in runs:
        for phase in ("before", "after"):
            metrics = run[phase]
            assert 0.0 <= metrics[ACC] <= 1.0 and 0.0 <= metrics["eval/exact_match"] <= 1.0
            for key in ("eval/jsd", "eval/forward_kl", "eval/reverse_kl"):
                assert math.isfinite(metrics[key]) and metrics[key] > -1e-6
        assert [p["step"] for p in run["extra"]["train_curve"]] == [1, 2]
        rewards = [p["reward"] for p in run["extra"]["train_curve"]]
        # The verifier reward is only computed when it enters the loss (alpha < 1).
        assert (
            all(r is None for r in rewards) if run["alpha"] == 1.0 else all(0.0 <= r <= 1.0 for r in rewards)
        )
        assert run["job"]["model"] == {"student_layers": 6}
    # Same starting student and evaluation seed: identical "before" metrics in every run.
    assert runs[0]["before"] == pytest.approx(runs[1]["before"])
    # Training moved the student (on-policy GKD lowers the divergence it minimises, even in 2 steps).
    gkd = next(r for r in runs if r["alpha"] == 1.0)
    assert gkd["after"]["eval/jsd"] != gkd["before"]["eval/jsd"]
    teacher = saved["teacher"]
    assert 0.0 <= teacher["accuracy"] <= 1.0 and teacher["n"] == 3
    md = (results / "e4_smollm2.md").read_text()
    assert "teacher (SmolLM2-135M-Instruct)" in md and "RL + GKD (alpha=0.5)" in md

    # Resuming: nothing is retrained, the teacher reference is reused from the cache.
    log = (out / "runs.jsonl").read_text()
    teacher_mtime = (out / "teacher.json").stat().st_mtime_ns
    capsys.readouterr()
    again = e4.main(argv)
    assert "2 already in" in capsys.readouterr().out
    assert (out / "runs.jsonl").read_text() == log
    assert (out / "teacher.json").stat().st_mtime_ns == teacher_mtime
    assert again["runs"] == data["runs"]

    # Other settings in the same --out are refused instead of being mixed in.
    with pytest.raises(SystemExit, match="other settings"):
        e4.main([*argv, "--lr", "0.001"])
