import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task", ["arithmetic", "factual_summary"])
def test_tiny_teachers_smoke(tmp_path, task):
    mod = load_example("tiny_teachers")
    argv = ["--task", task, "--out", str(tmp_path / task), "--num-train", "32", "--num-eval", "4",
            "--teacher-steps", "3", "--student-steps", "2", "--batch-size", "8", "--max-new-tokens", "8",
            "--threads", "1"]  # fmt: skip
    report = mod.main(argv)
    metric = "accuracy" if task == "arithmetic" else "factuality"
    assert 0.0 <= report["teacher"]["metrics"][metric] <= 1.0
    assert json.loads((tmp_path / task / "report.json").read_text())["task"] == task
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / task / "teacher").config.num_hidden_layers == 4
    again = mod.main(argv)  # reused, not retrained
    assert again == json.loads((tmp_path / task / "report.json").read_text())
