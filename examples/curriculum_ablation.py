"""Curriculum vs uniform sampling for on-policy GKD on mixed-length arithmetic (issue #14, item 5).

From the cached SFT student of ``examples/tiny_teachers.py`` (``artifacts/arithmetic``), distil the
tiny arithmetic teacher with on-policy GKD (JSD(0.5), lambda = 1) on the teacher's mixed training
split (1-, 2- and 3-operation chains), three arms with the same step budget, batch size and
learning rate (E1's GKD settings on this pair, not tuned here):

- ``uniform``: ``train.curriculum: null`` (shuffled epochs);
- ``easy_to_hard``: ``train.curriculum: {mode: easy_to_hard, difficulty: reference_length}`` with the
  pacing of ``examples/configs/curriculum_arithmetic.yaml`` (root, start 0.2, full at 0.6, half the
  difficulty measured);
- ``frontier``: ``{mode: frontier, difficulty: reference_length}`` (beta kernel moving from easy to
  hard, the sampler's defaults otherwise).

Metrics on the held-out split: greedy exact match overall and per number of operations (the
difficulty bucket), the token-level reverse KL on student samples overall and per bucket, and the
share of 3-operation ("hard") problems among the examples drawn for training, per step (to show the
curriculum did what it says).

    python examples/curriculum_ablation.py            # the grid; resumes from runs/curriculum_ablation
    python examples/curriculum_ablation.py --quick    # seconds-long smoke test (tiny budget)

Writes ``docs/results/curriculum_ablation.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _experiment import (  # noqa: E402
    REPO,
    Job,
    fmt,
    load_pair,
    pyplot,
    run_job,
    run_jobs,
    runs_to_train,
    task_from_spec,
    write_report,
)
from tiny_teachers import steps_of  # noqa: E402

ARMS: dict[str, dict[str, Any] | None] = {
    "uniform": None,
    "easy_to_hard": {
        "mode": "easy_to_hard",
        "difficulty": "reference_length",
        "pacing": "root",
        "start_fraction": 0.2,
        "full_at": 0.6,
        "measured_weight": 0.5,
    },
    "frontier": {"mode": "frontier", "difficulty": "reference_length"},
}
HARD = 3  # operations of the hardest bucket
GREEDY = "eval/greedy/exact_match"
RKL = "eval/reverse_kl"


# --- runs ------------------------------------------------------------------------------------
def _record_batches() -> None:
    """Make every Trainer of this worker record the operation counts of the examples it trains on."""
    from rl_distill.trainer import Trainer

    if getattr(Trainer.next_batch, "_records", False):
        return
    original = Trainer.next_batch

    def next_batch(self: Any) -> list[Any]:
        batch = original(self)
        # Only arithmetic batches are recorded: the patch must not touch other runs in this process.
        if batch and all("equation" in ex.metadata for ex in batch):
            self.__dict__.setdefault("drawn_ops", []).append([steps_of(ex) for ex in batch])
        return batch

    next_batch._records = True  # type: ignore[attr-defined]
    Trainer.next_batch = next_batch  # type: ignore[method-assign]


def build(job: Job) -> tuple[tuple[Any, Any, Any], Any]:
    """The teacher/student pair and the mixed split, the held-out part cut to ``eval_per_length`` per length."""
    _record_batches()
    task = task_from_spec(job.data)
    keep = job.labels.get("eval_per_length")
    if keep:
        counts: dict[int, int] = {}
        kept = []
        for ex in task.eval:
            n = steps_of(ex)
            if counts.get(n, 0) < keep:
                counts[n] = counts.get(n, 0) + 1
                kept.append(ex)
        task.eval[:] = kept
    return load_pair(job.teacher, job.student), task


def bucket_metrics(trainer: Any, job: Job) -> dict[str, Any]:
    """Per-bucket held-out metrics (from the full ``samples.jsonl``) and the batches' operation counts."""
    ops = [steps_of(ex) for ex in trainer.task.eval]
    rows = [json.loads(line) for line in (trainer.output_dir / "samples.jsonl").read_text().splitlines()]
    out: dict[str, Any] = {"drawn_ops": trainer.__dict__.get("drawn_ops", [])}
    for when, step in (("before", 0), ("after", max(r["step"] for r in rows))):
        per: dict[str, dict[str, list[float]]] = {}
        for r in rows:
            if r["step"] != step:
                continue
            key = "greedy/exact_match" if r["decoding"] == "greedy" else "reverse_kl"
            value = r["reward"] if r["decoding"] == "greedy" else r["reverse_kl"]
            per.setdefault(str(ops[r["index"]]), {}).setdefault(key, []).append(float(value))
        out[when] = {n: {k: sum(v) / len(v) for k, v in d.items()} for n, d in sorted(per.items())}
    return out


