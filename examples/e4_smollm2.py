"""E4: the real teacher: SmolLM2-135M-Instruct distilled with a verifier reward (paper Eq. 5).

The offline default teacher, SmolLM2-135M-Instruct (30 decoder layers), is distilled into a
kept-layer student (``--student-layers`` of its layers, evenly spaced, embeddings and head copied;
:func:`rl_distill.models.make_kept_layer_student`) on a task the teacher mostly solves: few-shot,
single-operation arithmetic with a fixed answer format (task ``few_shot_arithmetic``; by default
``"964 + 1 = 965"`` lines, four solved examples, then ``"508 + 1 ="``, no chat template; graded by
``exact_match`` on the number the completion opens with, :data:`ANSWER_PATTERN`). The experiment:

1. **Teacher.** Its greedy accuracy on a validation split (``--num-val`` training prompts held out
   from training, where the task format was chosen) and on the ``--num-eval`` held-out prompts; its
   greedy completions of the training prompts (cut after the first line) are cached.
2. **Warm-up.** A fresh kept-layer student (accuracy measured) is trained with supervised KD on the
   cached teacher completions (``lmbda = 0``, forward KL to the teacher on the teacher's sequences)
   until it is sometimes right; it is saved as the common start of every run.
3. **Comparison.** From the warm student, always on-policy (``lmbda = 1``), ``--k`` samples per
   prompt, the loss of paper Eq. 5::

       loss = alpha * JSD(0.5) on student samples  -  (1 - alpha) * REINFORCE(exact_match reward)

   (leave-one-out baseline within each prompt's k samples), for pure on-policy GKD (``alpha = 1``),
   RL + GKD (``alpha = 0.5``) and pure RL (``alpha = 0``), over several seeds.

Metrics on the held-out prompts: greedy accuracy (95% Wilson interval over prompts), sampled accuracy
(``--eval-samples`` samples per prompt at temperature 1), the change from the warm start paired by
prompt (95% interval), against two chance baselines (always answering the most frequent answer;
answering the first operand unchanged). The token-level JSD, forward and reverse KL to the teacher
(paper Eq. 2) are the trainer's, on the first 32 validation prompts.

    python examples/e4_smollm2.py

Writes ``docs/results/e4_smollm2.{md,json,png}``; ``--report-only`` rebuilds the page from the JSON.
Teacher pass, warm-up and runs are cached under ``runs/e4/`` (``teacher.json``, ``warm/``,
``runs.jsonl``; a run already there with the same settings is not run again).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import sys
import time
from collections import Counter
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

from rl_distill.tasks.few_shot_arithmetic import ANSWER_PATTERN  # noqa: E402

TEACHER = "smollm2-135m-instruct"
NAME = "e4_smollm2"
TASK = "few_shot_arithmetic"
DIVERGENCES = (("eval/jsd", "JSD(0.5)"), ("eval/forward_kl", "forward KL"), ("eval/reverse_kl", "reverse KL"))
#: Validation prompts the trainer's own evaluation (divergences to the teacher) runs on.
DIVERGENCE_PROMPTS = 8
Z95 = 1.959964


#: The teacher's greedy accuracy on candidate formats, measured once before this experiment (a one-off
#: probe with the same task module and verifier, 8 new tokens, on a split of another seed, 1, not the eval
#: split): ``(format, prompts, accuracy)``. The published format is the cheapest with accuracy >= 0.5 and
#: room above it (``a * 10`` is solved outright); its accuracy is then measured on the validation split.
FORMAT_SCREEN = [
    ("hashes, 2-digit + 2-digit, 4 shots", 200, 0.010),
    ("hashes, 2-digit - 2-digit, 4 shots", 200, 0.035),
    ("hashes, 2-digit + 1-digit, 8 shots", 40, 0.000),
    ("hashes, 2-digit + 2-digit, 8 shots, chat template", 40, 0.000),
    ("equation, 2-digit + 2-digit, 8 shots", 40, 0.125),
    ("equation, 2-digit + 1-digit, 8 shots", 40, 0.225),
    ("equation, 2-digit + 1-digit, 16 shots", 40, 0.150),
    ("equation, 2-digit - 1-digit, 8 shots", 40, 0.100),
    ("equation, 2-digit + 10, 8 shots (90 problems only)", 40, 0.525),
    ("equation, 2-digit * 10, 8 shots", 40, 1.000),
    ("equation, 3-digit + 1, 8 shots", 40, 0.700),
    ("equation, 3-digit + 1, 2 shots", 40, 0.625),
    ("equation, 3-digit + 1, 1 shot", 40, 0.225),
    ("equation, 3-digit + 1, 0 shots", 40, 0.025),
]


def reward_spec() -> dict[str, Any]:
    """The verifier: ``exact_match`` on the number the completion opens with."""
    return {"name": "exact_match", "pattern": ANSWER_PATTERN}


# --- statistics --------------------------------------------------------------------------------
def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``successes / n``.

    >>> [round(x, 3) for x in wilson(5, 10)]
    [0.237, 0.763]
    """
    if n <= 0:
        raise ValueError(f"n must be >= 1, got {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_ci(values: list[float], z: float = Z95) -> tuple[float, float]:
    """``(mean, half-width)`` of a normal 95% interval of the mean of ``values`` (paired differences).

    >>> tuple(round(x, 3) for x in mean_ci([1.0, 0.0, 1.0, 0.0]))
    (0.5, 0.566)
    """
    n = len(values)
    if n < 2:
        raise ValueError(f"need at least 2 values, got {n}")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, z * math.sqrt(var / n)


def chance_baselines(examples: list[Any]) -> dict[str, float]:
    """Accuracy of answering without reading the problem or without doing the operation.

    ``most_frequent``: always the eval split's most frequent answer (an upper bound on any constant
    guess); ``first_operand``: the first operand, unchanged.
    """
    answers = [ex.metadata["answer"] for ex in examples]
    top = Counter(answers).most_common(1)[0][1]
    first = sum(
        1 for ex in examples if int(re.match(r"\d+", ex.metadata["equation"])[0]) == ex.metadata["answer"]
    )
    return {"most_frequent": top / len(examples), "first_operand": first / len(examples)}


# --- models, data ------------------------------------------------------------------------------
@functools.cache
def load_teacher() -> tuple[Any, Any]:
    """``(teacher, tokenizer)``: SmolLM2-135M-Instruct, frozen, float32 on CPU (loaded once per process)."""
    from rl_distill.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(TEACHER)
    teacher = load_causal_lm(TEACHER, dtype="float32", device="cpu").eval().requires_grad_(False)
    return teacher, tokenizer


def task_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The ``few_shot_arithmetic`` options and split sizes (fixed by ``--data-seed``; the same for every run)."""
    return {
        "task": TASK,
        "seed": args.data_seed,
        "num_train": args.num_train,
        "num_val": args.num_val,
        "num_eval": args.num_eval,
        "op": args.op,
        "digits": args.digits,
        "fixed_b": args.fixed_b,
        "shots": args.shots,
        "style": args.style,
    }


def load_splits(spec: dict[str, Any]) -> tuple[list[Any], list[Any], list[Any]]:
    """``(train, val, eval)`` examples: validation is cut from the task's training split, never trained on."""
    from rl_distill.tasks import load_task

    spec = dict(spec)
    spec.pop("task")
    num_val = spec.pop("num_val")
    data = load_task(
        TASK,
        seed=spec.pop("seed"),
        num_train=spec.pop("num_train") + num_val,
        num_eval=spec.pop("num_eval"),
        **spec,
    )
    return data.train[num_val:], data.train[:num_val], data.eval


def accuracy(
    model: Any,
    tokenizer: Any,
    examples: list[Any],
    *,
    samples: int,
    temperature: float,
    seed: int,
    max_new_tokens: int,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Verifier accuracy of ``model`` on ``examples``: ``samples`` completions per prompt.

    Returns:
        ``accuracy`` (mean over all completions), ``per_prompt`` (fraction right per prompt, in order),
        ``completions`` (the first completion of each prompt).
    """
    import torch

    from rl_distill.rewards.registry import build_reward, score_examples
    from rl_distill.rollout import RolloutEngine, SamplingConfig

    was_training, grads = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()
    engine = RolloutEngine(
        model, model, tokenizer, chat_template=False
    )  # decoding only (it freezes "teacher")
    verifier = build_reward(reward_spec())
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    generator = torch.Generator().manual_seed(seed)
    per_prompt, first = [], []
    with torch.no_grad():
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo : lo + batch_size]
            batch = [ex for ex in chunk for _ in range(samples)]
            texts = engine.decode(engine.generate([ex.prompt for ex in batch], sampling, generator=generator))
            rewards = score_examples(verifier, batch, texts)
            for i in range(len(chunk)):
                per_prompt.append(sum(rewards[i * samples : (i + 1) * samples]) / samples)
                first.append(texts[i * samples])
    model.train(was_training)
    for p, flag in zip(model.parameters(), grads, strict=True):
        p.requires_grad_(flag)
    return {"accuracy": sum(per_prompt) / len(per_prompt), "per_prompt": per_prompt, "completions": first}


def first_line(text: str) -> str:
    """A completion up to and including its first newline (the answer line of the few-shot format)."""
    head, sep, _ = text.partition("\n")
    return head + sep


# --- 1. the teacher ----------------------------------------------------------------------------
def teacher_pass(args: argparse.Namespace) -> dict[str, Any]:
    """The teacher's greedy accuracy (validation, eval) and completions of the training prompts.

    Cached in ``<out>/teacher.json`` (recomputed when the task or budget changes).
    """
    import torch

    settings = {"teacher": TEACHER, "data": task_spec(args), "max_new_tokens": args.max_new_tokens}
    path = args.out / "teacher.json"
    if path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("settings") == settings:
            return cached
    torch.set_num_threads(args.threads)
    teacher, tokenizer = load_teacher()
    train, val, evals = load_splits(task_spec(args))
    start = time.perf_counter()
    greedy = functools.partial(
        accuracy, teacher, tokenizer, samples=1, temperature=0.0, seed=0, max_new_tokens=args.max_new_tokens
    )
    on_val, on_eval, on_train = greedy(val), greedy(evals), greedy(train)
    result = {
        "settings": settings,
        "val_accuracy": on_val["accuracy"],
        "accuracy": on_eval["accuracy"],
        "n_val": len(val),
        "n": len(evals),
        "train_accuracy": on_train["accuracy"],
        "train_completions": [first_line(c) for c in on_train["completions"]],
        "per_prompt": on_eval["per_prompt"],
        "chance": chance_baselines(evals),
        "seconds": time.perf_counter() - start,
        "samples": [
            {"prompt": ex.prompt, "completion": c, "reward": r, "answer": ex.metadata["answer"]}
            for ex, c, r in list(zip(evals, on_eval["completions"], on_eval["per_prompt"], strict=True))[:4]
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


# --- 2. the warm-up ----------------------------------------------------------------------------
def warm_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What determines the warm student (its cache key)."""
    return {
        "data": task_spec(args),
        "student_layers": args.student_layers,
        "steps": args.warm_steps,
        "batch_size": args.warm_batch_size,
        "lr": args.warm_lr,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.data_seed,
    }


def student_accuracy(
    model: Any, tokenizer: Any, examples: list[Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Greedy and sampled (``args.eval_samples`` per prompt, temperature 1; 0: greedy only) accuracy of a student."""
    common = {"max_new_tokens": args.max_new_tokens, "seed": 1234}
    greedy = accuracy(model, tokenizer, examples, samples=1, temperature=0.0, **common)
    sampled = (
        accuracy(model, tokenizer, examples, samples=args.eval_samples, temperature=1.0, **common)
        if args.eval_samples > 0
        else {"accuracy": None, "per_prompt": None}
    )
    return {
        "greedy": greedy["accuracy"],
        "sampled": sampled["accuracy"],
        "greedy_per_prompt": greedy["per_prompt"],
        "sampled_per_prompt": sampled["per_prompt"],
        "greedy_samples": [
            {"prompt": ex.prompt, "completion": c, "reward": r}
            for ex, c, r in list(zip(examples, greedy["completions"], greedy["per_prompt"], strict=True))[:3]
        ],
    }


def warm_up(args: argparse.Namespace, teacher_data: dict[str, Any]) -> dict[str, Any]:
    """Supervised KD of a fresh kept-layer student on the cached teacher completions; saved to ``<out>/warm``.

    Returns:
        The warm-up record (cached in ``<out>/warm.json``): the fresh and the warm student's accuracy on
        the eval prompts, the warm-up's training curve and time.
    """
    import torch

    from rl_distill.config import config_from_dict
    from rl_distill.logger import read_jsonl
    from rl_distill.models import make_kept_layer_student
    from rl_distill.tasks import Example, TaskData
    from rl_distill.trainer import Trainer

    path, folder = args.out / "warm.json", args.out / "warm"
    settings = warm_settings(args)
    if path.is_file() and (folder / "model" / "config.json").is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("settings") == settings:
            return cached
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.data_seed)
    teacher, tokenizer = load_teacher()
    train, val, evals = load_splits(task_spec(args))
    layers = args.student_layers
    student = make_kept_layer_student(
        teacher,
        num_layers=layers if isinstance(layers, int) else None,
        layers=layers if isinstance(layers, list) else None,
    )
    student.train().requires_grad_(True)
    fresh = student_accuracy(student, tokenizer, evals, args)
    seqkd = [
        Example(prompt=ex.prompt, reference=c, metadata=ex.metadata)
        for ex, c in zip(train, teacher_data["train_completions"], strict=True)
    ]
    task = TaskData(name=TASK, train=seqkd, eval=val[:DIVERGENCE_PROMPTS])
    raw = {
        "model": {"teacher": TEACHER, "device": "cpu", "chat_template": False},
        "data": {"task": TASK, "num_train": len(task.train), "num_eval": len(task.eval)},
        "agent": {
            "name": "gkd",
            "lmbda": 0.0,
            "off_policy": "reference",
            "divergence": "forward_kl",
            "max_new_tokens": args.max_new_tokens,
        },
        "train": {
            "seed": args.data_seed,
            "steps": args.warm_steps,
            "batch_size": args.warm_batch_size,
            "lr": args.warm_lr,
            "warmup_steps": max(1, args.warm_steps // 10),
            "tensorboard": False,
            "save_final": False,
            "threads": args.threads,
            "output_dir": str(folder / "run"),
            "overwrite": True,
        },
        "eval": {"num_samples": 4, "greedy": True, "sampled": True, "reward": reward_spec()},
    }
    start = time.perf_counter()
    trainer = Trainer(config_from_dict(raw), models=(teacher, student, tokenizer), task=task)
    result = trainer.train()
    seconds = time.perf_counter() - start
    student.save_pretrained(folder / "model")
    rows = read_jsonl(folder / "run" / "metrics.jsonl")
    record = {
        "settings": settings,
        "fresh": fresh,
        "warm": student_accuracy(student, tokenizer, evals, args),
        "trainer_after": result.after,
        "curve": [{"step": r["step"], "loss": r["train/loss"]} for r in rows if "train/loss" in r],
        "seconds": seconds,
    }
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


# --- 3. the comparison -------------------------------------------------------------------------
def build_e4(job: Job) -> tuple[tuple[Any, Any, Any], Any]:
    """``((teacher, warm student, tokenizer), task)`` of a comparison job (validation prompts for eval)."""
    from rl_distill.models import load_causal_lm
    from rl_distill.tasks import TaskData

    teacher, tokenizer = load_teacher()
    student = load_causal_lm(job.student, dtype="float32", device="cpu").train().requires_grad_(True)
    train, val, _ = load_splits(job.data)
    return (teacher, student, tokenizer), TaskData(name=TASK, train=train, eval=val[:DIVERGENCE_PROMPTS])


def after_training(trainer: Any, job: Job, *, eval_samples: int) -> dict[str, Any]:
    """The trained student's accuracy on the eval prompts and the run's per-step training trace."""
    from rl_distill.logger import read_jsonl

    _, _, evals = load_splits(job.data)
    for p in trainer.student.parameters():
        p.requires_grad_(False)  # evaluation only; the run is over
    budget = argparse.Namespace(max_new_tokens=job.agent["max_new_tokens"], eval_samples=eval_samples)
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
    return {"train_curve": trace, **student_accuracy(trainer.student, trainer.tokenizer, evals, budget)}


def run_e4_job(job: Job, out_root: str, eval_samples: int = 4) -> dict[str, Any]:
    """The E4 runner for :func:`run_jobs`: :func:`run_job` from the warm student, then :func:`after_training`."""
    return run_job(
        job, out_root, functools.partial(after_training, eval_samples=eval_samples), build=build_e4
    )


def method_name(alpha: float) -> str:
    """Table label of an Eq.-5 weight: on-policy GKD, RL + GKD or pure RL."""
    if alpha == 1.0:
        return "on-policy GKD (alpha=1)"
    if alpha == 0.0:
        return "RL only (alpha=0)"
    return f"RL + GKD (alpha={alpha:g})"


def build_jobs(args: argparse.Namespace) -> list[Job]:
    """One job per (alpha, seed), all from the warm student."""
    return [
        Job(
            key=f"alpha={alpha:g}|seed={seed}",
            method=method_name(alpha),
            seed=seed,
            teacher=TEACHER,
            student=str(args.out / "warm" / "model"),
            data=task_spec(args),
            agent={
                "name": "gkd",
                "divergence": "jsd",
                "beta": 0.5,
                "lmbda": 1.0,
                "alpha": alpha,
                "reward": reward_spec(),
                "baseline": "leave_one_out",
                "samples_per_prompt": args.k,
                "max_new_tokens": args.max_new_tokens,
            },
            train={
                "steps": args.steps,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "warmup_steps": max(1, args.steps // 10),
                "eval_batch_size": DIVERGENCE_PROMPTS,
            },
            eval={"greedy": True, "sampled": True, "reward": reward_spec()},
            labels={"alpha": alpha},
            threads=args.threads,
            model={"chat_template": False},
        )
        for seed in args.seeds  # seed-major: an interrupted experiment has every alpha of the first seeds
        for alpha in args.alphas
    ]


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


# --- report ------------------------------------------------------------------------------------
def acc_cell(p: float, n: int) -> str:
    """``p [lo, hi]`` with the 95% Wilson interval over ``n`` prompts."""
    lo, hi = wilson(p * n, n)
    return f"{p:.3f} [{lo:.3f}, {hi:.3f}]"


def paired_change(run: dict[str, Any], warm: dict[str, Any], key: str) -> tuple[float, float]:
    """``(mean, 95% half-width)`` of the per-prompt change of ``key`` (greedy/sampled) from the warm start."""
    after, before = run["extra"][f"{key}_per_prompt"], warm[f"{key}_per_prompt"]
    return mean_ci([a - b for a, b in zip(after, before, strict=True)])


def train_reward(run: dict[str, Any]) -> float | None:
    """Mean verifier reward of the on-policy training samples over the run (None: the reward was not used)."""
    values = [p["reward"] for p in run["extra"]["train_curve"] if p["reward"] is not None]
    return sum(values) / len(values) if values else None


def tables(
    runs: list[dict[str, Any]], teacher: dict[str, Any], warm: dict[str, Any], alphas: list[float]
) -> str:
    """Markdown: accuracy with intervals and chance, per-seed paired changes, divergences, training reward."""
    n = teacher["n"]
    order = [a for a in alphas if any(r["alpha"] == a for r in runs)]
    chance = teacher["chance"]
    lines = [
        "### Held-out accuracy",
        "",
        f"Verifier accuracy on the {n} held-out prompts. Greedy: one completion per prompt, 95% Wilson "
        f"interval over prompts in brackets. Sampled: {warm.get('eval_samples', '')} completions per prompt "
        "at temperature 1. Trained rows: mean ± std over seeds (the interval is the mean run's).",
        "",
        "| model | greedy accuracy [95% CI] | sampled accuracy | seeds |",
        "|---|---|---|---|",
        f"| chance: always the most frequent answer | {acc_cell(chance['most_frequent'], n)} | | |",
        f"| chance: the first operand unchanged | {acc_cell(chance['first_operand'], n)} | | |",
        f"| teacher (SmolLM2-135M-Instruct, 30 layers) | {acc_cell(teacher['accuracy'], n)} | | |",
        f"| student before warm-up (kept layers) | {acc_cell(warm['fresh']['greedy'], n)} | "
        f"{warm['fresh']['sampled']:.3f} | |",
        f"| student after warm-up (start of every run) | {acc_cell(warm['warm']['greedy'], n)} | "
        f"{warm['warm']['sampled']:.3f} | |",
    ]
    for a in order:
        mine = [r for r in runs if r["alpha"] == a]
        g = group_stats(mine, ["alpha"], lambda r: r["extra"]["greedy"])[(a,)]
        lo, hi = wilson(g[0] * n, n)
        sampled = "-"
        if all(r["extra"]["sampled"] is not None for r in mine):
            sampled = fmt(*group_stats(mine, ["alpha"], lambda r: r["extra"]["sampled"])[(a,)][:2])
        lines.append(
            f"| {method_name(a)} | {g[0]:.3f} ± {g[1]:.3f} [{lo:.3f}, {hi:.3f}] | {sampled} | {g[2]} |"
        )
    lines += [
        "",
        "### Change from the warm start, per run (paired by prompt)",
        "",
        "Per-prompt accuracy after training minus at the warm start, mean and 95% interval over the "
        "held-out prompts; training reward: mean verifier reward of the on-policy training samples.",
        "",
        "| run | greedy change [95% CI] | sampled change [95% CI] | mean training reward |",
        "|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (-r["alpha"], r["seed"])):
        cells = []
        for key in ("greedy", "sampled"):
            if r["extra"][f"{key}_per_prompt"] is None:
                cells.append("-")  # greedy-only evaluation (--run-eval-samples 0)
                continue
            m, h = paired_change(r, warm["warm"], key)
            cells.append(f"{m:+.3f} [{m - h:+.3f}, {m + h:+.3f}]")
        lines.append(
            f"| alpha={r['alpha']:g}, seed {r['seed']} | {cells[0]} | {cells[1]} | "
            + ("- |" if train_reward(r) is None else f"{train_reward(r):.3f} |")
        )
    before = runs[0]["before"]
    lines += [
        "",
        "### Token-level divergence to the teacher on student samples",
        "",
        f"Paper Eq. 2 on the student's own samples (temperature 1) of the first {DIVERGENCE_PROMPTS} "
        "validation prompts, nats per token, mean ± std over seeds.",
        "",
        "| model | " + " | ".join(label for _, label in DIVERGENCES) + " |",
        "|---|---|---|---|",
        "| warm student (start) | " + " | ".join(f"{before[k]:.3f}" for k, _ in DIVERGENCES) + " |",
    ]
    for a in order:
        mine = [r for r in runs if r["alpha"] == a]
        cells = [
            fmt(*group_stats(mine, ["alpha"], lambda r, k=k: r["after"][k])[(a,)][:2]) for k, _ in DIVERGENCES
        ]
        lines.append(f"| {method_name(a)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def moved(runs: list[dict[str, Any]], warm: dict[str, Any], alpha: float, key: str) -> tuple[int, int, int]:
    """How many seeds of ``alpha`` changed ``key`` accuracy significantly up, down (95%), of how many."""
    up = down = 0
    mine = [r for r in runs if r["alpha"] == alpha and r["extra"][f"{key}_per_prompt"] is not None]
    for r in mine:
        m, h = paired_change(r, warm["warm"], key)
        up += m - h > 0
        down += m + h < 0
    return up, down, len(mine)


def findings(
    runs: list[dict[str, Any]], teacher: dict[str, Any], warm: dict[str, Any], alphas: list[float]
) -> str:
    """Plain statements read off the data (no claim the numbers do not support)."""
    n, chance = teacher["n"], teacher["chance"]
    best_chance = max(chance.values())
    fresh, start = warm["fresh"]["greedy"], warm["warm"]["greedy"]
    out = [
        f"- The teacher solves {teacher['accuracy']:.1%} of the {n} held-out prompts greedily "
        f"({teacher['val_accuracy']:.1%} of the {teacher['n_val']} validation prompts; the best chance baseline "
        f"is {best_chance:.1%}).",
        f"- Warm-up (supervised KD on the teacher's completions of the training prompts) takes the "
        f"kept-layer student from {fresh:.1%} to {start:.1%} greedy accuracy "
        f"({'above' if wilson(start * n, n)[0] > best_chance else 'not clearly above'} chance).",
    ]
    for a in [a for a in alphas if any(r["alpha"] == a for r in runs)]:
        g = group_stats([r for r in runs if r["alpha"] == a], ["alpha"], lambda r: r["extra"]["greedy"])[(a,)]
        up, down, total = moved(runs, warm, a, "greedy")
        sup, sdown, stotal = moved(runs, warm, a, "sampled")
        sampled = f", up in {sup} and down in {sdown} of {stotal} (sampled)" if stotal else ""
        out.append(
            f"- {method_name(a)}: greedy accuracy {g[0]:.3f} ± {g[1]:.3f} over {total} seed(s) (warm start "
            f"{start:.3f}); significantly up in {up} and down in {down} of {total} (greedy){sampled}, 95% "
            "paired intervals over prompts."
        )
    rl = [r for r in runs if r["alpha"] < 1.0]
    if rl and all(train_reward(r) == 0.0 for r in rl):
        out.append(
            "- The verifier rewarded none of the on-policy training samples of the alpha < 1 runs: with a "
            "leave-one-out baseline every advantage was 0, so the REINFORCE term of Eq. 5 gave no gradient "
            "(alpha = 0 trains nothing; 0 < alpha < 1 only rescales the GKD loss). A sparse verifier reward "
            "needs a student that is sometimes right."
        )
    if all(
        moved(runs, warm, a, key)[:2] == (0, 0)
        for a in {r["alpha"] for r in runs}
        for key in ("greedy", "sampled")
    ):
        out.append(
            "- No run moved the accuracy beyond its 95% interval: at this budget E4 is a pipeline check "
            "(teacher, kept-layer student, verifier reward, k samples per prompt run end to end), not evidence "
            "for or against RL + GKD."
        )
    return "\n".join(out) + "\n"


def samples_md(
    runs: list[dict[str, Any]], teacher: dict[str, Any], warm: dict[str, Any], alphas: list[float]
) -> str:
    """Markdown: a few greedy completions of the teacher, the warm student and each trained student (first seed)."""

    def clip(text: str) -> str:
        return " ".join(text.replace("\n", " \\n ").split())[:80].replace("|", "\\|")

    def last(prompt: str) -> str:
        return clip(prompt.rsplit("\n", 1)[-1])

    lines = ["| model | query (after the solved examples) | greedy completion | right |", "|---|---|---|---|"]
    for s in teacher["samples"][:2]:
        lines.append(f"| teacher | {last(s['prompt'])} | {clip(s['completion'])} | {s['reward']:g} |")
    for s in warm["warm"]["greedy_samples"][:2]:
        lines.append(f"| warm student | {last(s['prompt'])} | {clip(s['completion'])} | {s['reward']:g} |")
    for a in alphas:
        first = sorted((r for r in runs if r["alpha"] == a), key=lambda r: r["seed"])
        for s in first[0]["extra"]["greedy_samples"][:1] if first else []:
            lines.append(
                f"| {method_name(a)}, seed {first[0]['seed']} | {last(s['prompt'])} | "
                f"{clip(s['completion'])} | {s['reward']:g} |"
            )
    return "\n".join(lines) + "\n"


def plot(
    runs: list[dict[str, Any]], teacher: dict[str, Any], warm: dict[str, Any], alphas: list[float], path: Path
) -> None:
    """Two panels: greedy accuracy per method (per seed, with chance, teacher, start), training reward per step."""
    plt = pyplot()
    order = [a for a in alphas if any(r["alpha"] == a for r in runs)]
    colors = {
        a: plt.get_cmap("viridis")(0.15 + 0.7 * i / max(1, len(order) - 1)) for i, a in enumerate(order)
    }
    n = teacher["n"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    for x, a in enumerate(order):
        for r in (r for r in runs if r["alpha"] == a):
            p = r["extra"]["greedy"]
            lo, hi = wilson(p * n, n)
            ax.errorbar(
                x + 0.08 * (r["seed"] - 0.5),
                p,
                yerr=[[p - lo], [hi - p]],
                fmt="o",
                capsize=3,
                color=colors[a],
            )
    ax.axhline(teacher["accuracy"], color="tab:red", lw=1.5, label="teacher")
    ax.axhline(warm["warm"]["greedy"], color="k", ls="--", lw=1, label="warm student (start)")
    ax.axhline(max(teacher["chance"].values()), color="gray", ls=":", lw=1, label="best chance baseline")
    ax.set_xticks(range(len(order)), [f"alpha={a:g}" for a in order])
    ax.set_ylabel("held-out greedy accuracy (95% CI)")
    ax.set_ylim(0, 1)
    ax.set_title("accuracy after training, per seed")
    ax.legend(fontsize=8)
    ax = axes[1]
    for a in order:
        curves = [r["extra"]["train_curve"] for r in runs if r["alpha"] == a]
        if not curves or curves[0][0]["reward"] is None:
            continue
        steps = [p["step"] for p in curves[0]]
        mean = [sum(c[i]["reward"] for c in curves) / len(curves) for i in range(len(steps))]
        k = max(1, len(steps) // 10)
        smooth = [
            sum(mean[max(0, i - k + 1) : i + 1]) / len(mean[max(0, i - k + 1) : i + 1])
            for i in range(len(mean))
        ]
        ax.plot(steps, smooth, color=colors[a], label=f"alpha={a:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("training verifier reward (sampled)")
    ax.set_title("on-policy reward during training (mean over seeds, smoothed)")
    ax.legend(fontsize=8)
    fig.suptitle("E4: SmolLM2-135M-Instruct -> warm kept-layer student, few-shot arithmetic, Eq. 5")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------------
def parse_layers(text: str) -> int | list[int]:
    """``"10"`` (keep 10 evenly spaced layers) or ``"0,6,12,17,23,29"`` (these indices).

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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags (defaults: the published run)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "e4", help="teacher.json, warm/, runs.jsonl")
    p.add_argument("--results", type=Path, default=REPO / "docs" / "results", help="where the report goes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument(
        "--alphas", type=parse_alpha, nargs="+", default=[1.0, 0.5, 0.0], help="Eq. 5 weights in [0, 1]"
    )
    p.add_argument("--steps", type=int, default=10, help="training steps per run")
    p.add_argument("--batch-size", type=int, default=2, help="prompts per step (each sampled --k times)")
    p.add_argument("--k", type=int, default=4, help="on-policy samples per prompt (reward baseline group)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--student-layers", type=parse_layers, default=12, help="a count (evenly spaced) or indices a,b,c"
    )
    p.add_argument("--warm-steps", type=int, default=30, help="supervised-KD warm-up steps")
    p.add_argument("--warm-batch-size", type=int, default=8)
    p.add_argument("--warm-lr", type=float, default=3e-4)
    p.add_argument(
        "--max-new-tokens", type=int, default=6, help="completion budget (training and evaluation)"
    )
    p.add_argument("--num-train", type=int, default=256)
    p.add_argument("--num-val", type=int, default=100, help="validation prompts cut from the training split")
    p.add_argument("--num-eval", type=int, default=200, help="held-out prompts")
    p.add_argument(
        "--eval-samples",
        type=int,
        default=1,
        help="sampled completions per held-out prompt (fresh, warm student)",
    )
    p.add_argument(
        "--run-eval-samples",
        type=int,
        default=0,
        help="sampled completions per held-out prompt after each run (0: greedy only, the 2-core budget)",
    )
    p.add_argument("--op", choices=["+", "-", "*"], default="+")
    p.add_argument("--digits", type=int, default=3, help="digits of the first operand")
    p.add_argument(
        "--fixed-b", type=int, default=1, help="the second operand (0: a random one of --digits digits)"
    )
    p.add_argument("--shots", type=int, default=2, help="solved examples before each query")
    p.add_argument("--style", choices=["equation", "hashes"], default="equation")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the task and split (fixed across runs)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (runs go one at a time)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help=f"rebuild {NAME}.md (and plot) from the committed {NAME}.json, with its settings; no training",
    )
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "k", "warm_steps", "warm_batch_size", "max_new_tokens", "num_train",
                 "num_val", "num_eval", "eval_samples", "threads"):  # fmt: skip
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.run_eval_samples < 0:
        p.error(f"--run-eval-samples must be >= 0, got {args.run_eval_samples}")
    if args.num_val < 2 or args.num_eval < 2:
        p.error("--num-val and --num-eval must be >= 2 (intervals need two prompts)")
    if args.k < 2 and any(a < 1.0 for a in args.alphas):
        p.error(
            "--k must be >= 2 for alpha < 1: the leave-one-out baseline needs other samples of the prompt"
        )
    if len(set(args.alphas)) != len(args.alphas) or len(set(args.seeds)) != len(args.seeds):
        p.error("--alphas and --seeds must not repeat values")
    if args.fixed_b == 0:
        args.fixed_b = None
    return args


TITLE = "E4: the real teacher (SmolLM2-135M-Instruct, verifier reward, paper Eq. 5)"


def report_body(
    args: argparse.Namespace, teacher: dict[str, Any], warm: dict[str, Any], runs: list[dict[str, Any]]
) -> tuple[str, dict[str, Any]]:
    """``(markdown body, raw data)`` of the page (the plot is written too)."""
    png = Path(args.results) / f"{NAME}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    warm = {**warm, "eval_samples": args.eval_samples}
    screen = teacher.get("format_screen", FORMAT_SCREEN)
    plot(runs, teacher, warm, args.alphas, png)
    operand = f"{args.fixed_b}" if args.fixed_b is not None else f"a random {args.digits}-digit number"
    body = (
        f"Teacher: SmolLM2-135M-Instruct (the offline built-in, 30 layers, no chat template). Task: "
        f"`few_shot_arithmetic`, {args.digits}-digit first operand `{args.op}` {operand}, {args.shots} solved "
        f"examples before each query ({args.style} style), the answer graded by `exact_match` on the number the "
        f"completion opens with; {args.num_train} training, {args.num_val} validation and {args.num_eval} "
        f"held-out prompts (split seed {args.data_seed}), at most {args.max_new_tokens} new tokens. "
        f"Student: the teacher's kept-layer copy with `student_layers={args.student_layers}`, warmed up by "
        f"supervised KD (forward KL on the teacher's greedy completions of the training prompts, lambda = 0) "
        f"for {args.warm_steps} steps of {args.warm_batch_size}, AdamW lr {args.warm_lr:g}. Each run then "
        f"starts from that warm student: {args.steps} steps of {args.batch_size} prompts x k = {args.k} "
        f"on-policy samples (lambda = 1, temperature 1), AdamW lr {args.lr:g}, linear warm-up over "
        f"{max(1, args.steps // 10)} steps, grad-norm clip 1; loss of paper Eq. 5 with JSD(0.5) and the "
        "verifier reward (leave-one-out baseline within each prompt's k samples).\n\n"
        "## Choosing the task format\n\n"
        "The teacher's greedy accuracy on candidate formats (a one-off probe on a split of another seed, "
        "before this experiment; the numbers are recorded in the script as `FORMAT_SCREEN`):\n\n"
        "| format | prompts | teacher accuracy |\n|---|---|---|\n"
        + "".join(f"| {name} | {count} | {acc:.3f} |\n" for name, count, acc in screen)
        + f"\nThe teacher pass (validation, held-out and training prompts) took {teacher['seconds'] / 60:.1f} min "
        f"and the warm-up training {warm['seconds'] / 60:.1f} min, not counted in the header's time.\n"
        + "\n## Results\n\n"
        + tables(runs, teacher, warm, args.alphas)
        + "\n## Findings\n\n"
        + findings(runs, teacher, warm, args.alphas)
        + "\n## Example completions\n\n"
        + samples_md(runs, teacher, warm, args.alphas)
        + f"\n![{png.name}]({png.name})\n"
    )
    slim_teacher = {k: v for k, v in teacher.items() if k != "train_completions"}
    if "format_screen" not in slim_teacher:
        slim_teacher["format_screen"] = [list(row) for row in FORMAT_SCREEN]
    data = {
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "report_only"
        },
        "teacher": slim_teacher,
        "warm": {k: v for k, v in warm.items() if k != "eval_samples"},
        "runs": runs,
    }
    return body, data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) E4 and write its report (``--report-only``: rebuild the page from its raw JSON)."""
    args = parse_args(argv)
    start = time.perf_counter()
    if args.report_only:
        args, cached = cached_report(args, NAME)
        body, data = report_body(args, cached["teacher"], cached["warm"], cached["runs"])
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
    teacher = teacher_pass(args)
    print(
        f"teacher greedy accuracy {teacher['accuracy']:.3f} on {teacher['n']} eval prompts "
        f"({teacher['val_accuracy']:.3f} on {teacher['n_val']} validation) in {teacher['seconds']:.0f}s",
        flush=True,
    )
    warm = warm_up(args, teacher)
    print(
        f"student greedy accuracy {warm['fresh']['greedy']:.3f} -> {warm['warm']['greedy']:.3f} after warm-up "
        f"({warm['seconds']:.0f}s)",
        flush=True,
    )
    trained = runs_to_train(jobs, args.out)
    runner = functools.partial(run_e4_job, eval_samples=args.run_eval_samples)
    runs = run_jobs(jobs, args.out, workers=1, runner=runner)
    body, data = report_body(args, teacher, warm, runs)
    data["seconds"] = {"teacher": teacher["seconds"], "warm_up": warm["seconds"]}
    return write_report(NAME, args, title=TITLE, body=body, data=data, start=start, trained=trained)


if __name__ == "__main__":
    main()
