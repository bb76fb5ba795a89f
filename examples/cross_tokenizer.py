"""Cross-tokenizer distillation: ULD (on- and off-policy) vs SeqKD on a teacher/student pair with different tokenizers.

The teacher is the cached character-level arithmetic teacher of ``examples/tiny_teachers.py``
(``artifacts/arithmetic/teacher``, not retrained). The student gets a tokenizer of its own
(:func:`digit_pair_tokenizer`): another character map (the characters in reverse order, so every id
differs) plus one token per pair of digits, so ``"19"`` is one student token and two teacher tokens and
the two tokenizations have different lengths. The student (64 wide, 2 layers, like the same-tokenizer
student) is SFT-warmed here on the teacher's training split (``artifacts/xtok/student``, built once and
reused), then distilled for ``--train-steps`` steps by:

- ``sft_ref``: control, no teacher: more SFT on the dataset references (what the student was warmed on);
- ``seqkd``: cross-entropy on teacher samples re-tokenised by the student (text only; any tokenizer pair);
- ``uld_off``: Boizard et al. 2024's setting: teacher samples, cross-entropy + ULD on span-aligned positions;
- ``uld_on``: ULD on the student's own samples (lambda = 1), no cross-entropy;
- ``uld_mix``: half on-policy ULD, half teacher samples with cross-entropy + ULD (lambda = 0.5);
- ``span_pg``: on-policy, no ULD: the span-reward policy gradient (REINFORCE on ``log pT(span) - log pS``,
  the sequence-level reverse KL; this toolkit's identity-aware extension, ``agent.pg_weight``);
- ``uld_pg``: on-policy ULD plus the span-reward policy gradient.

Measured on held-out 2-operation problems before and after: greedy exact-match accuracy (the trainer's
``eval/greedy/exact_match``) and, on the student's own samples at temperature 1
(:func:`rl_distill.cross_tokenizer.evaluate_cross`), the ULD distance per aligned group, the
sequence-level ``log pS(y) - log pT(text)`` (a sample of the sequence-level reverse KL; exact on the
teacher's side, as the character teacher has one tokenization per text), and the teacher's NLL per
character.

    python examples/cross_tokenizer.py                 # the published run (docs/results/cross_tokenizer.md)
    python examples/cross_tokenizer.py --report-only   # rebuild the page from its raw JSON
    python examples/cross_tokenizer.py --quick         # smoke test (tests/test_cross_tokenizer_example.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _experiment import (  # noqa: E402
    REPO,
    Job,
    cached_report,
    fmt,
    group_stats,
    pyplot,
    relative,
    run_job,
    run_jobs,
    runs_to_train,
    write_report,
)

#: method -> ``agent`` overrides (``name: uld``, ``model.cross_tokenizer: uld``).
METHODS: dict[str, dict[str, Any]] = {
    "sft_ref": {"lmbda": 0.0, "off_policy": "reference", "uld_weight": 0.0, "ce_weight": 1.0},
    "seqkd": {"lmbda": 0.0, "off_policy": "teacher", "uld_weight": 0.0, "ce_weight": 1.0},
    "uld_off": {"lmbda": 0.0, "off_policy": "teacher", "uld_weight": 1.0, "ce_weight": 1.0},
    "uld_on": {"lmbda": 1.0, "uld_weight": 1.0},
    "uld_mix": {"lmbda": 0.5, "off_policy": "teacher", "uld_weight": 1.0, "ce_weight": 1.0},
    "span_pg": {"lmbda": 1.0, "uld_weight": 0.0, "pg_weight": 1.0},
    "uld_pg": {"lmbda": 1.0, "uld_weight": 1.0, "pg_weight": 1.0},
}
NAME = "cross_tokenizer"
TITLE = "Cross-tokenizer distillation: ULD vs SeqKD (char teacher, digit-pair student)"
#: Held-out prompts of the cross-tokenizer divergences, their sampling seed.
EVAL_SEED = 1234


def digit_pair_tokenizer() -> Any:
    """The student's tokenizer: the characters of the char teacher in reverse order, plus ``"00"``..``"99"``.

    Ids 0-3 are ``<pad> <bos> <eos> <unk>`` as in :func:`rl_distill.models.char_tokenizer`; every
    character then has another id than the teacher's, and two consecutive digits are one token
    (``"123"`` -> ``"12"``, ``"3"``), so the tokenizations differ in ids and in length.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rl_distill.models.tiny import BOS, DEFAULT_CHARS, EOS, PAD, UNK

    alphabet = list(dict.fromkeys(DEFAULT_CHARS))[::-1]
    pairs = [f"{a}{b}" for a in range(10) for b in range(10)]
    vocab = {t: i for i, t in enumerate([PAD, BOS, EOS, UNK, *alphabet, *pairs])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d\d|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
    fast.name_or_path = "digit-pair-tokenizer"
    return fast


def teacher_split(report: dict[str, Any], num_eval: int | None = None) -> dict[str, Any]:
    """The teacher's split (``tiny_teachers`` report), all lengths; ``num_eval`` replaces its held-out size."""
    ta = report["args"]
    return {
        "task": "arithmetic",
        "seed": int(ta["seed"]),
        "num_train": int(ta["num_train"]),
        "num_eval": int(ta["num_eval"]) if num_eval is None else num_eval,
        "digits": int(ta["digits"]),
        "steps": [int(n) for n in ta["steps"].split(",")],
        "compact": ta["compact"] == "True",
    }


def build_student(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, Any]:
    """SFT-warm the digit-pair student on the teacher's split (or reuse ``args.student_dir``); its report."""
    import torch
    from _experiment import task_from_spec
    from tiny_teachers import build_model, sft, task_metrics

    out = Path(args.student_dir)
    report_path = out / "report.json"
    if report_path.is_file():
        return json.loads(report_path.read_text())
    torch.set_num_threads(args.threads)
    tokenizer = digit_pair_tokenizer()
    data = task_from_spec(teacher_split(report, args.num_eval))
    model = build_model(tuple(args.student_size), len(tokenizer), seed=1)
    start = time.perf_counter()
    losses = sft(model, tokenizer, data.train, steps=args.student_steps, batch_size=64, seed=0, log_every=200)
    metrics = task_metrics(model, tokenizer, "arithmetic", data.eval, 48)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    student = {
        "metrics": metrics,
        "final_loss": losses[-1],
        "steps": args.student_steps,
        "size": list(args.student_size),
        "seconds": time.perf_counter() - start,
        "vocab": len(tokenizer),
    }
    report_path.write_text(json.dumps(student, indent=2) + "\n")
    print(f"student: {metrics}")
    return student


def main_spec(report: dict[str, Any], length: int, num_eval: int | None = None) -> dict[str, Any]:
    """The split at ``length`` operations (the E1 experiment's main length)."""
    return {**teacher_split(report, num_eval), "steps": length}


def max_new_tokens(length: int, digits: int) -> int:
    """Completion budget in student tokens (as E1's, in characters: an upper bound)."""
    return length * (2 * (digits + 1) + digits + 4) + digits + 8


def build_jobs(args: argparse.Namespace, report: dict[str, Any]) -> list[Job]:
    """One job per method and seed."""
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    budget = max_new_tokens(args.length, int(report["args"]["digits"]))
    jobs = []
    for method in args.methods:
        for seed in args.seeds:
            jobs.append(
                Job(
                    key=f"{method}|seed={seed}",
                    method=method,
                    seed=seed,
                    teacher=str(args.artifacts / "teacher"),
                    student=str(args.student_dir),
                    data=main_spec(report, args.length, args.num_eval),
                    agent={"name": "uld", **METHODS[method], "max_new_tokens": budget},
                    train={
                        "steps": args.train_steps,
                        "batch_size": args.batch_size,
                        "lr": args.lr,
                        "warmup_steps": max(1, args.train_steps // 10),
                        "lr_schedule": "cosine",
                        "eval_batch_size": 128,
                    },
                    eval={"greedy": True, "sampled": False, "max_new_tokens": budget},
                    model={"student": str(args.student_dir), "cross_tokenizer": "uld"},
                    labels={"num_cross_eval": args.num_cross_eval},
                    threads=args.threads,
                )
            )
    return jobs


def build_pair(job: Job) -> tuple[tuple[Any, Any, Any], Any]:
    """``((teacher, student, student tokenizer), task)``: the cross-tokenizer pair of a job."""
    from _experiment import task_from_spec

    from rl_distill.models import load_causal_lm, load_tokenizer

    teacher = load_causal_lm(job.teacher).eval().requires_grad_(False)
    student = load_causal_lm(job.student).train()
    return (teacher, student, load_tokenizer(job.student)), task_from_spec(job.data)


def cross_metrics(engine: Any, cross_teacher: Any, prompts: list[str], max_new: int) -> dict[str, float]:
    """:func:`~rl_distill.cross_tokenizer.evaluate_cross` on held-out prompts, seeded :data:`EVAL_SEED`."""
    import torch

    from rl_distill.cross_tokenizer import evaluate_cross
    from rl_distill.rollout import SamplingConfig

    generator = torch.Generator().manual_seed(EVAL_SEED)
    return evaluate_cross(
        engine, cross_teacher, prompts, SamplingConfig(max_new, temperature=1.0), generator=generator
    )


def after_metrics(trainer: Any, job: Job) -> dict[str, Any]:
    """The trained student's cross-tokenizer divergences (the run's ``extra``)."""
    run = trainer.run
    prompts = [ex.prompt for ex in run.task.eval[: job.labels["num_cross_eval"]]]
    return cross_metrics(run.engine, run.cross_teacher, prompts, job.agent["max_new_tokens"])


def run_one(job: Job, out_root: str) -> dict[str, Any]:
    """One run with the trainer (pre-built pair), plus its cross-tokenizer divergences after training."""
    return run_job(job, out_root, after_metrics, build=build_pair)


def start_metrics(args: argparse.Namespace, jobs: list[Job]) -> dict[str, float]:
    """The starting student's cross-tokenizer divergences (same prompts and sampling seed as after)."""
    import torch

    from rl_distill.cross_tokenizer import CrossTokenizerTeacher
    from rl_distill.models import load_tokenizer
    from rl_distill.rollout import RolloutEngine

    torch.set_num_threads(args.threads)
    job = jobs[0]
    (teacher, student, tokenizer), task = build_pair(job)
    engine = RolloutEngine(student, None, tokenizer)
    cross = CrossTokenizerTeacher(teacher, load_tokenizer(job.teacher), tokenizer)
    prompts = [ex.prompt for ex in task.eval[: args.num_cross_eval]]
    return cross_metrics(engine, cross, prompts, job.agent["max_new_tokens"])


# --- the page --------------------------------------------------------------------------------------
#: (key in a run's ``extra`` / the start metrics, column title, lower is better)
DIVERGENCES = [
    ("uld", "ULD per aligned group", True),
    ("reverse_kl_seq", "log pS(y) - log pT(text) per sequence", True),
    ("teacher_nll_char", "teacher NLL per char", True),
]


def accuracy(run: dict[str, Any]) -> float:
    """Greedy held-out exact-match accuracy after training."""
    return run["after"]["eval/greedy/exact_match"]


def teacher_nll_seq(m: dict[str, float]) -> float:
    """Mean ``-log pT(text)`` per sequence: ``teacher_nll_char * completion_chars`` (both over the same rows)."""
    return m["teacher_nll_char"] * m["completion_chars"]


def own_logprob_seq(m: dict[str, float]) -> float:
    """Mean ``log pS(y)`` per sequence of the student's own samples: ``reverse_kl_seq - teacher NLL per sequence``.

    Exact from :func:`~rl_distill.cross_tokenizer.evaluate_cross`'s means: ``reverse_kl_seq`` is the mean of
    ``log pS(y) - log pT(text)``. Higher is a student surer of its own samples.
    """
    return m["reverse_kl_seq"] - teacher_nll_seq(m)


def paired_deltas(runs: list[dict[str, Any]], metric: Any, base: str) -> dict[str, tuple[float, float, int]]:
    """Per method, ``metric(method) - metric(base)`` paired by seed: ``(mean, std, n)``."""
    from rl_distill.compare import mean_std

    by = {(r["method"], r["seed"]): metric(r) for r in runs}
    out = {}
    for method in sorted({r["method"] for r in runs} - {base}):
        diffs = [by[(method, s)] - by[(base, s)] for (m, s) in by if m == method and (base, s) in by]
        if diffs:
            out[method] = (*mean_std(diffs), len(diffs))
    return out


def report_body(args: argparse.Namespace, data: dict[str, Any]) -> str:
    """Markdown of the results (every number from ``data``)."""
    runs, start, teacher, student = data["runs"], data["start"], data["teacher"], data["student"]
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    acc = group_stats(runs, ["method"], accuracy)
    divs = {k: group_stats(runs, ["method"], lambda r, k=k: r["extra"][k]) for k, _, _ in DIVERGENCES}
    before_acc = runs[0]["before"]["eval/greedy/exact_match"]
    load = data.get("load_average")
    lines = [
        f"Load average (1, 5, 15 min) when the runs ended: {', '.join(f'{x:.1f}' for x in load)} "
        "(a shared machine: timings are not comparable across pages)."
        if load
        else "",
        "",
        f"Teacher: the char-level arithmetic teacher `{relative(args.artifacts)}/teacher` (vocabulary "
        f"{data['teacher_vocab']}, greedy accuracy {teacher['metrics']['accuracy']:.3f} on all lengths). "
        f"Student: a {student['size'][0]}-wide, {student['size'][1]}-layer Llama with the digit-pair tokenizer "
        f"(vocabulary {student['vocab']}: the characters in another order plus `00`-`99`), SFT-warmed "
        f"{student['steps']} steps on the teacher's split (`{relative(args.student_dir)}`; greedy accuracy "
        f"{student['metrics']['accuracy']:.3f} on all lengths). On held-out student samples a completion has "
        f"{start['completion_chars']:.1f} characters; {100 * start['aligned_fraction']:.0f}% of student tokens "
        f"fall in an aligned group (span alignment; the tokenizations differ in ids and in length).",
        "",
        f"Each run: {args.train_steps} steps, batch {args.batch_size}, AdamW lr {args.lr} (warm-up over 10% of "
        f"the steps, then cosine), student temperature 1, {args.length}-operation problems "
        f"({runs[0]['job']['data']['num_train']} train prompts; accuracy on the "
        f"{runs[0]['job']['data']['num_eval']} held-out ones, greedy). Divergences on the student's own samples "
        f"(temperature 1) for the first {args.num_cross_eval} held-out prompts, sampling seed {EVAL_SEED} "
        "(`rl_distill.cross_tokenizer.evaluate_cross`).",
        "",
        "## Results",
        "",
        "Mean ± sample std over seeds; lower is better for every divergence.",
        "",
        "| method | greedy accuracy | " + " | ".join(t for _, t, _ in DIVERGENCES) + " | n |",
        "|---|---|" + "---|" * len(DIVERGENCES) + "---|",
        f"| student before | {before_acc:.3f} | "
        + " | ".join(f"{start[k]:.3f}" for k, _, _ in DIVERGENCES)
        + " | 1 |",
    ]
    for method in methods:
        m, s, n = acc[(method,)]
        cells = " | ".join(fmt(*divs[k][(method,)][:2]) for k, _, _ in DIVERGENCES)
        lines.append(f"| {method} | {fmt(m, s)} | {cells} | {n} |")
    lines += ["", "## Paired by seed against SeqKD (method minus seqkd)", ""]
    if "seqkd" in methods:
        lines += [
            "| method | Δ accuracy | " + " | ".join(f"Δ {t}" for _, t, _ in DIVERGENCES) + " | seeds |",
            "|---|---|" + "---|" * len(DIVERGENCES) + "---|",
        ]
        d_acc = paired_deltas(runs, accuracy, "seqkd")
        d_div = {k: paired_deltas(runs, lambda r, k=k: r["extra"][k], "seqkd") for k, _, _ in DIVERGENCES}
        for method in [m for m in methods if m != "seqkd"]:
            if method not in d_acc:
                continue
            m, s, n = d_acc[method]
            cells = " | ".join(
                f"{d_div[k][method][0]:+.3f} ± {d_div[k][method][1]:.3f}" for k, _, _ in DIVERGENCES
            )
            lines.append(f"| {method} | {m:+.3f} ± {s:.3f} | {cells} | {n} |")
    own = group_stats(runs, ["method"], lambda r: own_logprob_seq(r["extra"]))
    nll = group_stats(runs, ["method"], lambda r: teacher_nll_seq(r["extra"]))
    lines += [
        "",
        "## Whose samples: the student's confidence against the teacher's",
        "",
        "Per held-out student sample (same samples as above): the student's own log-prob `log pS(y)` (higher: "
        "surer of its own samples) and the teacher's NLL of their text `-log pT(text)`; derived exactly from the "
        "means above (`reverse_kl_seq` minus the teacher's NLL per sequence).",
        "",
        "| method | log pS(y) per sequence | -log pT(text) per sequence |",
        "|---|---|---|",
        f"| student before | {own_logprob_seq(start):.3f} | {teacher_nll_seq(start):.3f} |",
    ]
    for method in methods:
        lines.append(f"| {method} | {fmt(*own[(method,)][:2])} | {fmt(*nll[(method,)][:2])} |")
    lines += ["", "## Findings (computed from the runs)", ""]
    lines += findings(runs, start, before_acc, methods, acc, divs)
    if "sft_ref" in methods:
        control = paired_deltas(runs, accuracy, "sft_ref")
        parts = [f"`{m}` {d:+.3f} ± {sd:.3f}" for m, (d, sd, _) in control.items()]
        lines.append(
            "- Against the no-teacher control `sft_ref` (more SFT on the references; accuracy difference paired by "
            "seed): " + "; ".join(parts) + "."
        )
    sharper = [
        m
        for m in methods
        if own[(m,)][0] - own[(m,)][1] > own_logprob_seq(start)
        and nll[(m,)][0] - nll[(m,)][1] > teacher_nll_seq(start)
    ]
    if sharper:
        lines.append(
            "- The student grows surer of its own samples (higher `log pS(y)`) while the teacher finds their text "
            "less likely (higher `-log pT(text)`), both beyond the spread, with: "
            + ", ".join(f"`{m}` ({own_logprob_seq(start):.2f} -> {own[(m,)][0]:.2f} nats)" for m in sharper)
            + ": the mode-sharpening that an identity-free loss allows."
        )
    lines += [
        "",
        "## Limits",
        "",
        "- ULD compares *sorted* probabilities: it transfers the shape (confidence) of the teacher's "
        "distributions, not which token is right. On the student's own samples (`uld_on`) it is the only signal, "
        "so it can shrink the ULD distance by making the student surer of its own choices, right or wrong.",
        "- Positions are paired only where the two tokenizations reach the same character boundary; the teacher's "
        "two-digit groups are merged as first-digit distribution × probability of the actual second digit (an "
        "approximation, exact only at the actual first digit). Where the student's sampled pair is one the teacher "
        "finds unlikely, the teacher's merged vector has little mass, and ULD then pulls the student's whole "
        "distribution down at that position: a flattening signal unrelated to the right digit.",
        "- `span_pg`/`uld_pg` use this toolkit's span-reward policy gradient (`agent.pg_weight`; REINFORCE on the "
        "sequence-level reverse KL with the teacher's log-prob of each aligned span), not part of ULD: a "
        "sample-based estimate, noisier than a full-distribution divergence.",
        "- One small pair (a character teacher, a digit-pair student), one task, "
        f"{len(data['seeds'])} seeds, {args.train_steps} steps: a mechanism check, not a benchmark.",
        "",
        f"![{NAME}.png]({NAME}.png)",
    ]
    return "\n".join(lines)


def direction(mean: float, std: float, start: float) -> str:
    """``falls`` / ``rises`` when the mean moved from ``start`` by more than its std over seeds and by at least
    0.001 (what the page's three decimals can show), else ``flat``."""
    if abs(mean - start) <= max(std, 0.001):
        return "flat"
    return "falls" if mean < start else "rises"


def findings(
    runs: list[dict[str, Any]],
    start: dict[str, float],
    before_acc: float,
    methods: list[str],
    acc: dict[Any, Any],
    divs: dict[str, Any],
) -> list[str]:
    """Bullet points: what moved against the start (beyond the std over seeds) and how SeqKD compares."""
    out = []
    moved: dict[str, dict[str, str]] = {}
    for method in methods:
        m, s, n = acc[(method,)]
        moves = []
        moved[method] = {"accuracy": direction(m, s, before_acc)}
        for k, title, _ in DIVERGENCES:
            dm, ds, _ = divs[k][(method,)]
            moved[method][k] = direction(dm, ds, start[k])
            moves.append(f"{title} {start[k]:.3f} -> {dm:.3f} ± {ds:.3f} ({moved[method][k]})")
        per_seed = sorted(accuracy(r) for r in runs if r["method"] == method)
        out.append(
            f"- **{method}**: greedy accuracy {before_acc:.3f} -> {m:.3f} ± {s:.3f} ({moved[method]['accuracy']}; "
            f"seeds: {', '.join(f'{a:.3f}' for a in per_seed)}); " + "; ".join(moves) + "."
        )
    all_fall = [m for m in methods if all(moved[m][k] == "falls" for k, _, _ in DIVERGENCES)]
    out.append(
        "- Every divergence falls (beyond its spread) with: "
        + (", ".join(f"`{m}`" for m in all_fall) if all_fall else "no method")
        + "."
    )
    uld_only = [
        m
        for m in methods
        if moved[m]["uld"] == "falls"
        and "rises" in (moved[m]["reverse_kl_seq"], moved[m]["teacher_nll_char"])
    ]
    if uld_only:
        out.append(
            "- The ULD distance falls while a sequence-level divergence rises with: "
            + ", ".join(f"`{m}`" for m in uld_only)
            + " (the identity limit: a smaller sorted-probability distance, further from the teacher's text)."
        )
    up = [m for m in methods if moved[m]["accuracy"] == "rises"]
    down = [m for m in methods if moved[m]["accuracy"] == "falls"]
    out.append(
        "- Greedy accuracy rises beyond its spread with: "
        + (", ".join(f"`{m}`" for m in up) if up else "no method")
        + "; falls with: "
        + (", ".join(f"`{m}`" for m in down) if down else "no method")
        + "."
    )
    return out


def plot(args: argparse.Namespace, data: dict[str, Any]) -> None:
    """Bars: accuracy and the divergences per method (mean ± std), the start as a dashed line."""
    plt = pyplot()
    Path(args.results).mkdir(parents=True, exist_ok=True)
    runs, start = data["runs"], data["start"]
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    panels = [("accuracy", "greedy accuracy", accuracy, runs[0]["before"]["eval/greedy/exact_match"])]
    panels += [(k, t, (lambda r, k=k: r["extra"][k]), start[k]) for k, t, _ in DIVERGENCES]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (_, title, metric, base) in zip(axes, panels):
        stats = group_stats(runs, ["method"], metric)
        means = [stats[(m,)][0] for m in methods]
        stds = [stats[(m,)][1] for m in methods]
        ax.bar(range(len(methods)), means, yerr=stds, capsize=3, color="tab:blue")
        ax.axhline(base, color="k", ls="--", lw=1, label="start")
        ax.set_xticks(range(len(methods)), methods, rotation=20)
        ax.set_title(title, fontsize=9)
        lo = min(min(means) - max(stds + [0]), base)
        hi = max(max(means) + max(stds + [0]), base)
        ax.set_ylim(lo - 0.15 * (hi - lo + 1e-9), hi + 0.15 * (hi - lo + 1e-9))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{TITLE} — mean ± std over {len(data['seeds'])} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(Path(args.results) / f"{NAME}.png", dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", type=Path, default=REPO / "artifacts" / "arithmetic")
    p.add_argument("--student-dir", type=Path, default=REPO / "artifacts" / "xtok" / "student")
    p.add_argument("--student-steps", type=int, default=1600)
    p.add_argument(
        "--student-size", type=int, nargs=3, default=[64, 2, 2], metavar=("HIDDEN", "LAYERS", "HEADS")
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--length", type=int, default=2, help="operations per held-out problem")
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--num-cross-eval", type=int, default=128)
    p.add_argument("--num-eval", type=int, default=None, help="held-out size (default: the teacher's split)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "xtok")
    p.add_argument("--results", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--report-only", action="store_true", help="rebuild the page from its raw JSON")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny budgets, into --out/--results")
    args = p.parse_args(argv)
    if args.quick:
        args.student_steps, args.train_steps, args.num_cross_eval, args.num_eval = 20, 2, 4, 8
        args.seeds, args.methods, args.batch_size = args.seeds[:1], ["seqkd", "uld_on"], 4
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the experiment and write the page; ``--report-only`` rebuilds it from the JSON."""
    start_time = time.perf_counter()
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.report_only:
        args, payload = cached_report(args, NAME)
        plot(args, payload)
        return write_report(
            NAME,
            args,
            title=TITLE,
            body=report_body(args, payload),
            data=payload,
            start=start_time,
            cached=payload,
        )
    report = json.loads((args.artifacts / "report.json").read_text())
    if report.get("task") != "arithmetic":
        raise SystemExit(f"{args.artifacts} holds no arithmetic teacher (examples/tiny_teachers.py)")
    student = build_student(args, report)
    jobs = build_jobs(args, report)
    trained = runs_to_train(jobs, args.out)
    start = start_metrics(args, jobs)
    runs = run_jobs(jobs, args.out, workers=args.workers, runner=run_one)
    from rl_distill.models import load_tokenizer

    data = {
        "runs": runs,
        "start": start,
        "teacher": report["teacher"],
        "student": student,
        "teacher_vocab": len(load_tokenizer(str(args.artifacts / "teacher"))),
        "seeds": list(args.seeds),
        "load_average": list(os.getloadavg()),
    }
    plot(args, data)
    return write_report(
        NAME, args, title=TITLE, body=report_body(args, data), data=data, start=start_time, trained=trained
    )


if __name__ == "__main__":
    main()
