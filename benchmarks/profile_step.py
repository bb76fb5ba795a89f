"""Where the time of one on-policy GKD step goes, waste checks, and measured cheap wins.

1. **Phases.** After ``--warmup`` ordinary ``GKDAgent.update`` steps, ``--steps`` steps are run
   phase by phase, mirroring ``GKDAgent.update`` at lambda = 1 (generation, teacher scoring,
   student forward with gradient, divergence forward, divergence backward, student backward,
   gradient clipping, optimizer step), each timed (device synchronised at the boundaries) and
   with its peak extra RSS. Generation and teacher scoring are further split into model forward
   time (forward hooks) and everything else (sampling, log-softmax...). The phases are checked
   against the agent's own ``update()`` time over the same number of steps.
2. **Waste checks** during real ``update()`` calls (hooks and counters, no change to the code):
   logits only at completion positions (LM-head output rows), one student forward with gradient
   per step, teacher forwards under ``torch.inference_mode``, KV-cached generation (one prefill,
   then one token per call), no repeated tokenisation of seen prompts, and the host
   synchronisations per step (``bool()/item()/float()/int()/tolist()`` on tensors, by call site).
3. **Experiments** (``--experiments``, benchmark-local monkeypatches or re-implementations):
   AdamW for-loop vs ``foreach=True`` vs ``fused=True`` and ``clip_grad_norm_`` foreach on the real
   student and gradients; the sampling arithmetic per generated token; the divergence's chunk size
   and the library's fused gradient (the closed form written in the forward chunk loop) against the
   recomputing backward it replaced (issue #18); the teacher's token log-probs without a full ``(B, T, V)``
   log-softmax.
4. ``--torch-profiler``: the top operators of one ``update()`` by self CPU time.

Example::

    python benchmarks/profile_step.py --steps 5 --warmup 2 --experiments --out results/profile_step.json
"""

from __future__ import annotations

import argparse
import collections
import copy
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import _harness as H  # noqa: E402
from benchmarks._methods import BenchSpec, make_optimizer  # noqa: E402
from benchmarks._patches import apply_patches  # noqa: E402
from benchmarks.vs_trl import add_spec_arguments, spec_from_args  # noqa: E402


# --------------------------------------------------------------------------------------------
# Set-up and small tools
# --------------------------------------------------------------------------------------------
def build_agent(spec: BenchSpec) -> tuple[Any, list[Any]]:
    """The on-policy GKD agent of the benchmarks and the examples it steps through."""
    from rl_distill.agents.gkd import GKDAgent, GKDConfig
    from rl_distill.rollout import RolloutEngine
    from rl_distill.tasks import Example

    H.set_threads(spec.threads)
    teacher, student, tokenizer = H.build_models(
        spec.model, spec.student_layers, device=spec.device, dtype=spec.dtype
    )
    engine = RolloutEngine(student, teacher, tokenizer)
    config = GKDConfig(
        divergence="jsd",
        beta=spec.beta,
        lmbda=1.0,
        max_new_tokens=spec.max_new_tokens,
        temperature=spec.temperature,
    )
    optimizer = make_optimizer(student.parameters(), spec)
    generator = torch.Generator(device=spec.device).manual_seed(spec.seed)
    agent = GKDAgent(engine, optimizer, config, max_grad_norm=1.0, generator=generator)
    # Enough distinct prompts for every step below (warm-up, phases, checks, update timing).
    n = (3 * spec.warmup + 3 * spec.steps + 4) * spec.batch_size
    examples = [Example(prompt=p) for p in H.benchmark_prompts(n, seed=spec.seed)]
    return agent, examples


