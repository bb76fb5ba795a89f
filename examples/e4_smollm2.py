"""E4: the real teacher: SmolLM2-135M-Instruct distilled with a verifier reward (paper Eq. 5).

The offline default teacher, SmolLM2-135M-Instruct (30 decoder layers), is distilled into a
kept-layer student (``--student-layers`` of its layers, evenly spaced, embeddings and head copied;
:func:`rl_distill.models.make_kept_layer_student`) on arithmetic word problems ("Tom has 3 pens. He
finds 4 more. How many?", task ``arithmetic``), always on-policy (``lmbda = 1``), with the loss of
paper Eq. 5::

    loss = alpha * JSD(0.5) on student samples  -  (1 - alpha) * REINFORCE(exact_match reward)

The reward is the ``exact_match`` verifier (the last ``#### N`` or, failing that, the last number of
the completion equals the answer), with a leave-one-out baseline over the batch. Compared: pure
on-policy GKD (``alpha = 1``), RL + GKD (``alpha = 0.5``) and pure RL (``alpha = 0``), each over
several seeds, from the same starting student, with the same steps, batch and learning rate.

Metrics on held-out prompts the student never trains on: greedy exact-match accuracy
(``eval/greedy/exact_match``), sampled accuracy (``eval/exact_match``), and the token-level JSD,
forward and reverse KL of the student to the teacher on the student's own samples (``eval/jsd``,
``eval/forward_kl``, ``eval/reverse_kl``, paper Eq. 2), before and after training. The teacher's own
greedy accuracy on the same prompts, with the same completion budget, is the reference point
(computed once and cached in ``<out>/teacher.json``).

    python examples/e4_smollm2.py

The defaults (alpha 1, 0.5 and 0, seeds 0 and 1, 45 steps of 4 prompts each, 32 held-out prompts
evaluated before and after) run one at a time with 2 threads. Measured in this project's session on
2 CPU cores shared with other jobs: 230 s per run (about 3.8 s per step), so about 23 minutes for the
six runs; the published report ran ``--alphas 1 0.5`` (4 runs, 15.4 min). See ``--help`` for the
budget flags. Writes
``docs/results/e4_smollm2.{md,json,png}``; runs resume from ``runs/e4/runs.jsonl`` (a run already
there with the same settings is not run again).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
    read_runs,
    run_job,
    run_jobs,
    runs_to_train,
    write_report,
)

TEACHER = "smollm2-135m-instruct"
NAME = "e4_smollm2"
ACC = "eval/greedy/exact_match"
DIVERGENCES = (("eval/jsd", "JSD(0.5)"), ("eval/forward_kl", "forward KL"), ("eval/reverse_kl", "reverse KL"))


# --- models, task, jobs ------------------------------------------------------------------------
@functools.cache
def load_teacher() -> tuple[Any, Any]:
    """``(teacher, tokenizer)``: SmolLM2-135M-Instruct, frozen, float32 on CPU (loaded once per process)."""
    from rl_distill.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(TEACHER)
    teacher = load_causal_lm(TEACHER, dtype="float32", device="cpu").eval().requires_grad_(False)
    return teacher, tokenizer


def load_task_data(spec: dict[str, Any]) -> Any:
    """The :class:`rl_distill.tasks.TaskData` of a job's ``data`` spec (``task``, sizes, seed, options)."""
    from rl_distill.tasks import load_task

    spec = dict(spec)
    return load_task(
        spec.pop("task"),
        seed=spec.pop("seed"),
        num_train=spec.pop("num_train"),
        num_eval=spec.pop("num_eval"),
        **spec,
    )


