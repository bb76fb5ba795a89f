"""Benchmark-local prototype of a change recommended in docs/results/performance.md (change 2).

Nothing in ``rl_distill`` is edited: the benchmarks apply the patch as a monkeypatch inside their own
worker process (``BenchSpec.patches``, method ``ours_recommended``) to measure what the change would
gain end to end.

- ``fused_jsd``: the GKD agent's JSD(beta) (``0 < beta < 1``, teacher logits without gradient)
  computed by :class:`FusedGradJSD`, which writes the analytic gradient w.r.t. the student logits
  during the forward chunk loop, so backward recomputes nothing (the library's chunked function
  recomputes every chunk with autograd). It runs at the library's chunk,
  ``rl_distill.divergences.DEFAULT_CHUNK_ELEMENTS`` read at call time, so patched and unpatched
  runs always compare the same chunk. ``tests/test_benchmarks.py`` checks that the patched agent
  takes this path and gets the library's loss and gradient.

Removed in issue #12 (both no longer matched the code they patched):

- ``inverse_cdf_sampling`` replaced ``torch.multinomial`` by inverse-CDF sampling. The rollout
  engine samples by inverse CDF itself (``rl_distill.rollout.engine.sample_categorical``) since
  commit 07b5d6f and no longer calls ``torch.multinomial``, so the patch did nothing there.
- ``small_chunks`` set ``DEFAULT_CHUNK_ELEMENTS`` to 2**20 "instead of 2**22". The library's default
  is 2**19 since commit 247e0a2, so on the current code the "small" chunk doubled the chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk when none is given: the library's, ``DEFAULT_CHUNK_ELEMENTS // vocab`` (at least 1)."""
    import rl_distill.divergences as div

    return max(1, div.DEFAULT_CHUNK_ELEMENTS // vocab)


class FusedGradJSD(torch.autograd.Function):
    """Generalized JSD(beta) of selected rows; the gradient w.r.t. the student logits is made in forward.

    With ``M = beta pT + (1 - beta) pS`` and student logits ``z`` at temperature ``tau``:
    ``dJSD/dz = (1 - beta) / tau * pS * (log pS - log M - KL(pS || M))``. The forward chunk loop
    writes that gradient into one buffer shaped like the student logits (the tensor backward would
    allocate anyway); backward scales it in place by the incoming per-row gradient, so it can run
    once per forward (no ``retain_graph``). Nothing is recomputed and no per-chunk autograd graph is
    built. The teacher gets no gradient (``fused_jsd`` refuses a teacher that requires one).

    Math runs in float32, or float64 for float64 inputs, like the library.

    Args (of ``apply``): teacher ``(..., V)``, student ``(..., V)``, ``index`` (a tuple of index
    tensors selecting the rows, as ``mask.nonzero(as_tuple=True)``), beta in (0, 1), temperature,
    rows per chunk. Returns the per-row divergence ``(N,)``.
    """

    @staticmethod
    def forward(ctx, teacher, student, index, beta, temperature, chunk_rows):  # type: ignore[override]  # noqa: ANN001
        n = index[0].numel()
        dtype = torch.promote_types(torch.promote_types(teacher.dtype, student.dtype), torch.float32)
        out = torch.empty(n, dtype=dtype, device=student.device)
        grad = torch.zeros_like(student) if student.requires_grad else None
        lb, l1b = math.log(beta), math.log1p(-beta)
        for lo in range(0, n, chunk_rows):
            idx = tuple(i[lo : lo + chunk_rows] for i in index)
            log_t = torch.log_softmax(teacher[idx].to(dtype) / temperature, -1)
            log_s = torch.log_softmax(student[idx].to(dtype) / temperature, -1)
            log_m = torch.logaddexp(log_t.clamp(min=-1e30) + lb, log_s.clamp(min=-1e30) + l1b)
            p_t = log_t.exp()
            kl_t = (p_t * torch.where(p_t > 0, log_t - log_m, 0.0)).sum(-1)
            del p_t
            p_s = log_s.exp()
            d_s = torch.where(p_s > 0, log_s - log_m, 0.0)
            del log_t, log_m, log_s
            kl_s = (p_s * d_s).sum(-1)
            out[lo : lo + chunk_rows] = beta * kl_t + (1 - beta) * kl_s
            if grad is not None:
                d_s.sub_(kl_s[:, None]).mul_(p_s).mul_((1 - beta) / temperature)
                grad[idx] = d_s.to(grad.dtype)
        ctx.index = index
        ctx.has_grad = grad is not None
        ctx.consumed = False
        if grad is not None:
            ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]  # noqa: ANN001
        if not ctx.has_grad:
            return None, None, None, None, None, None
        if ctx.consumed:
            raise RuntimeError("FusedGradJSD scales its saved gradient in place: backward can run only once")
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        scale = torch.zeros(grad.shape[:-1], dtype=grad.dtype, device=grad.device)
        scale[ctx.index] = grad_out.to(grad.dtype)
        return None, grad.mul_(scale[..., None]), None, None, None, None


