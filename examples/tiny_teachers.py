"""Train small from-scratch character-level teachers (and SFT-started students) on the built-in tasks.

The paper's teachers are fine-tuned T5-XL models and its students start from SFT checkpoints. At CPU
scale we train both from scratch on the built-in tasks: a teacher to high accuracy, and a smaller
student with a brief SFT start, so that on-policy samples are meaningful (paper Sec. 3.1, Remark).

The experiments' models (docs/results/experiments.md):

    python examples/tiny_teachers.py --task arithmetic --compact --steps 1,2,3 --num-train 8000 \\
        --teacher-steps 2500 --student-steps 1600 --out artifacts/arithmetic
    python examples/tiny_teachers.py --task factual_summary --hallucination-rate 0.3 --num-train 20000 \\
        --batch-size 32 --teacher-steps 1500 --student-steps 2000 --student-size 128,2,4 \\
        --max-new-tokens 96 --out artifacts/factual

Both students learn their task in a sudden transition (arithmetic: between about 1200 and 1600 SFT
steps, from under 10% to 70% accuracy; the 64-wide factual student had not learnt to copy the facts
after 1000 steps, hence the wider one, trained 2000 steps): too short an SFT start leaves a student
whose samples the teacher cannot usefully correct.

Writes ``OUT/teacher`` and ``OUT/student`` (``save_pretrained`` folders with the tokenizer) and
``OUT/report.json`` (accuracy or factuality of both on the held-out split, the commands, timings).
Reuses an existing ``OUT`` unless ``--force`` (both models) or ``--retrain student`` (one of them).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from rl_distill.models import char_tokenizer, tiny_llama
from rl_distill.rewards import ExactMatchVerifier, FactualConsistencyReward
from rl_distill.rollout import RolloutEngine, SamplingConfig
from rl_distill.tasks import Example, TaskData, load_task

#: Model sizes (hidden, layers, heads) used by the experiments.
SIZES = {"teacher": (128, 4, 4), "student": (64, 2, 2)}


def task_data(task: str, seed: int, num_train: int, num_eval: int, **options: Any) -> TaskData:
    """The task split used for teacher training (and, with the same arguments, by the experiments).

    For ``arithmetic``, ``steps`` may be a list of lengths: the split is then the concatenation of
    one split per length (seeded ``seed + steps``, ``num_train`` and ``num_eval`` examples each), so
    one teacher covers several problem lengths and every length keeps a disjoint held-out set.
    """
    steps = options.get("steps")
    if task == "arithmetic" and isinstance(steps, (list, tuple)):
        parts = [task_data(task, seed, num_train, num_eval, **{**options, "steps": int(n)}) for n in steps]
        return TaskData(
            name=task,
            train=[ex for d in parts for ex in d.train],
            eval=[ex for d in parts for ex in d.eval],
        )
    if task == "arithmetic" and steps is not None:
        seed = seed + int(steps)  # distinct problems per length; the same split for the same length
    return load_task(task, seed=seed, num_train=num_train, num_eval=num_eval, **options)


def parse_size(text: str) -> tuple[int, int, int]:
    """``"128,2,4"`` -> ``(hidden, layers, heads)``.

    Raises:
        argparse.ArgumentTypeError: not three positive integers, or hidden not divisible by heads.
    """
    try:
        hidden, layers, heads = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected hidden,layers,heads (three integers), got {text!r}"
        ) from None
    if min(hidden, layers, heads) < 1 or hidden % heads:
        raise argparse.ArgumentTypeError(f"need positive sizes with hidden divisible by heads, got {text!r}")
    return hidden, layers, heads


def steps_of(example: Example) -> int:
    """Number of operations of an arithmetic example (from its ``equation`` metadata)."""
    equation = example.metadata["equation"]
    return sum(equation[1:].count(op) for op in "+-")


def build_model(size: str | tuple[int, int, int], vocab: int, seed: int) -> torch.nn.Module:
    """A fresh tiny Llama of a named size (:data:`SIZES`) or of ``(hidden, layers, heads)``."""
    hidden, layers, heads = SIZES[size] if isinstance(size, str) else size
    return tiny_llama(vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, seed=seed).train()


def sft(
    model: torch.nn.Module,
    tokenizer,
    examples: list[Example],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    log_every: int = 100,
) -> list[float]:
    """Supervised fine-tuning on references: cross-entropy on completion tokens (EOS included).

    Sequences are built and scored by the rollout engine (``from_completions`` + the student
    forward at completion positions), the same path the GKD agent's supervised cases use.
    Cosine learning-rate decay with a short warm-up.
    """
    engine = RolloutEngine(model, model, tokenizer)  # no teacher here: the engine only builds sequences
    model.requires_grad_(True)  # the engine froze its "teacher", which is this same model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)

    def schedule(s: int) -> float:
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    rng = random.Random(seed)
    losses = []
    model.train()
    for step in range(steps):
        batch = rng.sample(examples, min(batch_size, len(examples)))
        r = engine.from_completions([e.prompt for e in batch], [e.reference for e in batch])
        logits = engine.score_student(r).float()  # (B, T, V)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), r.completion_ids, reduction="none")
        loss = (nll * r.completion_mask).sum() / r.completion_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(
                f"  sft step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True
            )
    model.eval()
    return losses


@torch.no_grad()
def task_metrics(
    model, tokenizer, task: str, examples: list[Example], max_new_tokens: int
) -> dict[str, float]:
    """Greedy held-out metrics: exact-match accuracy (arithmetic) or factuality (factual_summary)."""
    engine = RolloutEngine(model, model, tokenizer)
    completions = []
    for lo in range(0, len(examples), 64):
        chunk = examples[lo : lo + 64]
        r = engine.generate([e.prompt for e in chunk], SamplingConfig(max_new_tokens, temperature=0.0))
        completions += engine.decode(r)
    prompts = [e.prompt for e in examples]
    if task == "arithmetic":
        scores = ExactMatchVerifier()(prompts, completions, answer=[e.metadata["answer"] for e in examples])
        out = {"accuracy": sum(scores) / len(scores)}
        lengths = sorted({steps_of(e) for e in examples})
        if len(lengths) > 1:
            for n in lengths:
                picked = [s for s, e in zip(scores, examples) if steps_of(e) == n]
                out[f"accuracy_steps{n}"] = sum(picked) / len(picked)
        return out
    checker = FactualConsistencyReward()
    facts = [e.metadata["facts"] for e in examples]
    scores = checker(prompts, completions, facts=facts)
    checks = [checker.check(c, f) for c, f in zip(completions, facts)]
    hallucinated = sum(1 for c in checks if c.hallucinated) / len(checks)
    return {"factuality": sum(scores) / len(scores), "hallucination_rate": hallucinated}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train (or reuse) a teacher and an SFT-started student; return the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["arithmetic", "factual_summary"], default="arithmetic")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--digits", type=int, default=2)
    p.add_argument(
        "--steps",
        default="1,2,3",
        help="arithmetic: operations per problem, or a comma list of lengths to mix (default 1,2,3)",
    )
    p.add_argument("--compact", action="store_true", help="arithmetic: '12+7-5=?' prompts instead of stories")
    p.add_argument("--hallucination-rate", type=float, default=0.0, help="factual_summary: noisy references")
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--num-eval", type=int, default=256)
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--student-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    for role in ("teacher", "student"):
        p.add_argument(
            f"--{role}-size",
            type=parse_size,
            default=None,
            help=f"{role} size as hidden,layers,heads (default {','.join(map(str, SIZES[role]))})",
        )
    p.add_argument("--force", action="store_true", help="retrain both models")
    p.add_argument(
        "--retrain",
        nargs="+",
        choices=["teacher", "student"],
        default=None,
        help="retrain only these models of an existing OUT (same task options), keep the others",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report_path = args.out / "report.json"
    old_report = json.loads(report_path.read_text()) if report_path.is_file() else None
    if old_report is not None and not args.force and not args.retrain:
        print(f"reusing {args.out} (pass --force or --retrain ROLE to retrain)")
        return old_report
    if args.retrain and old_report is None:
        raise SystemExit(f"--retrain needs an existing {report_path}; run without it first")

    options: dict[str, Any] = (
        {
            "digits": args.digits,
            "steps": [int(n) for n in str(args.steps).split(",")],
            "compact": args.compact,
        }
        if args.task == "arithmetic"
        else {"hallucination_rate": args.hallucination_rate}
    )
    data = task_data(args.task, args.seed, args.num_train, args.num_eval, **options)
    tokenizer = char_tokenizer()
    report: dict[str, Any] = {
        "task": args.task,
        "options": options,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    for role, steps in (("teacher", args.teacher_steps), ("student", args.student_steps)):
        if args.retrain and role not in args.retrain:
            report[role] = old_report[role]  # kept as it is
            continue
        start = time.perf_counter()
        size = getattr(args, f"{role}_size") or role
        model = build_model(size, len(tokenizer), seed=args.seed + (0 if role == "teacher" else 1))
        print(
            f"{role}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {steps} SFT steps"
        )
        losses = sft(model, tokenizer, data.train, steps=steps, batch_size=args.batch_size, seed=args.seed)
        args.out.mkdir(parents=True, exist_ok=True)
        metrics = task_metrics(model, tokenizer, args.task, data.eval, args.max_new_tokens)
        seconds = time.perf_counter() - start
        print(f"{role}: {metrics} ({seconds:.0f}s)")
        model.save_pretrained(args.out / role)
        tokenizer.save_pretrained(args.out / role)
        report[role] = {"metrics": metrics, "final_loss": losses[-1], "seconds": seconds, "steps": steps}
    args.out.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
