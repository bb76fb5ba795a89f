"""E2: RL + on-policy GKD for factual consistency (paper Fig. 5, Eq. 5), an alpha sweep.

The teacher is a tiny char-level model trained by ``examples/tiny_teachers.py`` on
``factual_summary`` data where a fraction of the reference summaries carry one unsupported fact
(a wrong city, year or count), so it hallucinates at a measured rate. The SFT-started student is
trained with paper Eq. 5,

    loss = alpha * JSD(0.5)(pT || pS) on student samples - (1 - alpha) * REINFORCE(r),

with ``r`` the programmatic factual-consistency reward (facts of the summary checked against the
passage's fact table, :class:`rl_distill.rewards.FactualConsistencyReward`), for each ``alpha``.
``alpha = 1`` is pure on-policy GKD (imitate the teacher, hallucinations included); ``alpha = 0`` is
pure RL on the reward (which a summary can satisfy by stating few facts).

Metrics on the held-out passages (clean references), for the student's own samples (temperature 1,
``--eval-samples`` per passage) and for greedy decoding:

- factuality: the hallucination rate (summaries with at least one unsupported or contradicted fact)
  and the mean factual-consistency score;
- quality: ROUGE-2 F1 against the reference summary (``rouge-score``: lower-cased ``[a-z0-9]`` word
  bigrams, no stemming).

The teacher and the starting student are measured the same way as reference points.

    python examples/tiny_teachers.py --task factual_summary --hallucination-rate 0.3 --num-train 20000 \\
        --batch-size 32 --teacher-steps 1500 --student-steps 2000 --student-size 128,2,4 \\
        --max-new-tokens 96 --out artifacts/factual
    python examples/e2_factuality.py --artifacts artifacts/factual

Writes ``docs/results/<name>.{md,json,png}`` (``--name``, default ``e2_factuality``); runs resume from ``runs/e2/runs.jsonl``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _experiment import (
    REPO,
    Job,
    cached_report,
    fmt,
    group_stats,
    load_pair,
    pyplot,
    relative,
    run_job,
    run_jobs,
    runs_to_train,
    task_from_spec,
    write_report,
)  # noqa: E402,I001


@functools.cache
def _rouge_scorer(n: int) -> Any:
    from rouge_score import rouge_scorer  # the optional extra rl-distill[metrics]

    return rouge_scorer.RougeScorer([f"rouge{n}"], use_stemmer=False)


def rouge_n(candidate: str, reference: str, n: int = 2) -> float:
    """ROUGE-N F1 of ``candidate`` against ``reference``, from Google's ``rouge-score`` package.

    Its tokeniser lower-cases and keeps runs of ``[a-z0-9]``; no stemming. 0.0 if either is empty.

    >>> round(rouge_n("the cat sat on the mat", "the cat sat on a mat"), 3)
    0.6
    """
    # rouge-score's score(target, prediction): the reference comes first.
    return float(_rouge_scorer(n).score(reference, candidate)[f"rouge{n}"].fmeasure)


def summary_metrics(
    model: Any, tokenizer: Any, examples: list[Any], *, samples: int, seed: int, max_new_tokens: int
) -> dict[str, float]:
    """Factuality and ROUGE-2 of ``model``'s summaries, sampled (temperature 1) and greedy.

    Returns:
        ``{decoding}/hallucination_rate``, ``/factual_score``, ``/rouge2``, ``/length`` (characters)
        for ``decoding`` in ``sampled`` and ``greedy``.
    """
    import torch

    from rl_distill.rewards import FactualConsistencyReward
    from rl_distill.rollout import RolloutEngine, SamplingConfig

    was_training = model.training
    model.eval()
    engine = RolloutEngine(model, model, tokenizer)  # decoding only; the "teacher" is not used
    checker = FactualConsistencyReward()
    out: dict[str, float] = {}
    for decoding, temperature, k in (("sampled", 1.0, samples), ("greedy", 0.0, 1)):
        generator = torch.Generator().manual_seed(seed)
        checks, rouges, lengths = [], [], []
        for lo in range(0, len(examples), 64):
            chunk = [ex for ex in examples[lo : lo + 64] for _ in range(k)]
            with torch.no_grad():
                r = engine.generate(
                    [ex.prompt for ex in chunk],
                    SamplingConfig(max_new_tokens, temperature=temperature),
                    generator=generator,
                )
            for ex, text in zip(chunk, engine.decode(r)):
                checks.append(checker.check(text, ex.metadata["facts"]))
                rouges.append(rouge_n(text, ex.reference))
                lengths.append(len(text))
        n = len(checks)
        out[f"{decoding}/hallucination_rate"] = sum(c.hallucinated for c in checks) / n
        out[f"{decoding}/factual_score"] = sum(c.score for c in checks) / n
        out[f"{decoding}/rouge2"] = sum(rouges) / n
        out[f"{decoding}/length"] = sum(lengths) / n
    model.train(was_training)
    return out


def student_summary_metrics(trainer: Any, job: Job, *, samples: int, seed: int) -> dict[str, float]:
    """:func:`summary_metrics` of a trained student (the ``extra_eval`` hook of :func:`run_job`)."""
    for p in trainer.student.parameters():
        p.requires_grad_(False)  # evaluation only; the run is over
    return summary_metrics(
        trainer.student,
        trainer.tokenizer,
        trainer.task.eval,
        samples=samples,
        seed=seed,
        max_new_tokens=job.agent["max_new_tokens"],
    )


def run_e2_job(job: Job, out_root: str, samples: int = 2, seed: int = 1234) -> dict[str, Any]:
    """:func:`run_job` with the summary metrics of the trained student under ``extra``."""
    return run_job(job, out_root, extra_eval=partial(student_summary_metrics, samples=samples, seed=seed))


def data_spec(report: dict[str, Any]) -> dict[str, Any]:
    """The factual_summary split the teacher was trained on (same seed and sizes)."""
    a = report["args"]
    return {
        "task": "factual_summary",
        "seed": int(a["seed"]),
        "num_train": int(a["num_train"]),
        "num_eval": int(a["num_eval"]),
        "hallucination_rate": float(report["options"]["hallucination_rate"]),
    }


def reference_points(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Summary metrics of the teacher and of the starting student (cached in ``out/reference.json``)."""
    path = args.out / "reference.json"
    key = {
        "samples": args.eval_samples,
        "max_new_tokens": args.max_new_tokens,
        "num_eval": report["args"]["num_eval"],
    }
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["points"]
    import torch

    torch.set_num_threads(args.threads * args.workers)
    task = task_from_spec(data_spec(report))
    teacher, student, tokenizer = load_pair(str(args.artifacts / "teacher"), str(args.artifacts / "student"))
    points = {
        name: summary_metrics(
            model,
            tokenizer,
            task.eval,
            samples=args.eval_samples,
            seed=1234,
            max_new_tokens=args.max_new_tokens,
        )
        for name, model in (("teacher", teacher), ("student before", student))
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "points": points}, indent=1) + "\n")
    return points


