"""Smoke test of benchmarks/env_overhead.py: the whole benchmark with tiny sizes."""

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "env_overhead.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("env_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_env_overhead_benchmark_runs_and_writes_json(tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "env_overhead.json"
    args = ["--tiny-hidden", "16", "--tiny-layers", "2", "--student-layers", "1", "--batch-size", "2"]
    args += ["--max-new-tokens", "3", "--warmup", "0", "--repeats", "2", "--threads", "1", "--out", str(out)]
    try:
        result = load_benchmark().main(args)
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["setup"]["batch_size"] == 2 and result["setup"]["student_layers"] == 1
    assert len(result["env"]["rounds"]) == len(result["floor"]["rounds"]) == 2
    assert result["env"]["tokens"] == 2 * 3  # every env step yields one real token per row
    assert 0 < result["floor"]["tokens"] <= 2 * 3
    assert result["env"]["tokens_per_s"] > 0 and result["floor"]["tokens_per_s"] > 0
    assert result["time_ratio_env_over_floor"] > 0


def test_bf16_teacher_only_the_teacher_changes_dtype():
    import argparse

    bench = load_benchmark()
    args = bench.parse_args(["--tiny-hidden", "16", "--tiny-layers", "2", "--teacher-dtype", "bfloat16"])
    teacher, student, _, prompts = bench.build(args)
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in student.parameters()} == {torch.float32}  # kept layers copied before the cast
    assert isinstance(args, argparse.Namespace) and prompts


def test_teacher_step_variants_are_recorded_and_reported(tmp_path):
    """``--teacher-step``: the shipped fused step, native products only, oneDNN, the model's forward; the report."""
    from benchmarks import report_round2
    from rl_distill.rollout.native import few_row_kernel

    bench = load_benchmark()
    threads = torch.get_num_threads()
    base = ["--tiny-hidden", "16", "--tiny-layers", "2", "--student-layers", "1", "--batch-size", "2"]
    base += ["--max-new-tokens", "3", "--warmup", "0", "--repeats", "1", "--threads", "1"]
    sections = {}
    try:
        variants = (
            ("env", "fused"),
            ("env_products", "products"),
            ("env_onednn", "onednn"),
            ("env_forward", "forward"),
        )
        for name, step in variants:
            sections[name] = bench.main([*base, "--teacher-step", step])
    finally:
        torch.set_num_threads(threads)
    setups = {name: r["setup"] for name, r in sections.items()}
    assert setups["env"]["fused_step_used"] and setups["env_onednn"]["fused_step_used"]
    assert not setups["env_forward"]["fused_step_used"]
    assert setups["env"]["native_kernel_used"] == (few_row_kernel() is not None)
    assert not setups["env_onednn"]["native_kernel_used"] and not setups["env_forward"]["native_kernel_used"]
    assert setups["env"]["native_layers_used"] == (few_row_kernel() is not None)
    assert setups["env_products"]["native_kernel_used"] == (few_row_kernel() is not None)
    assert not setups["env_products"]["native_layers_used"] and not setups["env_onednn"]["native_layers_used"]
    (tmp_path / "perf_round2.json").write_text(json.dumps(sections))
    block = report_round2.env_block(tmp_path)
    assert all(f"section `{name}`" in block for name in ("env_products", "env_onednn", "env_forward"))
    lever = report_round2._fused_step_lever(sections)
    assert len(lever) == 1 and lever[0].startswith("8. **The environment teacher's fused decode step")
    assert "with only its products native" in lever[0]
    assert report_round2._fused_step_lever({"env": sections["env"]}) == []
