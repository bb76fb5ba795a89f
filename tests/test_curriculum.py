"""Tests for rl_distill.curriculum: normalisation, pacing, beta kernel, measured difficulty, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch

from rl_distill.curriculum import (
    CurriculumConfig,
    CurriculumSampler,
    beta_kernel_weights,
    difficulty_scores,
    pacing_fraction,
    quantile_normalise,
)
from rl_distill.tasks import Example, load_task


def _close(a: torch.Tensor, b: list[float]) -> None:
    torch.testing.assert_close(a, torch.tensor(b, dtype=a.dtype))


def test_quantile_normalise_hand_values():
    _close(quantile_normalise(torch.tensor([3.0, 1.0, 2.0])), [5 / 6, 1 / 6, 3 / 6])
    # ties share the mid-rank: 1,1 -> (0 + 2) / 8; 2 -> (2 + 3) / 8; 5 -> (3 + 4) / 8
    _close(quantile_normalise(torch.tensor([1.0, 1.0, 2.0, 5.0])), [0.25, 0.25, 0.625, 0.875])
    _close(quantile_normalise(torch.tensor([7.0])), [0.5])
    # only the order matters
    x = torch.tensor([0.1, 50.0, -3.0, 2.0])
    torch.testing.assert_close(quantile_normalise(x), quantile_normalise(x.exp()))


def test_pacing_fraction_hand_values():
    assert pacing_fraction(0.0) == pytest.approx(0.2)
    assert pacing_fraction(0.25) == pytest.approx(math.sqrt(0.04 + 0.96 * 0.5))  # 0.7211
    assert pacing_fraction(0.5) == 1.0 and pacing_fraction(0.9) == 1.0
    assert pacing_fraction(0.25, kind="linear") == pytest.approx(0.6)
    assert pacing_fraction(0.1, start_fraction=0.5, full_at=1.0, kind="linear") == pytest.approx(0.55)
    with pytest.raises(ValueError, match="pacing"):
        pacing_fraction(0.1, kind="step")  # type: ignore[arg-type]


def test_beta_kernel_hand_values_and_mode():
    # centre 0.5, k = 2: w ∝ d (1 - d) = 0.1875, 0.25, 0.1875 -> 0.3, 0.4, 0.3
    _close(beta_kernel_weights(torch.tensor([0.25, 0.5, 0.75]), 0.5, 2.0), [0.3, 0.4, 0.3])
    _close(beta_kernel_weights(torch.tensor([0.1, 0.5, 0.9]), 0.2, 0.0), [1 / 3] * 3)  # k = 0: uniform
    grid = torch.linspace(0.001, 0.999, 999)
    for center in (0.0, 0.3, 0.8, 1.0):
        w = beta_kernel_weights(grid, center, 8.0)
        assert float(grid[w.argmax()]) == pytest.approx(min(max(center, 0.001), 0.999), abs=1.1e-3)
        assert float(w.sum()) == pytest.approx(1.0)


def test_easy_to_hard_pool_grows():
    difficulty = list(range(9, -1, -1))  # example 9 is the easiest, example 0 the hardest
    cfg = CurriculumConfig(mode="easy_to_hard", pacing="linear", start_fraction=0.2, full_at=0.5)
    s = CurriculumSampler(difficulty, cfg, seed=0)
    p0 = s.probabilities(0, 100)
    assert p0.nonzero().flatten().tolist() == [8, 9] and p0[9] == 0.5
    p25 = s.probabilities(25, 100)  # 0.2 + 0.8 * 0.5 = 0.6 of the data: the 6 easiest
    assert p25.nonzero().flatten().tolist() == [4, 5, 6, 7, 8, 9]
    _close(s.probabilities(50, 100), [0.1] * 10)
    assert sorted(s.next_indices(0, 100, 2)) == [8, 9]  # without replacement
    assert set(s.next_indices(0, 100, 5)) <= {8, 9}  # pool smaller than the batch: with replacement
    sizes = [int((s.probabilities(k, 100) > 0).sum()) for k in range(0, 101, 5)]
    assert sizes == sorted(sizes)


def test_easy_to_hard_ties_use_a_seeded_order():
    cfg = CurriculumConfig(mode="easy_to_hard", start_fraction=0.3)

    def pool(seed):
        probs = CurriculumSampler(None, cfg, seed=seed, num_examples=10).probabilities(0, 10)
        return probs.nonzero().flatten().tolist()

    pools = [pool(k) for k in (0, 0, 1)]
    assert len(pools[0]) == 3 and pools[0] == pools[1] and pools[0] != pools[2]


def test_frontier_hand_values_and_moving_centre():
    # static [1, 2, 3] -> q = 1/6, 1/2, 5/6; centre 0.5, k = 2: w ∝ q (1 - q) = 5/36, 9/36, 5/36.
    cfg = CurriculumConfig(mode="frontier", frontier_start=0.5, frontier_end=0.5, concentration=2.0)
    _close(CurriculumSampler([1.0, 2.0, 3.0], cfg).probabilities(3, 10), [5 / 19, 9 / 19, 5 / 19])
    s = CurriculumSampler(list(range(20)), CurriculumConfig(mode="frontier"), seed=0)
    d = s.difficulty()
    means = [float((s.probabilities(k, 10) * d).sum()) for k in range(11)]
    assert means == sorted(means) and means[0] < 0.25 and means[-1] > 0.75
    # early draws are easier than late ones
    early = [i for _ in range(20) for i in s.next_indices(0, 10, 4)]
    late = [i for _ in range(20) for i in s.next_indices(10, 10, 4)]
    assert sum(early) / len(early) < 7 < 12 < sum(late) / len(late)
    # a batch of every example is a permutation (no repeats)
    assert sorted(s.next_indices(5, 10, 20)) == list(range(20))


def test_measured_difficulty_running_score_and_mix():
    cfg = CurriculumConfig(measured_weight=1.0, measured_momentum=0.5)
    s = CurriculumSampler([1.0, 2.0, 3.0], cfg)
    _close(s.difficulty(), [1 / 6, 1 / 2, 5 / 6])  # nothing measured: the static order
    s.update([0], [4.0])
    s.update(torch.tensor([0, 2]), torch.tensor([2.0, 0.0]))  # example 0: 0.5 * 4 + 0.5 * 2 = 3
    s.update([1, 1], [2.0, 4.0])  # in turn: 2, then 3
    torch.testing.assert_close(s.measured, torch.tensor([3.0, 3.0, 0.0], dtype=torch.float64))
    # among measured [3, 3, 0]: q = 0.5, 0.5, 1/6 (ties share the mid-rank)
    _close(s.difficulty(), [4 / 6, 4 / 6, 1 / 6])
    half = CurriculumSampler([1.0, 2.0, 3.0], CurriculumConfig(measured_weight=0.5))
    half.update([0, 2], [10.0, 0.0])  # measured: 0 hard (3/4), 2 easy (1/4); 1 unmeasured keeps 1/2
    _close(half.difficulty(), [(1 / 6 + 3 / 4) / 2, 1 / 2, (5 / 6 + 1 / 4) / 2])
    ignored = CurriculumSampler([1.0, 2.0, 3.0], CurriculumConfig(measured_weight=0.0))
    ignored.update([0], [99.0])
    _close(ignored.difficulty(), [1 / 6, 1 / 2, 5 / 6])
    for bad in (([5], [1.0]), ([0], [float("nan")]), ([0, 1], [1.0])):
        with pytest.raises(ValueError):
            s.update(*bad)


def test_measured_difficulty_moves_the_frontier():
    cfg = CurriculumConfig(mode="frontier", frontier_start=0.0, frontier_end=0.0, measured_weight=1.0)
    s = CurriculumSampler([1.0, 2.0, 3.0, 4.0], cfg)
    assert int(s.probabilities(0, 1).argmax()) == 0
    s.update([0, 1, 2, 3], [5.0, 4.0, 3.0, 0.1])  # the student finds example 3 easiest
    assert int(s.probabilities(0, 1).argmax()) == 3


def test_deterministic_under_the_seed():
    cfg = CurriculumConfig(mode="frontier")
    a, b, c = (CurriculumSampler(list(range(50)), cfg, seed=k) for k in (3, 3, 4))
    draws = [[x.next_indices(k, 10, 8) for k in range(5)] for x in (a, b, c)]
    assert draws[0] == draws[1] and draws[0] != draws[2]


@pytest.mark.parametrize("mode", ["easy_to_hard", "frontier"])
def test_resume_draws_the_same_batches(mode):
    cfg = CurriculumConfig(mode=mode, measured_weight=0.5)
    s = CurriculumSampler([float(i % 7) for i in range(40)], cfg, seed=11)

    def five_more(sampler, start):
        out = []
        for k in range(start, start + 5):
            idx = sampler.next_indices(k, 20, 6)
            sampler.update(idx, [float((i * 7 + k) % 5) for i in idx])  # measured difficulty changes too
            out.append(idx)
        return out

    five_more(s, 0)
    buffer = io.BytesIO()
    torch.save(s.state_dict(), buffer)  # as in a checkpoint's trainer_state.pt
    first = five_more(s, 5)
    restored = CurriculumSampler([float(i % 7) for i in range(40)], cfg, seed=999)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert five_more(restored, 5) == first
    assert restored.draws == s.draws == 10
    with pytest.raises(ValueError, match="other difficulties"):
        CurriculumSampler([0.0] * 40, cfg).load_state_dict(s.state_dict())


def test_difficulty_scores_sources():
    examples = [
        Example("abc", "x", {"ops": 2}),
        Example("a", None, {"ops": 5}),
        Example("abcdef", "xyz", {"ops": 1, "name": "n"}),
    ]
    assert difficulty_scores(examples, "prompt_length") == [3.0, 1.0, 6.0]
    assert difficulty_scores(examples, "reference_length") == [1.0, 0.0, 3.0]
    assert difficulty_scores(examples, "ops") == [2.0, 5.0, 1.0]
    assert difficulty_scores(examples, lambda ex: ex.metadata["ops"] * 10) == [20.0, 50.0, 10.0]
    with pytest.raises(ValueError, match="example 0 has no metadata field 'name'"):
        difficulty_scores(examples, "name")
    with pytest.raises(ValueError, match="non-numeric"):
        difficulty_scores([Example("a", None, {"k": "hard"})], "k")
    with pytest.raises(ValueError, match="non-finite"):
        difficulty_scores([Example("a")], lambda ex: math.inf)


def test_from_examples_on_the_arithmetic_task():
    task = load_task("arithmetic", seed=0, num_train=32, num_eval=4)
    cfg = CurriculumConfig(mode="easy_to_hard", difficulty="prompt_length", start_fraction=0.25)
    s = CurriculumSampler.from_examples(task.train, cfg, seed=0)
    pool = s.probabilities(0, 10).nonzero().flatten().tolist()
    lengths = [len(ex.prompt) for ex in task.train]
    assert len(pool) == 8 and max(lengths[i] for i in pool) <= sorted(lengths)[8]
    # operations count from the equation metadata, as a function
    ops = difficulty_scores(task.train, lambda ex: sum(ex.metadata["equation"].count(c) for c in "+-"))
    assert set(ops) == {2.0}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mode": "random"}, "mode"),
        ({"pacing": "step"}, "pacing"),
        ({"start_fraction": 0.0}, "start_fraction"),
        ({"full_at": 1.5}, "full_at"),
        ({"frontier_start": -0.1}, "frontier_start"),
        ({"frontier_end": float("nan")}, "frontier_end"),
        ({"concentration": -1.0}, "concentration"),
        ({"measured_weight": 2.0}, "measured_weight"),
        ({"measured_momentum": 1.0}, "measured_momentum"),
    ],
)
def test_config_checks_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        CurriculumConfig(**kwargs)


def test_sampler_argument_checks():
    with pytest.raises(ValueError, match="num_examples"):
        CurriculumSampler(None)
    with pytest.raises(ValueError, match="finite"):
        CurriculumSampler([1.0, math.nan])
    with pytest.raises(ValueError, match="batch_size"):
        CurriculumSampler([1.0]).next_indices(0, 1, 0)
    assert CurriculumSampler([1.0]).next_indices(0, 1, 3) == [0, 0, 0]