def build_jobs(args: argparse.Namespace, report: dict[str, Any]) -> list[Job]:
    """One job per (alpha, seed)."""
    return [
        Job(
            key=f"alpha={alpha}|seed={seed}",
            method=f"alpha={alpha}",
            seed=seed,
            teacher=str(args.artifacts / "teacher"),
            student=str(args.artifacts / "student"),
            data=data_spec(report),
            agent={
                "name": "gkd",
                "lmbda": 1.0,
                "divergence": "jsd",
                "beta": 0.5,
                "alpha": alpha,
                "reward": "factual_consistency",
                "baseline": "leave_one_out",
                "max_new_tokens": args.max_new_tokens,
            },
            train={
                "steps": args.train_steps,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "warmup_steps": max(1, args.train_steps // 10),
                "lr_schedule": args.lr_schedule,
                "eval_batch_size": 128,
            },
            eval={"greedy": False, "sampled": True, "max_new_tokens": args.max_new_tokens},
            labels={"alpha": alpha},
            threads=args.threads,
        )
        for alpha in args.alphas
        for seed in args.seeds
    ]


METRICS = [
    ("hallucination_rate", "hallucination rate"),
    ("factual_score", "factual score"),
    ("rouge2", "ROUGE-2 F1"),
    ("length", "length (chars)"),
]


def table(runs: list[dict[str, Any]], points: dict[str, dict[str, float]], decoding: str) -> str:
    """Markdown: the reference points and one row per alpha (mean ± std over seeds)."""
    head = "| model | " + " | ".join(label for _, label in METRICS) + " | JSD to teacher | n |"
    lines = [head, "|---|" + "---|" * (len(METRICS) + 2)]
    for name, m in points.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{m[f'{decoding}/{k}']:.3f}" for k, _ in METRICS) + " | - | 1 |"
        )
    for alpha in sorted({r["alpha"] for r in runs}):
        mine = [r for r in runs if r["alpha"] == alpha]
        cells = [
            fmt(*group_stats(mine, ["alpha"], lambda r, k=k: r["extra"][f"{decoding}/{k}"])[(alpha,)][:2])
            for k, _ in METRICS
        ]
        jsd = group_stats(mine, ["alpha"], lambda r: r["after"]["eval/jsd"])[(alpha,)]
        lines.append(
            f"| student, alpha = {alpha} | " + " | ".join(cells) + f" | {fmt(*jsd[:2])} | {len(mine)} |"
        )
    return "\n".join(lines) + "\n"


