"""Token-level divergences between teacher and student next-token distributions.

Every function takes ``teacher`` and ``student`` logits (or log-probabilities: ``log_softmax`` of
log-probs is the identity) of shape ``(..., V)`` and an optional boolean ``mask`` of shape ``(...)``,
and returns the divergence of each *teacher-vs-student* pair with the direction in the name:

- :func:`forward_kl` ``KL(pT || pS) = sum_v pT (log pT - log pS)`` (mode covering; supervised KD),
- :func:`reverse_kl` ``KL(pS || pT)`` (mode seeking; what REINFORCE on teacher log-probs estimates),
- :func:`generalized_jsd` ``JSD(beta) = beta KL(pT || M) + (1 - beta) KL(pS || M)`` with
  ``M = beta pT + (1 - beta) pS`` (GKD paper, Eq. 1). The raw value goes to 0 at both ends, so the
  endpoints are defined explicitly: ``beta = 0`` is forward KL and ``beta = 1`` reverse KL;
  ``scaled=True`` divides by ``beta (1 - beta)``, which is continuous into those endpoints,
- :func:`total_variation` ``TV = 0.5 sum_v |pT - pS|``.

Reductions (``reduction=``): ``"token"`` gives the per-position values ``(...)`` with masked positions
set to 0; ``"sequence"`` the mean over each sequence's unmasked tokens (paper Eq. 2, shape ``(B,)``
for inputs ``(B, T, V)``); ``"batch"`` the mean of the sequence values over sequences with at least
one token (the expectation in the paper's objectives); ``"token_mean"`` the sum over all unmasked
tokens divided by their count; ``"sum"`` the plain sum.

Numerics: all math runs in float32 in log space (float32 and bfloat16 inputs alike), with
``0 * log 0 = 0`` handled explicitly, so an underflowing probability or a ``-inf`` logit (e.g. a
padding row of the vocabulary) gives no NaN. Memory: positions are processed in chunks of rows by a
custom autograd function that keeps no per-position temporaries between forward and backward: the
backward pass recomputes each chunk. The extra memory of forward + backward is the gradient tensor
itself (one ``(..., V)`` tensor) plus a few chunk-sized temporaries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["token", "sequence", "batch", "token_mean", "sum"]
_REDUCTIONS = ("token", "sequence", "batch", "token_mean", "sum")

#: Elements per chunk (rows x vocabulary): 2**19 float32 values = 2 MiB per temporary (docs/results/performance.md: meets the 1.5x memory target, and is faster than 2**22).
DEFAULT_CHUNK_ELEMENTS = 2**19

# A per-row divergence on float32 log-probabilities: (N, V), (N, V) -> (N,).
RowDivergence = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------
# Per-row divergences on normalised float32 log-probs. Pure functions; the public wrappers below
# add temperature, masking, chunking and reductions.
# ---------------------------------------------------------------------------------------------
def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row, with 0 log 0 = 0 and no NaN gradient where p == 0."""
    p = log_p.exp()
    # where() on the difference, not on the product: the unselected branch may hold -inf - x, and a
    # product's backward would multiply that by 0 and give NaN.
    diff = torch.where(p > 0, log_p - log_q, torch.zeros((), dtype=log_p.dtype, device=log_p.device))
    return (p * diff).sum(-1)


def _forward_kl_rows(log_t: Tensor, log_s: Tensor) -> Tensor:
    return _kl_rows(log_t, log_s)


def _reverse_kl_rows(log_t: Tensor, log_s: Tensor) -> Tensor:
    return _kl_rows(log_s, log_t)


