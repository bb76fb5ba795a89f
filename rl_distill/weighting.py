"""Token importance weighting (TIP): which completion tokens carry the learning signal.

Tutorial ch. 7, "Pillar 1: Token Importance Weighting": the score of position ``t`` is

    ``w_t = (1 - H(pT(.|y<t)) / log V) * KL(pT(.|y<t) || pS(.|y<t))``

high where the teacher is confident (low entropy ``H``, normalised by its maximum ``log V``) *and*
the student disagrees with it (forward KL). Tokens where both agree, or where the teacher itself is
unsure, score low.

Pieces (pure functions over ``(B, T)`` tensors and a mask; no trainer state):

- :func:`token_importance` scores from teacher and student logits ``(B, T, V)`` (float32 log-space
  math, chunked over positions, detached: the score is a weight, not a loss);
  :func:`importance_from_stats` the same formula from precomputed ``(H, KL)`` and ``V``.
- :func:`importance_weights` turns scores into multiplicative per-token weights, raw or
  normalised to mean 1 over the unmasked tokens of the batch or of each sequence.
- :func:`importance_filter` keeps the tokens with ``w_t >= threshold`` and reports the kept fraction.
- :func:`weighted_token_mean` is the loss normaliser to pair with them: it divides by the kept
  token count (or the weight sum), so skipped tokens do not dilute the loss, and gives 0 (with a
  zero gradient), not NaN, when nothing is kept.

Wiring (for agents): after the teacher has scored the rollout (``teacher_output="full"``), with the
student's logits at the completion positions::

    scores = token_importance(rollout.teacher_logits, student_logits, rollout.completion_mask)
    keep, kept_fraction = importance_filter(scores, rollout.completion_mask, threshold=0.3)
    loss = weighted_token_mean(per_token_loss, keep)                    # filtering, or
    loss = weighted_token_mean(per_token_loss, mask, importance_weights(scores, mask))  # weighting

With :func:`weighted_token_mean` the normalisation of the weights cancels (it divides by their
sum); it matters for reductions that divide by the token count instead, such as
``agents.base.sequence_loss`` or :func:`rl_distill.divergences.forward_kl` with ``"token_mean"``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from rl_distill.divergences import DEFAULT_CHUNK_ELEMENTS

Normalize = Literal["none", "batch", "sequence"]


def importance_from_stats(entropy: Tensor | float, kl: Tensor | float, vocab_size: int) -> Tensor:
    """TIP score from the teacher entropy ``H`` and ``KL(pT || pS)`` at each position (tutorial ch. 7).

    ``w = (1 - H / log V) * KL``; the confidence factor is clamped at 0 (``H <= log V`` up to
    rounding).

    Args:
        entropy: teacher entropy in nats, any shape.
        kl: forward KL in nats, broadcastable with ``entropy``.
        vocab_size: ``V`` (at least 2).

    Returns:
        float32 scores of the broadcast shape.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    h = torch.as_tensor(entropy, dtype=torch.float32)
    d = torch.as_tensor(kl, dtype=torch.float32)
    confidence = (1.0 - h / math.log(vocab_size)).clamp(min=0.0)
    return confidence * d


