"""Smoke test of the toolbox ablation (examples/toolbox_ablation.py --quick): page, JSON, diagnostics, resume."""

import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from test_examples import load_example

torch.set_num_threads(1)


def test_valid_sequence_reward_is_the_labs_success_event():
    ablation = load_example("toolbox_ablation")
    reward = ablation.ValidSequenceReward(["abcd", "fedc"])
    assert reward([">"] * 4, ["abcd", "fedc", "abce", "abc"]) == [1.0, 1.0, 0.0, 0.0]


def test_toolbox_ablation_quick_writes_page_json_and_diagnostics(tmp_path, capsys):
    ablation = load_example("toolbox_ablation")
    argv = ["--quick", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "res")]
    payload = ablation.main(argv)
    res = tmp_path / "res"
    for suffix in (".md", ".json", ".png"):
        assert (res / f"toolbox_ablation{suffix}").is_file(), suffix
    arms = set(ablation.ARMS) - set(ablation.CUT)
    assert {r["method"] for r in payload["runs"]} == arms

    # Each technique's own diagnostic is logged, in range.
    by_arm = {r["method"]: r["diagnostics"] for r in payload["runs"]}
    rejected = by_arm["reject"]["rollout/filter/rejected_fraction"]
    assert 0.0 <= rejected["mean"] <= 1.0 and rejected["steps"] == 2
    assert 0.0 <= by_arm["tip_filter"]["rollout/tip_kept_fraction"]["mean"] <= 1.0
    assert by_arm["tip_weight"]["rollout/tip_weight_mean"]["mean"] >= 0.0
    assert [p[1] for p in by_arm["warmup"]["lmbda"]["trace"]] == [0.0, 1.0]  # warm-up, then on-policy
    assert {p[1] for p in by_arm["baseline"]["lmbda"]["trace"]} == {1.0}
    assert 0.0 <= by_arm["beta_ext2"]["rollout/external_reward"]["mean"] <= 1.0
    # The rejection threshold was chosen on the validation seed only.
    chosen = payload["reject_selection"]["chosen"]["4"]
    assert chosen in [c["max_perplexity"] for c in payload["reject_selection"]["candidates"]["4"]]
    assert 100 not in {r["seed"] for r in payload["runs"]}

    # The page is rendered from the JSON alone: --report-only gives the same page.
    page = (res / "toolbox_ablation.md").read_text()
    assert "## Verdicts" in page and "Model name" in page and "load average" in page
    base = payload["analysis"]["cells"]["baseline"]["4"]["expected_errors"]
    assert f"{base[0]:.3f} ± {base[1]:.3f}" in page
    ablation.main([*argv, "--report-only"])
    assert (res / "toolbox_ablation.md").read_text() == page

    # Resume: a second invocation trains nothing.
    capsys.readouterr()
    ablation.main(argv)
    out = capsys.readouterr().out
    assert "[1/" not in out and out.count("0 to run") == 3


def test_committed_page_is_the_render_of_its_json(tmp_path):
    """docs/results/toolbox_ablation.md is rebuilt byte-identically from its JSON; a number re-derived here."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "results"
    if not (docs / "toolbox_ablation.json").is_file():
        pytest.skip("no committed toolbox_ablation.json")
    shutil.copy(docs / "toolbox_ablation.json", tmp_path / "toolbox_ablation.json")
    ablation = load_example("toolbox_ablation")
    ablation.main(["--report-only", "--results", str(tmp_path)])
    page = (docs / "toolbox_ablation.md").read_text()
    assert (tmp_path / "toolbox_ablation.md").read_text() == page
    runs = json.loads((docs / "toolbox_ablation.json").read_text())["runs"]
    errs = [r["metrics"]["expected_errors"] for r in runs if r["method"] == "baseline" and r["T"] == 40]
    assert f"| `baseline` | {statistics.mean(errs):.3f} ± {statistics.stdev(errs):.3f} |" in page


def test_readme_toolbox_row_matches_the_committed_json():
    """The README quotes the ablation's T=40 numbers; they are re-derived from docs/results/toolbox_ablation.json."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = json.loads((root / "docs" / "results" / "toolbox_ablation.json").read_text())
    cells = data["analysis"]["cells"]

    def err(arm):
        return cells[arm]["40"]["expected_errors"][0]

    row = next(
        line
        for line in (root / "README.md").read_text().splitlines()
        if line.startswith("| toolbox ablation")
    )
    expected = [
        f"{data['invocation']['seconds'] / 60:.1f} min",
        f"baseline {err('baseline'):.2f}",
        f"MiniLLM {err('minillm'):.3f} vs REINFORCE {err('reinforce'):.2f}",
        f"lambda schedules ({err('warmup'):.1f}, {err('industrial'):.1f})",
        f"TIP weighting/filter ({err('tip_weight'):.1f}, {err('tip_filter'):.1f})",
        f"perplexity rejection ({err('reject'):.1f})",
        f"(beta_ext 2: {err('beta_ext2'):.2f})",
    ]
    for text in expected:
        assert text in row, text
