"""Benchmark-local prototypes of the changes recommended in docs/results/performance.md.

Nothing in ``rl_distill`` is edited: the benchmarks apply these as monkeypatches inside their own
worker process (``BenchSpec.patches``) to measure what a change would gain end to end.

- ``inverse_cdf_sampling``: ``torch.multinomial(probs, 1)`` on a ``(B, V)`` matrix replaced by
  inverse-CDF sampling (float64 cumulative sum, one uniform per row, ``searchsorted``). On CPU,
  ``multinomial`` draws one exponential variate per vocabulary entry (``exponential_`` on
  ``B x V`` values, about 4 ms per call at ``B=4, V=49152``); the inverse CDF draws ``B`` uniforms.
  Same distribution (exact up to float64 rounding of the cumulative sum); a different random stream.
- ``fused_jsd``: the GKD agent's JSD(beta) (``0 < beta < 1``) computed by :class:`FusedGradJSD`,
  which writes the analytic gradient w.r.t. the student logits during the forward chunk loop, so
  backward recomputes nothing (the shipped chunked function recomputes every chunk with autograd).
- ``small_chunks``: ``rl_distill.divergences.DEFAULT_CHUNK_ELEMENTS`` (and the fused prototype's)
  set to ``2**20`` instead of ``2**22``: 4 MiB instead of 16 MiB per chunk temporary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

#: Rows per chunk when none is given: about 2**22 float32 elements per temporary, as the library.
DEFAULT_CHUNK_ELEMENTS = 2**22


class FusedGradJSD(torch.autograd.Function):
    """Generalized JSD(beta) of selected rows; the gradient w.r.t. the student logits is made in forward.

    With ``M = beta pT + (1 - beta) pS`` and student logits ``z`` at temperature ``tau``:
    ``dJSD/dz = (1 - beta) / tau * pS * (log pS - log M - KL(pS || M))``. The forward chunk loop
    writes that gradient into one buffer shaped like the student logits (the tensor backward would
    allocate anyway); backward scales it in place by the incoming per-row gradient. Nothing is
    recomputed and no per-chunk autograd graph is built.

    Args (of ``apply``): teacher ``(..., V)``, student ``(..., V)``, ``index`` (a tuple of index
    tensors selecting the rows, as ``mask.nonzero(as_tuple=True)``), beta in (0, 1), temperature,
    rows per chunk. Returns the per-row divergence ``(N,)`` in float32.
    """

    @staticmethod
    def forward(ctx, teacher, student, index, beta, temperature, chunk_rows):  # type: ignore[override]  # noqa: ANN001
        n = index[0].numel()
        out = torch.empty(n, dtype=torch.float32, device=student.device)
        grad = torch.zeros_like(student) if student.requires_grad else None
        lb, l1b = math.log(beta), math.log1p(-beta)
        for lo in range(0, n, chunk_rows):
            idx = tuple(i[lo : lo + chunk_rows] for i in index)
            log_t = torch.log_softmax(teacher[idx].float() / temperature, -1)
            log_s = torch.log_softmax(student[idx].float() / temperature, -1)
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
        if grad is not None:
            ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]  # noqa: ANN001
        if not ctx.has_grad:
            return None, None, None, None, None, None
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
    """JSD(beta) over ``(B, T, V)`` logits with a ``(B, T)`` mask; ``sequence`` or ``batch`` reduction (Eq. 2)."""
    if not 0.0 < beta < 1.0:
        raise ValueError("the fused prototype covers 0 < beta < 1 only")
    rows = chunk_rows or max(1, DEFAULT_CHUNK_ELEMENTS // student.shape[-1])
    mask = mask.to(device=student.device, dtype=torch.bool)
    index = mask.nonzero(as_tuple=True)
    per_row = FusedGradJSD.apply(teacher, student, index, beta, temperature, rows)
    values = torch.zeros(mask.shape, dtype=torch.float32, device=student.device).index_put(index, per_row)
    lengths = mask.sum(-1)
    per_seq = values.sum(-1) / lengths.clamp(min=1)
    if reduction == "sequence":
        return per_seq
    if reduction == "batch":
        return per_seq.sum() / (lengths > 0).sum().clamp(min=1)
    raise ValueError(f"unsupported reduction {reduction!r}")


def _inverse_cdf_multinomial(original: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def multinomial(input: Tensor, num_samples: int, replacement: bool = False, *, generator=None, out=None):  # noqa: ANN001, A002
        if num_samples != 1 or input.dim() != 2 or out is not None:
            return original(input, num_samples, replacement, generator=generator, out=out)
        cdf = input.double().cumsum(-1)
        u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=torch.float64, device=cdf.device)
        # right=True: the first index whose cumulative mass exceeds u, so zero-probability tokens never win.
        return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)

    return multinomial


def patch_inverse_cdf_sampling() -> Callable[[], None]:
    """Replace ``torch.multinomial`` (one sample per row) by inverse-CDF sampling; returns the undo."""
    original = torch.multinomial
    torch.multinomial = _inverse_cdf_multinomial(original)

    def undo() -> None:
        torch.multinomial = original

    return undo


def patch_fused_jsd() -> Callable[[], None]:
    """Route the GKD agent's ``divergence("jsd", ...)`` through :func:`fused_jsd`; returns the undo."""
    import rl_distill.agents.gkd as gkd

    original = gkd.divergence

    def divergence(name, teacher, student, mask=None, *, beta=0.5, temperature=1.0, reduction="batch", **kw):  # noqa: ANN001
        if name == "jsd" and 0.0 < beta < 1.0 and mask is not None and reduction in ("sequence", "batch"):
            return fused_jsd(teacher, student, mask, beta=beta, temperature=temperature, reduction=reduction)
        return original(
            name, teacher, student, mask, beta=beta, temperature=temperature, reduction=reduction, **kw
        )

    gkd.divergence = divergence

    def undo() -> None:
        gkd.divergence = original

    return undo


#: The smaller chunk recommended for ``rl_distill.divergences.DEFAULT_CHUNK_ELEMENTS`` (4 MiB temporaries).
SMALL_CHUNK_ELEMENTS = 2**20


def patch_small_chunks() -> Callable[[], None]:
    """Set the divergences' (and the fused prototype's) chunk to 2**20 elements; returns the undo."""
    import rl_distill.divergences as div

    global DEFAULT_CHUNK_ELEMENTS
    original = (div.DEFAULT_CHUNK_ELEMENTS, DEFAULT_CHUNK_ELEMENTS)
    div.DEFAULT_CHUNK_ELEMENTS = DEFAULT_CHUNK_ELEMENTS = SMALL_CHUNK_ELEMENTS

    def undo() -> None:
        global DEFAULT_CHUNK_ELEMENTS
        div.DEFAULT_CHUNK_ELEMENTS, DEFAULT_CHUNK_ELEMENTS = original

    return undo


#: name -> installer returning an undo callable.
PATCHES: dict[str, Callable[[], Callable[[], None]]] = {
    "inverse_cdf_sampling": patch_inverse_cdf_sampling,
    "fused_jsd": patch_fused_jsd,
    "small_chunks": patch_small_chunks,
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
