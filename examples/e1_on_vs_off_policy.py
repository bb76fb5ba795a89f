"""E1: on-policy vs off-policy distillation on arithmetic with chain of thought (paper Figs. 1, 7, 9).

Distils the tiny arithmetic teacher of ``examples/tiny_teachers.py`` into the SFT-started student with
every method of the paper's comparison, from the same starting student, with the same step budget,
batch size and learning rate:

- ``sft``: cross-entropy on the references;
- ``supervised_kd``: token-level forward KL to the teacher on the references (lambda = 0, Eq. 3);
- ``seqkd``: cross-entropy on teacher samples (SeqKD, "SFT on teacher outputs");
- ``gkd_l0.5_<div>``: GKD with lambda = 0.5 (half on-policy, half references);
- ``gkd_l1_<div>``: on-policy GKD (lambda = 1);

with ``<div>`` each of forward KL, reverse KL, JSD(0.1), JSD(0.5), JSD(0.9). The grid runs at the
middle problem length (2 operations); a second grid repeats ``supervised_kd`` and on-policy GKD at
every length (1, 2, 3 operations) to test whether the on-policy advantage grows with the length of
the generated chain, as the compounding-error (train/inference mismatch) argument predicts.

Metrics, on the held-out split the teacher never saw: greedy exact-match accuracy
(``eval/greedy/exact_match``), and the token-level forward and reverse KL of the student to the
teacher on the student's own samples (``eval/forward_kl``, ``eval/reverse_kl``, paper Eq. 2).

    python examples/tiny_teachers.py --task arithmetic --compact --steps 1,2,3 --num-train 8000 \\
        --teacher-steps 2500 --student-steps 1600 --out artifacts/arithmetic
    python examples/e1_on_vs_off_policy.py --artifacts artifacts/arithmetic

Writes ``docs/results/<name>.{md,json}`` and ``<name>_*.png`` (``--name``, default
``e1_on_vs_off_policy``); runs resume from
``runs/e1/runs.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _experiment import (  # noqa: E402
    REPO,
    Job,
    cached_report,
    fmt,
    group_stats,
    pyplot,
    relative,
    run_jobs,
    runs_to_train,
    write_report,
)

from rl_distill.agents.gkd import SPECIAL_CASES  # noqa: E402

DIVERGENCES: dict[str, dict[str, Any]] = {
    "fkl": {"divergence": "forward_kl"},
    "rkl": {"divergence": "reverse_kl"},
    "jsd0.1": {"divergence": "jsd", "beta": 0.1},
    "jsd0.5": {"divergence": "jsd", "beta": 0.5},
    "jsd0.9": {"divergence": "jsd", "beta": 0.9},
}


def methods() -> dict[str, dict[str, Any]]:
    """Method label -> GKD agent overrides (the paper's special cases and the GKD grid)."""
    out: dict[str, dict[str, Any]] = {
        "sft": SPECIAL_CASES["sft"],
        "supervised_kd": SPECIAL_CASES["supervised_kd"],
        "seqkd": SPECIAL_CASES["seqkd"],
    }
    for lmbda, tag in ((0.5, "l0.5"), (1.0, "l1")):
        for name, div in DIVERGENCES.items():
            out[f"gkd_{tag}_{name}"] = {"lmbda": lmbda, **div}
    return out


def max_new_tokens(steps: int, digits: int) -> int:
    """Completion budget for a chain of ``steps`` operations on ``digits``-digit numbers (with slack)."""
    per_step = 2 * (digits + 1) + digits + 4  # "123+45=168. "
    return steps * per_step + digits + 8  # "#### 168" + EOS


def arithmetic_spec(report: dict[str, Any], length: int) -> dict[str, Any]:
    """The teacher's arithmetic split (``tiny_teachers`` report) at ``length`` operations."""
    ta = report["args"]
    return {
        "task": "arithmetic",
        "seed": int(ta["seed"]),
        "num_train": int(ta["num_train"]),
        "num_eval": int(ta["num_eval"]),
        "digits": int(ta["digits"]),
        "steps": length,
        "compact": ta["compact"] == "True",
    }


def build_jobs(args: argparse.Namespace, report: dict[str, Any]) -> list[Job]:
    """The main grid at ``--main-length`` and the length grid."""
    teacher_args = report["args"]
    digits = int(teacher_args["digits"])
    all_methods = methods()
    chosen = args.methods or list(all_methods)
    unknown = [m for m in chosen + args.length_methods if m not in all_methods]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(all_methods)}")
    cells = [(m, args.main_length) for m in chosen]
    cells += [(m, n) for n in args.lengths for m in args.length_methods if (m, n) not in cells]
    jobs = []
    for method, length in cells:
        for seed in args.seeds:
            budget = max_new_tokens(length, digits)
            jobs.append(
                Job(
                    key=f"{method}|steps={length}|seed={seed}",
                    method=method,
                    seed=seed,
                    teacher=str(args.artifacts / "teacher"),
                    student=str(args.artifacts / "student"),
                    data=arithmetic_spec(report, length),
                    agent={"name": "gkd", **all_methods[method], "max_new_tokens": budget},
                    train={
                        "steps": args.train_steps,
                        "batch_size": args.batch_size,
                        "lr": args.lr,
                        "warmup_steps": max(1, args.train_steps // 10),
                        "lr_schedule": args.lr_schedule,
                        "eval_batch_size": 128,
                    },
                    eval={"greedy": True, "sampled": True, "max_new_tokens": budget},
                    labels={"length": length},
                    threads=args.threads,
                )
            )
    return jobs


def accuracy(run: dict[str, Any]) -> float:
    """Greedy held-out exact-match accuracy after training."""
    return run["after"]["eval/greedy/exact_match"]


def main_table(runs: list[dict[str, Any]], length: int, teacher_acc: float | None) -> str:
    """Markdown: one row per method at the main length."""
    main = [r for r in runs if r["length"] == length]
    if not main:
        return ""
    acc = group_stats(main, ["method"], accuracy)
    fkl = group_stats(main, ["method"], lambda r: r["after"]["eval/forward_kl"])
    rkl = group_stats(main, ["method"], lambda r: r["after"]["eval/reverse_kl"])
    before = main[0]["before"]
    lines = [
        f"Held-out greedy accuracy and token-level divergences to the teacher on student samples, "
        f"{length}-operation problems, mean ± std over seeds (n per row in the last column).",
        "",
        "| method | accuracy | forward KL | reverse KL | n |",
        "|---|---|---|---|---|",
        f"| student before (SFT start) | {before['eval/greedy/exact_match']:.3f} | "
        f"{before['eval/forward_kl']:.3f} | {before['eval/reverse_kl']:.3f} | 1 |",
    ]
    if teacher_acc is not None:
        lines.append(f"| teacher | {teacher_acc:.3f} | 0 | 0 | 1 |")
    for (method,), (m, s, n) in sorted(acc.items(), key=lambda kv: -kv[1][0]):
        lines.append(
            f"| {method} | {fmt(m, s)} | {fmt(*fkl[(method,)][:2])} | {fmt(*rkl[(method,)][:2])} | {n} |"
        )
    return "\n".join(lines) + "\n"


def length_table(runs: list[dict[str, Any]], on: str, off: str) -> tuple[str, dict[str, Any]]:
    """Markdown and data: accuracy of ``on`` and ``off`` per length and the paired per-seed gain."""
    lengths = sorted({r["length"] for r in runs if r["method"] in (on, off)})
    rows, data = [], {}
    for n in lengths:
        by_seed = {
            (r["method"], r["seed"]): accuracy(r)
            for r in runs
            if r["length"] == n and r["method"] in (on, off)
        }
        seeds = sorted({s for (_, s) in by_seed if (on, s) in by_seed and (off, s) in by_seed})
        if not seeds:
            continue
        gains = [by_seed[(on, s)] - by_seed[(off, s)] for s in seeds]
        stats = {
            m: group_stats([r for r in runs if r["length"] == n and r["method"] == m], ["method"], accuracy)[
                (m,)
            ]
            for m in (on, off)
        }
        g = group_stats([{"g": v, "k": 0} for v in gains], ["k"], lambda r: r["g"])[(0,)]
        before = next(r["before"]["eval/greedy/exact_match"] for r in runs if r["length"] == n)
        rows.append(
            f"| {n} | {before:.3f} | {fmt(*stats[off][:2])} | {fmt(*stats[on][:2])} | {fmt(g[0], g[1])} | "
            f"{len(seeds)} |"
        )
        data[n] = {"before": before, off: stats[off], on: stats[on], "gain": g, "gains": gains}
    md = (
        f"Greedy accuracy by problem length (operations per problem): `{off}` (off-policy) vs `{on}` "
        f"(on-policy), and the on-policy gain (paired by seed).\n\n"
        f"| operations | student before | {off} | {on} | gain | seeds |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )
    return md, data


def plots(
    runs: list[dict[str, Any]], args: argparse.Namespace, results: Path, teacher_acc: float | None = None
) -> list[str]:
    """Bar chart of accuracy per method (main length) and accuracy against length; returns file names."""
    plt = pyplot()
    names = []
    main = [r for r in runs if r["length"] == args.main_length]
    if main:
        acc = group_stats(main, ["method"], accuracy)
        order = [m for m in methods() if (m,) in acc]
        fig, ax = plt.subplots(figsize=(9, 4))
        xs = range(len(order))
        colors = [
            "tab:gray" if not m.startswith("gkd") else "tab:blue" if "l1" in m else "tab:cyan" for m in order
        ]
        ax.bar(xs, [acc[(m,)][0] for m in order], yerr=[acc[(m,)][1] for m in order], color=colors, capsize=3)
        ax.axhline(
            main[0]["before"]["eval/greedy/exact_match"], color="k", ls="--", lw=1, label="student before"
        )
        if teacher_acc is not None:
            ax.axhline(teacher_acc, color="tab:red", ls=":", lw=1, label="teacher")
        ax.set_xticks(list(xs), order, rotation=45, ha="right")
        ax.set_ylabel("held-out greedy accuracy")
        ax.set_title(f"E1: {args.main_length}-operation arithmetic (mean ± std over seeds)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(results / f"{args.name}_methods.png", dpi=120)
        plt.close(fig)
        names.append(f"{args.name}_methods.png")
    length_runs = [r for r in runs if r["method"] in args.length_methods]
    if len({r["length"] for r in length_runs}) > 1:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for method in args.length_methods:
            stats = group_stats([r for r in length_runs if r["method"] == method], ["length"], accuracy)
            ls = sorted(k[0] for k in stats)
            ax.errorbar(
                ls,
                [stats[(n,)][0] for n in ls],
                yerr=[stats[(n,)][1] for n in ls],
                marker="o",
                capsize=3,
                label=method,
            )
        ls = sorted({r["length"] for r in length_runs})
        before = {r["length"]: r["before"]["eval/greedy/exact_match"] for r in length_runs}
        ax.plot(ls, [before[n] for n in ls], "k--", marker="s", label="student before")
        ax.set_xlabel("operations per problem")
        ax.set_ylabel("held-out greedy accuracy")
        ax.set_xticks(sorted({r["length"] for r in length_runs}))
        ax.set_title("E1: accuracy against problem length")
        ax.legend()
        fig.tight_layout()
        fig.savefig(results / f"{args.name}_length.png", dpi=120)
        plt.close(fig)
        names.append(f"{args.name}_length.png")
    return names


#: Method groups of the findings (reverse KL on the student's own samples by kind of method).
OFF_POLICY = ("sft", "supervised_kd", "seqkd")
MODE_SEEKING = ("rkl", "jsd0.5", "jsd0.9")  # reverse KL and the JSDs at beta >= 0.5 (towards reverse KL)


def _range(values: list[float]) -> str:
    """``"lo-hi"`` at 3 decimals (one value when they round alike)."""
    lo, hi = f"{min(values):.3f}", f"{max(values):.3f}"
    return lo if lo == hi else f"{lo}-{hi}"


def findings(runs: list[dict[str, Any]], length: int) -> str:
    """Plain statements about the main-length grid, computed from the runs (markdown bullets).

    Accuracy against the start (which methods end more than one seed std away from it), accuracy
    pooled by kind of method, and the reverse KL on the student's own samples by divergence and by
    share of on-policy data (lambda).
    """
    main = [r for r in runs if r["length"] == length]
    if not main:
        return ""
    start_acc = main[0]["before"]["eval/greedy/exact_match"]
    start_rkl = main[0]["before"]["eval/reverse_kl"]
    acc = group_stats(main, ["method"], accuracy)
    rkl = {
        m: v[0] for (m,), v in group_stats(main, ["method"], lambda r: r["after"]["eval/reverse_kl"]).items()
    }
    means = [v[0] for v in acc.values()]
    outside = []
    for (method,), (m, s, _) in sorted(acc.items(), key=lambda kv: kv[1][0]):
        if abs(m - start_acc) > s:
            z = (m - start_acc) / s if s > 0 else float("inf") * (1 if m > start_acc else -1)
            where = "below" if m < start_acc else "above"
            outside.append(f"`{method}` ({fmt(m, s)}, {abs(z):.1f} std {where} the start)")
    within = len(acc) - len(outside)
    near = (
        f"{within} of {len(acc)} end within one std over seeds (their own) of the start"
        if within
        else f"none of the {len(acc)} ends within one std over seeds (its own) of the start"
    )
    out = [
        f"- **Greedy accuracy** ({length} operations): the methods end at {_range(means)} against the "
        f"start's {start_acc:.3f}; {near}" + (f"; outside it: {'; '.join(outside)}." if outside else ".")
    ]
    pools = [
        ("off-policy (" + ", ".join(m for m in OFF_POLICY if (m,) in acc) + ")", lambda m: m in OFF_POLICY),
        ("GKD lambda = 0.5", lambda m: m.startswith("gkd_l0.5_")),
        ("on-policy GKD lambda = 1", lambda m: m.startswith("gkd_l1_")),
    ]
    pooled = []
    for label, member in pools:
        values = [accuracy(r) for r in main if member(r["method"])]
        if values:
            g = group_stats([{"v": v, "k": 0} for v in values], ["k"], lambda r: r["v"])[(0,)]
            pooled.append(f"{label} {fmt(g[0], g[1])} ({g[2]} runs)")
    if pooled:
        out.append("- **Accuracy pooled over methods and seeds**: " + "; ".join(pooled) + ".")
    off = [rkl[m] for m in OFF_POLICY if m in rkl]
    rows = []
    for lmbda in ("0.5", "1"):
        fkl = rkl.get(f"gkd_l{lmbda}_fkl")
        seeking = [rkl[f"gkd_l{lmbda}_{d}"] for d in MODE_SEEKING if f"gkd_l{lmbda}_{d}" in rkl]
        jsd01 = rkl.get(f"gkd_l{lmbda}_jsd0.1")
        parts = []
        if seeking:
            parts.append(f"reverse KL, JSD(0.5), JSD(0.9) {_range(seeking)}")
        if jsd01 is not None:
            parts.append(f"JSD(0.1) {jsd01:.3f}")
        if fkl is not None:
            parts.append(f"forward KL {fkl:.3f}")
        if parts:
            rows.append(f"lambda = {lmbda}: " + ", ".join(parts))
    if off and rows:
        text = (
            f"- **Reverse KL on the student's own samples** (start {start_rkl:.3f}): off-policy methods "
            f"{_range(off)}; GKD " + "; ".join(rows) + "."
        )
        fkl_arms = {m: rkl[m] for m in ("gkd_l0.5_fkl", "gkd_l1_fkl") if m in rkl}
        seeking_all = {
            m: v for m, v in rkl.items() if m.startswith("gkd_") and m.rsplit("_", 1)[1] in MODE_SEEKING
        }
        if fkl_arms:
            worse = [m for m, v in fkl_arms.items() if v > max(off)]
            if worse:
                text += (
                    " With forward KL, on-policy data does not lower it: "
                    + ", ".join(f"`{m}`" for m in worse)
                    + " end"
                    + ("s" if len(worse) == 1 else "")
                    + " above every off-policy method."
                )
        if seeking_all and max(seeking_all.values()) < min(off):
            best = min(rkl, key=rkl.get)
            text += (
                " Every mode-seeking arm (reverse KL, JSD(0.5), JSD(0.9), at lambda 0.5 and 1: "
                f"{_range(list(seeking_all.values()))}) ends below every off-policy method; the lowest is "
                f"`{best}` ({rkl[best]:.3f}). The drop follows the divergence, not the share of on-policy data."
            )
        out.append(text)
    return "\n".join(out) + "\n"


def report_body(
    args: argparse.Namespace, report: dict[str, Any], runs: list[dict[str, Any]]
) -> tuple[str, dict[str, Any]]:
    """``(markdown body, raw data)`` of the page, from the runs and the teachers' report (plots written too)."""
    teacher = report["teacher"]["metrics"]
    teacher_acc = teacher.get(f"accuracy_steps{args.main_length}", teacher.get("accuracy"))
    on, off = args.length_methods[-1], args.length_methods[0]
    length_md, length_data = length_table(runs, on, off)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    pngs = plots(runs, args, results, teacher_acc)
    teacher_lines = ", ".join(f"{k} {v:.3f}" for k, v in teacher.items())
    student_lines = ", ".join(f"{k} {v:.3f}" for k, v in report["student"]["metrics"].items())
    found = findings(runs, args.main_length)
    body = (
        "Tiny char-level teacher and SFT-started student from `examples/tiny_teachers.py` "
        f"(`{relative(args.artifacts)}`): teacher greedy {teacher_lines}; student start {student_lines}. "
        f"Each run: {args.train_steps} steps, batch {args.batch_size}, AdamW lr {args.lr} "
        f"(linear warm-up over 10% of the steps, then {args.lr_schedule} decay), sampling temperature 1.\n\n"
        "## Methods at the main length\n\n"
        + main_table(runs, args.main_length, teacher_acc)
        + (f"\n## Findings (computed from the runs)\n\n{found}" if found else "")
        + "\n## On-policy gain against problem length\n\n"
        + length_md
        + "\n"
        + "".join(f"![{n}]({n})\n" for n in pngs)
    )
    data = {
        "teacher_report": report,
        "length": {str(k): v for k, v in length_data.items()},
        "runs": runs,
    }
    return body, data


TITLE = "E1: on-policy vs off-policy distillation (arithmetic, chain of thought)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) E1 and write its report (``--report-only``: rebuild the page from its raw JSON)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", type=Path, default=REPO / "artifacts" / "arithmetic")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "e1")
    p.add_argument("--results", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--name", default="e1_on_vs_off_policy", help="base name of the report files")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="*", default=None, help="main-grid methods (default: all)")
    p.add_argument("--main-length", type=int, default=2)
    p.add_argument("--lengths", type=int, nargs="*", default=[1, 2, 3])
    p.add_argument("--length-methods", nargs="*", default=["supervised_kd", "gkd_l1_fkl"])
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lr-schedule", choices=["constant", "linear", "cosine"], default="cosine")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild <results>/<name>.md (and plots) from the committed <name>.json, with its settings; no training",
    )
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.report_only:
        args, cached = cached_report(args, args.name)
        body, data = report_body(args, cached["teacher_report"], cached["runs"])
        return write_report(args.name, args, title=TITLE, body=body, data=data, start=start, cached=cached)
    report_path = args.artifacts / "report.json"
    if not report_path.is_file():
        raise SystemExit(
            f"{report_path} not found: train the teacher and student first with examples/tiny_teachers.py "
            "(see this script's docstring)"
        )
    report = json.loads(report_path.read_text())
    if report["task"] != "arithmetic":
        raise SystemExit(f"{args.artifacts} holds a {report['task']} teacher; E1 needs an arithmetic one")
    jobs = build_jobs(args, report)
    trained = runs_to_train(jobs, args.out)
    runs = run_jobs(jobs, args.out, workers=args.workers)
    body, data = report_body(args, report, runs)
    return write_report(args.name, args, title=TITLE, body=body, data=data, start=start, trained=trained)


if __name__ == "__main__":
    main()
