"""Top-k teacher divergences against the full ones on real SmolLM2 logits: bias, gradient direction, cost.

Setting: teacher SmolLM2-135M-Instruct, student its 6-layer kept-layer copy
(:func:`rl_distill.models.make_kept_layer_student`, the default ``model.student_layers``), prompts of
the built-in ``instructions`` task. For each seed, a batch of ``B`` prompts gets two kinds of
completions: **student samples** (on-policy GKD data, temperature 1) and **teacher samples** (the
kind of fixed sequence supervised KD and SeqKD train on). The teacher scores each batch once (full
logits ``(B, T, V)``); the student's logits ``(B, T, V)`` come from one forward with gradient.

For every divergence (JSD(0.5), forward KL, reverse KL) and every ``k``, the top-k loss
(:func:`rl_distill.divergences.topk_divergence`: the teacher's top-k log-probs plus one tail bucket)
is compared with the full loss (paper Eq. 2, batch mean):

- ``rel_bias``: ``(D_k - D) / D`` of the batch loss (never > 0: coarse-graining lowers an
  f-divergence); ``token_ratio_median``: the median over completion tokens of ``D_k / D``;
- ``cos_logits``: cosine between the gradients w.r.t. the student's logits (all positions);
- ``cos_params``: cosine between the gradients w.r.t. the student's parameters (one backward of the
  shared forward per loss);
- ``teacher_mass``: the teacher's mean probability mass on its top-k; ``student_mass``: the student's
  mass on the same k tokens.
- ``bf16_rel_change``: ``(D_k(bfloat16 top-k) - D_k) / D``, the change when the top-k log-probs are
  stored as bfloat16 (``cache-teacher --dtype bfloat16``).

Cost, on the first batch of student samples: the divergence's forward + backward w.r.t. the logits,
``--repeats`` times per variant, alternating variants (median and min-max seconds); its peak extra
allocation (torch profiler allocation events, as ``benchmarks/divergence_memory.py``); the bytes a
teacher signal holds per token in memory (full float32 logits vs top-k float32 values + int64 ids)
and on disk in a ``rl-distill cache-teacher`` shard (int32 ids, float32 or bfloat16 log-probs, plus
the token id and its log-prob). ``exact_at_V``: the largest ``|D_V - D|`` (k = V), a check.

Cache build (``--cache-examples N``, default 64): ``rl-distill cache-teacher``'s code on ``N`` references
of the ``arithmetic`` task, for each k and both log-prob dtypes: wall time and the real bytes per token.

Run (writes the JSON, then the page from it)::

    python benchmarks/topk_divergence.py --out benchmarks/results/topk_divergence.json
    python benchmarks/topk_divergence.py --report-only   # the page again from the JSON
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import _harness as H  # noqa: E402

RESULT = H.ROOT / "benchmarks" / "results" / "topk_divergence.json"
PAGE = H.ROOT / "docs" / "results" / "topk_divergence.md"
DIVERGENCES = (("jsd", 0.5), ("forward_kl", 0.0), ("reverse_kl", 1.0))
DATA = ("student_samples", "teacher_samples")


def _loss(name: str, beta: float, k: int | None, teacher_logits, topk, student, mask, **kw: Any):
    """Full (``k`` None) or top-k divergence, batch mean of paper Eq. 2 (or ``reduction`` in ``kw``)."""
    from rl_distill.divergences import divergence, topk_divergence

    if k is None:
        return divergence(name, teacher_logits, student, mask, beta=beta, **kw)
    vals, ids = topk[k]
    return topk_divergence(name, vals, ids, student, mask, beta=beta, **kw)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _allocation_peak_mib(fn: Any) -> float:
    """Peak of live bytes allocated while ``fn()`` runs (torch profiler allocation events), in MiB."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.divergence_memory import _allocation_peak

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak, _ = _allocation_peak(prof)
    return peak / H.MIB