@torch.no_grad()
def teacher_entropy_and_kl(
    teacher: Tensor,
    student: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Teacher entropy ``H(pT)`` and ``KL(pT || pS)`` per position, in one pass over the logits.

    Args:
        teacher: teacher logits ``(..., V)``.
        student: student logits ``(..., V)``.
        mask: boolean ``(...)``; masked positions are never computed and hold 0.
        temperature: both distributions are ``softmax(logits / temperature)``.
        chunk_size: positions per chunk (``None``: about 2 MiB per float32 temporary; 0: one chunk).

    Returns:
        ``(H, KL)``, each float32 ``(...)``, detached.
    """
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher and student logits must have the same shape (..., V); got {tuple(teacher.shape)} "
            f"and {tuple(student.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead, vocab = teacher.shape[:-1], teacher.shape[-1]
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=teacher.device)
    elif mask.shape != lead:
        raise ValueError(
            f"mask must have shape {tuple(lead)} (the logits without V), got {tuple(mask.shape)}"
        )
    index = mask.to(device=teacher.device, dtype=torch.bool).nonzero(as_tuple=True)
    n = index[0].numel()
    if chunk_size is None:
        rows = max(1, DEFAULT_CHUNK_ELEMENTS // vocab)
    elif chunk_size == 0:
        rows = max(1, n)  # a single chunk, as in rl_distill.divergences
    elif chunk_size > 0:
        rows = chunk_size
    else:
        raise ValueError(
            f"chunk_size must be None, 0 (no chunking) or a positive row count, got {chunk_size}"
        )
    ent = torch.zeros(n, dtype=torch.float32, device=teacher.device)
    kl = torch.zeros(n, dtype=torch.float32, device=teacher.device)
    zero = torch.zeros((), dtype=torch.float32, device=teacher.device)
    for lo in range(0, n, rows):
        idx = tuple(i[lo : lo + rows] for i in index)
        log_t = torch.log_softmax(teacher[idx].float() / temperature, dim=-1)  # (N, V)
        log_s = torch.log_softmax(student[idx].float() / temperature, dim=-1)  # (N, V)
        p_t = log_t.exp()
        # 0 log 0 = 0: where() on the log terms, so a -inf logit (padding row) gives no NaN.
        ent[lo : lo + rows] = -(p_t * torch.where(p_t > 0, log_t, zero)).sum(-1)
        kl[lo : lo + rows] = (p_t * torch.where(p_t > 0, log_t - log_s, zero)).sum(-1)
    h_out = torch.zeros(lead, dtype=torch.float32, device=teacher.device).index_put(index, ent)
    kl_out = torch.zeros(lead, dtype=torch.float32, device=teacher.device).index_put(index, kl)
    return h_out, kl_out


@torch.no_grad()
def token_importance(
    teacher: Tensor,
    student: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """TIP scores ``w_t = (1 - H(pT) / log V) * KL(pT || pS)`` from logits (tutorial ch. 7).

    Args:
        teacher: teacher logits ``(B, T, V)`` (any leading shape).
        student: student logits ``(B, T, V)``.
        mask: boolean ``(B, T)``, True on completion tokens; masked positions score 0.
        temperature: both distributions are ``softmax(logits / temperature)`` (use the loss's).
        vocab_size: ``V`` in ``log V``; default the logits' last dimension.
        chunk_size: positions per chunk (``None``: about 2 MiB per float32 temporary).

    Returns:
        float32 ``(B, T)`` scores, >= 0, detached.
    """
    entropy, kl = teacher_entropy_and_kl(
        teacher, student, mask, temperature=temperature, chunk_size=chunk_size
    )
    return importance_from_stats(entropy, kl, vocab_size or teacher.shape[-1])


def importance_weights(scores: Tensor, mask: Tensor, *, normalize: Normalize = "batch") -> Tensor:
    """Per-token multiplicative weights from TIP scores: ``(B, T) -> (B, T)``, 0 where masked.

    Args:
        scores: ``(B, T)`` scores (>= 0), e.g. from :func:`token_importance`.
        mask: ``(B, T)`` True on tokens that count.
        normalize: ``"none"``: the raw scores; ``"batch"``: divided by their mean over all unmasked
            tokens (mean weight 1, so a token-count normaliser keeps the loss scale);
            ``"sequence"``: divided by each sequence's own mean (every sequence keeps its total
            weight = its length). Where all scores of the group are 0 the weights are 0.

    Returns:
        float32 weights, detached.
    """
    m = mask.to(torch.bool)
    w = torch.where(m, scores.detach().float(), torch.zeros((), device=scores.device))  # (B, T)
    if normalize == "none":
        return w
    if normalize == "batch":
        total, count = w.sum(), m.sum()
    elif normalize == "sequence":
        total, count = w.sum(-1, keepdim=True), m.sum(-1, keepdim=True)  # (B, 1)
    else:
        raise ValueError(f"normalize must be 'none', 'batch' or 'sequence', got {normalize!r}")
    mean = total / count.clamp(min=1)
    return torch.where(mean > 0, w / mean.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(w))


def importance_filter(scores: Tensor, mask: Tensor, threshold: float) -> tuple[Tensor, float]:
    """Keep the tokens whose TIP score is at least ``threshold`` (tutorial ch. 7: 0.3 in the example).

    Args:
        scores: ``(B, T)`` scores.
        mask: ``(B, T)`` True on tokens that count.
        threshold: smallest kept score.

    Returns:
        ``(keep, kept_fraction)``: boolean ``(B, T)`` ``mask & (scores >= threshold)``, and the kept
        share of the unmasked tokens (0.0 if there are none).
    """
    m = mask.to(torch.bool)
    keep = m & (scores.detach() >= threshold)
    total = int(m.sum())
    return keep, (int(keep.sum()) / total if total else 0.0)


def weighted_token_mean(values: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """``sum(w * values) / sum(w)`` over the positions where ``mask`` is True.

    With ``weights=None`` this is the mean over the kept tokens (divided by their count, never by
    the tokens a filter skipped). Masked positions are excluded even if they hold NaN or inf. When
    no token is kept (or the weights sum to 0) the result is 0 and its gradient is 0: no NaN.

    Args:
        values: ``(B, T)`` per-token values (e.g. losses; gradients flow through them).
        mask: ``(B, T)`` True on kept tokens (e.g. the ``keep`` of :func:`importance_filter`).
        weights: ``(B, T)`` non-negative weights (treated as constants), or None for 1.

    Returns:
        A scalar in the dtype of ``values``.
    """
    m = mask.to(torch.bool)
    w = m.to(values.dtype) if weights is None else torch.where(m, weights.detach().to(values.dtype), 0.0)
    safe = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device))
    num, den = (w * safe).sum(), w.sum()
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), num * 0.0)
