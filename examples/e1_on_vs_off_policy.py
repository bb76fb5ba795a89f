"""E1: on-policy vs off-policy distillation on arithmetic with chain of thought, as a fair test.

The question (paper Figs. 1, 7, 9): does training on the student's own samples (lambda = 1) beat
training on fixed sequences (lambda = 0), for the same divergence, data budget and starting student?
The design (issue #13):

1. **Disjoint splits.** The student's SFT pool is the teacher's training split of
   ``examples/tiny_teachers.py``; the distillation prompts, a validation split (learning rate and
   budget) and an eval split (>= 1000 problems) are fresh problems at one length, none of them in the
   SFT pool (checked), none shared between the three.
2. **A weaker student**: the tiny_teachers student recipe with fewer SFT steps
   (``artifacts/arithmetic_weak``), so there is room between student and teacher.
3. **Exposure bias first**: before any distillation, per-position agreement of the student's next
   token with the teacher's, teacher-forced on the teacher's greedy completions and on the student's
   own greedy prefixes (split by whether the prefix is still the teacher's).
4. **Learning rate on the validation split**: a small sweep (``--lrs``) of lambda = 0 and 1 with
   JSD(0.5) at one seed; each lambda gets the lr with the best final validation greedy accuracy.
5. **The grid**, same start and budget: SeqKD; lambda = 0 (fixed references, supervised KD) and
   lambda = 1 (on-policy) for forward KL, reverse KL and JSD(0.5); several seeds.
6. **Evaluation** on the eval split: greedy and sampled exact-match accuracy with 95% intervals over
   problems (pooled over seeds) and over seeds, the per-equation step accuracy of the greedy chains
   (each written ``a+b=c`` checked on its own operands, so an early error does not count against later
   steps), and the on-policy gain per divergence paired by seed with a bootstrap interval over seeds
   and problems.

The models and the run (docs/results/e1_on_vs_off_policy.md):

    python examples/tiny_teachers.py --task arithmetic --compact --steps 1,2,3 --num-train 8000 \\
        --teacher-steps 2500 --student-steps 1600 --out artifacts/arithmetic
    mkdir -p artifacts/arithmetic_weak && cp artifacts/arithmetic/report.json artifacts/arithmetic_weak/
    python examples/tiny_teachers.py --task arithmetic --compact --steps 1,2,3 --num-train 8000 \\
        --teacher-steps 2500 --student-steps 1300 --retrain student --out artifacts/arithmetic_weak --threads 1
    python examples/e1_on_vs_off_policy.py --workers 1 --threads 1

Writes ``docs/results/<name>.{md,json}`` and ``<name>_*.png`` (``--name``, default
``e1_on_vs_off_policy``); runs resume from ``runs/e1/runs.jsonl`` (``--out``); ``--cached-only`` reports
the runs finished so far without training (the page lists the planned runs left out); ``--report-only``
rebuilds the page from the JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
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
    load_pair,
    pyplot,
    read_runs,
    relative,
    run_job,
    run_jobs,
    runs_to_train,
    write_report,
)

from rl_distill.agents.gkd import SPECIAL_CASES  # noqa: E402

#: Divergences of the grid (label -> GKD agent fields).
DIVERGENCES: dict[str, dict[str, Any]] = {
    "fkl": {"divergence": "forward_kl"},
    "rkl": {"divergence": "reverse_kl"},
    "jsd0.5": {"divergence": "jsd", "beta": 0.5},
}
#: A validation curve is called flat when its last interval changes accuracy by less than this.
FLAT = 0.01
#: Divergence of the learning-rate sweep.
SWEEP_DIVERGENCE = "jsd0.5"
#: 97.5% quantiles of Student's t by degrees of freedom (two-sided 95% intervals over seeds).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
Z975 = 1.959964


def methods() -> dict[str, dict[str, Any]]:
    """Method label -> GKD agent fields: SeqKD, then lambda = 0, 0.5 and 1 for each divergence.

    ``gkd_l0_<div>`` trains on the references (supervised KD with that divergence, paper Eq. 3 for
    forward KL); ``gkd_l1_<div>`` on the student's own samples; ``gkd_l0.5_<div>`` half and half.
    """
    out: dict[str, dict[str, Any]] = {"seqkd": SPECIAL_CASES["seqkd"]}
    for lmbda, tag in ((0.0, "l0"), (0.5, "l0.5"), (1.0, "l1")):
        for name, div in DIVERGENCES.items():
            extra = {"off_policy": "reference"} if lmbda < 1 else {}
            out[f"gkd_{tag}_{name}"] = {"lmbda": lmbda, **extra, **div}
    return out


#: The default grid (the lambda = 0.5 arms are optional: ``--methods``).
DEFAULT_METHODS = ["seqkd"] + [f"gkd_{t}_{d}" for t in ("l0", "l1") for d in DIVERGENCES]


def lmbda_of(method: str) -> float:
    """The share of on-policy data of a method (SeqKD: 0)."""
    return float(methods()[method]["lmbda"])


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


# --- splits ---------------------------------------------------------------------------------------
def sft_spec(report: dict[str, Any]) -> dict[str, Any]:
    """The split the teacher and the SFT students were trained on (every length of the report)."""
    spec = arithmetic_spec(report, 0)
    spec["steps"] = [int(n) for n in report["args"]["steps"].split(",")]
    return spec


def split_spec(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, Any]:
    """Everything that fixes E1's four splits (stored in each job's ``data``)."""
    return {
        "task": "arithmetic",
        "sft": sft_spec(report),
        "length": args.length,
        "split_seed": args.split_seed,
        "num_distill": args.num_distill,
        "num_val": args.num_val,
        "num_eval": args.num_eval,
    }


def make_splits(spec: dict[str, Any]) -> dict[str, list[Any]]:
    """E1's splits: ``sft`` (the SFT pool), ``distill``, ``val`` and ``eval`` (fresh, disjoint problems).

    The fresh problems have ``spec["length"]`` operations, are drawn with ``random.Random(split_seed)``
    and skip every prompt of the SFT split (train and held-out), so neither model trained on them.

    Raises:
        ValueError: too few distinct fresh problems for the requested sizes.
    """
    from tiny_teachers import task_data

    from rl_distill.tasks.arithmetic import make_problem

    sft = dict(spec["sft"])
    sft_data = task_data(sft.pop("task"), sft.pop("seed"), sft.pop("num_train"), sft.pop("num_eval"), **sft)
    seen = {e.prompt for e in sft_data.train} | {e.prompt for e in sft_data.eval}
    sizes = [("eval", spec["num_eval"]), ("val", spec["num_val"]), ("distill", spec["num_distill"])]
    needed = sum(n for _, n in sizes)
    rng = random.Random(spec["split_seed"])
    fresh: dict[str, Any] = {}
    for _ in range(20 * needed + 1000):
        ex = make_problem(
            rng, digits=spec["sft"]["digits"], steps=spec["length"], compact=spec["sft"]["compact"]
        )
        if ex.prompt not in seen:
            fresh.setdefault(ex.prompt, ex)
        if len(fresh) == needed:
            break
    else:
        raise ValueError(f"only {len(fresh)} fresh problems at length {spec['length']}, {needed} needed")
    pool = list(fresh.values())
    out: dict[str, list[Any]] = {"sft": sft_data.train}
    lo = 0
    for name, n in sizes:
        out[name] = pool[lo : lo + n]
        lo += n
    return out


def split_facts(splits: dict[str, list[Any]]) -> dict[str, Any]:
    """Sizes of the splits and the number of prompts each pair shares (all zero by construction)."""
    prompts = {k: {e.prompt for e in v} for k, v in splits.items()}
    names = list(prompts)
    overlap = {f"{a}&{b}": len(prompts[a] & prompts[b]) for i, a in enumerate(names) for b in names[i + 1 :]}
    return {"sizes": {k: len(v) for k, v in splits.items()}, "overlap": overlap}


def build_e1(job: Job) -> tuple[tuple[Any, Any, Any], Any]:
    """``((teacher, student, tokenizer), task)`` of a job: distillation prompts to train, validation to watch."""
    from rl_distill.tasks import TaskData

    splits = make_splits(job.data)
    return load_pair(job.teacher, job.student), TaskData(
        "arithmetic", train=splits["distill"], eval=splits["val"]
    )


# --- evaluation -----------------------------------------------------------------------------------
EQUATION = re.compile(r"(\d+)([+-])(\d+)=(\d+)")


def step_accuracy(completion: str) -> tuple[int, int]:
    """``(correct, written)`` equations ``a+b=c`` / ``a-b=c`` of a chain, each checked on its own operands."""
    correct = written = 0
    for a, op, b, c in EQUATION.findall(completion):
        written += 1
        correct += int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    return correct, written


def bits(values: list[float]) -> str:
    """Per-problem 0/1 scores as a string (``"0110..."``), compact in the JSON."""
    return "".join("1" if v >= 0.5 else "0" for v in values)


def score_split(engine: Any, examples: list[Any], max_new: int, *, batch_size: int = 250) -> dict[str, Any]:
    """Greedy and sampled (temperature 1, seed 1234) exact match per problem, step accuracy, divergences.

    Returns:
        ``{decoding: {"correct": "0101...", "step_correct": int, "step_written": int,
        "reverse_kl": float, "forward_kl": float}}`` for ``greedy`` and ``sampled``.
    """
    from rl_distill.evaluation import evaluation_rows
    from rl_distill.rewards import ExactMatchVerifier
    from rl_distill.rollout import SamplingConfig

    out = {}
    for decoding, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        rows = evaluation_rows(
            engine,
            examples,
            sampling=SamplingConfig(max_new, temperature=temperature),
            batch_size=batch_size,
            seed=1234,
            reward=ExactMatchVerifier(),
        )
        steps = [step_accuracy(r["completion"]) for r in rows]
        out[decoding] = {
            "correct": bits([r["reward"] for r in rows]),
            "step_correct": sum(c for c, _ in steps),
            "step_written": sum(w for _, w in steps),
            "reverse_kl": statistics.fmean(r["reverse_kl"] for r in rows),
            "forward_kl": statistics.fmean(r["forward_kl"] for r in rows),
        }
    return out


def eval_after(trainer: Any, job: Job) -> dict[str, Any]:
    """The trained student on the eval split (the ``extra`` of a grid run)."""
    splits = make_splits(job.data)
    return score_split(trainer.engine, splits["eval"], job.eval["max_new_tokens"])


def result_positions(ids: Any, chars: list[str]) -> Any:
    """``(B, T)`` bool: the positions whose token writes an equation's result (after ``=``, to its ``.``).

    The state is read from the prefix before each position: after an ``=`` and before the next ``.``.
    """
    import torch

    out = torch.zeros(ids.shape, dtype=torch.bool)
    for b, row in enumerate(ids.tolist()):
        inside = False
        for n, token in enumerate(row):
            out[b, n] = inside
            c = chars[token] if 0 <= token < len(chars) else ""
            inside = True if c == "=" else False if c == "." else inside
    return out


def exposure_bias(
    teacher: Any, student: Any, tokenizer: Any, examples: list[Any], max_new: int
) -> dict[str, Any]:
    """Per-position agreement of the student's next token with the teacher's, on two kinds of prefix.

    - ``teacher_forced``: prefixes of the teacher's greedy completions; at position n the student's
      argmax is compared with the teacher's (the teacher's token) and the teacher's probability of
      the student's argmax is taken.
    - ``own``: prefixes of the student's own greedy completions (its argmax is its token), split into
      ``own_on_path`` (the prefix so far equals the teacher's greedy completion, so the state is one the
      teacher-forced pass also sees) and ``own_off_path`` (the prefix has left it).

    Each kind ``k`` also has ``k@result``: only the positions that write the result of an equation (after
    its ``=``, up to and including the ``.`` that closes the number), where the arithmetic happens; the
    other positions mostly copy operands.

    Returns:
        ``{kind: {"agree": [...], "p_teacher": [...], "count": [...]}}`` per position (sums; the
        rates are sum / count), the per-kind totals, and sequence-level facts.
    """
    import torch

    from rl_distill.rollout import RolloutEngine, SamplingConfig

    engine = RolloutEngine(student, teacher, tokenizer)
    greedy = SamplingConfig(max_new, temperature=0.0)
    kinds = [
        f"{k}{part}"
        for k in ("teacher_forced", "own", "own_on_path", "own_off_path")
        for part in ("", "@result")
    ]
    acc = {k: {"agree": [0.0] * max_new, "p_teacher": [0.0] * max_new, "count": [0] * max_new} for k in kinds}
    same_completion = 0
    chars = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))

    def add(kind: str, agree: Any, p_teacher: Any, mask: Any, ids: Any) -> None:
        result = result_positions(ids, chars)
        for name, where in ((kind, mask), (f"{kind}@result", mask & result)):
            for n in range(agree.shape[1]):
                m = where[:, n]
                acc[name]["agree"][n] += float(agree[:, n][m].sum())
                acc[name]["p_teacher"][n] += float(p_teacher[:, n][m].sum())
                acc[name]["count"][n] += int(m.sum())

    with torch.no_grad():
        for lo in range(0, len(examples), 250):
            prompts = [e.prompt for e in examples[lo : lo + 250]]
            tf = engine.score(engine.generate(prompts, greedy, model=teacher), teacher_output="full")
            s_arg = engine.score_student(tf).argmax(-1)  # (B, T)
            t_prob = tf.teacher_logits.float().softmax(-1)  # (B, T, V)
            add(
                "teacher_forced",
                (s_arg == tf.teacher_logits.argmax(-1)).float(),
                t_prob.gather(-1, s_arg[..., None])[..., 0],
                tf.completion_mask,
                tf.completion_ids,
            )
            own = engine.score(engine.generate(prompts, greedy), teacher_output="full")
            ids = own.completion_ids  # (B, T') the student's argmax tokens
            agree = (ids == own.teacher_logits.argmax(-1)).float()
            p_t = own.teacher_logits.float().softmax(-1).gather(-1, ids[..., None])[..., 0]
            add("own", agree, p_t, own.completion_mask, ids)
            # on the teacher's path: every earlier token equals the teacher's greedy token there
            width = ids.shape[1]
            ref = torch.full_like(ids, -1)
            k = min(width, tf.completion_ids.shape[1])
            ref[:, :k] = torch.where(tf.completion_mask[:, :k], tf.completion_ids[:, :k], -1)
            same = (ids == ref).long()
            on_path = torch.ones_like(ids, dtype=torch.bool)
            on_path[:, 1:] = same[:, :-1].cumprod(1).bool()
            add("own_on_path", agree, p_t, own.completion_mask & on_path, ids)
            add("own_off_path", agree, p_t, own.completion_mask & ~on_path, ids)
            for a, b in zip(engine.decode(own), engine.decode(tf)):
                same_completion += a == b
    totals = {
        k: {
            "agree": sum(v["agree"]) / max(1, sum(v["count"])),
            "p_teacher": sum(v["p_teacher"]) / max(1, sum(v["count"])),
            "tokens": sum(v["count"]),
        }
        for k, v in acc.items()
    }
    return {
        "positions": acc,
        "totals": totals,
        "problems": len(examples),
        "same_completion": same_completion,
        "left_teacher_path": len(examples) - same_completion,
    }


# --- statistics -----------------------------------------------------------------------------------
def correct_matrix(runs: list[dict[str, Any]], decoding: str) -> list[list[int]]:
    """``(seeds, problems)`` 0/1 exact match of the runs (ordered by seed)."""
    return [[int(c) for c in r["extra"][decoding]["correct"]] for r in sorted(runs, key=lambda r: r["seed"])]


def accuracy_summary(matrix: list[list[int]]) -> dict[str, float]:
    """Mean accuracy with a 95% interval over problems (per-problem means pooled over seeds) and over seeds.

    ``ci_problems``: half-width ``1.96 * sd(problem means) / sqrt(N)`` (the eval set as a sample of
    problems); ``seed_std`` and ``ci_seeds``: the sample std of the per-seed accuracies and the
    t-interval half-width of their mean (0 with one seed).
    """
    n_seeds, n = len(matrix), len(matrix[0])
    per_problem = [sum(row[i] for row in matrix) / n_seeds for i in range(n)]
    per_seed = [sum(row) / n for row in matrix]
    mean = statistics.fmean(per_problem)
    sd_seed = statistics.stdev(per_seed) if n_seeds > 1 else 0.0
    return {
        "mean": mean,
        "ci_problems": Z975 * statistics.stdev(per_problem) / n**0.5,
        "seed_std": sd_seed,
        "ci_seeds": T975.get(n_seeds - 1, Z975) * sd_seed / n_seeds**0.5 if n_seeds > 1 else 0.0,
        "seeds": n_seeds,
        "problems": n,
    }


def paired_gain(
    on: list[list[int]], off: list[list[int]], *, reps: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """On-policy minus off-policy accuracy, paired by seed and problem, with a 95% bootstrap interval.

    Each bootstrap replicate draws the seeds (pairs) and the problems with replacement, independently
    (two-way bootstrap), so the interval covers both the training noise and the choice of problems.
    Also the per-seed gains and their t-interval.
    """
    import numpy as np

    diff = np.asarray(on, dtype=float) - np.asarray(off, dtype=float)  # (S, N)
    s, n = diff.shape
    rng = np.random.default_rng(seed)
    boots = np.empty(reps)
    for i in range(reps):
        rows = diff[rng.integers(0, s, size=s)].mean(0)  # (N,)
        boots[i] = rows[rng.integers(0, n, size=n)].mean()
    per_seed = diff.mean(1).tolist()
    sd = statistics.stdev(per_seed) if s > 1 else 0.0
    return {
        "mean": float(diff.mean()),
        "ci_low": float(np.percentile(boots, 2.5)),
        "ci_high": float(np.percentile(boots, 97.5)),
        "per_seed": per_seed,
        "seed_std": sd,
        "ci_seeds": T975.get(s - 1, Z975) * sd / s**0.5 if s > 1 else 0.0,
        "seeds": s,
    }


# --- jobs -----------------------------------------------------------------------------------------
def make_job(
    args: argparse.Namespace, report: dict[str, Any], method: str, seed: int, lr: float, phase: str
) -> Job:
    """One run: ``phase`` is ``sweep`` (validation only) or ``grid`` (also scored on the eval split)."""
    budget = max_new_tokens(args.length, int(report["args"]["digits"]))
    return Job(
        key=f"{phase}|{method}|lr={lr:g}|seed={seed}",
        method=method,
        seed=seed,
        teacher=str(args.artifacts / "teacher"),
        student=str(args.student),
        data=split_spec(args, report),
        agent={"name": "gkd", **methods()[method], "max_new_tokens": budget},
        train={
            "steps": args.train_steps,
            "batch_size": args.batch_size,
            "lr": lr,
            "warmup_steps": max(1, args.train_steps // 10),
            "lr_schedule": "cosine",
            "eval_batch_size": 256,
            "eval_every": args.eval_every,
        },
        eval={"greedy": True, "sampled": False, "max_new_tokens": budget, "num_samples": 0},
        labels={"phase": phase, "lr": lr, "lmbda": lmbda_of(method)},
        threads=args.threads,
    )


def sweep_jobs(args: argparse.Namespace, report: dict[str, Any]) -> list[Job]:
    """Each lr of ``--lrs`` at lambda 0 and 1 with the sweep divergence, at ``--sweep-seed``."""
    return [
        make_job(args, report, f"gkd_{tag}_{SWEEP_DIVERGENCE}", args.sweep_seed, lr, "sweep")
        for tag in ("l0", "l1")
        for lr in args.lrs
    ]


def val_accuracy(run: dict[str, Any]) -> float:
    """Final validation greedy accuracy of a run."""
    return run["after"]["eval/greedy/exact_match"]


def choose_lrs(sweep: list[dict[str, Any]]) -> dict[str, float]:
    """``{"0": lr, "1": lr}``: per lambda, the swept lr with the best final validation greedy accuracy
    (ties: the smaller lr)."""
    out = {}
    for lmbda in (0.0, 1.0):
        runs = sorted((r for r in sweep if r["lmbda"] == lmbda), key=lambda r: (-val_accuracy(r), r["lr"]))
        if runs:
            out[f"{lmbda:g}"] = runs[0]["lr"]
    return out


def lr_for(method: str, chosen: dict[str, float]) -> float:
    """The lr of a method: its lambda's choice (lambda 0.5 and SeqKD take lambda 0's)."""
    return chosen["1"] if lmbda_of(method) == 1.0 else chosen["0"]


def grid_jobs(args: argparse.Namespace, report: dict[str, Any], chosen: dict[str, float]) -> list[Job]:
    """Every method at every seed, seed-major (a cut-short grid has whole seeds)."""
    return [
        make_job(args, report, m, seed, lr_for(m, chosen), "grid")
        for seed in args.seeds
        for m in args.methods
    ]


# --- report ---------------------------------------------------------------------------------------
def ci(summary: dict[str, float]) -> str:
    """``0.512 [0.481, 0.543] (seeds ± 0.012)``: the problem interval, then the seed std."""
    m, h = summary["mean"], summary["ci_problems"]
    spread = f" (± {summary['seed_std']:.3f})" if summary["seeds"] > 1 else ""
    return f"{m:.3f} [{max(0.0, m - h):.3f}, {min(1.0, m + h):.3f}]{spread}"


def gain_text(g: dict[str, Any]) -> str:
    """``+0.012 [-0.004, +0.028]``."""
    return f"{g['mean']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]"


#: Row labels of the exposure-bias table.
EXPOSURE_LABELS = {
    "teacher_forced": "teacher's prefixes (teacher-forced)",
    "own": "student's own prefixes, all",
    "own_on_path": "own prefixes still on the teacher's path",
    "own_off_path": "own prefixes off the teacher's path",
}


def exposure_table(eb: dict[str, Any], bins: int = 10) -> str:
    """Markdown: agreement and teacher probability by kind of prefix, on every token and on result tokens,
    and the agreement by position bins (every token)."""
    pos = eb["positions"]
    width = len(pos["teacher_forced"]["count"])
    edges = list(range(0, width, bins))
    head = (
        "| prefixes | tokens | agreement | p_teacher(student token) | result tokens | agreement on result tokens | "
        + " | ".join(f"pos {a}-{min(a + bins, width) - 1}" for a in edges)
    )
    lines = [head + " |", "|" + "---|" * (6 + len(edges))]
    for kind, label in EXPOSURE_LABELS.items():
        t, r = eb["totals"][kind], eb["totals"][f"{kind}@result"]
        cells = []
        for a in edges:
            c = sum(pos[kind]["count"][a : a + bins])
            cells.append(f"{sum(pos[kind]['agree'][a : a + bins]) / c:.3f}" if c else "-")
        lines.append(
            f"| {label} | {t['tokens']} | {t['agree']:.3f} | {t['p_teacher']:.3f} | {r['tokens']} | {r['agree']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def exposure_finding(eb: dict[str, Any]) -> str:
    """Sentences comparing the disagreement rates of the kinds of prefix, all tokens and result tokens."""
    t = eb["totals"]
    err = {k: 1 - v["agree"] for k, v in t.items()}
    parts = []
    for suffix, what in (("", "tokens"), ("@result", "result tokens (after `=`)")):
        text = (
            f"the student disagrees with the teacher's next token on {err['teacher_forced' + suffix]:.3f} of the "
            f"{what} of the teacher's completions and on {err['own' + suffix]:.3f} of its own "
            f"({err['own_on_path' + suffix]:.3f} while its prefix is still the teacher's"
        )
        if t["own_off_path" + suffix]["tokens"]:
            base = err["teacher_forced" + suffix]
            ratio = f"{err['own_off_path' + suffix] / base:.1f}x" if base > 0 else "above 0 against 0 for"
            text += (
                f", {err['own_off_path' + suffix]:.3f} once it has left it: {ratio} the teacher-forced rate)"
            )
        else:
            text += "; no prefix leaves it)"
        parts.append(text)
    return (
        "On every token, "
        + parts[0]
        + "; on "
        + parts[1].replace("the student disagrees with the teacher's next token on ", "", 1)
        + f". {eb['left_teacher_path']} of {eb['problems']} greedy completions leave the teacher's path, "
        f"{eb['same_completion']} are identical to it."
    )


def curve_table(grid: list[dict[str, Any]], order: list[str]) -> str:
    """Markdown: validation greedy accuracy along training per method, mean over seeds (did it flatten?)."""
    if not grid:
        return ""
    steps = [c["step"] for c in grid[0]["curve"]]
    lines = ["| method | " + " | ".join(f"step {s}" for s in steps) + " |", "|" + "---|" * (1 + len(steps))]
    for m in order:
        runs = [r for r in grid if r["method"] == m]
        if runs:
            means = [
                statistics.fmean(r["curve"][i]["eval/greedy/exact_match"] for r in runs)
                for i in range(len(steps))
            ]
            lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    return "\n".join(lines) + "\n"


def not_run_note(keys: list[str]) -> str:
    """A paragraph listing the planned grid runs that were not run (empty when none)."""
    if not keys:
        return ""
    return (
        f"**Incomplete grid**: {len(keys)} planned runs were not run in the time budget and are missing from "
        "every table below (they resume from `runs.jsonl` with the same command): "
        + ", ".join(f"`{k.removeprefix('grid|')}`" for k in keys)
        + ".\n\n"
    )


def edge_note(sweep: list[dict[str, Any]], chosen: dict[str, float]) -> str:
    """A sentence naming each lambda whose chosen lr is the largest or smallest swept (else empty)."""
    lrs = sorted({r["lr"] for r in sweep})
    notes = []
    for lmbda, lr in chosen.items():
        if len(lrs) > 1 and lr in (lrs[0], lrs[-1]):
            side = "largest" if lr == lrs[-1] else "smallest"
            notes.append(
                f"lambda {lmbda}'s lr ({lr:g}) is the {side} swept, so its optimum may lie beyond the range"
            )
    return (" " + "; ".join(notes).capitalize() + ".") if notes else ""


def sweep_table(sweep: list[dict[str, Any]], chosen: dict[str, float]) -> str:
    """Markdown: validation greedy accuracy of each swept lr along training (the curve), the choice marked."""
    if not sweep:
        return ""
    steps = [c["step"] for c in sweep[0]["curve"]]
    lines = [
        "| lambda | lr | " + " | ".join(f"step {s}" for s in steps) + " | chosen |",
        "|" + "---|" * (3 + len(steps)),
    ]
    for r in sorted(sweep, key=lambda r: (r["lmbda"], r["lr"])):
        curve = " | ".join(f"{c['eval/greedy/exact_match']:.3f}" for c in r["curve"])
        mark = "**yes**" if chosen.get(f"{r['lmbda']:g}") == r["lr"] else ""
        lines.append(f"| {r['lmbda']:g} | {r['lr']:g} | {curve} | {mark} |")
    return "\n".join(lines) + "\n"


def method_rows(grid: list[dict[str, Any]], order: list[str]) -> dict[str, dict[str, Any]]:
    """Per method: greedy and sampled accuracy summaries, greedy step accuracy, sampled reverse KL."""
    out = {}
    for m in order:
        runs = [r for r in grid if r["method"] == m]
        if not runs:
            continue
        out[m] = {
            "greedy": accuracy_summary(correct_matrix(runs, "greedy")),
            "sampled": accuracy_summary(correct_matrix(runs, "sampled")),
            "step_accuracy": statistics.fmean(
                r["extra"]["greedy"]["step_correct"] / max(1, r["extra"]["greedy"]["step_written"])
                for r in runs
            ),
            "reverse_kl": statistics.fmean(r["extra"]["sampled"]["reverse_kl"] for r in runs),
            "val_greedy": statistics.fmean(val_accuracy(r) for r in runs),
            "lr": runs[0]["lr"],
            "seeds": sorted(r["seed"] for r in runs),
        }
    return out


def single_row(scores: dict[str, Any]) -> dict[str, Any]:
    """A one-model row (start student, teacher) in the shape of :func:`method_rows`."""
    g = scores["greedy"]
    return {
        "greedy": accuracy_summary([[int(c) for c in g["correct"]]]),
        "sampled": accuracy_summary([[int(c) for c in scores["sampled"]["correct"]]]),
        "step_accuracy": g["step_correct"] / max(1, g["step_written"]),
        "reverse_kl": scores["sampled"]["reverse_kl"],
    }


def results_table(rows: dict[str, dict[str, Any]], start: dict[str, Any], teacher: dict[str, Any]) -> str:
    """Markdown: the eval-split table."""
    lines = [
        "| method | lr | greedy accuracy | sampled accuracy | greedy step accuracy | reverse KL (sampled) | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in (("teacher", teacher), ("student start", start)):
        lines.append(
            f"| {label} | - | {ci(r['greedy'])} | {ci(r['sampled'])} | {r['step_accuracy']:.3f} | "
            f"{r['reverse_kl']:.3f} | - |"
        )
    for m, r in rows.items():
        lines.append(
            f"| {m} | {r['lr']:g} | {ci(r['greedy'])} | {ci(r['sampled'])} | {r['step_accuracy']:.3f} | "
            f"{r['reverse_kl']:.3f} | {len(r['seeds'])} |"
        )
    return "\n".join(lines) + "\n"


def gains(grid: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per divergence and decoding: lambda 1 minus lambda 0, paired by seed (seeds both have)."""
    out: dict[str, dict[str, Any]] = {}
    for div in DIVERGENCES:
        on = {r["seed"]: r for r in grid if r["method"] == f"gkd_l1_{div}"}
        off = {r["seed"]: r for r in grid if r["method"] == f"gkd_l0_{div}"}
        seeds = sorted(set(on) & set(off))
        if not seeds:
            continue
        out[div] = {"seeds": seeds}
        for decoding in ("greedy", "sampled"):
            out[div][decoding] = paired_gain(
                correct_matrix([on[s] for s in seeds], decoding),
                correct_matrix([off[s] for s in seeds], decoding),
            )
    return out


