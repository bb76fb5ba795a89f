"""rl_distill's on-policy GKD step against TRL 1.16's GKDTrainer and DistillationTrainer.

Same teacher (SmolLM2-135M-Instruct) and student (its 6-layer kept-layer copy), same prompts
(the built-in ``instructions`` task) in the same order, batch 4, 32 new tokens, lambda = 1,
JSD(0.5), temperature 1, fp32, the same AdamW with a constant learning rate and clipping at 1.0.
Each method runs in its own process (so peak memory is per method), alternating methods across
repeats (ours, TRL GKD, TRL Distillation, ours, ...); every process does ``--warmup`` untimed
steps, then ``--steps`` timed ones.

Reported per method: median seconds per step (over all timed steps of all repeats), generated
tokens per second (all generated tokens / all timed seconds), peak RSS during the steps, and
our throughput over each peer's.

Example::

    python benchmarks/vs_trl.py --repeats 3 --steps 10 --warmup 2 --out results/vs_trl.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _harness as H  # noqa: E402
from benchmarks._methods import TRL_METHODS, BenchSpec, aggregate, run_alternating  # noqa: E402

DEFAULT_METHODS = ["ours", "trl_gkd", "trl_distillation"]


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """The :class:`BenchSpec` options shared by the step benchmarks."""
    d = BenchSpec()
    parser.add_argument("--model", default=d.model, help="teacher name/path, or 'tiny' (smoke runs)")
    parser.add_argument("--student-layers", type=int, default=d.student_layers)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--steps", type=int, default=d.steps, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first (>= 1)")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--beta", type=float, default=d.beta)
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--threads", type=int, default=d.threads, help="torch.set_num_threads in every method"
    )
    parser.add_argument("--device", default=d.device, help="cpu, cuda, ... (results here are CPU only)")
    parser.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"])
    parser.add_argument(
        "--optimizer",
        default=d.optimizer,
        choices=["adamw", "adamw_foreach", "adamw_fused"],
        help="AdamW implementation, the same for every method (adamw = torch default, as rl_distill's trainer)",
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def spec_from_args(args: argparse.Namespace) -> BenchSpec:
    """Build the :class:`BenchSpec` from parsed arguments."""
    return BenchSpec(
        model=args.model,
        student_layers=args.student_layers,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        steps=args.steps,
        warmup=args.warmup,
        lr=args.lr,
        beta=args.beta,
        temperature=args.temperature,
        seed=args.seed,
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
        optimizer=args.optimizer,
    )


def compare(methods: list[str], spec: BenchSpec, repeats: int, timeout: float | None) -> dict[str, Any]:
    """Run the methods alternately in fresh processes and return the aggregated comparison."""
    before = {"load_average": H.load_average(), "other_pytest_processes": H.busy_processes()}
    runs = run_alternating(methods, spec, repeats, timeout=timeout, log=lambda s: print(s, flush=True))
    summary = {m: aggregate(r) for m, r in runs.items()}
    ours = summary.get("ours")
    ratios: dict[str, dict[str, float]] = {}
    if ours is not None:
        for m in methods:
            if m == "ours":
                continue
            peer = summary[m]
            ratios[m] = {
                "throughput_ours_over_peer": ours["tokens_per_second"] / peer["tokens_per_second"]
                if peer["tokens_per_second"]
                else float("nan"),
                "throughput_at_median_step_ours_over_peer": ours["tokens_per_second_at_median_step"]
                / peer["tokens_per_second_at_median_step"]
                if peer["tokens_per_second_at_median_step"]
                else float("nan"),
                "step_time_peer_over_ours": peer["median_step_seconds"] / ours["median_step_seconds"],
                "peak_rss_ours_over_peer": ours["peak_rss_steps_mib"] / peer["peak_rss_steps_mib"],
            }
    return {
        "benchmark": "vs_trl",
        "spec": asdict(spec),
        "repeats": repeats,
        "methods": methods,
        "machine": H.machine_info(spec.threads),
        "before": before,
        "after": {"load_average": H.load_average()},
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of the summary."""
    rows = [
        "| method | median s/step | generated tok/s (total) | tok/s at median step | tokens/step "
        "| peak RSS (steps) MiB | RSS after setup MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, s in result["summary"].items():
        rows.append(
            f"| {m} | {s['median_step_seconds']:.3f} | {s['tokens_per_second']:.1f} | "
            f"{s['tokens_per_second_at_median_step']:.1f} | "
            f"{s['mean_tokens_per_step']:.1f} | {s['peak_rss_steps_mib']:.0f} | {s['rss_after_setup_mib']:.0f} |"
        )
    for m, r in result["ratios"].items():
        rows.append(
            f"\nours vs {m}: throughput x{r['throughput_ours_over_peer']:.2f} "
            f"(at median step x{r['throughput_at_median_step_ours_over_peer']:.2f}), "
            f"step time x{r['step_time_peer_over_ours']:.2f}, peak RSS x{r['peak_rss_ours_over_peer']:.2f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_spec_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="processes per method (alternating)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        help=f"methods to compare (default: {' '.join(DEFAULT_METHODS)}; also trl_gkd_lambda0, ours_lambda0)",
    )
    args = parser.parse_args(argv)
    methods = list(args.methods)
    if any(m in TRL_METHODS for m in methods) and H.package_version("trl") is None:
        parser.error("trl is not installed: pip install -e '.[bench]' (or drop the trl_* methods)")
    result = compare(methods, spec_from_args(args), args.repeats, args.timeout)
    print(format_table(result))
    H.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
