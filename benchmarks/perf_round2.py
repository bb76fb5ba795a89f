"""Performance round 2 (issue #18): one driver for every measurement of ``docs/results/performance.md``.

Sections (``--sections``; each writes its part of ``--out`` as soon as it is done, so a run cut
short keeps what it measured, and running a subset updates only that part):

- ``floors``: the machine's measured memory bandwidth (a large tensor copy, and a read-only sum)
  and matrix-product peak (fp32 and bf16), the denominators of every floor below;
- ``decode``: the per-token decode time of the student (the engine's own ``generate``, prefill
  subtracted) against the bandwidth floor (its weight bytes / measured bandwidth), with the
  engine's dynamic KV cache and with a static one, fp32 and under bf16 autocast;
- ``memory`` and ``env`` (below) run next, then ``steps``: the side-by-side training-step benchmark: ours against TRL's DistillationTrainer and
  GKDTrainer (:data:`PLAN`: matched fp32, matched bf16, each tool's documented defaults, each lever
  alone, supervised KD at lambda = 0, batch 16 and 128 new tokens), every configuration in its own
  fresh process, alternated across ``--repeats`` repeats, every repeat recorded;
- ``memory``: ``benchmarks/divergence_memory.py`` on the current code (JSD(0.5) forward + backward,
  B = 8, T = 256, V = 49152; fused gradient and the old recomputing backward);
- ``env``: ``benchmarks/env_overhead.py`` on SmolLM2 at B = 8; ``env_bf16`` (not in the default
  sections): the same with the teacher stored in bfloat16 on both paths; ``env_products``,
  ``env_onednn`` and ``env_forward`` (not in the default sections): the environment teacher's steps
  with only the products native (PyTorch operations around them), without the native kernel (the
  fused step with oneDNN's products) and without the fused step (the model's forward);
- ``quality``: held-out divergences after the main job, fp32 against bf16, from the ``summary.json``
  of runs made with ``rl-distill train`` (``--quality-dir``, folders named ``{fp32,bf16}_s{SEED}``).

``--report-only`` rewrites the generated blocks of the results pages from the JSON
(``python -m benchmarks.report``) and measures nothing. ``--model tiny`` and small ``--steps`` make
a smoke run of seconds (``tests/test_benchmarks.py``).

Example (the recorded run; see the page for the exact command and machine)::

    python benchmarks/perf_round2.py --out benchmarks/results/perf_round2.json

The two headline pairs (fp32 and bf16 against DistillationTrainer) repeated more often, into their
own file, whose repeats the page pools with the full run's (``report_round2.pooled_ratios``)::

    python benchmarks/perf_round2.py --sections steps --configs ours trl_distillation ours_bf16 \
        trl_distillation_bf16 --repeats 8 --out benchmarks/results/perf_round2_headline.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from benchmarks import _harness as H  # noqa: E402
from benchmarks._methods import TRL_METHODS, BenchSpec  # noqa: E402
from rl_distill.rollout.packed import PACK_ROWS_HINT  # noqa: E402

SECTIONS = (
    "floors",
    "decode",
    "steps",
    "memory",
    "env",
    "quality",
    "env_bf16",
    "env_products",
    "env_onednn",
    "env_forward",
)
DEFAULT_OUT = H.ROOT / "benchmarks" / "results" / "perf_round2.json"

#: The step configurations: name -> (method, spec overrides, group). Groups run one after the other
#: (``core`` first: the headline), the configurations of a group alternate within each repeat.
PLAN: dict[str, tuple[str, dict[str, Any], str]] = {
    # matched fp32 (both sides fp32, no checkpointing): the headline
    "ours": ("ours", {}, "core"),
    "trl_distillation": ("trl_distillation", {}, "core"),
    "trl_gkd": ("trl_gkd", {}, "core"),
    # matched bf16: ours train.precision bf16 + bf16 teacher; TRL bf16=True
    "ours_bf16": ("ours", {"precision": "bf16"}, "core"),
    "trl_distillation_bf16": ("trl_distillation", {"precision": "bf16"}, "core"),
    # TRL at its documented defaults (bf16 and gradient checkpointing on); ours' default is fp32 = "ours"
    "trl_distillation_defaults": ("trl_distillation", {"trl_defaults": True}, "core"),
    # lever 1 alone: the fused divergence gradient off (the old recomputing backward)
    "ours_recompute": ("ours_recompute", {}, "core"),
    # the decode lever alone: the few-row output head off (the model's F.linear head when sampling)
    "ours_linear_head": ("ours_linear_head", {}, "core"),
    # the layer lever alone: the decoder layers' few-row products off (F.linear in every layer when sampling)
    "ours_linear_layers": ("ours_linear_layers", {}, "core"),
    # lever 4 alone: the teacher's shared-prompt-prefix KV cache off
    "ours_no_prefix_cache": ("ours_no_prefix_cache", {}, "core"),
    # the memory lever alone: the student's embedding lookup with its dense gradient
    "ours_dense_embedding_grad": ("ours_dense_embedding_grad", {}, "core"),
    # the head-input lever alone: the output head reads the strided logits_to_keep slice (fp32 and bf16)
    "ours_strided_head": ("ours_strided_head", {}, "core"),
    "ours_bf16_strided_head": ("ours_strided_head", {"precision": "bf16"}, "core"),
    # the fused-step lever alone: the student samples through its own forward (no fused step, no native kernel)
    "ours_unfused": ("ours_unfused", {}, "core"),
    # supervised KD (lambda = 0); DistillationTrainer has no lambda = 0 mode
    "ours_lambda0": ("ours_lambda0", {}, "core"),
    "trl_gkd_lambda0": ("trl_gkd_lambda0", {}, "core"),
    # how the cost grows with batch and length (fp32)
    "ours_b16": ("ours", {"batch_size": 16}, "scale"),
    "trl_distillation_b16": ("trl_distillation", {"batch_size": 16}, "scale"),
    "ours_t128": ("ours", {"max_new_tokens": 128}, "scale"),
    "trl_distillation_t128": ("trl_distillation", {"max_new_tokens": 128}, "scale"),
}

#: (ours, peer) pairs whose per-repeat throughput ratios the page reports.
PAIRS: dict[str, tuple[str, str]] = {
    "fp32 vs DistillationTrainer": ("ours", "trl_distillation"),
    "fp32 vs GKDTrainer": ("ours", "trl_gkd"),
    "bf16 vs DistillationTrainer bf16": ("ours_bf16", "trl_distillation_bf16"),
    "defaults vs DistillationTrainer defaults": ("ours", "trl_distillation_defaults"),
    "lambda0 vs GKDTrainer lambda0": ("ours_lambda0", "trl_gkd_lambda0"),
    "B16 vs DistillationTrainer B16": ("ours_b16", "trl_distillation_b16"),
    "T128 vs DistillationTrainer T128": ("ours_t128", "trl_distillation_t128"),
    "lever 1: fused vs recompute": ("ours", "ours_recompute"),
    "lever 2: bf16 vs fp32": ("ours_bf16", "ours"),
    "decode lever: skinny head vs F.linear head": ("ours", "ours_linear_head"),
    "decode lever: skinny decoder layers vs F.linear layers": ("ours", "ours_linear_layers"),
    "lever 4: teacher prefix cache vs none": ("ours", "ours_no_prefix_cache"),
    "memory lever: sparse vs dense embedding gradient": ("ours", "ours_dense_embedding_grad"),
    "head-input lever: dense vs strided head input": ("ours", "ours_strided_head"),
    "head-input lever, bf16: dense vs strided head input": ("ours_bf16", "ours_bf16_strided_head"),
    "fused-step lever: fused vs the model's forward": ("ours", "ours_unfused"),
}


# --------------------------------------------------------------------------------------------
# JSON file: read, merge one section, write
# --------------------------------------------------------------------------------------------
def load_results(path: Path) -> dict[str, Any]:
    """The JSON at ``path`` (an empty dict when there is none)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def save_section(path: Path, section: str, data: Any) -> None:
    """Write ``data`` as section ``section`` of the JSON at ``path``, keeping the other sections."""
    results = load_results(path)
    results[section] = data
    H.write_json(path, results)


