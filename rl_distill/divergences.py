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

Sparse teacher signals: :func:`topk_divergence` (and ``topk_forward_kl``, ``topk_reverse_kl``,
``topk_generalized_jsd``) take the teacher's top-k log-probs and ids instead of its logits and
compute the divergence between the two distributions coarse-grained to those k tokens plus one tail
bucket: never above the full value (data-processing inequality), exact at ``k = V``.

Reductions (``reduction=``): ``"token"`` gives the per-position values ``(...)`` with masked positions
set to 0; ``"sequence"`` the mean over each sequence's unmasked tokens (paper Eq. 2, shape ``(B,)``
for inputs ``(B, T, V)``); ``"batch"`` the mean of the sequence values over sequences with at least
one token (the expectation in the paper's objectives); ``"token_mean"`` the sum over all unmasked
tokens divided by their count; ``"sum"`` the plain sum.

Numerics: all math runs in float32 in log space (float32 and bfloat16 inputs alike), with
``0 * log 0 = 0`` handled explicitly, so an underflowing probability or a ``-inf`` logit (e.g. a
padding row of the vocabulary) gives no NaN. Memory: positions are processed in chunks of rows by a
custom autograd function that keeps no per-position temporaries between forward and backward. When
only the student needs a gradient (the teacher fixed: every training loss here), the closed-form
gradient w.r.t. the student logits is written during the forward chunk loop and backward only scales
it by the incoming per-row gradient (nothing is computed twice); otherwise the backward pass
recomputes each chunk with autograd. Either way the extra memory of forward + backward is the
gradient tensor itself (one ``(..., V)`` tensor) plus a few chunk-sized temporaries.
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


# A per-row divergence with its analytic gradient w.r.t. the student's raw logits:
# (N, V), (N, V) -> ((N,), (N, V)).
RowValueAndGrad = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _row_value_and_grad(
    name: str, beta: float, temperature: float, scaled: bool, dtype: torch.dtype = torch.float32
) -> RowValueAndGrad:
    """Per-row divergence and its closed-form gradient w.r.t. the student's logits (teacher fixed).

    With ``log pS = log_softmax(z / tau)`` and ``g_v = dD / d log pS(v)`` (log-probs taken as free),
    ``dD / dz_v = (g_v - pS(v) sum_u g_u) / tau``. Per divergence:

    - forward KL ``KL(pT || pS)``: ``(pS - pT) / tau``;
    - reverse KL ``KL(pS || pT)``: ``pS (log pS - log pT - KL(pS || pT)) / tau``;
    - JSD(beta), ``M = beta pT + (1 - beta) pS``: ``(1 - beta) pS (log pS - log M - KL(pS || M)) / tau``
      (the terms through ``M`` cancel: ``sum_v pT dlog M / dpS + ...`` sums to the mixture's mass);
    - TV ``0.5 sum |pT - pS|``: ``0.5 pS (s - sum_u s_u pS(u)) / tau`` with ``s = sign(pS - pT)``
      (sign(0) = 0, the subgradient autograd takes).

    Zero student probabilities give a zero gradient (like the autograd path's ``0 log 0 = 0``).
    ``tests/test_divergences.py`` checks every case against autograd and ``gradcheck``.
    """
    if name == "jsd":
        if beta == 0.0:
            name = "forward_kl"
        elif beta == 1.0:
            name = "reverse_kl"
    scale = 1.0 / (beta * (1.0 - beta)) if name == "jsd" and scaled else 1.0
    inv_tau = 1.0 / temperature

    def value_and_grad(teacher: Tensor, student: Tensor) -> tuple[Tensor, Tensor]:
        log_t = torch.log_softmax(teacher.to(dtype) / temperature, dim=-1)
        log_s = torch.log_softmax(student.to(dtype) / temperature, dim=-1)
        p_s = log_s.exp()
        zero = torch.zeros((), dtype=dtype, device=log_s.device)
        if name == "forward_kl":
            p_t = log_t.exp()
            value = (p_t * torch.where(p_t > 0, log_t - log_s, zero)).sum(-1)
            grad = (p_s - p_t).mul_(inv_tau)
        elif name == "reverse_kl":
            d = torch.where(p_s > 0, log_s - log_t, zero)
            value = (p_s * d).sum(-1)
            grad = d.sub_(value[:, None]).mul_(p_s).mul_(inv_tau)
        elif name == "jsd":
            floor = -1e30
            log_m = torch.logaddexp(
                log_t.clamp(min=floor) + math.log(beta), log_s.clamp(min=floor) + math.log1p(-beta)
            )
            p_t = log_t.exp()
            kl_t = (p_t * torch.where(p_t > 0, log_t - log_m, zero)).sum(-1)
            del p_t
            d = torch.where(p_s > 0, log_s - log_m, zero)
            del log_m
            kl_s = (p_s * d).sum(-1)
            value = beta * kl_t + (1.0 - beta) * kl_s
            grad = d.sub_(kl_s[:, None]).mul_(p_s).mul_((1.0 - beta) * inv_tau)
        elif name == "tv":
            diff = p_s - log_t.exp()
            value = 0.5 * diff.abs().sum(-1)
            sign = diff.sign_()
            grad = sign.sub_((sign * p_s).sum(-1, keepdim=True)).mul_(p_s).mul_(0.5 * inv_tau)
        else:  # pragma: no cover - guarded by the public functions
            raise ValueError(name)
        if scale != 1.0:
            return value * scale, grad.mul_(scale)
        return value, grad

    return value_and_grad


class _ChunkedRows(torch.autograd.Function):
    """Apply a row divergence to selected rows in chunks, with a fused or a recomputing backward.

    Forward keeps only the inputs (no (N, V) temporaries). With ``value_and_grad`` (a closed-form
    student gradient, :func:`_row_value_and_grad`) and a teacher that needs no gradient, forward
    also fills the student's gradient chunk by chunk and backward scales it in place (used once: a
    second backward through the same graph recomputes). Otherwise backward allocates each input's
    gradient once and fills it chunk by chunk by autograd through ``fn``. Peak extra memory is the
    gradient plus one chunk's work either way.
    """

    @staticmethod
    def forward(ctx, teacher, student, index, fn, chunk_rows, value_and_grad=None):  # type: ignore[override]
        n = index[0].numel()
        dtype = torch.promote_types(torch.promote_types(teacher.dtype, student.dtype), torch.float32)
        out = torch.empty(n, dtype=dtype, device=student.device)
        # Fused path: only the student needs a gradient and the divergence has a closed form. The
        # gradient is written during this loop (one buffer shaped like the student logits, the
        # tensor backward would allocate anyway) and backward only scales it: no chunk is computed
        # twice and no per-chunk graph is built.
        fused = value_and_grad is not None and ctx.needs_input_grad[1] and not ctx.needs_input_grad[0]
        grad = torch.zeros_like(student) if fused else None
        with torch.no_grad():
            for lo in range(0, n, chunk_rows):
                idx = tuple(i[lo : lo + chunk_rows] for i in index)
                if grad is None:
                    out[lo : lo + chunk_rows] = fn(teacher[idx], student[idx])
                else:
                    out[lo : lo + chunk_rows], g = value_and_grad(teacher[idx], student[idx])
                    grad[idx] = g.to(grad.dtype)
        ctx.fused_grad = grad
        # Teacher logits usually come from torch.inference_mode, and inference tensors cannot go
        # through save_for_backward; keep references instead (they are read-only here).
        ctx.inputs = (teacher, student)
        ctx.index, ctx.fn, ctx.chunk_rows = index, fn, chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        teacher, student = ctx.inputs
        need = ctx.needs_input_grad[:2]
        grad, ctx.fused_grad = ctx.fused_grad, None  # used once; a second backward recomputes
        if grad is not None:
            for lo in range(0, grad_out.numel(), ctx.chunk_rows):
                idx = tuple(i[lo : lo + ctx.chunk_rows] for i in ctx.index)
                scale = grad_out[lo : lo + ctx.chunk_rows, None].to(grad.dtype)
                grad[idx] = grad[idx] * scale
            return None, grad, None, None, None, None
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
        return grads[0], grads[1], None, None, None, None


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
    value_and_grad = _row_value_and_grad(name, beta, temperature, scaled, dtype)
    rows = _ChunkedRows.apply(teacher, student, index, fn, chunk_rows, value_and_grad)
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


# ---------------------------------------------------------------------------------------------
# Sparse teacher signals: divergences from the teacher's top-k log-probs plus one tail bucket.
#
# The teacher is known only on its k most likely tokens (``(..., k)`` log-probs and ids: what
# ``RolloutEngine.score(teacher_output="topk")`` returns and what ``rl-distill cache-teacher`` stores).
# Both distributions are coarse-grained to the same k + 1 outcomes: the k teacher tokens, and one
# tail bucket holding the rest of the vocabulary (teacher tail mass ``1 - sum_k pT``, student tail
# mass ``1 - sum_k pS`` on the *same* k ids). The divergence of those two (k + 1)-outcome
# distributions is computed exactly.
#
# Bias: every divergence here is an f-divergence, and coarse-graining (a deterministic map of the
# outcomes) can only lower an f-divergence (data-processing inequality): D_k <= D, with equality at
# k = V and whenever the two distributions agree in shape inside the tail (pT(v) / pT(tail) =
# pS(v) / pS(tail) for every tail token v). The loss therefore under-counts disagreement inside the
# teacher's tail; docs/results/topk_divergence.md measures how much on SmolLM2 (value and gradient).
# ---------------------------------------------------------------------------------------------
#: Smallest teacher tail mass used when k < V: float32 top-k log-probs cannot resolve less next to 1
#: (their sum rounds to 1), and a zero tail would make the reverse KL of a student tail infinite.
TOPK_TAIL_FLOOR = 2.0**-24

#: Names accepted by :func:`topk_divergence` (every divergence of :data:`DIVERGENCES`).
TOPK_DIVERGENCES = DIVERGENCES


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate on both sides of ``-log 2`` (``x = 0`` gives -inf)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_coarse_logprobs(
    teacher_topk_logprobs: Tensor, teacher_topk_ids: Tensor, student_logprobs: Tensor
) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probs on the k + 1 coarse outcomes: the teacher's top-k ids, then the tail.

    Args:
        teacher_topk_logprobs: ``(N, k)`` the teacher's log-probs of its top-k tokens (normalised
            over the full vocabulary).
        teacher_topk_ids: ``(N, k)`` their token ids (distinct within a row).
        student_logprobs: ``(N, V)`` normalised student log-probs.

    Returns:
        ``(log_t, log_s)``, each ``(N, k + 1)``: column ``j < k`` is token ``teacher_topk_ids[:, j]``,
        column ``k`` the tail bucket. At ``k = V`` both tails are ``-inf`` (mass 0). For ``k < V``
        the teacher tail is ``log(1 - sum_k pT)``, at least ``log(TOPK_TAIL_FLOOR)``; the student tail
        is the log-sum-exp of its log-probs off the k ids (exact, not ``1 - sum``). The teacher tail
        can be no more precise than its float32 top-k log-probs: about 1e-7 of absolute mass, so a
        tail of that order carries a relative error (it matters only when nearly all of the
        teacher's mass is in its top-k while the student's is not).
    """
    k, vocab = teacher_topk_ids.shape[-1], student_logprobs.shape[-1]
    ids = teacher_topk_ids.long()
    s_top = student_logprobs.gather(-1, ids)  # (N, k)
    neg_inf = torch.full_like(s_top[..., :1], float("-inf"))  # (N, 1)
    if k >= vocab:
        return torch.cat([teacher_topk_logprobs, neg_inf], -1), torch.cat([s_top, neg_inf], -1)
    rest = student_logprobs.scatter(-1, ids, float("-inf"))  # (N, V): the student off the k ids
    has_rest = torch.isfinite(rest).any(-1, keepdim=True)  # (N, 1)
    # logsumexp of an all -inf row has a NaN gradient: such rows take a dummy row and then -inf.
    s_tail = torch.where(has_rest, torch.where(has_rest, rest, 0.0).logsumexp(-1, keepdim=True), neg_inf)
    with torch.no_grad():  # the teacher's side is a fixed target; float64 keeps the sum's rounding out
        top_mass = teacher_topk_logprobs.double().logsumexp(-1, keepdim=True).clamp(max=0.0)  # (N, 1)
        t_tail = _log1mexp(top_mass).clamp(min=math.log(TOPK_TAIL_FLOOR)).to(teacher_topk_logprobs.dtype)
    return torch.cat([teacher_topk_logprobs, t_tail], -1), torch.cat([s_top, s_tail], -1)


def _topk_row_fn(
    name: str, beta: float, temperature: float, scaled: bool, dtype: torch.dtype
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Per-row coarse-grained divergence: ``(N, k) teacher log-probs, (N, k) ids, (N, V) student logits -> (N,)``."""
    if name == "jsd":
        if beta == 0.0:
            name = "forward_kl"
        elif beta == 1.0:
            name = "reverse_kl"
    scale = 1.0 / (beta * (1.0 - beta)) if name == "jsd" and scaled else 1.0
    bases: dict[str, RowDivergence] = {
        "forward_kl": _forward_kl_rows,
        "reverse_kl": _reverse_kl_rows,
        "jsd": lambda lt, ls: _jsd_rows(lt, ls, beta),
        "tv": _tv_rows,
    }
    base = bases[name]

    def rows(teacher_lp: Tensor, teacher_ids: Tensor, student: Tensor) -> Tensor:
        log_s = torch.log_softmax(student.to(dtype) / temperature, dim=-1)  # (N, V)
        log_t_k, log_s_k = topk_coarse_logprobs(teacher_lp.to(dtype), teacher_ids, log_s)  # (N, k + 1)
        out = base(log_t_k, log_s_k)
        return out * scale if scale != 1.0 else out

    return rows


