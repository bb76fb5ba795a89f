"""Write ``docs/results/lora_precision.md`` from the raw JSON of the LoRA / bf16 measurements.

Inputs (both in ``benchmarks/results/``): ``lora_memory.json`` (``python benchmarks/lora_memory.py
--steps 3 --out benchmarks/results/lora_memory.json``) and, when present, ``bf16_main_job.json``
(the main job trained with ``train.precision: bf16`` and a bf16 teacher: ``python -m
benchmarks.report_lora --record-main-job runs/bf16_smollm2/summary.json`` copies its summary there).
Every number on the page is read from these files::

    python -m benchmarks.report_lora            # (re)write the page
    python -m benchmarks.report_lora --check    # exit 1 if the page differs from what the JSON gives
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "results" / "lora_precision.md"
#: The held-out metrics compared between the float32 and the bf16 main job.
METRICS = ("eval/jsd", "eval/forward_kl", "eval/reverse_kl")


def render(
    bench: dict[str, Any], main_job: dict[str, Any] | None, fp32_job: dict[str, Any] | None = None
) -> str:
    """The page's markdown."""
    m = bench["machine"]
    lines = [
        "# LoRA and mixed precision: memory, speed, quality",
        "",
        f"- Command: `python benchmarks/lora_memory.py --steps {bench['steps']} --out benchmarks/results/lora_memory.json`",
        f"- Machine: {m['cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB, torch {m['torch']}, "
        f"transformers {m['transformers']}, {m['torch_threads']} threads; load average before "
        f"{m['load_average'][0]:.2f}, after {m['load_average_after'][0]:.2f} (the machine was shared: "
        "read the timings as indicative)",
        f"- Setting: {bench['model']} -> {bench['student_layers']}-layer kept-layer student, on-policy GKD "
        f"JSD(0.5), batch {bench['batch_size']}, {bench['max_new_tokens']} new tokens, LoRA r = {bench['lora_r']}; "
        f"{bench['warmup']} warm-up step(s), then {bench['steps']} timed steps per variant, each variant in a "
        "fresh process",
        "- Raw data: [`benchmarks/results/lora_memory.json`](../../benchmarks/results/lora_memory.json)",
        "",
        "| variant | s/step (median) | min-max | tokens/s | RSS after warm-up (MiB) | peak extra RSS (MiB) "
        "| trainable parameters | optimizer state (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in bench["variants"]:
        s = r["s_per_step"]
        lines.append(
            f"| `{r['variant']}` | {s['median']:.2f} | {s['min']:.2f}-{s['max']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['rss_after_warmup_mib']:.0f} | {r['peak_extra_rss_mib']:.0f} | {r['trainable_params']:,} | "
            f"{r['optimizer_state_mib']:.1f} |"
        )
    lines += ["", "Ratios (first over second):", ""]
    for name, ratio in bench["ratios"].items():
        lines.append(
            f"- {name}: s/step x{ratio['s_per_step']:.2f}, peak extra RSS x{ratio['peak_extra_rss']:.2f}, "
            f"RSS after warm-up x{ratio['rss_after_warmup']:.2f}"
        )
    lines += [
        "",
        "Sampled completion lengths differ between variants after the first update, so s/step and tokens/s "
        f"do not move together; with {bench['steps']} timed steps on a shared machine the timings are noisy. "
        "The memory figures are the robust part: LoRA keeps the optimizer state of the adapters only.",
        "",
        "## Quality: the main job in bf16",
        "",
    ]
    if main_job is None or fp32_job is None:
        lines.append(
            "Not measured yet (`benchmarks/results/bf16_main_job.json` or `fp32_main_job.json` is missing)."
        )
    else:
        after, before = main_job["after"], main_job["before"]
        lines += [
            "`rl-distill train examples/configs/bf16_smollm2.yaml` (the main job with `train.precision: bf16` "
            "and `model.teacher_dtype: bfloat16`; raw: `benchmarks/results/bf16_main_job.json`) against "
            "`make demo` (the float32 main job, same seed and data, run in a fresh clone of this session's final "
            "code; raw: `benchmarks/results/fp32_main_job.json`):",
            "",
            "| held-out metric (16 prompts) | bf16 before | bf16 after 100 steps | fp32 before | fp32 after 100 steps |",
            "|---|---|---|---|---|",
        ]
        for key in METRICS:
            lines.append(
                f"| `{key}` | {before[key]:.4f} | {after[key]:.4f} | {fp32_job['before'][key]:.4f} | "
                f"{fp32_job['after'][key]:.4f} |"
            )
        lines += [
            "",
            f"Training time for 100 steps: bf16 {main_job['train_seconds']:.0f} s on the shared machine (load 4-7 "
            f"during part of it), fp32 {fp32_job['train_seconds']:.0f} s on a quiet one: not a speed comparison. One seed "
            "each: whether the difference is within the fp32 seed spread is not established here (issue #18 "
            "asks for 3 seeds on a quiet machine).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write or check the page; ``--record-main-job SUMMARY`` first copies a run's summary.json."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--record-main-job", default=None, help="a bf16 main job's summary.json to record")
    args = parser.parse_args(argv)
    if args.record_main_job:
        summary = json.loads(Path(args.record_main_job).read_text(encoding="utf-8"))
        (RESULTS / "bf16_main_job.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    bench = json.loads((RESULTS / "lora_memory.json").read_text(encoding="utf-8"))
    main_file = RESULTS / "bf16_main_job.json"
    main_job = json.loads(main_file.read_text(encoding="utf-8")) if main_file.is_file() else None
    fp32_file = RESULTS / "fp32_main_job.json"
    fp32_job = json.loads(fp32_file.read_text(encoding="utf-8")) if fp32_file.is_file() else None
    page = render(bench, main_job, fp32_job)
    if args.check:
        same = PAGE.is_file() and PAGE.read_text(encoding="utf-8") == page
        print("lora_precision.md is up to date" if same else "lora_precision.md differs from the JSON")
        return 0 if same else 1
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
