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

Controls (issue #13): ``alpha = 0`` (RL only) and ``alpha = 0.25`` next to the others; an RLEF*-style
baseline (paper Fig. 5's RL with a KL penalty to the starting policy: the same Eq. 5 loss with the
*starting student* as the "teacher", ``--rlef-alpha``); the learning rate chosen on a validation split
(``--num-val`` training passages never trained on; ``--lr-sweep`` at ``alpha = --sweep-alpha``, seed 0;
rule: the lowest validation claim-check hallucination rate among the learning rates that keep the
validation multi-reference ROUGE-2 >= ``--keep`` x the teacher's; the sweep is in the JSON).

Metrics on the held-out passages (clean references), for the student's own samples (temperature 1,
``--eval-samples`` per passage) and for greedy decoding:

- factuality, the training reward's view: the hallucination rate (summaries with at least one
  unsupported or contradicted fact by :class:`rl_distill.rewards.FactualConsistencyReward`) and its mean
  score;
- factuality, a check that is *not* the training reward (:func:`claim_check`): every number and
  capitalised word of the summary must occur in the passage text itself (no fact table, no types);
  also the fraction of the passage's claims the summary states (coverage: a summary can satisfy a
  precision check by stating little);
- quality: ROUGE-2 F1 (``rouge-score``: lower-cased ``[a-z0-9]`` word bigrams, no stemming) against the
  task's reference, against a second, differently worded reference (:data:`ALT_SUMMARIES`), and the
  multi-reference score (the better of the two).

The teacher and the starting student are measured the same way as reference points.

    python examples/tiny_teachers.py --task factual_summary --hallucination-rate 0.3 --num-train 20000 \\
        --batch-size 32 --teacher-steps 1500 --student-steps 2000 --student-size 128,2,4 \\
        --max-new-tokens 96 --out artifacts/factual
    python examples/e2_factuality.py --artifacts artifacts/factual

Writes ``docs/results/<name>.{md,json,png}`` (``--name``, default ``e2_factuality``); runs resume from
``runs/e2/runs.jsonl``.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
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


#: A second reference summary per ``factual_summary`` template (same facts, other wording), for
#: multi-reference ROUGE: the task's references are one templated sentence each.
ALT_SUMMARIES = [
    "{name} was born in {year} in {city} and is the author of {count} books.",
    "In {year} {name} started a bakery in {city}; on its first day it sold {count} cakes.",
    "In {year}, {name} went to {city}, where {count} trees were planted.",
    "In {year} {name} set up a school in {city}, which today employs {count} teachers.",
]
#: Capitalised words that are not claims (sentence openers).
OPENERS = frozenset("The In It There He She They A An And On At Then Later".split())


def alt_reference(example: Any) -> str:
    """The second reference summary of a ``factual_summary`` example (rendered from its fact table)."""
    facts = example.metadata["facts"]
    return ALT_SUMMARIES[example.metadata["template"]].format(**facts, last=facts["name"].split()[-1])


def clean_reference(example: Any) -> str:
    """The task's reference rendered from the (true) fact table: undoes a corrupted training reference."""
    from rl_distill.tasks.factual_summary import TEMPLATES

    facts = example.metadata["facts"]
    return TEMPLATES[example.metadata["template"]][1].format(**facts, last=facts["name"].split()[-1])


def claims(text: str) -> set[str]:
    """The checkable claims of a text: its numbers and its capitalised words other than :data:`OPENERS`."""
    return {w for w in re.findall(r"[0-9]+|[A-Z][a-z]+", text) if w not in OPENERS}


def claim_check(summary: str, source: str) -> tuple[bool, float]:
    """A factuality check that is not the training reward: claims of the summary against the passage text.

    Returns:
        ``(hallucinated, coverage)``: whether some claim of the summary (a number or capitalised word)
        does not occur in the passage, and the fraction of the passage's claims the summary states.

    >>> claim_check("Anna Berg wrote 12 books in Oslo.", "Anna Berg was born in Oslo in 1987. Berg wrote 12 books.")
    (False, 0.8)
    >>> claim_check("Anna Berg wrote 15 books.", "Anna Berg wrote 12 books.")
    (True, 0.6666666666666666)
    """
    said, given = claims(summary), claims(source)
    return bool(said - given), len(said & given) / max(1, len(given))


