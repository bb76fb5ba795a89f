"""Cross-tokenizer runs end to end: the config path through build_run and the trainer, and the example's smoke test."""

import json
import sys
from pathlib import Path

import pytest
from run_helpers import save_tiny_model, tiny_config

from rl_distill.config import config_from_dict
from rl_distill.models import tiny_llama
from rl_distill.models.loading import TokenizerMismatchError
from rl_distill.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import cross_tokenizer as example  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A saved char-level teacher and a saved digit-pair student."""
    root = tmp_path_factory.mktemp("xtok")
    teacher = save_tiny_model(root / "teacher", sharpen=4.0)
    tok = example.digit_pair_tokenizer()
    student = tiny_llama(len(tok), hidden_size=32, num_layers=1, seed=3)
    student.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    return teacher, root / "student"


def test_cross_tokenizer_run_trains_through_the_config(tmp_path, models):
    teacher, student = models
    raw = tiny_config(
        teacher,
        tmp_path / "run",
        model={"student": str(student), "cross_tokenizer": "uld"},
        agent={"name": "uld", "lmbda": 0.5, "max_new_tokens": 8},
        train={"steps": 2, "eval_every": 0},
        eval={"greedy": True, "sampled": False},
    )
    raw["model"].pop("student_layers")
    trainer = Trainer(config_from_dict(raw))
    run = trainer.run
    assert run.engine.teacher is None and run.cross_teacher is not None
    assert len(run.tokenizer) == len(example.digit_pair_tokenizer())  # the run's tokenizer is the student's
    assert len(run.cross_teacher.tokenizer) != len(run.tokenizer)
    result = trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/uld" in r]
    assert len(steps) == 2 and all(r["train/uld"] > 0 for r in steps)
    assert "eval/greedy/exact_match" in result.after


def test_without_the_option_the_mismatch_error_names_it(tmp_path, models):
    teacher, student = models
    raw = tiny_config(teacher, tmp_path / "run", model={"student": str(student)})
    raw["model"].pop("student_layers")
    with pytest.raises(TokenizerMismatchError, match="set model.cross_tokenizer: uld"):
        Trainer(config_from_dict(raw))


def test_quick_example_writes_its_page_and_rebuilds_it(tmp_path):
    if not (ROOT / "artifacts" / "arithmetic" / "report.json").is_file():
        pytest.skip("needs the cached arithmetic teacher (examples/tiny_teachers.py)")
    common = [
        "--student-dir", str(tmp_path / "student"),
        "--out", str(tmp_path / "runs"),
        "--results", str(tmp_path / "results"),
    ]  # fmt: skip
    payload = example.main(["--quick", *common])
    assert {r["method"] for r in payload["runs"]} == {"seqkd", "uld_on"}
    for run in payload["runs"]:
        assert set(example.DIVERGENCES[0][0:1]) <= set(run["extra"])
        assert 0.0 <= run["after"]["eval/greedy/exact_match"] <= 1.0
    page = (tmp_path / "results" / "cross_tokenizer.md").read_text()
    assert "| seqkd |" in page and "| uld_on |" in page and "Δ accuracy" in page
    assert (tmp_path / "results" / "cross_tokenizer.png").is_file()
    example.main(["--report-only", *common])
    rebuilt = (tmp_path / "results" / "cross_tokenizer.md").read_text()
    assert rebuilt.split("## Results")[1] == page.split("## Results")[1]  # the numbers come from the JSON


DOCS = ROOT / "docs" / "results"


@pytest.mark.skipif(not (DOCS / "cross_tokenizer.json").is_file(), reason="no published cross-tokenizer run")
def test_published_page_is_its_json(tmp_path):
    """The page is what ``--report-only`` makes of the committed JSON; its table matches the runs."""
    import shutil

    from rl_distill.compare import mean_std

    shutil.copy(DOCS / "cross_tokenizer.json", tmp_path / "cross_tokenizer.json")
    example.main(["--report-only", "--results", str(tmp_path)])
    page = (DOCS / "cross_tokenizer.md").read_text(encoding="utf-8")
    assert (tmp_path / "cross_tokenizer.md").read_text(encoding="utf-8") == page
    data = json.loads((DOCS / "cross_tokenizer.json").read_text(encoding="utf-8"))
    rows = {}
    for line in page.split("## Results")[1].split("## Paired")[0].splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    for method in {r["method"] for r in data["runs"]}:
        runs = [r for r in data["runs"] if r["method"] == method]
        assert len(runs) >= 3  # seeds
        acc = mean_std([r["after"]["eval/greedy/exact_match"] for r in runs])
        uld = mean_std([r["extra"]["uld"] for r in runs])
        assert rows[method][0] == f"{acc[0]:.3f} ± {acc[1]:.3f}"
        assert rows[method][1] == f"{uld[0]:.3f} ± {uld[1]:.3f}"
    assert rows["student before"][1] == f"{data['start']['uld']:.3f}"