def _jsd_rows(log_t: Tensor, log_s: Tensor, beta: float) -> Tensor:
    # log M = log(beta pT + (1 - beta) pS), built with logaddexp: no extra stacked (N, 2, V) tensor.
    # logaddexp(-inf, -inf) has a NaN gradient, so zero probabilities enter as a huge negative
    # finite number instead (their weight in M is exp(-1e30) = 0 either way).
    floor = -1e30
    log_m = torch.logaddexp(
        log_t.clamp(min=floor) + math.log(beta), log_s.clamp(min=floor) + math.log1p(-beta)
    )
    return beta * _kl_rows(log_t, log_m) + (1.0 - beta) * _kl_rows(log_s, log_m)


def _tv_rows(log_t: Tensor, log_s: Tensor) -> Tensor:
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)


def _row_fn(
    name: str, beta: float, temperature: float, scaled: bool, dtype: torch.dtype = torch.float32
) -> RowDivergence:
    """Per-row divergence on raw logits: temperature, log-softmax in ``dtype``, then the divergence."""
    if name == "jsd":
        if beta == 0.0:
            name = "forward_kl"
        elif beta == 1.0:
            name = "reverse_kl"
    scale = 1.0 / (beta * (1.0 - beta)) if name == "jsd" and scaled else 1.0
    base: RowDivergence
    if name == "forward_kl":
        base = _forward_kl_rows
    elif name == "reverse_kl":
        base = _reverse_kl_rows
    elif name == "jsd":

        def base(lt: Tensor, ls: Tensor) -> Tensor:
            return _jsd_rows(lt, ls, beta)

    elif name == "tv":
        base = _tv_rows
    else:  # pragma: no cover - guarded by the public functions
        raise ValueError(name)

    def rows(teacher: Tensor, student: Tensor) -> Tensor:
        log_t = torch.log_softmax(teacher.to(dtype) / temperature, dim=-1)
        log_s = torch.log_softmax(student.to(dtype) / temperature, dim=-1)
        out = base(log_t, log_s)
        return out * scale if scale != 1.0 else out

    return rows


class _ChunkedRows(torch.autograd.Function):
    """Apply a row divergence to selected rows in chunks; recompute chunks in backward.

    Forward keeps only the inputs (no (N, V) temporaries). Backward allocates each input's gradient
    once and fills it chunk by chunk, so peak extra memory is the gradient plus one chunk's work.
    """

    @staticmethod
    def forward(ctx, teacher, student, index, fn, chunk_rows):  # type: ignore[override]
        n = index[0].numel()
        dtype = torch.promote_types(torch.promote_types(teacher.dtype, student.dtype), torch.float32)
        out = torch.empty(n, dtype=dtype, device=student.device)
        with torch.no_grad():
            for lo in range(0, n, chunk_rows):
                idx = tuple(i[lo : lo + chunk_rows] for i in index)
                out[lo : lo + chunk_rows] = fn(teacher[idx], student[idx])
        # Teacher logits usually come from torch.inference_mode, and inference tensors cannot go
        # through save_for_backward; keep references instead (they are read-only here).
        ctx.inputs = (teacher, student)
        ctx.index, ctx.fn, ctx.chunk_rows = index, fn, chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        teacher, student = ctx.inputs
        need = ctx.needs_input_grad[:2]
        grads = [torch.zeros_like(x) if req else None for x, req in zip((teacher, student), need)]
        n = grad_out.numel()
        for lo in range(0, n, ctx.chunk_rows):
            idx = tuple(i[lo : lo + ctx.chunk_rows] for i in ctx.index)
            with torch.enable_grad():
                t = teacher[idx].detach().requires_grad_(need[0])
                s = student[idx].detach().requires_grad_(need[1])
                vals = ctx.fn(t, s)
                wrt = [x for x, req in zip((t, s), need) if req]
                chunk_grads = torch.autograd.grad(vals, wrt, grad_out[lo : lo + ctx.chunk_rows])
            it = iter(chunk_grads)
            for k in range(2):
                if need[k]:
                    grads[k][idx] = next(it).to(grads[k].dtype)
        return grads[0], grads[1], None, None, None