class _ChunkedTopkRows(torch.autograd.Function):
    """:class:`_ChunkedRows` for top-k teacher signals: gradient w.r.t. the student logits only.

    Forward keeps only the inputs; backward recomputes each chunk and fills the student's gradient
    (one ``(..., V)`` tensor). The teacher's top-k log-probs are a fixed target (no gradient).
    """

    @staticmethod
    def forward(ctx, student, teacher_lp, teacher_ids, index, fn, chunk_rows):  # type: ignore[override]
        n = index[0].numel()
        dtype = torch.promote_types(student.dtype, torch.float32)
        out = torch.empty(n, dtype=dtype, device=student.device)
        with torch.no_grad():
            for lo in range(0, n, chunk_rows):
                idx = tuple(i[lo : lo + chunk_rows] for i in index)
                out[lo : lo + chunk_rows] = fn(teacher_lp[idx], teacher_ids[idx], student[idx])
        ctx.inputs = (student, teacher_lp, teacher_ids)  # may be inference tensors: kept, not saved
        ctx.index, ctx.fn, ctx.chunk_rows = index, fn, chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        student, teacher_lp, teacher_ids = ctx.inputs
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        grad = torch.zeros_like(student)
        for lo in range(0, grad_out.numel(), ctx.chunk_rows):
            idx = tuple(i[lo : lo + ctx.chunk_rows] for i in ctx.index)
            with torch.enable_grad():
                s = student[idx].detach().requires_grad_(True)
                vals = ctx.fn(teacher_lp[idx], teacher_ids[idx], s)
                (chunk_grad,) = torch.autograd.grad(vals, s, grad_out[lo : lo + ctx.chunk_rows])
            grad[idx] = chunk_grad.to(grad.dtype)
        return grad, None, None, None, None, None


