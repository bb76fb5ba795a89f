"""Peak memory and seconds per step: LoRA vs full fine-tuning, bf16 autocast vs float32.

One on-policy GKD step (JSD(0.5), lambda = 1) from SmolLM2-135M-Instruct into a kept-layer student
(default 15 of its 30 layers), built and stepped exactly as ``rl-distill train`` does
(:class:`rl_distill.trainer.Trainer`, ``train_step``), in four variants:

- ``full``: every student weight trains (float32);
- ``lora``: ``model.lora`` adapters (``--lora-r``, all linear layers but the head) train, the base is frozen;
- ``full_bf16`` / ``lora_bf16``: the same under ``train.precision: bf16`` (autocast, float32 master weights).

Each variant runs in a fresh process: ``--warmup`` steps, then the peak resident set is reset
(``/proc/self/clear_refs``) and ``--steps`` steps are timed. Reported per variant: seconds per step
(median), generated tokens per second, the peak extra RSS over the timed steps (above the RSS after
warm-up), the RSS after warm-up (models + optimizer state), trainable parameters and the optimizer
state's bytes; on CUDA also ``torch.cuda.max_memory_allocated``. Sampled lengths differ between
variants after the first step (different updates), so compare tokens per second as well.

Run it on a quiet machine (the load average is recorded)::

    python benchmarks/lora_memory.py --out benchmarks/results/lora_memory.json
    python benchmarks/lora_memory.py --model tiny --steps 2 --warmup 1   # smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _harness as H  # noqa: E402

VARIANTS = ("full", "lora", "full_bf16", "lora_bf16")


def variant_config(args: argparse.Namespace, variant: str, output_dir: str) -> dict[str, Any]:
    """The run configuration of one variant (a plain config dict, as a YAML file would give)."""
    model: dict[str, Any] = {
        "teacher": args.model,
        "student_layers": args.student_layers,
        "device": args.device,
    }
    if variant.startswith("lora"):
        model["lora"] = {"r": args.lora_r, "alpha": 2 * args.lora_r, "target_modules": "all-linear"}
    return {
        "model": model,
        "data": {"task": "instructions", "num_train": 64, "num_eval": 1},
        "agent": {
            "name": "gkd",
            "divergence": "jsd",
            "beta": 0.5,
            "lmbda": 1.0,
            "max_new_tokens": args.max_new_tokens,
        },
        "train": {
            "steps": 10_000,
            "batch_size": args.batch_size,
            "lr": 1e-5,
            "precision": "bf16" if variant.endswith("bf16") else "fp32",
            "threads": args.threads,
            "output_dir": output_dir,
            "tensorboard": False,
        },
    }


def run_variant(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """Build the run of ``variant`` and time its steps (this process only)."""
    import torch

    from rl_distill.config import config_from_dict
    from rl_distill.trainer import Trainer

    H.set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="lora_memory_") as tmp:
        config = config_from_dict(variant_config(args, variant, tmp))
        models = None
        if args.model == H.TINY:  # the tiny teacher has no checkpoint folder: hand the models in
            models = H.build_models(H.TINY, args.student_layers, device=args.device)
        trainer = Trainer(config, models=models)
        cuda = trainer.device.type == "cuda"
        for _ in range(args.warmup):
            trainer.train_step()
        base_rss = H.rss_bytes()
        H.reset_peak_rss()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds, tokens = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            stats = trainer.train_step()
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t0)
            tokens.append(stats.get("time/tokens", 0.0))
        peak = H.peak_rss_bytes()
        student = trainer.student
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        optim_bytes = sum(
            t.numel() * t.element_size()
            for state in trainer.optimizer.state.values()
            for t in state.values()
            if torch.is_tensor(t)
        )
        result = {
            "variant": variant,
            "s_per_step": H.summarize(seconds),
            "tokens_per_s": sum(tokens) / max(sum(seconds), 1e-9),
            "peak_extra_rss_mib": (peak - base_rss) / H.MIB,
            "rss_after_warmup_mib": base_rss / H.MIB,
            "trainable_params": trainable,
            "total_params": sum(p.numel() for p in student.parameters()),
            "optimizer_state_mib": optim_bytes / H.MIB,
        }
        if cuda:
            result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / H.MIB
        return result


def format_report(result: dict[str, Any]) -> str:
    """A table of the variants."""
    lines = [
        f"{result['model']} -> {result['student_layers']}-layer student, batch {result['batch_size']}, "
        f"{result['max_new_tokens']} new tokens, {result['steps']} timed steps, load {result['machine']['load_average']}",
        f"{'variant':10s} {'s/step':>8s} {'tok/s':>8s} {'peak+MiB':>9s} {'rss MiB':>8s} {'trainable':>11s} {'optim MiB':>9s}",
    ]
    for r in result["variants"]:
        lines.append(
            f"{r['variant']:10s} {r['s_per_step']['median']:8.3f} {r['tokens_per_s']:8.1f} "
            f"{r['peak_extra_rss_mib']:9.1f} {r['rss_after_warmup_mib']:8.1f} {r['trainable_params']:11,d} "
            f"{r['optimizer_state_mib']:9.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point: every variant in a fresh process (``--variant`` runs one, in this process)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="teacher (built-in name, path, or 'tiny')"
    )
    parser.add_argument("--student-layers", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}"
    )
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    if args.variant is not None:
        result = run_variant(args, args.variant)
        H.write_json(args.out, result)
        return result
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    shared = [
        "--model", args.model, "--student-layers", str(args.student_layers), "--batch-size", str(args.batch_size),
        "--max-new-tokens", str(args.max_new_tokens), "--lora-r", str(args.lora_r), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", args.device,
    ]  # fmt: skip
    result = {
        "benchmark": "lora_memory",
        "model": args.model,
        "student_layers": args.student_layers,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "lora_r": args.lora_r,
        "steps": args.steps,
        "warmup": args.warmup,
        "machine": H.machine_info(args.threads),
        "variants": [H.run_module_json("benchmarks.lora_memory", [*shared, "--variant", v]) for v in names],
    }
    by = {r["variant"]: r for r in result["variants"]}
    ratios = {}
    for a, b in (("lora", "full"), ("full_bf16", "full"), ("lora_bf16", "lora")):
        if a in by and b in by:
            ratios[f"{a}/{b}"] = {
                "s_per_step": by[a]["s_per_step"]["median"] / by[b]["s_per_step"]["median"],
                "peak_extra_rss": by[a]["peak_extra_rss_mib"] / max(by[b]["peak_extra_rss_mib"], 1e-9),
                "rss_after_warmup": by[a]["rss_after_warmup_mib"] / by[b]["rss_after_warmup_mib"],
            }
    result["ratios"] = ratios
    result["machine"]["load_average_after"] = H.load_average()
    print(format_report(result))
    for k, v in ratios.items():
        print(f"{k}: " + ", ".join(f"{m} x{x:.2f}" for m, x in v.items()))
    H.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