def _reduce(values: Tensor, mask: Tensor, reduction: Reduction) -> Tensor:
    """Reduce per-position values (masked positions already 0) with the given reduction."""
    if reduction == "token":
        return values
    if reduction == "sum":
        return values.sum()
    count = mask.sum()
    if reduction == "token_mean":
        return values.sum() / count.clamp(min=1)
    lengths = mask.sum(-1)  # (...,)
    per_seq = values.sum(-1) / lengths.clamp(min=1)  # paper Eq. 2; empty sequences give 0
    if reduction == "sequence":
        return per_seq
    # "batch": average over sequences that have at least one token.
    has_tokens = lengths > 0
    return per_seq.sum() / has_tokens.sum().clamp(min=1)


def _divergence(
    name: str,
    teacher: Tensor,
    student: Tensor,
    mask: Tensor | None,
    *,
    beta: float,
    temperature: float,
    reduction: Reduction,
    scaled: bool,
    chunk_size: int | None,
) -> Tensor:
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher and student logits must have the same shape (..., V); got {tuple(teacher.shape)} "
            f"and {tuple(student.shape)} (different vocabularies? cut both to the shared tokenizer's size)"
        )
    if teacher.dim() < 1:
        raise ValueError("logits need at least one dimension (the vocabulary)")
    if teacher.dim() == 1:  # a single distribution: treat it as one position
        if reduction in ("sequence", "batch"):
            raise ValueError(f"reduction={reduction!r} needs inputs with a sequence axis, shape (..., T, V)")
        if mask is not None and mask.shape != ():
            raise ValueError(f"mask must have shape () for a single distribution, got {tuple(mask.shape)}")
        one = None if mask is None else mask.reshape(1)
        return _divergence(
            name, teacher[None], student[None], one, beta=beta, temperature=temperature,
            reduction=reduction, scaled=scaled, chunk_size=chunk_size,
        ).reshape(())  # fmt: skip
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    lead = teacher.shape[:-1]
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=student.device)
    elif mask.shape != lead:
        raise ValueError(
            f"mask must have shape {tuple(lead)} (the logits without V), got {tuple(mask.shape)}"
        )
    mask = mask.to(device=student.device, dtype=torch.bool)
    vocab = teacher.shape[-1]
    if chunk_size is None:
        chunk_rows = max(1, DEFAULT_CHUNK_ELEMENTS // vocab)
    elif chunk_size == 0:
        chunk_rows = max(1, int(mask.sum()))  # a single chunk: everything at once
    elif chunk_size > 0:
        chunk_rows = chunk_size
    else:
        raise ValueError(
            f"chunk_size must be None, 0 (no chunking) or a positive row count, got {chunk_size}"
        )

    # float32 for float32/bfloat16/float16 inputs; float64 inputs stay float64 (no silent downcast).
    dtype = torch.promote_types(torch.promote_types(teacher.dtype, student.dtype), torch.float32)
    fn = _row_fn(name, beta, temperature, scaled, dtype)
    index = mask.nonzero(as_tuple=True)  # only unmasked rows are ever computed
    rows = _ChunkedRows.apply(teacher, student, index, fn, chunk_rows)
    values = torch.zeros(lead, dtype=dtype, device=student.device)
    values = values.index_put(index, rows)
    return _reduce(values, mask, reduction)


def forward_kl(
    teacher: Tensor,
    student: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "batch",
    chunk_size: int | None = None,
) -> Tensor:
    """Forward KL ``KL(pT || pS) = sum_v pT(v) (log pT(v) - log pS(v))`` per position, then reduced.

    Equals ``F.kl_div(log pS, log pT, log_target=True, reduction="none").sum(-1)``: note that
    ``F.kl_div`` takes the *student* log-probs first and computes ``KL(target || input)``.

    Args:
        teacher: teacher logits or log-probs, ``(..., V)``.
        student: student logits or log-probs, ``(..., V)``.
        mask: boolean ``(...)``; False positions are ignored (as if dropped).
        temperature: both distributions are ``softmax(logits / temperature)``.
        reduction: ``"token" | "sequence" | "batch" | "token_mean" | "sum"`` (see module docstring).
        chunk_size: rows per chunk; ``None`` picks about 2 MiB per temporary, ``0`` disables chunking.

    Returns:
        The reduced divergence in nats (float32).
    """
    return _divergence(
        "forward_kl", teacher, student, mask, beta=0.0, temperature=temperature, reduction=reduction,
        scaled=False, chunk_size=chunk_size,
    )  # fmt: skip


def reverse_kl(
    teacher: Tensor,
    student: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "batch",
    chunk_size: int | None = None,
) -> Tensor:
    """Reverse KL ``KL(pS || pT) = sum_v pS(v) (log pS(v) - log pT(v))`` per position, then reduced.

    Args are as for :func:`forward_kl`; the argument order stays (teacher, student).
    """
    return _divergence(
        "reverse_kl", teacher, student, mask, beta=1.0, temperature=temperature, reduction=reduction,
        scaled=False, chunk_size=chunk_size,
    )  # fmt: skip


def generalized_jsd(
    teacher: Tensor,
    student: Tensor,
    mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: Reduction = "batch",
    scaled: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Generalized Jensen-Shannon divergence ``JSD(beta)`` (GKD paper, Eq. 1).

    ``JSD(beta) = beta KL(pT || M) + (1 - beta) KL(pS || M)`` with ``M = beta pT + (1 - beta) pS``.
    ``JSD(0.5)`` is the symmetric Jensen-Shannon divergence (at most ``log 2``). The raw value tends
    to 0 at both ends, so the endpoints are defined as the limits of the scaled form:
    ``beta = 0`` returns :func:`forward_kl` and ``beta = 1`` returns :func:`reverse_kl`.

    Args:
        teacher: teacher logits or log-probs, ``(..., V)``.
        student: student logits or log-probs, ``(..., V)``.
        mask: boolean ``(...)``; False positions are ignored.
        beta: mixture weight of the teacher in ``M``, in ``[0, 1]``.
        temperature: both distributions are ``softmax(logits / temperature)``.
        reduction: ``"token" | "sequence" | "batch" | "token_mean" | "sum"``.
        scaled: divide by ``beta (1 - beta)`` so the value tends to forward KL as ``beta -> 0`` and
            to reverse KL as ``beta -> 1`` (ignored at the endpoints, which are the KLs already).
        chunk_size: rows per chunk; ``None`` picks about 2 MiB per temporary, ``0`` disables chunking.
    """
    return _divergence(
        "jsd", teacher, student, mask, beta=beta, temperature=temperature, reduction=reduction,
        scaled=scaled, chunk_size=chunk_size,
    )  # fmt: skip


def total_variation(
    teacher: Tensor,
    student: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "batch",
    chunk_size: int | None = None,
) -> Tensor:
    """Total variation distance ``0.5 sum_v |pT(v) - pS(v)|`` (in [0, 1]) per position, then reduced."""
    return _divergence(
        "tv", teacher, student, mask, beta=0.5, temperature=temperature, reduction=reduction,
        scaled=False, chunk_size=chunk_size,
    )  # fmt: skip


#: Names accepted by :func:`divergence` (and by configs).
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv")


def divergence(
    name: str,
    teacher: Tensor,
    student: Tensor,
    mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: Reduction = "batch",
    chunk_size: int | None = None,
) -> Tensor:
    """Dispatch by name: ``"forward_kl"``, ``"reverse_kl"``, ``"jsd"`` (uses ``beta``) or ``"tv"``.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join(DIVERGENCES)}")
    return _divergence(
        name, teacher, student, mask, beta=beta if name == "jsd" else (0.0 if name == "forward_kl" else 1.0),
        temperature=temperature, reduction=reduction, scaled=False, chunk_size=chunk_size,
    )  # fmt: skip
