"""Peak extra memory of JSD(beta) forward + backward: the chunked divergence against naive ones.

Inputs: teacher and student logits of shape ``(B, T, V)`` in float32 (default ``B=8, T=256,
V=49152``: 384 MiB each), the student's requiring grad, every position unmasked, loss = the
batch mean of the per-sequence token means (paper Eq. 2), then ``backward()``.

**Extra memory** is everything allocated beyond the two input tensors while the forward and
backward run, *including the gradient tensor of the student logits* (``student.grad``, one
``(B, T, V)`` float32 tensor, still alive at the end). The target is an extra of at most 1.5x one
``(B, T, V)`` float32 tensor; the gradient alone is 1.0x.

Variants (``--variants``):

- ``chunked``: ``rl_distill.divergences.generalized_jsd`` as shipped (rows in chunks of
  ``DEFAULT_CHUNK_ELEMENTS / V`` rows; since issue #18 the closed-form student gradient is written in
  the forward chunk loop when the teacher needs no gradient; the default chunk is 2**19 elements, it
  was 2**22, and the backward recomputed every chunk, when ``results/divergence_memory.json`` was
  measured); ``chunked:R`` the same with ``chunk_size=R`` rows;
- ``recompute``: the same with the fused gradient switched off (:mod:`benchmarks._patches`
  ``recompute_grad``: every chunk recomputed under autograd in backward, the code before issue
  #18); ``recompute:R`` with R rows;
- ``naive_stack``: TRL's ``GKDTrainer.generalized_jsd_loss`` formula (two log-softmaxes,
  ``torch.stack`` + ``logsumexp`` mixture, two ``F.kl_div``), full autograd;
- ``naive_logaddexp``: the same with ``torch.logaddexp`` instead of the stacked tensor.

Each variant runs in a fresh process, once per measuring method (``--methods``):

- ``rss``: RSS high-water mark over the call (``/proc/self/clear_refs`` reset after the inputs are
  made, then ``VmHWM``), minus the RSS before; default glibc allocator;
- ``rss_mmap``: the same with ``MALLOC_MMAP_THRESHOLD_=65536`` so that every freed buffer over
  64 KiB goes back to the OS at once (RSS then follows the live bytes closely);
- ``profiler``: allocator-level peak of live bytes from ``torch.profiler(profile_memory=True)``
  allocation events (the running sum of allocations minus frees, its maximum).

Example::

    python benchmarks/divergence_memory.py --out results/divergence_memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import _harness as H  # noqa: E402
from benchmarks._patches import apply_patches  # noqa: E402

DEFAULT_VARIANTS = ["chunked", "recompute", "chunked:32", "naive_logaddexp", "naive_stack"]
METHODS = ("rss", "rss_mmap", "profiler")


def _naive_stack(
    teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """TRL 1.16 ``GKDTrainer.generalized_jsd_loss`` arithmetic, reduced like paper Eq. 2."""
    import torch.nn.functional as F

    log_s = F.log_softmax(student, dim=-1)
    log_t = F.log_softmax(teacher, dim=-1)
    b = torch.tensor(beta, dtype=log_s.dtype)
    log_m = torch.logsumexp(torch.stack([log_s + torch.log1p(-b), log_t + torch.log(b)]), dim=0)
    kl_t = F.kl_div(log_m, log_t, reduction="none", log_target=True)
    kl_s = F.kl_div(log_m, log_s, reduction="none", log_target=True)
    jsd = (beta * kl_t + (1 - beta) * kl_s).sum(-1)  # (B, T)
    return _eq2_batch_mean(jsd, mask)


def _naive_logaddexp(
    teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    log_t = torch.log_softmax(teacher, -1)
    log_s = torch.log_softmax(student, -1)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    jsd = beta * (log_t.exp() * (log_t - log_m)).sum(-1) + (1 - beta) * (log_s.exp() * (log_s - log_m)).sum(
        -1
    )
    return _eq2_batch_mean(jsd, mask)


def _eq2_batch_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(per_token.dtype)
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


def loss_fn(variant: str, beta: float) -> Any:
    """``(teacher, student, mask) -> scalar loss`` for a variant name (see the module docstring)."""
    from rl_distill.divergences import generalized_jsd

    name, _, arg = variant.partition(":")
    if name == "chunked":
        chunk = int(arg) if arg else None
        return lambda t, s, m: generalized_jsd(t, s, m, beta=beta, reduction="batch", chunk_size=chunk)
    if name == "recompute":
        chunk = int(arg) if arg else None

        def recompute(t: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            # The choice between fused and recomputing backward is made in forward: undoing the
            # patch before backward() leaves this call on the recomputing path.
            undo = apply_patches(["recompute_grad"])
            try:
                return generalized_jsd(t, s, m, beta=beta, reduction="batch", chunk_size=chunk)
            finally:
                undo()

        return recompute
    if name == "naive_stack":
        return lambda t, s, m: _naive_stack(t, s, m, beta)
    if name == "naive_logaddexp":
        return lambda t, s, m: _naive_logaddexp(t, s, m, beta)
    raise ValueError(f"unknown variant {variant!r}")


def _allocation_peak(prof: Any) -> tuple[int, int]:
    """(peak, final) running sum of allocation events in a finished torch.profiler session."""
    from torch._C._profiler import _EventType

    allocs: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            allocs.append((node.start_time_ns, int(node.extra_fields.alloc_size)))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(allocs):
        live += size
        peak = max(peak, live)
    return peak, live


def measure(
    variant: str, b: int, t: int, v: int, *, beta: float, method: str, threads: int
) -> dict[str, Any]:
    """Forward + backward of one variant in this process; the extra memory by ``method``."""
    H.set_threads(threads)
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(b, t, v, generator=gen) * 4
    student = (torch.randn(b, t, v, generator=gen) * 4).requires_grad_(True)
    mask = torch.ones(b, t, dtype=torch.bool)
    fn = loss_fn(variant, beta)
    # Warm-up on a small input: pages in the kernels' code and sets up the allocator, so the
    # measurement below sees the tensors only.
    small = torch.randn(2, 4, v, requires_grad=True)
    fn(torch.randn(2, 4, v), small, torch.ones(2, 4, dtype=torch.bool)).backward()
    del small
    tensor_bytes = teacher.numel() * teacher.element_size()
    gc.collect()
    out: dict[str, Any] = {"variant": variant, "shape": [b, t, v], "method": method}
    rss0 = H.rss_bytes()
    reset_ok = H.reset_peak_rss()
    start = time.perf_counter()
    if method == "profiler":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = fn(teacher, student, mask)
            loss.backward()
        seconds = time.perf_counter() - start
        peak, final = _allocation_peak(prof)
        out.update(peak_extra_bytes=peak, final_extra_bytes=final)
    else:
        loss = fn(teacher, student, mask)
        loss.backward()
        seconds = time.perf_counter() - start
        out.update(
            peak_extra_bytes=H.peak_rss_bytes() - rss0 if reset_ok else H.lifetime_peak_rss_bytes() - rss0,
            final_extra_bytes=H.rss_bytes() - rss0,
            peak_reset=reset_ok,
        )
    assert student.grad is not None and student.grad.shape == student.shape
    out.update(
        seconds=seconds,
        loss=float(loss.detach()),
        grad_abs_sum=float(student.grad.abs().sum()),
        tensor_bytes=tensor_bytes,
        peak_extra_mib=out["peak_extra_bytes"] / H.MIB,
        peak_extra_over_tensor=out["peak_extra_bytes"] / tensor_bytes,
    )
    return out


def run_all(
    variants: list[str],
    b: int,
    t: int,
    v: int,
    *,
    beta: float,
    methods: list[str],
    threads: int,
    repeats: int,
) -> dict[str, Any]:
    """Every (variant, method) in a fresh process, ``repeats`` times, alternating variants."""
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {var: {m: [] for m in methods} for var in variants}
    for _ in range(repeats):
        for m in methods:
            env = {"MALLOC_MMAP_THRESHOLD_": "65536"} if m == "rss_mmap" else {}
            for var in variants:
                argv = ["--worker", var, "--b", str(b), "--t", str(t), "--v", str(v), "--beta", str(beta)]
                argv += ["--method", "profiler" if m == "profiler" else "rss", "--threads", str(threads)]
                res = H.run_module_json("benchmarks.divergence_memory", argv, env=env)
                rows[var][m].append(res)
                print(
                    f"{var:18s} {m:9s} peak extra {res['peak_extra_mib']:8.1f} MiB "
                    f"= {res['peak_extra_over_tensor']:.2f}x (B,T,V)  {res['seconds']:.2f} s",
                    flush=True,
                )
    tensor_mib = b * t * v * 4 / H.MIB
    summary = {}
    for var, by_method in rows.items():
        summary[var] = {
            m: {
                "peak_extra_mib": max(r["peak_extra_mib"] for r in rs),
                "peak_extra_over_tensor": max(r["peak_extra_over_tensor"] for r in rs),
                "median_seconds": H.summarize([r["seconds"] for r in rs])["median"],
                "loss": rs[0]["loss"],
            }
            for m, rs in by_method.items()
        }
    return {
        "benchmark": "divergence_memory",
        "shape": {"B": b, "T": t, "V": v},
        "beta": beta,
        "tensor_mib": tensor_mib,
        "target_peak_extra_mib": 1.5 * tensor_mib,
        "machine": H.machine_info(threads),
        "summary": summary,
        "runs": rows,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--b", type=int, default=8, help="batch size B")
    parser.add_argument("--t", type=int, default=256, help="sequence length T")
    parser.add_argument("--v", type=int, default=49152, help="vocabulary size V")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per (variant, method)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="rss", choices=["rss", "profiler"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        result = measure(
            args.worker, args.b, args.t, args.v, beta=args.beta, method=args.method, threads=args.threads
        )
        H.write_json(args.out, result)
        if args.out is None:
            print(json.dumps(result, indent=2))
        return result
    result = run_all(
        args.variants, args.b, args.t, args.v, beta=args.beta, methods=args.methods,
        threads=args.threads, repeats=args.repeats,
    )  # fmt: skip
    print(f"\none (B,T,V) float32 tensor = {result['tensor_mib']:.0f} MiB; target extra <= 1.5x")
    for var, by_method in result["summary"].items():
        cells = "  ".join(f"{m}: {s['peak_extra_over_tensor']:.2f}x" for m, s in by_method.items())
        print(f"  {var:18s} {cells}")
    H.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
