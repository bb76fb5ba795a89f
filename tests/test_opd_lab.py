"""Smoke test of the OPD lab (examples/opd_lab.py --quick): every method runs, resumes, and writes the page."""

import json

import torch
from test_examples import load_example

torch.set_num_threads(1)


def test_opd_lab_quick_runs_resumes_and_reports(tmp_path, capsys):
    lab = load_example("opd_lab")
    argv = ["--quick", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "res")]
    payload = lab.main(argv)
    res = tmp_path / "res"
    for suffix in (".md", ".json", "_scaling.png", "_exposure.png", "_modes.png", "_curves.png"):
        assert (res / f"opd_lab{suffix}").is_file(), suffix
    runs = payload["runs"]
    assert {r["method"] for r in runs} == set(lab.METHODS)
    assert {r["T"] for r in runs} == {3, 6} and {r["seed"] for r in runs} == {0, 1}
    for r in runs:
        m = r["metrics"]
        assert len(m["error_own_prefix"]) == r["T"] and 0.0 <= m["success"] <= 1.0
        assert m["expected_errors"] > 0 and r["skipped_steps"] == 0
    # Validation runs use their own seeds; the learning rate comes from them.
    assert {r["seed"] for r in payload["val_runs"]} == {100}
    assert set(payload["selection"]["chosen"]) == set(lab.METHODS)
    verdicts = payload["analysis"]["verdicts"]
    assert {v["verdict"] for v in verdicts} <= {"PASS", "FAIL", "n/a"} and len(verdicts) >= 10

    # The page is rendered from the JSON alone: --report-only gives the same page.
    page = (res / "opd_lab.md").read_text()
    assert "## Verdicts" in page and "lscpu" in page and "load average" in page
    slope = payload["analysis"]["slopes"]["supervised_kd"]["mean_std"]
    assert f"{slope[0]:.2f} ± {slope[1]:.2f}" in page
    lab.main([*argv, "--report-only"])
    assert (res / "opd_lab.md").read_text() == page

    # Resume: a second invocation finds every run in runs.jsonl and trains nothing.
    capsys.readouterr()
    lab.main(argv)
    out = capsys.readouterr().out
    assert "0 to run" in out and "[1/" not in out
    lines = (tmp_path / "runs" / "runs.jsonl").read_text().splitlines()
    assert len(lines) == len(runs) + len(payload["val_runs"])
    assert json.loads(lines[0])["key"].startswith("val|")


def test_readme_opd_lab_row_matches_the_committed_json():
    """The README quotes the lab's headline numbers; they are re-derived here from docs/results/opd_lab.json."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    lab = json.loads((root / "docs" / "results" / "opd_lab.json").read_text())
    cells, slopes = lab["analysis"]["cells"], lab["analysis"]["slopes"]
    row = next(line for line in (root / "README.md").read_text().splitlines() if line.startswith("| OPD lab"))
    expected = [
        f"{lab['invocation']['seconds'] / 60:.1f} min",
        f"wrong at {cells['supervised_kd']['40']['error_after_mistake'][0]:.3f} of the later steps",
        f"`gkd_l1_fkl`: {cells['gkd_l1_fkl']['40']['error_after_mistake'][0]:.3f}",
        f"T^{slopes['supervised_kd']['normalised_mean_std'][0]:.2f} off-policy",
        f"T^{slopes['gkd_l1_fkl']['normalised_mean_std'][0]:.2f} on-policy",
        f"({cells['supervised_kd']['40']['eps_teacher'][0]:.4f})",
        f"succeeds at T=40 ({cells['supervised_kd']['40']['success'][0]:.3f})",
        f"raw slope {slopes['gkd_l1_fkl']['mean_std'][0]:.2f} vs {slopes['supervised_kd']['mean_std'][0]:.2f}",
    ]
    for text in expected:
        assert text in row, text
