"""E3: gradient estimators for the distillation objective compared on the same sample budget.

The objective is paper Eq. 5 with ``alpha = 1`` (no task reward): maximise the teacher's log-prob of
the student's own samples plus the student's entropy, i.e. minimise the reverse KL
``KL(pS || pT)`` of the student's sequences. The estimators:

- ``reinforce_none`` / ``reinforce_mean`` / ``reinforce_rloo`` / ``reinforce_value``: REINFORCE with
  reward-to-go on the per-token rewards ``log pT - log pS``, with no baseline, the batch mean, the
  leave-one-out mean of the other samples of the same prompt (RLOO), or a learned value head;
- ``ppo``: PPO-clip with GAE and a value head, 4 epochs x 4 minibatches per batch (16 updates);
  ``ppo_target_kl`` the same with early stopping at approx-KL 0.02 (checked after each epoch);
  ``ppo_1x1`` one update per batch (the same number of updates as the others);
- ``gkd_rkl``: the direct on-policy GKD gradient of the token-level reverse KL (exact expectation
  over the vocabulary at every position, no score-function term over tokens).

Every method samples 32 completions per step (REINFORCE: 8 prompts x 4 samples, the others 32
prompts x 1 sample), trains for the same number of steps from the same SFT-started student, and is
evaluated every ``--eval-every`` steps on the held-out prompts: reverse and forward KL to the teacher
on student samples, the teacher's per-token log-prob (the environment reward), and exact-match
accuracy (sampled and greedy).

Gradient variance: at the starting student, each estimator draws ``--grad-draws`` independent
gradients of its loss on the same prompts (fresh samples each), without stepping. Reported: the
relative variance ``E||g - g_mean||^2 / ||g_mean||^2`` (scale-free: the estimators differ in scale,
sum over tokens vs mean), the mean pairwise cosine between draws, and the cosine of each
estimator's mean gradient with the GKD mean gradient.

    python examples/e3_estimators.py --artifacts artifacts/arithmetic

Writes ``docs/results/e3_estimators.{md,json}`` and ``e3_*.png``; runs resume from ``runs/e3``.
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
    load_pair,
    pyplot,
    run_jobs,
    runs_to_train,
    task_from_spec,
    write_report,
)
from e1_on_vs_off_policy import arithmetic_spec, max_new_tokens  # noqa: E402

#: Method label -> agent section (samples per step kept equal through ``prompts_per_step``).
METHODS: dict[str, dict[str, Any]] = {
    "reinforce_none": {"name": "reinforce", "baseline": "none", "samples_per_prompt": 4},
    "reinforce_mean": {"name": "reinforce", "baseline": "batch_mean", "samples_per_prompt": 4},
    "reinforce_rloo": {"name": "reinforce", "baseline": "leave_one_out", "samples_per_prompt": 4},
    "reinforce_value": {"name": "reinforce", "baseline": "value", "samples_per_prompt": 4},
    "ppo": {"name": "ppo", "update_epochs": 4, "num_minibatches": 4},
    "ppo_target_kl": {"name": "ppo", "update_epochs": 4, "num_minibatches": 4, "target_kl": 0.02},
    "ppo_1x1": {"name": "ppo", "update_epochs": 1, "num_minibatches": 1},
    "gkd_rkl": {"name": "gkd", "divergence": "reverse_kl", "lmbda": 1.0},
}


#: Methods whose first gradient (at the starting student, ratio 1) is another method's: not re-measured.
SAME_FIRST_GRADIENT = {"ppo_target_kl": "ppo", "ppo_1x1": "ppo"}


def prompts_per_step(method: str, samples: int) -> int:
    """Prompts per batch so that every method samples ``samples`` completions per step."""
    return samples // METHODS[method].get("samples_per_prompt", 1)


def build_jobs(args: argparse.Namespace, report: dict[str, Any]) -> list[Job]:
    """One job per (method, seed)."""
    ta = report["args"]
    digits = int(ta["digits"])
    budget = max_new_tokens(args.length, digits)
    jobs = []
    for method in args.methods:
        for seed in args.seeds:
            jobs.append(
                Job(
                    key=f"{method}|seed={seed}",
                    method=method,
                    seed=seed,
                    teacher=str(args.artifacts / "teacher"),
                    student=str(args.artifacts / "student"),
                    data=arithmetic_spec(report, args.length),
                    agent={**METHODS[method], "max_new_tokens": budget},
                    train={
                        "steps": args.train_steps,
                        "batch_size": prompts_per_step(method, args.samples),
                        "lr": args.lr,
                        "warmup_steps": max(1, args.train_steps // 10),
                        "lr_schedule": args.lr_schedule,
                        "eval_every": args.eval_every,
                        "eval_batch_size": 128,
                    },
                    eval={"greedy": True, "sampled": True, "max_new_tokens": budget},
                    threads=args.threads,
                )
            )
    return jobs


def estimator_loss(agent: Any, batch: list[Any]) -> Any:
    """The loss whose gradient is the agent's first update direction on ``batch`` (no step taken)."""
    name = agent.name
    if name == "gkd":
        rollouts, num_on = agent.collect(batch)
        return agent.objective(rollouts, num_on)[0]
    if name == "reinforce":
        return agent.loss(*agent.collect(batch))[0]
    if name == "ppo":
        import torch

        data = agent.collect(batch)
        return agent.minibatch_loss(data, torch.arange(len(data.rollout)))[0]
    raise ValueError(f"no gradient estimator for agent {name!r}")