def summary_metrics(
    model: Any, tokenizer: Any, examples: list[Any], *, samples: int, seed: int, max_new_tokens: int
) -> dict[str, float]:
    """Factuality (reward's view and claim check) and ROUGE-2 of ``model``'s summaries, sampled and greedy.

    Returns:
        ``{decoding}/hallucination_rate``, ``/factual_score`` (the reward's checker), ``/claim_hallucination``,
        ``/claim_coverage`` (:func:`claim_check`), ``/rouge2`` (task reference), ``/rouge2_alt``
        (:data:`ALT_SUMMARIES`), ``/rouge2_multi`` (the better of the two), ``/length`` (characters), for
        ``decoding`` in ``sampled`` and ``greedy``.
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
        rows: list[dict[str, float]] = []
        for lo in range(0, len(examples), 64):
            chunk = [ex for ex in examples[lo : lo + 64] for _ in range(k)]
            with torch.no_grad():
                r = engine.generate(
                    [ex.prompt for ex in chunk],
                    SamplingConfig(max_new_tokens, temperature=temperature),
                    generator=generator,
                )
            for ex, text in zip(chunk, engine.decode(r), strict=True):
                check = checker.check(text, ex.metadata["facts"])
                hallucinated, coverage = claim_check(text, ex.metadata["source"])
                ref, alt = rouge_n(text, clean_reference(ex)), rouge_n(text, alt_reference(ex))
                rows.append(
                    {
                        "hallucination_rate": float(check.hallucinated),
                        "factual_score": check.score,
                        "claim_hallucination": float(hallucinated),
                        "claim_coverage": coverage,
                        "rouge2": ref,
                        "rouge2_alt": alt,
                        "rouge2_multi": max(ref, alt),
                        "length": float(len(text)),
                    }
                )
        for key in rows[0]:
            out[f"{decoding}/{key}"] = sum(row[key] for row in rows) / len(rows)
    model.train(was_training)
    return out


def student_summary_metrics(trainer: Any, job: Job, *, samples: int, seed: int) -> dict[str, float]:
    """:func:`summary_metrics` of a trained student on its task's eval list (the ``extra_eval`` hook)."""
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


def splits(spec: dict[str, Any]) -> tuple[list[Any], list[Any], list[Any]]:
    """``(train, val, eval)``: the teacher's split, with ``num_val`` training passages (clean references)
    held out from training for choosing the learning rate."""
    from dataclasses import replace

    spec = dict(spec)
    num_val = spec.pop("num_val")
    task = task_from_spec(spec)
    val = [replace(ex, reference=clean_reference(ex)) for ex in task.train[:num_val]]
    return task.train[num_val:], val, task.eval


def build_e2(job: Job) -> tuple[tuple[Any, Any, Any], Any]:
    """``((teacher, student, tokenizer), task)``: training passages minus validation; sweep jobs evaluate on
    the validation passages, the others on the held-out ones."""
    from rl_distill.tasks import TaskData

    train, val, evals = splits(job.data)
    held_out = val if job.labels.get("phase") == "sweep" else evals
    return load_pair(job.teacher, job.student), TaskData(name="factual_summary", train=train, eval=held_out)


def run_e2_job(job: Job, out_root: str, samples: int = 2, seed: int = 1234) -> dict[str, Any]:
    """:func:`run_job` with the summary metrics of the trained student under ``extra``."""
    return run_job(
        job, out_root, extra_eval=partial(student_summary_metrics, samples=samples, seed=seed), build=build_e2
    )


def data_spec(report: dict[str, Any], num_val: int) -> dict[str, Any]:
    """The factual_summary split the teacher was trained on (same seed and sizes), and the validation size."""
    a = report["args"]
    return {
        "task": "factual_summary",
        "seed": int(a["seed"]),
        "num_train": int(a["num_train"]),
        "num_eval": int(a["num_eval"]),
        "hallucination_rate": float(report["options"]["hallucination_rate"]),
        "num_val": num_val,
    }