# --------------------------------------------------------------------------------------------
# Floors: bandwidth and matmul peak
# --------------------------------------------------------------------------------------------
def _best_seconds(fn: Any, repeats: int) -> list[float]:
    fn()  # warm-up (pages, caches)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def measure_floors(threads: int, *, mib: int = 512, matmul: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """Memory bandwidth (copy: read + write; sum: read only) and matmul GFLOP/s (fp32, bf16).

    Args:
        threads: torch threads (the benchmarks' count).
        mib: size of the streamed tensor (much larger than the caches).
        matmul: square matrix size of the matmul peak.
        repeats: timed repeats; the median and the best are recorded, the floors use the best.
    """
    H.set_threads(threads)
    x = torch.empty(mib * H.MIB // 4).normal_()
    y = torch.empty_like(x)
    copy = _best_seconds(lambda: y.copy_(x), repeats)
    read = _best_seconds(lambda: x.sum(), repeats)
    nbytes = x.numel() * 4
    out: dict[str, Any] = {
        "threads": threads,
        "tensor_mib": mib,
        "copy_seconds": copy,
        "read_seconds": read,
        "copy_gb_per_s": 2 * nbytes / min(copy) / 1e9,  # read + write
        "read_gb_per_s": nbytes / min(read) / 1e9,
    }
    out["bandwidth_gb_per_s"] = max(out["copy_gb_per_s"], out["read_gb_per_s"])
    # element-wise transcendental throughput (exp into a preallocated output): the divergence's real limit
    z = torch.empty_like(x[: x.numel() // 4])
    src = x[: z.numel()]
    exp = _best_seconds(lambda: torch.exp(src, out=z), repeats)
    out["exp_seconds"] = exp
    out["exp_gelem_per_s"] = z.numel() / min(exp) / 1e9
    for dtype in ("float32", "bfloat16"):
        a = torch.randn(matmul, matmul).to(getattr(torch, dtype))
        b = torch.randn(matmul, matmul).to(getattr(torch, dtype))
        secs = _best_seconds(lambda a=a, b=b: a @ b, repeats)
        out[f"matmul_{dtype}_seconds"] = secs
        out[f"matmul_{dtype}_gflops"] = 2 * matmul**3 / min(secs) / 1e9
    out["matmul_size"] = matmul
    return out


# --------------------------------------------------------------------------------------------
# Decode: per-token time against the bandwidth floor
# --------------------------------------------------------------------------------------------
def _static_decode(student: Any, batch: Any, steps: int) -> tuple[float, Tensor]:
    """Greedy prefill + ``steps`` one-token forwards with a static KV cache; (seconds of the decode steps, last logits)."""
    from transformers import StaticCache

    from rl_distill.rollout.prompts import position_ids_from_mask

    ids, mask = batch.input_ids, batch.attention_mask
    width = ids.shape[1]
    cache = StaticCache(config=student.config, max_cache_len=width + steps + 1)
    pos = position_ids_from_mask(mask)
    out = student(
        input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
        cache_position=torch.arange(width), logits_to_keep=1,
    )  # fmt: skip
    next_pos = pos[:, -1:] + 1
    start = time.perf_counter()
    for step in range(steps):
        tok = out.logits[:, -1].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = student(
            input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=cache,
            use_cache=True, cache_position=torch.tensor([width + step]),
        )  # fmt: skip
        next_pos = next_pos + 1
    return time.perf_counter() - start, out.logits[:, -1]


def _dynamic_decode(student: Any, batch: Any, steps: int) -> tuple[float, Tensor]:
    """The same greedy loop with the engine's dynamic cache (for the logits check and the same timing)."""
    from rl_distill.rollout.prompts import position_ids_from_mask

    ids, mask = batch.input_ids, batch.attention_mask
    pos = position_ids_from_mask(mask)
    out = student(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    next_pos = pos[:, -1:] + 1
    start = time.perf_counter()
    for _ in range(steps):
        tok = out.logits[:, -1].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = student(
            input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
            past_key_values=out.past_key_values, use_cache=True,
        )  # fmt: skip
        next_pos = next_pos + 1
    return time.perf_counter() - start, out.logits[:, -1]


def _median_ms(fn: Any, repeats: int, calls: int) -> float:
    """One warm-up call, then the median over ``repeats`` of the mean time of ``calls`` calls, in ms."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def measure_head(
    weight: Tensor, repeats: int = 5, rows: tuple[int, ...] = (1, 2, 4, 8, 16)
) -> dict[str, Any]:
    """The output head alone: ``F.linear(h, W)``, the few-row product ``(W @ h.T).T``, the packed product.

    For each row count and dtype (float32; bfloat16 weights and inputs), the median over ``repeats``
    of the mean of 20 calls, in ms. What :data:`rl_distill.rollout.skinny_head.SKINNY_MAX_ROWS` rests on.
    """
    import torch.nn.functional as F

    from rl_distill.rollout.packed import packing_available

    def timed(fn: Any) -> float:
        return _median_ms(fn, repeats, calls=20)

    out: dict[str, Any] = {"shape": list(weight.shape), "repeats": repeats, "ms": {}}
    gen = torch.Generator().manual_seed(0)
    for dtype in ("float32", "bfloat16"):
        w = weight.to(getattr(torch, dtype)).contiguous()
        for n in rows:
            h = torch.randn(n, w.shape[1], generator=gen).to(w.dtype)
            out["ms"][f"{dtype}_{n}"] = {
                "linear": timed(lambda h=h, w=w: F.linear(h, w)),
                "transposed": timed(lambda h=h, w=w: torch.mm(w, h.t()).t().contiguous()),
                **({"packed": timed(_packed_product(h, w))} if packing_available(w.dtype) else {}),
            }
    return out


def _packed_product(h: Tensor, weight: Tensor) -> Any:
    """``h @ weight.T`` with ``weight`` packed once by oneDNN (what :mod:`rl_distill.rollout.packed` runs)."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)
    return lambda: torch.ops.mkldnn._linear_pointwise(h, packed, None, "none", [], "")


def measure_layer_products(
    model: Any, repeats: int = 5, rows: tuple[int, ...] = (1, 2, 4, 6, 8, 16)
) -> dict[str, Any]:
    """The decoder layers' linear maps alone (float32): ``F.linear``, ``(W @ h.T).T``, the packed product.

    For each projection name (``q_proj``, ..., ``down_proj``) one call is a product with that
    projection's weight in *every* layer in turn (so the weights stream from memory as in a decode
    step, not from a warm cache); reported per product, the median over ``repeats`` of the mean of 5
    calls, in ms. What :data:`rl_distill.rollout.skinny_head.SKINNY_LAYER_MAX_ROWS` rests on.
    """
    import torch.nn.functional as F

    from rl_distill.rollout import skinny_head as sh
    from rl_distill.rollout.packed import packing_available

    head = model.get_output_embeddings()
    by_name: dict[str, list[Tensor]] = {}
    for name, module in model.named_modules():
        if module is not head and sh._plain_linear(module):
            by_name.setdefault(name.rsplit(".", 1)[-1], []).append(module.weight.detach())

    def timed(fn: Any, weights: list[Tensor]) -> float:
        for w in weights:
            fn(w)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(5):
                for w in weights:
                    fn(w)
            times.append((time.perf_counter() - start) / (5 * len(weights)) * 1e3)
        return statistics.median(times)

    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"repeats": repeats, "rows": list(rows), "layers": 0, "ms": {}}
    for name, weights in by_name.items():
        out["layers"] = len(weights)
        cells: dict[str, Any] = {"shape": list(weights[0].shape)}
        packed = (
            {id(w): torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT) for w in weights}
            if packing_available(torch.float32)
            else {}
        )
        for n in rows:
            h = torch.randn(n, weights[0].shape[1], generator=gen)
            cells[str(n)] = {
                "linear": timed(lambda w, h=h: F.linear(h, w), weights),
                "transposed": timed(lambda w, h=h: torch.mm(w, h.t()).t().contiguous(), weights),
            }
            if packed:
                cells[str(n)]["packed"] = timed(
                    lambda w, h=h, packed=packed: torch.ops.mkldnn._linear_pointwise(
                        h, packed[id(w)], None, "none", [], ""
                    ),
                    weights,
                )
        out["ms"][name] = cells
    return out


