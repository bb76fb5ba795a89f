"""Overhead of the token-generation environment against the rollout engine's floor.

Both paths make the same number of student-sampled completions on the same prompts:

- floor: ``engine.rollout(prompts, SamplingConfig(N))`` = student sampling with its KV cache, then one
  causal teacher forward over prompt + completion (the least work that yields ``log pT`` per token);
- env: the student sampled with its own KV cache (``engine.incremental_scorer(student)``, the engine's
  incremental machinery), each sampled token fed to ``VectorTokenGenerationEnv.step``, which advances
  the teacher incrementally with its own KV cache and builds rewards, observations and infos.

An env round is the steady state of one episode per row: the student's prefill of the current prompts,
``N`` sampled tokens and ``N`` env steps; the last step truncates every row and (same-step autoreset)
runs the teacher prefill of the next episodes, drawn from the same ``B`` prompts. So each round pays one
teacher prefill per episode, as the floor pays one teacher forward. Rows that stop early restart
inside the round (student and teacher prefill of that row) and keep producing tokens; the floor keeps
computing padding for them. Throughput counts real tokens only.

    python benchmarks/env_overhead.py                       # tiny models, seconds
    python benchmarks/env_overhead.py --teacher smollm2-135m-instruct --student-layers 6 --out r.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import time
from typing import Any

import gymnasium
import numpy as np
import stable_baselines3
import torch
import transformers

from rl_distill.envs import VectorTokenGenerationEnv
from rl_distill.models import (
    char_tokenizer,
    load_causal_lm,
    load_tokenizer,
    make_kept_layer_student,
    tiny_llama,
)
from rl_distill.rollout import RolloutEngine, SamplingConfig
from rl_distill.rollout.engine import sample_categorical
from rl_distill.rollout.fused_step import FusedSteps
from rl_distill.rollout.native import unavailable_reason
from rl_distill.tasks import load_task


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="tiny", help="'tiny' (char-level, random) or a model name/path")
    parser.add_argument(
        "--student-layers", type=int, default=None, help="kept teacher layers (default 6; tiny: 2)"
    )
    parser.add_argument("--tiny-hidden", type=int, default=64, help="hidden size of the tiny teacher")
    parser.add_argument("--tiny-layers", type=int, default=4, help="layers of the tiny teacher")
    parser.add_argument("--task", default="instructions", help="prompt source (a built-in task)")
    parser.add_argument(
        "--teacher-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="dtype the teacher is stored in (both paths; the student stays float32), as model.teacher_dtype",
    )
    parser.add_argument(
        "--teacher-step",
        choices=["fused", "products", "onednn", "forward"],
        default="fused",
        help="the environment teacher's per-token step: 'fused' (shipped: the fused step; in float32 with the "
        "native kernel, every decoder layer in one native call), 'products' (the fused step with only its "
        "products native, PyTorch operations around them), 'onednn' (the fused step with oneDNN's packed "
        "products), 'forward' (the model's own forward with per-module packed weights, before the fused step)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of each path")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of each path (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--profile", action="store_true", help="cProfile one more env round, print the top")
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[Any, Any, Any, list[str]]:
    """Teacher, kept-layer student, tokenizer and the ``B`` prompts."""
    if args.teacher == "tiny":
        tokenizer = char_tokenizer()
        teacher = tiny_llama(
            len(tokenizer) + 4, hidden_size=args.tiny_hidden, num_layers=args.tiny_layers, seed=1
        )
        layers = args.student_layers or 2
    else:
        tokenizer = load_tokenizer(args.teacher)
        teacher = load_causal_lm(args.teacher)
        layers = args.student_layers or 6
    student = make_kept_layer_student(teacher, num_layers=layers).eval()  # from the float32 teacher
    teacher = teacher.to(getattr(torch, args.teacher_dtype))
    prompts = [ex.prompt for ex in load_task(args.task, seed=args.seed).train[: args.batch_size]]
    return teacher, student, tokenizer, prompts


def floor_round(
    engine: RolloutEngine, prompts: list[str], sampling: SamplingConfig, gen: torch.Generator
) -> dict[str, float]:
    start = time.perf_counter()
    rollout = engine.rollout(prompts, sampling, generator=gen)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens": float(rollout.lengths.sum()),
        "student": rollout.timings["generate"],
        "teacher": rollout.timings["score"],
    }


@torch.inference_mode()
def env_round(
    env: VectorTokenGenerationEnv,
    engine: RolloutEngine,
    prompts: list[str],
    max_new_tokens: int,
    gen: torch.Generator,
) -> dict[str, float]:
    obs, _ = env.reset(
        options={"prompts": prompts}
    )  # untimed: the previous round's autoreset in steady state
    scorer = engine.incremental_scorer(engine.student)
    student_s = env_s = 0.0
    start = time.perf_counter()
    state = scorer.start(env.layout.prompt_batch(obs))
    student_s += time.perf_counter() - start
    for step in range(max_new_tokens):
        t0 = time.perf_counter()
        # The engine's own sampler (inverse CDF), as the floor's generate: torch.multinomial would draw
        # B x V exponentials per token (about 10 ms at B = 8 on this CPU) and charge them to the env path.
        actions = sample_categorical(state.next_logprobs.exp(), gen)  # (B,), T = 1
        t1 = time.perf_counter()
        obs, _, terminated, truncated, _ = env.step(actions.numpy())
        t2 = time.perf_counter()
        env_s += t2 - t1
        if step < max_new_tokens - 1:  # after the last token nothing reads the student's next logits
            done = terminated | truncated
            scorer.advance(state, actions, torch.as_tensor(~done))
            if done.any():  # early stop: the env restarted these rows, so does the student
                rows = np.flatnonzero(done)
                scorer.restart(
                    state, rows.tolist(), env.layout.prompt_batch({k: v[rows] for k, v in obs.items()})
                )
        student_s += t1 - t0 + time.perf_counter() - t2
    seconds = time.perf_counter() - start
    if engine.fused_steps is not None:
        # The student is updated after each rollout in training: its packed copies go, as the floor's
        # generate drops them after each call, so that both paths pack it once per round.
        engine.fused_steps.release(engine.student)
    return {
        "seconds": seconds,
        "tokens": float(len(prompts) * max_new_tokens),
        "student": student_s,
        "env_step": env_s,
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, student, tokenizer, prompts = build(args)
    engine = RolloutEngine(student, teacher, tokenizer)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0)
    env = VectorTokenGenerationEnv(
        (teacher, tokenizer), prompts, num_envs=len(prompts), max_new_tokens=args.max_new_tokens
    )
    # The teacher-step variant under test (the environment's own scorer; the floor's engine is unchanged).
    env.core.scorer.fused_steps = {
        "fused": FusedSteps(),
        "products": FusedSteps(native_layers=False),
        "onednn": FusedSteps(native=False),
        "forward": None,
    }[args.teacher_step]
    env.reset(seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    fused = env.core.scorer._fused()

    load_before = os.getloadavg()
    floor, stepped = [], []
    for i in range(args.warmup + args.repeats):
        # Interleaved, so that both paths see the same machine noise.
        f = floor_round(engine, prompts, sampling, gen)
        e = env_round(env, engine, prompts, args.max_new_tokens, gen)
        if i >= args.warmup:
            floor.append(f)
            stepped.append(e)
    f, e = median_of(floor), median_of(stepped)
    f_tps, e_tps = f["tokens"] / f["seconds"], e["tokens"] / e["seconds"]
    result = {
        "command": " ".join(
            ["python", "benchmarks/env_overhead.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_before_after": [load_before, os.getloadavg()],
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gymnasium": gymnasium.__version__,
            "stable_baselines3": stable_baselines3.__version__,
        },
        "setup": {
            "teacher": args.teacher,
            "teacher_layers": teacher.config.num_hidden_layers,
            "teacher_dtype": args.teacher_dtype,
            "student_layers": student.config.num_hidden_layers,
            "batch_size": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "prompt_tokens": [len(engine.encoder.token_ids(p)) for p in prompts],
            "task": args.task,
            "teacher_step": args.teacher_step,
            "fused_step_used": fused is not None,
            "native_kernel_used": fused is not None
            and fused.kernel is not None
            and args.teacher_dtype == "float32",
            "native_layers_used": fused is not None and fused._native_layers is not None,
            "native_kernel_unavailable": unavailable_reason(),
            "warmup": args.warmup,
            "repeats": args.repeats,
        },
        "floor": {**f, "tokens_per_s": f_tps, "rounds": floor},
        "env": {**e, "tokens_per_s": e_tps, "rounds": stepped},
        "time_ratio_env_over_floor": (e["seconds"] / e["tokens"]) / (f["seconds"] / f["tokens"]),
    }
    print(f"{'path':<34}{'median s':>10}{'tokens':>8}{'tokens/s':>10}")
    print(f"{'floor: engine.rollout':<34}{f['seconds']:>10.3f}{f['tokens']:>8.0f}{f_tps:>10.1f}")
    print(f"{'env: student + env.step':<34}{e['seconds']:>10.3f}{e['tokens']:>8.0f}{e_tps:>10.1f}")
    print(
        f"floor split: student generate {f['student']:.3f} s, teacher score {f['teacher']:.3f} s | "
        f"env split: student {e['student']:.3f} s, env.step {e['env_step']:.3f} s"
    )
    print(f"time per token, env / floor: {result['time_ratio_env_over_floor']:.2f}x")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(env_round, env, engine, prompts, args.max_new_tokens, gen)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