def gradient_draws(method: str, args: argparse.Namespace, report: dict[str, Any]) -> Any:
    """``(draws, P)`` student gradients of ``method`` at the starting student on fixed prompts."""
    import torch

    from rl_distill.config import config_from_dict
    from rl_distill.trainer import Trainer

    torch.set_num_threads(args.threads * args.workers)
    task = task_from_spec(arithmetic_spec(report, args.length))
    models = load_pair(str(args.artifacts / "teacher"), str(args.artifacts / "student"))
    budget = max_new_tokens(args.length, int(report["args"]["digits"]))
    raw = {
        "model": {"teacher": str(args.artifacts / "teacher"), "device": "cpu"},
        "data": {"task": "arithmetic"},
        "agent": {**METHODS[method], "max_new_tokens": budget},
        "train": {"seed": 0, "tensorboard": False, "save_final": False, "output_dir": str(args.out / "grad")},
    }
    trainer = Trainer(config_from_dict(raw), models=models, task=task)
    student, agent = trainer.student, trainer.agent
    params = [p for p in student.parameters() if p.requires_grad]
    batch = task.train[: prompts_per_step(method, args.samples)]
    draws = []
    student.train()
    for _ in range(args.grad_draws):
        student.zero_grad(set_to_none=True)
        estimator_loss(agent, batch).backward()
        draws.append(torch.cat([p.grad.reshape(-1) for p in params]).double())
    return torch.stack(draws)  # (K, P)


def variance_stats(draws: Any, reference: Any) -> dict[str, float]:
    """Relative variance, mean pairwise cosine, and cosine of the mean with ``reference``."""
    import torch

    k = draws.shape[0]
    mean = draws.mean(0)
    total_var = ((draws - mean) ** 2).sum(1).sum() / (k - 1)  # unbiased trace of the covariance
    unit = draws / draws.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    pairwise = (cos.sum() - cos.diagonal().sum()) / (k * (k - 1))
    return {
        "relative_variance": float(total_var / mean.pow(2).sum()),
        "mean_pairwise_cosine": float(pairwise),
        "cosine_to_gkd_mean": float(torch.nn.functional.cosine_similarity(mean, reference, dim=0)),
        "mean_grad_norm": float(mean.norm()),
        "single_grad_norm": float(draws.norm(dim=1).mean()),
    }