def measure_head_input(
    weight: Tensor, batch_size: int, prompt_width: int, new_tokens: int, repeats: int = 5
) -> dict[str, Any]:
    """The output head on Hugging Face's strided ``logits_to_keep`` slice against a dense copy of it.

    Three slices of a ``(rows, width, d)`` hidden-state tensor, as the models hand them to the head:
    ``score`` (``[:, -T:]`` of a prompt + completion forward, what the teacher's scoring and the
    student's gradient forward keep), ``prefill`` (``[:, -1:]`` of the prompts, the decode's first
    logits) and ``prefill_1row`` (the same for one prompt: a view PyTorch calls contiguous). For each,
    float32 and bfloat16: ``F.linear`` on the slice, and on a dense copy (the copy timed too: what
    :func:`rl_distill.rollout.skinny_head.dense_head_input` does); the median over ``repeats`` of the
    mean of 3 calls, in ms.
    """
    import torch.nn.functional as F

    def timed(fn: Any) -> float:
        return _median_ms(fn, repeats, calls=3)

    shapes = {
        "score": (batch_size, prompt_width + new_tokens - 1, new_tokens),
        "prefill": (batch_size, prompt_width, 1),
        "prefill_1row": (1, prompt_width, 1),
    }
    out: dict[str, Any] = {"shape": list(weight.shape), "repeats": repeats, "slices": {}, "ms": {}}
    gen = torch.Generator().manual_seed(0)
    for name, (rows, width, keep) in shapes.items():
        out["slices"][name] = {"hidden": [rows, width, weight.shape[1]], "kept": keep}
        for dtype in ("float32", "bfloat16"):
            w = weight.to(getattr(torch, dtype)).contiguous()
            x = torch.randn(rows, width, w.shape[1], generator=gen).to(w.dtype)[:, -keep:]
            out["ms"][f"{name}_{dtype}"] = {
                "strided": timed(lambda x=x, w=w: F.linear(x, w)),
                "dense": timed(lambda x=x, w=w: F.linear(x.clone(memory_format=torch.contiguous_format), w)),
            }
    return out


