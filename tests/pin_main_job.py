"""Run the main job's first 10 steps and print its metrics as JSON (used to pin refactors).

``python tests/pin_main_job.py OUT.json`` writes the per-step training metrics (times dropped) and
the held-out evaluation before and after; ``tests/test_main_job_pin.py`` compares a fresh run with
``tests/data/main_job_10_steps.json``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from rl_distill.config import load_config
from rl_distill.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "onpolicy_gkd_smollm2.yaml"


def run_pinned(output_dir: str) -> dict:
    """Ten steps of the main job (same seeds, same data) with the evaluation before and after."""
    torch.set_num_threads(2)
    overrides = [
        "train.steps=10",
        "train.save_every=0",
        "train.tensorboard=false",
        "train.save_final=false",
        f"train.output_dir={output_dir}",
    ]
    trainer = Trainer(load_config(CONFIG, overrides))
    result = trainer.train()
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [
        {k: v for k, v in row.items() if k.startswith(("train/", "rollout/"))}
        for row in rows
        if any(k.startswith("train/") for k in row)
    ]
    return {"before": result.before, "after": result.after, "steps": steps}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        out = run_pinned(tmp)
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