def gain_table(g: dict[str, dict[str, Any]]) -> str:
    """Markdown: the on-policy gain per divergence."""
    lines = [
        "| divergence | greedy gain [95% CI] | greedy per-seed ± t-interval | sampled gain [95% CI] | "
        "sampled per-seed ± t-interval | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for div, e in g.items():
        gr, sa = e["greedy"], e["sampled"]
        lines.append(
            f"| {div} | {gain_text(gr)} | {gr['mean']:+.3f} ± {gr['ci_seeds']:.3f} | {gain_text(sa)} | "
            f"{sa['mean']:+.3f} ± {sa['ci_seeds']:.3f} | {len(e['seeds'])} |"
        )
    return "\n".join(lines) + "\n"


def verdict_word(g: dict[str, Any]) -> str:
    """``higher``/``lower``/``no detectable difference`` from a gain's 95% interval."""
    if g["ci_low"] > 0:
        return "higher"
    if g["ci_high"] < 0:
        return "lower"
    return "no detectable difference"


def findings(data: dict[str, Any]) -> str:
    """Plain statements computed from the data (markdown bullets)."""
    rows, g, start = data["methods"], data["gains"], data["start_row"]
    out = [f"- **Exposure bias (before training).** {exposure_finding(data['exposure_bias'])}"]
    if rows:
        for decoding in ("greedy", "sampled"):
            best = max(rows, key=lambda m: rows[m][decoding]["mean"])
            worst = min(rows, key=lambda m: rows[m][decoding]["mean"])
            above = [
                m
                for m, r in rows.items()
                if r[decoding]["mean"] - r[decoding]["ci_problems"] > start[decoding]["mean"]
            ]
            out.append(
                f"- **{decoding.capitalize()} accuracy** (start {start[decoding]['mean']:.3f}): methods end at "
                f"{rows[worst][decoding]['mean']:.3f} (`{worst}`) to {rows[best][decoding]['mean']:.3f} (`{best}`); "
                f"{len(above)} of {len(rows)} end with the lower end of their interval over problems above the start."
            )
    grid = [r for r in data["runs"] if r["phase"] == "grid" and len(r["curve"]) >= 2]
    if grid:
        rises = {}
        for m in rows:
            runs = [r for r in grid if r["method"] == m]
            if runs:
                rises[m] = statistics.fmean(
                    r["curve"][-1]["eval/greedy/exact_match"] - r["curve"][-2]["eval/greedy/exact_match"]
                    for r in runs
                )
        last = grid[0]["curve"][-2]["step"], grid[0]["curve"][-1]["step"]
        flat = [m for m, v in rises.items() if abs(v) < FLAT]
        out.append(
            f"- **Budget**: from step {last[0]} to {last[1]} the validation greedy accuracy (mean over seeds) changes "
            f"by {min(rises.values()):+.3f} to {max(rises.values()):+.3f} across methods; "
            + (
                f"{len(flat)} of {len(rises)} methods change by less than {FLAT} (flat)."
                if flat
                else f"no method's curve is flat (|change| < {FLAT}): the budget ends before the curves flatten."
            )
        )
    if g:
        parts = []
        for decoding in ("greedy", "sampled"):
            words = {div: verdict_word(e[decoding]) for div, e in g.items()}
            parts.append(
                f"{decoding}: "
                + "; ".join(f"{div} {gain_text(g[div][decoding])} ({words[div]})" for div in g)
            )
        out.append(
            "- **On-policy gain** (lambda 1 minus lambda 0, same divergence, paired by seed; 95% bootstrap "
            "interval over seeds and problems): " + ". ".join(parts) + "."
        )
    return "\n".join(out) + "\n"


def verdict(data: dict[str, Any]) -> str:
    """The one-paragraph verdict, worded to what the intervals support."""
    g = data["gains"]
    if not g:
        return "No grid runs yet."
    words = {(div, d): verdict_word(e[d]) for div, e in g.items() for d in ("greedy", "sampled")}
    higher = [f"{div} ({d})" for (div, d), w in words.items() if w == "higher"]
    lower = [f"{div} ({d})" for (div, d), w in words.items() if w == "lower"]
    none = [f"{div} ({d})" for (div, d), w in words.items() if w == "no detectable difference"]
    text = f"Of {len(words)} comparisons (divergence x decoding), on-policy data is detectably better in {len(higher)}"
    text += f" ({', '.join(higher)})" if higher else ""
    text += f", detectably worse in {len(lower)}" + (f" ({', '.join(lower)})" if lower else "")
    text += f", and indistinguishable in {len(none)}" + (f" ({', '.join(none)})" if none else "") + "."
    if not higher:
        text += " The paper's claim that on-policy data beats fixed data is not supported on this task at this scale."
    elif not lower and len(higher) == len(words):
        text += " On this task the paper's claim holds for every divergence and decoding tested."
    else:
        text += " The claim holds only where marked; it is not a general result here."
    return text + caveats(data)


def caveats(data: dict[str, Any]) -> str:
    """Computed caveats of the verdict: the size of the exposure bias, unflattened curves, lrs at the edge."""
    t = data["exposure_bias"]["totals"]
    notes = []
    base, off = 1 - t["teacher_forced@result"]["agree"], 1 - t["own_off_path@result"]["agree"]
    if base > 0 and t["own_off_path@result"]["tokens"]:
        notes.append(
            f"the start student's error rate on result tokens is {off / base:.1f}x as high on its own off-path "
            f"prefixes as on the teacher's ({off:.3f} vs {base:.3f}), the room on-policy data has to help"
        )
    grid = [r for r in data["runs"] if r["phase"] == "grid" and len(r["curve"]) >= 2]
    rising = {
        r["method"]
        for r in grid
        if statistics.fmean(
            q["curve"][-1]["eval/greedy/exact_match"] - q["curve"][-2]["eval/greedy/exact_match"]
            for q in grid
            if q["method"] == r["method"]
        )
        >= FLAT
    }
    if rising:
        notes.append(
            f"{len(rising)} of {len({r['method'] for r in grid})} methods' validation curves still rose by "
            f">= {FLAT} over the last interval, so a longer budget could change the ranking"
        )
    sweep = [r for r in data["runs"] if r["phase"] == "sweep"]
    edge = edge_note(sweep, data["chosen_lr"]).strip().rstrip(".")
    if edge:
        notes.append(edge[0].lower() + edge[1:])
    notes += sweep_notes(sweep, data["splits"]["sizes"]["val"])
    return (" Caveats: " + "; ".join(notes) + ".") if notes else ""


def sweep_notes(sweep: list[dict[str, Any]], val_size: int) -> list[str]:
    """What the validation sweep says besides the choice: how far apart the two best lrs of each lambda
    end (against the binomial standard error of the validation split), and lambda 1 against lambda 0 at
    each shared lr (one seed)."""
    notes = []
    by = {(r["lmbda"], r["lr"]): val_accuracy(r) for r in sweep}
    for lmbda in (0.0, 1.0):
        accs = sorted((v for (lm, _), v in by.items() if lm == lmbda), reverse=True)
        if len(accs) >= 2:
            se = (accs[0] * (1 - accs[0]) / val_size) ** 0.5
            notes.append(
                f"lambda {lmbda:g}'s two best lrs end {accs[0]:.3f} and {accs[1]:.3f} on validation, "
                f"{(accs[0] - accs[1]) / se:.1f} standard errors apart (one seed), so the choice is noisy"
            )
    shared = sorted(lr for (lm, lr) in by if lm == 0.0 and (1.0, lr) in by)
    if shared:
        pairs = ", ".join(f"{by[(1.0, lr)]:.3f} vs {by[(0.0, lr)]:.3f} at lr {lr:g}" for lr in shared)
        notes.append(
            f"at equal learning rates the sweep's lambda 1 vs lambda 0 validation accuracies were {pairs}"
        )
    return notes


def plots(data: dict[str, Any], results: Path, name: str) -> list[str]:
    """Exposure-bias curves and the accuracy of each method (both decodings); returns file names."""
    plt = pyplot()
    names = []
    eb = data["exposure_bias"]["positions"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, suffix, what in zip(axes, ("", "@result"), ("every token", "result tokens (after '=')")):
        for kind, label in (
            ("teacher_forced", "teacher's prefixes"),
            ("own_on_path", "own prefixes, on teacher's path"),
            ("own_off_path", "own prefixes, off teacher's path"),
        ):
            k = kind + suffix
            xs = [n for n, c in enumerate(eb[k]["count"]) if c >= 20]
            ax.plot(xs, [1 - eb[k]["agree"][n] / eb[k]["count"][n] for n in xs], marker=".", label=label)
        ax.set_xlabel("completion position (characters)")
        ax.set_title(f"{what}; positions with >= 20 tokens")
    axes[0].set_ylabel("disagreement with the teacher's argmax")
    axes[0].legend()
    fig.suptitle("E1 premise: exposure bias of the start student")
    fig.tight_layout()
    fig.savefig(results / f"{name}_exposure.png", dpi=120)
    plt.close(fig)
    names.append(f"{name}_exposure.png")
    rows = data["methods"]
    if rows:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
        order = list(rows)
        for ax, decoding in zip(axes, ("greedy", "sampled")):
            colors = [
                "tab:gray"
                if lmbda_of(m) == 0 and m == "seqkd"
                else "tab:cyan"
                if lmbda_of(m) < 1
                else "tab:blue"
                for m in order
            ]
            ax.bar(
                range(len(order)),
                [rows[m][decoding]["mean"] for m in order],
                yerr=[rows[m][decoding]["ci_problems"] for m in order],
                color=colors,
                capsize=3,
            )
            ax.axhline(data["start_row"][decoding]["mean"], color="k", ls="--", lw=1, label="start")
            ax.set_xticks(range(len(order)), order, rotation=45, ha="right")
            ax.set_ylabel(f"eval {decoding} accuracy (95% CI over problems)")
            ax.set_title(f"{decoding} decoding")
            ax.legend()
        fig.tight_layout()
        fig.savefig(results / f"{name}_methods.png", dpi=120)
        plt.close(fig)
        names.append(f"{name}_methods.png")
    return names


def summarize(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The derived tables of the page from the raw data (runs, start and teacher scores)."""
    grid = [r for r in raw["runs"] if r["phase"] == "grid"]
    order = [m for m in args.methods if any(r["method"] == m for r in grid)]
    return {
        **raw,
        "methods": method_rows(grid, order),
        "gains": gains(grid),
        "start_row": single_row(raw["start"]),
        "teacher_row": single_row(raw["teacher"]),
    }


def report_body(args: argparse.Namespace, data: dict[str, Any]) -> str:
    """The markdown page body (plots written too)."""
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    pngs = plots(data, results, args.name)
    splits = data["splits"]
    sizes = splits["sizes"]
    overlap = sum(splits["overlap"].values())
    sweep = [r for r in data["runs"] if r["phase"] == "sweep"]
    weak = data["student_report"]
    return (
        "## Setup\n\n"
        f"- Teacher: `{relative(args.artifacts)}/teacher` (tiny_teachers, {data['teacher_report']['teacher']['steps']} SFT "
        f"steps). Student: `{relative(args.student)}` (the tiny_teachers student recipe with "
        f"{weak['student']['steps']} SFT steps instead of {data['teacher_report']['student']['steps']}, so it starts "
        "further from the teacher; the commands are in the script's docstring).\n"
        f"- Splits ({args.length}-operation compact problems for distillation, validation and eval): SFT pool "
        f"{sizes['sft']} problems (the teacher's and the student's training split, lengths "
        f"{data['teacher_report']['args']['steps']}); distillation prompts {sizes['distill']}; validation {sizes['val']} "
        f"(learning rate and budget); eval {sizes['eval']}. Prompts shared between any two splits: {overlap}.\n"
        f"- Every run: {args.train_steps} steps of batch {args.batch_size} ({args.train_steps * args.batch_size} "
        f"distillation prompts drawn from {sizes['distill']} without replacement per epoch), AdamW with linear warm-up over 10% of the "
        "steps then cosine decay, sampling temperature 1, the same start; on-policy coin per example. "
        "`gkd_l0_<div>` trains on the references (supervised KD with that divergence), `gkd_l1_<div>` on "
        "the student's own samples, `seqkd` is cross-entropy on teacher samples.\n"
        "- Accuracy: exact match of the final answer (`#### n`), greedy and sampled (temperature 1, fixed "
        "sampler seed), on the eval split. Cells read `mean [95% interval over problems] (± std over seeds)`: "
        "the interval is 1.96 standard errors of the per-problem accuracies averaged over seeds, the std is "
        "that of the per-seed accuracies. Step accuracy: the share of written equations `a+b=c` that are "
        "right for their own operands (greedy).\n\n"
        "## Exposure bias of the start student (measured first)\n\n"
        f"On the {data['exposure_bias']['problems']} eval problems, greedy decoding of both models: how often the "
        "student's most likely next token is the teacher's, by kind of prefix and by completion position "
        "(`agreement` columns; `p_teacher` is the teacher's probability of the student's token).\n\n"
        + exposure_table(data["exposure_bias"])
        + f"\n{exposure_finding(data['exposure_bias'])}\n\n"
        "## Learning rate and budget, on the validation split\n\n"
        f"JSD(0.5) at lambda 0 and 1, seed {args.sweep_seed}: validation greedy accuracy "
        f"({sizes['val']} problems) along training. Chosen per lambda: the best final accuracy "
        f"(lambda 0: {data['chosen_lr'].get('0', '-')}, lambda 1: {data['chosen_lr'].get('1', '-')}; SeqKD "
        "takes lambda 0's). The budget is fixed by the CPU time; the curve shows whether it flattened."
        + edge_note(sweep, data["chosen_lr"])
        + "\n\n"
        + sweep_table(sweep, data["chosen_lr"])
        + "\nThe grid runs' validation curves (greedy accuracy, mean over seeds; the eval split is never used "
        "for any choice):\n\n"
        + curve_table([r for r in data["runs"] if r["phase"] == "grid"], list(data["methods"]))
        + "\n## Results on the eval split\n\n"
        + not_run_note(data.get("not_run", []))
        + results_table(data["methods"], data["start_row"], data["teacher_row"])
        + "\n## On-policy gain per divergence\n\n"
        + gain_table(data["gains"])
        + "\n## Findings (computed from the runs)\n\n"
        + findings(data)
        + f"\n**Verdict.** {verdict(data)}\n\n"
        + "".join(f"![{n}]({n})\n" for n in pngs)
    )


TITLE = "E1: on-policy vs off-policy distillation (arithmetic, chain of thought; a fair test)"


def start_scores(args: argparse.Namespace, report: dict[str, Any], examples: list[Any]) -> dict[str, Any]:
    """Exposure bias of the start student, and eval-split scores of the start student and the teacher."""
    import torch

    from rl_distill.rollout import RolloutEngine

    torch.set_num_threads(args.threads)
    teacher, student, tokenizer = load_pair(str(args.artifacts / "teacher"), str(args.student))
    student.eval()
    budget = max_new_tokens(args.length, int(report["args"]["digits"]))
    return {
        "exposure_bias": exposure_bias(teacher, student, tokenizer, examples, budget),
        "start": score_split(RolloutEngine(student, teacher, tokenizer), examples, budget),
        "teacher": score_split(RolloutEngine(teacher, teacher, tokenizer), examples, budget),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) E1 and write its report (``--report-only``: rebuild the page from its raw JSON)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--artifacts", type=Path, default=REPO / "artifacts" / "arithmetic", help="teacher + report.json"
    )
    p.add_argument(
        "--student",
        type=Path,
        default=REPO / "artifacts" / "arithmetic_weak" / "student",
        help="start student",
    )
    p.add_argument("--out", type=Path, default=REPO / "runs" / "e1")
    p.add_argument("--results", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--name", default="e1_on_vs_off_policy", help="base name of the report files")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(methods()))
    p.add_argument("--length", type=int, default=3, help="operations per problem of the fresh splits")
    p.add_argument("--split-seed", type=int, default=1013)
    p.add_argument("--num-distill", type=int, default=8000)
    p.add_argument("--num-val", type=int, default=256)
    p.add_argument("--num-eval", type=int, default=1000)
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3], help="validation sweep")
    p.add_argument("--sweep-seed", type=int, default=100)
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=50, help="validation curve every N steps")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument(
        "--cached-only",
        action="store_true",
        help="train nothing: report the grid runs already in <out>/runs.jsonl; the page lists the planned runs left out",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild <results>/<name>.md (and plots) from the committed <name>.json, with its settings; no training",
    )
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.report_only:
        args, cached = cached_report(args, args.name)
        body = report_body(args, summarize(cached, args))
        return write_report(args.name, args, title=TITLE, body=body, data=cached, start=start, cached=cached)
    report_path = args.artifacts / "report.json"
    student_report = args.student.parent / "report.json"
    for path in (report_path, student_report):
        if not path.is_file():
            raise SystemExit(
                f"{path} not found: build the teacher and the student first (see this script's docstring)"
            )
    report = json.loads(report_path.read_text())
    if report["task"] != "arithmetic":
        raise SystemExit(f"{args.artifacts} holds a {report['task']} teacher; E1 needs an arithmetic one")
    splits = make_splits(split_spec(args, report))
    args.out.mkdir(parents=True, exist_ok=True)
    start_path = args.out / "start.json"
    if start_path.is_file():
        scores = json.loads(start_path.read_text())
    else:
        t0 = time.perf_counter()
        scores = start_scores(args, report, splits["eval"])
        scores["seconds"] = time.perf_counter() - t0
        start_path.write_text(json.dumps(scores) + "\n")
    print("exposure bias:", exposure_finding(scores["exposure_bias"]), flush=True)
    sweep = sweep_jobs(args, report)
    trained = runs_to_train(sweep, args.out)
    sweep_runs = run_jobs(sweep, args.out, workers=args.workers, runner=partial(run_job, build=build_e1))
    chosen = choose_lrs(sweep_runs)
    print(f"chosen learning rates on validation: {chosen}", flush=True)
    grid = grid_jobs(args, report, chosen)
    not_run = []
    if args.cached_only:
        done = {r["key"] for r in read_runs(args.out / "runs.jsonl")}
        not_run = [j.key for j in grid if j.key not in done]
        grid = [j for j in grid if j.key in done]
    trained += runs_to_train(grid, args.out)
    grid_runs = run_jobs(
        grid, args.out, workers=args.workers, runner=partial(run_job, extra_eval=eval_after, build=build_e1)
    )
    raw = {
        "teacher_report": report,
        "student_report": json.loads(student_report.read_text()),
        "splits": split_facts(splits),
        "chosen_lr": chosen,
        "exposure_bias": scores["exposure_bias"],
        "start": scores["start"],
        "teacher": scores["teacher"],
        "start_seconds": scores.get("seconds", 0.0),
        "runs": sweep_runs + grid_runs,
        "not_run": not_run,
    }
    body = report_body(args, summarize(raw, args))
    return write_report(args.name, args, title=TITLE, body=body, data=raw, start=start, trained=trained)


if __name__ == "__main__":
    main()
