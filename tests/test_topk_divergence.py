"""Top-k (sparse) teacher divergences: exact at k = V, never above the full value, hand-computed cases, GKD option."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from rl_distill.agents import GKDAgent, GKDConfig
from rl_distill.config import ConfigError, config_from_dict
from rl_distill.divergences import (
    TOPK_TAIL_FLOOR,
    divergence,
    topk_coarse_logprobs,
    topk_divergence,
    topk_forward_kl,
    topk_generalized_jsd,
    topk_reverse_kl,
)
from rl_distill.tasks import Example

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the benchmarks package, for its smoke test
    sys.path.insert(0, str(ROOT))

NAMES = ["forward_kl", "reverse_kl", "jsd", "tv"]


def random_logits(b=3, t=5, v=13, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, v, generator=gen) * scale, torch.randn(b, t, v, generator=gen) * scale


def teacher_topk(teacher_logits, k, temperature=1.0):
    lp = torch.log_softmax(teacher_logits / temperature, -1)
    out = lp.topk(k, dim=-1)
    return out.values, out.indices


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.9, 1.0])
def test_k_equal_to_vocab_is_the_full_divergence_value_and_gradient(name, beta):
    t, s = random_logits()
    s.requires_grad_(True)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    vals, ids = teacher_topk(t, t.shape[-1])
    sparse = topk_divergence(name, vals, ids, s, mask, beta=beta, temperature=1.3, reduction="batch")
    (g_sparse,) = torch.autograd.grad(sparse, s)
    full = divergence(name, t, s, mask, beta=beta, temperature=1.3, reduction="batch")
    (g_full,) = torch.autograd.grad(full, s)
    # The teacher's top-V log-probs at temperature 1.3 are its full distribution at that temperature.
    vals13, ids13 = teacher_topk(t, t.shape[-1], temperature=1.3)
    sparse13 = topk_divergence(name, vals13, ids13, s, mask, beta=beta, temperature=1.3, reduction="batch")
    torch.testing.assert_close(sparse13, full, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(sparse, full)  # the teacher's log-probs are used as given (temperature 1)
    (g13,) = torch.autograd.grad(
        topk_divergence(name, vals13, ids13, s, mask, beta=beta, temperature=1.3, reduction="batch"), s
    )
    torch.testing.assert_close(g13, g_full, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(g_sparse).all()


@pytest.mark.parametrize("name", NAMES)
def test_coarse_graining_never_raises_the_divergence(name):
    """Data-processing inequality: D_k <= D for every k, position and beta; equality at k = V."""
    t, s = random_logits(b=4, t=16, v=23, seed=1, scale=2.5)
    full = divergence(name, t, s, beta=0.4, reduction="token")  # (B, T)
    last = None
    for k in [1, 2, 5, 11, 23]:  # (k = V - 1 would test float32 resolution of a ~1e-6 tail)
        vals, ids = teacher_topk(t, k)
        sparse = topk_divergence(name, vals, ids, s, beta=0.4, reduction="token")
        assert (sparse <= full + 1e-5).all(), (k, (sparse - full).max())
        last = sparse
    torch.testing.assert_close(last, full, atol=1e-5, rtol=1e-5)
    # Strictly below somewhere for small k: the bias is real, not zero.
    vals, ids = teacher_topk(t, 2)
    assert (topk_divergence(name, vals, ids, s, beta=0.4, reduction="token") < full - 1e-3).any()


def test_hand_computed_three_token_case():
    """V = 3, pT = (0.5, 0.3, 0.2), pS = (0.2, 0.5, 0.3); k = 1 keeps token 0 and a tail of the rest."""
    p_t, p_s = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    t_vals, t_ids = p_t.log().topk(1)
    s_logits = p_s.log()
    # Coarse: teacher (0.5, 0.5), student (0.2, 0.8).
    fkl = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    rkl = 0.2 * math.log(0.2 / 0.5) + 0.8 * math.log(0.8 / 0.5)
    m = (0.35, 0.65)  # JSD(0.5) mixture
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.2 * math.log(0.2 / m[0]) + 0.8 * math.log(0.8 / m[1])
    )
    got = {
        "fkl": topk_forward_kl(t_vals, t_ids, s_logits, reduction="sum"),
        "rkl": topk_reverse_kl(t_vals, t_ids, s_logits, reduction="sum"),
        "jsd": topk_generalized_jsd(t_vals, t_ids, s_logits, beta=0.5, reduction="sum"),
        "tv": topk_divergence("tv", t_vals, t_ids, s_logits, reduction="sum"),
    }
    assert float(got["fkl"]) == pytest.approx(fkl, abs=1e-6)  # 0.22314
    assert float(got["rkl"]) == pytest.approx(rkl, abs=1e-6)  # 0.19274
    assert float(got["jsd"]) == pytest.approx(jsd, abs=1e-6)
    assert float(got["tv"]) == pytest.approx(0.3, abs=1e-6)
    # k = 2 leaves one token in the tail: coarse-graining loses nothing.
    t2, i2 = p_t.log().topk(2)
    exact = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3)
    assert float(topk_forward_kl(t2, i2, s_logits, reduction="sum")) == pytest.approx(exact, abs=1e-6)


def test_no_bias_when_the_tails_have_the_same_shape():
    """Equality in the data-processing inequality: pS restricted to the tail is proportional to pT there."""
    p_t = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    tail_s = p_t[2:] / p_t[2:].sum() * 0.6  # the teacher's tail shape, with the student's tail mass 0.6
    p_s = torch.cat([torch.tensor([0.1, 0.3]), tail_s])
    vals, ids = p_t.log().topk(2)
    for name in ["forward_kl", "reverse_kl", "jsd"]:
        full = divergence(name, p_t.log(), p_s.log(), reduction="sum")
        sparse = topk_divergence(name, vals, ids, p_s.log(), reduction="sum")
        assert float(sparse) == pytest.approx(float(full), abs=1e-6), name


def test_coarse_logprobs_and_tail_floor():
    lp = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), -1)
    vals, ids = lp.topk(2)
    log_t, log_s = topk_coarse_logprobs(vals, ids, lp)
    torch.testing.assert_close(log_t.exp().sum(-1), torch.ones(1))
    torch.testing.assert_close(log_t, log_s)  # same distribution: same coarse distribution
    torch.testing.assert_close(log_s[0, 2].exp(), lp[0, 2:].exp().sum())
    # A teacher whose top-1 carries all of float32's mass: the tail is floored, not -inf.
    sharp = torch.log_softmax(torch.tensor([[40.0, 0.0, 0.0, 0.0]]), -1)
    v1, i1 = sharp.topk(1)
    log_t, _ = topk_coarse_logprobs(v1, i1, lp)
    assert float(log_t[0, 1]) == pytest.approx(math.log(TOPK_TAIL_FLOOR))


def test_sharp_teacher_gives_finite_values_and_gradients():
    t, s = random_logits(v=17, seed=3)
    t[..., 0] += 60.0  # top-1 mass rounds to 1 in float32
    s.requires_grad_(True)
    for name in NAMES:
        for k in (1, 4, 17):
            vals, ids = teacher_topk(t, k)
            out = topk_divergence(name, vals, ids, s, beta=0.5)
            (g,) = torch.autograd.grad(out, s)
            assert torch.isfinite(out) and torch.isfinite(g).all(), (name, k)


def test_mask_equals_dropping_and_chunking_changes_nothing():
    t, s = random_logits(b=2, t=6, v=11, seed=4)
    vals, ids = teacher_topk(t, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    s.requires_grad_(True)
    per_seq = topk_divergence("jsd", vals, ids, s, mask, beta=0.2, reduction="sequence", chunk_size=1)
    for row in range(2):
        n = int(mask[row].sum())
        alone = topk_divergence(
            "jsd", vals[row, :n], ids[row, :n], s[row, :n], beta=0.2, reduction="token_mean"
        )
        torch.testing.assert_close(per_seq[row], alone)
    grads = []
    for chunk in (None, 0, 1, 4):
        loss = topk_divergence("reverse_kl", vals, ids, s, mask, reduction="batch", chunk_size=chunk)
        grads.append(torch.autograd.grad(loss, s)[0])
        assert (grads[-1][~mask] == 0).all()
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0])


def test_gradient_matches_a_plain_autograd_reference():
    """The chunked custom backward equals autograd through an unchunked, written-out coarse KL."""
    t, s = random_logits(b=2, t=3, v=9, seed=5)
    vals, ids = teacher_topk(t, 3)
    s.requires_grad_(True)
    (g,) = torch.autograd.grad(topk_forward_kl(vals, ids, s, reduction="sum", temperature=0.7), s)
    s2 = s.detach().clone().requires_grad_(True)
    log_s = torch.log_softmax(s2 / 0.7, -1)
    s_top = log_s.gather(-1, ids)
    s_tail = torch.log1p(-s_top.exp().sum(-1, keepdim=True))
    t_tail = torch.log1p(-vals.exp().sum(-1, keepdim=True))
    lt, ls = torch.cat([vals, t_tail], -1), torch.cat([s_top, s_tail], -1)
    ref = (lt.exp() * (lt - ls)).sum()
    (g_ref,) = torch.autograd.grad(ref, s2)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 14}, "k must be in"),
        ({"ids_shift": 13}, "must lie in"),
        ({"name": "hellinger"}, "unknown divergence"),
        ({"bad_shape": True}, "same shape"),
    ],
)
def test_topk_divergence_errors(kwargs, message):
    t, s = random_logits(v=13)
    k = kwargs.get("k", 3)
    if k > 13:
        vals, ids = torch.zeros(3, 5, k), torch.zeros(3, 5, k, dtype=torch.long)
    else:
        vals, ids = teacher_topk(t, k)
    ids = ids + kwargs.get("ids_shift", 0)
    if kwargs.get("bad_shape"):
        vals = vals[..., :2]
    with pytest.raises(ValueError, match=message):
        topk_divergence(kwargs.get("name", "jsd"), vals, ids, s)


# --- GKD option agent.teacher_topk ------------------------------------------------------------
PROMPTS = ["1+2=", "ab", "hello", "x y z"]


def make_agent(engine, **cfg):
    opt = torch.optim.SGD(engine.student.parameters(), lr=1e-3)
    return GKDAgent(
        engine, opt, GKDConfig(max_new_tokens=6, **cfg), generator=torch.Generator().manual_seed(0)
    )


def test_gkd_topk_at_full_width_equals_the_full_loss_and_gradient(engine):
    vocab = engine.vocab_size
    losses, grads = [], []
    for topk in (None, vocab):
        agent = make_agent(engine, divergence="jsd", beta=0.3, teacher_topk=topk, temperature=0.8)
        rollouts, _ = agent.collect([Example(p) for p in PROMPTS])
        if topk is not None:
            assert rollouts[0].teacher_logits is None and rollouts[0].teacher_topk_ids.shape[-1] == vocab
        engine.student.zero_grad()
        loss, _ = agent.loss(rollouts)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in engine.student.parameters()])
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


def test_gkd_topk_loss_is_the_topk_divergence_of_the_engines_topk(engine):
    agent = make_agent(engine, divergence="forward_kl", teacher_topk=4, teacher_temperature=1.5)
    rollouts, _ = agent.collect([Example(p) for p in PROMPTS])
    r = rollouts[0]
    loss, _ = agent.loss(rollouts)
    # The same sequences scored by the engine at the teacher temperature, then the top-k divergence.
    again = engine.score(
        engine.from_completions(PROMPTS, [row[m].tolist() for row, m in zip(r.completion_ids, r.completion_mask)],
                                append_eos=False),
        teacher_output="full",
    )  # fmt: skip
    full_lp = torch.log_softmax(again.teacher_logits.float() / 1.5, -1)
    vals, ids = full_lp.topk(4, dim=-1)
    student = engine.score_student(r)
    expected = topk_forward_kl(vals, ids, student, r.completion_mask, reduction="batch")
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    full = divergence("forward_kl", again.teacher_logits * (1 / 1.5), student, r.completion_mask)
    assert float(loss.detach()) <= float(full.detach()) + 1e-6


@pytest.mark.parametrize(
    "agent, message",
    [
        ({"teacher_topk": 0}, "agent.teacher_topk must be a positive integer"),
        ({"teacher_topk": True}, "agent.teacher_topk"),
        (
            {"teacher_topk": 8, "target": "one_hot", "lmbda": 0.0, "divergence": "forward_kl"},
            "no teacher distribution",
        ),
        ({"teacher_topk": 8, "token_weighting": "tip_weight"}, "token_weighting"),
    ],
)
def test_teacher_topk_config_checks(agent, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"agent": {"name": "gkd", **agent}})


def test_teacher_topk_above_the_vocabulary_is_refused(engine):
    with pytest.raises(
        ValueError, match=rf"agent.teacher_topk: must be <= the vocabulary size {engine.vocab_size}"
    ):
        make_agent(engine, teacher_topk=engine.vocab_size + 1)


# --- the benchmark script ----------------------------------------------------------------------
def test_benchmark_smoke_run_and_report_only(tmp_path):
    from benchmarks import topk_divergence as bench

    out, page = tmp_path / "r.json", tmp_path / "p.md"
    argv = ["--model", "tiny", "--student-layers", "2", "3", "--batch-size", "2", "--max-new-tokens", "4"]
    argv += ["--seeds", "0", "--ks", "2", "8", "--repeats", "1", "--cache-examples", "2"]
    argv += ["--out", str(out), "--page", str(page)]
    data = bench.main(argv)
    assert set(data["summary"]) == {"2", "3"}
    on = data["summary"]["2"]["student_samples"]
    for name in ("jsd", "forward_kl", "reverse_kl"):
        assert on[name]["exact_at_V_max"] < 1e-5  # k = V is the full divergence
        for k in ("2", "8"):
            assert on[name][k]["rel_bias"]["max"] <= 1e-6  # data-processing inequality
            assert -1.0 <= on[name][k]["cos_params"]["min"] <= 1.0
        assert on[name]["8"]["rel_bias"]["mean"] > on[name]["2"]["rel_bias"]["mean"]  # more k, less bias
    assert data["sizes"]["cache_float32"]["8"] == 8 * 8 + 8
    # The real cache: its bytes per token are the payload plus the shard headers and offsets.
    built = {(c["k"], c["dtype"]): c["bytes_per_token"] for c in data["cache_build"]}
    assert built[(8, "float32")] > 8 * 8 + 8 and built[(8, "bfloat16")] < built[(8, "float32")]
    text = page.read_text()
    assert (
        "| jsd |" in text
        and "top-8 cache shard, bfloat16" in text
        and "## Student with 3 of 4 layers" in text
    )
    page.unlink()
    bench.main([*argv, "--report-only"])  # the page again, from the JSON alone
    assert page.read_text() == text


def test_recorded_page_is_written_from_its_json():
    from benchmarks import topk_divergence as bench

    if not bench.RESULT.is_file():
        pytest.skip("benchmarks/results/topk_divergence.json not recorded yet")
    data = json.loads(bench.RESULT.read_text())
    assert bench.PAGE.read_text() == bench.render(data) + "\n"


@pytest.mark.parametrize("overrides", [{"lmbda": 1.0}, {"lmbda": 0.5, "divergence": "forward_kl"}])
def test_gkd_topk_with_gradient_accumulation_is_the_whole_batch_step(overrides):
    from test_grad_accum import assert_same_step, step_delta

    config = GKDConfig(max_new_tokens=4, teacher_topk=5, **overrides)
    assert_same_step(step_delta(GKDAgent, config, 1), step_delta(GKDAgent, config, 2))
