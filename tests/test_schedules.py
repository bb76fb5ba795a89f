"""Tests for rl_distill.schedules: hand values, jumps, presets, spec parsing and its errors, round trip."""

from __future__ import annotations

import math

import pytest

from rl_distill.schedules import (
    PRESETS,
    Schedule,
    constant,
    industrial,
    parse_schedule,
    piecewise_linear,
    progress,
    warmup_then_onpolicy,
)

JUMPY = [[0.0, 0.0], [0.2, 0.3], [0.6, 0.7], [0.6, 1.0], [1.0, 1.0]]


def test_progress_clamps_and_checks():
    assert progress(0, 10) == 0.0
    assert progress(3, 10) == 0.3
    assert progress(10, 10) == 1.0
    assert progress(15, 10) == 1.0
    with pytest.raises(ValueError, match="total_steps"):
        progress(0, 0)
    with pytest.raises(ValueError, match="step"):
        progress(-1, 10)


def test_constant():
    s = parse_schedule(0.25, "agent.lmbda")
    assert s == constant(0.25)
    assert s.is_constant
    assert [s.value(k, 7) for k in range(8)] == [0.25] * 8
    assert parse_schedule(1, "agent.lmbda").value(3, 5) == 1.0  # ints are numbers too


def test_piecewise_linear_hand_values_and_jump():
    s = parse_schedule({"schedule": JUMPY}, "agent.lmbda")
    # p = 0.1: halfway 0 -> 0.3; p = 0.4: halfway 0.3 -> 0.7; p = 0.6: the later knot wins.
    assert s.at(0.0) == 0.0
    assert s.at(0.1) == pytest.approx(0.15)
    assert s.at(0.2) == pytest.approx(0.3)
    assert s.at(0.4) == pytest.approx(0.5)
    assert s.at(0.5999999) == pytest.approx(0.7, abs=1e-6)
    assert s.at(0.6) == 1.0
    assert s.at(0.8) == 1.0
    # Through (step, total_steps): step 6 of 10 is p = 0.6 exactly, so already 1.0.
    assert s.value(6, 10) == 1.0
    assert s.value(3, 5) == 1.0
    assert s.value(5, 10) == pytest.approx(0.6)
    assert not s.is_constant


def test_flat_outside_the_knots():
    knots = [(0.25, 2.0), (0.75, 4.0)]
    assert piecewise_linear(knots, 0.0) == 2.0
    assert piecewise_linear(knots, 0.5) == pytest.approx(3.0)
    assert piecewise_linear(knots, 1.0) == 4.0
    s = parse_schedule({"schedule": knots}, "agent.temperature", low=0.1, high=10.0)
    assert s.at(-3.0) == 2.0 and s.at(7.0) == 4.0  # clamped progress


def test_industrial_preset_matches_tutorial():
    s = parse_schedule({"preset": "industrial"}, "agent.lmbda")
    # First 20% lambda = 0, next 40% ramping 0.3 -> 0.7, final 40% lambda = 1 (tutorial ch. 7).
    assert s.value(0, 100) == 0.0
    assert s.value(19, 100) == 0.0
    assert s.value(20, 100) == pytest.approx(0.3)
    assert s.value(40, 100) == pytest.approx(0.5)
    assert s.value(59, 100) == pytest.approx(0.3 + 0.4 * 39 / 40)
    assert s.value(60, 100) == 1.0
    assert s.value(99, 100) == 1.0
    assert s == industrial()


def test_warmup_then_onpolicy_preset():
    s = parse_schedule({"preset": "warmup_then_onpolicy", "warmup": 0.2, "ramp": 0.4}, "agent.lmbda")
    assert s.at(0.1) == 0.0
    assert s.at(0.2) == 0.0
    assert s.at(0.4) == pytest.approx(0.5)
    assert s.at(0.6) == 1.0
    assert s.at(0.9) == 1.0
    default = warmup_then_onpolicy()
    assert default.at(0.05) == 0.0 and default.at(0.25) == pytest.approx(0.5) and default.at(0.4) == 1.0
    jump = warmup_then_onpolicy(warmup=0.5, ramp=0.0)  # ramp 0: a jump
    assert jump.at(0.49) == 0.0 and jump.at(0.5) == 1.0


