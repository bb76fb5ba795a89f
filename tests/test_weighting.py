"""Tests for rl_distill.weighting: the tutorial's TIP table, the logits path, masks, weights, normaliser."""

from __future__ import annotations

import math

import pytest
import torch

from rl_distill.divergences import forward_kl
from rl_distill.weighting import (
    importance_filter,
    importance_from_stats,
    importance_weights,
    teacher_entropy_and_kl,
    token_importance,
    weighted_token_mean,
)

# Tutorial ch. 7, "Worked Example: Scoring 5 Tokens": V = 32000, (H_T, KL) per token.
# Scores by hand, (1 - H / ln 32000) * KL with ln 32000 = 10.373491:
#   the          (1 - 0.08 / 10.373491) * 0.03 = 0.029769
#   integration  (1 - 0.15 / 10.373491) * 0.82 = 0.808143  (the tutorial prints 0.798: a slip)
#   um           (1 - 2.30 / 10.373491) * 0.45 = 0.350224
#   equals       (1 - 0.05 / 10.373491) * 0.91 = 0.905614
#   maybe        (1 - 1.80 / 10.373491) * 0.12 = 0.099178
TABLE_H = [0.08, 0.15, 2.30, 0.05, 1.80]
TABLE_KL = [0.03, 0.82, 0.45, 0.91, 0.12]
TABLE_SCORES = [0.029769, 0.808143, 0.350224, 0.905614, 0.099178]


def test_tutorial_table():
    scores = importance_from_stats(torch.tensor(TABLE_H), torch.tensor(TABLE_KL), 32000)
    assert scores.dtype == torch.float32
    assert scores.tolist() == pytest.approx(TABLE_SCORES, abs=1e-5)
    assert [round(s, 4) for s in scores.tolist()] == [0.0298, 0.8081, 0.3502, 0.9056, 0.0992]
    keep, kept = importance_filter(scores[None], torch.ones(1, 5, dtype=torch.bool), threshold=0.30)
    assert [i + 1 for i in keep[0].nonzero().flatten().tolist()] == [2, 3, 4]  # 1-based
    assert kept == pytest.approx(0.6)


def test_from_stats_edges():
    assert float(importance_from_stats(math.log(50), 2.0, 50)) == pytest.approx(0.0, abs=1e-7)  # max entropy
    assert float(importance_from_stats(0.0, 2.0, 50)) == 2.0  # one-hot teacher: the KL itself
    assert float(importance_from_stats(math.log(50) + 1e-5, 2.0, 50)) == 0.0  # rounding: clamped, not < 0
    with pytest.raises(ValueError, match="vocab_size"):
        importance_from_stats(0.1, 0.1, 1)


def _direct(teacher, student):
    log_t = torch.log_softmax(teacher.double(), -1)
    log_s = torch.log_softmax(student.double(), -1)
    h = -(log_t.exp() * log_t).sum(-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return h, kl, (1 - h / math.log(teacher.shape[-1])) * kl


def test_logits_path_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    teacher = 3 * torch.randn(2, 3, 5, generator=g)  # (B, T, V)
    student = 3 * torch.randn(2, 3, 5, generator=g)
    h_ref, kl_ref, w_ref = _direct(teacher, student)
    h, kl = teacher_entropy_and_kl(teacher, student)
    torch.testing.assert_close(h, h_ref.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl, kl_ref.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl, forward_kl(teacher, student, reduction="token"), atol=1e-6, rtol=1e-6)
    w = token_importance(teacher, student)
    assert w.shape == (2, 3) and w.dtype == torch.float32
    torch.testing.assert_close(w, w_ref.float(), atol=1e-5, rtol=1e-5)
    for chunk in (0, 1, 4):
        torch.testing.assert_close(token_importance(teacher, student, chunk_size=chunk), w)


def test_hand_logits():
    # Position 0: uniform teacher -> H = log V, score 0. Position 1: student == teacher -> KL 0.
    # Position 2: one-hot teacher (other logits -inf) -> H = 0, KL = -log pS(0) = log 4 for a uniform
    # student over V = 4, so the score is log 4.
    ninf = float("-inf")
    teacher = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, -1.0], [0.0, ninf, ninf, ninf]]])
    student = torch.tensor([[[5.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]]])
    w = token_importance(teacher, student)
    assert w[0].tolist() == pytest.approx([0.0, 0.0, math.log(4)], abs=1e-6)
    assert torch.isfinite(w).all()


def test_mask_equals_dropping_and_ignores_garbage():
    g = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    mask = torch.tensor([[True, True, False, False], [True, False, True, True]])
    full = token_importance(teacher, student)
    teacher[~mask] = float("nan")  # padding positions may hold anything
    w = token_importance(teacher, student, mask)
    assert torch.isfinite(w).all()
    assert (w[~mask] == 0).all()
    torch.testing.assert_close(w[mask], full[mask])
    torch.testing.assert_close(token_importance(teacher[mask], student[mask]), full[mask])  # dropped


