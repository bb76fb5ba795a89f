"""Self-distillation (tutorial ch. 6): OPSD, SPIN and verifier-only GRPO (SD-ZERO) on tiny arithmetic.

Three experiments from the same SFT-started student of ``examples/tiny_teachers.py`` (compact
arithmetic, 2 operations, the held-out split neither model trained on):

- **OPSD** (mechanism 1, privileged information): on-policy GKD whose teacher is a frozen copy of the
  SFT student that reads the question *plus its answer* (``model.teacher: self``,
  ``agent.teacher_template``), against plain on-policy GKD from the tiny arithmetic teacher, same
  divergence, budget and learning rate. Before anything trains, the script also measures what the
  hint does to the self-teacher: its greedy accuracy when it decodes from the hinted prompt.
- **SPIN** (mechanism 2, self-play): ``--spin-rounds`` rounds of ``--spin-round-steps`` updates;
  ``KL(model || ref)`` at the end of each round (held-out prompts) and accuracy per round. Does the
  KL flatten (saturation), and does accuracy stop improving?
- **SD-ZERO** (mechanism 3, verifier only): GRPO with the exact-match verifier and no teacher,
  against RL + on-policy GKD (paper Eq. 5, ``alpha = 0.5``, the same verifier, the tiny teacher),
  the same samples per step (``--group-size`` per prompt, group-normalised advantages in both) and
  the same number of steps.

Metrics: held-out exact-match accuracy, greedy (``eval/greedy/exact_match``) and sampled at
temperature 1 (``eval/exact_match``), before and after; mean ± sample std over seeds.

    python examples/tiny_teachers.py --task arithmetic --compact --steps 1,2,3 --num-train 8000 \\
        --teacher-steps 2500 --student-steps 1600 --out artifacts/arithmetic
    python examples/self_distillation.py --artifacts artifacts/arithmetic

Writes ``docs/results/self_distillation.{md,json,png}``; runs resume from ``runs/self_distillation``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from functools import partial
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
    relative,
    run_job,
    run_jobs,
    runs_to_train,
    task_from_spec,
    write_report,
)
from e1_on_vs_off_policy import arithmetic_spec, max_new_tokens  # noqa: E402

NAME = "self_distillation"
TITLE = "Self-distillation (tutorial ch. 6): OPSD, SPIN, verifier-only GRPO"
#: The default privileged context of the OPSD teacher: the question, then its answer (compact prompts: "12+7-5=?").
TEMPLATE = "{prompt}{answer}="
#: Teacher templates whose effect on the self-teacher is measured (greedy accuracy from the hinted prompt).
PROBE_TEMPLATES = ("{prompt}{answer}=", "{answer} {prompt}", "{prompt} #### {answer}", "{prompt}{reference}")
GREEDY, SAMPLED = "eval/greedy/exact_match", "eval/exact_match"


def methods(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Method label -> ``{"experiment", "model", "agent", "train"}`` overrides."""
    gkd = {"name": "gkd", "divergence": args.divergence, "lmbda": 1.0}
    k = args.group_size
    out: dict[str, dict[str, Any]] = {
        "opsd": {
            "experiment": "opsd",
            "model": {"teacher": "self"},
            "agent": {**gkd, "teacher_template": args.template},
        },
        "gkd": {"experiment": "opsd", "model": {}, "agent": gkd},
        "spin": {
            "experiment": "spin",
            "model": {"teacher": None},
            "agent": {
                "name": "spin",
                "beta": args.spin_beta,
                "round_steps": args.spin_round_steps,
                "temperature": 1.0,
                "saturation_prompts": args.num_eval,
            },
            "train": {
                "steps": args.spin_rounds * args.spin_round_steps,
                "eval_every": args.spin_round_steps,
                "lr_schedule": "constant",
                "warmup_steps": 0,
            },
        },
        "grpo": {
            "experiment": "sd_zero",
            "model": {"teacher": None},
            "agent": {"name": "grpo", "samples_per_prompt": k, "advantage": "group_norm", "update_epochs": 2},
        },
        "rl_gkd": {
            "experiment": "sd_zero",
            "model": {},
            "agent": {
                **gkd,
                "alpha": 0.5,
                "reward": "exact_match",
                "samples_per_prompt": k,
                "baseline": "group_norm",
            },
        },
    }
    # The same two at a lower learning rate: is a change the mechanism's or the step size's?
    for name in ("grpo", "rl_gkd"):
        out[f"{name}_low_lr"] = {**out[name], "train": {"lr": args.low_lr}}
    return out