def make_batches(engine, args: argparse.Namespace, data: str) -> list[dict[str, Any]]:
    """Per seed: the scored rollout (teacher full logits) of ``B`` prompts, sampled by the student or teacher."""
    from rl_distill.rollout import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0)
    model = engine.student if data == "student_samples" else engine.teacher
    batches = []
    for seed in args.seeds:
        prompts = H.benchmark_prompts(args.batch_size * (seed + 1))[-args.batch_size :]
        gen = torch.Generator().manual_seed(seed)
        rollout = engine.generate(prompts, sampling, model=model, generator=gen)
        engine.score(rollout, teacher_output="full")
        batches.append({"seed": seed, "data": data, "rollout": rollout})
    return batches


def measure_batch(batch: dict[str, Any], args: argparse.Namespace, engine) -> dict[str, Any]:
    """Bias and gradient cosines of every (divergence, k) against the full divergence on one batch."""
    r, student = batch["rollout"], engine.student
    mask = r.completion_mask
    teacher_logits = r.teacher_logits.float()  # (B, T, V)
    student.train()
    student_logits = engine.score_student(r)  # (B, T, V), with gradient through the student
    leaf = student_logits.detach().requires_grad_(True)
    log_t = torch.log_softmax(teacher_logits, -1)
    vocab = log_t.shape[-1]
    ks = [*args.ks, vocab]
    topk = {k: log_t.topk(k, dim=-1) for k in ks}  # (values, indices), each (B, T, k)
    log_s = torch.log_softmax(leaf.detach(), -1)
    params = [p for p in student.parameters() if p.requires_grad]
    out: dict[str, Any] = {
        "seed": batch["seed"],
        "data": batch["data"],
        "tokens": int(mask.sum()),
        "shape": list(teacher_logits.shape),
        "teacher_mass": {},
        "student_mass": {},
        "divergences": {},
    }
    for k in args.ks:
        vals, ids = topk[k]
        out["teacher_mass"][str(k)] = float(vals.exp().sum(-1)[mask].mean())
        out["student_mass"][str(k)] = float(log_s.gather(-1, ids).exp().sum(-1)[mask].mean())
    for name, beta in DIVERGENCES:
        full_t = _loss(name, beta, None, teacher_logits, topk, leaf, mask)
        (g_full,) = torch.autograd.grad(full_t, leaf)
        full = float(full_t.detach())
        (p_full,) = [torch.autograd.grad(student_logits, params, g_full, retain_graph=True)]
        tok_full = _loss(name, beta, None, teacher_logits, topk, leaf.detach(), mask, reduction="token")[mask]
        rows: dict[str, Any] = {"full": {"loss": full}}
        for k in ks:
            loss_t = _loss(name, beta, k, teacher_logits, topk, leaf, mask)
            loss = float(loss_t.detach())
            if k == vocab:
                rows["full"]["exact_at_V"] = abs(loss - full)
                continue
            (g,) = torch.autograd.grad(loss_t, leaf)
            p_grad = torch.autograd.grad(student_logits, params, g, retain_graph=True)
            tok = _loss(name, beta, k, teacher_logits, topk, leaf.detach(), mask, reduction="token")[mask]
            # The same top-k stored as bfloat16 (cache-teacher --dtype bfloat16).
            bf16 = {k: (topk[k][0].to(torch.bfloat16), topk[k][1])}
            loss_bf16 = float(_loss(name, beta, k, teacher_logits, bf16, leaf.detach(), mask))
            rows[str(k)] = {
                "loss": loss,
                "rel_bias": (loss - full) / full if full > 0 else math.nan,
                "bf16_rel_change": (loss_bf16 - loss) / full if full > 0 else math.nan,
                "token_ratio_median": float((tok / tok_full.clamp(min=1e-12)).median()),
                "cos_logits": _cos(g, g_full),
                "cos_params": _cos(
                    torch.cat([x.flatten() for x in p_grad]), torch.cat([x.flatten() for x in p_full])
                ),
            }
        out["divergences"][name] = rows
        print(
            f"  seed {batch['seed']} {batch['data']:16s} {name:10s} full {full:.4f}  "
            + "  ".join(
                f"k={k}: bias {rows[str(k)]['rel_bias']:+.3f} cos {rows[str(k)]['cos_params']:.3f}"
                for k in args.ks
            ),
            flush=True,
        )
    return out