def test_detached_temperature_bfloat16_vocab():
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(1, 3, 6, generator=g)
    student = torch.randn(1, 3, 6, generator=g, requires_grad=True)
    w = token_importance(teacher, student)
    assert not w.requires_grad
    torch.testing.assert_close(
        token_importance(teacher, student, temperature=2.0), token_importance(teacher / 2, student / 2)
    )
    low = token_importance(teacher.bfloat16(), student.detach().bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, w, atol=0.03, rtol=0.03)
    h, kl = teacher_entropy_and_kl(teacher, student)
    torch.testing.assert_close(
        token_importance(teacher, student, vocab_size=100), (1 - h / math.log(100)) * kl
    )
    with pytest.raises(ValueError, match="same shape"):
        token_importance(teacher, student[..., :5])
    with pytest.raises(ValueError, match="mask must have shape"):
        token_importance(teacher, student, torch.ones(3, dtype=torch.bool))


def test_importance_weights_normalisation():
    scores = torch.tensor([[0.2, 0.6, 9.0], [0.0, 0.4, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    raw = importance_weights(scores, mask, normalize="none")
    torch.testing.assert_close(raw, torch.tensor([[0.2, 0.6, 0.0], [0.0, 0.4, 0.0]]))
    # batch mean over the 5 unmasked tokens = 1.2 / 5 = 0.24
    batch = importance_weights(scores, mask, normalize="batch")
    torch.testing.assert_close(batch, torch.tensor([[0.2 / 0.24, 0.6 / 0.24, 0.0], [0.0, 0.4 / 0.24, 0.0]]))
    assert float(batch[mask].mean()) == pytest.approx(1.0)
    # per-sequence means 0.4 and 0.4 / 3
    seq = importance_weights(scores, mask, normalize="sequence")
    torch.testing.assert_close(seq, torch.tensor([[0.5, 1.5, 0.0], [0.0, 3.0, 0.0]]))
    zeros = importance_weights(torch.zeros(2, 3), mask)
    assert (zeros == 0).all() and torch.isfinite(zeros).all()
    rows = importance_weights(torch.tensor([[0.0, 0.0, 0.0], [1.0, 3.0, 0.0]]), mask, normalize="sequence")
    torch.testing.assert_close(rows, torch.tensor([[0.0, 0.0, 0.0], [0.75, 2.25, 0.0]]))
    with pytest.raises(ValueError, match="normalize"):
        importance_weights(scores, mask, normalize="max")  # type: ignore[arg-type]


def test_weighted_token_mean_hand_values():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    keep = torch.tensor([[True, False, True, False]])
    assert float(weighted_token_mean(values, keep)) == 2.0  # (1 + 3) / 2, not / 4
    w = torch.tensor([[1.0, 5.0, 3.0, 7.0]])
    assert float(weighted_token_mean(values, keep, w)) == pytest.approx((1 * 1 + 3 * 3) / 4)
    # scaling the weights does not change the mean
    assert float(weighted_token_mean(values, keep, 10 * w)) == pytest.approx(2.5)
    garbage = torch.tensor([[1.0, float("nan"), 3.0, float("inf")]])
    assert float(weighted_token_mean(garbage, keep)) == 2.0


def test_weighted_token_mean_nothing_kept_is_zero_with_zero_gradient():
    values = torch.tensor([[1.0, 2.0]], requires_grad=True)
    for mask, weights in [
        (torch.zeros(1, 2, dtype=torch.bool), None),
        (torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2)),
    ]:
        out = weighted_token_mean(values, mask, weights)
        assert float(out.detach()) == 0.0
        out.backward()
        assert values.grad is not None and (values.grad == 0).all()
        values.grad = None


def test_filtered_loss_normaliser_excludes_skipped_tokens():
    # The mean over the kept tokens equals forward_kl's token mean under the keep mask, and the
    # gradient reaches only the kept positions.
    g = torch.Generator().manual_seed(3)
    teacher = 2 * torch.randn(2, 5, 8, generator=g)
    student = (2 * torch.randn(2, 5, 8, generator=g)).requires_grad_(True)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    scores = token_importance(teacher, student, mask)
    threshold = float(scores[mask].median())
    keep, kept = importance_filter(scores, mask, threshold)
    assert 0 < kept < 1 and not (keep & ~mask).any()
    per_token = forward_kl(teacher, student, mask, reduction="token")
    loss = weighted_token_mean(per_token, keep)
    expected = forward_kl(teacher, student, keep, reduction="token_mean")
    torch.testing.assert_close(loss, expected)
    assert float(loss.detach()) == pytest.approx(float(per_token[keep].sum().detach() / keep.sum()))
    loss.backward()
    assert (student.grad[~keep] == 0).all() and (student.grad[keep].abs().sum(-1) > 0).all()


def test_filter_edge_cases():
    keep, kept = importance_filter(torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.bool), 0.5)
    assert not keep.any() and kept == 0.0
    keep, kept = importance_filter(torch.tensor([[0.3, 0.29]]), torch.ones(1, 2, dtype=torch.bool), 0.3)
    assert keep.tolist() == [[True, False]] and kept == 0.5  # >= threshold is kept