def claim_check(
    runs: list[dict[str, Any]], points: dict[str, dict[str, float]], decoding: str, keep: float
) -> str:
    """Which alphas give a student more factual than the teacher with ROUGE-2 >= ``keep`` x the teacher's."""
    teacher = points["teacher"]
    t_h, t_r = teacher[f"{decoding}/hallucination_rate"], teacher[f"{decoding}/rouge2"]
    found = []
    for alpha in sorted({r["alpha"] for r in runs}):
        mine = [r for r in runs if r["alpha"] == alpha]
        h = group_stats(mine, ["alpha"], lambda r, d=decoding: r["extra"][f"{d}/hallucination_rate"])[
            (alpha,)
        ][0]
        q = group_stats(mine, ["alpha"], lambda r, d=decoding: r["extra"][f"{d}/rouge2"])[(alpha,)][0]
        if h < t_h and q >= keep * t_r:
            found.append(
                f"alpha = {alpha} (hallucination {h:.3f} vs teacher {t_h:.3f}, ROUGE-2 {q:.3f} vs {t_r:.3f})"
            )
    start = points.get("student before")
    note = ""
    if start is not None:
        s_h, s_r = start[f"{decoding}/hallucination_rate"], start[f"{decoding}/rouge2"]
        already = s_h < t_h and s_r >= keep * t_r
        note = f" The starting student: hallucination {s_h:.3f}, ROUGE-2 {s_r:.3f}" + (
            " (it already meets the claim before any training)." if already else "."
        )
    if found:
        return (
            f"Claim holds ({decoding}): "
            + "; ".join(found)
            + f" (ROUGE-2 kept >= {keep:.0%} of the teacher's).{note}\n"
        )
    return (
        f"Claim does not hold ({decoding}): no alpha gives a mean hallucination rate below the teacher's "
        f"({t_h:.3f}) with ROUGE-2 >= {keep:.0%} of the teacher's ({t_r:.3f}).{note}\n"
    )