def _sync(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Stopwatch:
    """Phase timer: seconds and peak extra RSS (over the RSS at the phase start) per named phase."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = device
        self.seconds: dict[str, list[float]] = collections.defaultdict(list)
        self.peak_extra: dict[str, list[float]] = collections.defaultdict(list)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the body as phase ``name``."""
        _sync(self.device)
        rss0 = H.rss_bytes()
        H.reset_peak_rss()
        start = time.perf_counter()
        yield
        _sync(self.device)
        self.seconds[name].append(time.perf_counter() - start)
        self.peak_extra[name].append((H.peak_rss_bytes() - rss0) / H.MIB)


class ForwardRecorder:
    """Forward hooks on a model: time inside forward, input lengths, grad / inference-mode state."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[dict[str, Any]] = []
        self._start = 0.0
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, with_kwargs=True),
        ]
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.head_rows: list[int] = []
        if head is not None:
            self._handles.append(head.register_forward_hook(self._head))

    def _pre(self, module, args, kwargs):  # noqa: ANN001
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls.append(
            {
                "length": int(ids.shape[1]) if ids is not None else -1,
                "grad": torch.is_grad_enabled(),
                "inference_mode": torch.is_inference_mode_enabled(),
                "cache": kwargs.get("past_key_values") is not None,
            }
        )
        self._start = time.perf_counter()

    def _post(self, module, args, kwargs, output):  # noqa: ANN001
        self.calls[-1]["seconds"] = time.perf_counter() - self._start

    def _head(self, module, args, output):  # noqa: ANN001
        self.head_rows.append(int(output.shape[:-1].numel()))

    def reset(self) -> None:
        """Forget the recorded calls."""
        self.calls.clear()
        self.head_rows.clear()

    def forward_seconds(self) -> float:
        """Total time inside forward since the last reset."""
        return sum(c.get("seconds", 0.0) for c in self.calls)

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()


@contextmanager
def count_host_syncs() -> Iterator[collections.Counter]:
    """Count ``bool/item/float/int/tolist`` on tensors by call site (file:line outside torch)."""
    counter: collections.Counter = collections.Counter()
    names = ("__bool__", "item", "__float__", "__int__", "tolist")
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def wrap(name: str, fn: Callable) -> Callable:
        def counted(self, *a, **k):  # noqa: ANN001
            frame = sys._getframe(1)
            while frame is not None and ("/torch/" in frame.f_code.co_filename):
                frame = frame.f_back
            where = "?" if frame is None else f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
            counter[f"{name} @ {where}"] += 1
            return fn(self, *a, **k)

        return counted

    for n, fn in originals.items():
        setattr(torch.Tensor, n, wrap(n, fn))
    try:
        yield counter
    finally:
        for n, fn in originals.items():
            setattr(torch.Tensor, n, fn)


@contextmanager
def count_tokenizer_calls(tokenizer: Any) -> Iterator[collections.Counter]:
    """Count calls of the tokenizer's ``__call__``, ``encode`` and ``apply_chat_template``."""
    counter: collections.Counter = collections.Counter()
    cls = type(tokenizer)
    names = ("__call__", "encode", "apply_chat_template")
    originals = {n: getattr(cls, n) for n in names}

    def wrap(name: str, fn: Callable) -> Callable:
        def counted(self, *a, **k):  # noqa: ANN001
            counter[name] += 1
            return fn(self, *a, **k)

        return counted

    for n, fn in originals.items():
        setattr(cls, n, wrap(n, fn))
    try:
        yield counter
    finally:
        for n, fn in originals.items():
            setattr(cls, n, fn)


def _batches(examples: list[Any], batch_size: int) -> Iterator[list[Any]]:
    for i in range(0, len(examples) - batch_size + 1, batch_size):
        yield examples[i : i + batch_size]


# --------------------------------------------------------------------------------------------
# 1. Phases
# --------------------------------------------------------------------------------------------
def phase_step(
    agent: Any, batch: list[Any], watch: Stopwatch, student_rec: ForwardRecorder, teacher_rec: ForwardRecorder
) -> None:
    """One on-policy step, phase by phase (what ``GKDAgent.update`` does at lambda = 1, alpha = 1)."""
    from rl_distill.divergences import divergence

    engine, cfg, opt = agent.engine, agent.config, agent.optimizer
    prompts = [ex.prompt for ex in batch]
    student_rec.reset()
    teacher_rec.reset()
    with watch("1 generate (student, KV cache)"):
        rollout = engine.generate(prompts, cfg.sampling, generator=agent.generator)
    watch.seconds["1a generate: model forward"].append(student_rec.forward_seconds())
    watch.seconds["1b generate: sampling + loop"].append(
        watch.seconds["1 generate (student, KV cache)"][-1] - student_rec.forward_seconds()
    )
    with watch("2 teacher score (inference mode)"):
        rollout = engine.score(rollout, teacher_output="full")
    watch.seconds["2a teacher: model forward"].append(teacher_rec.forward_seconds())
    watch.seconds["2b teacher: log-softmax, gather"].append(
        watch.seconds["2 teacher score (inference mode)"][-1] - teacher_rec.forward_seconds()
    )
    agent.student.train()
    with watch("3 student forward (grad)"):
        logits = engine.score_student(rollout)
    with watch("4 divergence forward"):
        per_seq = divergence(
            cfg.divergence,
            rollout.teacher_logits,
            logits,
            rollout.completion_mask,
            beta=cfg.beta,
            temperature=cfg.temperature,
            reduction="sequence",
        )
        loss = per_seq.mean()
    opt.zero_grad(set_to_none=True)
    with watch("5 divergence backward"):
        (grad_logits,) = torch.autograd.grad(loss, logits)
    with watch("6 student backward"):
        logits.backward(grad_logits)
    del grad_logits, logits
    params = [p for p in agent.student.parameters() if p.grad is not None]
    with watch("7 clip_grad_norm_"):
        torch.nn.utils.clip_grad_norm_(params, agent.max_grad_norm)
    with watch("8 optimizer.step"):
        opt.step()
    opt.zero_grad(set_to_none=True)


def profile_phases(agent: Any, batches: list[list[Any]], spec: BenchSpec) -> dict[str, Any]:
    """Median time and peak extra RSS per phase over ``batches``; plus the agent's own step time."""
    watch = Stopwatch(spec.device)
    srec, trec = ForwardRecorder(agent.student), ForwardRecorder(agent.engine.teacher)
    try:
        for batch in batches:
            phase_step(agent, batch, watch, srec, trec)
    finally:
        srec.remove()
        trec.remove()
    phases = {}
    top = [k for k in watch.seconds if k[1] == " "]
    total = sum(H.summarize(watch.seconds[k])["median"] for k in top)
    for name in sorted(watch.seconds):
        med = H.summarize(watch.seconds[name])["median"]
        phases[name] = {
            "median_seconds": med,
            "share_of_step": med / total if name in top else None,
            "peak_extra_rss_mib": H.summarize(watch.peak_extra[name])["median"]
            if name in watch.peak_extra
            else None,
        }
    return {"phases": phases, "sum_of_phase_medians_seconds": total}


def time_updates(agent: Any, batches: list[list[Any]], spec: BenchSpec) -> dict[str, Any]:
    """``agent.update`` step times (the real code path) for comparison with the phase sum."""
    times, tokens = [], []
    for batch in batches:
        _sync(spec.device)
        t0 = time.perf_counter()
        stats = agent.update(batch)
        _sync(spec.device)
        times.append(time.perf_counter() - t0)
        tokens.append(stats["time/tokens"])
    return {"update_seconds": H.summarize(times), "tokens_per_step": H.summarize(tokens)}


# --------------------------------------------------------------------------------------------
# 2. Waste checks
# --------------------------------------------------------------------------------------------
def waste_checks(agent: Any, new_batch: list[Any], seen_batch: list[Any]) -> dict[str, Any]:
    """Hooks and counters around real ``update()`` calls (see the module docstring)."""
    engine = agent.engine
    srec, trec = ForwardRecorder(agent.student), ForwardRecorder(engine.teacher)
    try:
        with count_tokenizer_calls(engine.tokenizer) as tok_new, count_host_syncs() as syncs:
            stats = agent.update(new_batch)
        student_calls, teacher_calls = list(srec.calls), list(trec.calls)
        student_head, teacher_head = list(srec.head_rows), list(trec.head_rows)
        srec.reset()
        trec.reset()
        with count_tokenizer_calls(engine.tokenizer) as tok_seen:
            agent.update(seen_batch)
    finally:
        srec.remove()
        trec.remove()
    bsz = len(new_batch)
    generated = int(stats["time/tokens"])
    gen_calls = [c for c in student_calls if not c["grad"]]
    grad_calls = [c for c in student_calls if c["grad"]]
    completion_len = max(1, len(gen_calls))  # one generate call per sampled position
    checks = {
        "student_forwards_with_grad_per_step": len(grad_calls),
        "teacher_forwards_per_step": len(teacher_calls),
        "teacher_all_under_inference_mode": all(c["inference_mode"] for c in teacher_calls),
        "generation_calls": len(gen_calls),
        "generation_prefill_length": gen_calls[0]["length"] if gen_calls else None,
        "generation_decode_lengths": sorted({c["length"] for c in gen_calls[1:]}),
        "generation_decode_calls_use_cache": all(c["cache"] for c in gen_calls[1:]),
        "student_grad_forward_input_length": grad_calls[0]["length"] if grad_calls else None,
        "student_lm_head_rows_in_grad_forward": student_head[-1] if student_head else None,
        "teacher_lm_head_rows": teacher_head[-1] if teacher_head else None,
        "completion_positions_B_times_T": bsz * completion_len,
        "tokenizer_calls_new_prompts": dict(tok_new),
        "tokenizer_calls_seen_prompts": dict(tok_seen),
        "host_syncs_per_step": sum(syncs.values()),
        "host_syncs_by_site": dict(syncs.most_common()),
        "generated_tokens": generated,
    }
    checks["ok"] = {
        "one_student_grad_forward": checks["student_forwards_with_grad_per_step"] == 1,
        "teacher_inference_mode": checks["teacher_all_under_inference_mode"],
        "kv_cache": checks["generation_decode_lengths"] in ([1], [])
        and checks["generation_decode_calls_use_cache"],
        "no_prompt_logits_student": checks["student_lm_head_rows_in_grad_forward"] == bsz * completion_len,
        "no_prompt_logits_teacher": checks["teacher_lm_head_rows"] == bsz * completion_len,
        "no_retokenisation": sum(tok_seen.values()) == 0,
    }
    return checks


# --------------------------------------------------------------------------------------------
# 3. Experiments
# --------------------------------------------------------------------------------------------
def _time_repeated(fn: Callable[[], Any], repeats: int, device: Any) -> dict[str, float]:
    times, peaks = [], []
    for _ in range(repeats):
        _sync(device)
        rss0 = H.rss_bytes()
        H.reset_peak_rss()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        peaks.append((H.peak_rss_bytes() - rss0) / H.MIB)
    return {"median_seconds": H.summarize(times)["median"], "peak_extra_rss_mib": max(peaks)}


def experiment_optimizer(agent: Any, spec: BenchSpec, repeats: int) -> dict[str, Any]:
    """AdamW implementations and clip_grad_norm_ foreach on a copy of the student with real gradients."""
    model = copy.deepcopy(agent.student)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    params = [p for p in model.parameters() if p.requires_grad]
    out: dict[str, Any] = {"parameters": sum(p.numel() for p in params)}
    variants = {
        "for-loop (default on CPU)": {},
        "foreach=True": {"foreach": True},
        "fused=True": {"fused": True},
    }
    opts = {}
    for name, kw in variants.items():
        try:
            opts[name] = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0, **kw)
            opts[name].step()  # allocate the state outside the timing
        except (RuntimeError, TypeError) as err:  # e.g. fused not supported on this device/dtype
            out[name] = {"error": str(err)}
    results: dict[str, list[dict[str, float]]] = {n: [] for n in opts}
    for _ in range(repeats):  # alternate the variants
        for name, opt in opts.items():
            results[name].append(_time_repeated(opt.step, 1, spec.device))
    for name, rs in results.items():
        out[f"adamw {name}"] = {
            "median_seconds": H.summarize([r["median_seconds"] for r in rs])["median"],
            "peak_extra_rss_mib": max(r["peak_extra_rss_mib"] for r in rs),
        }
    for fe in (False, True):
        out[f"clip_grad_norm_ foreach={fe}"] = _time_repeated(
            lambda fe=fe: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=fe), repeats, spec.device
        )
    return out


