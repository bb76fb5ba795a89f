"""The training-step methods the benchmarks time, each runnable in its own process.

Methods (:data:`METHODS`):

- ``ours``: :class:`rl_distill.agents.GKDAgent`, on-policy (lambda = 1), JSD(beta);
- ``ours_recompute``: ``ours`` with the library's fused divergence gradient switched off (the old
  recomputing backward, :mod:`benchmarks._patches` ``recompute_grad``): lever 1 of issue #18 alone;
- ``ours_linear_head``: ``ours`` with the few-row decode head switched off (the model's own
  ``F.linear`` head when sampling, :mod:`benchmarks._patches` ``linear_head``): the decode lever alone;
- ``ours_linear_layers``: ``ours`` with the decoder layers' few-row products switched off (``F.linear``
  in every decoder layer when sampling, :mod:`benchmarks._patches` ``linear_layers``): that lever alone;
- ``ours_no_prefix_cache``: ``ours`` with the teacher's shared-prompt-prefix cache off
  (:mod:`benchmarks._patches` ``no_prefix_cache``): lever 4 alone;
- ``ours_dense_embedding_grad``: ``ours`` with the model's own (dense-gradient) embedding lookup
  (:mod:`benchmarks._patches` ``dense_embedding_grad``): the memory lever alone;
- ``ours_strided_head``: ``ours`` with the output head reading Hugging Face's strided
  ``logits_to_keep`` slice as it is (:mod:`benchmarks._patches` ``strided_head_input``): the
  head-input lever alone (with ``precision: bf16``, that lever in the bf16 configuration);
- ``ours_unfused``: ``ours`` with the fused one-token decode step off (the student samples through its
  own ``forward``, :mod:`benchmarks._patches` ``unfused_step``): the fused-step lever alone;
- ``ours_lambda0``: the same agent as supervised KD (lambda = 0, forward KL on fixed reference
  sequences of ``max_new_tokens`` tokens, paper Eq. 3);
- ``trl_gkd``: TRL's ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=1``;
- ``trl_gkd_lambda0``: the same with ``lmbda=0`` (the dataset's assistant replies);
- ``trl_distillation``: TRL's ``DistillationTrainer`` (on-policy only; what TRL recommends for lambda = 1).

Precision (:attr:`BenchSpec.precision`): ``bf16`` runs ours as the shipped ``train.precision: bf16`` +
``model.teacher_dtype: bfloat16`` do (bf16 autocast around ``update``, the teacher stored in bfloat16,
float32 student master weights and float32 divergences) and TRL with its ``bf16=True`` flag (autocast;
TRL has no separate teacher dtype). :attr:`BenchSpec.trl_defaults` runs TRL at its documented
defaults instead of the matched settings: ``bf16=True`` and gradient checkpointing on.

Every method builds the same teacher and student (:func:`benchmarks._harness.build_models`), uses
the same prompts in the same order, the same AdamW (built here, see :func:`make_optimizer`),
a constant learning rate and gradient clipping at 1.0, runs ``warmup`` steps, then ``steps``
timed steps. A step is timed from the end of the previous step to the end of this one, so
everything a training loop does per step is inside (batch assembly, tokenisation, generation,
teacher, student forward/backward, optimizer, the trainer's own bookkeeping).

Run one method in a fresh process (what the benchmark CLIs do, so that peak memory is per method)::

    python -m benchmarks._methods --method ours --spec '{"steps": 10}' --out result.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from benchmarks import _harness as H


@dataclass
class BenchSpec:
    """One benchmark setting, shared by every method of a run."""

    model: str = "smollm2-135m-instruct"
    """Teacher (built-in name or path), or ``tiny``."""
    student_layers: int = 6
    """Decoder layers kept in the student."""
    batch_size: int = 4
    """Prompts per step."""
    max_new_tokens: int = 32
    """Completion budget (and the length of the lambda = 0 reference sequences)."""
    steps: int = 10
    """Timed steps."""
    warmup: int = 2
    """Untimed steps before them (at least 1: a step is timed from the end of the previous one)."""
    lr: float = 1e-4
    """AdamW learning rate (constant)."""
    beta: float = 0.5
    """JSD(beta)."""
    temperature: float = 1.0
    """Sampling and loss temperature."""
    seed: int = 0
    """Seed of sampling (and of TRL's trainer)."""
    threads: int = 2
    """``torch.set_num_threads``."""
    device: str = "cpu"
    """Device of both models."""
    dtype: str = "float32"
    """``float32`` or ``bfloat16`` (parameters of both models)."""
    optimizer: str = "adamw"
    """``adamw`` (torch default: for-loop on CPU, what rl_distill's trainer builds), ``adamw_foreach`` or ``adamw_fused``."""
    precision: str = "fp32"
    """``fp32`` or ``bf16``: ours as ``train.precision: bf16`` + ``model.teacher_dtype: bfloat16``; TRL ``bf16=True``."""
    trl_defaults: bool = False
    """TRL methods only: leave ``bf16`` and gradient checkpointing at TRL's defaults (both on)."""

    def __post_init__(self) -> None:
        if self.warmup < 1:
            raise ValueError("warmup must be >= 1 (each step is timed from the end of the previous one)")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.optimizer not in ("adamw", "adamw_foreach", "adamw_fused"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchSpec:
        """Build from a dict, ignoring unknown keys."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def make_optimizer(params: Any, spec: BenchSpec) -> Any:
    """AdamW(lr, weight_decay=0, betas=(0.9, 0.999), eps=1e-8) with the spec's implementation."""
    import torch

    kwargs: dict[str, Any] = {"lr": spec.lr, "weight_decay": 0.0}
    if spec.optimizer == "adamw_foreach":
        kwargs["foreach"] = True
    elif spec.optimizer == "adamw_fused":
        kwargs["fused"] = True
    return torch.optim.AdamW([p for p in params if p.requires_grad], **kwargs)


def _prompts_and_references(spec: BenchSpec, tokenizer: Any) -> tuple[list[str], list[str]]:
    """Prompts for every step, and reference replies of ``max_new_tokens - 1`` tokens (+ EOS = the budget)."""
    n = (spec.warmup + spec.steps) * spec.batch_size
    refs = H.reference_texts(tokenizer, n, max(1, spec.max_new_tokens - 1))
    return H.benchmark_prompts(n, seed=spec.seed), refs


def _result(
    method: str,
    spec: BenchSpec,
    step_seconds: list[float],
    tokens: list[int],
    *,
    setup_seconds: float,
    rss_after_setup: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    total_time = sum(step_seconds)
    return {
        "method": method,
        "spec": asdict(spec),
        "step_seconds": step_seconds,
        "tokens_per_step": tokens,
        "median_step_seconds": H.summarize(step_seconds)["median"],
        "tokens_per_second": sum(tokens) / total_time if total_time > 0 else 0.0,
        "setup_seconds": setup_seconds,
        "rss_after_setup_mib": rss_after_setup / H.MIB,
        "peak_rss_steps_mib": H.peak_rss_bytes() / H.MIB,
        "peak_rss_lifetime_mib": H.lifetime_peak_rss_bytes() / H.MIB,
        **(extra or {}),
    }


# --------------------------------------------------------------------------------------------
# rl_distill
# --------------------------------------------------------------------------------------------
def run_ours(
    spec: BenchSpec, *, lmbda: float = 1.0, patches: tuple[str, ...] = (), name: str | None = None
) -> dict[str, Any]:
    """Time :class:`GKDAgent` steps: on-policy JSD(beta) (``lmbda=1``) or supervised KD (``lmbda=0``).

    Args:
        spec: the setting.
        lmbda: 1 (on-policy GKD) or 0 (supervised KD: forward KL on the reference sequences).
        patches: names of :mod:`benchmarks._patches` prototypes to install in this process.
        name: the method name in the result (default ``ours`` / ``ours_lambda0``).
    """
    from benchmarks._patches import apply_patches

    undo = apply_patches(patches)
    try:
        result = _run_ours(spec, lmbda)
    finally:
        undo()
    if name is not None:
        result["method"] = name
    result["patches"] = list(patches)
    return result


def _run_ours(spec: BenchSpec, lmbda: float) -> dict[str, Any]:
    import torch

    import rl_distill.agents.gkd as gkd
    from rl_distill.agents.gkd import SPECIAL_CASES, GKDAgent, GKDConfig
    from rl_distill.precision import autocast, check_precision
    from rl_distill.rollout import RolloutEngine
    from rl_distill.tasks import Example

    H.set_threads(spec.threads)
    t0 = time.perf_counter()
    teacher, student, tokenizer = H.build_models(
        spec.model, spec.student_layers, device=spec.device, dtype=spec.dtype
    )
    if spec.precision == "bf16":  # as examples/configs/bf16_smollm2.yaml: the teacher alone stored in bf16
        check_precision("bf16", spec.device)
        teacher = teacher.to(torch.bfloat16)
    prompts, refs = _prompts_and_references(spec, tokenizer)
    examples = [Example(prompt=p, reference=r) for p, r in zip(prompts, refs)]
    engine = RolloutEngine(student, teacher, tokenizer)
    common = {"max_new_tokens": spec.max_new_tokens, "temperature": spec.temperature}
    if lmbda == 1.0:
        config = GKDConfig(divergence="jsd", beta=spec.beta, lmbda=1.0, **common)
    elif lmbda == 0.0:
        config = GKDConfig(**SPECIAL_CASES["supervised_kd"], **common)
    else:
        raise ValueError("lmbda must be 0 or 1 here")
    optimizer = make_optimizer(student.parameters(), spec)
    generator = torch.Generator(device=spec.device).manual_seed(spec.seed)
    agent = GKDAgent(engine, optimizer, config, max_grad_norm=1.0, generator=generator)
    setup_seconds = time.perf_counter() - t0

    bs = spec.batch_size
    step_seconds: list[float] = []
    tokens: list[int] = []
    phases: dict[str, list[float]] = {
        "generate": [],
        "teacher": [],
        "student_update": [],
        "student_forward": [],
        "divergence": [],
        "backward_and_step": [],
    }
    # Sub-phases of the student update, timed by wrapping the two calls the agent makes (CPU: no
    # device sync needed; on an accelerator these are launch times, and only the totals count).
    timed = {"student_forward": 0.0, "divergence": 0.0}

    def timing(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timed[name] += time.perf_counter() - start

        return wrapper

    engine.student_forward = timing("student_forward", engine.student_forward)  # type: ignore[method-assign]
    original_divergence = gkd.divergence
    gkd.divergence = timing("divergence", original_divergence)
    rss_after_setup = H.rss_bytes()
    H.reset_peak_rss()
    last = time.perf_counter()
    try:
        for i in range(spec.warmup + spec.steps):
            batch = examples[i * bs : (i + 1) * bs]
            timed.update(student_forward=0.0, divergence=0.0)
            with autocast(spec.precision, spec.device):  # as the Trainer runs update()
                stats = agent.update(batch)
            now = time.perf_counter()
            if i >= spec.warmup:
                step_seconds.append(now - last)
                tokens.append(int(stats["time/tokens"]))
                phases["generate"].append(stats["time/generate"])
                phases["teacher"].append(stats["time/teacher"])
                phases["student_update"].append(stats["time/student_update"])
                phases["student_forward"].append(timed["student_forward"])
                # With the fused gradient the divergence call also writes the student's logit gradient.
                phases["divergence"].append(timed["divergence"])
                phases["backward_and_step"].append(
                    stats["time/student_update"] - timed["student_forward"] - timed["divergence"]
                )
            last = now
    finally:
        gkd.divergence = original_divergence
    return _result(
        "ours" if lmbda == 1.0 else "ours_lambda0",
        spec,
        step_seconds,
        tokens,
        setup_seconds=setup_seconds,
        rss_after_setup=rss_after_setup,
        extra={
            "phase_median_seconds": {k: H.summarize(v)["median"] for k, v in phases.items()},
            "phase_seconds": phases,
        },
    )


# --------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------
def _trl_common_args(spec: BenchSpec, output_dir: str) -> dict[str, Any]:
    """TrainingArguments shared by both TRL trainers (see docs/results/performance.md, "Fairness")."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": spec.batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": spec.warmup + spec.steps,
        "learning_rate": spec.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "temperature": spec.temperature,
        "beta": spec.beta,
        "use_cpu": spec.device == "cpu",
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "disable_dropout": True,
        "seed": spec.seed,
        **_trl_precision_args(spec),
    }


def _trl_precision_args(spec: BenchSpec) -> dict[str, Any]:
    """TRL's precision and checkpointing flags: matched (the spec's precision, no checkpointing) or TRL's defaults."""
    if spec.trl_defaults:
        # TRL's configs default to gradient checkpointing (which also turns the KV cache off during
        # GKD's generation) and to bf16 autocast: leave both as TRL documents them.
        return {}
    return {
        "gradient_checkpointing": False,  # deprecated alias in transformers 5.23, mirrors the next one
        "activation_checkpointing": False,
        "bf16": spec.dtype == "bfloat16" or spec.precision == "bf16",
        "fp16": False,
    }


def _step_timer(warmup: int) -> Any:
    """A ``TrainerCallback`` recording the time between consecutive ``on_step_end`` calls."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.rss_after_setup = 0

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self.rss_after_setup = H.rss_bytes()
            H.reset_peak_rss()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            self.ends.append(time.perf_counter())

        def step_seconds(self) -> list[float]:
            return [b - a for a, b in zip(self.ends[warmup - 1 : -1], self.ends[warmup:])]

    return StepTimer()


def run_trl_gkd(spec: BenchSpec, *, lmbda: float = 1.0) -> dict[str, Any]:
    """Time ``trl.experimental.gkd.GKDTrainer`` steps (``lmbda`` 1 or 0; ``seq_kd`` off)."""
    import datasets
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    H.set_threads(spec.threads)
    t0 = time.perf_counter()
    teacher, student, tokenizer = H.build_models(
        spec.model, spec.student_layers, device=spec.device, dtype=spec.dtype
    )
    prompts, refs = _prompts_and_references(spec, tokenizer)
    dataset = datasets.Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
            for p, r in zip(prompts, refs)
        ]
    )
    tokens: list[int] = []

    class CountingGKD(GKDTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001
            loss = super().training_step(model, inputs, num_items_in_batch)
            # GKDTrainer replaces inputs["labels"] in place by the on-policy ones; -100 = not trained.
            tokens.append(int((inputs["labels"][:, 1:] != -100).sum()))
            return loss

    timer = _step_timer(spec.warmup)
    with tempfile.TemporaryDirectory(prefix="trl_gkd_") as out:
        args = GKDConfig(
            **_trl_common_args(spec, out),
            lmbda=lmbda,
            max_new_tokens=spec.max_new_tokens,
            train_sampling_strategy="sequential",
        )
        trainer = CountingGKD(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            optimizers=(make_optimizer(student.parameters(), spec), None),
            callbacks=[timer],
        )
        setup_seconds = time.perf_counter() - t0
        trainer.train()
        facts = _trl_facts(trainer)
    return _result(
        "trl_gkd" if lmbda == 1.0 else "trl_gkd_lambda0",
        spec,
        timer.step_seconds(),
        tokens[spec.warmup :],
        setup_seconds=setup_seconds,
        rss_after_setup=timer.rss_after_setup,
        extra={"trl_config": {"lmbda": lmbda, "seq_kd": False, **facts}},
    )


def run_trl_distillation(spec: BenchSpec) -> dict[str, Any]:
    """Time ``trl.DistillationTrainer`` steps (on-policy, chunked JSD over hidden states)."""
    import datasets
    from trl import DistillationConfig, DistillationTrainer

    H.set_threads(spec.threads)
    t0 = time.perf_counter()
    teacher, student, tokenizer = H.build_models(
        spec.model, spec.student_layers, device=spec.device, dtype=spec.dtype
    )
    prompts, _ = _prompts_and_references(spec, tokenizer)
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    tokens: list[int] = []

    class CountingDistillation(DistillationTrainer):
        def _generate_and_score_completions(self, inputs):  # noqa: ANN001
            out = super()._generate_and_score_completions(inputs)
            tokens.append(int(out["completion_mask"].sum()))
            return out

    timer = _step_timer(spec.warmup)
    with tempfile.TemporaryDirectory(prefix="trl_distill_") as out:
        args = DistillationConfig(
            **_trl_common_args(spec, out),
            max_completion_length=spec.max_new_tokens,
            shuffle_dataset=False,
            top_k=0,
            top_p=1.0,
        )
        trainer = CountingDistillation(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            optimizers=(make_optimizer(student.parameters(), spec), None),
            callbacks=[timer],
        )
        setup_seconds = time.perf_counter() - t0
        trainer.train()
        facts = _trl_facts(trainer)
    return _result(
        "trl_distillation",
        spec,
        timer.step_seconds(),
        tokens[spec.warmup :],
        setup_seconds=setup_seconds,
        rss_after_setup=timer.rss_after_setup,
        extra={"trl_config": facts},
    )


def _trl_facts(trainer: Any) -> dict[str, Any]:
    """What the TRL trainer actually ran with (checked, not assumed)."""
    model = trainer.model
    opt = trainer.optimizer
    opt = getattr(opt, "optimizer", opt)  # accelerate wraps it
    gen = getattr(trainer, "generation_config", None)
    return {
        "activation_checkpointing": bool(getattr(trainer.args, "activation_checkpointing", False)),
        "gradient_checkpointing": bool(getattr(trainer.args, "gradient_checkpointing", False)),
        "model_checkpointing_enabled": bool(getattr(model, "is_gradient_checkpointing", False)),
        "generation_use_cache": getattr(gen, "use_cache", None),
        "bf16": bool(trainer.args.bf16),
        "optimizer": type(opt).__name__,
        "optimizer_defaults": {
            k: v for k, v in opt.defaults.items() if k in ("lr", "weight_decay", "foreach", "fused")
        },
        "lr_scheduler": trainer.args.lr_scheduler_type.value
        if hasattr(trainer.args.lr_scheduler_type, "value")
        else str(trainer.args.lr_scheduler_type),
        "report_to": list(trainer.args.report_to or []),
    }


#: name -> runner(spec) -> result dict
METHODS: dict[str, Callable[[BenchSpec], dict[str, Any]]] = {
    "ours": lambda spec: run_ours(spec, lmbda=1.0),
    "ours_lambda0": lambda spec: run_ours(spec, lmbda=0.0),
    "ours_recompute": lambda spec: run_ours(
        spec, lmbda=1.0, patches=("recompute_grad",), name="ours_recompute"
    ),
    "ours_linear_head": lambda spec: run_ours(
        spec, lmbda=1.0, patches=("linear_head",), name="ours_linear_head"
    ),
    "ours_linear_layers": lambda spec: run_ours(
        spec, lmbda=1.0, patches=("linear_layers",), name="ours_linear_layers"
    ),
    "ours_no_prefix_cache": lambda spec: run_ours(
        spec, lmbda=1.0, patches=("no_prefix_cache",), name="ours_no_prefix_cache"
    ),
    "ours_dense_embedding_grad": lambda spec: run_ours(
        spec, lmbda=1.0, patches=("dense_embedding_grad",), name="ours_dense_embedding_grad"
    ),
    "ours_strided_head": lambda spec: run_ours(
        spec, lmbda=1.0, patches=("strided_head_input",), name="ours_strided_head"
    ),
    "ours_unfused": lambda spec: run_ours(spec, lmbda=1.0, patches=("unfused_step",), name="ours_unfused"),
    "trl_gkd": lambda spec: run_trl_gkd(spec, lmbda=1.0),
    "trl_gkd_lambda0": lambda spec: run_trl_gkd(spec, lmbda=0.0),
    "trl_distillation": run_trl_distillation,
}

#: Methods that need ``trl`` installed.
TRL_METHODS = ("trl_gkd", "trl_gkd_lambda0", "trl_distillation")


def run_method(method: str, spec: BenchSpec) -> dict[str, Any]:
    """Run one method in this process and return its result (with machine facts)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    result = METHODS[method](spec)
    result["machine"] = H.machine_info(spec.threads)
    return result


def run_alternating(
    methods: list[str],
    spec: BenchSpec,
    repeats: int,
    *,
    timeout: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, list[dict[str, Any]]]:
    """Run each method ``repeats`` times, each run in a fresh process, alternating the methods.

    The order is ``m1, m2, ..., m1, m2, ...``, so slow drifts of the machine hit all methods alike.

    Returns:
        method -> list of per-process results.
    """
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for r in range(repeats):
        for m in methods:
            load_before, hogs_before = H.load_average(), H.cpu_hogs()
            res = H.run_module_json(
                "benchmarks._methods",
                ["--method", m, "--spec", json.dumps(asdict(spec))],
                timeout=timeout,
            )
            res["load_average_before"], res["other_busy_processes_before"] = load_before, hogs_before
            runs[m].append(res)
            if hogs_before:
                log(f"  note: other busy processes before this run: {hogs_before}")
            log(
                f"[repeat {r + 1}/{repeats}] {m}: {res['median_step_seconds']:.3f} s/step, "
                f"{res['tokens_per_second']:.1f} tok/s, peak RSS {res['peak_rss_steps_mib']:.0f} MiB, "
                f"load {res['machine']['load_average']}"
            )
    return runs


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool one method's runs: median s/step over all timed steps, tokens/s over the total time, RSS medians."""
    steps = [s for r in runs for s in r["step_seconds"]]
    tokens = [t for r in runs for t in r["tokens_per_step"]]
    total = sum(steps)
    out = {
        "median_step_seconds": H.summarize(steps)["median"],
        "step_seconds": H.summarize(steps),
        "per_run_median_step_seconds": [r["median_step_seconds"] for r in runs],
        "tokens_per_second": sum(tokens) / total if total else 0.0,
        "per_run_tokens_per_second": [r["tokens_per_second"] for r in runs],
        "mean_tokens_per_step": sum(tokens) / len(tokens) if tokens else 0.0,
        "peak_rss_steps_mib": H.summarize([r["peak_rss_steps_mib"] for r in runs])["median"],
        "peak_rss_lifetime_mib": H.summarize([r["peak_rss_lifetime_mib"] for r in runs])["median"],
        "rss_after_setup_mib": H.summarize([r["rss_after_setup_mib"] for r in runs])["median"],
        "load_average_before": [r.get("load_average_before") for r in runs],
        "load_average_after": [r["machine"]["load_average"] for r in runs],
        "other_busy_processes_before": [r.get("other_busy_processes_before", []) for r in runs],
        "tokens_per_second_at_median_step": (sum(tokens) / len(tokens)) / H.summarize(steps)["median"]
        if tokens
        else 0.0,
        "runs": len(runs),
    }
    out["peak_extra_over_setup_mib"] = out["peak_rss_steps_mib"] - out["rss_after_setup_mib"]
    phases = [r["phase_median_seconds"] for r in runs if "phase_median_seconds" in r]
    if phases:
        out["phase_median_seconds"] = {k: H.summarize([p[k] for p in phases])["median"] for k in phases[0]}
    return out


def main(argv: list[str] | None = None) -> None:
    """Worker entry point: run one method and write its result as JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    parser.add_argument("--spec", default="{}", help="JSON object of BenchSpec fields")
    parser.add_argument("--out", default=None, help="write the result JSON here")
    args = parser.parse_args(argv)
    spec = BenchSpec.from_dict(json.loads(args.spec))
    result = run_method(args.method, spec)
    H.write_json(args.out, result)
    if args.out is None:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
