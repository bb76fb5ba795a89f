"""The OPD lab: exposure bias by construction, measured exactly (issue #13, tutorial chapters 2 and 8).

The teacher is :class:`rl_distill.models.process_lm.ProcessLM`: a known process with two equally
valid phrasings (``abcdef...`` and ``fedcba...``), defined on every prefix. At completion position
``t`` the correct token is token ``t`` of the chosen phrase, also after a mistake: the teacher
never makes one, so a mistake takes the student to prefixes the teacher never visits, where the
correct continuation ("skip the wrong token") differs from what teacher prefixes teach ("continue
from the last token"). The student is a tiny Llama (hidden 32, 2 layers) with the same character
tokenizer, started broad: a short supervised warm start, identical for every method of a seed.

Every method trains the same student, from the same start, for the same number of steps of the
same number of sequences, through the toolkit's own agents (``agent.update``):

- ``supervised_kd``: lambda = 0, token-level forward KL to the teacher on teacher sequences;
- ``seqkd``: lambda = 0, cross-entropy on teacher samples;
- ``gkd_l0.5_fkl``: GKD, lambda = 0.5, forward KL;
- ``gkd_l1_fkl`` / ``gkd_l1_jsd0.5`` / ``gkd_l1_rkl``: on-policy GKD with forward KL, JSD(0.5), reverse KL;
- ``reinforce_rkl``: REINFORCE on the Eq. 5 return (sequence reverse KL, MiniLLM-style
  length-normalised reward-to-go, leave-one-out baseline over 4 samples per prompt).

Metrics come from :func:`rl_distill.models.process_lm.exact_student_metrics`: exact on the teacher's
two paths, stratified Monte Carlo (by the position of the student's first mistake) on its own.
Each method's learning rate is picked on validation seeds (never the reported ones) at T = 20.

    python examples/opd_lab.py            # the default grid (< 30 min on 2 cores)
    python examples/opd_lab.py --quick    # seconds: the smoke test's grid

Runs are appended to ``runs/opd_lab/runs.jsonl`` as they finish and skipped on restart. Writes
``docs/results/opd_lab.md``, ``opd_lab.json`` (everything on the page is computed from it) and
``opd_lab_*.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _experiment import REPO, Job, pyplot, run_jobs, write_report  # noqa: E402

#: Method label -> (agent name, config overrides). Off-policy, mixed and on-policy, as in the tutorial.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "supervised_kd": ("gkd", {"lmbda": 0.0, "off_policy": "reference", "divergence": "forward_kl"}),
    "seqkd": (
        "gkd",
        {"lmbda": 0.0, "off_policy": "teacher", "target": "one_hot", "divergence": "forward_kl"},
    ),
    "gkd_l0.5_fkl": ("gkd", {"lmbda": 0.5, "divergence": "forward_kl"}),
    "gkd_l1_fkl": ("gkd", {"lmbda": 1.0, "divergence": "forward_kl"}),
    "gkd_l1_jsd0.5": ("gkd", {"lmbda": 1.0, "divergence": "jsd", "beta": 0.5}),
    "gkd_l1_rkl": ("gkd", {"lmbda": 1.0, "divergence": "reverse_kl"}),
    "reinforce_rkl": (
        "reinforce",
        {
            "samples_per_prompt": 4,
            "return_type": "reward_to_go",
            "length_normalize": True,
            "baseline": "leave_one_out",
        },
    ),
}
OFF_POLICY = ("supervised_kd", "seqkd")
ON_POLICY = ("gkd_l1_fkl", "gkd_l1_jsd0.5", "gkd_l1_rkl", "reinforce_rkl")
FORWARD_KL = ("supervised_kd", "gkd_l0.5_fkl", "gkd_l1_fkl")
REVERSE_KL = ("gkd_l1_rkl", "reinforce_rkl")
#: The paired comparison of the "gap widens" verdict: same divergence, lambda 0 vs 1.
PAIR = ("supervised_kd", "gkd_l1_fkl")

CHARS = "abcdef>"
PROMPT = ">"
STUDENT = {"hidden_size": 32, "num_layers": 2, "num_heads": 2}


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------
def make_lab() -> tuple[Any, Any]:
    """``(tokenizer, teacher)``: the character tokenizer and the bimodal process teacher."""
    from rl_distill.models import char_tokenizer
    from rl_distill.models.process_lm import ProcessLM, ProcessLMConfig

    tokenizer = char_tokenizer(CHARS)
    ids = tokenizer.convert_tokens_to_ids(list(CHARS))
    config = ProcessLMConfig(
        vocab_size=len(tokenizer),
        phrases=[ids[:6], ids[5::-1]],  # abcdef, fedcba
        sep_token_id=tokenizer.convert_tokens_to_ids(PROMPT),
        floor=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer, ProcessLM(config).eval()


def make_agent(name: str, overrides: dict[str, Any], engine: Any, lr: float, length: int, seed: int) -> Any:
    """A GKD or REINFORCE agent over ``engine``'s student with Adam at ``lr``."""
    import torch

    from rl_distill.agents import GKDAgent, GKDConfig, REINFORCEAgent, REINFORCEConfig

    optimizer = torch.optim.Adam(engine.student.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    if name == "gkd":
        return GKDAgent(engine, optimizer, GKDConfig(**overrides, max_new_tokens=length), generator=generator)
    config = REINFORCEConfig(**overrides, max_new_tokens=length)
    return REINFORCEAgent(engine, optimizer, config, generator=generator)


def batch_for(
    name: str, overrides: dict[str, Any], references: list[str], tokens: int, length: int
) -> list[Any]:
    """Prompts of one step: ``tokens // length`` sequences in all (REINFORCE samples k per prompt).

    A fixed token budget per step keeps the training signal per step, and so the student's per-step
    error on teacher prefixes, comparable across T (the DAgger bound holds eps fixed).
    """
    from rl_distill.tasks import Example

    per_prompt = overrides.get("samples_per_prompt", 1) if name == "reinforce" else 1
    n = max(1, tokens // length // per_prompt)
    return [Example(PROMPT, reference=references[i % len(references)]) for i in range(n)]


def run_one(job: Job, out_root: str) -> dict[str, Any]:
    """Warm-start, train and evaluate one (method, T, seed, lr); return the result row."""
    import torch

    from rl_distill.models import tiny_llama
    from rl_distill.models.process_lm import exact_student_metrics
    from rl_distill.rollout import RolloutEngine

    del out_root  # nothing is written per run: the row is the record
    torch.set_num_threads(job.threads)
    start = time.perf_counter()
    length, train = int(job.labels["T"]), job.train
    tokenizer, teacher = make_lab()
    prompt_ids = tokenizer(PROMPT, add_special_tokens=True)["input_ids"]
    references = [tokenizer.decode(teacher.config.phrase(m, length)) for m in range(teacher.config.num_modes)]
    torch.manual_seed(job.seed)
    student = tiny_llama(len(tokenizer), seed=job.seed, **STUDENT).train()
    engine = RolloutEngine(student, teacher, tokenizer)

    def evaluate(continuations: int) -> Any:
        return exact_student_metrics(
            student, teacher, prompt_ids, length, continuations=continuations, seed=job.seed
        )

    # Warm start: a few supervised KD steps, the same for every method of this seed and T.
    warm_name, warm_cfg = METHODS["supervised_kd"]
    warm = make_agent(warm_name, warm_cfg, engine, train["warm_lr"], length, job.seed)
    warm_batch = batch_for(warm_name, warm_cfg, references, train["tokens_per_step"], length)
    for _ in range(train["warm_steps"]):
        warm.update(warm_batch)
    before = evaluate(train["curve_continuations"])

    name, overrides = job.agent["name"], {k: v for k, v in job.agent.items() if k != "name"}
    agent = make_agent(name, overrides, engine, train["lr"], length, job.seed + 1)
    batch = batch_for(name, overrides, references, train["tokens_per_step"], length)
    steps, curve, final = train_loop(agent, batch, train, evaluate, before)
    skipped = sum(int(row.get("train/skipped", 0.0)) for row in steps)
    return {
        "key": job.key,
        "method": job.method,
        "seed": job.seed,
        **job.labels,
        "after": {
            "eval/expected_errors": final.expected_errors,
            "eval/reverse_kl": final.reverse_kl,
            "eval/success": final.success,
        },
        "metrics": final.to_dict(),
        "before": _curve_point(before),
        "curve": curve,
        "skipped_steps": skipped,
        "wall_seconds": time.perf_counter() - start,
        "job": {"agent": job.agent, "train": job.train},
    }


def train_loop(
    agent: Any, batch: list[Any], train: dict[str, Any], evaluate: Any, before: Any
) -> tuple[list[dict[str, float]], list[dict[str, float]], Any]:
    """``train["steps"]`` updates on ``batch`` with a learning curve; returns (step stats, curve, final metrics).

    Before each update the agent is told the training progress, as the trainer does, so scheduled
    values (lambda, alpha) follow it.
    """
    curve, every = [{"step": 0, **_curve_point(before)}], max(1, train["steps"] // train["curve_points"])
    steps = []
    for step in range(1, train["steps"] + 1):
        agent.set_progress(step - 1, train["steps"])
        steps.append({**agent.update(batch), **agent.schedule_metrics()})  # as the trainer logs them
        if step % every == 0 and step < train["steps"]:
            curve.append({"step": step, **_curve_point(evaluate(train["curve_continuations"]))})
    final = evaluate(train["continuations"])
    curve.append({"step": train["steps"], **_curve_point(final)})
    return steps, curve, final


def _curve_point(m: Any) -> dict[str, float]:
    return {
        "expected_errors": m.expected_errors,
        "reverse_kl": m.reverse_kl,
        "forward_kl": m.forward_kl,
        "success": m.success,
        "eps_teacher": sum(m.error_teacher_prefix) / len(m.error_teacher_prefix),
    }


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------
def make_job(args: argparse.Namespace, split: str, method: str, length: int, seed: int, lr: float) -> Job:
    """One run's :class:`Job` (``split``: ``val`` for learning-rate selection, ``test`` for the report)."""
    name, overrides = METHODS[method]
    return Job(
        # The key names everything that changes the result, so a resumed grid never reuses a stale run.
        key=(
            f"{split}|{method}|T={length}|seed={seed}|lr={lr:g}|steps={args.steps}|tok={args.tokens_per_step}"
            f"|warm={args.warm_steps}@{args.warm_lr:g}|cont={args.continuations}"
        ),
        method=method,
        seed=seed,
        teacher="process_lm:bimodal",
        student="tiny_llama:" + ",".join(f"{k}={v}" for k, v in STUDENT.items()),
        data={"prompt": PROMPT, "chars": CHARS},
        agent={"name": name, **overrides},
        train={
            "steps": args.steps,
            "lr": lr,
            "tokens_per_step": args.tokens_per_step,
            "warm_steps": args.warm_steps,
            "warm_lr": args.warm_lr,
            "continuations": args.continuations,
            "curve_points": args.curve_points,
            "curve_continuations": args.curve_continuations,
        },
        labels={"T": length, "lr": lr, "split": split},
        threads=1,
    )


def select_lrs(runs: list[dict[str, Any]], methods: list[str], lrs: list[float]) -> dict[str, Any]:
    """Per method, the learning rate with the fewest mean expected errors on the validation runs."""
    table: dict[str, dict[str, float]] = {}
    chosen: dict[str, float] = {}
    for method in methods:
        table[method] = {}
        for lr in lrs:
            vals = [
                r["after"]["eval/expected_errors"] for r in runs if r["method"] == method and r["lr"] == lr
            ]
            table[method][f"{lr:g}"] = sum(vals) / len(vals) if vals else math.nan
        chosen[method] = min(lrs, key=lambda lr, m=method: (table[m][f"{lr:g}"], lr))
    return {"mean_expected_errors": table, "chosen": chosen}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny grid for the smoke test (seconds)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--lengths", type=int, nargs="+", default=[5, 10, 20, 40], help="sequence lengths T")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="reported seeds")
    p.add_argument(
        "--val-seeds", type=int, nargs="+", default=[100, 101], help="learning-rate selection seeds"
    )
    p.add_argument("--val-length", type=int, default=20, help="T of the learning-rate selection")
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3], help="learning rates tried")
    p.add_argument("--steps", type=int, default=150, help="training steps per run (after the warm start)")
    p.add_argument(
        "--tokens-per-step", type=int, default=320, help="completion tokens per step (T=40: 8 sequences)"
    )
    p.add_argument("--warm-steps", type=int, default=50, help="supervised KD warm-start steps")
    p.add_argument("--warm-lr", type=float, default=3e-3)
    p.add_argument(
        "--continuations", type=int, default=16, help="samples per first-mistake event (final eval)"
    )
    p.add_argument("--curve-points", type=int, default=3, help="evaluations during training")
    p.add_argument("--curve-continuations", type=int, default=4)
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the seeds")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "opd_lab")
    p.add_argument("--results", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--name", default="opd_lab")
    p.add_argument("--report-only", action="store_true", help="rewrite the page from the existing JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.seeds, args.val_seeds, args.val_length = [3, 6], [0, 1], [100], 3
        args.lrs, args.steps, args.warm_steps = [1e-3], 2, 2
        args.tokens_per_step, args.continuations, args.curve_points, args.curve_continuations = 24, 2, 1, 1
        args.bootstrap, args.workers = 50, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.report_only:
        payload = json.loads((args.results / f"{args.name}.json").read_text(encoding="utf-8"))
        write_page(payload, args.results, args.name)
        return payload
    load_start = system_load()
    val_jobs = [
        make_job(args, "val", m, args.val_length, s, lr)
        for m in args.methods
        for lr in args.lrs
        for s in args.val_seeds
    ]
    val_runs = run_jobs(val_jobs, args.out, workers=args.workers, runner=run_one)
    selection = select_lrs(val_runs, args.methods, args.lrs)
    print("learning rates:", selection["chosen"], flush=True)
    jobs = [
        make_job(args, "test", m, n, s, selection["chosen"][m])
        for n in sorted(args.lengths, reverse=True)  # longest first: the pool ends on short runs
        for m in args.methods
        for s in args.seeds
    ]
    runs = run_jobs(jobs, args.out, workers=args.workers, runner=run_one)
    data = {
        "setup": setup_facts(args),
        "selection": selection,
        "analysis": analyse(runs, args),
        "system": {"lscpu": lscpu(), "load_start": load_start, "load_end": system_load()},
        "runs": runs,
        # Validation runs only chose the learning rates: their scalars suffice.
        "val_runs": [
            {
                **{k: v for k, v in r.items() if k not in ("metrics", "curve", "job")},
                "scalars": run_scalars(r),
            }
            for r in val_runs
        ],
    }
    # write_report records the header facts and the raw JSON; the page is then rendered from the JSON.
    payload = write_report(args.name, args, title="OPD lab", body="", data=data, start=start)
    payload["header"] = (args.results / f"{args.name}.md").read_text(encoding="utf-8").strip()
    raw = args.results / f"{args.name}.json"
    raw.write_text(json.dumps(_rounded(payload), indent=1) + "\n", encoding="utf-8")
    payload = json.loads(raw.read_text(encoding="utf-8"))
    write_page(payload, args.results, args.name)
    return payload


# ---------------------------------------------------------------------------------------------
# Analysis: every number of the page is computed here (or in write_page) from the runs
# ---------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> list[float]:
    vals = [v for v in values if v == v]  # drop NaN
    if not vals:
        return [math.nan, math.nan, 0]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return [mean, std, len(vals)]


def _slope(lengths: list[int], values: list[float]) -> float:
    """Least-squares slope of ``log value`` against ``log T``."""
    xs = [math.log(t) for t in lengths]
    ys = [math.log(max(v, 1e-12)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else math.nan


def _bootstrap_ci(values: list[float], resamples: int, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean of ``values`` under resampling (seeds) with replacement."""
    vals = [v for v in values if v == v]
    if len(vals) < 2:
        return [math.nan, math.nan]
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(vals) for _ in vals) / len(vals) for _ in range(resamples))
    return [means[int(0.025 * (resamples - 1))], means[int(0.975 * (resamples - 1))]]


def run_scalars(run: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of one run (from its exact-metrics record)."""
    m = run["metrics"]
    off = m["off_support"]
    after = m["error_after_mistake"]
    off_total = sum(off)
    after_mean = (
        sum(a * o for a, o in zip(after, off) if a == a) / off_total if off_total > 1e-9 else math.nan
    )
    coverage = m["mode_coverage"]
    first = m["first_token_mass"]
    first_cov = [f / sum(first) for f in first] if sum(first) > 0 else [math.nan] * len(first)
    return {
        "expected_errors": m["expected_errors"],
        "success": m["success"],
        "step_accuracy": m["step_accuracy"],
        "reverse_kl": m["reverse_kl"],
        "forward_kl": m["forward_kl"],
        "eps_teacher": sum(m["error_teacher_prefix"]) / len(m["error_teacher_prefix"]),
        "error_after_mistake": after_mean,
        "min_coverage": min(coverage) if all(c == c for c in coverage) else min(first_cov),
        "min_first_token_coverage": min(first_cov),
    }


def analyse(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Tables, slopes with bootstrap intervals, and the tutorial's verdicts, from the test runs."""
    methods = [m for m in args.methods if any(r["method"] == m for r in runs)]
    lengths = sorted({r["T"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    by = {(r["method"], r["T"], r["seed"]): run_scalars(r) for r in runs}
    cells: dict[str, dict[str, dict[str, list[float]]]] = {}
    for m in methods:
        cells[m] = {}
        for t in lengths:
            rows = [by[(m, t, s)] for s in seeds if (m, t, s) in by]
            cells[m][str(t)] = {k: _mean_std([row[k] for row in rows]) for k in rows[0]} if rows else {}

    def per_seed(method: str, metric: str) -> dict[int, list[float]]:
        out = {}
        for s in seeds:
            if all((method, t, s) in by for t in lengths):
                out[s] = [by[(method, t, s)][metric] for t in lengths]
        return out

    slopes: dict[str, Any] = {}
    for m in methods:
        errs, eps = per_seed(m, "expected_errors"), per_seed(m, "eps_teacher")
        raw = {s: _slope(lengths, v) for s, v in errs.items()}
        # errors / eps: the compounding factor, with the per-step error on teacher prefixes divided out.
        norm = {s: _slope(lengths, [e / max(p, 1e-12) for e, p in zip(errs[s], eps[s])]) for s in errs}
        slopes[m] = {
            "per_seed": raw,
            "mean_std": _mean_std(list(raw.values())),
            "ci95": _bootstrap_ci(list(raw.values()), args.bootstrap),
            "normalised_per_seed": norm,
            "normalised_mean_std": _mean_std(list(norm.values())),
            "normalised_ci95": _bootstrap_ci(list(norm.values()), args.bootstrap),
        }
    return {
        "methods": methods,
        "lengths": lengths,
        "seeds": seeds,
        "cells": cells,
        "slopes": slopes,
        "verdicts": verdicts(by, methods, lengths, seeds, slopes, args.bootstrap),
    }


def verdicts(
    by: dict[tuple[str, int, int], dict[str, float]],
    methods: list[str],
    lengths: list[int],
    seeds: list[int],
    slopes: dict[str, Any],
    resamples: int,
) -> list[dict[str, Any]]:
    """The tutorial's predictions, each tested with the criterion fixed before the runs (docstring of the page)."""
    out: list[dict[str, Any]] = []
    short, long = min(lengths), max(lengths)

    def add(claim: str, criterion: str, measured: str, passed: bool | None) -> None:
        verdict = "n/a" if passed is None else ("PASS" if passed else "FAIL")
        out.append({"claim": claim, "criterion": criterion, "measured": measured, "verdict": verdict})

    for group, exponent in ((OFF_POLICY, 2.0), (ON_POLICY, 1.0)):
        for m in group:
            if m not in slopes:
                continue
            lo, hi = slopes[m]["ci95"]
            mean = slopes[m]["mean_std"][0]
            add(
                f"`{m}`: error grows ~T^{exponent:g}",
                f"95% bootstrap CI of the log-log slope contains {exponent:g}",
                f"slope {mean:.2f}, CI [{lo:.2f}, {hi:.2f}]",
                None if lo != lo else lo <= exponent <= hi,
            )
    off, on = PAIR
    if off in slopes and on in slopes:
        diffs = [
            slopes[off]["per_seed"][s] - slopes[on]["per_seed"][s]
            for s in seeds
            if s in slopes[off]["per_seed"] and s in slopes[on]["per_seed"]
        ]
        lo, hi = _bootstrap_ci(diffs, resamples)
        add(
            f"off-policy error grows faster than on-policy (`{off}` vs `{on}`)",
            "CI of the paired slope difference is above 0",
            f"difference {_mean_std(diffs)[0]:.2f}, CI [{lo:.2f}, {hi:.2f}]",
            None if lo != lo else lo > 0,
        )
    for m in OFF_POLICY:
        if m not in methods:
            continue
        s_short = _mean_std([by[(m, short, s)]["success"] for s in seeds if (m, short, s) in by])[0]
        s_long = _mean_std([by[(m, long, s)]["success"] for s in seeds if (m, long, s) in by])[0]
        add(
            f"`{m}` works at T={short}",
            f"mean success (sample is a teacher sequence) >= 0.9 at T={short}",
            f"{s_short:.3f}",
            s_short >= 0.9,
        )
        add(f"`{m}` fails at T={long}", f"mean success < 0.5 at T={long}", f"{s_long:.3f}", s_long < 0.5)
    if off in methods and on in methods:
        gaps = {}
        for t in (short, long):
            gaps[t] = {
                s: by[(off, t, s)]["expected_errors"] - by[(on, t, s)]["expected_errors"]
                for s in seeds
                if (off, t, s) in by and (on, t, s) in by
            }
        widen = [gaps[long][s] - gaps[short][s] for s in gaps[long] if s in gaps[short]]
        lo, hi = _bootstrap_ci(widen, resamples)
        add(
            f"the gap between methods widens with T (`{off}` - `{on}`, expected errors)",
            f"CI of gap(T={long}) - gap(T={short}) (paired by seed) is above 0",
            f"gap {_mean_std(list(gaps[short].values()))[0]:.3f} at T={short}, "
            f"{_mean_std(list(gaps[long].values()))[0]:.3f} at T={long}; CI of the change [{lo:.3f}, {hi:.3f}]",
            None if lo != lo else lo > 0,
        )
    for group, drops in ((REVERSE_KL, True), (FORWARD_KL, False)):
        for m in group:
            if m not in methods:
                continue
            cov = [by[(m, long, s)]["min_coverage"] for s in seeds if (m, long, s) in by]
            dropped = sum(c < 0.1 for c in cov)
            if drops:
                add(
                    f"`{m}` (reverse KL) drops one mode",
                    f"at T={long}, the smaller mode gets < 10% of the valid mass in most seeds",
                    f"dropped in {dropped}/{len(cov)} seeds; smaller-mode share {_fmt_ms(_mean_std(cov))}",
                    dropped > len(cov) / 2,
                )
            else:
                add(
                    f"`{m}` (forward KL) covers both modes",
                    f"at T={long}, the smaller mode gets >= 30% of the valid mass in every seed",
                    f"smaller-mode share {_fmt_ms(_mean_std(cov))}, min {min(cov):.3f}",
                    min(cov) >= 0.3,
                )
    return out


def _fmt_ms(ms: list[float], digits: int = 3) -> str:
    mean, std, _ = ms
    return "n/a" if mean != mean else f"{mean:.{digits}f} ± {std:.{digits}f}"


def setup_facts(args: argparse.Namespace) -> dict[str, Any]:
    """The lab's fixed settings, for the page."""
    _, teacher = make_lab()
    return {
        "teacher": teacher.config.to_dict(),
        "student": STUDENT,
        "methods": {m: {"agent": a, **cfg} for m, (a, cfg) in METHODS.items() if m in args.methods},
        "lengths": args.lengths,
        "steps": args.steps,
        "tokens_per_step": args.tokens_per_step,
        "warm_steps": args.warm_steps,
        "warm_lr": args.warm_lr,
        "val_seeds": args.val_seeds,
        "val_length": args.val_length,
        "lrs": args.lrs,
        "continuations": args.continuations,
        "bootstrap": args.bootstrap,
    }


def lscpu() -> list[str]:
    """The useful lines of ``lscpu``."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    keep = ("Architecture", "Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "L3")
    return [" ".join(line.split()) for line in text.splitlines() if line.startswith(keep)]


def system_load() -> str:
    """``uptime``'s load averages (other jobs share the machine)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "n/a"


# ---------------------------------------------------------------------------------------------
# The page and the plots (rendered from the JSON payload only)
# ---------------------------------------------------------------------------------------------
def _rounded(obj: Any) -> Any:
    """``obj`` with floats rounded to 5 significant digits (a smaller JSON)."""
    if isinstance(obj, float):
        return obj if obj != obj or obj in (math.inf, -math.inf) else float(f"{obj:.5g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def _cell(cells: dict[str, Any], m: str, t: int, key: str, digits: int = 3) -> str:
    return _fmt_ms(cells[m][str(t)][key], digits) if cells[m].get(str(t)) else "n/a"


def write_page(payload: dict[str, Any], results: Path, name: str) -> Path:
    """Render ``<results>/<name>.md`` and the plots from the JSON payload."""
    a, setup, sel, system = payload["analysis"], payload["setup"], payload["selection"], payload["system"]
    methods, lengths, cells = a["methods"], a["lengths"], a["cells"]
    long = max(lengths)
    teacher = setup["teacher"]
    lines = [payload["header"], ""]
    lines += ["- `lscpu`: " + "; ".join(system["lscpu"])] if system["lscpu"] else []
    lines += [
        f"- Load (`uptime`, the machine is shared): start `{system['load_start']}`; end `{system['load_end']}`",
        f"- Reported seeds {', '.join(map(str, a['seeds']))} (student initialisation, warm start, sampling); "
        f"learning rates chosen on validation seeds {', '.join(map(str, setup['val_seeds']))} at "
        f"T = {setup['val_length']} (below), never on the reported seeds.",
        "",
        "## Setup",
        "",
        "**Teacher**: `rl_distill.models.process_lm.ProcessLM`, a known process wrapped as a Hugging Face "
        "causal LM (KV cache, left padding), defined on every prefix. Two equally likely phrasings "
        f"(token cycles {teacher['phrases'][0]} and {teacher['phrases'][1]}: `abcdef...` and `fedcba...`, "
        f"mode probabilities {teacher['mode_probs']}). At completion position t the correct token is token t "
        "of the chosen phrase, also after a mistake (the teacher skips it and goes on); the teacher never makes "
        "one (probability floor "
        f"{teacher['floor']:g} spread over the vocabulary), so every prefix with a mistake is a state it never "
        'visits. On teacher prefixes "continue from the last token" is always right; after a mistake it is '
        "wrong at every later step: exposure bias by construction.",
        "",
        f"**Student**: `tiny_llama` {setup['student']} over the same {teacher['vocab_size']}-token character "
        f"tokenizer; started broad by {setup['warm_steps']} supervised-KD steps (lr {setup['warm_lr']:g}), the "
        "same start for every method of a seed and T. Then each method trains "
        f"{setup['steps']} steps of {setup['tokens_per_step']} completion tokens each (T = {long}: "
        f"{setup['tokens_per_step'] // long} sequences; T = {min(lengths)}: "
        f"{setup['tokens_per_step'] // min(lengths)}), through the "
        "toolkit's agents (`agent.update`), Adam, the rollout engine's KV-cached sampling at temperature 1. "
        "The token budget per step is fixed so that the per-step error is comparable across T, as the DAgger "
        "bound assumes.",
        "",
        "**Metrics** (`exact_student_metrics`): per-step error = the student's probability mass on tokens the "
        "teacher's rule forbids; expected errors per sequence (the bound's \"total error\"); success = "
        "probability that a sample is a teacher sequence; mode mass; sequence-level KL(teacher||student) "
        "(exact on the teacher's two paths) and KL(student||teacher). On the student's own prefixes the "
        "expectation is split by the position of its first mistake: the probability of each such event is "
        f"exact, what follows is sampled ({setup['continuations']} continuations per event).",
        "",
        "| method | agent | configuration | learning rate (validation) |",
        "|---|---|---|---|",
    ]
    for m in methods:
        cfg = dict(setup["methods"][m])
        agent = cfg.pop("agent")
        desc = ", ".join(f"{k}={v}" for k, v in cfg.items())
        lines.append(f"| `{m}` | {agent} | {desc} | {sel['chosen'][m]:g} |")
    lines += ["", "## Verdicts", ""]
    lines += [
        "Criteria fixed before the runs; intervals are 95% percentile bootstrap intervals over the "
        f"{len(a['seeds'])} seeds ({setup['bootstrap']} resamples).",
        "",
        "| prediction (tutorial) | criterion | measured | verdict |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {v['claim']} | {v['criterion']} | {v['measured']} | **{v['verdict']}** |" for v in a["verdicts"]
    ]
    lines += ["", *summary(payload), "", "## Error scaling with T", ""]
    lines += [
        "Log-log slope of the expected number of errors per sequence against T (mean ± std over seeds, "
        "bootstrap CI of the mean); the DAgger bound predicts 2 off-policy and 1 on-policy. The second "
        "slope divides out the per-step error on teacher prefixes (eps, which training sets per T): the "
        "compounding factor alone.",
        "",
        "| method | slope | 95% CI | slope of errors / eps | 95% CI |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        sl = a["slopes"][m]
        ci, nci = sl["ci95"], sl["normalised_ci95"]
        lines.append(
            f"| `{m}` | {_fmt_ms(sl['mean_std'], 2)} | [{ci[0]:.2f}, {ci[1]:.2f}] | "
            f"{_fmt_ms(sl['normalised_mean_std'], 2)} | [{nci[0]:.2f}, {nci[1]:.2f}] |"
        )
    lines += ["", f"![errors vs T]({name}_scaling.png)", ""]
    for key, title in (
        ("expected_errors", "Expected errors per sequence"),
        ("success", "Success (a sample is a teacher sequence)"),
        ("eps_teacher", "Per-step error on teacher prefixes (eps)"),
        ("error_after_mistake", "Per-step error on own prefixes after the first mistake"),
        ("reverse_kl", "Sequence-level KL(student || teacher), nats"),
        ("forward_kl", "Sequence-level KL(teacher || student), nats"),
        ("min_coverage", "Mass share of the smaller mode (0.5 = both covered, 0 = one dropped)"),
    ):
        digits = 4 if key == "eps_teacher" else 3
        lines += [f"### {title}", "", "| method | " + " | ".join(f"T={t}" for t in lengths) + " |"]
        lines += ["|---|" + "---|" * len(lengths)]
        for m in methods:
            lines.append(f"| `{m}` | " + " | ".join(_cell(cells, m, t, key, digits) for t in lengths) + " |")
        lines.append("")
    lines += [
        "## Exposure bias, measured directly",
        "",
        f"Per-step error at each position t (T = {long}, mean over seeds): on teacher prefixes (exact), on the "
        "student's own prefixes, and on own prefixes that already contain a mistake. Off-policy students are "
        "good on teacher prefixes and poor after their own mistake; on-policy training targets exactly those "
        "states.",
        "",
        f"![exposure bias]({name}_exposure.png)",
        "",
        f"![mode coverage]({name}_modes.png)",
        "",
        f"![training curves]({name}_curves.png)",
        "",
        "## Learning-rate selection (validation seeds, not reported above)",
        "",
        f"Mean expected errors at T = {setup['val_length']} over seeds {setup['val_seeds']}; the lowest is chosen.",
        "",
        "| method | " + " | ".join(f"lr={lr:g}" for lr in setup["lrs"]) + " |",
        "|---|" + "---|" * len(setup["lrs"]),
    ]
    for m in methods:
        row = sel["mean_expected_errors"][m]
        lines.append(f"| `{m}` | " + " | ".join(f"{row[f'{lr:g}']:.3f}" for lr in setup["lrs"]) + " |")
    lines += ["", "## Notes", "", *notes(payload), ""]
    page = results / f"{name}.md"
    page.write_text("\n".join(lines), encoding="utf-8")
    plots(payload, results, name)
    print(f"wrote {page}")
    return page


def summary(payload: dict[str, Any]) -> list[str]:
    """What the verdicts mean, in numbers from the JSON (the mechanism, then why raw scaling differs)."""
    a = payload["analysis"]
    cells, slopes, lengths = a["cells"], a["slopes"], a["lengths"]
    short, long = min(lengths), max(lengths)
    off, on = PAIR
    if off not in slopes or on not in slopes:
        return []

    def ci(m: str, key: str) -> str:
        lo, hi = slopes[m][key]
        return f"[{lo:.2f}, {hi:.2f}]"

    def cell(m: str, t: int, key: str) -> float:
        return cells[m][str(t)][key][0]

    warm = {
        t: _mean_std([r["before"]["success"] for r in payload["runs"] if r["T"] == t and r["method"] == off])[
            0
        ]
        for t in (short, long)
    }
    return [
        f"- **Exposure bias is there, and on-policy training removes its compounding.** After its own first "
        f"mistake, `{off}` is wrong at {cell(off, long, 'error_after_mistake'):.2f} of the later steps at T={long} "
        f"({cell(off, short, 'error_after_mistake'):.2f} at T={short}) against an error of "
        f"{cell(off, long, 'eps_teacher'):.4f} per step on teacher prefixes; `{on}` is wrong at "
        f"{cell(on, long, 'error_after_mistake'):.2f}. With each method's own eps divided out, errors grow as "
        f"T^{slopes[off]['normalised_mean_std'][0]:.2f} {ci(off, 'normalised_ci95')} for `{off}` and "
        f"T^{slopes[on]['normalised_mean_std'][0]:.2f} {ci(on, 'normalised_ci95')} for `{on}`: the DAgger "
        "exponents (2 and 1), up to the errors of the off-policy student that land back in phase by chance.",
        f"- **The raw error does not follow, because eps is not fixed.** In the same budget, `{off}` reaches "
        f"eps = {cell(off, short, 'eps_teacher'):.4f} at T={short} and {cell(off, long, 'eps_teacher'):.4f} at "
        f"T={long}, so eps T^2 stays small: {cell(off, long, 'expected_errors'):.3f} errors per sequence and "
        f"success {cell(off, long, 'success'):.3f} at T={long}; off-policy does not fail here. The on-policy "
        f"students' eps grows with T (`{on}`: {cell(on, short, 'eps_teacher'):.4f} at T={short}, "
        f"{cell(on, long, 'eps_teacher'):.4f} at T={long}): from the warm start a sample is a teacher sequence "
        f"with probability {warm[short]:.2f} at T={short} but {warm[long]:.2f} at T={long}, so at long T "
        "on-policy training spends most of its updates on prefixes that already contain a mistake, and the "
        "small student loses accuracy on the teacher's own prefixes (likely: one set of weights must serve "
        "'continue' on clean prefixes and 'skip' after a mistake). Its raw slope "
        f"is {slopes[on]['mean_std'][0]:.2f}, above `{off}`'s {slopes[off]['mean_std'][0]:.2f}.",
        "- **Mode dropping** (seeds where the smaller phrasing gets < 10% of the valid mass; in brackets, those "
        "where the student is still a good student of the phrasing it kept, success >= 0.8: mode-seeking, not "
        "breakdown): "
        + "; ".join(
            f"`{m}` "
            + ", ".join(f"T={t}: {n}/{len(a['seeds'])} ({k})" for t, (n, k) in mode_drops(payload, m).items())
            for m in a["methods"]
            if m in REVERSE_KL + FORWARD_KL
        )
        + ". A dropped mode also makes eps on teacher prefixes large (half the teacher's prefixes are on the "
        "path the student no longer takes), so the eps-normalised slopes of those runs are not comparable.",
    ]


def mode_drops(payload: dict[str, Any], method: str) -> dict[int, tuple[int, int]]:
    """Per T: seeds with a dropped mode, and how many of them still reach success >= 0.8."""
    out = {}
    for t in payload["analysis"]["lengths"]:
        rs = [run_scalars(r) for r in payload["runs"] if r["method"] == method and r["T"] == t]
        dropped = [r for r in rs if r["min_coverage"] < 0.1]
        out[t] = (len(dropped), sum(r["success"] >= 0.8 for r in dropped))
    return out


def notes(payload: dict[str, Any]) -> list[str]:
    """Per-method eps and recovery, and the caveats of the lab."""
    a = payload["analysis"]
    cells, lengths = a["cells"], a["lengths"]
    short, long = min(lengths), max(lengths)
    out = []
    for m in a["methods"]:
        eps_s, eps_l = cells[m][str(short)]["eps_teacher"][0], cells[m][str(long)]["eps_teacher"][0]
        after = cells[m][str(long)]["error_after_mistake"][0]
        out.append(
            f"- `{m}`: eps on teacher prefixes {eps_s:.4f} at T={short}, {eps_l:.4f} at T={long}; per-step error "
            f"after its first mistake at T={long}: {after:.3f}."
        )
    out += [
        "- The DAgger bound holds eps fixed; here eps is what each method's training reaches in the budget and "
        "differs between methods and lengths, which moves the raw slopes. The normalised slope (errors / eps) "
        "removes it and isolates compounding.",
        "- One learning rate per method, chosen at one length (T = 20); the on-policy methods' behaviour at "
        "T = 40 (where they are least stable) may want another. Not tuned further, so as not to tune on the "
        "reported split.",
        "- Errors are counted as the student's probability mass on tokens the teacher's rule forbids; a step "
        "after an EOS counts as an error. The teacher's own off-path mass (floor) is ignored in the exact "
        "forward KL (an O(T * floor) term).",
    ]
    return out


def plots(payload: dict[str, Any], results: Path, name: str) -> None:
    """``<name>_scaling.png``, ``_exposure.png``, ``_modes.png``, ``_curves.png``."""
    plt = pyplot()
    a, runs = payload["analysis"], payload["runs"]
    methods, lengths, cells = a["methods"], a["lengths"], a["cells"]
    long = max(lengths)
    style = {m: ("--" if m in OFF_POLICY else "-") for m in methods}

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in methods:
        for ax, key in zip(axes, ("expected_errors", "eps_teacher")):
            mean = [cells[m][str(t)][key][0] for t in lengths]
            std = [cells[m][str(t)][key][1] for t in lengths]
            ax.errorbar(lengths, mean, yerr=std, ls=style[m], marker="o", capsize=3, label=m)
    base = cells[methods[0]][str(min(lengths))]["expected_errors"][0]
    for power in (1, 2):
        axes[0].plot(lengths, [base * (t / min(lengths)) ** power for t in lengths], ":", color="grey")
        axes[0].annotate(
            f"T^{power}", (lengths[-1], base * (lengths[-1] / min(lengths)) ** power), color="grey"
        )
    for ax, title in zip(axes, ("expected errors per sequence", "per-step error on teacher prefixes (eps)")):
        ax.set(xscale="log", yscale="log", xlabel="T", title=title)
        ax.set_xticks(lengths, [str(t) for t in lengths])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / f"{name}_scaling.png", dpi=110)
    plt.close(fig)

    shown = [
        m for m in methods if m in ("supervised_kd", "seqkd", "gkd_l1_fkl", "gkd_l1_rkl", "reinforce_rkl")
    ]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.3 * len(shown), 3.4), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], shown):
        rs = [r for r in runs if r["method"] == m and r["T"] == long]
        for key, label in (
            ("error_teacher_prefix", "teacher prefixes"),
            ("error_own_prefix", "own prefixes"),
            ("error_after_mistake", "own, after a mistake"),
        ):
            curves = [r["metrics"][key] for r in rs]
            mean = [_mean_std([c[t] for c in curves])[0] for t in range(long)]
            ax.plot(range(1, long + 1), mean, label=label)
        ax.set(title=m, xlabel="position t", yscale="log", ylim=(1e-5, 1.5))
    axes[0][0].set_ylabel("per-step error")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / f"{name}_exposure.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = 0.8 / len(lengths)
    for i, t in enumerate(lengths):
        ax.bar(
            [j + i * width for j in range(len(methods))],
            [cells[m][str(t)]["min_coverage"][0] for m in methods],
            width,
            yerr=[cells[m][str(t)]["min_coverage"][1] for m in methods],
            label=f"T={t}",
        )
    ax.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(methods))], methods, rotation=30, fontsize=7, ha="right"
    )
    ax.set(ylabel="share of the smaller mode", ylim=(0, 0.55), title="mode coverage (0.5 = both)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / f"{name}_modes.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for m in methods:
        rs = [r for r in runs if r["method"] == m and r["T"] == long]
        steps = [p["step"] for p in rs[0]["curve"]]
        mean = [_mean_std([r["curve"][i]["expected_errors"] for r in rs])[0] for i in range(len(steps))]
        ax.plot(steps, mean, ls=style[m], marker=".", label=m)
    ax.set(xlabel="training step (after the warm start)", ylabel="expected errors", yscale="log")
    ax.set_title(f"T = {long}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / f"{name}_curves.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
