"""Smoke test of ``examples/curriculum_ablation.py --quick`` (needs the cached arithmetic pair)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts" / "arithmetic"

pytestmark = pytest.mark.skipif(
    not (ARTIFACTS / "teacher").is_dir() or not (ARTIFACTS / "student").is_dir(),
    reason="needs the cached tiny arithmetic teacher and student (examples/tiny_teachers.py)",
)


def test_quick_writes_page_and_curriculum_starts_easy(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "examples"))
    import curriculum_ablation as ca

    results = tmp_path / "results"
    ca.main(["--quick", "--out", str(tmp_path / "runs"), "--results", str(results)])
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