def build_jobs(args: argparse.Namespace, report: dict[str, Any]) -> list[Job]:
    """One job per method and seed; GRPO and RL+GKD draw ``group_size`` samples of ``batch/group_size`` prompts."""
    spec = arithmetic_spec(report, args.length)
    budget = max_new_tokens(args.length, int(report["args"]["digits"]))
    jobs = []
    for method, m in methods(args).items():
        if args.methods and method not in args.methods:
            continue
        grouped = m["experiment"] == "sd_zero"
        train = {
            "steps": args.train_steps,
            "batch_size": args.batch_size // args.group_size if grouped else args.batch_size,
            "lr": args.lr,
            "warmup_steps": max(1, args.train_steps // 10),
            "lr_schedule": "cosine",
            "eval_batch_size": args.num_eval,
            **m.get("train", {}),
        }
        for seed in args.seeds:
            jobs.append(
                Job(
                    key=f"{method}|seed={seed}",
                    method=method,
                    seed=seed,
                    teacher=str(args.artifacts / "teacher"),
                    student=str(args.artifacts / "student"),
                    data=spec,
                    agent={**m["agent"], "max_new_tokens": budget},
                    train=train,
                    eval={"greedy": True, "reward": "exact_match", "num_samples": 2},
                    labels={"experiment": m["experiment"], "num_eval": args.num_eval},
                    threads=args.threads,
                    # teacher self / null: the config names the student (the tokenizer's source)
                    model={**m["model"], "student": str(args.artifacts / "student")} if m["model"] else {},
                )
            )
    return jobs


def build(job: Job) -> tuple[tuple[Any, Any, Any], Any]:
    """Models and task of a job: the saved pair (teacher None for ``self``/``null``), first ``num_eval`` held-out."""
    from rl_distill.tasks import TaskData

    teacher, student, tokenizer = load_pair(job.teacher, job.student)
    if "teacher" in job.model:  # self (a frozen copy of the student, made by the build step) or null
        teacher = None
    task = task_from_spec(job.data)
    return (teacher, student, tokenizer), TaskData(task.name, task.train, task.eval[: job.labels["num_eval"]])


def spin_rounds(trainer: Any, job: Job) -> dict[str, Any] | None:
    """SPIN's end-of-round ``KL(model || ref)`` from the run's metrics (None for other methods)."""
    if job.method != "spin":
        return None
    from rl_distill.logger import read_jsonl

    rows = read_jsonl(trainer.output_dir / "metrics.jsonl")
    size = job.agent["round_steps"]
    rounds: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if "rollout/dpo_logit" in r:
            rounds.setdefault((r["step"] - 1) // size, []).append(r)

    def mean(key: str, part: list[dict[str, Any]]) -> float:
        return sum(r[key] for r in part) / len(part)

    return {
        "spin_kl": [[r["step"], r["rollout/spin_kl"]] for r in rows if "rollout/spin_kl" in r],
        # per round: the share of samples equal to their reference (no DPO signal) and the mean logit h
        "same": [mean("rollout/rejected_equals_chosen", rounds[i]) for i in sorted(rounds)],
        "dpo_logit": [mean("rollout/dpo_logit", rounds[i]) for i in sorted(rounds)],
    }


def privileged_teacher_accuracy(
    args: argparse.Namespace, report: dict[str, Any], template: str
) -> dict[str, float]:
    """Greedy accuracy of the SFT student decoding from the plain and from the hinted (privileged) prompt."""
    import torch

    from rl_distill.evaluation import evaluation_rows
    from rl_distill.rewards.registry import resolve_reward
    from rl_distill.rollout import RolloutEngine, SamplingConfig
    from rl_distill.rollout.engine import format_teacher_prompt
    from rl_distill.tasks import Example

    torch.set_num_threads(args.threads)
    _, student, tokenizer = load_pair(str(args.artifacts / "teacher"), str(args.artifacts / "student"))
    examples = task_from_spec(arithmetic_spec(report, args.length)).eval[: args.num_eval]
    hinted = [Example(format_teacher_prompt(template, ex), ex.reference, ex.metadata) for ex in examples]
    engine = RolloutEngine(student, copy.deepcopy(student), tokenizer)
    sampling = SamplingConfig(max_new_tokens(args.length, int(report["args"]["digits"])), temperature=0.0)
    reward = resolve_reward("exact_match")
    out = {}
    for label, exs in (("plain", examples), ("hinted", hinted)):
        rows = evaluation_rows(engine, exs, sampling=sampling, batch_size=args.num_eval, reward=reward)
        out[label] = sum(r["reward"] for r in rows) / len(rows)
    return out


def lscpu_model() -> str:
    """``Model name`` from ``lscpu`` (the machine the numbers were measured on)."""
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (lscpu failed)"
    return next(
        (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
        "unknown",
    )


# ---------------------------------------------------------------------------------------------
# The report: every number from the runs' JSON.
# ---------------------------------------------------------------------------------------------
def stat(runs: list[dict[str, Any]], method: str, where: str, key: str) -> tuple[float, float, int]:
    """``(mean, std, n)`` of ``run[where][key]`` over the seeds of ``method``."""
    picked = [r for r in runs if r["method"] == method]
    got = group_stats(picked, ["method"], lambda r: r[where][key])
    return got.get((method,), (math.nan, math.nan, 0))


def per_round(runs: list[dict[str, Any]], round_steps: int) -> list[dict[str, Any]]:
    """SPIN per round: KL(model || ref) at the round's end and the accuracies after it, over seeds."""
    from rl_distill.compare import mean_std

    spin = [r for r in runs if r["method"] == "spin"]
    if not spin:
        return []
    rounds = len(spin[0]["extra"]["spin_kl"])
    out = []
    for i in range(rounds):
        step = (i + 1) * round_steps
        kls = [r["extra"]["spin_kl"][i][1] for r in spin]
        evals = [next((c for c in r["curve"] if c["step"] == step), None) for r in spin]
        evals = [e for e in evals if e is not None]
        out.append(
            {
                "round": i + 1,
                "step": step,
                "kl": mean_std(kls),
                "greedy": mean_std([e[GREEDY] for e in evals]),
                "sampled": mean_std([e[SAMPLED] for e in evals]),
                "same": mean_std([r["extra"]["same"][i] for r in spin]),
                "dpo_logit": mean_std([r["extra"]["dpo_logit"][i] for r in spin]),
            }
        )
    return out


def delta(runs: list[dict[str, Any]], method: str, key: str) -> tuple[float, float, int]:
    """``(mean, std, n)`` of ``after - before`` of ``key`` over the seeds of ``method``."""
    picked = [r for r in runs if r["method"] == method]
    got = group_stats(picked, ["method"], lambda r: r["after"][key] - r["before"][key])
    return got.get((method,), (math.nan, math.nan, 0))


def verdict_change(d: tuple[float, float, int]) -> str:
    """Words for a mean change with its seed spread: up/down when the mean exceeds one std, else flat."""
    mean, std, _ = d
    if math.isnan(mean):
        return "not measured"
    if abs(mean) <= (std if not math.isnan(std) else 0.0):
        return f"no clear change ({mean:+.3f} ± {std:.3f})"
    return f"{'up' if mean > 0 else 'down'} {mean:+.3f} ± {std:.3f}"


def report_body(args: argparse.Namespace, data: dict[str, Any]) -> str:
    """The page after the header."""
    runs, probes = data["runs"], data["privileged_teacher"]
    probe = probes[args.template]
    example = args.template.format(prompt="12+7-5=?", answer=14, reference="12+7=19. 19-5=14. #### 14")
    steps, batch, k = args.train_steps, args.batch_size, args.group_size
    lines = [
        "Tutorial chapter 6's three self-distillation mechanisms on the tiny compact-arithmetic task "
        f"({args.length} operations), all from the same SFT-started student (`{relative(args.artifacts)}/student`); "
        f"held-out accuracy on the first {args.num_eval} problems of the eval split (exact match of the final "
        "answer), greedy and sampled at temperature 1.",
        "",
        f"`lscpu` model name: {data.get('lscpu_model', 'not recorded')}; the runs shared the machine's cores with "
        "other work, so times are indicative only.",
        "",
        "## 1. OPSD: a privileged self-teacher vs on-policy GKD from a real teacher",
        "",
        f"`opsd`: on-policy GKD ({args.divergence}, lambda 1) whose teacher is a frozen copy of the SFT "
        f"student reading the question and its answer (`teacher_template: {args.template!r}`, e.g. "
        f"`{example}`); `gkd`: the same with the tiny arithmetic teacher (question only). "
        f"{steps} steps, batch {batch}, AdamW lr {args.lr} (cosine, 10% warm-up).",
        "",
        f"What the hint does to the self-teacher: its greedy accuracy decoding from the plain and from the hinted "
        f"prompt ({args.num_eval} problems), for the run's template and a few others:",
        "",
        "| teacher_template | plain prompt | hinted prompt |",
        "|---|---|---|",
        *[f"| `{t!r}` | {v['plain']:.3f} | {v['hinted']:.3f} |" for t, v in probes.items()],
        "",
        "| method | greedy before | greedy after | sampled before | sampled after | eval reverse KL after |",
        "|---|---|---|---|---|---|",
    ]
    for method in ("opsd", "gkd"):
        cells = [
            fmt(*stat(runs, method, w, key)[:2]) for key in (GREEDY, SAMPLED) for w in ("before", "after")
        ]
        cells = [
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            fmt(*stat(runs, method, "after", "eval/reverse_kl")[:2]),
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "(The reverse KL is each run's own training target: to the hinted self-teacher for `opsd`, to the "
        "tiny teacher for `gkd`; the two are not comparable with each other.)",
        "",
        f"## 2. SPIN: {args.spin_rounds} rounds of {args.spin_round_steps} updates",
        "",
        f"DPO beta {args.spin_beta}, batch {batch}, constant lr {args.lr}; rejected = the current model's samples "
        "at temperature 1, chosen = the references. KL(model || ref) of whole completions at each round's end "
        f"(the round's starting model as ref; {args.num_eval} held-out prompts, nats per sequence).",
        "",
        "| round | KL(model ‖ ref) | greedy accuracy | sampled accuracy | samples = reference | mean DPO logit h |",
        "|---|---|---|---|---|---|",
    ]
    spin_start = (stat(runs, "spin", "before", GREEDY), stat(runs, "spin", "before", SAMPLED))
    lines.append(f"| 0 (SFT start) | — | {fmt(*spin_start[0][:2])} | {fmt(*spin_start[1][:2])} | — | — |")
    rounds = per_round(runs, args.spin_round_steps)
    for r in rounds:
        lines.append(
            f"| {r['round']} | {fmt(*r['kl'], 4)} | {fmt(*r['greedy'])} | {fmt(*r['sampled'])} | "
            f"{fmt(*r['same'])} | {fmt(*r['dpo_logit'])} |"
        )
    lines += [
        "",
        '("samples = reference": the share of the round\'s rejected samples identical to their chosen '
        "reference, pairs that carry no DPO signal; h > 0 means the model already prefers the references more "
        "than the round's reference model does.)",
    ]
    lines += [
        "",
        "## 3. SD-ZERO: verifier-only GRPO vs RL + on-policy GKD (Eq. 5, alpha 0.5)",
        "",
        f"Both: {batch // k} prompts x {k} samples per step ({batch} samples), {steps} steps, the exact-match "
        f"verifier, group-normalised advantages (r - mean) / (std + eps) over each prompt's {k} samples. "
        "`grpo`: no teacher (`model.teacher: null`), clipped ratio, 2 inner epochs, no KL penalty. "
        f"`rl_gkd`: GKD with alpha 0.5: 0.5 x {args.divergence} to the tiny teacher - 0.5 x REINFORCE on the "
        f"verifier reward (`samples_per_prompt` groups). `*_low_lr`: the same two at lr {args.low_lr}.",
        "",
        "| method | greedy before | greedy after | sampled before | sampled after |",
        "|---|---|---|---|---|",
    ]
    for method in ("grpo", "rl_gkd", "grpo_low_lr", "rl_gkd_low_lr"):
        cells = [
            fmt(*stat(runs, method, w, key)[:2]) for key in (GREEDY, SAMPLED) for w in ("before", "after")
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "## Verdicts on chapter 6's claims", ""]
    lines += verdicts(args, runs, probe, rounds)
    lines += ["", f"![curves]({NAME}.png)", ""]
    return "\n".join(lines)


def verdicts(
    args: argparse.Namespace,
    runs: list[dict[str, Any]],
    probe: dict[str, float],
    rounds: list[dict[str, Any]],
) -> list[str]:
    """One bullet per claim, worded from the numbers (a change counts when its mean exceeds its seed std)."""
    opsd, gkd = delta(runs, "opsd", GREEDY), delta(runs, "gkd", GREEDY)
    opsd_s = delta(runs, "opsd", SAMPLED)
    grpo, rl = delta(runs, "grpo", GREEDY), delta(runs, "rl_gkd", GREEDY)
    grpo_s, rl_s = delta(runs, "grpo", SAMPLED), delta(runs, "rl_gkd", SAMPLED)
    out = [
        f'- *"Knowing the answer simplifies reasoning" (the hinted model is a better teacher).* The hinted '
        f"self-teacher decodes {probe['hinted']:.3f} greedy accuracy vs {probe['plain']:.3f} without the hint: "
        + (
            "the hint helps it."
            if probe["hinted"] > probe["plain"]
            else "the hint does not make this tiny model a better solver: it never saw a hinted prompt in training, "
            "and the hint puts it out of distribution; the chapter's mechanism presumes a model that can use it."
        ),
        f"- *OPSD distils the privileged model into the hint-free one and improves it.* Greedy accuracy change "
        f"over {args.train_steps} steps: OPSD {verdict_change(opsd)} (sampled {verdict_change(opsd_s)}); "
        f"on-policy GKD from the real teacher {verdict_change(gkd)}.",
    ]
    if rounds:
        first, last = rounds[0]["kl"][0], rounds[-1]["kl"][0]
        peak = max(r["greedy"][0] for r in rounds)
        out.append(
            f"- *SPIN saturates after 3-5 rounds (KL(model ‖ ref) -> 0, no further gain).* KL at the end of round 1 "
            f"{first:.4f}, of round {len(rounds)} {last:.4f} nats per sequence ("
            + (
                f"ratio last/first {last / first:.2f}: it flattens"
                if last < first / 3
                else f"ratio last/first {last / first:.2f}: it does not flatten to a third within these rounds"
            )
            + f"); greedy accuracy per round peaks at {peak:.3f} from {stat(runs, 'spin', 'before', GREEDY)[0]:.3f} at the "
            f"start and ends at {rounds[-1]['greedy'][0]:.3f}. The chapter's saturation needs the model's samples to "
            f"match the data; the share of samples equal to their reference goes from {rounds[0]['same'][0]:.3f} in "
            f"round 1 to {rounds[-1]['same'][0]:.3f} in round {len(rounds)}"
            + (
                ": most pairs still differ, so the DPO signal has not run out."
                if rounds[-1]["same"][0] < 0.5
                else ": most pairs already match, so the DPO signal is running out."
            )
        )
    out.append(
        f"- *SD-ZERO: a verifier alone (GRPO, no teacher) improves the model by trial and error.* Greedy change: "
        f"GRPO {verdict_change(grpo)} (sampled {verdict_change(grpo_s)}); RL + GKD with the tiny teacher "
        f"{verdict_change(rl)} (sampled {verdict_change(rl_s)}), from the same start and sample budget. At lr "
        f"{args.low_lr}: GRPO {verdict_change(delta(runs, 'grpo_low_lr', GREEDY))}, RL + GKD "
        f"{verdict_change(delta(runs, 'rl_gkd_low_lr', GREEDY))} (greedy)."
    )
    out.append(
        "- Scale caveat: a 2-layer, 64-wide character model, "
        f"{args.train_steps}-step budgets and {len(args.seeds)} seeds; these are smoke-scale measurements of "
        "the mechanisms, not of the chapter's LLM-scale claims."
    )
    return out


def plot(args: argparse.Namespace, data: dict[str, Any], path: Path) -> None:
    """Three panels: accuracy before/after (OPSD, GKD, GRPO, RL+GKD), SPIN's KL and accuracy per round."""
    plt = pyplot()
    runs = data["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, methods_ in (
        (axes[0], ("opsd", "gkd")),
        (axes[2], ("grpo", "rl_gkd", "grpo_low_lr", "rl_gkd_low_lr")),
    ):
        xs = range(len(methods_))
        for offset, (where, color) in enumerate((("before", "0.6"), ("after", "C0"))):
            means = [stat(runs, m, where, GREEDY)[0] for m in methods_]
            stds = [stat(runs, m, where, GREEDY)[1] for m in methods_]
            ax.bar([x + 0.4 * offset for x in xs], means, 0.4, yerr=stds, color=color, label=where)
        ax.set_xticks([x + 0.2 for x in xs], [m.replace("_low_lr", "\nlow lr") for m in methods_])
        ax.set_ylabel("greedy held-out accuracy")
        ax.legend()
    axes[0].set_title("OPSD vs on-policy GKD")
    axes[2].set_title("SD-ZERO: GRPO vs RL+GKD")
    rounds = per_round(runs, args.spin_round_steps)
    ax = axes[1]
    if rounds:
        xs = [r["round"] for r in rounds]
        ax.errorbar(
            xs, [r["kl"][0] for r in rounds], yerr=[r["kl"][1] for r in rounds], marker="o", color="C3"
        )
        ax.set_xlabel("SPIN round")
        ax.set_ylabel("KL(model || ref), nats / sequence", color="C3")
        twin = ax.twinx()
        start = stat(runs, "spin", "before", GREEDY)[0]
        twin.plot([0, *xs], [start, *[r["greedy"][0] for r in rounds]], marker="s", color="C0")
        twin.set_ylabel("greedy accuracy", color="C0")
    ax.set_title("SPIN per round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the three experiments and write the results page, JSON and plot."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", type=Path, default=REPO / "artifacts" / "arithmetic")
    p.add_argument("--out", type=Path, default=REPO / "runs" / NAME)
    p.add_argument("--results", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--name", default=NAME)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="*", default=None, help="default: all (opsd gkd spin grpo rl_gkd)")
    p.add_argument("--length", type=int, default=2, help="operations per problem")
    p.add_argument("--num-eval", type=int, default=256, help="held-out problems evaluated")
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--group-size", type=int, default=4, help="GRPO / RL+GKD samples per prompt")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--low-lr", type=float, default=1e-5, help="lr of the grpo_low_lr and rl_gkd_low_lr arms")
    p.add_argument("--divergence", default="reverse_kl")
    p.add_argument("--template", default=TEMPLATE, help="OPSD teacher_template (prompt, reference, answer)")
    p.add_argument("--spin-rounds", type=int, default=8)
    p.add_argument("--spin-round-steps", type=int, default=12)
    p.add_argument("--spin-beta", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true", help="rebuild the page and plot from the JSON")
    args = p.parse_args(argv)
    start = time.perf_counter()
    results = Path(args.results)
    if args.report_only:
        args, cached = cached_report(args, args.name)
        plot(args, cached, results / f"{args.name}.png")
        return write_report(
            args.name,
            args,
            title=TITLE,
            body=report_body(args, cached),
            data=cached,
            start=start,
            cached=cached,
        )
    report_path = args.artifacts / "report.json"
    if not report_path.is_file():
        raise SystemExit(f"{report_path} not found: train the models first with examples/tiny_teachers.py")
    teacher_report = json.loads(report_path.read_text())
    jobs = build_jobs(args, teacher_report)
    trained = runs_to_train(jobs, args.out)
    probe_path = args.out / "privileged_teacher.json"
    probe = json.loads(probe_path.read_text()) if probe_path.is_file() else {}
    for template in dict.fromkeys([args.template, *PROBE_TEMPLATES]):  # cached per template
        if template not in probe:
            probe[template] = privileged_teacher_accuracy(args, teacher_report, template)
            args.out.mkdir(parents=True, exist_ok=True)
            probe_path.write_text(json.dumps(probe, indent=1) + "\n")
    runner = partial(run_job, extra_eval=spin_rounds, build=build)
    runs = run_jobs(jobs, args.out, workers=args.workers, runner=runner)
    data = {
        "teacher_report": teacher_report,
        "privileged_teacher": probe,
        "lscpu_model": lscpu_model(),
        "runs": runs,
    }
    results.mkdir(parents=True, exist_ok=True)
    plot(args, data, results / f"{args.name}.png")
    return write_report(
        args.name, args, title=TITLE, body=report_body(args, data), data=data, start=start, trained=trained
    )


if __name__ == "__main__":
    main()