def variance_phase(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Gradient statistics of every method (cached in ``out/variance.json``)."""
    path = args.out / "variance.json"
    measured = list(dict.fromkeys(SAME_FIRST_GRADIENT.get(m, m) for m in args.methods))
    if path.is_file():
        cached = json.loads(path.read_text())
        if set(cached) >= set(measured) and cached.get("_draws") == args.grad_draws:
            return {m: cached[m] for m in measured}
    draws = {m: gradient_draws(m, args, report) for m in measured}
    ref = draws["gkd_rkl"].mean(0) if "gkd_rkl" in draws else next(iter(draws.values())).mean(0)
    stats: dict[str, Any] = {m: variance_stats(d, ref) for m, d in draws.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**stats, "_draws": args.grad_draws}, indent=1) + "\n")
    return stats


CURVE_METRICS = [
    ("eval/reverse_kl", "held-out reverse KL (nats/token)"),
    ("eval/teacher_logprob", "teacher log-prob per token (env reward)"),
    ("eval/greedy/exact_match", "greedy accuracy"),
]


def plot_curves(runs: list[dict[str, Any]], methods: list[str], path: Path) -> None:
    """Learning curves (mean ± std over seeds) of the metrics in :data:`CURVE_METRICS`."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(5 * len(CURVE_METRICS), 4))
    for ax, (metric, label) in zip(axes, CURVE_METRICS):
        for method in methods:
            by_step: dict[int, list[float]] = {}
            for run in runs:
                if run["method"] == method:
                    for row in run["curve"]:
                        if metric in row:
                            by_step.setdefault(row["step"], []).append(row[metric])
            steps = sorted(by_step)
            stats = group_stats(
                [{"s": s, "v": v} for s in steps for v in by_step[s]], ["s"], lambda r: r["v"]
            )
            means = [stats[(s,)][0] for s in steps]
            stds = [stats[(s,)][1] for s in steps]
            ax.plot(steps, means, marker=".", label=method)
            ax.fill_between(
                steps, [m - d for m, d in zip(means, stds)], [m + d for m, d in zip(means, stds)], alpha=0.15
            )
        if metric == "eval/reverse_kl":
            ax.set_yscale("log")  # a diverged run would flatten the others on a linear axis
        elif metric == "eval/teacher_logprob":
            ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel("step (32 samples each)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tables(runs: list[dict[str, Any]], methods: list[str], variance: dict[str, dict[str, float]]) -> str:
    """Final metrics per method, and the gradient statistics."""
    keys = [
        ("eval/reverse_kl", "reverse KL"),
        ("eval/forward_kl", "forward KL"),
        ("eval/teacher_logprob", "teacher log-prob/token"),
        ("eval/exact_match", "sampled accuracy"),
        ("eval/greedy/exact_match", "greedy accuracy"),
    ]
    lines = [
        "| method | " + " | ".join(label for _, label in keys) + " | train s | n |",
        "|---|" + "---|" * (len(keys) + 2),
    ]
    before = runs[0]["before"]
    lines.append("| student before | " + " | ".join(f"{before[k]:.3f}" for k, _ in keys) + " | - | 1 |")
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        cells = [
            fmt(*group_stats(mine, ["method"], lambda r, k=k: r["after"][k])[(method,)][:2]) for k, _ in keys
        ]
        secs = sum(r["train_seconds"] for r in mine) / len(mine)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {secs:.0f} | {len(mine)} |")
    vlines = [
        "| method | relative variance | mean pairwise cosine | cosine to GKD mean | single-draw norm | mean norm |",
        "|---|---|---|---|---|---|",
    ]
    for method in methods:
        if method in SAME_FIRST_GRADIENT:
            vlines.append(f"| {method} | same first gradient as `{SAME_FIRST_GRADIENT[method]}` | | | | |")
        v = variance.get(method)
        if v and method not in SAME_FIRST_GRADIENT:
            vlines.append(
                f"| {method} | {v['relative_variance']:.2f} | {v['mean_pairwise_cosine']:.3f} | "
                f"{v['cosine_to_gkd_mean']:.3f} | {v['single_grad_norm']:.3g} | {v['mean_grad_norm']:.3g} |"
            )
    return (
        "## Final held-out metrics\n\nMean ± std over seeds.\n\n"
        + "\n".join(lines)
        + "\n\n## Gradient estimates at the starting student\n\n"
        + "\n".join(vlines)
        + "\n"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) E3 and write its report (``--report-only``: rebuild the page from its raw JSON)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", type=Path, default=REPO / "artifacts" / "arithmetic")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "e3")
    p.add_argument("--results", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--length", type=int, default=2, help="operations per problem")
    p.add_argument("--samples", type=int, default=32, help="sampled completions per step, every method")
    p.add_argument("--train-steps", type=int, default=120)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--grad-draws", type=int, default=16)
    p.add_argument("--lr-schedule", choices=["constant", "linear", "cosine"], default="cosine")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild e3_estimators.md (and plot) from the committed e3_estimators.json, with its settings; no training",
    )
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.report_only:
        args, cached = cached_report(args, NAME)
        body, data = report_body(args, cached["variance"], cached["runs"])
        return write_report(NAME, args, title=TITLE, body=body, data=data, start=start, cached=cached)
    report_path = args.artifacts / "report.json"
    if not report_path.is_file():
        raise SystemExit(f"{report_path} not found: run examples/tiny_teachers.py first (see E1's docstring)")
    report = json.loads(report_path.read_text())
    if args.samples % 4:
        raise SystemExit(
            f"--samples must be a multiple of 4 (REINFORCE draws 4 per prompt), got {args.samples}"
        )
    variance = variance_phase(args, report)
    jobs = build_jobs(args, report)
    trained = runs_to_train(jobs, args.out)
    runs = run_jobs(jobs, args.out, workers=args.workers)
    body, data = report_body(args, variance, runs)
    return write_report(NAME, args, title=TITLE, body=body, data=data, start=start, trained=trained)


NAME = "e3_estimators"
TITLE = "E3: REINFORCE, PPO and the direct GKD gradient on the same sample budget"


def report_body(
    args: argparse.Namespace, variance: dict[str, dict[str, float]], runs: list[dict[str, Any]]
) -> tuple[str, dict[str, Any]]:
    """``(markdown body, raw data)`` of the page (the curves plot is written too)."""
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, args.methods, results / "e3_curves.png")
    body = (
        "Tiny arithmetic teacher and SFT-started student from `examples/tiny_teachers.py`, "
        f"{args.length}-operation problems. Objective: Eq. 5 with alpha = 1 (reverse KL of the student's "
        f"sequences). Every method: {args.samples} sampled completions per step, {args.train_steps} steps, "
        f"AdamW lr {args.lr} with 10% warm-up and {args.lr_schedule} decay (the same for every method: no per-method tuning). Gradient "
        f"statistics: {args.grad_draws} independent draws per estimator on the same prompts at the "
        "starting student (student parameters only; value-based methods include their value-loss term).\n\n"
        + tables(runs, args.methods, variance)
        + "\n![e3_curves.png](e3_curves.png)\n"
    )
    return body, {"variance": variance, "runs": runs}


if __name__ == "__main__":
    main()
