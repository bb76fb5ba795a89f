"""Tests for rl_distill.divergences: values by hand, identities, reductions, masks, gradients, numerics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rl_distill.divergences import (
    DIVERGENCES,
    divergence,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    total_variation,
)

LOG2 = math.log(2.0)
REDUCTIONS = ("token", "sequence", "batch", "token_mean", "sum")

# The hand-worked pair of the issue: p (teacher) and q (student).
P = [0.7, 0.2, 0.1]
Q = [0.3, 0.4, 0.3]
# KL(p || q) = 0.7 ln(7/3) + 0.2 ln(0.5) + 0.1 ln(1/3)
#            = 0.593108 - 0.138629 - 0.109861 = 0.344618
KL_PQ = 0.344618
# KL(q || p) = 0.3 ln(3/7) + 0.4 ln(2) + 0.3 ln(3)
#            = -0.254189 + 0.277259 + 0.329584 = 0.352653
KL_QP = 0.352653
# M = (p + q) / 2 = [0.5, 0.3, 0.2]
# KL(p || M) = 0.7 ln(1.4) + 0.2 ln(2/3) + 0.1 ln(0.5) = 0.235531 - 0.081093 - 0.069315 = 0.085123
# KL(q || M) = 0.3 ln(0.6) + 0.4 ln(4/3) + 0.3 ln(1.5) = -0.153248 + 0.115073 + 0.121640 = 0.083465
# JSD(0.5) = 0.5 (0.085123 + 0.083465) = 0.084294
JSD_PQ = 0.084294
# TV = 0.5 (|0.7-0.3| + |0.2-0.4| + |0.1-0.3|) = 0.5 (0.4 + 0.2 + 0.2) = 0.4
TV_PQ = 0.4

HAND = {"forward_kl": KL_PQ, "reverse_kl": KL_QP, "jsd": JSD_PQ, "tv": TV_PQ}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Run single-threaded: the tensors are tiny, and waking OpenMP workers for each of the thousands of
    small ops (gradcheck) made this file ~10x slower on a 2-core machine."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _call(name: str, teacher, student, mask=None, **kw):
    """Call the public function for `name` (not the dispatcher), so both entry points get exercised."""
    fns = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": generalized_jsd, "tv": total_variation}
    return fns[name](teacher, student, mask, **kw)


def _logits(*shape: int, seed: int, scale: float = 2.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def _pair(*shape: int, seed: int = 0, dtype=torch.float32):
    return _logits(*shape, seed=seed, dtype=dtype), _logits(*shape, seed=seed + 1000, dtype=dtype)


def _mask(b: int, t: int) -> torch.Tensor:
    """A ragged mask: sequence i keeps its first t - i tokens; sequence 0 also has a hole at position 1."""
    m = torch.zeros(b, t, dtype=torch.bool)
    for i in range(b):
        m[i, : max(t - i, 0)] = True
    if t > 2:
        m[0, 1] = False  # a hole in the middle, not only right padding
    return m


def _kl_py(a, b) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


# ---------------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------------
def test_hand_constants_match_their_formulas():
    # Guards the literal constants above against a typo (computed independently of torch).
    m = [(x + y) / 2 for x, y in zip(P, Q)]
    by_formula = 0.7 * math.log(7 / 3) + 0.2 * math.log(0.5) + 0.1 * math.log(1 / 3)
    assert KL_PQ == pytest.approx(by_formula, abs=1e-6)
    assert KL_PQ == pytest.approx(_kl_py(P, Q), abs=1e-6)
    assert KL_QP == pytest.approx(_kl_py(Q, P), abs=1e-6)
    assert JSD_PQ == pytest.approx(0.5 * _kl_py(P, m) + 0.5 * _kl_py(Q, m), abs=1e-6)
    assert TV_PQ == pytest.approx(0.5 * sum(abs(x - y) for x, y in zip(P, Q)), abs=1e-12)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("form", ["log_probs", "logits", "shifted_logits"])
def test_hand_computed_values(name, form):
    lp, lq = torch.tensor(P).log(), torch.tensor(Q).log()
    if form == "logits":  # unnormalised logits: log p + c with a different c per distribution
        lp, lq = lp + 3.0, lq - 1.5
    elif form == "shifted_logits":  # log_softmax invariance with large shifts
        lp, lq = lp + 40.0, lq - 25.0
    expected = HAND[name]
    got = _call(name, lp, lq, reduction="token")
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, abs=2e-6)
    assert divergence(name, lp, lq, reduction="token").item() == pytest.approx(expected, abs=2e-6)
    # Batched over (B, T, V) with every position the same pair.
    batch = divergence(name, lp.expand(2, 3, 3), lq.expand(2, 3, 3), reduction="token")
    torch.testing.assert_close(batch, torch.full((2, 3), expected), atol=2e-6, rtol=0)


def test_forward_and_reverse_kl_direction():
    lp, lq = torch.tensor(P).log(), torch.tensor(Q).log()
    # forward_kl(teacher=p, student=q) = KL(p || q); reverse_kl(p, q) = KL(q || p) = forward_kl(q, p).
    assert forward_kl(lp, lq, reduction="token").item() == pytest.approx(KL_PQ, abs=2e-6)
    assert reverse_kl(lp, lq, reduction="token").item() == pytest.approx(KL_QP, abs=2e-6)
    assert reverse_kl(lp, lq, reduction="token").item() == pytest.approx(
        forward_kl(lq, lp, reduction="token").item(), abs=1e-7
    )


@pytest.mark.parametrize("beta", [0.1, 0.25, 0.9])
def test_jsd_other_betas_by_hand(beta):
    m = [beta * x + (1 - beta) * y for x, y in zip(P, Q)]
    expected = beta * _kl_py(P, m) + (1 - beta) * _kl_py(Q, m)
    lp, lq = torch.tensor(P).log(), torch.tensor(Q).log()
    got = generalized_jsd(lp + 1.0, lq, beta=beta, reduction="token").item()
    assert got == pytest.approx(expected, abs=2e-6)
    got_scaled = generalized_jsd(lp, lq, beta=beta, scaled=True, reduction="token").item()
    assert got_scaled == pytest.approx(expected / (beta * (1 - beta)), rel=1e-5)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_logit_shift_invariance_random(name):
    t, s = _pair(2, 3, 7, seed=1)
    base = divergence(name, t, s, reduction="token")
    shifted = divergence(name, t + 13.0, s - 7.0, reduction="token")
    torch.testing.assert_close(shifted, base, atol=2e-6, rtol=1e-5)
    # Per-position shifts too (log_softmax is taken over the last axis only).
    c = _logits(2, 3, 1, seed=9, scale=10.0)
    torch.testing.assert_close(divergence(name, t + c, s - c, reduction="token"), base, atol=2e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DIVERGENCES)
def test_zero_for_equal_inputs(name):
    t = _logits(3, 4, 11, seed=2, scale=3.0)
    vals = divergence(name, t, t.clone(), reduction="token")
    torch.testing.assert_close(vals, torch.zeros(3, 4), atol=1e-6, rtol=0)
    # Same distribution, different logits (a per-row constant shift).
    vals = divergence(name, t, t + 5.0, reduction="token")
    torch.testing.assert_close(vals, torch.zeros(3, 4), atol=2e-6, rtol=0)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_nonnegative_and_positive_for_different_inputs(name):
    t, s = _pair(4, 5, 6, seed=3)
    vals = divergence(name, t, s, reduction="token")
    assert (vals > 1e-4).all()


def test_jsd_symmetric_and_bounded():
    t, s = _pair(3, 5, 8, seed=4)
    a = generalized_jsd(t, s, beta=0.5, reduction="token")
    b = generalized_jsd(s, t, beta=0.5, reduction="token")
    torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    assert (a <= LOG2 + 1e-6).all()
    # General beta: JSD(beta)(t, s) == JSD(1 - beta)(s, t).
    torch.testing.assert_close(
        generalized_jsd(t, s, beta=0.2, reduction="token"),
        generalized_jsd(s, t, beta=0.8, reduction="token"),
        atol=1e-7,
        rtol=1e-6,
    )
    # Wildly different distributions still stay below log 2.
    t, s = _pair(3, 5, 8, seed=5)
    big = generalized_jsd(30 * t, 30 * s, beta=0.5, reduction="token")
    assert (big <= LOG2 + 1e-6).all()


def test_jsd_nearly_disjoint_approaches_log2():
    v = 6
    t = torch.zeros(v)
    s = torch.zeros(v)
    t[0] = 60.0  # pT ~ one-hot on token 0 (other tokens ~ e^-60)
    s[1] = 60.0  # pS ~ one-hot on token 1
    val = generalized_jsd(t, s, beta=0.5, reduction="token").item()
    assert val <= LOG2 + 1e-6
    assert val == pytest.approx(LOG2, abs=1e-5)
    # TV of disjoint distributions is 1, both KLs are large (~60 nats).
    assert total_variation(t, s, reduction="token").item() == pytest.approx(1.0, abs=1e-6)
    assert forward_kl(t, s, reduction="token").item() == pytest.approx(60.0, abs=1e-3)
    # JSD grows towards log 2 as the two modes separate.
    seps = [generalized_jsd(t * k / 60, s * k / 60, reduction="token").item() for k in (1, 3, 10, 60)]
    assert all(a < b for a, b in zip(seps, seps[1:])), seps
    assert seps[0] < 0.1


# ---------------------------------------------------------------------------------------------
# Beta endpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scaled", [False, True])
def test_beta_endpoints_are_the_kls_exactly(scaled):
    t, s = _pair(2, 4, 9, seed=6)
    m = _mask(2, 4)
    for red in REDUCTIONS:
        fkl = forward_kl(t, s, m, reduction=red)
        rkl = reverse_kl(t, s, m, reduction=red)
        assert torch.equal(generalized_jsd(t, s, m, beta=0.0, scaled=scaled, reduction=red), fkl)
        assert torch.equal(generalized_jsd(t, s, m, beta=1.0, scaled=scaled, reduction=red), rkl)
        assert not torch.equal(fkl, rkl)  # the two endpoints really differ
    # The dispatcher: "jsd" with beta 0 / 1.
    assert torch.equal(divergence("jsd", t, s, beta=0.0), forward_kl(t, s))
    assert torch.equal(divergence("jsd", t, s, beta=1.0), reverse_kl(t, s))


def test_scaled_jsd_tends_to_the_kls():
    # Tolerance, derived: with M = pS + beta (pT - pS) and r = pT / pS - 1, expanding log(1 + beta r)
    # gives JSD(beta) = beta KL(pT||pS) - beta^2 chi2(pT||pS) / 2 + O(beta^3), so
    #   scaled JSD(beta) = KL(pT||pS) + beta C0 + O(beta^2),   C0 = KL(pT||pS) - chi2(pT||pS) / 2,
    # and symmetrically near 1 with C1 = KL(pS||pT) - chi2(pS||pT) / 2 and 1 - beta in place of beta.
    # So the gap at beta = 1e-4 is ~1e-4 |C| (C is computed below, it can be ~100 for peaked rows);
    # the check allows 2 beta |C|. In float32 the raw JSD ~ 1e-4 carries ~1e-7 absolute rounding,
    # amplified by 1 / (beta (1 - beta)) = 1e4: another 1e-3.
    t, s = _pair(3, 6, seed=7, dtype=torch.float64)
    pt, ps = torch.softmax(t, -1), torch.softmax(s, -1)
    fkl = forward_kl(t, s, reduction="token")
    rkl = reverse_kl(t, s, reduction="token")
    c0 = fkl - ((pt - ps) ** 2 / ps).sum(-1) / 2
    c1 = rkl - ((pt - ps) ** 2 / pt).sum(-1) / 2
    assert ((fkl - rkl).abs() > 0.05).any()  # the two limits are distinguishable
    beta = 1e-4
    near0 = generalized_jsd(t, s, beta=beta, scaled=True, reduction="token")
    near1 = generalized_jsd(t, s, beta=1 - beta, scaled=True, reduction="token")
    assert ((near0 - fkl).abs() <= 2 * beta * c0.abs()).all()
    assert ((near1 - rkl).abs() <= 2 * beta * c1.abs()).all()
    # Sharper: the gap is the first-order term beta * C up to O(beta^2) (within 10% here).
    torch.testing.assert_close(near0 - fkl, beta * c0, rtol=0.1, atol=0)
    torch.testing.assert_close(near1 - rkl, beta * c1, rtol=0.1, atol=0)
    # And in float32 (computed in float32), within the same bound plus the rounding allowance.
    t32, s32 = t.float(), s.float()
    tol0 = (2 * beta * c0.abs() + 1e-3).float()
    tol1 = (2 * beta * c1.abs() + 1e-3).float()
    gap0 = generalized_jsd(t32, s32, beta=beta, scaled=True, reduction="token") - fkl.float()
    gap1 = generalized_jsd(t32, s32, beta=1 - beta, scaled=True, reduction="token") - rkl.float()
    assert (gap0.abs() <= tol0).all() and (gap1.abs() <= tol1).all()


def test_raw_jsd_vanishes_at_both_ends():
    t, s = _pair(2, 3, 5, seed=8)
    prev0 = prev1 = None
    for eps in (1e-1, 1e-2, 1e-3, 1e-4):
        v0 = generalized_jsd(t, s, beta=eps, reduction="sum").item()
        v1 = generalized_jsd(t, s, beta=1 - eps, reduction="sum").item()
        # JSD(beta) ~ beta KL(pT || pS) near 0 and ~ (1 - beta) KL(pS || pT) near 1.
        assert 0 < v0 < 2 * eps * forward_kl(t, s, reduction="sum").item()
        assert 0 < v1 < 2 * eps * reverse_kl(t, s, reduction="sum").item()
        if prev0 is not None:
            assert v0 < prev0 and v1 < prev1
        prev0, prev1 = v0, v1
    # At beta = 1e-4, JSD / beta is forward KL (and JSD / (1 - beta) reverse KL) to ~1e-4 * C.
    assert prev0 / 1e-4 == pytest.approx(forward_kl(t, s, reduction="sum").item(), rel=1e-2)
    assert prev1 / 1e-4 == pytest.approx(reverse_kl(t, s, reduction="sum").item(), rel=1e-2)


# ---------------------------------------------------------------------------------------------
# Temperature
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temp", [0.5, 2.0, 3.7])
def test_temperature_equals_scaled_logits(name, temp):
    t, s = _pair(2, 4, 7, seed=10)
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    a = divergence(name, t, s1, temperature=temp, reduction="token_mean", beta=0.3)
    b = divergence(name, t / temp, s2 / temp, reduction="token_mean", beta=0.3)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    a.backward()
    b.backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-6, rtol=1e-5)
    # And it really changes the value.
    assert not torch.allclose(a, divergence(name, t, s, reduction="token_mean", beta=0.3))


# ---------------------------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DIVERGENCES)
def test_reductions_by_hand(name):
    b, t_len, v = 4, 5, 6
    t, s = _pair(b, t_len, v, seed=11)
    mask = _mask(b, t_len)
    mask[3] = False  # an all-masked sequence
    tok_all = divergence(name, t, s, reduction="token")  # unmasked reference values
    assert tok_all.shape == (b, t_len)

    tok = divergence(name, t, s, mask, reduction="token")
    assert tok.shape == (b, t_len)
    assert (tok[~mask] == 0).all()
    torch.testing.assert_close(tok[mask], tok_all[mask])

    # Paper Eq. 2, by hand with loops: mean over each sequence's unmasked tokens.
    per_seq = []
    for i in range(b):
        vals = [tok_all[i, j].item() for j in range(t_len) if mask[i, j]]
        per_seq.append(sum(vals) / len(vals) if vals else 0.0)
    seq = divergence(name, t, s, mask, reduction="sequence")
    assert seq.shape == (b,)
    torch.testing.assert_close(seq, torch.tensor(per_seq), atol=1e-6, rtol=1e-5)
    assert seq[3].item() == 0.0  # empty sequence gives 0, not NaN

    # "batch": mean of the sequence values over the 3 sequences with >= 1 token (sequence 3 excluded).
    batch = divergence(name, t, s, mask, reduction="batch")
    assert batch.shape == ()
    assert torch.isfinite(batch)
    assert batch.item() == pytest.approx(sum(per_seq[:3]) / 3, rel=1e-5, abs=1e-7)
    assert batch.item() != pytest.approx(sum(per_seq) / 4, rel=1e-3)  # not diluted by the empty one

    flat = [tok_all[i, j].item() for i in range(b) for j in range(t_len) if mask[i, j]]
    tm = divergence(name, t, s, mask, reduction="token_mean")
    assert tm.item() == pytest.approx(sum(flat) / len(flat), rel=1e-5)
    sm = divergence(name, t, s, mask, reduction="sum")
    assert sm.item() == pytest.approx(sum(flat), rel=1e-5)
    # The default reduction is "batch".
    assert torch.equal(divergence(name, t, s, mask), batch)
    assert torch.equal(_call(name, t, s, mask), batch)


def test_batch_reduction_weights_sequences_not_tokens():
    # A 1-token sequence counts as much as a 4-token one in "batch", but not in "token_mean".
    t, s = _pair(2, 4, 5, seed=12)
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    tok = forward_kl(t, s, reduction="token")
    seq0, seq1 = tok[0].mean().item(), tok[1, 0].item()
    assert forward_kl(t, s, mask, reduction="batch").item() == pytest.approx((seq0 + seq1) / 2, rel=1e-5)
    assert forward_kl(t, s, mask, reduction="token_mean").item() == pytest.approx(
        (tok[0].sum().item() + seq1) / 5, rel=1e-5
    )


@pytest.mark.parametrize("name", DIVERGENCES)
def test_all_masked_gives_zero_and_finite_grad(name):
    t, s = _pair(2, 3, 5, seed=13)
    s.requires_grad_(True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for red in REDUCTIONS:
        val = divergence(name, t, s, mask, reduction=red)
        assert torch.isfinite(val).all()
        assert (val == 0).all()
        s.grad = None
        val.sum().backward()
        assert torch.equal(s.grad, torch.zeros_like(s))


def test_extra_leading_dims():
    # (A, B, T, V): "sequence" reduces the last position axis only.
    t, s = _pair(2, 3, 4, 5, seed=14)
    tok = forward_kl(t, s, reduction="token")
    assert tok.shape == (2, 3, 4)
    torch.testing.assert_close(forward_kl(t, s, reduction="sequence"), tok.mean(-1))
    torch.testing.assert_close(forward_kl(t, s, reduction="batch"), tok.mean())


# ---------------------------------------------------------------------------------------------
# Masked token == dropped token; garbage in masked positions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DIVERGENCES)
def test_masked_equals_dropped(name):
    b, t_len, v = 3, 6, 7
    t, s = _pair(b, t_len, v, seed=15)
    mask = _mask(b, t_len)
    # Per sequence, physically remove the masked positions and compute on what is left.
    seq_vals, flat_t, flat_s = [], [], []
    for i in range(b):
        ti, si = t[i][mask[i]], s[i][mask[i]]  # (L_i, V)
        seq_vals.append(divergence(name, ti, si, reduction="token_mean"))
        flat_t.append(ti)
        flat_s.append(si)
        torch.testing.assert_close(divergence(name, t, s, mask, reduction="token")[i][mask[i]],
                                   divergence(name, ti, si, reduction="token"))  # fmt: skip
    ft, fs = torch.cat(flat_t), torch.cat(flat_s)
    torch.testing.assert_close(divergence(name, t, s, mask, reduction="sequence"), torch.stack(seq_vals))
    torch.testing.assert_close(divergence(name, t, s, mask, reduction="batch"), torch.stack(seq_vals).mean())
    torch.testing.assert_close(
        divergence(name, t, s, mask, reduction="token_mean"), divergence(name, ft, fs, reduction="token_mean")
    )
    torch.testing.assert_close(
        divergence(name, t, s, mask, reduction="sum"), divergence(name, ft, fs, reduction="sum")
    )


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("reduction", ["batch", "token_mean", "sequence"])
def test_garbage_in_masked_positions_does_not_leak(name, garbage, reduction):
    b, t_len, v = 3, 5, 6
    t, s = _pair(b, t_len, v, seed=16)
    mask = _mask(b, t_len)
    t_bad, s_bad = t.clone(), s.clone()
    t_bad[~mask] = garbage
    s_bad[~mask] = garbage
    s_bad[0, 1, 2] = -garbage  # mixed garbage within one masked row
    s_clean = s.clone().requires_grad_(True)
    s_dirty = s_bad.clone().requires_grad_(True)
    t_dirty = t_bad.clone().requires_grad_(True)
    clean = divergence(name, t, s_clean, mask, reduction=reduction)
    dirty = divergence(name, t_dirty, s_dirty, mask, reduction=reduction)
    assert torch.isfinite(dirty).all()
    torch.testing.assert_close(dirty, clean)
    clean.sum().backward()
    dirty.sum().backward()
    assert torch.isfinite(s_dirty.grad).all() and torch.isfinite(t_dirty.grad).all()
    torch.testing.assert_close(s_dirty.grad, s_clean.grad)
    assert (s_dirty.grad[~mask] == 0).all() and (t_dirty.grad[~mask] == 0).all()


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------
GRAD_CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.2, "scaled": True}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("tv", {}),
]


@pytest.mark.parametrize(("name", "kw"), GRAD_CASES)
@pytest.mark.parametrize("reduction", ["batch", "token"])
def test_gradcheck_float64_masked_chunked(name, kw, reduction):
    b, t_len, v = 2, 3, 5
    t, s = _pair(b, t_len, v, seed=17, dtype=torch.float64)
    t.requires_grad_(True)
    s.requires_grad_(True)
    mask = _mask(b, t_len)
    assert mask.sum() > 2  # chunk_size=2 really splits the rows into several chunks

    def f(teacher, student):
        return _call(name, teacher, student, mask, temperature=1.3, reduction=reduction, chunk_size=2, **kw)

    assert f(t, s).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (t, s), eps=1e-6, atol=1e-6, rtol=1e-4)


def _grads(name, t, s, wrt, **kw):
    t = t.clone().requires_grad_(wrt == "teacher")
    s = s.clone().requires_grad_(wrt == "student")
    divergence(name, t, s, **kw).backward()
    return (t if wrt == "teacher" else s).grad


def _closed_form_row_grad(name, wrt, pt, ps):
    """Gradient of the per-row divergence w.r.t. the logits, derived by hand (softmax Jacobian)."""
    if name == "forward_kl":  # KL(pT || pS)
        if wrt == "student":
            return ps - pt
        kl = (pt * (pt.log() - ps.log())).sum(-1, keepdim=True)
        return pt * (pt.log() - ps.log() - kl)
    if name == "reverse_kl":  # KL(pS || pT): mirror image
        if wrt == "teacher":
            return pt - ps
        kl = (ps * (ps.log() - pt.log())).sum(-1, keepdim=True)
        return ps * (ps.log() - pt.log() - kl)
    if name == "jsd":  # beta = 0.5: dJSD/dpS_v = 0.5 log(pS_v / M_v), then the softmax Jacobian
        m = 0.5 * (pt + ps)
        p = ps if wrt == "student" else pt
        a = 0.5 * (p.log() - m.log())
        return p * (a - (p * a).sum(-1, keepdim=True))
    # tv: 0.5 sum |pT - pS|; d/ds_j = 0.5 pS_j (sign_j - sum_v sign_v pS_v), sign = sign(pS - pT)
    sign = torch.sign(ps - pt) if wrt == "student" else torch.sign(pt - ps)
    p = ps if wrt == "student" else pt
    return 0.5 * p * (sign - (sign * p).sum(-1, keepdim=True))


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("wrt", ["student", "teacher"])
@pytest.mark.parametrize("reduction", ["token_mean", "batch", "sum"])
def test_gradient_closed_form(name, wrt, reduction):
    b, t_len, v = 3, 4, 6
    temp = 1.5
    t, s = _pair(b, t_len, v, seed=18, dtype=torch.float64)
    mask = _mask(b, t_len)
    pt, ps = torch.softmax(t / temp, -1), torch.softmax(s / temp, -1)
    row = _closed_form_row_grad(name, wrt, pt, ps) / temp  # chain rule through logits / T
    lengths = mask.sum(-1, keepdim=True).to(torch.float64)
    if reduction == "token_mean":
        weight = torch.ones_like(lengths) / mask.sum()  # 1 / (number of tokens in the reduction)
    elif reduction == "batch":
        weight = 1.0 / (lengths * (lengths > 0).sum())  # 1 / (L_b * number of non-empty sequences)
    else:
        weight = torch.ones_like(lengths)
    expected = torch.where(mask[..., None], row * weight[..., None], torch.zeros(()))
    got = _grads(name, t, s, wrt, mask=mask, temperature=temp, reduction=reduction, chunk_size=3)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-7)


def test_forward_kl_student_grad_simple_float32():
    # The identity from the issue, plain float32: d/ds token_mean KL = (softmax(s) - softmax(t)) / N.
    t, s = _pair(2, 5, 8, seed=19)
    s = s.requires_grad_(True)
    forward_kl(t, s, reduction="token_mean").backward()
    expected = (torch.softmax(s.detach(), -1) - torch.softmax(t, -1)) / 10
    torch.testing.assert_close(s.grad, expected, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_gradient_wrt_teacher_and_student_together(name):
    t, s = _pair(2, 3, 5, seed=20)
    t1, s1 = t.clone().requires_grad_(True), s.clone().requires_grad_(True)
    divergence(name, t1, s1, reduction="sum").backward()
    # Reference: autograd straight through the (unchunked) formula.
    t2, s2 = t.clone().requires_grad_(True), s.clone().requires_grad_(True)
    lt, ls = torch.log_softmax(t2, -1), torch.log_softmax(s2, -1)
    pt, ps = lt.exp(), ls.exp()
    if name == "forward_kl":
        ref = (pt * (lt - ls)).sum()
    elif name == "reverse_kl":
        ref = (ps * (ls - lt)).sum()
    elif name == "jsd":
        lm = torch.log(0.5 * (pt + ps))
        ref = (0.5 * (pt * (lt - lm)).sum(-1) + 0.5 * (ps * (ls - lm)).sum(-1)).sum()
    else:
        ref = 0.5 * (pt - ps).abs().sum()
    ref.backward()
    torch.testing.assert_close(t1.grad, t2.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-6, rtol=1e-5)
    assert t1.grad.abs().sum() > 0 and s1.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Agreement with torch.nn.functional.kl_div
# ---------------------------------------------------------------------------------------------
def test_forward_kl_matches_torch_kl_div():
    t, s = _pair(3, 4, 9, seed=21)
    # F.kl_div(input, target) computes KL(target || input), so the *student* log-probs go first and
    # the teacher is the target: KL(pT || pS).
    log_s, log_t = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    ref = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(forward_kl(t, s, reduction="token"), ref, atol=1e-6, rtol=1e-5)
    # Reverse KL swaps the roles.
    ref_rev = F.kl_div(
        torch.log_softmax(t, -1), torch.log_softmax(s, -1), log_target=True, reduction="none"
    ).sum(-1)
    torch.testing.assert_close(reverse_kl(t, s, reduction="token"), ref_rev, atol=1e-6, rtol=1e-5)
    # kl_div's "batchmean" on (N, V) equals our token_mean.
    ref_bm = F.kl_div(
        torch.log_softmax(s, -1).flatten(0, 1),
        torch.log_softmax(t, -1).flatten(0, 1),
        log_target=True,
        reduction="batchmean",
    )
    torch.testing.assert_close(forward_kl(t, s, reduction="token_mean"), ref_bm, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Chunking
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "kw"), GRAD_CASES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_chunked_equals_unchunked(name, kw, reduction):
    b, t_len, v = 3, 5, 7
    t, s = _pair(b, t_len, v, seed=22)
    mask = _mask(b, t_len)
    results = {}
    for chunk in (0, 1, 3, None, 100):
        tc, sc = t.clone().requires_grad_(True), s.clone().requires_grad_(True)
        val = _call(name, tc, sc, mask, reduction=reduction, chunk_size=chunk, **kw)
        val.sum().backward()
        results[chunk] = (val.detach(), tc.grad, sc.grad)
    ref = results[0]
    for chunk, got in results.items():
        for a, r in zip(got, ref):
            torch.testing.assert_close(a, r, atol=1e-7, rtol=1e-6, msg=f"chunk_size={chunk}")


def test_negative_chunk_size_rejected():
    t, s = _pair(2, 3, seed=23)
    with pytest.raises(ValueError, match="chunk_size"):
        forward_kl(t, s, chunk_size=-1)


# ---------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "kw"), GRAD_CASES)
def test_underflow_no_nan(name, kw):
    # exp(-300) underflows to 0 in float32 (and -100 - 300 in log space is fine).
    t = torch.tensor([[0.0, -200.0, 100.0], [5.0, 0.0, -150.0]], requires_grad=True)
    s = torch.tensor([[100.0, 0.0, -200.0], [0.0, 1.0, 2.0]], requires_grad=True)
    val = _call(name, t, s, reduction="sum", **kw)
    assert torch.isfinite(val)
    val.backward()
    assert torch.isfinite(t.grad).all() and torch.isfinite(s.grad).all()
    # Compare with float64 (where nothing underflows as badly): the values agree.
    ref = _call(name, t.detach().double(), s.detach().double(), reduction="sum", **kw)
    assert val.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize(("name", "kw"), GRAD_CASES)
def test_shared_neg_inf_padding_column(name, kw):
    # Vocabulary padding: both models give -inf to the same (last) token. Must equal the value on the
    # vocabulary without that column, with finite gradients (0 on the padding column).
    t, s = _pair(2, 3, 5, seed=24)
    ninf = torch.full((2, 3, 1), -float("inf"))
    tp = torch.cat([t, ninf], -1).requires_grad_(True)
    sp = torch.cat([s, ninf], -1).requires_grad_(True)
    val = _call(name, tp, sp, reduction="batch", **kw)
    assert torch.isfinite(val)
    torch.testing.assert_close(val, _call(name, t, s, reduction="batch", **kw))
    val.backward()
    for g in (tp.grad, sp.grad):
        assert torch.isfinite(g).all()
        assert (g[..., -1] == 0).all()
    # Equal inputs with a padding column still give 0 and a zero gradient, no NaN.
    sp2 = tp.detach().clone().requires_grad_(True)
    v0 = _call(name, tp.detach(), sp2, reduction="sum", **kw)
    assert abs(v0.item()) < 1e-5
    v0.backward()
    assert torch.isfinite(sp2.grad).all()


@pytest.mark.parametrize(("name", "kw"), GRAD_CASES)
def test_bfloat16_inputs_computed_in_float32(name, kw):
    t, s = _pair(2, 4, 6, seed=25, dtype=torch.bfloat16)
    sb = s.clone().requires_grad_(True)
    val = _call(name, t, sb, reduction="token_mean", **kw)
    assert val.dtype == torch.float32
    val.backward()
    assert sb.grad.dtype == torch.bfloat16
    assert torch.isfinite(sb.grad.float()).all()
    # Same as the float32 computation on the upcast inputs (upcasting bf16 is exact).
    s32 = s.float().requires_grad_(True)
    ref = _call(name, t.float(), s32, reduction="token_mean", **kw)
    torch.testing.assert_close(val, ref, atol=1e-7, rtol=1e-6)
    ref.backward()
    torch.testing.assert_close(sb.grad, s32.grad.to(torch.bfloat16), atol=1e-4, rtol=1e-2)


def test_float64_kept_in_float64():
    t, s = _pair(2, 3, 5, seed=26, dtype=torch.float64)
    val = forward_kl(t, s, reduction="token")
    assert val.dtype == torch.float64
    ref = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)
    torch.testing.assert_close(val, ref, atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_teacher_from_inference_mode(name):
    t, s = _pair(2, 3, 6, seed=27)
    with torch.inference_mode():
        t_inf = t * 1.0  # an inference tensor, as from a teacher forward pass
    assert t_inf.is_inference()
    s1 = s.clone().requires_grad_(True)
    val = divergence(name, t_inf, s1, reduction="batch")
    val.backward()
    s2 = s.clone().requires_grad_(True)
    divergence(name, t, s2, reduction="batch").backward()
    torch.testing.assert_close(s1.grad, s2.grad)
    assert s1.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_errors():
    t, s = _pair(2, 3, 5, seed=28)
    with pytest.raises(ValueError, match="same shape"):
        forward_kl(t, s[..., :4])
    with pytest.raises(ValueError, match="same shape"):
        divergence("jsd", t, s[:1])
    with pytest.raises(ValueError, match="mask must have shape"):
        forward_kl(t, s, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must have shape"):
        forward_kl(t, s, torch.ones(2, 3, 5, dtype=torch.bool))  # a (..., V) mask is not accepted
    for beta in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="beta must be in"):
            generalized_jsd(t, s, beta=beta)
        with pytest.raises(ValueError, match="beta must be in"):
            divergence("jsd", t, s, beta=beta)
    for temp in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            reverse_kl(t, s, temperature=temp)
    with pytest.raises(ValueError, match="reduction must be one of"):
        total_variation(t, s, reduction="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        divergence("kl", t, s)
    with pytest.raises(ValueError, match="at least one dimension"):
        forward_kl(torch.tensor(1.0), torch.tensor(2.0))


# ---------------------------------------------------------------------------------------------
# 1-D input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DIVERGENCES)
def test_one_dimensional_input(name):
    lp, lq = torch.tensor(P).log(), torch.tensor(Q).log()
    for red in ("token", "sum", "token_mean"):
        val = divergence(name, lp, lq, reduction=red)
        assert val.shape == ()
        assert val.item() == pytest.approx(HAND[name], abs=2e-6)
    masked = divergence(name, lp, lq, torch.tensor(False), reduction="token")
    assert masked.shape == () and masked.item() == 0.0
    for red in ("sequence", "batch"):
        with pytest.raises(ValueError, match="sequence axis"):
            divergence(name, lp, lq, reduction=red)
    with pytest.raises(ValueError, match="mask must have shape"):
        divergence(name, lp, lq, torch.ones(3, dtype=torch.bool), reduction="token")
    # Gradient through the 1-D path.
    s = lq.clone().requires_grad_(True)
    divergence(name, lp, s, reduction="sum").backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Fused analytic gradient (teacher fixed): written during the forward chunk loop, backward only
# scales it. It must equal the recomputing autograd path exactly and be the path actually taken.
# ---------------------------------------------------------------------------------------------
def _student_grad(name, t, s, mask, *, recompute, monkeypatch=None, retain=False, **kw):
    import rl_distill.divergences as div

    s = s.clone().requires_grad_(True)
    if recompute:
        monkeypatch.setattr(div, "_row_value_and_grad", lambda *a, **k: None)
    out = _call(name, t, s, mask, **kw)
    weights = torch.arange(1, out.numel() + 1, dtype=out.dtype).reshape(out.shape)  # distinct per row
    loss = (out * weights).sum()
    loss.backward(retain_graph=retain)
    first = s.grad.clone()
    if retain:  # a second backward of the same graph (the buffer was used up: recompute path)
        s.grad = None
        loss.backward()
        torch.testing.assert_close(s.grad, first, atol=1e-5 * first.abs().max().item(), rtol=0)
    if recompute:
        monkeypatch.undo()
    return out.detach(), first


@pytest.mark.parametrize(("name", "kw"), GRAD_CASES)
@pytest.mark.parametrize("reduction", ["batch", "token", "sequence"])
def test_fused_gradient_equals_recomputed_gradient(name, kw, reduction, monkeypatch):
    b, t_len, v = 3, 4, 7
    t, s = _pair(b, t_len, v, seed=31)
    t[..., 2] = float("-inf")  # a token the teacher never emits (reverse KL is then infinite)
    s[..., 5] = float("-inf")  # a token the student never emits (e.g. a filtered column)
    if name == "reverse_kl" or kw.get("beta") == 1.0:
        t[..., 2] = -30.0  # reverse KL needs pT > 0 wherever pS > 0 to be finite
    mask = _mask(b, t_len)
    common = dict(temperature=0.7, reduction=reduction, chunk_size=2, **kw)
    v_fused, g_fused = _student_grad(name, t, s, mask, recompute=False, retain=True, **common)
    v_ref, g_ref = _student_grad(name, t, s, mask, recompute=True, monkeypatch=monkeypatch, **common)
    _, g_64 = _student_grad(
        name, t.double(), s.double(), mask, recompute=True, monkeypatch=monkeypatch, **common
    )
    torch.testing.assert_close(v_fused, v_ref, atol=0, rtol=0)
    # Both float32 paths round differently; each must be as close to the float64 gradient as the
    # other (a large log-ratio, log pT ~ -43 here, costs both a few ulps of the largest entry).
    err_fused = (g_fused.double() - g_64).abs().max()
    err_ref = (g_ref.double() - g_64).abs().max()
    assert err_fused <= 2 * err_ref + 1e-7 * g_64.abs().max(), (err_fused, err_ref)
    torch.testing.assert_close(g_fused.double(), g_64, atol=1e-5 * g_64.abs().max().item(), rtol=0)
    assert torch.isfinite(g_fused).all() and g_fused.abs().sum() > 0
    assert (g_fused[~mask] == 0).all()


@pytest.mark.parametrize(("name", "kw"), GRAD_CASES)
def test_fused_gradient_gradcheck_float64(name, kw):
    t, s = _pair(2, 3, 5, seed=32, dtype=torch.float64)
    s.requires_grad_(True)
    mask = _mask(2, 3)

    def f(student):
        values = _call(name, t, student, mask, temperature=1.3, reduction="token", chunk_size=2, **kw)
        return values * torch.arange(1, 4, dtype=torch.float64)  # distinct upstream gradient per row

    # gradcheck re-runs backward on one graph: the second run takes the recomputing path, equal to
    # rounding (nondet_tol), which the equality test above checks at float32.
    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-6, rtol=1e-4, nondet_tol=1e-12)


@pytest.mark.parametrize(("name", "kw"), GRAD_CASES)
def test_fused_path_is_taken_only_when_the_teacher_is_fixed(name, kw, monkeypatch):
    import rl_distill.divergences as div

    calls = []
    real = div._row_value_and_grad

    def counting(*a, **k):
        inner = real(*a, **k)

        def wrapped(teacher, student):
            calls.append(teacher.shape[0])
            return inner(teacher, student)

        return wrapped

    monkeypatch.setattr(div, "_row_value_and_grad", counting)
    t, s = _pair(2, 3, 5, seed=33)
    s.requires_grad_(True)
    _call(name, t, s, None, chunk_size=4, **kw).backward()
    assert calls == [4, 2]  # 6 rows in chunks of 4: every row's gradient made in the forward loop
    calls.clear()
    t.requires_grad_(True)  # a teacher that needs a gradient: the recomputing path
    _call(name, t, s, None, chunk_size=4, **kw).backward()
    with torch.no_grad():  # no gradient needed at all: values only
        _call(name, t.detach(), s.detach(), None, chunk_size=4, **kw)
    assert calls == []


def test_fused_gradient_keeps_the_student_dtype():
    t, s = _pair(2, 3, 6, seed=34)
    s = s.to(torch.bfloat16).requires_grad_(True)
    generalized_jsd(t.to(torch.bfloat16), s, beta=0.5).backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()