def measure_decode(spec: BenchSpec, floors: dict[str, Any], repeats: int = 3) -> dict[str, Any]:
    """Per-token decode of the student: engine ``generate`` (sampling included) and greedy model loops.

    ``generate`` per token = (generate - prefill) / (T - 1): the 31 one-token forwards plus the
    engine's sampling and bookkeeping; ``generate_linear_head`` the same with the engine's few-row
    output head off (``skinny_head=False``), ``generate_linear_layers`` with the decoder layers'
    few-row products off (``skinny_layers=False``). ``head``: :func:`measure_head` on the student's
    head; ``layers``: :func:`measure_layer_products` on its decoder layers; ``head_input``:
    :func:`measure_head_input` on its head. The greedy loops time the one-token forwards alone, with the
    dynamic cache (the engine's) and a static one (``transformers.StaticCache``); their last logits
    are compared. Each is measured in fp32 and under bf16 autocast (``train.precision: bf16``).
    """
    from rl_distill.precision import autocast
    from rl_distill.rollout import RolloutEngine, SamplingConfig
    from rl_distill.rollout.prompts import position_ids_from_mask

    H.set_threads(spec.threads)
    teacher, student, tokenizer = H.build_models(spec.model, spec.student_layers, device=spec.device)
    student.eval()
    engine = RolloutEngine(student, teacher, tokenizer)
    batch = engine.encode(H.benchmark_prompts(spec.batch_size, seed=spec.seed))
    steps = spec.max_new_tokens - 1
    sampling = SamplingConfig(max_new_tokens=spec.max_new_tokens)
    weight_bytes = sum(p.numel() * p.element_size() for p in student.parameters())
    bandwidth = floors["bandwidth_gb_per_s"] * 1e9
    out: dict[str, Any] = {
        "batch_size": spec.batch_size,
        "prompt_width": batch.input_ids.shape[1],
        "new_tokens": spec.max_new_tokens,
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "student_embedding_parameters": student.get_input_embeddings().weight.numel(),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "teacher_embedding_parameters": teacher.get_input_embeddings().weight.numel(),
        "tied_embeddings": bool(getattr(student.config, "tie_word_embeddings", False)),
        "vocab": engine.vocab_size,
        "hidden_size": student.config.hidden_size,
        "student_weight_bytes_fp32": weight_bytes,
        "floor_ms_per_token_fp32": weight_bytes / bandwidth * 1e3,
        "floor_ms_per_token_bf16": weight_bytes / 2 / bandwidth * 1e3,
    }
    out["head"] = measure_head(student.get_output_embeddings().weight.detach(), repeats=max(repeats, 5))
    out["layers"] = measure_layer_products(student, repeats=max(repeats, 5))
    out["head_input"] = measure_head_input(
        student.get_output_embeddings().weight.detach(),
        spec.batch_size,
        batch.input_ids.shape[1],
        spec.max_new_tokens,
        repeats=max(repeats, 5),
    )
    linear_engine = RolloutEngine(student, teacher, tokenizer, skinny_head=False)
    linear_layers_engine = RolloutEngine(student, teacher, tokenizer, skinny_layers=False)
    gen = torch.Generator().manual_seed(spec.seed)
    for precision in ("fp32", "bf16"):
        rows: dict[str, list[float]] = {
            "generate": [], "generate_linear_head": [], "generate_linear_layers": [], "prefill": [],
            "dynamic": [], "static": [],
        }  # fmt: skip
        with torch.no_grad(), autocast(precision, spec.device):
            for r in range(repeats + 1):  # the first round warms up
                start = time.perf_counter()
                rollout = engine.generate(batch, sampling, generator=gen)
                t_gen = time.perf_counter() - start
                start = time.perf_counter()
                rollout_lin = linear_engine.generate(batch, sampling, generator=gen)
                t_lin = time.perf_counter() - start
                start = time.perf_counter()
                rollout_lay = linear_layers_engine.generate(batch, sampling, generator=gen)
                t_lay = time.perf_counter() - start
                start = time.perf_counter()
                student(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=position_ids_from_mask(batch.attention_mask), use_cache=True, logits_to_keep=1,
                )  # fmt: skip
                t_pre = time.perf_counter() - start
                t_dyn, logits_dyn = _dynamic_decode(student, batch, steps)
                try:
                    t_sta, logits_sta = _static_decode(student, batch, steps)
                except (RuntimeError, ValueError, TypeError) as err:  # e.g. StaticCache under autocast
                    static_error = " ".join(str(err).split())[:300]
                    rows.pop("static", None)
                else:
                    static_error = None
                if r == 0:
                    continue
                width = rollout.completion_ids.shape[1]
                rows["generate"].append((t_gen - t_pre) / max(1, width - 1) * 1e3)
                width_lin = rollout_lin.completion_ids.shape[1]
                rows["generate_linear_head"].append((t_lin - t_pre) / max(1, width_lin - 1) * 1e3)
                width_lay = rollout_lay.completion_ids.shape[1]
                rows["generate_linear_layers"].append((t_lay - t_pre) / max(1, width_lay - 1) * 1e3)
                rows["prefill"].append(t_pre * 1e3)
                rows["dynamic"].append(t_dyn / steps * 1e3)
                if static_error is None:
                    rows["static"].append(t_sta / steps * 1e3)
        floor = out[f"floor_ms_per_token_{precision}"]
        out[precision] = {
            "ms_per_token": rows,
            "median_ms_per_token": {k: statistics.median(v) for k, v in rows.items()},
            "ratio_to_floor": {k: statistics.median(v) / floor for k, v in rows.items() if k != "prefill"},
            "static_cache_error": static_error,
            "static_vs_dynamic_max_abs_logit_diff": None
            if static_error
            else float((logits_sta.float() - logits_dyn.float()).abs().max()),
        }
    return out