def fused_jsd(
    teacher: Tensor,
    student: Tensor,
    mask: Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
    reduction: str = "sequence",
    chunk_rows: int | None = None,
) -> Tensor:
    """JSD(beta) over ``(B, T, V)`` logits with a ``(B, T)`` mask; ``sequence`` or ``batch`` reduction (Eq. 2).

    ``chunk_rows``: rows per chunk; None uses the library's default chunk (:func:`default_chunk_rows`).
    """
    if not 0.0 < beta < 1.0:
        raise ValueError("the fused prototype covers 0 < beta < 1 only")
    if teacher.requires_grad:
        raise ValueError("the fused prototype gives no teacher gradient; use rl_distill.divergences")
    rows = chunk_rows or default_chunk_rows(student.shape[-1])
    mask = mask.to(device=student.device, dtype=torch.bool)
    index = mask.nonzero(as_tuple=True)
    per_row = FusedGradJSD.apply(teacher, student, index, beta, temperature, rows)
    values = torch.zeros(mask.shape, dtype=per_row.dtype, device=student.device).index_put(index, per_row)
    lengths = mask.sum(-1)
    per_seq = values.sum(-1) / lengths.clamp(min=1)
    if reduction == "sequence":
        return per_seq
    if reduction == "batch":
        return per_seq.sum() / (lengths > 0).sum().clamp(min=1)
    raise ValueError(f"unsupported reduction {reduction!r}")


def _fusable(
    name: str, teacher: Tensor, student: Tensor, mask: Tensor | None, beta: float, reduction: str, chunk: Any
) -> bool:
    """Whether a ``divergence(...)`` call is one the prototype computes exactly as the library does."""
    return (
        name == "jsd"
        and (chunk is None or (isinstance(chunk, int) and chunk >= 0))
        and 0.0 < beta < 1.0
        and reduction in ("sequence", "batch")
        and mask is not None
        and not teacher.requires_grad
        and teacher.dim() >= 2
        and teacher.shape == student.shape
        and mask.shape == teacher.shape[:-1]
    )


def patch_fused_jsd() -> Callable[[], None]:
    """Route the GKD agent's ``divergence("jsd", ...)`` through :func:`fused_jsd`; returns the undo.

    Other calls (other divergences, beta 0 or 1, other reductions, no mask, a teacher that requires
    grad, shapes the library would reject) go to the library unchanged.
    """
    import rl_distill.agents.gkd as gkd

    original = gkd.divergence

    def divergence(
        name, teacher, student, mask=None, *, beta=0.5, temperature=1.0, reduction="batch", chunk_size=None
    ):  # noqa: ANN001
        if _fusable(name, teacher, student, mask, beta, reduction, chunk_size):
            if chunk_size == 0:  # the library's "one chunk"
                chunk_size = max(1, int(mask.sum()))
            return fused_jsd(
                teacher, student, mask, beta=beta, temperature=temperature, reduction=reduction,
                chunk_rows=chunk_size,
            )  # fmt: skip
        return original(
            name, teacher, student, mask, beta=beta, temperature=temperature, reduction=reduction,
            chunk_size=chunk_size,
        )  # fmt: skip

    gkd.divergence = divergence

    def undo() -> None:
        gkd.divergence = original

    return undo


#: name -> installer returning an undo callable.
PATCHES: dict[str, Callable[[], Callable[[], None]]] = {
    "fused_jsd": patch_fused_jsd,
}


def apply_patches(names: list[str] | tuple[str, ...]) -> Callable[[], None]:
    """Install the named patches; returns one undo for all of them."""
    unknown = [n for n in names if n not in PATCHES]
    if unknown:
        raise ValueError(f"unknown patch(es) {unknown}; choose from {sorted(PATCHES)}")
    undos: list[Any] = [PATCHES[n]() for n in names]

    def undo() -> None:
        for u in reversed(undos):
            u()

    return undo