def _sample_current(
    logits: torch.Tensor, temp: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's per-token arithmetic (top_k=0, top_p=1): two softmaxes, inverse-CDF sampling."""
    from rl_distill.rollout.engine import sample_categorical

    logp_all = torch.log_softmax(logits / temp, dim=-1)
    filtered = logits / temp  # _filter_logits is a no-op without top-k/top-p
    tok = sample_categorical(filtered.softmax(-1), gen)
    return tok, logp_all.gather(-1, tok[:, None]).squeeze(-1)


def _sample_lean(
    logits: torch.Tensor, temp: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One log-softmax, reused for sampling (``exp``) and the token log-prob (same distribution)."""
    from rl_distill.rollout.engine import sample_categorical

    logp_all = torch.log_softmax(logits / temp, dim=-1)
    tok = sample_categorical(logp_all.exp(), gen)
    return tok, logp_all.gather(-1, tok[:, None]).squeeze(-1)


def _sample_multinomial(
    logits: torch.Tensor, temp: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's arithmetic before commit 07b5d6f: ``torch.multinomial`` (B x V exponentials on CPU)."""
    logp_all = torch.log_softmax(logits / temp, dim=-1)
    filtered = logits / temp
    tok = torch.multinomial(filtered.softmax(-1), 1, generator=gen).squeeze(-1)
    return tok, logp_all.gather(-1, tok[:, None]).squeeze(-1)


def experiment_sampling(spec: BenchSpec, vocab: int, repeats: int) -> dict[str, Any]:
    """Per-step sampling arithmetic on ``(B, V)`` logits, times ``max_new_tokens`` tokens.

    ``current`` is the engine's (inverse CDF); the stored ``profile_step.json`` predates this and has
    ``current`` = ``torch.multinomial`` and ``inverse CDF instead of multinomial`` instead.
    """
    logits = torch.randn(spec.batch_size, vocab, device=spec.device) * 3
    out = {}
    variants = (
        ("current", _sample_current),
        ("lean (one log-softmax)", _sample_lean),
        ("torch.multinomial (before 07b5d6f)", _sample_multinomial),
    )
    for name, fn in variants:
        gen = torch.Generator(device=spec.device).manual_seed(0)

        def run(fn=fn, gen=gen) -> None:
            for _ in range(spec.max_new_tokens):
                fn(logits, spec.temperature, gen)

        out[name] = _time_repeated(run, repeats, spec.device)
        out[name]["per_token_ms"] = 1000 * out[name]["median_seconds"] / spec.max_new_tokens
    return out


def _naive_jsd_rows(teacher: torch.Tensor, student: torch.Tensor, beta: float) -> torch.Tensor:
    log_t = torch.log_softmax(teacher.float(), -1)
    log_s = torch.log_softmax(student.float(), -1)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    return beta * (log_t.exp() * (log_t - log_m)).sum(-1) + (1 - beta) * (log_s.exp() * (log_s - log_m)).sum(
        -1
    )


def experiment_divergence(spec: BenchSpec, vocab: int, num_rows: int, repeats: int) -> dict[str, Any]:
    """JSD(beta) forward + backward on ``(num_rows, V)`` logits: chunk sizes, fused vs recomputing backward."""
    from rl_distill.divergences import generalized_jsd

    gen = torch.Generator(device=spec.device).manual_seed(0)
    teacher = torch.randn(num_rows, vocab, generator=gen, device=spec.device) * 4
    student_data = torch.randn(num_rows, vocab, generator=gen, device=spec.device) * 4
    mask = torch.ones(1, num_rows, dtype=torch.bool, device=spec.device)
    reference = None
    out: dict[str, Any] = {"rows": num_rows, "vocab": vocab}

    def run_current(chunk: int | None) -> torch.Tensor:
        s = student_data.clone().requires_grad_(True)
        val = generalized_jsd(
            teacher[None], s[None], mask, beta=spec.beta, temperature=spec.temperature,
            reduction="sequence", chunk_size=chunk,
        ).sum()  # fmt: skip
        val.backward()
        return s.grad

    def run_recompute(chunk: int | None) -> torch.Tensor:
        undo = apply_patches(["recompute_grad"])  # decided in forward; backward then recomputes
        try:
            s = student_data.clone().requires_grad_(True)
            val = generalized_jsd(
                teacher[None], s[None], mask, beta=spec.beta, temperature=spec.temperature,
                reduction="sequence", chunk_size=chunk,
            ).sum()  # fmt: skip
        finally:
            undo()
        val.backward()
        return s.grad

    def run_naive() -> torch.Tensor:
        s = student_data.clone().requires_grad_(True)
        (
            _naive_jsd_rows(teacher / spec.temperature, s / spec.temperature, spec.beta).sum() / num_rows
        ).backward()
        return s.grad

    # The library's default chunk (it was 2**22 elements when results/profile_step.json was stored).
    import rl_distill.divergences as div

    default_rows = max(1, div.DEFAULT_CHUNK_ELEMENTS // vocab)
    variants: dict[str, Callable[[], torch.Tensor]] = {
        f"chunked, default ({default_rows} rows)": lambda: run_current(None),
    }
    for rows in (16, 32, 64, 256):
        if rows < num_rows:
            variants[f"chunked, {rows} rows"] = lambda rows=rows: run_current(rows)
    variants["chunked, one chunk (chunk_size=0)"] = lambda: run_current(0)
    variants[f"recomputing backward (before #18), {default_rows} rows"] = lambda: run_recompute(None)
    variants["recomputing backward (before #18), 32 rows"] = lambda: run_recompute(32)
    variants["naive full autograd (logaddexp)"] = run_naive
    reference = variants[f"chunked, default ({default_rows} rows)"]()
    results: dict[str, list[dict[str, float]]] = {n: [] for n in variants}
    for _ in range(repeats):  # alternate the variants
        for name, fn in variants.items():
            results[name].append(_time_repeated(fn, 1, spec.device))
    for name, fn in variants.items():
        err = float((fn() - reference).abs().max())
        out[name] = {
            "median_seconds": H.summarize([r["median_seconds"] for r in results[name]])["median"],
            "peak_extra_rss_mib": max(r["peak_extra_rss_mib"] for r in results[name]),
            "max_abs_grad_diff_vs_default": err,
        }
    return out


def experiment_teacher_logprobs(spec: BenchSpec, vocab: int, num_rows: int, repeats: int) -> dict[str, Any]:
    """Token log-probs from ``(N, V)`` logits: full log-softmax + gather vs gather - logsumexp."""
    gen = torch.Generator(device=spec.device).manual_seed(0)
    logits = torch.randn(1, num_rows, vocab, generator=gen, device=spec.device) * 4
    ids = torch.randint(0, vocab, (1, num_rows), generator=gen, device=spec.device)

    def full() -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)

    def lean() -> torch.Tensor:
        with torch.inference_mode():
            lf = logits.float()
            return lf.gather(-1, ids[..., None]).squeeze(-1) - torch.logsumexp(lf, -1)

    diff = float((full() - lean()).abs().max())
    out = {"rows": num_rows, "max_abs_diff": diff}
    for name, fn in (("log_softmax + gather (current)", full), ("gather - logsumexp", lean)):
        out[name] = _time_repeated(fn, repeats, spec.device)
    return out


# --------------------------------------------------------------------------------------------
# 4. torch.profiler
# --------------------------------------------------------------------------------------------
def top_operators(agent: Any, batch: list[Any], limit: int = 25) -> list[dict[str, Any]]:
    """Top operators of one ``update()`` by self CPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        agent.update(batch)
    rows = []
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    for e in events[:limit]:
        rows.append(
            {
                "op": e.key,
                "calls": e.count,
                "self_cpu_ms": e.self_cpu_time_total / 1000,
                "share": e.self_cpu_time_total / total,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def run_profile(spec: BenchSpec, *, experiments: bool, torch_profiler: bool, repeats: int) -> dict[str, Any]:
    """All sections; see the module docstring."""
    agent, examples = build_agent(spec)
    batches = list(_batches(examples, spec.batch_size))
    it = iter(batches)
    for _ in range(spec.warmup):
        agent.update(next(it))
    phase_batches = [next(it) for _ in range(spec.steps)]
    update_batches = [next(it) for _ in range(spec.steps)]
    # Alternate: phases, then the real update(), so both see the same machine state.
    result: dict[str, Any] = {
        "benchmark": "profile_step",
        "spec": spec.__dict__,
        "machine": H.machine_info(spec.threads),
    }
    result.update(profile_phases(agent, phase_batches, spec))
    result.update(time_updates(agent, update_batches, spec))
    result["waste_checks"] = waste_checks(agent, next(it), batches[0])
    vocab = agent.engine.vocab_size
    rows = spec.batch_size * spec.max_new_tokens
    if experiments:
        result["experiments"] = {
            "optimizer": experiment_optimizer(agent, spec, repeats),
            "sampling": experiment_sampling(spec, vocab, repeats),
            "divergence_step_shape": experiment_divergence(spec, vocab, rows, repeats),
            "teacher_token_logprobs": experiment_teacher_logprobs(spec, vocab, rows, repeats),
        }
    if torch_profiler:
        result["top_operators"] = top_operators(agent, next(it))
    result["load_average_after"] = H.load_average()
    return result


def format_report(result: dict[str, Any]) -> str:
    """Human-readable summary."""
    lines = [
        f"phases (median of {result['spec']['steps']} steps; sum {result['sum_of_phase_medians_seconds']:.3f} s):"
    ]
    for name, p in result["phases"].items():
        share = f"{100 * p['share_of_step']:5.1f}%" if p["share_of_step"] is not None else "      "
        peak = f"{p['peak_extra_rss_mib']:7.1f} MiB" if p["peak_extra_rss_mib"] is not None else ""
        lines.append(f"  {name:38s} {p['median_seconds']:8.4f} s {share} {peak}")
    lines.append(f"agent.update(): median {result['update_seconds']['median']:.3f} s")
    lines.append("waste checks: " + ", ".join(f"{k}={v}" for k, v in result["waste_checks"]["ok"].items()))
    lines.append(f"host syncs per step: {result['waste_checks']['host_syncs_per_step']}")
    for site, n in list(result["waste_checks"]["host_syncs_by_site"].items())[:8]:
        lines.append(f"    {n:4d}  {site}")
    for section, res in result.get("experiments", {}).items():
        lines.append(f"experiment {section}:")
        for k, v in res.items():
            lines.append(f"    {k}: {v}")
    for row in result.get("top_operators", [])[:15]:
        lines.append(
            f"  {row['op']:40s} {row['calls']:6d} {row['self_cpu_ms']:9.1f} ms {100 * row['share']:5.1f}%"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_spec_arguments(parser)
    parser.set_defaults(steps=5)
    parser.add_argument("--experiments", action="store_true", help="run the cheap-win experiments")
    parser.add_argument("--torch-profiler", action="store_true", help="top operators of one update()")
    parser.add_argument("--experiment-repeats", type=int, default=5)
    args = parser.parse_args(argv)
    result = run_profile(
        spec_from_args(args),
        experiments=args.experiments,
        torch_profiler=args.torch_profiler,
        repeats=args.experiment_repeats,
    )
    print(format_report(result))
    H.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
