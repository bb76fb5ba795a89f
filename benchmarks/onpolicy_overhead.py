"""On-policy overhead: the on-policy GKD step time over the supervised-KD step time, same setup.

- on-policy: ``GKDAgent`` with lambda = 1, JSD(beta), the student samples ``max_new_tokens`` tokens;
- supervised KD: lambda = 0, forward KL on fixed reference sequences of the same length
  (``max_new_tokens - 1`` tokens of English text + EOS; paper Eq. 3), no generation.

The GKD paper (arXiv 2306.13649) reports on-policy training at 1.8-2.2x the supervised step time.
With ``--with-trl`` the same ratio is measured for TRL's ``GKDTrainer`` (``lmbda`` 1 vs 0; at 0
it trains on the dataset's assistant replies, the same reference texts plus its chat template's
end-of-turn tokens). Each method runs in its own process, alternating, as in ``vs_trl.py``.

Example::

    python benchmarks/onpolicy_overhead.py --repeats 3 --steps 10 --with-trl --out results/onpolicy.json
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
from benchmarks._methods import BenchSpec, aggregate, run_alternating  # noqa: E402
from benchmarks.vs_trl import add_spec_arguments, spec_from_args  # noqa: E402

PAIRS = {"ours": ("ours", "ours_lambda0"), "trl_gkd": ("trl_gkd", "trl_gkd_lambda0")}


def overhead(with_trl: bool, spec: BenchSpec, repeats: int, timeout: float | None) -> dict[str, Any]:
    """Run the on-policy / supervised pairs alternately and return the ratios."""
    pairs = {k: v for k, v in PAIRS.items() if with_trl or k == "ours"}
    methods = [m for pair in pairs.values() for m in pair]
    before = {"load_average": H.load_average(), "other_pytest_processes": H.busy_processes()}
    runs = run_alternating(methods, spec, repeats, timeout=timeout, log=lambda s: print(s, flush=True))
    summary = {m: aggregate(r) for m, r in runs.items()}
    ratios = {
        name: {
            "onpolicy_over_supervised_step_time": summary[on]["median_step_seconds"]
            / summary[off]["median_step_seconds"],
            "onpolicy_median_step_seconds": summary[on]["median_step_seconds"],
            "supervised_median_step_seconds": summary[off]["median_step_seconds"],
            "onpolicy_tokens_per_step": summary[on]["mean_tokens_per_step"],
            "supervised_tokens_per_step": summary[off]["mean_tokens_per_step"],
        }
        for name, (on, off) in pairs.items()
    }
    return {
        "benchmark": "onpolicy_overhead",
        "spec": asdict(spec),
        "repeats": repeats,
        "machine": H.machine_info(spec.threads),
        "before": before,
        "after": {"load_average": H.load_average()},
        "paper_reported_ratio": [1.8, 2.2],
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_spec_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="processes per method (alternating)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    parser.add_argument("--with-trl", action="store_true", help="also TRL GKDTrainer lmbda=1 vs lmbda=0")
    args = parser.parse_args(argv)
    if args.with_trl and H.package_version("trl") is None:
        parser.error("--with-trl needs trl: pip install -e '.[bench]'")
    result = overhead(args.with_trl, spec_from_args(args), args.repeats, args.timeout)
    for name, r in result["ratios"].items():
        print(
            f"{name}: on-policy {r['onpolicy_median_step_seconds']:.3f} s/step, supervised "
            f"{r['supervised_median_step_seconds']:.3f} s/step, ratio x{r['onpolicy_over_supervised_step_time']:.2f} "
            "(paper: 1.8-2.2x)"
        )
    H.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
