"""Tests for rl_distill.filters: perplexity, loop and repeated n-gram detectors, SampleFilter."""

from __future__ import annotations

import math

import pytest
import torch

from rl_distill.filters import (
    FilterResult,
    SampleFilter,
    max_ngram_repeats,
    repeated_ngram_fraction,
    sequence_perplexity,
)
from rl_distill.rollout import Rollout, SamplingConfig

PAD = 0


def _rows(*seqs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and mask from token lists."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


def _rollout(seqs: list[list[int]], probs: list[list[float]]) -> Rollout:
    ids, mask = _rows(*seqs)
    logprobs = torch.zeros(ids.shape)
    for i, p in enumerate(probs):
        logprobs[i, : len(p)] = torch.log(torch.tensor(p))
    b = len(seqs)
    return Rollout(
        prompt_ids=torch.ones(b, 2, dtype=torch.long),
        prompt_mask=torch.ones(b, 2, dtype=torch.long),
        completion_ids=ids,
        completion_mask=mask,
        logprobs=logprobs,
    )


def test_perplexity_hand_values():
    # Row 0: p = 0.5, 0.25 -> exp(-(ln 0.5 + ln 0.25) / 2) = sqrt(2 * 4) = 2.828427.
    # Row 1: p = 0.1 three times -> 10. Row 2: empty -> 1. Masked NaN is ignored.
    lp = torch.tensor(
        [[math.log(0.5), math.log(0.25), float("nan")], [math.log(0.1)] * 3, [float("nan")] * 3]
    )
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    ppl = sequence_perplexity(lp, mask)
    assert ppl.tolist() == pytest.approx([math.sqrt(8.0), 10.0, 1.0], rel=1e-5)


@pytest.mark.parametrize(
    ("seq", "max_ngram", "expected"),
    [
        ([5, 5, 5, 5, 9], 4, 4),  # "x x x x"
        ([1, 2, 1, 2, 1, 2, 7], 4, 3),  # 3 copies of (1, 2)
        ([1, 2, 1, 2, 1], 4, 2),  # a trailing partial copy does not count
        ([1, 2, 3, 4, 5], 4, 1),
        ([1, 2, 3, 1, 2, 3, 1, 2, 3], 2, 1),  # period 3 is not looked for
        ([1, 2, 3, 1, 2, 3, 1, 2, 3], 3, 3),
        ([8, 1, 1, 1, 1, 1, 1, 2], 4, 6),  # in the middle, not only at the end
        ([4], 4, 1),
    ],
)
def test_max_ngram_repeats_hand_values(seq, max_ngram, expected):
    ids, mask = _rows(seq)
    assert max_ngram_repeats(ids, mask, max_ngram).tolist() == [expected]


def test_max_ngram_repeats_batch_mask_and_empty():
    ids, mask = _rows([7, 7, 7], [1, 2, 3, 4, 5, 6], [])
    ids[0, 3:] = 7  # padding equal to the loop token must not extend it
    assert max_ngram_repeats(ids, mask).tolist() == [3, 1, 0]
    with pytest.raises(ValueError, match="max_ngram"):
        max_ngram_repeats(ids, mask, 0)


def test_repeated_ngram_fraction_hand_values():
    # 123 231 312 123: 4 trigrams, 3 distinct -> 0.25. [1,1,1,1] unigrams: 4, 1 distinct -> 0.75.
    ids, mask = _rows([1, 2, 3, 1, 2, 3], [1, 2], [1, 2, 3])
    assert repeated_ngram_fraction(ids, mask, 3).tolist() == pytest.approx([0.25, 0.0, 0.0])
    ids, mask = _rows([1, 1, 1, 1], [2, 2, 3])
    assert repeated_ngram_fraction(ids, mask, 1).tolist() == pytest.approx([0.75, 1 / 3])
    # rows are independent: the same trigram in another row is not a repeat
    ids, mask = _rows([1, 2, 3], [1, 2, 3])
    assert repeated_ngram_fraction(ids, mask, 3).tolist() == [0.0, 0.0]
    # windows reaching into padding do not count
    ids, mask = _rows([5, 5, 5], [9, 9, 9, 9, 9, 9])
    assert repeated_ngram_fraction(ids, mask, 2).tolist() == pytest.approx([0.5, 0.8])
    ids, mask = _rows([1], [2])
    assert repeated_ngram_fraction(ids, mask, 3).tolist() == [0.0, 0.0]  # T < n


def test_sample_filter_reasons_and_keep():
    seqs = [
        [1, 2, 3, 4],  # fine
        [5, 6, 7, 8],  # perplexity 1000 -> rejected
        [9, 9, 9, 9, 9, 9],  # loop of 6 copies -> rejected (and repeated trigrams 3/4)
        [1, 2, 3, 4, 1, 2, 3, 4, 5],  # 2 copies of a 4-gram: below loop_repeats; trigrams 2/7 repeated
    ]
    probs = [[0.5] * 4, [0.001] * 4, [0.9] * 6, [0.5] * 9]
    rollout = _rollout(seqs, probs)
    f = SampleFilter(max_perplexity=300.0, loop_repeats=4, max_repeated_fraction=0.5)
    result = f(rollout)
    assert isinstance(result, FilterResult)
    assert result.keep.tolist() == [True, False, False, True]
    assert result.reasons == {"perplexity": 1, "loop": 1, "repeated_ngrams": 1}
    assert result.rejected_fraction == 0.5
    assert result.rows.tolist() == [0, 3]
    assert result.perplexity.tolist() == pytest.approx([2.0, 1000.0, 1 / 0.9, 2.0], rel=1e-4)
    assert result.metrics() == {
        "rollout/filter/rejected_fraction": 0.5,
        "rollout/filter/rejected_perplexity": 0.25,
        "rollout/filter/rejected_loop": 0.25,
        "rollout/filter/rejected_repeated_ngrams": 0.25,
    }
    # a tighter fraction threshold also rejects row 3 (2/7 = 0.2857 repeated trigrams)
    assert SampleFilter(max_repeated_fraction=0.25)(rollout).keep.tolist() == [True, True, False, False]


def test_sample_filter_off_keeps_everything():
    rollout = _rollout([[1, 1, 1, 1, 1, 1, 1, 1]], [[1e-6] * 8])
    f = SampleFilter()
    assert not f.enabled
    result = f(rollout)
    assert result.keep.tolist() == [True] and result.reasons == {} and result.rejected_fraction == 0.0


def test_all_rejected_batch_has_no_nan():
    rollout = _rollout([[1, 2], [3, 4]], [[1e-4, 1e-4], [1e-5, 1e-5]])
    rollout.logprobs[1, 0] = float("nan")  # a broken row is rejected, not kept
    result = SampleFilter(max_perplexity=100.0)(rollout)
    assert result.keep.tolist() == [False, False] and result.keep.dtype == torch.bool
    assert result.all_rejected and result.rows.numel() == 0
    assert result.rejected_fraction == 1.0
    assert all(math.isfinite(v) for v in result.metrics().values())


def test_select_rows_keeps_the_accepted_rows():
    from rl_distill.agents.base import select_rows

    rollout = _rollout([[1, 2, 3], [4, 4, 4, 4, 4], [5]], [[0.5] * 3, [0.9] * 5, [0.2]])
    result = SampleFilter(loop_repeats=3)(rollout)
    kept = select_rows(rollout, result.rows)
    assert len(kept) == 2
    assert kept.completion_ids.tolist() == [[1, 2, 3], [5, PAD, PAD]]


def test_on_a_real_rollout(engine):
    r = engine.generate(
        ["ab", "hello"] * 2, SamplingConfig(max_new_tokens=8), generator=torch.Generator().manual_seed(0)
    )
    ppl = sequence_perplexity(r.logprobs, r.completion_mask)
    mean_lp = (r.logprobs * r.completion_mask).sum(-1) / r.completion_mask.sum(-1)
    torch.testing.assert_close(ppl, torch.exp(-mean_lp))
    assert SampleFilter(max_perplexity=1e9)(r).keep.all()
    assert not SampleFilter(max_perplexity=1.0)(r).keep.any()  # sampled tokens have p < 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_perplexity": 0.5}, "max_perplexity"),
        ({"max_perplexity": float("nan")}, "max_perplexity"),
        ({"loop_repeats": 1}, "loop_repeats"),
        ({"loop_ngram": 0}, "loop_ngram"),
        ({"max_repeated_fraction": 1.0}, "max_repeated_fraction"),
        ({"repeat_ngram": 0}, "repeat_ngram"),
    ],
)
def test_config_checks_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SampleFilter(**kwargs)