def plot(runs: list[dict[str, Any]], points: dict[str, dict[str, float]], path: Path) -> None:
    """Factuality (1 - hallucination rate) against ROUGE-2, per alpha, sampled and greedy panels."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    alphas = sorted({r["alpha"] for r in runs})
    for ax, decoding in zip(axes, ("sampled", "greedy")):
        for alpha in alphas:
            mine = [r for r in runs if r["alpha"] == alpha]
            x = group_stats(mine, ["alpha"], lambda r, d=decoding: r["extra"][f"{d}/rouge2"])[(alpha,)]
            y = group_stats(mine, ["alpha"], lambda r, d=decoding: 1 - r["extra"][f"{d}/hallucination_rate"])[
                (alpha,)
            ]
            ax.errorbar(x[0], y[0], xerr=x[1], yerr=y[1], marker="o", capsize=3, label=f"alpha = {alpha}")
        for name, marker in (("teacher", "*"), ("student before", "s")):
            m = points[name]
            ax.scatter(
                m[f"{decoding}/rouge2"],
                1 - m[f"{decoding}/hallucination_rate"],
                marker=marker,
                s=140,
                color="k",
                label=name,
            )
        ax.set_xlabel("ROUGE-2 F1 vs reference (quality)")
        ax.set_ylabel("1 - hallucination rate (factuality)")
        ax.set_title(f"{decoding} decoding")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("E2: RL + GKD alpha sweep (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) E2 and write its report (``--report-only``: rebuild the page from its raw JSON)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", type=Path, default=REPO / "artifacts" / "factual")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "e2")
    p.add_argument("--results", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--name", default="e2_factuality", help="base name of the report files")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--eval-samples", type=int, default=2, help="sampled summaries per held-out passage")
    p.add_argument("--keep", type=float, default=0.9, help="quality kept, for the claim check")
    p.add_argument("--lr-schedule", choices=["constant", "linear", "cosine"], default="cosine")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild <results>/<name>.md (and plot) from the committed <name>.json, with its settings; no training",
    )
    args = p.parse_args(argv)
    bad = [a for a in args.alphas if not 0.0 <= a <= 1.0]
    if bad:
        raise SystemExit(f"--alphas must be in [0, 1], got {bad}")
    start = time.perf_counter()
    if args.report_only:
        args, cached = cached_report(args, args.name)
        report, points, runs = cached["teacher_report"], cached["reference_points"], cached["runs"]
        body, data = report_body(args, report, points, runs)
        return write_report(args.name, args, title=TITLE, body=body, data=data, start=start, cached=cached)
    report_path = args.artifacts / "report.json"
    if not report_path.is_file():
        raise SystemExit(
            f"{report_path} not found: train the teacher first with examples/tiny_teachers.py (see docstring)"
        )
    report = json.loads(report_path.read_text())
    if report["task"] != "factual_summary":
        raise SystemExit(f"{args.artifacts} holds a {report['task']} teacher; E2 needs a factual_summary one")
    points = reference_points(args, report)
    runner = partial(run_e2_job, samples=args.eval_samples)
    jobs = build_jobs(args, report)
    trained = runs_to_train(jobs, args.out)
    runs = run_jobs(jobs, args.out, workers=args.workers, runner=runner)
    body, data = report_body(args, report, points, runs)
    return write_report(args.name, args, title=TITLE, body=body, data=data, start=start, trained=trained)


TITLE = "E2: RL + GKD for factual consistency (alpha sweep)"


def report_body(
    args: argparse.Namespace,
    report: dict[str, Any],
    points: dict[str, dict[str, float]],
    runs: list[dict[str, Any]],
) -> tuple[str, dict[str, Any]]:
    """``(markdown body, raw data)`` of the page (the plot is written too)."""
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    plot(runs, points, results / f"{args.name}.png")
    rate = report["options"]["hallucination_rate"]
    body = (
        f"Teacher trained on `factual_summary` with {rate:.0%} of the training references carrying one "
        f"unsupported fact (`examples/tiny_teachers.py`, `{relative(args.artifacts)}`). Student: SFT-started on the same "
        f"noisy data. Eq. 5 with on-policy JSD(0.5) and the factual-consistency reward (leave-one-out "
        f"baseline), {args.train_steps} steps, batch {args.batch_size}, AdamW lr {args.lr} (10% warm-up, {args.lr_schedule} decay). Held-out: "
        f"{report['args']['num_eval']} passages, {args.eval_samples} samples each at temperature 1, and greedy.\n\n"
        "## Sampled summaries (temperature 1: the policy that was trained)\n\n"
        + table(runs, points, "sampled")
        + "\n"
        + claim_check(runs, points, "sampled", args.keep)
        + "\n## Greedy summaries\n\n"
        + table(runs, points, "greedy")
        + "\n"
        + claim_check(runs, points, "greedy", args.keep)
        + f"\n![{args.name}.png]({args.name}.png)\n"
    )
    data = {
        "teacher_report": report,
        "reference_points": points,
        "runs": runs,
    }
    return body, data


if __name__ == "__main__":
    main()