# --------------------------------------------------------------------------------------------
# Steps: the side-by-side benchmark
# --------------------------------------------------------------------------------------------
def plan_specs(base: BenchSpec, big_steps: int | None = None) -> dict[str, tuple[str, BenchSpec, str]]:
    """Every :data:`PLAN` entry with its full spec (``big_steps``: timed steps of the ``scale`` group)."""
    out = {}
    for name, (method, overrides, group) in PLAN.items():
        spec = replace(base, **overrides)
        if group == "scale" and big_steps is not None:
            spec = replace(spec, steps=big_steps)
        out[name] = (method, spec, group)
    return out


def run_steps(
    configs: dict[str, tuple[str, BenchSpec, str]],
    repeats: int,
    *,
    out: Path,
    timeout: float | None,
    deadline: float | None,
) -> dict[str, Any]:
    """Run every configuration ``repeats`` times in fresh processes, alternating within each group.

    Saves the ``steps`` section after every process. A process that would end past ``deadline`` (a
    ``time.time()``; predicted from the last run of the same configuration) is skipped and listed
    under ``skipped``.
    """
    groups: dict[str, list[str]] = {}
    for name, (_, _, group) in configs.items():
        groups.setdefault(group, []).append(name)
    data: dict[str, Any] = {
        "repeats": repeats,
        "order": "configurations alternate within each repeat; groups run one after the other",
        "configs": {n: {"method": m, "spec": asdict(s), "group": g} for n, (m, s, g) in configs.items()},
        "runs": {n: [] for n in configs},
        "skipped": [],
    }
    last_seconds: dict[str, float] = {}
    for group, names in groups.items():
        for r in range(repeats):
            for name in names:
                method, spec, _ = configs[name]
                if deadline is not None and time.time() + last_seconds.get(name, 0.0) > deadline:
                    data["skipped"].append(f"{name} repeat {r + 1}")
                    continue
                load_before, hogs = H.load_average(), H.cpu_hogs()
                began = time.time()
                try:
                    res = H.run_module_json(
                        "benchmarks._methods",
                        ["--method", method, "--spec", json.dumps(asdict(spec))],
                        timeout=timeout,
                    )
                except (RuntimeError, OSError) as err:  # record and go on: one failure must not lose the rest
                    data["runs"][name].append({"error": str(err)[-2000:], "repeat": r + 1})
                    print(f"[{group} {r + 1}/{repeats}] {name}: FAILED {str(err)[-300:]}", flush=True)
                    save_section(out, "steps", data)
                    continue
                last_seconds[name] = time.time() - began
                res.update(
                    repeat=r + 1,
                    load_average_before=load_before,
                    other_busy_processes_before=hogs,
                    process_seconds=last_seconds[name],
                )
                data["runs"][name].append(res)
                print(
                    f"[{group} {r + 1}/{repeats}] {name}: {res['median_step_seconds']:.3f} s/step, "
                    f"{res['tokens_per_second']:.1f} tok/s, peak RSS {res['peak_rss_steps_mib']:.0f} MiB, "
                    f"load before {load_before}",
                    flush=True,
                )
                save_section(out, "steps", data)
    save_section(out, "steps", data)
    return data