def measure_cost(batch: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Seconds and peak extra allocation of the divergence's forward + backward, per variant."""
    r, engine = batch["rollout"], batch["engine"]
    mask = r.completion_mask  # (B, T)
    teacher_logits = r.teacher_logits.float()
    with torch.no_grad():
        student_logits = engine.score_student(r).float()
    log_t = torch.log_softmax(teacher_logits, -1)
    topk = {k: tuple(t.contiguous() for t in log_t.topk(k, dim=-1)) for k in args.ks}
    variants: list[int | None] = [None, *args.ks]
    cost: dict[str, Any] = {}
    for name, beta in DIVERGENCES:
        times: dict[str, list[float]] = {str(k or "full"): [] for k in variants}
        for _ in range(args.repeats):
            for k in variants:
                leaf = student_logits.clone().requires_grad_(True)
                start = time.perf_counter()
                _loss(name, beta, k, teacher_logits, topk, leaf, mask).backward()
                times[str(k or "full")].append(time.perf_counter() - start)
        peaks = {}
        for k in variants:
            leaf = student_logits.clone().requires_grad_(True)
            peaks[str(k or "full")] = _allocation_peak_mib(
                lambda k=k, leaf=leaf, name=name, beta=beta: _loss(
                    name, beta, k, teacher_logits, topk, leaf, mask
                ).backward()
            )
        cost[name] = {
            key: {"seconds": H.summarize(ts), "peak_extra_mib": peaks[key]} for key, ts in times.items()
        }
    return cost


def measure_cache_build(args: argparse.Namespace, teacher, tokenizer) -> list[dict[str, Any]]:
    """``rl-distill cache-teacher`` on ``--cache-examples`` arithmetic references, per k and log-prob dtype.

    Records the build's wall time (all of it: fingerprinting and loading the teacher, its forwards,
    writing) and the cache's real size from its manifest (shards with their safetensors headers).
    """
    import tempfile

    from rl_distill.config import config_from_dict
    from rl_distill.teacher_cache import build_teacher_cache

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        name = args.model
        if args.model == H.TINY:  # the cache fingerprints a checkpoint folder
            name = str(Path(tmp) / "teacher")
            teacher.save_pretrained(name)
            tokenizer.save_pretrained(name)
        for k in args.ks:
            for dtype in ("float32", "bfloat16"):
                config = config_from_dict(
                    {
                        "model": {"teacher": name, "student_layers": 1, "device": "cpu"},
                        "data": {"task": "arithmetic", "num_train": args.cache_examples, "num_eval": 1},
                        "agent": {"name": "gkd", "lmbda": 0.0, "teacher_topk": k},
                        "train": {"output_dir": str(Path(tmp) / "run")},
                    }
                )
                out = Path(tmp) / f"cache-{k}-{dtype}"
                start = time.perf_counter()
                build_teacher_cache(config, out, batch_size=8, logprob_dtype=dtype, log=None)
                seconds = time.perf_counter() - start
                manifest = json.loads((out / "manifest.json").read_text())
                rows.append(
                    {
                        "k": k,
                        "dtype": dtype,
                        "examples": manifest["num_examples"],
                        "tokens": manifest["num_tokens"],
                        "bytes": manifest["bytes"],
                        "bytes_per_token": manifest["bytes"] / manifest["num_tokens"],
                        "seconds": seconds,
                    }
                )
                print(
                    f"  cache k={k} {dtype}: {rows[-1]['bytes_per_token']:.1f} bytes/token, {seconds:.1f} s",
                    flush=True,
                )
    return rows


def signal_sizes(vocab: int, ks: list[int]) -> dict[str, Any]:
    """Bytes per completion token of each teacher signal, in memory and in a cache shard."""
    return {
        "vocab": vocab,
        "full_logits_float32": 4 * vocab,
        "topk_in_memory": {str(k): k * (4 + 8) for k in ks},  # float32 values + int64 ids (torch.topk)
        "cache_float32": {str(k): k * (4 + 4) + 4 + 4 for k in ks},  # + the token id and its log-prob
        "cache_bfloat16": {str(k): k * (2 + 4) + 4 + 4 for k in ks},
    }


def summarize(batches: list[dict[str, Any]], ks: list[int]) -> dict[str, Any]:
    """Mean, std, min, max over seeds of each (data, divergence, k) statistic."""
    out: dict[str, Any] = {}
    for data in DATA:
        rows = [b for b in batches if b["data"] == data]
        per_data: dict[str, Any] = {
            "teacher_mass": {str(k): _stats([b["teacher_mass"][str(k)] for b in rows]) for k in ks},
            "student_mass": {str(k): _stats([b["student_mass"][str(k)] for b in rows]) for k in ks},
            "tokens": [b["tokens"] for b in rows],
        }
        for name, _ in DIVERGENCES:
            per_data[name] = {
                "full_loss": _stats([b["divergences"][name]["full"]["loss"] for b in rows]),
                "exact_at_V_max": max(b["divergences"][name]["full"]["exact_at_V"] for b in rows),
            }
            for k in ks:
                per_data[name][str(k)] = {
                    stat: _stats([b["divergences"][name][str(k)][stat] for b in rows])
                    for stat in (
                        "rel_bias",
                        "token_ratio_median",
                        "cos_logits",
                        "cos_params",
                        "bf16_rel_change",
                    )
                }
        out[data] = per_data
    return out


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement; returns the JSON-ready result."""
    H.set_threads(args.threads)
    torch.manual_seed(0)
    hogs = H.cpu_hogs()
    machine = H.machine_info(args.threads)
    from rl_distill.models import make_kept_layer_student
    from rl_distill.rollout import RolloutEngine

    layers = args.student_layers
    teacher, first, tokenizer = H.build_models(args.model, layers[0])
    teacher_layers = teacher.config.num_hidden_layers
    # Teacher samples do not depend on the student: drawn and scored once, measured with every student.
    shared = make_batches(RolloutEngine(first, teacher, tokenizer), args, "teacher_samples")
    measured, first_on_policy = [], None
    for num in layers:
        student = (
            first
            if num == layers[0]
            else make_kept_layer_student(teacher, num_layers=num).train().requires_grad_(True)
        )
        engine = RolloutEngine(student, teacher, tokenizer)
        own = make_batches(engine, args, "student_samples")
        if first_on_policy is None:
            first_on_policy = {**own[0], "engine": engine}
        for batch in [*own, *shared]:
            measured.append({**measure_batch(batch, args, engine), "student_layers": num})
    cost = measure_cost(first_on_policy, args)
    cache = measure_cache_build(args, teacher, tokenizer) if args.cache_examples > 0 else []
    machine["load_average_after"] = H.load_average()
    machine["cpu_hogs_before"] = hogs
    vocab = measured[0]["shape"][-1]
    return {
        "benchmark": "topk_divergence",
        "command": "python benchmarks/topk_divergence.py " + " ".join(args.argv),
        "spec": {
            "model": args.model,
            "student_layers": layers,
            "teacher_layers": teacher_layers,
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "seeds": args.seeds,
            "ks": args.ks,
            "divergences": [f"{n}" + (f"(beta={b})" if n == "jsd" else "") for n, b in DIVERGENCES],
            "repeats": args.repeats,
            "threads": args.threads,
            "cache_examples": args.cache_examples,
        },
        "machine": machine,
        "sizes": signal_sizes(vocab, args.ks),
        "batches": measured,
        "summary": {
            str(num): summarize([m for m in measured if m["student_layers"] == num], args.ks)
            for num in layers
        },
        "cost": cost,
        "cache_build": cache,
    }


# --------------------------------------------------------------------------------------------
# The page, written from the JSON
# --------------------------------------------------------------------------------------------
def _pm(s: dict[str, float], fmt: str = "{:+.3f}") -> str:
    return f"{fmt.format(s['mean'])} ± {fmt.format(s['std']).lstrip('+')}"


def _students(data: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
    """The students' layer counts and the summary per student (a single-student JSON wrapped alike)."""
    layers = data["spec"]["student_layers"]
    if isinstance(layers, int):
        return [layers], {str(layers): data["summary"]}
    return list(layers), data["summary"]


def _data_section(s: dict[str, Any], data_kind: str, ks: list[str], level: str) -> list[str]:
    """The bias / gradient table of one student on one kind of data."""
    lines = [
        f"{level} {data_kind.replace('_', ' ').capitalize()} ({sum(s['tokens'])} completion tokens in all)",
        "",
        "Teacher mass on its top-k: "
        + ", ".join(f"k={k}: {_pm(s['teacher_mass'][k], '{:.3f}')}" for k in ks)
        + "; student mass on the same tokens: "
        + ", ".join(f"k={k}: {_pm(s['student_mass'][k], '{:.3f}')}" for k in ks)
        + ".",
        "",
        "| divergence | full loss (nats/token) | k | relative bias of the loss | median token ratio D_k/D "
        "| cos(grad) logits | cos(grad) parameters | bfloat16 top-k: change / D |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, _ in DIVERGENCES:
        d = s[name]
        for i, k in enumerate(ks):
            first = i == 0
            lines.append(
                f"| {name if first else ''} | {_pm(d['full_loss'], '{:.4f}') if first else ''} | {k} | "
                f"{_pm(d[k]['rel_bias'])} | {_pm(d[k]['token_ratio_median'], '{:.3f}')} | "
                f"{_pm(d[k]['cos_logits'], '{:.4f}')} | {_pm(d[k]['cos_params'], '{:.4f}')} | "
                f"{_pm(d[k]['bf16_rel_change'], '{:+.1e}')} |"
            )
    worst = max(s[name]["exact_at_V_max"] for name, _ in DIVERGENCES)
    return [
        *lines,
        "",
        f"Check: at k = V the top-k loss equals the full one (largest difference {worst:.1e} nats).",
        "",
    ]


def render(data: dict[str, Any], json_path: str = "benchmarks/results/topk_divergence.json") -> str:
    """The markdown of ``docs/results/topk_divergence.md`` (every number read from ``data``)."""
    spec, m, sizes = data["spec"], data["machine"], data["sizes"]
    layers, summaries = _students(data)
    ks = [str(k) for k in spec["ks"]]
    seeds = spec["seeds"]
    of = f" of {spec['teacher_layers']}" if "teacher_layers" in spec else ""
    lines = [
        "# Top-k teacher signals: bias and cost against the full divergence",
        "",
        "<!-- written by benchmarks/topk_divergence.py from its JSON; do not edit by hand -->",
        "",
        f"- Command: `{data['command'].strip()}` (the page alone: `python benchmarks/topk_divergence.py --report-only`)",
        f"- Machine: {m['cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB, torch {m['torch']}, "
        f"{m['torch_threads']} thread(s); load average {m['load_average'][0]:.2f} before, "
        f"{m['load_average_after'][0]:.2f} after (a shared machine: timings are indicative)",
        f"- Setting: teacher `{spec['model']}`; students: its kept-layer copies with "
        f"{' and '.join(map(str, layers))}{of} layers (untrained: the start of distillation); "
        f"{len(seeds)} batches (seeds {', '.join(map(str, seeds))}) of {spec['batch_size']} `instructions` prompts "
        f"with up to {spec['max_new_tokens']} sampled tokens, from the student (on-policy data) and from the teacher "
        "(fixed-sequence data, the same for every student); temperature 1",
        f"- Raw data: [`{json_path}`](../../{json_path})",
        "",
        "The top-k divergence (`rl_distill.divergences.topk_divergence`, `agent.teacher_topk`) coarse-grains both "
        "distributions to the teacher's k tokens plus one tail bucket, which can only lower an f-divergence "
        "(data-processing inequality): the relative bias below is never positive. Numbers are mean ± std over the "
        f"{len(seeds)} batches.",
        "",
        *interpretation(data),
        "",
    ]
    for num in layers:
        lines += [f"## Student with {num}{of} layers", ""]
        for data_kind in DATA:
            lines += _data_section(summaries[str(num)][data_kind], data_kind, ks, "###")
    cost = data["cost"]
    lines += [
        f"## Cost of the divergence (forward + backward w.r.t. the student logits, first on-policy batch, "
        f"{layers[0]}-layer student)",
        "",
        f"Median seconds of {spec['repeats']} repeats (min-max), and the peak extra allocation during one "
        "forward + backward (torch profiler; includes the `(B, T, V)` gradient of the logits, which every "
        "variant needs).",
        "",
        "| divergence | variant | seconds | min-max | peak extra (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name, _ in DIVERGENCES:
        for i, key in enumerate(["full", *ks]):
            c = cost[name][key]
            label = "full" if key == "full" else f"top-{key}"
            lines.append(
                f"| {name if i == 0 else ''} | {label} | {c['seconds']['median']:.3f} | "
                f"{c['seconds']['min']:.3f}-{c['seconds']['max']:.3f} | {c['peak_extra_mib']:.0f} |"
            )
    lines += [
        "",
        "## Size of the teacher signal per completion token",
        "",
        "| signal | bytes/token | vs full logits |",
        "|---|---|---|",
        f"| full logits, float32 (V = {sizes['vocab']}) | {sizes['full_logits_float32']:,} | 1 |",
    ]
    for k in ks:
        for label, key in (
            ("in memory (float32 + int64 ids)", "topk_in_memory"),
            ("cache shard, float32", "cache_float32"),
            ("cache shard, bfloat16", "cache_bfloat16"),
        ):
            b = sizes[key][k]
            lines.append(f"| top-{k} {label} | {b:,} | 1/{sizes['full_logits_float32'] / b:.0f} |")
    if data.get("cache_build"):
        lines += [
            "",
            f"## Building a cache (`rl-distill cache-teacher`, {data['cache_build'][0]['examples']} `arithmetic` "
            "references, batch 8)",
            "",
            "Real size from the manifest (shards with their headers) and the build's wall time (all of it: "
            "fingerprinting and loading the teacher, its forwards, writing; one run each). With this few references "
            "the fixed cost of fingerprinting and loading the teacher is included in every run, so tokens/s is a "
            "lower bound on the scoring rate.",
            "",
            "| k | log-prob dtype | tokens | MiB | bytes/token | seconds | tokens/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in data["cache_build"]:
            lines.append(
                f"| {c['k']} | {c['dtype']} | {c['tokens']} | {c['bytes'] / H.MIB:.2f} | {c['bytes_per_token']:.1f} | "
                f"{c['seconds']:.1f} | {c['tokens'] / c['seconds']:.0f} |"
            )
    return "\n".join([*lines, ""])


def interpretation(data: dict[str, Any]) -> list[str]:
    """Reading of the numbers (every figure quoted comes from ``data``)."""
    ks = [str(k) for k in data["spec"]["ks"]]
    layers, summaries = _students(data)
    lo, hi = ks[0], ks[-1]
    cost = data["cost"]
    speed = {
        name: cost[name]["full"]["seconds"]["median"] / cost[name][hi]["seconds"]["median"]
        for name, _ in DIVERGENCES
    }

    def stat(d: dict[str, Any], name: str, key: str, fmt: str = "{:+.3f}") -> str:
        return " / ".join(f"{_pm(d[name][k][key], fmt)}" for k in ks)

    lines = ["## Reading", ""]
    for num in layers:
        on, off = summaries[str(num)]["student_samples"], summaries[str(num)]["teacher_samples"]
        mass = lambda d: " / ".join(f"{d['teacher_mass'][k]['mean']:.3f}" for k in ks)  # noqa: E731
        lines += [
            f"- **{num}-layer student, bias of the loss** (k = {' / '.join(ks)}; full forward KL "
            f"{on['forward_kl']['full_loss']['mean']:.2f} nats/token on its own samples). Student samples: JSD "
            f"{stat(on, 'jsd', 'rel_bias')}, forward KL {stat(on, 'forward_kl', 'rel_bias')}, reverse KL "
            f"{stat(on, 'reverse_kl', 'rel_bias')}. Teacher samples: JSD {stat(off, 'jsd', 'rel_bias')}, forward KL "
            f"{stat(off, 'forward_kl', 'rel_bias')}, reverse KL {stat(off, 'reverse_kl', 'rel_bias')}. The teacher's "
            f"mean mass in its top-k: {mass(on)} (student samples), {mass(off)} (teacher samples).",
            f"- **{num}-layer student, direction** (cosine with the full gradient w.r.t. the student's parameters, "
            f"k = {' / '.join(ks)}). Student samples: JSD {stat(on, 'jsd', 'cos_params', '{:.3f}')}, forward KL "
            f"{stat(on, 'forward_kl', 'cos_params', '{:.3f}')}, reverse KL "
            f"{stat(on, 'reverse_kl', 'cos_params', '{:.3f}')}. Teacher samples: JSD "
            f"{stat(off, 'jsd', 'cos_params', '{:.3f}')}, forward KL {stat(off, 'forward_kl', 'cos_params', '{:.3f}')}, "
            f"reverse KL {stat(off, 'reverse_kl', 'cos_params', '{:.3f}')}.",
        ]
    lines += [
        "- **Why.** The top-k loss sees the teacher's k tokens and the student's *total* mass on the rest; it misses "
        "how the student spreads that mass over the tail (zero bias only where the student gives the tail the "
        "teacher's shape). Forward KL weights each token by the teacher, so where the teacher's mass sits in its "
        "top-k (the teacher mass above) its gradient keeps its direction; reverse KL and JSD also weight tokens by "
        "the student, whose mass outside the teacher's top-k (one minus the student mass above) enters only "
        "through the merged tail bucket.",
        "- **Cost.** The top-k loss still needs the student's full log-softmax over V (for the tail mass and the "
        "gradient), so it saves no work on the student side, and here it is slower than the full loss (top-"
        f"{hi} over full time: "
        + ", ".join(f"{name} {1 / v:.2f}x" for name, v in speed.items())
        + "): the full divergence writes its closed-form gradient in one pass over the rows, while the top-k one "
        "recomputes each chunk in the backward pass and scatters the k ids out of every student row for its tail. "
        "Peak extra memory is about the same (the `(B, T, V)` gradient of the logits dominates). What shrinks is "
        "the teacher signal held between scoring and the loss, and what a cache stores: "
        f"{data['sizes']['full_logits_float32']:,} bytes per token for full float32 logits, "
        f"{data['sizes']['cache_float32'][hi]:,} for a top-{hi} float32 cache, "
        f"{data['sizes']['cache_float32'][lo]:,} for top-{lo}.",
    ]
    return lines


def write_page(data: dict[str, Any], page: Path = PAGE, json_path: str | None = None) -> Path:
    """Write the page for ``data``."""
    page.parent.mkdir(parents=True, exist_ok=True)
    rel = json_path or "benchmarks/results/topk_divergence.json"
    page.write_text(render(data, rel) + "\n", encoding="utf-8")
    return page


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="teacher (or 'tiny' for a smoke run)"
    )
    parser.add_argument(
        "--student-layers",
        type=int,
        nargs="+",
        default=[6, 24],
        help="kept-layer students (layers of the teacher's)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--cache-examples",
        type=int,
        default=64,
        help="arithmetic references for the cache-build timing (0: skip)",
    )
    parser.add_argument("--out", default=str(RESULT), help="results JSON")
    parser.add_argument("--page", default=str(PAGE), help="markdown page written from the JSON")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the page from --out; measure nothing"
    )
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    if args.report_only:
        data = json.loads(out.read_text(encoding="utf-8"))
    else:
        data = run(args)
        H.write_json(out, data)
    try:
        rel = str(out.resolve().relative_to(H.ROOT))
    except ValueError:
        rel = out.name
    page = write_page(data, Path(args.page), rel)
    print(f"results: {out}\npage: {page}")
    return data


if __name__ == "__main__":
    main()