def topk_divergence(
    name: str,
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    student: Tensor,
    mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: Reduction = "batch",
    scaled: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """A divergence from the teacher's top-k log-probs plus a tail bucket (see the section comment).

    ``D_k(pT || pS) = D(pT_k || pS_k)`` where ``p_k`` coarse-grains ``p`` to the teacher's k tokens
    and one bucket for the rest (:func:`topk_coarse_logprobs`). Exact at ``k = V``; below, never
    above the full divergence (data-processing inequality). Masking and reductions are those of
    :func:`forward_kl` (paper Eq. 2 for ``"sequence"``).

    The teacher's log-probs are used as given: they carry the teacher's temperature already
    (``RolloutEngine.score(..., teacher_temperature=...)``). ``temperature`` applies to the student's
    logits only. Gradients flow to the student's logits; the teacher's top-k is a fixed target.

    Args:
        name: ``"forward_kl"``, ``"reverse_kl"``, ``"jsd"`` (uses ``beta``) or ``"tv"``.
        teacher_topk_logprobs: ``(..., k)`` the teacher's k largest log-probs (float32 or bfloat16).
        teacher_topk_ids: ``(..., k)`` their token ids, distinct within a row, in ``[0, V)``.
        student: ``(..., V)`` student logits.
        mask: boolean ``(...)``; False positions are ignored.
        beta: JSD(beta) mixture weight of the teacher, in ``[0, 1]`` (0: forward KL, 1: reverse KL).
        temperature: the student's distribution is ``softmax(student / temperature)``.
        reduction: ``"token" | "sequence" | "batch" | "token_mean" | "sum"``.
        scaled: divide JSD(beta) by ``beta (1 - beta)`` (as in :func:`generalized_jsd`).
        chunk_size: rows per chunk; ``None`` picks about 2 MiB per student temporary, ``0`` disables chunking.

    Returns:
        The reduced divergence in nats (float32; float64 for float64 student logits).

    Raises:
        ValueError: an unknown name, mismatched shapes, ``k`` outside ``[1, V]``, ids out of range,
            or a bad ``beta``/``temperature``/``reduction``/``chunk_size``.
    """
    if name not in TOPK_DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join(TOPK_DIVERGENCES)}")
    if teacher_topk_logprobs.shape != teacher_topk_ids.shape:
        raise ValueError(
            f"teacher_topk_logprobs {tuple(teacher_topk_logprobs.shape)} and teacher_topk_ids "
            f"{tuple(teacher_topk_ids.shape)} must have the same shape (..., k)"
        )
    if student.dim() < 1 or teacher_topk_ids.shape[:-1] != student.shape[:-1]:
        raise ValueError(
            f"teacher top-k (..., k) {tuple(teacher_topk_ids.shape)} and student logits (..., V) "
            f"{tuple(student.shape)} must share their leading dimensions"
        )
    k, vocab = teacher_topk_ids.shape[-1], student.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k width k must be in [1, V={vocab}], got {k}")
    if teacher_topk_ids.numel() and (int(teacher_topk_ids.min()) < 0 or int(teacher_topk_ids.max()) >= vocab):
        raise ValueError(f"teacher_topk_ids must lie in [0, V={vocab}) (the student's vocabulary)")
    if student.dim() == 1:  # a single distribution: one position
        if reduction in ("sequence", "batch"):
            raise ValueError(f"reduction={reduction!r} needs inputs with a sequence axis, shape (..., T, V)")
        one = None if mask is None else mask.reshape(1)
        return topk_divergence(
            name, teacher_topk_logprobs[None], teacher_topk_ids[None], student[None], one, beta=beta,
            temperature=temperature, reduction=reduction, scaled=scaled, chunk_size=chunk_size,
        ).reshape(())  # fmt: skip
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    lead = student.shape[:-1]
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=student.device)
    elif mask.shape != lead:
        raise ValueError(
            f"mask must have shape {tuple(lead)} (the logits without V), got {tuple(mask.shape)}"
        )
    mask = mask.to(device=student.device, dtype=torch.bool)
    if chunk_size is None:
        chunk_rows = max(1, DEFAULT_CHUNK_ELEMENTS // vocab)
    elif chunk_size == 0:
        chunk_rows = max(1, int(mask.sum()))
    elif chunk_size > 0:
        chunk_rows = chunk_size
    else:
        raise ValueError(
            f"chunk_size must be None, 0 (no chunking) or a positive row count, got {chunk_size}"
        )
    dtype = torch.promote_types(student.dtype, torch.float32)
    fn = _topk_row_fn(name, beta, temperature, scaled, dtype)
    index = mask.nonzero(as_tuple=True)  # only unmasked rows are ever computed
    rows = _ChunkedTopkRows.apply(student, teacher_topk_logprobs, teacher_topk_ids, index, fn, chunk_rows)
    values = torch.zeros(lead, dtype=dtype, device=student.device).index_put(index, rows)
    return _reduce(values, mask, reduction)


def topk_forward_kl(
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    student: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "batch",
    chunk_size: int | None = None,
) -> Tensor:
    """Forward KL ``KL(pT_k || pS_k)`` on the teacher's top-k plus a tail bucket (args: :func:`topk_divergence`)."""
    return topk_divergence(
        "forward_kl", teacher_topk_logprobs, teacher_topk_ids, student, mask, temperature=temperature,
        reduction=reduction, chunk_size=chunk_size,
    )  # fmt: skip


def topk_reverse_kl(
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    student: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "batch",
    chunk_size: int | None = None,
) -> Tensor:
    """Reverse KL ``KL(pS_k || pT_k)`` on the teacher's top-k plus a tail bucket (args: :func:`topk_divergence`)."""
    return topk_divergence(
        "reverse_kl", teacher_topk_logprobs, teacher_topk_ids, student, mask, temperature=temperature,
        reduction=reduction, chunk_size=chunk_size,
    )  # fmt: skip


def topk_generalized_jsd(
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    student: Tensor,
    mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: Reduction = "batch",
    scaled: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Generalized ``JSD(beta)`` (GKD paper, Eq. 1) on the teacher's top-k plus a tail bucket (:func:`topk_divergence`)."""
    return topk_divergence(
        "jsd", teacher_topk_logprobs, teacher_topk_ids, student, mask, beta=beta, temperature=temperature,
        reduction=reduction, scaled=scaled, chunk_size=chunk_size,
    )  # fmt: skip