# --------------------------------------------------------------------------------------------
# Memory, env, quality
# --------------------------------------------------------------------------------------------
def run_memory(tiny: bool, threads: int) -> dict[str, Any]:
    """``divergence_memory`` on the current code: fused (shipped) and recomputing backward, and the naive one."""
    from benchmarks import divergence_memory

    b, t, v = (2, 8, 64) if tiny else (8, 256, 49152)
    variants = ["chunked", "recompute", "naive_logaddexp"]
    return divergence_memory.run_all(
        variants, b, t, v, beta=0.5, methods=["profiler", "rss"], threads=threads, repeats=1
    )


def run_env(
    tiny: bool, threads: int, repeats: int, teacher_dtype: str = "float32", teacher_step: str = "fused"
) -> dict[str, Any]:
    """``env_overhead`` at B = 8 (SmolLM2 and its 6-layer student; ``tiny``: the tiny models).

    ``teacher_dtype="bfloat16"`` (section ``env_bf16``): the teacher stored in bfloat16 on both paths
    (``model.teacher_dtype``), the environment's per-token teacher steps streaming half the bytes.
    ``teacher_step``: ``env_overhead --teacher-step`` (sections ``env_products``, ``env_onednn``,
    ``env_forward``).
    """
    argv = ["--batch-size", "8", "--repeats", str(repeats), "--warmup", "1", "--threads", str(threads)]
    argv += ["--teacher-dtype", teacher_dtype, "--teacher-step", teacher_step]
    if tiny:
        argv += [
            "--tiny-hidden",
            "16",
            "--tiny-layers",
            "2",
            "--student-layers",
            "1",
            "--max-new-tokens",
            "3",
        ]
    else:
        argv += ["--teacher", "smollm2-135m-instruct", "--student-layers", "6"]
    return H.run_module_json("benchmarks.env_overhead", argv)


