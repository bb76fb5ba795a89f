"""Flawed-prefix rejection: drop degenerate student samples before the teacher scores them.

Tutorial ch. 7, "Pillar 3: Flawed Prefix Detection": when the student produces garbage (loops such
as "the the the the", word salad) the teacher's feedback on it is noise, and training on it harms
the student. Such samples are recognised from the student's own outputs, so they can be dropped
*before* the teacher's forward pass (saving that compute too). Three per-sequence criteria, each
over the completion tokens only (``Rollout.completion_mask``):

- **perplexity** :func:`sequence_perplexity`: ``exp(-mean_t log pS(y_t))`` from ``Rollout.logprobs``
  (the sampler's log-probs at the sampling temperature). Rejected when ``> max_perplexity``; the
  tutorial suggests 100-500 for subword vocabularies. A NaN perplexity is rejected too. An empty
  completion has perplexity 1.
- **loop** :func:`max_ngram_repeats`: the largest number of *consecutive* copies of any n-gram with
  ``1 <= n <= loop_ngram`` anywhere in the completion (``a b a b a b`` has 3 copies of ``a b``,
  ``x x x x`` 4 copies of ``x``; a trailing partial copy does not count). Rejected when
  ``>= loop_repeats``.
- **repeated n-grams** :func:`repeated_ngram_fraction`: the share of the completion's n-grams
  (``n = repeat_ngram``, windows of n consecutive completion tokens) that repeat an n-gram seen
  earlier in the same completion, ``1 - distinct / total`` (0 with fewer than n tokens). Catches
  loops with long periods. Rejected when ``> max_repeated_fraction``.

Every threshold is None (off) by default; choose them for the tokenizer: a character-level
vocabulary repeats short n-grams in normal text (the arithmetic task's ``####`` is 4 copies of
``#``), a subword one rarely does.

Wiring (for agents), with ``agents.base.select_rows``::

    rollout = engine.generate(prompts, sampling)        # no teacher scores yet
    result = sample_filter(rollout)                     # SampleFilter(...)
    if result.all_rejected:
        ...                                             # no teacher call; log, skip the update
    rollout = select_rows(rollout, result.rows)
    examples = [examples[i] for i in result.rows.tolist()]
    rollout = engine.score(rollout, teacher_output="full")
    stats.update(result.metrics())

Under more than one process the kept counts differ between processes; a process whose batch is
all rejected must still take part in the gradient all-reduce (e.g. a zero loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rl_distill.rollout import Rollout


def sequence_perplexity(logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence perplexity ``exp(-sum_t m_t log p_t / sum_t m_t)``: ``(B, T) -> (B,)`` float32.

    Masked positions are ignored (even if they hold NaN); a sequence without tokens gives 1.
    """
    m = mask.to(torch.bool)
    lp = torch.where(m, logprobs.detach().float(), torch.zeros((), device=logprobs.device))
    mean = lp.sum(-1) / m.sum(-1).clamp(min=1)  # (B,)
    return torch.exp(-mean)


def _longest_run(flags: Tensor) -> Tensor:
    """Length of the longest run of True along the last axis: ``(B, L) -> (B,)`` long."""
    if flags.shape[-1] == 0:
        return torch.zeros(flags.shape[:-1], dtype=torch.long, device=flags.device)
    count = flags.long().cumsum(-1)  # (B, L)
    # At each False the count so far; its running max is the count at the last reset.
    last_reset = torch.where(flags, torch.zeros_like(count), count).cummax(-1).values
    return (count - last_reset).max(-1).values