@pytest.mark.parametrize(
    "spec",
    [
        0.3,
        {"schedule": JUMPY},
        {"schedule": [[0.5, 0.2]]},
        {"preset": "industrial"},
        {"preset": "industrial", "warmup": 0.1, "mixed_end": 0.9},
        {"preset": "warmup_then_onpolicy", "ramp": 0.0},
    ],
)
def test_to_spec_round_trip(spec):
    s = parse_schedule(spec, "agent.lmbda")
    again = parse_schedule(s.to_spec(), "agent.lmbda")
    assert again == s
    assert [again.at(k / 20) for k in range(21)] == [s.at(k / 20) for k in range(21)]


def test_to_spec_forms():
    assert parse_schedule(0.3, "x").to_spec() == 0.3
    assert parse_schedule({"schedule": JUMPY}, "x").to_spec() == {"schedule": JUMPY}
    assert parse_schedule({"preset": "industrial"}, "x").to_spec() == {
        "preset": "industrial", "warmup": 0.2, "mixed": 0.4, "mixed_start": 0.3, "mixed_end": 0.7,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (1.5, r"outside \[0.0, 1.0\]"),
        (-0.1, "outside"),
        (True, "expected a number"),
        ("0.5", "expected a number"),
        ({"schedule": []}, "must not be empty"),
        ({"schedule": [[0.0, 0.1], [0.5, float("nan")]]}, "finite"),
        ({"schedule": [[0.0, 0.1], [1.5, 0.2]]}, r"progress must be in \[0, 1\]"),
        ({"schedule": [[-0.1, 0.1]]}, "progress must be in"),
        ({"schedule": [[0.5, 0.1], [0.2, 0.2]]}, "knots must be sorted by progress, got"),
        ({"schedule": [[0.0, 0.1], [1.0, 2.0]]}, "outside"),
        ({"schedule": [[0.0, 0.1, 0.3]]}, r"\[progress, value\] pair"),
        ({"schedule": "0.1"}, "list of"),
        ({"schedule": [[0.0, 0.1]], "extra": 1}, "unexpected keys"),
        ({"preset": "fancy"}, "unknown preset 'fancy'; known presets: industrial, warmup_then_onpolicy"),
        ({"preset": "industrial", "ramp": 0.1}, "unknown parameters"),
        ({"preset": "industrial", "warmup": 0.7, "mixed": 0.5}, "must be <= 1"),
        ({"preset": "warmup_then_onpolicy", "warmup": float("nan")}, "finite"),
        ({"start": 0.1}, "needs a 'schedule' or a 'preset'"),
        ([0.1, 0.2], "expected a number"),
    ],
)
def test_bad_specs_name_the_field(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_schedule(spec, "agent.lmbda")
    assert str(info.value).startswith("agent.lmbda: ")


def test_range_is_the_fields():
    # A temperature may exceed 1 but not reach 0; the preset is checked against the range too.
    assert parse_schedule({"schedule": [[0.0, 2.0], [1.0, 0.5]]}, "agent.temperature", low=0.1, high=5).at(
        0.5
    ) == pytest.approx(1.25)
    with pytest.raises(ValueError, match=r"^agent.temperature: value 0.0 is outside"):
        parse_schedule({"preset": "industrial"}, "agent.temperature", low=0.1, high=5.0)
    with pytest.raises(ValueError, match="^agent.alpha: value 1.0 is outside"):
        parse_schedule(constant(1.0), "agent.alpha", low=0.0, high=0.5)
    assert parse_schedule(1e6, "x", low=-math.inf, high=math.inf).at(0.3) == 1e6


def test_unsorted_message_shows_the_knots():
    with pytest.raises(ValueError) as info:
        parse_schedule({"schedule": [[0.0, 0.0], [0.6, 0.5], [0.4, 0.6]]}, "agent.lmbda")
    assert str(info.value).startswith(
        "agent.lmbda: knots must be sorted by progress, got [[0.0, 0.0], [0.6, 0.5]"
    )


def test_presets_registry_and_direct_construction_checks():
    assert sorted(PRESETS) == ["industrial", "warmup_then_onpolicy"]
    with pytest.raises(ValueError, match="sorted"):
        Schedule(((0.5, 0.0), (0.1, 1.0)))
    with pytest.raises(ValueError, match="industrial: mixed_start"):
        industrial(mixed_start=1.2)