def build_e4(job: Job) -> tuple[tuple[Any, Any, Any], Any]:
    """``((teacher, student, tokenizer), task)`` of an E4 job: a fresh kept-layer student of the teacher."""
    from rl_distill.models import make_kept_layer_student

    teacher, tokenizer = load_teacher()
    layers = job.model["student_layers"]
    student = make_kept_layer_student(
        teacher,
        num_layers=layers if isinstance(layers, int) else None,
        layers=layers if isinstance(layers, list) else None,
    )
    # The student is a copy of the frozen teacher: make its copy trainable again.
    student.train().requires_grad_(True)
    return (teacher, student, tokenizer), load_task_data(job.data)


def training_trace(trainer: Any, job: Job) -> dict[str, Any]:
    """Per-step training divergence and verifier reward, and the final greedy samples of a run."""
    from rl_distill.logger import read_jsonl

    rows = read_jsonl(Path(trainer.output_dir) / "metrics.jsonl")
    trace = [
        {
            "step": r["step"],
            "divergence": r.get("train/divergence"),
            "reward": r.get("rollout/external_reward"),
        }
        for r in rows
        if "train/loss" in r
    ]
    samples_path = Path(trainer.output_dir) / "samples.jsonl"
    samples = read_jsonl(samples_path) if samples_path.is_file() else []
    final = [s for s in samples if s["step"] == trainer.step and s["decoding"] == "greedy"]
    return {
        "train_curve": trace,
        "greedy_samples": [
            {k: s[k] for k in ("prompt", "completion", "reward", "reference")} for s in final[:3]
        ],
    }


def run_e4_job(job: Job, out_root: str) -> dict[str, Any]:
    """The E4 runner for :func:`run_jobs`: :func:`run_job` with the kept-layer student and the trace."""
    return run_job(job, out_root, training_trace, build=build_e4)


def parse_layers(text: str) -> int | list[int]:
    """``"6"`` (keep 6 evenly spaced layers) or ``"0,6,12,17,23,29"`` (these indices).

    Raises:
        argparse.ArgumentTypeError: not a positive count nor a comma-separated list of indices.
    """
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a layer count or comma-separated indices, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("no student layers given")
    if "," not in text:
        if values[0] < 1:
            raise argparse.ArgumentTypeError(f"the student needs at least one layer, got {values[0]}")
        return values[0]
    return values


def parse_alpha(text: str) -> float:
    """An Eq.-5 weight in [0, 1].

    Raises:
        argparse.ArgumentTypeError: not a number in [0, 1].
    """
    try:
        alpha = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise argparse.ArgumentTypeError(f"alpha must be in [0, 1], got {alpha}")
    return alpha


def method_name(alpha: float) -> str:
    """Table label of an Eq.-5 weight: on-policy GKD, RL + GKD or pure RL."""
    if alpha == 1.0:
        return "on-policy GKD (alpha=1)"
    if alpha == 0.0:
        return "RL only (alpha=0)"
    return f"RL + GKD (alpha={alpha:g})"