def reference_points(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Summary metrics of the teacher and the starting student on the held-out and validation passages.

    Keys ``teacher``, ``student before`` (held-out) and ``teacher (validation)``, ``student before
    (validation)``; cached in ``out/reference.json``.
    """
    path = args.out / "reference.json"
    key = {
        "samples": args.eval_samples,
        "max_new_tokens": args.max_new_tokens,
        "data": data_spec(report, args.num_val),
    }
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["points"]
    import torch

    torch.set_num_threads(args.threads * args.workers)
    _, val, evals = splits(data_spec(report, args.num_val))
    teacher, student, tokenizer = load_pair(str(args.artifacts / "teacher"), str(args.artifacts / "student"))
    common = {"samples": args.eval_samples, "seed": 1234, "max_new_tokens": args.max_new_tokens}
    points = {}
    for name, model in (("teacher", teacher), ("student before", student)):
        points[name] = summary_metrics(model, tokenizer, evals, **common)
        points[f"{name} (validation)"] = summary_metrics(model, tokenizer, val, **common)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "points": points}, indent=1) + "\n")
    return points


def make_job(args: argparse.Namespace, report: dict[str, Any], *, method: str, alpha: float, lr: float,
             seed: int, phase: str, teacher: str | None = None) -> Job:  # fmt: skip
    """One Eq.-5 run from the SFT student (``teacher``: the distillation target, default the teacher)."""
    return Job(
        key=f"{phase}|{method}|lr={lr:g}|seed={seed}",
        method=method,
        seed=seed,
        teacher=teacher or str(args.artifacts / "teacher"),
        student=str(args.artifacts / "student"),
        data=data_spec(report, args.num_val),
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
            "lr": lr,
            "warmup_steps": max(1, args.train_steps // 10),
            "lr_schedule": args.lr_schedule,
            "eval_batch_size": 128,
        },
        eval={"greedy": False, "sampled": True, "max_new_tokens": args.max_new_tokens},
        labels={"alpha": alpha, "lr": lr, "phase": phase},
        threads=args.threads,
    )


def sweep_jobs(args: argparse.Namespace, report: dict[str, Any]) -> list[Job]:
    """The learning-rate sweep: ``--sweep-alpha``, seed 0, evaluated on the validation passages."""
    return [
        make_job(
            args,
            report,
            method=f"alpha={args.sweep_alpha}",
            alpha=args.sweep_alpha,
            lr=lr,
            seed=0,
            phase="sweep",
        )  # fmt: skip
        for lr in args.lr_sweep
    ]


def choose_lr(
    sweep: list[dict[str, Any]], points: dict[str, dict[str, float]], keep: float
) -> dict[str, Any]:
    """The validation rule: lowest claim-check hallucination (sampled) among the learning rates whose
    validation multi-reference ROUGE-2 (sampled) is >= ``keep`` x the teacher's; none qualifies: the
    highest ROUGE-2.

    Returns:
        ``{"lr", "rule", "table"}`` (the table: one row per learning rate with its validation metrics).
    """
    floor = keep * points["teacher (validation)"]["sampled/rouge2_multi"]
    table = [
        {
            "lr": r["lr"],
            **{
                k: r["extra"][f"sampled/{k}"]
                for k in ("claim_hallucination", "rouge2_multi", "hallucination_rate")
            },
        }  # fmt: skip
        for r in sorted(sweep, key=lambda r: r["lr"])
    ]
    ok = [row for row in table if row["rouge2_multi"] >= floor]
    if ok:
        best = min(ok, key=lambda row: (row["claim_hallucination"], -row["rouge2_multi"]))
        rule = (f"lowest validation claim-check hallucination among learning rates with validation "
                f"multi-reference ROUGE-2 >= {keep:.0%} of the teacher's ({floor:.3f})")  # fmt: skip
    else:
        best = max(table, key=lambda row: row["rouge2_multi"])
        rule = f"no learning rate kept ROUGE-2 >= {floor:.3f}: the highest validation ROUGE-2"
    return {"lr": best["lr"], "rule": rule, "table": table}


def build_jobs(args: argparse.Namespace, report: dict[str, Any], lr: float) -> list[Job]:
    """One job per (alpha, seed) at the chosen learning rate, and the RLEF* control per seed."""
    jobs = [
        make_job(args, report, method=f"alpha={alpha}", alpha=alpha, lr=lr, seed=seed, phase="main")
        for alpha in args.alphas
        for seed in args.seeds
    ]
    if args.rlef_alpha is not None:
        jobs += [
            make_job(
                args,
                report,
                method=RLEF,
                alpha=args.rlef_alpha,
                lr=lr,
                seed=seed,
                phase="main",
                teacher=str(args.artifacts / "student"),
            )  # fmt: skip
            for seed in args.seeds
        ]
    return jobs


RLEF = "RLEF*"
METRICS = [
    ("hallucination_rate", "hallucination (reward's checker)"),
    ("claim_hallucination", "hallucination (claim check)"),
    ("claim_coverage", "claims stated"),
    ("rouge2", "ROUGE-2 ref"),
    ("rouge2_alt", "ROUGE-2 alt"),
    ("rouge2_multi", "ROUGE-2 multi"),
    ("length", "length (chars)"),
]


def label(method: str, rlef_alpha: float | None) -> str:
    """Table label of a method."""
    if method == RLEF:
        return f"RLEF* (KL to the start, alpha = {rlef_alpha})"
    return f"student, {method.replace('=', ' = ')}"


def methods_in(runs: list[dict[str, Any]]) -> list[str]:
    """Methods in table order: alphas ascending, then RLEF*."""
    alphas = sorted({r["alpha"] for r in runs if r["method"] != RLEF})
    return [f"alpha={a}" for a in alphas] + ([RLEF] if any(r["method"] == RLEF for r in runs) else [])


def table(
    runs: list[dict[str, Any]], points: dict[str, dict[str, float]], decoding: str, rlef_alpha: float | None
) -> str:
    """Markdown: the reference points and one row per method (mean ± std over seeds)."""
    head = "| model | " + " | ".join(name for _, name in METRICS) + " | JSD to teacher | n |"
    lines = [head, "|---|" + "---|" * (len(METRICS) + 2)]
    for name in ("teacher", "student before"):
        m = points[name]
        lines.append(
            f"| {name} | " + " | ".join(f"{m[f'{decoding}/{k}']:.3f}" for k, _ in METRICS) + " | - | 1 |"
        )
    for method in methods_in(runs):
        mine = [r for r in runs if r["method"] == method]
        cells = [
            fmt(*group_stats(mine, ["method"], lambda r, k=k: r["extra"][f"{decoding}/{k}"])[(method,)][:2])
            for k, _ in METRICS
        ]
        jsd = group_stats(mine, ["method"], lambda r: r["after"]["eval/jsd"])[(method,)]
        lines.append(
            f"| {label(method, rlef_alpha)} | " + " | ".join(cells) + f" | {fmt(*jsd[:2])} | {len(mine)} |"
        )
    return "\n".join(lines) + "\n"


def mean_of(runs: list[dict[str, Any]], method: str, key: str) -> tuple[float, float, int]:
    """Mean, std and count over seeds of ``extra[key]`` for one method."""
    return group_stats([r for r in runs if r["method"] == method], ["method"], lambda r: r["extra"][key])[
        (method,)
    ]


def verdict(
    runs: list[dict[str, Any]], points: dict[str, dict[str, float]], keep: float, rlef_alpha: float | None
) -> str:
    """Findings read off the sampled metrics, with both factuality checks."""
    t, s0 = points["teacher"], points["student before"]
    out = []
    for method in methods_in(runs):
        h = mean_of(runs, method, "sampled/hallucination_rate")
        c = mean_of(runs, method, "sampled/claim_hallucination")
        q = mean_of(runs, method, "sampled/rouge2_multi")
        cov = mean_of(runs, method, "sampled/claim_coverage")
        both = h[0] < t["sampled/hallucination_rate"] and c[0] < t["sampled/claim_hallucination"]
        kept = q[0] >= keep * t["sampled/rouge2_multi"]
        below_start = c[0] + c[1] < s0["sampled/claim_hallucination"]
        out.append(
            f"- {label(method, rlef_alpha)}: hallucination {h[0]:.3f} ± {h[1]:.3f} (reward's checker), "
            f"{c[0]:.3f} ± {c[1]:.3f} (claim check), claims stated {cov[0]:.3f}, multi-reference ROUGE-2 "
            f"{q[0]:.3f} ± {q[1]:.3f}: "
            + (
                "more factual than the teacher by both checks"
                if both
                else "not more factual than the teacher by both checks"
            )
            + (
                f", quality kept (>= {keep:.0%} of the teacher's ROUGE-2)"
                if kept
                else f", quality not kept (< {keep:.0%} of the teacher's ROUGE-2)"
            )
            + (
                "; below the starting student's claim-check rate by more than one std."
                if below_start
                else "; not clearly below the starting student's claim-check rate."
            )
        )
    out.append(
        f"- Reference points (sampled): teacher hallucination {t['sampled/hallucination_rate']:.3f} / "
        f"{t['sampled/claim_hallucination']:.3f} (reward's checker / claim check), ROUGE-2 multi "
        f"{t['sampled/rouge2_multi']:.3f}; starting student {s0['sampled/hallucination_rate']:.3f} / "
        f"{s0['sampled/claim_hallucination']:.3f}, ROUGE-2 multi {s0['sampled/rouge2_multi']:.3f}."
    )
    return "\n".join(out) + "\n"


def paired(runs: list[dict[str, Any]], method: str, other: str, key: str) -> dict[str, Any] | None:
    """Per-seed differences ``method - other`` of ``extra[key]``: mean, min, max, seeds (None if no common seed)."""
    a = {r["seed"]: r["extra"][key] for r in runs if r["method"] == method}
    b = {r["seed"]: r["extra"][key] for r in runs if r["method"] == other}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    return {"mean": sum(d) / len(d), "min": min(d), "max": max(d), "seeds": seeds, "diffs": d}


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def comparisons(runs: list[dict[str, Any]], points: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The controls' paired differences (sampled claim-check hallucination and multi-reference ROUGE-2).

    For every mixed ``0 < alpha < 1``: against RL alone (``alpha = 0``) and against RLEF*; pure GKD
    (``alpha = 1``) against RL alone; and each method's rate against the starting student's.
    """
    alphas = sorted({r["alpha"] for r in runs if r["method"] != RLEF})
    mixed = [a for a in alphas if 0.0 < a < 1.0]
    keys = {"claim": "sampled/claim_hallucination", "rouge": "sampled/rouge2_multi"}
    out: dict[str, Any] = {"vs_rl_only": {}, "vs_rlef": {}, "gkd_vs_rl_only": None}
    for a in mixed:
        m = f"alpha={a}"
        out["vs_rl_only"][m] = {k: paired(runs, m, "alpha=0.0", v) for k, v in keys.items()}
        out["vs_rlef"][m] = {k: paired(runs, m, RLEF, v) for k, v in keys.items()}
    if 1.0 in alphas and 0.0 in alphas:
        out["gkd_vs_rl_only"] = {k: paired(runs, "alpha=1.0", "alpha=0.0", v) for k, v in keys.items()}
    return out


def _diff(p: dict[str, Any] | None) -> str:
    if p is None:
        return "n/a"
    return f"{_signed(p['mean'])} (seeds {', '.join(_signed(d) for d in p['diffs'])})"


def verdict_section(
    runs: list[dict[str, Any]],
    points: dict[str, dict[str, float]],
    sweep: dict[str, Any],
    keep: float,
    steps: int,
) -> str:
    """The paired comparisons as a table, and the verdict they support (written from the numbers)."""
    comp = comparisons(runs, points)
    lines = [
        "Paired by seed, sampled summaries: differences in claim-check hallucination (negative: fewer "
        "hallucinations) and multi-reference ROUGE-2 (positive: closer to a reference).",
        "",
        "| comparison | hallucination (claim check) | ROUGE-2 multi |",
        "|---|---|---|",
    ]
    for method, c in comp["vs_rl_only"].items():
        lines.append(
            f"| {method.replace('=', ' = ')} minus RL alone (alpha = 0) | {_diff(c['claim'])} | {_diff(c['rouge'])} |"
        )
    for method, c in comp["vs_rlef"].items():
        lines.append(
            f"| {method.replace('=', ' = ')} minus RLEF* | {_diff(c['claim'])} | {_diff(c['rouge'])} |"
        )
    g = comp["gkd_vs_rl_only"]
    if g is not None:
        lines.append(f"| alpha = 1 (GKD alone) minus RL alone | {_diff(g['claim'])} | {_diff(g['rouge'])} |")

    # The verdict: does the distillation term add anything over the reward alone or a KL to the start?
    def better(p: dict[str, Any] | None) -> bool:  # every seed lower (fewer hallucinations)
        return p is not None and p["max"] < 0

    helps_rl = [m for m, c in comp["vs_rl_only"].items() if better(c["claim"])]
    helps_rlef = [m for m, c in comp["vs_rlef"].items() if better(c["claim"])]
    s0, t = points["student before"], points["teacher"]
    rl = mean_of(runs, "alpha=0.0", "sampled/claim_hallucination") if comp["gkd_vs_rl_only"] else None
    gkd = mean_of(runs, "alpha=1.0", "sampled/claim_hallucination") if comp["gkd_vs_rl_only"] else None
    text = ["", "**Verdict.**"]
    if rl is not None and gkd is not None:
        text.append(
            f"The reward is what lowers hallucination: RL alone (alpha = 0) takes the claim-check rate from the "
            f"starting student's {s0['sampled/claim_hallucination']:.3f} to {rl[0]:.3f} ± {rl[1]:.3f}, while on-policy "
            f"GKD alone (alpha = 1) stays at {gkd[0]:.3f} ± {gkd[1]:.3f} (the teacher it imitates: "
            f"{t['sampled/claim_hallucination']:.3f})."
        )
    if comp["vs_rl_only"]:
        rl_part = (
            f"lowers it below RL alone on every seed for alpha = {', '.join(m[6:] for m in helps_rl)}"
            if helps_rl
            else "does not lower it below RL alone on every seed for any alpha"
        )
        rlef_part = (
            f"below RLEF* (the reward with a KL penalty to the starting student) on every seed for alpha = "
            f"{', '.join(m[6:] for m in helps_rlef)}"
            if helps_rlef
            else "nor below RLEF* (the reward with a KL penalty to the starting student) for any alpha"
        )
        text.append(f"Mixing in the distillation term (0 < alpha < 1) {rl_part}; {rlef_part}.")
        if not helps_rl and not helps_rlef:
            jsd = max(r["after"]["eval/jsd"] for r in runs)
            t_rouge = points["teacher (validation)"]["sampled/rouge2_multi"]
            hacked = [row for row in sweep["table"] if row["rouge2_multi"] < keep * t_rouge]
            hack = (
                "; the sweep's "
                + ", ".join(
                    f"lr {row['lr']:g} (validation ROUGE-2 {row['rouge2_multi']:.3f}, hallucination "
                    f"{row['claim_hallucination']:.3f} by the claim check but {row['hallucination_rate']:.3f} by the "
                    "reward's checker)"
                    for row in hacked
                )
                + " is where the reward is hacked, and the regime in which a KL term could matter"
                if hacked
                else ""
            )
            text.append(
                "So the paper's Fig. 5 claim, that combining the reward with distillation from the teacher gives a "
                "student more factual than either alone at kept quality, is **not supported here**: at the "
                "validation-chosen learning rate the reward alone already improves factuality and ROUGE-2 together, "
                "and the distillation term has nothing to hold back. Our reading: every trained student stays within "
                f"a held-out JSD of {jsd:.3f} of the teacher after {steps} steps, so the term that keeps quality has "
                f"no drift to correct{hack}. A longer run or a larger step, with the learning rate still chosen on "
                "validation, is the test this leaves open."
            )
    return "\n".join(lines + text) + "\n"


def plot(
    runs: list[dict[str, Any]], points: dict[str, dict[str, float]], path: Path, rlef_alpha: float | None
) -> None:
    """Factuality by the claim check (1 - rate) against multi-reference ROUGE-2, per method; sampled and greedy."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, decoding in zip(axes, ("sampled", "greedy"), strict=True):
        for method in methods_in(runs):
            x = mean_of(runs, method, f"{decoding}/rouge2_multi")
            y = mean_of(runs, method, f"{decoding}/claim_hallucination")
            ax.errorbar(x[0], 1 - y[0], xerr=x[1], yerr=y[1], marker="D" if method == RLEF else "o", capsize=3,
                        label=label(method, rlef_alpha))  # fmt: skip
        for name, marker in (("teacher", "*"), ("student before", "s")):
            m = points[name]
            ax.scatter(m[f"{decoding}/rouge2_multi"], 1 - m[f"{decoding}/claim_hallucination"], marker=marker,
                       s=140, color="k", label=name)  # fmt: skip
        ax.set_xlabel("multi-reference ROUGE-2 F1 (quality)")
        ax.set_ylabel("1 - hallucination rate, claim check (factuality)")
        ax.set_title(f"{decoding} decoding")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("E2: RL + GKD alpha sweep and RLEF* (mean ± std over seeds; factuality not by the reward)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags (defaults: the published run)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", type=Path, default=REPO / "artifacts" / "factual")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "e2")
    p.add_argument("--results", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--name", default="e2_factuality", help="base name of the report files")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--rlef-alpha", type=float, default=0.5,
                   help="KL weight of the RLEF* control (teacher := the starting student); -1: no control")  # fmt: skip
    p.add_argument("--lr-sweep", type=float, nargs="+", default=[1e-4, 2e-4, 5e-4],
                   help="learning rates tried on the validation split")  # fmt: skip
    p.add_argument("--sweep-alpha", type=float, default=0.5, help="alpha of the learning-rate sweep")
    p.add_argument("--num-val", type=int, default=64, help="training passages held out for the sweep")
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--eval-samples", type=int, default=2, help="sampled summaries per held-out passage")
    p.add_argument("--keep", type=float, default=0.9, help="quality kept, for the lr rule and the verdict")
    p.add_argument("--lr-schedule", choices=["constant", "linear", "cosine"], default="cosine")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild <results>/<name>.md (and plot) from the committed <name>.json, with its settings; no training",
    )
    args = p.parse_args(argv)
    bad = [a for a in [*args.alphas, args.sweep_alpha] if not 0.0 <= a <= 1.0]
    if bad:
        raise SystemExit(f"--alphas and --sweep-alpha must be in [0, 1], got {bad}")
    if args.rlef_alpha is not None and args.rlef_alpha < 0:
        args.rlef_alpha = None
    elif args.rlef_alpha is not None and not 0.0 < args.rlef_alpha <= 1.0:
        raise SystemExit(f"--rlef-alpha must be in (0, 1] (or -1 for no control), got {args.rlef_alpha}")
    if any(lr <= 0 for lr in args.lr_sweep):
        raise SystemExit(f"--lr-sweep values must be > 0, got {args.lr_sweep}")
    if args.num_val < 1:
        raise SystemExit(f"--num-val must be >= 1, got {args.num_val}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) E2 and write its report (``--report-only``: rebuild the page from its raw JSON)."""
    args = parse_args(argv)
    start = time.perf_counter()
    if args.report_only:
        args, cached = cached_report(args, args.name)
        if "sweep" not in cached:
            raise SystemExit(
                f"{args.name}.json was made before the controls of issue #13 (no learning-rate sweep, no claim "
                "check): rerun the experiment to rebuild its page"
            )
        body, data = report_body(args, cached["teacher_report"], cached["reference_points"], cached["sweep"],
                                 cached["runs"])  # fmt: skip
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
    sweep = sweep_jobs(args, report)
    sweep_runs = run_jobs(sweep, args.out, workers=args.workers, runner=runner)
    chosen = choose_lr(sweep_runs, points, args.keep)
    print(f"learning rate chosen on validation: {chosen['lr']:g} ({chosen['rule']})", flush=True)
    jobs = build_jobs(args, report, chosen["lr"])
    trained = runs_to_train(jobs, args.out)  # the header's count; the sweep's time is in the body
    runs = run_jobs(jobs, args.out, workers=args.workers, runner=runner)
    body, data = report_body(args, report, points, {**chosen, "runs": sweep_runs}, runs)
    return write_report(args.name, args, title=TITLE, body=body, data=data, start=start, trained=trained)


TITLE = "E2: RL + GKD for factual consistency (alpha sweep, with controls)"


def report_body(
    args: argparse.Namespace,
    report: dict[str, Any],
    points: dict[str, dict[str, float]],
    sweep: dict[str, Any],
    runs: list[dict[str, Any]],
) -> tuple[str, dict[str, Any]]:
    """``(markdown body, raw data)`` of the page (the plot is written too)."""
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    plot(runs, points, results / f"{args.name}.png", args.rlef_alpha)
    rate = report["options"]["hallucination_rate"]
    tv = points["teacher (validation)"]
    sweep_lines = [
        "| lr | hallucination (claim check) | hallucination (reward's checker) | ROUGE-2 multi |",
        "|---|---|---|---|",
        f"| teacher | {tv['sampled/claim_hallucination']:.3f} | {tv['sampled/hallucination_rate']:.3f} | "
        f"{tv['sampled/rouge2_multi']:.3f} |",
        *(f"| {row['lr']:g}{' (chosen)' if row['lr'] == sweep['lr'] else ''} | {row['claim_hallucination']:.3f} | "
          f"{row['hallucination_rate']:.3f} | {row['rouge2_multi']:.3f} |" for row in sweep["table"]),
    ]  # fmt: skip
    body = (
        f"Teacher trained on `factual_summary` with {rate:.0%} of the training references carrying one "
        f"unsupported fact (`examples/tiny_teachers.py`, `{relative(args.artifacts)}`). Student: SFT-started on "
        f"the same noisy data. Eq. 5 with on-policy JSD(0.5) and the factual-consistency reward (leave-one-out "
        f"baseline), {args.train_steps} steps, batch {args.batch_size}, AdamW (10% warm-up, {args.lr_schedule} "
        f"decay) at the learning rate chosen on {args.num_val} validation passages. RLEF*: the same loss with "
        f"the starting student as the distillation target (a KL penalty to the start, alpha = {args.rlef_alpha}). "
        f"Held-out: {report['args']['num_eval']} passages, {args.eval_samples} samples each at temperature 1, "
        "and greedy. Hallucination is measured twice: by the training reward's checker (fact table) and by a "
        "claim check against the passage text that is not the reward; ROUGE-2 against the task's reference, a "
        "second wording, and the better of the two.\n\n"
        "## Learning rate, chosen on the validation split\n\n"
        f"alpha = {args.sweep_alpha}, seed 0, sampled summaries of the validation passages. Rule: {sweep['rule']}.\n\n"
        + "\n".join(sweep_lines)
        + f"\n\nChosen: lr {sweep['lr']:g}. The sweep's {len(sweep['runs'])} runs took "
        f"{sum(r['wall_seconds'] for r in sweep['runs']) / 60:.1f} min (not in the header's time).\n\n"
        "## Sampled summaries (temperature 1: the policy that was trained)\n\n"
        + table(runs, points, "sampled", args.rlef_alpha)
        + "\n## Greedy summaries\n\n"
        + table(runs, points, "greedy", args.rlef_alpha)
        + "\n## The controls, paired by seed\n\n"
        + verdict_section(runs, points, sweep, args.keep, args.train_steps)
        + "\n## Findings (sampled)\n\n"
        + verdict(runs, points, args.keep, args.rlef_alpha)
        + f"\n![{args.name}.png]({args.name}.png)\n"
    )
    data = {
        "teacher_report": report, "reference_points": points, "sweep": sweep, "runs": runs,
        "comparisons": comparisons(runs, points),
    }  # fmt: skip
    return body, data


if __name__ == "__main__":
    main()