def build_jobs(args: argparse.Namespace, report: dict[str, Any]) -> list[Job]:
    """One job per arm and seed."""
    ta = report["args"]
    lengths = [int(n) for n in str(ta["steps"]).split(",")]
    digits = int(ta["digits"])
    budget = max(lengths) * (3 * digits + 6) + digits + 8  # E1's completion budget at the longest chain
    data = {
        "task": "arithmetic",
        "seed": int(ta["seed"]),
        "num_train": int(ta["num_train"]),
        "num_eval": int(ta["num_eval"]),
        "digits": digits,
        "steps": lengths,
        "compact": ta["compact"] == "True",
    }
    eval_n = (
        args.eval_per_length * len(lengths) if args.eval_per_length else int(ta["num_eval"]) * len(lengths)
    )
    jobs = []
    for arm in args.arms:
        for seed in args.seeds:
            train: dict[str, Any] = {
                "steps": args.train_steps,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "warmup_steps": max(1, args.train_steps // 10),
                "lr_schedule": "cosine",
                "eval_batch_size": 128,
                "curriculum": ARMS[arm],
                # A run is done once it is in runs.jsonl; a folder without it is a killed run's leftover.
                "overwrite": True,
            }
            jobs.append(
                Job(
                    key=f"{arm}|seed={seed}",
                    method=arm,
                    seed=seed,
                    teacher=str(args.artifacts / "teacher"),
                    student=str(args.artifacts / "student"),
                    data=data,
                    agent={
                        "name": "gkd",
                        "divergence": "jsd",
                        "beta": 0.5,
                        "lmbda": 1.0,
                        "max_new_tokens": budget,
                    },
                    train=train,
                    eval={"greedy": True, "sampled": True, "max_new_tokens": budget, "num_samples": eval_n},
                    labels={"eval_per_length": args.eval_per_length},
                    threads=args.threads,
                )
            )
    return jobs


# --- statistics ------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value)."""
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def hard_fraction(run: dict[str, Any], lo: float = 0.0, hi: float = 1.0) -> float:
    """Share of ``HARD``-operation examples among those drawn in the steps ``[lo, hi)`` of training."""
    drawn = run["extra"]["drawn_ops"]
    part = drawn[int(lo * len(drawn)) : max(int(lo * len(drawn)) + 1, int(hi * len(drawn)))]
    flat = [n for batch in part for n in batch]
    return sum(n == HARD for n in flat) / max(1, len(flat))


def mean_ops(run: dict[str, Any], lo: float, hi: float) -> float:
    """Mean operations per drawn example in the steps ``[lo, hi)`` of training."""
    drawn = run["extra"]["drawn_ops"]
    part = drawn[int(lo * len(drawn)) : max(int(lo * len(drawn)) + 1, int(hi * len(drawn)))]
    flat = [n for batch in part for n in batch]
    return sum(flat) / max(1, len(flat))


def summarise(runs: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """Per arm: mean/std over seeds of every reported metric, and paired deltas vs ``uniform``."""
    buckets = sorted(runs[0]["extra"]["after"], key=int)
    metrics = {
        "accuracy": lambda r: r["after"][GREEDY],
        "reverse_kl": lambda r: r["after"][RKL],
        "hard_drawn": hard_fraction,
        "hard_drawn_first_quarter": lambda r: hard_fraction(r, 0.0, 0.25),
        "ops_drawn_first_quarter": lambda r: mean_ops(r, 0.0, 0.25),
        **{
            f"accuracy_ops{b}": (lambda r, b=b: r["extra"]["after"][b]["greedy/exact_match"]) for b in buckets
        },
        **{f"reverse_kl_ops{b}": (lambda r, b=b: r["extra"]["after"][b]["reverse_kl"]) for b in buckets},
    }
    out: dict[str, Any] = {"buckets": buckets, "arms": {}}
    base = {r["seed"]: r for r in runs if r["method"] == "uniform"}
    for arm in arms:
        mine = [r for r in runs if r["method"] == arm]
        if not mine:
            continue
        stats: dict[str, Any] = {"n": len(mine)}
        for name, fn in metrics.items():
            stats[name] = mean_std([fn(r) for r in mine])
            paired = [fn(r) - fn(base[r["seed"]]) for r in mine if r["seed"] in base]
            if arm != "uniform" and paired:
                stats[f"delta_{name}"] = mean_std(paired)
        out["arms"][arm] = stats
    first = runs[0]
    out["before"] = {
        "accuracy": first["before"][GREEDY],
        "reverse_kl": first["before"][RKL],
        **{f"accuracy_ops{b}": first["extra"]["before"][b]["greedy/exact_match"] for b in buckets},
    }
    # Share of hard examples per tenth of training, mean over seeds (for the plot).
    out["hard_curve"] = {
        arm: [
            mean_std([hard_fraction(r, i / 10, (i + 1) / 10) for r in runs if r["method"] == arm])[0]
            for i in range(10)
        ]
        for arm in out["arms"]
    }
    return out


# --- report ----------------------------------------------------------------------------------
def table(summary: dict[str, Any]) -> str:
    """Markdown: one row per arm, mean ± std over seeds; a second table of paired deltas vs uniform."""
    b = summary["buckets"]
    head = (
        "| arm | accuracy | "
        + " | ".join(f"acc. {n} ops" for n in b)
        + " | reverse KL | hard drawn (all) | hard drawn (1st quarter) | n |"
    )
    lines = [head, "|" + "---|" * (6 + len(b))]
    before = summary["before"]
    lines.append(
        f"| student before (SFT start) | {before['accuracy']:.3f} | "
        + " | ".join(f"{before[f'accuracy_ops{n}']:.3f}" for n in b)
        + f" | {before['reverse_kl']:.3f} | - | - | 1 |"
    )
    for arm, s in summary["arms"].items():
        lines.append(
            f"| {arm} | {fmt(*s['accuracy'])} | "
            + " | ".join(fmt(*s[f"accuracy_ops{n}"]) for n in b)
            + f" | {fmt(*s['reverse_kl'])} | {fmt(*s['hard_drawn'], 2)} | {fmt(*s['hard_drawn_first_quarter'], 2)}"
            f" | {s['n']} |"
        )
    deltas = [
        "| arm | Δ accuracy | " + " | ".join(f"Δ acc. {n} ops" for n in b) + " | Δ reverse KL |",
        "|" + "---|" * (3 + len(b)),
    ]
    for arm, s in summary["arms"].items():
        if arm == "uniform" or "delta_accuracy" not in s:
            continue
        deltas.append(
            f"| {arm} | {fmt(*s['delta_accuracy'])} | "
            + " | ".join(fmt(*s[f"delta_accuracy_ops{n}"]) for n in b)
            + f" | {fmt(*s['delta_reverse_kl'])} |"
        )
    return (
        "\n".join(lines)
        + "\n\nPaired by seed, arm minus `uniform` (mean ± std over seeds):\n\n"
        + "\n".join(deltas)
        + "\n"
    )


def verdict(summary: dict[str, Any]) -> str:
    """One honest sentence from the numbers: is any curriculum arm's accuracy delta beyond its seed noise?"""
    arms = summary["arms"]
    parts = []
    for arm, s in arms.items():
        if arm == "uniform" or "delta_accuracy" not in s:
            continue
        m, sd = s["delta_accuracy"]
        n = s["n"]
        se = sd / math.sqrt(n) if n > 1 else float("inf")
        clear = abs(m) > 2 * se and n > 1
        word = ("better" if m > 0 else "worse") if clear else "no clear difference"
        parts.append(f"`{arm}` {m:+.3f} accuracy vs uniform ({word}; paired std {sd:.3f}, n={n})")
    if not parts:
        return "only the uniform arm ran; no comparison."
    seeds = max(s["n"] for s in arms.values())
    return (
        "; ".join(parts)
        + ". A difference counts as clear only when the paired mean exceeds twice its standard error; "
        f"with {seeds} seed(s) and a {summary['train_steps']}-step budget this is a small-sample result."
    )


def plot(summary: dict[str, Any], path: Path) -> None:
    """Left: share of hard examples drawn per tenth of training; right: held-out accuracy per bucket."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm, curve in summary["hard_curve"].items():
        axes[0].plot([(i + 0.5) / 10 for i in range(10)], curve, marker="o", label=arm)
    axes[0].set_xlabel("training progress")
    axes[0].set_ylabel(f"share of {HARD}-operation examples drawn")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("What the sampler drew (mean over seeds)")
    axes[0].legend()
    b = summary["buckets"]
    width = 0.8 / (len(summary["arms"]) + 1)
    xs = range(len(b))
    axes[1].bar(
        [x for x in xs],
        [summary["before"][f"accuracy_ops{n}"] for n in b],
        width,
        label="before",
        color="lightgray",
    )
    for k, (arm, s) in enumerate(summary["arms"].items(), 1):
        axes[1].bar(
            [x + k * width for x in xs],
            [s[f"accuracy_ops{n}"][0] for n in b],
            width,
            yerr=[s[f"accuracy_ops{n}"][1] for n in b],
            label=arm,
        )
    axes[1].set_xticks([x + width * len(summary["arms"]) / 2 for x in xs], [f"{n} ops" for n in b])
    axes[1].set_ylabel("held-out greedy accuracy")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("Accuracy per difficulty bucket (± std over seeds)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lscpu_model() -> str:
    """``Model name`` from ``lscpu`` (the CPU, as the brief asks)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Model name")), "unknown"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=REPO / "artifacts" / "arithmetic")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "curriculum_ablation")
    p.add_argument("--results", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--name", default="curriculum_ablation")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4, help="E1's learning rate for GKD on this pair")
    p.add_argument(
        "--eval-per-length", type=int, default=0, help="held-out examples per length (0: the whole split)"
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--quick", action="store_true", help="smoke test: 8 steps, batch 4, 8 held-out per length, seed 0"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.train_steps, args.batch_size, args.eval_per_length = 8, 4, 8
        args.seeds, args.workers = [0], 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    load = os.getloadavg()
    report = json.loads((args.artifacts / "report.json").read_text(encoding="utf-8"))
    jobs = build_jobs(args, report)
    trained = runs_to_train(jobs, args.out)
    runner = partial(run_job, extra_eval=bucket_metrics, build=build)
    runs = run_jobs(jobs, args.out, workers=args.workers, runner=runner)
    summary = summarise(runs, args.arms)
    summary["train_steps"] = args.train_steps
    load_after = os.getloadavg()
    cpu = lscpu_model()
    png = args.results / f"{args.name}.png"
    args.results.mkdir(parents=True, exist_ok=True)
    plot(summary, png)
    n_eval = runs[0]["job"]["eval"]["num_samples"]
    n_train = len(runs[0]["extra"]["drawn_ops"]) and sum(len(b) for b in runs[0]["extra"]["drawn_ops"])
    body = (
        f"On-policy GKD (JSD(0.5), lambda 1) from the cached SFT student to the tiny arithmetic teacher "
        f"(`{args.artifacts.relative_to(REPO) if args.artifacts.is_relative_to(REPO) else args.artifacts}`), "
        f"on the teacher's mixed 1/2/3-operation training split; {args.train_steps} steps, batch "
        f"{args.batch_size} ({n_train} examples drawn per run), AdamW lr {args.lr} (E1's GKD setting on this "
        f"pair, not tuned here; cosine, 10% warm-up). Held-out: {n_eval} problems (all lengths); accuracy = "
        f"greedy exact match; reverse KL = token-level KL(student || teacher) on the student's samples. "
        f'"Hard" = {HARD}-operation problems; uniform draws them about 1/3 of the time.\n\n'
        f"- `lscpu` model name: {cpu}\n"
        f"- Load average (1/5/15 min) at start: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; at end: "
        f"{load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f} (machine shared with other work)\n"
        + ("- `--quick` smoke test: NOT a result.\n" if args.quick else "")
        + "\n## Results\n\n"
        + table(summary)
        + "\n![share of hard examples drawn and per-bucket accuracy]("
        + png.name
        + ")\n\n"
        + "## Verdict\n\n"
        + verdict(summary)
        + "\n"
    )
    data = {
        "summary": summary,
        "runs": runs,
        "lscpu_model": cpu,
        "loadavg_start": load,
        "loadavg_end": load_after,
    }
    return write_report(
        args.name,
        args,
        title="Curriculum vs uniform sampling for on-policy GKD (arithmetic)",
        body=body,
        data=data,
        start=start,
        trained=trained,
    )


if __name__ == "__main__":
    main()