def data_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The arithmetic split (fixed by ``--data-seed``; the same for every run)."""
    return {
        "task": "arithmetic",
        "seed": args.data_seed,
        "num_train": args.num_train,
        "num_eval": args.num_eval,
        "digits": args.digits,
        "steps": args.ops,
        "compact": args.compact,
    }


def build_jobs(args: argparse.Namespace) -> list[Job]:
    """One job per (alpha, seed)."""
    jobs = []
    for alpha in args.alphas:
        for seed in args.seeds:
            jobs.append(
                Job(
                    key=f"alpha={alpha:g}|seed={seed}",
                    method=method_name(alpha),
                    seed=seed,
                    teacher=TEACHER,
                    student=f"{TEACHER} kept layers {args.student_layers}",
                    data=data_spec(args),
                    agent={
                        "name": "gkd",
                        "divergence": "jsd",
                        "beta": 0.5,
                        "lmbda": 1.0,
                        "alpha": alpha,
                        "reward": "exact_match",
                        "baseline": "leave_one_out",
                        "max_new_tokens": args.max_new_tokens,
                    },
                    train={
                        "steps": args.steps,
                        "batch_size": args.batch_size,
                        "lr": args.lr,
                        "warmup_steps": max(1, args.steps // 10),
                        "eval_every": args.eval_every,
                        "eval_batch_size": args.eval_batch_size,
                    },
                    eval={"greedy": True, "sampled": True, "reward": "exact_match"},
                    labels={"alpha": alpha},
                    threads=args.threads,
                    model={"student_layers": args.student_layers},
                )
            )
    return jobs


def check_resumable(jobs: list[Job], out: Path) -> None:
    """Refuse to mix runs of other settings into this experiment's ``runs.jsonl``.

    Raises:
        SystemExit: a recorded run has a job key of this experiment but other settings (steps, lr, ...).
    """
    wanted = {j.key: json.loads(json.dumps(dataclasses.asdict(j))) for j in jobs}
    for run in read_runs(out / "runs.jsonl"):
        want = wanted.get(run.get("key"))
        if want is None:
            continue
        got = {k: v for k, v in run.get("job", {}).items() if k != "threads"}
        if got != {k: v for k, v in want.items() if k != "threads"}:
            diff = sorted(k for k in want if k != "threads" and got.get(k) != want[k])
            raise SystemExit(
                f"{out / 'runs.jsonl'} holds run {run['key']!r} with other settings ({', '.join(diff)}); "
                "pass another --out or remove that file to start over"
            )


# --- the teacher's reference accuracy ----------------------------------------------------------
def teacher_reference(args: argparse.Namespace) -> dict[str, Any]:
    """The teacher's greedy accuracy on the held-out prompts (cached in ``<out>/teacher.json``).

    Same prompts, chat template, completion budget and verifier as the students' greedy evaluation.
    """
    import torch

    from rl_distill.rewards.registry import build_reward, score_examples
    from rl_distill.rollout import RolloutEngine, SamplingConfig

    settings = {"teacher": TEACHER, "data": data_spec(args), "max_new_tokens": args.max_new_tokens}
    path = args.out / "teacher.json"
    if path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("settings") == settings:
            return cached
    torch.set_num_threads(args.threads)
    teacher, tokenizer = load_teacher()
    task = load_task_data(data_spec(args))
    engine = RolloutEngine(teacher, teacher, tokenizer)
    verifier = build_reward("exact_match")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0)
    start = time.perf_counter()
    rows = []
    with torch.no_grad():
        for lo in range(0, len(task.eval), args.eval_batch_size):
            batch = task.eval[lo : lo + args.eval_batch_size]
            prompts = [ex.prompt for ex in batch]
            completions = engine.decode(engine.generate(prompts, sampling, model=teacher))
            rewards = score_examples(verifier, batch, completions)
            rows += [
                {"prompt": p, "completion": c, "reward": r, "answer": ex.metadata["answer"]}
                for p, c, r, ex in zip(prompts, completions, rewards, batch, strict=True)
            ]
    result = {
        "settings": settings,
        "accuracy": sum(r["reward"] for r in rows) / len(rows),
        "n": len(rows),
        "seconds": time.perf_counter() - start,
        "samples": rows[:4],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


# --- report ------------------------------------------------------------------------------------
def paired(runs: list[dict[str, Any]], a: float, b: float, metric: str) -> tuple[float, float, int] | None:
    """Mean ± std over seeds of ``after[metric]`` of alpha ``a`` minus that of alpha ``b`` (same seed)."""
    by = {(r["alpha"], r["seed"]): r["after"][metric] for r in runs}
    diffs = [by[(a, s)] - by[(b, s)] for (al, s) in by if al == a and (b, s) in by]
    if not diffs:
        return None
    return group_stats([{"d": d, "k": 0} for d in diffs], ["k"], lambda r: r["d"])[(0,)]


def train_reward(run: dict[str, Any]) -> float | None:
    """Mean verifier reward of the training samples over the run (None when the reward was not used)."""
    values = [p["reward"] for p in run["extra"]["train_curve"] if p["reward"] is not None]
    return sum(values) / len(values) if values else None


def tables(runs: list[dict[str, Any]], teacher: dict[str, Any], alphas: list[float]) -> str:
    """Markdown: accuracy, divergences, training reward and the paired RL + GKD vs GKD difference."""
    before = runs[0]["before"]
    stat = {
        name: group_stats(runs, ["alpha"], fn)
        for name, fn in {
            "acc": lambda r: r["after"][ACC],
            "gain": lambda r: r["after"][ACC] - r["before"][ACC],
            "sampled": lambda r: r["after"]["eval/exact_match"],
            **{key: (lambda r, key=key: r["after"][key]) for key, _ in DIVERGENCES},
            "tdiv": lambda r: r["extra"]["train_curve"][-1]["divergence"],
        }.items()
    }
    order = [a for a in alphas if (a,) in stat["acc"]]
    lines = [
        "### Held-out accuracy",
        "",
        "Exact match of the final answer on the held-out prompts, greedy (sampled at temperature 1 in "
        "the last column but one), mean ± std over seeds.",
        "",
        "| model | greedy accuracy | change from start | sampled accuracy | seeds |",
        "|---|---|---|---|---|",
        f"| teacher (SmolLM2-135M-Instruct) | {teacher['accuracy']:.3f} | | | |",
        f"| student at start | {before[ACC]:.3f} | | {before['eval/exact_match']:.3f} | |",
    ]
    for a in order:
        m, s, n = stat["acc"][(a,)]
        lines.append(
            f"| {method_name(a)} | {fmt(m, s)} | {fmt(*stat['gain'][(a,)][:2], digits=3)} | "
            f"{fmt(*stat['sampled'][(a,)][:2])} | {n} |"
        )
    lines += [
        "",
        "### Token-level divergence to the teacher on student samples",
        "",
        "Paper Eq. 2 on the student's own samples of the held-out prompts (temperature 1, fixed "
        "evaluation seed), nats per token, mean ± std over seeds; the last column is the training "
        "JSD of the last step's batch.",
        "",
        "| model | " + " | ".join(label for _, label in DIVERGENCES) + " | training JSD (last step) |",
        "|---|---|---|---|---|",
        "| student at start | " + " | ".join(f"{before[k]:.3f}" for k, _ in DIVERGENCES) + " | |",
    ]
    for a in order:
        cells = [fmt(*stat[k][(a,)][:2]) for k, _ in DIVERGENCES]
        lines.append(f"| {method_name(a)} | " + " | ".join(cells) + f" | {fmt(*stat['tdiv'][(a,)][:2])} |")
    rl = [r for r in runs if r["alpha"] < 1.0]
    if rl:
        lines += [
            "",
            "### The verifier reward during training",
            "",
            "Mean exact-match reward of the on-policy training samples over all steps (the fraction of "
            "sampled completions that were right), per run.",
            "",
            "| run | mean training reward | steps with any reward > 0 |",
            "|---|---|---|",
        ]
        for r in sorted(rl, key=lambda r: (-r["alpha"], r["seed"])):
            curve = r["extra"]["train_curve"]
            hits = sum(1 for p in curve if (p["reward"] or 0.0) > 0.0)
            lines.append(
                f"| alpha={r['alpha']:g}, seed {r['seed']} | {train_reward(r):.4f} | {hits} / {len(curve)} |"
            )
    comparisons = [(a, 1.0) for a in order if a != 1.0 and (1.0,) in stat["acc"]]
    if comparisons:
        lines += [
            "",
            "### Paired difference from on-policy GKD (same seed)",
            "",
            "| alpha vs 1 | greedy accuracy | reverse KL | pairs |",
            "|---|---|---|---|",
        ]
        for a, b in comparisons:
            acc, rkl = paired(runs, a, b, ACC), paired(runs, a, b, "eval/reverse_kl")
            if acc is not None and rkl is not None:
                lines.append(f"| {a:g} | {fmt(acc[0], acc[1])} | {fmt(rkl[0], rkl[1])} | {acc[2]} |")
    return "\n".join(lines) + "\n"


def findings(runs: list[dict[str, Any]], teacher: dict[str, Any]) -> str:
    """Plain statements read off the data (no claim the numbers do not support)."""
    before = runs[0]["before"]
    out = [
        f"- The teacher itself solves {teacher['accuracy']:.1%} of the held-out prompts greedily "
        f"({teacher['n']} prompts): SmolLM2-135M is weak at arithmetic and answers in free text, so "
        "the verifier reads the last number it writes.",
        f"- The kept-layer student starts at greedy accuracy {before[ACC]:.3f} and held-out reverse KL "
        f"{before['eval/reverse_kl']:.2f} nats/token.",
    ]
    rl = [r for r in runs if r["alpha"] < 1.0]
    if rl:
        total = sum(sum(p["reward"] or 0.0 for p in r["extra"]["train_curve"]) for r in rl)
        if total == 0.0:
            consequences = []
            if any(0.0 < r["alpha"] < 1.0 for r in rl):
                consequences.append(
                    "0 < alpha < 1 then only rescales the GKD loss (which AdamW largely normalises away)"
                )
            if any(r["alpha"] == 0.0 for r in rl):
                consequences.append("alpha = 0 gets a zero gradient and leaves the student unchanged")
            out.append(
                "- No on-policy training sample of any alpha < 1 run earned a reward: with a "
                "leave-one-out baseline every advantage was 0, so the REINFORCE term of Eq. 5 contributed "
                f"no gradient; {'; '.join(consequences)}. A sparse verifier reward needs a student that is "
                "sometimes right before RL can help."
            )
        else:
            out.append(
                f"- Training samples of the alpha < 1 runs earned a nonzero reward in "
                f"{sum(1 for r in rl for p in r['extra']['train_curve'] if (p['reward'] or 0) > 0)} steps "
                "in all (table above), so the REINFORCE term of Eq. 5 did act on those steps."
            )
    return "\n".join(out) + "\n"


def samples_md(runs: list[dict[str, Any]], teacher: dict[str, Any], alphas: list[float]) -> str:
    """Markdown: a few greedy completions of the teacher and of each trained student (first seed)."""

    def clip(text: str) -> str:
        return " ".join(text.split())[:160].replace("|", "\\|")

    lines = ["| model | prompt | greedy completion (clipped) | right |", "|---|---|---|---|"]
    for s in teacher["samples"][:2]:
        lines.append(f"| teacher | {clip(s['prompt'])} | {clip(s['completion'])} | {s['reward']:g} |")
    for a in alphas:
        first = sorted((r for r in runs if r["alpha"] == a), key=lambda r: r["seed"])
        for s in first[0]["extra"]["greedy_samples"][:1] if first else []:
            lines.append(
                f"| {method_name(a)}, seed {first[0]['seed']} | {clip(s['prompt'])} | "
                f"{clip(s['completion'])} | {s['reward']:g} |"
            )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], teacher: dict[str, Any], alphas: list[float], path: Path) -> None:
    """Three panels: greedy accuracy, held-out divergences before/after, training JSD per step."""
    plt = pyplot()
    order = [a for a in alphas if any(r["alpha"] == a for r in runs)]
    before = runs[0]["before"]
    colors = {
        a: plt.get_cmap("viridis")(0.15 + 0.7 * i / max(1, len(order) - 1)) for i, a in enumerate(order)
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    acc = group_stats(runs, ["alpha"], lambda r: r["after"][ACC])
    xs = list(range(len(order)))
    ax.bar(xs, [acc[(a,)][0] for a in order], yerr=[acc[(a,)][1] for a in order], capsize=3,
           color=[colors[a] for a in order])  # fmt: skip
    for x, a in zip(xs, order, strict=True):
        ax.text(x, acc[(a,)][0] + acc[(a,)][1], f"{acc[(a,)][0]:.3f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(teacher["accuracy"], color="tab:red", ls="-", lw=1.5, label="teacher")
    ax.axhline(before[ACC], color="k", ls="--", lw=1, label="student at start")
    ax.set_xticks(xs, [f"alpha={a:g}" for a in order])
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_ylim(0, max(0.05, teacher["accuracy"], *(acc[(a,)][0] + acc[(a,)][1] for a in order)) * 1.25)
    ax.set_title("accuracy after training")
    ax.legend(fontsize=8)
    ax = axes[1]
    width = 0.8 / (len(order) + 1)
    for i, (key, _) in enumerate(DIVERGENCES):
        ax.bar(i, before[key], width, color="lightgray", label="start" if i == 0 else None)
        for j, a in enumerate(order):
            m, s, _ = group_stats(
                [r for r in runs if r["alpha"] == a], ["alpha"], lambda r, k=key: r["after"][k]
            )[(a,)]
            ax.bar(i + (j + 1) * width, m, width, yerr=s, capsize=2, color=colors[a],
                   label=f"alpha={a:g}" if i == 0 else None)  # fmt: skip
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(DIVERGENCES))], [label for _, label in DIVERGENCES])
    ax.set_ylabel("nats / token (student samples)")
    ax.set_title("held-out divergence to the teacher")
    ax.legend(fontsize=8)
    ax = axes[2]
    for a in order:
        curves = [r["extra"]["train_curve"] for r in runs if r["alpha"] == a]
        steps = [p["step"] for p in curves[0]]
        mean = [sum(c[i]["divergence"] for c in curves) / len(curves) for i in range(len(steps))]
        k = max(1, len(steps) // 10)  # moving average over ~10% of the run
        smooth = [
            sum(mean[max(0, i - k + 1) : i + 1]) / len(mean[max(0, i - k + 1) : i + 1])
            for i in range(len(mean))
        ]
        ax.plot(steps, smooth, color=colors[a], label=f"alpha={a:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("training JSD(0.5) per token")
    ax.set_title("training divergence (mean over seeds, smoothed)")
    ax.legend(fontsize=8)
    fig.suptitle("E4: SmolLM2-135M-Instruct -> kept-layer student, arithmetic, verifier reward (Eq. 5)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags (defaults: the ~12-minute budget of the published run)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", type=Path, default=REPO / "runs" / "e4", help="runs.jsonl, run folders, teacher.json"
    )
    p.add_argument("--results", type=Path, default=REPO / "docs" / "results", help="where the report goes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument(
        "--alphas", type=parse_alpha, nargs="+", default=[1.0, 0.5, 0.0], help="Eq. 5 weights in [0, 1]"
    )
    p.add_argument("--steps", type=int, default=45, help="training steps per run")
    p.add_argument("--batch-size", type=int, default=4, help="prompts (on-policy samples) per step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--student-layers", type=parse_layers, default=6, help="a count (evenly spaced) or indices a,b,c"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=48, help="completion budget (training and evaluation)"
    )
    p.add_argument("--num-train", type=int, default=256)
    p.add_argument("--num-eval", type=int, default=32, help="held-out prompts")
    p.add_argument("--eval-batch-size", type=int, default=16, help="held-out prompts per evaluation batch")
    p.add_argument("--digits", type=int, default=1)
    p.add_argument("--ops", type=int, default=1, help="additions/subtractions per problem")
    p.add_argument("--compact", action="store_true", help='"3+4=?" instead of a word problem')
    p.add_argument(
        "--data-seed", type=int, default=0, help="seed of the train/eval split (fixed across runs)"
    )
    p.add_argument(
        "--eval-every", type=int, default=0, help="extra held-out evaluations (0: start and end only)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (runs go one at a time)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help=f"rebuild {NAME}.md (and plot) from the committed {NAME}.json, with its settings; no training",
    )
    args = p.parse_args(argv)
    for name in (
        "steps",
        "batch_size",
        "max_new_tokens",
        "num_train",
        "num_eval",
        "eval_batch_size",
        "threads",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch_size < 2 and any(a < 1.0 for a in args.alphas):
        p.error("--batch-size must be >= 2 for alpha < 1: the leave-one-out baseline needs other samples")
    if len(set(args.alphas)) != len(args.alphas) or len(set(args.seeds)) != len(args.seeds):
        p.error("--alphas and --seeds must not repeat values")
    return args


TITLE = "E4: the real teacher (SmolLM2-135M-Instruct, verifier reward, paper Eq. 5)"


def report_body(
    args: argparse.Namespace, teacher: dict[str, Any], runs: list[dict[str, Any]]
) -> tuple[str, dict[str, Any]]:
    """``(markdown body, raw data)`` of the page (the plot is written too)."""
    png = Path(args.results) / f"{NAME}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, teacher, args.alphas, png)
    kept = runs[0]["job"]["model"]["student_layers"]
    body = (
        f"Teacher: SmolLM2-135M-Instruct (the offline built-in, 30 layers, chat template). Student: "
        f"its kept-layer copy with `student_layers={kept}` (embeddings, final norm and head copied). "
        f"Task: `arithmetic`, {args.digits}-digit operands, {args.ops} operation(s), "
        f"{'compact' if args.compact else 'word-problem'} prompts; {args.num_train} training and "
        f"{args.num_eval} held-out prompts (split seed {args.data_seed}). Each run: {args.steps} steps of "
        f"{args.batch_size} on-policy samples (lambda = 1, temperature 1, at most {args.max_new_tokens} "
        f"new tokens), AdamW lr {args.lr:g} with linear warm-up over {max(1, args.steps // 10)} steps, "
        "grad-norm clip 1; loss of paper Eq. 5 with JSD(0.5) and the `exact_match` verifier reward "
        "(leave-one-out baseline).\n\n"
        "## Results\n\n"
        + tables(runs, teacher, args.alphas)
        + "\n## Findings\n\n"
        + findings(runs, teacher)
        + "\n## Example completions\n\n"
        + samples_md(runs, teacher, args.alphas)
        + f"\n![{png.name}]({png.name})\n"
    )
    data = {
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "report_only"
        },
        "teacher": teacher,
        "runs": runs,
    }
    return body, data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) E4 and write its report (``--report-only``: rebuild the page from its raw JSON)."""
    args = parse_args(argv)
    start = time.perf_counter()
    if args.report_only:
        args, cached = cached_report(args, NAME)
        body, data = report_body(args, cached["teacher"], cached["runs"])
        return write_report(NAME, args, title=TITLE, body=body, data=data, start=start, cached=cached)
    from rl_distill.models import smollm2_gguf_path
    from rl_distill.models.builtin import SMOLLM2_NAME, cache_dir

    if not (cache_dir() / SMOLLM2_NAME / "model.safetensors").is_file():
        try:
            smollm2_gguf_path()
        except FileNotFoundError as err:
            raise SystemExit(f"E4 needs the SmolLM2 teacher: {err}") from None
    jobs = build_jobs(args)
    check_resumable(jobs, args.out)
    teacher = teacher_reference(args)
    print(f"teacher greedy accuracy {teacher['accuracy']:.3f} on {teacher['n']} held-out prompts", flush=True)
    trained = runs_to_train(jobs, args.out)
    runs = run_jobs(jobs, args.out, workers=1, runner=run_e4_job)
    body, data = report_body(args, teacher, runs)
    return write_report(NAME, args, title=TITLE, body=body, data=data, start=start, trained=trained)


if __name__ == "__main__":
    main()
