"""Smoke test of ``examples/curriculum_ablation.py --quick`` on a toy teacher/student built here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_writes_page_and_curriculum_starts_easy(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "examples"))
    import curriculum_ablation as ca
    import tiny_teachers

    art = tmp_path / "art"  # a seconds-long toy pair over 1-3-operation problems (not the cached one)
    tiny_teachers.main(["--task", "arithmetic", "--compact", "--steps", "1,2,3", "--num-train", "48",
                        "--num-eval", "24", "--teacher-steps", "2", "--student-steps", "2", "--batch-size", "4",
                        "--max-new-tokens", "8", "--threads", "1", "--out", str(art)])  # fmt: skip
    results = tmp_path / "results"
    ca.main(["--quick", "--artifacts", str(art), "--out", str(tmp_path / "runs"), "--results", str(results)])
    md, js, png = (results / f"curriculum_ablation.{ext}" for ext in ("md", "json", "png"))
    assert md.is_file() and js.is_file() and png.is_file()
    payload = json.loads(js.read_text())
    arms = payload["summary"]["arms"]
    assert set(arms) == {"uniform", "easy_to_hard", "frontier"}
    assert "smoke test" in md.read_text()
    # easy_to_hard starts from the shortest references: its early batches hold fewer operations.
    runs = {r["method"]: r for r in payload["runs"]}
    assert ca.mean_ops(runs["easy_to_hard"], 0.0, 0.5) < ca.mean_ops(runs["uniform"], 0.0, 0.5)
    assert arms["easy_to_hard"]["ops_drawn_first_quarter"][0] < arms["uniform"]["ops_drawn_first_quarter"][0]


def test_readme_curriculum_row_matches_the_committed_json():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = json.loads((root / "docs" / "results" / "curriculum_ablation.json").read_text())
    arms = data["summary"]["arms"]
    row = next(
        line
        for line in (root / "README.md").read_text().splitlines()
        if line.startswith("| curriculum ablation")
    )
    expected = [
        f"{data['invocation']['seconds'] / 60:.1f} min",
        f"first quarter: {arms['uniform']['hard_drawn_first_quarter'][0]:.3f} uniform, "
        f"{arms['easy_to_hard']['hard_drawn_first_quarter'][0]:.3f} easy_to_hard",
        f"(uniform {arms['uniform']['accuracy'][0]:.3f}, easy_to_hard {arms['easy_to_hard']['accuracy'][0]:.3f}, "
        f"frontier {arms['frontier']['accuracy'][0]:.3f})",
    ]
    for text in expected:
        assert text in row, text