def max_ngram_repeats(token_ids: Tensor, mask: Tensor, max_ngram: int = 4) -> Tensor:
    """Most consecutive copies of one n-gram (``1 <= n <= max_ngram``) in each completion.

    A run of ``L`` positions with ``y_t == y_{t-n}`` spans ``L + n`` tokens, that is
    ``L // n + 1`` whole copies of an n-gram. A completion with tokens has at least 1 copy;
    an empty one 0.

    Args:
        token_ids: ``(B, T)`` completion tokens.
        mask: ``(B, T)`` True on real completion tokens.
        max_ngram: the longest period looked for.

    Returns:
        ``(B,)`` long.
    """
    if max_ngram < 1:
        raise ValueError(f"max_ngram must be >= 1, got {max_ngram}")
    m = mask.to(torch.bool)
    best = m.any(-1).long()  # (B,)
    for n in range(1, min(max_ngram, token_ids.shape[-1] - 1) + 1):
        same = (token_ids[:, n:] == token_ids[:, :-n]) & m[:, n:] & m[:, :-n]  # (B, T - n)
        run = _longest_run(same)  # (B,)
        best = torch.maximum(best, torch.where(run > 0, run // n + 1, 0))
    return best


def repeated_ngram_fraction(token_ids: Tensor, mask: Tensor, n: int = 3) -> Tensor:
    """Share of each completion's n-grams that repeat an earlier one: ``1 - distinct / total``.

    Only windows of ``n`` tokens that all lie in the mask count. A completion with fewer than ``n``
    tokens gives 0.

    Args:
        token_ids: ``(B, T)`` completion tokens.
        mask: ``(B, T)`` True on real completion tokens.
        n: the n-gram length.

    Returns:
        ``(B,)`` float32 in ``[0, 1)``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    bsz, width = token_ids.shape
    out = torch.zeros(bsz, dtype=torch.float32, device=token_ids.device)
    if width < n:
        return out
    m = mask.to(torch.bool)
    windows = token_ids.unfold(-1, n, 1)  # (B, T - n + 1, n)
    valid = m.unfold(-1, n, 1).all(-1)  # (B, T - n + 1)
    rows = torch.arange(bsz, device=token_ids.device)[:, None].expand_as(valid)
    # One row per (sequence, n-gram); torch.unique over rows counts distinct n-grams exactly.
    keyed = torch.cat([rows[valid][:, None], windows[valid]], dim=-1)  # (N, 1 + n)
    total = valid.sum(-1)  # (B,)
    if keyed.shape[0] == 0:
        return out
    distinct_rows = torch.unique(keyed, dim=0)[:, 0]
    distinct = torch.bincount(distinct_rows, minlength=bsz)  # (B,)
    has = total > 0
    out[has] = 1.0 - distinct[has].float() / total[has].float()
    return out


@dataclass(frozen=True)
class FilterResult:
    """Which rows of a rollout to keep, and why the others were rejected.

    Attributes:
        keep: ``(B,)`` bool, True for rows to keep (all False when everything is rejected).
        reasons: rows rejected by each enabled criterion (``"perplexity"``, ``"loop"``,
            ``"repeated_ngrams"``); a row failing several counts in each.
        rejected_fraction: share of rows rejected (0.0 for an empty batch).
        perplexity: ``(B,)`` float32 student perplexity of every row (for logging).
    """

    keep: Tensor
    reasons: dict[str, int]
    rejected_fraction: float
    perplexity: Tensor = field(repr=False)

    @property
    def rows(self) -> Tensor:
        """``(K,)`` long indices of the kept rows, for ``agents.base.select_rows``."""
        return self.keep.nonzero().flatten()

    @property
    def all_rejected(self) -> bool:
        """True when no row is kept."""
        return not bool(self.keep.any())

    def metrics(self, prefix: str = "rollout/filter/") -> dict[str, float]:
        """Log values: the rejected fraction and each criterion's rejected share of the batch."""
        size = max(1, self.keep.numel())
        out = {f"{prefix}rejected_fraction": self.rejected_fraction}
        out.update({f"{prefix}rejected_{k}": v / size for k, v in self.reasons.items()})
        return out


@dataclass(frozen=True)
class SampleFilter:
    """Rejects degenerate on-policy samples (tutorial ch. 7); every criterion is off when None.

    Call it on a rollout from ``RolloutEngine.generate`` (teacher scores not needed).
    """

    max_perplexity: float | None = None
    """Reject rows whose student perplexity exceeds this (tutorial: 100-500); None disables."""
    loop_repeats: int | None = None
    """Reject rows with at least this many consecutive copies of an n-gram (n <= loop_ngram); None disables."""
    loop_ngram: int = 4
    """Longest n-gram period the loop detector looks for."""
    max_repeated_fraction: float | None = None
    """Reject rows whose share of repeated ``repeat_ngram``-grams exceeds this, in [0, 1); None disables."""
    repeat_ngram: int = 3
    """n of the repeated n-gram fraction."""

    def __post_init__(self) -> None:
        if self.max_perplexity is not None and not (
            math.isfinite(self.max_perplexity) and self.max_perplexity >= 1
        ):
            raise ValueError(
                f"max_perplexity: must be a finite number >= 1 or None, got {self.max_perplexity}"
            )
        if self.loop_repeats is not None and self.loop_repeats < 2:
            raise ValueError(f"loop_repeats: must be >= 2 or None, got {self.loop_repeats}")
        if self.loop_ngram < 1:
            raise ValueError(f"loop_ngram: must be >= 1, got {self.loop_ngram}")
        frac = self.max_repeated_fraction
        if frac is not None and not 0.0 <= frac < 1.0:
            raise ValueError(f"max_repeated_fraction: must be in [0, 1) or None, got {frac}")
        if self.repeat_ngram < 1:
            raise ValueError(f"repeat_ngram: must be >= 1, got {self.repeat_ngram}")

    @property
    def enabled(self) -> bool:
        """True when at least one criterion is on."""
        return any(
            x is not None for x in (self.max_perplexity, self.loop_repeats, self.max_repeated_fraction)
        )

    def __call__(self, rollout: Rollout) -> FilterResult:
        """Decide which rows of ``rollout`` to keep (uses ``completion_ids``, ``completion_mask``, ``logprobs``)."""
        ids, mask = rollout.completion_ids, rollout.completion_mask
        ppl = sequence_perplexity(rollout.logprobs, mask)  # (B,)
        reject = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        reasons: dict[str, int] = {}
        checks: list[tuple[str, Tensor]] = []
        if self.max_perplexity is not None:
            checks.append(("perplexity", ~(ppl <= self.max_perplexity)))  # NaN is rejected
        if self.loop_repeats is not None:
            checks.append(("loop", max_ngram_repeats(ids, mask, self.loop_ngram) >= self.loop_repeats))
        if self.max_repeated_fraction is not None:
            frac = repeated_ngram_fraction(ids, mask, self.repeat_ngram)
            checks.append(("repeated_ngrams", frac > self.max_repeated_fraction))
        for name, bad in checks:
            reasons[name] = int(bad.sum())
            reject |= bad
        size = reject.numel()
        return FilterResult(
            keep=~reject,
            reasons=reasons,
            rejected_fraction=int(reject.sum()) / size if size else 0.0,
            perplexity=ppl,
        )