def collect_quality(folder: Path) -> dict[str, Any]:
    """Held-out metrics before/after of the runs ``{fp32,bf16}_s{SEED}/summary.json`` under ``folder``."""
    runs = []
    for path in sorted(folder.glob("*_s*/summary.json")):
        precision, _, seed = path.parent.name.rpartition("_s")
        summary = json.loads(path.read_text(encoding="utf-8"))
        runs.append(
            {
                "precision": precision,
                "seed": int(seed),
                "before": summary["before"],
                "after": summary["after"],
                "train_seconds": summary.get("train_seconds"),
            }
        )
    return {
        "commands": {
            "fp32": "rl-distill train examples/configs/onpolicy_gkd_smollm2.yaml --set train.seed=SEED",
            "bf16": "rl-distill train examples/configs/bf16_smollm2.yaml --set train.seed=SEED",
        },
        "runs": runs,
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS[:5]), choices=SECTIONS)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="teacher, or 'tiny' (smoke runs)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternated repeats of every step configuration"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process (core group)")
    parser.add_argument(
        "--big-steps", type=int, default=3, help="timed steps per process (batch 16, 128 tokens)"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--configs", nargs="+", default=None, help=f"a subset of {', '.join(PLAN)}")
    parser.add_argument("--env-repeats", type=int, default=3)
    parser.add_argument("--budget-minutes", type=float, default=None, help="skip step runs after this long")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per process")
    parser.add_argument(
        "--quality-dir", type=Path, default=None, help="folder of the fp32/bf16 main-job runs"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the pages from the JSON; measure nothing"
    )
    args = parser.parse_args(argv)
    if args.report_only:
        from benchmarks import report

        report.main([])
        return load_results(args.out)
    start = time.time()
    deadline = None if args.budget_minutes is None else start + 60 * args.budget_minutes
    tiny = args.model == H.TINY
    base = BenchSpec(
        model=args.model, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, steps=args.steps,
        warmup=args.warmup, threads=args.threads, optimizer="adamw_fused",
    )  # fmt: skip
    meta = {
        "command": "python benchmarks/perf_round2.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
        "machine": H.machine_info(args.threads),
        "cpu_hogs_before": H.cpu_hogs(),
        "base_spec": asdict(base),
    }
    invocations = load_results(args.out).get("invocations", [])
    save_section(args.out, "invocations", [*invocations, meta])
    errors: dict[str, str] = {}

    def section(name: str, fn: Any) -> None:
        # One failing section must not cost the others their (quiet-machine) measurement.
        if name not in args.sections:
            return
        try:
            save_section(args.out, name, fn())
        except Exception as err:  # noqa: BLE001 - recorded in the JSON and printed, then the run goes on
            errors[name] = f"{type(err).__name__}: {err}"[-2000:]
            print(f"section {name} FAILED: {errors[name]}", file=sys.stderr, flush=True)

    section(
        "floors", lambda: measure_floors(args.threads, mib=16 if tiny else 512, matmul=256 if tiny else 2048)
    )
    section(
        "decode",
        lambda: measure_decode(
            base, load_results(args.out).get("floors") or measure_floors(args.threads, mib=16, matmul=256)
        ),
    )
    # memory and env first: short and fixed; the step runs then fill the budget, the largest last
    section("memory", lambda: run_memory(tiny, args.threads))
    section("env", lambda: run_env(tiny, args.threads, args.env_repeats))
    section("env_bf16", lambda: run_env(tiny, args.threads, args.env_repeats, "bfloat16"))
    section("env_products", lambda: run_env(tiny, args.threads, args.env_repeats, teacher_step="products"))
    section("env_onednn", lambda: run_env(tiny, args.threads, args.env_repeats, teacher_step="onednn"))
    section("env_forward", lambda: run_env(tiny, args.threads, args.env_repeats, teacher_step="forward"))
    if "steps" in args.sections:
        configs = plan_specs(base, args.big_steps)
        if args.configs:
            unknown = set(args.configs) - set(configs)
            if unknown:
                parser.error(f"unknown configs {sorted(unknown)}; choose from {', '.join(configs)}")
            configs = {k: v for k, v in configs.items() if k in args.configs}
        if H.package_version("trl") is None:
            configs = {k: v for k, v in configs.items() if v[0] not in TRL_METHODS}
        run_steps(configs, args.repeats, out=args.out, timeout=args.timeout, deadline=deadline)
    if "quality" in args.sections:
        if args.quality_dir is None:
            parser.error("--sections quality needs --quality-dir")
        save_section(args.out, "quality", collect_quality(args.quality_dir))
    meta.update(
        section_errors=errors,
        finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        load_average_after=H.load_average(),
        wall_seconds=time.time() - start,
    )
    save_section(args.out, "invocations", [*invocations, meta])
    return load_results(args.out)


if __name__ == "__main__":
    main()
