"""Schedules of a config value (lambda, alpha, temperature, ...) over training progress.

A schedule is a pure function of ``(step, total_steps)``: the progress ``p = step / total_steps`` is
clamped to ``[0, 1]`` and mapped to a value. ``step`` counts the updates done before the current one,
so the first update sees ``p = 0`` and the last one ``p = (total_steps - 1) / total_steps``. Because
the value depends on nothing else, a resumed run that restores ``step`` restores every schedule.

Every schedule is a piecewise-linear function given by knots ``(progress, value)``, sorted by
progress:

- before the first knot the value is the first knot's value, after the last knot the last one's;
- between two knots it is the linear interpolation;
- a progress may repeat to make a vertical jump: at a repeated progress the *later* knot's value
  holds from that point on. ``[[0.0, 0.0], [0.2, 0.3], [0.6, 0.7], [0.6, 1.0], [1.0, 1.0]]`` ramps
  0 -> 0.3 -> 0.7 over ``[0, 0.6)``, then jumps to 1.0 at ``p = 0.6`` exactly.

Config specs accepted by :func:`parse_schedule` (the form in YAML files and CLI overrides):

- a plain number: a constant, e.g. ``lmbda: 0.5``;
- ``{"schedule": [[p, v], ...]}``: knots as above;
- ``{"preset": "industrial"}`` or ``{"preset": "warmup_then_onpolicy", "warmup": 0.1, "ramp": 0.3}``:
  the named schedules of the tutorial (``reference/on-policy-distillation-tutorial.txt``), with
  optional parameters (see :data:`PRESETS`, :func:`industrial`, :func:`warmup_then_onpolicy`).

:meth:`Schedule.to_spec` gives the spec back (``parse_schedule(s.to_spec(), name) == s``), for
hyper-parameter logging and for writing the resolved config to YAML.

Wiring (for the trainer and agents): parse each schedulable field once at config load time with its
field name and range, e.g. ``parse_schedule(cfg.lmbda, "agent.lmbda")``, and read
``schedule.value(step, total_steps)`` at the start of every update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Knots = tuple[tuple[float, float], ...]


def progress(step: int, total_steps: int) -> float:
    """Training progress ``step / total_steps`` clamped to ``[0, 1]``.

    Raises:
        ValueError: if ``total_steps < 1`` or ``step < 0``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return min(1.0, step / total_steps)


def piecewise_linear(knots: Sequence[tuple[float, float]], p: float) -> float:
    """Value at progress ``p`` of the piecewise-linear function through ``knots`` (module docstring).

    Args:
        knots: ``(progress, value)`` pairs, sorted by progress (a progress may repeat: a jump).
        p: progress.
    """
    # The last knot at or before p decides: with a repeated progress that is the later knot.
    i = -1
    for k, (kp, _) in enumerate(knots):
        if kp <= p:
            i = k
        else:
            break
    if i == -1:
        return float(knots[0][1])
    if i == len(knots) - 1:
        return float(knots[-1][1])
    (p0, v0), (p1, v1) = knots[i], knots[i + 1]  # p0 <= p < p1, so p1 > p0
    return float(v0 + (v1 - v0) * (p - p0) / (p1 - p0))


def _check_knots(knots: Sequence[Any], field_name: str, low: float, high: float) -> Knots:
    """Validated knots as a tuple of float pairs; every error names ``field_name``."""
    if isinstance(knots, str | bytes) or not isinstance(knots, Sequence):
        raise ValueError(
            f"{field_name}: schedule knots must be a list of [progress, value] pairs, got {knots!r}"
        )
    if len(knots) == 0:
        raise ValueError(f"{field_name}: schedule knots must not be empty")
    out = []
    for knot in knots:
        if isinstance(knot, str | bytes) or not isinstance(knot, Sequence) or len(knot) != 2:
            raise ValueError(f"{field_name}: each knot must be a [progress, value] pair, got {knot!r}")
        p, v = (_number(x, field_name) for x in knot)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{field_name}: knot progress must be in [0, 1], got {p} in {knot!r}")
        _check_value(v, field_name, low, high)
        out.append((p, v))
    for (p0, _), (p1, _) in zip(out, out[1:]):
        if p1 < p0:
            raise ValueError(
                f"{field_name}: knots must be sorted by progress, got {[list(k) for k in out]} "
                f"({p1} comes after {p0})"
            )
    return tuple(out)


def _number(x: Any, field_name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise ValueError(f"{field_name}: expected a number, got {x!r}")
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"{field_name}: values must be finite, got {value}")
    return value


def _check_value(v: float, field_name: str, low: float, high: float) -> None:
    if not low <= v <= high:
        raise ValueError(f"{field_name}: value {v} is outside [{low}, {high}]")


@dataclass(frozen=True)
class Schedule:
    """A value as a piecewise-linear function of training progress.

    Attributes:
        knots: ``(progress, value)`` pairs sorted by progress (see the module docstring).
        preset: the preset's name when the schedule came from one (kept for :meth:`to_spec`).
        params: the preset's resolved parameters as sorted ``(name, value)`` pairs.
    """

    knots: Knots
    preset: str | None = None
    params: tuple[tuple[str, float], ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "knots", _check_knots(self.knots, "schedule", -math.inf, math.inf))

    def at(self, p: float) -> float:
        """Value at progress ``p`` (clamped to ``[0, 1]``)."""
        return piecewise_linear(self.knots, min(1.0, max(0.0, p)))

    def value(self, step: int, total_steps: int) -> float:
        """Value for the update after ``step`` updates out of ``total_steps``."""
        return self.at(progress(step, total_steps))

    @property
    def is_constant(self) -> bool:
        """True when every knot has the same value."""
        return len({v for _, v in self.knots}) == 1

    def to_spec(self) -> float | dict[str, Any]:
        """The config spec that :func:`parse_schedule` turns back into this schedule."""
        if self.preset is not None:
            return {"preset": self.preset, **dict(self.params)}
        if len(self.knots) == 1 and self.knots[0][0] == 0.0:
            return self.knots[0][1]
        return {"schedule": [[p, v] for p, v in self.knots]}


def constant(value: float) -> Schedule:
    """The same value at every step."""
    return Schedule(((0.0, float(value)),))


def warmup_then_onpolicy(warmup: float = 0.1, ramp: float = 0.3) -> Schedule:
    """Lambda 0 for the first ``warmup`` of training, a linear ramp to 1 over ``ramp``, then 1.

    The GKD recipe of tutorial ch. 4 (off-policy warmup, then on-policy; GKD paper Sec. 3.1).

    Args:
        warmup: fraction of training with lambda = 0 (off-policy), in ``[0, 1]``.
        ramp: fraction over which lambda rises linearly from 0 to 1 (0: a jump), with
            ``warmup + ramp <= 1``.

    Raises:
        ValueError: fractions out of range.
    """
    _check_fractions("warmup_then_onpolicy", warmup=warmup, ramp=ramp)
    end = _boundary(warmup + ramp)
    knots = ((0.0, 0.0), (warmup, 0.0), (end, 1.0), (1.0, 1.0))
    return Schedule(knots, "warmup_then_onpolicy", (("ramp", float(ramp)), ("warmup", float(warmup))))


def industrial(
    warmup: float = 0.2, mixed: float = 0.4, mixed_start: float = 0.3, mixed_end: float = 0.7
) -> Schedule:
    """The tutorial's "industrial pipeline" lambda schedule (ch. 7).

    Off-policy warmup (first 20%, lambda = 0), a mixed phase (next 40%, lambda ramping 0.3 -> 0.7),
    then fully on-policy (final 40%, lambda = 1). Lambda jumps 0 -> 0.3 at ``p = warmup`` and
    0.7 -> 1 at ``p = warmup + mixed``.

    Args:
        warmup: fraction of training with lambda = 0.
        mixed: fraction of the mixed phase (``warmup + mixed <= 1``).
        mixed_start: lambda at the start of the mixed phase, in ``[0, 1]``.
        mixed_end: lambda at its end, in ``[0, 1]``.

    Raises:
        ValueError: fractions or values out of range.
    """
    _check_fractions("industrial", warmup=warmup, mixed=mixed)
    for name, v in (("mixed_start", mixed_start), ("mixed_end", mixed_end)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"industrial: {name} must be in [0, 1], got {v}")
    end = _boundary(warmup + mixed)
    knots = ((0.0, 0.0), (warmup, 0.0), (warmup, mixed_start), (end, mixed_end), (end, 1.0), (1.0, 1.0))
    params = {"warmup": warmup, "mixed": mixed, "mixed_start": mixed_start, "mixed_end": mixed_end}
    return Schedule(knots, "industrial", tuple(sorted((k, float(v)) for k, v in params.items())))


def _boundary(p: float) -> float:
    """A sum of fractions rounded to 12 decimals, so 0.2 + 0.4 is the progress 0.6 that step 6 of 10 reaches."""
    return min(1.0, round(p, 12))


def _check_fractions(preset: str, **fractions: float) -> None:
    for name, f in fractions.items():
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"{preset}: {name} must be in [0, 1], got {f}")
    if sum(fractions.values()) > 1.0 + 1e-12:
        names = " + ".join(fractions)
        raise ValueError(f"{preset}: {names} must be <= 1, got {sum(fractions.values())}")


#: Named schedules accepted as ``{"preset": name, **params}``.
PRESETS: dict[str, Callable[..., Schedule]] = {
    "industrial": industrial,
    "warmup_then_onpolicy": warmup_then_onpolicy,
}
_PRESET_PARAMS = {
    "industrial": ("warmup", "mixed", "mixed_start", "mixed_end"),
    "warmup_then_onpolicy": ("warmup", "ramp"),
}


def parse_schedule(spec: Any, field_name: str, *, low: float = 0.0, high: float = 1.0) -> Schedule:
    """A :class:`Schedule` from a config spec (module docstring), checked against ``[low, high]``.

    Args:
        spec: a number, ``{"schedule": [[p, v], ...]}``, ``{"preset": name, **params}`` or a
            :class:`Schedule` (re-checked against the range).
        field_name: the config field, e.g. ``"agent.lmbda"``; every error message starts with it.
        low: smallest allowed value (``-math.inf`` for none).
        high: largest allowed value (``math.inf`` for none).

    Raises:
        ValueError: ``"<field_name>: ..."`` for a wrong type, NaN/inf, a value outside
            ``[low, high]``, a progress outside ``[0, 1]``, unsorted or empty knots, an unknown
            preset or preset parameter, or extra keys.
    """
    if isinstance(spec, Schedule):
        for _, v in spec.knots:
            _check_value(v, field_name, low, high)
        return spec
    if isinstance(spec, bool):
        raise ValueError(f"{field_name}: expected a number or a schedule, got {spec!r}")
    if isinstance(spec, int | float):
        value = _number(spec, field_name)
        _check_value(value, field_name, low, high)
        return constant(value)
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{field_name}: expected a number, {{'schedule': [[progress, value], ...]}} or "
            f"{{'preset': name}}, got {spec!r}"
        )
    if "schedule" in spec:
        extra = sorted(set(spec) - {"schedule"})
        if extra:
            raise ValueError(f"{field_name}: unexpected keys {extra} next to 'schedule'")
        return Schedule(_check_knots(spec["schedule"], field_name, low, high))
    if "preset" in spec:
        name = spec["preset"]
        if name not in PRESETS:
            raise ValueError(
                f"{field_name}: unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
            )
        params = {k: v for k, v in spec.items() if k != "preset"}
        unknown = sorted(set(params) - set(_PRESET_PARAMS[name]))
        if unknown:
            raise ValueError(
                f"{field_name}: unknown parameters {unknown} for preset {name!r}; "
                f"it takes {', '.join(_PRESET_PARAMS[name])}"
            )
        try:
            schedule = PRESETS[name](**{k: _number(v, field_name) for k, v in params.items()})
        except ValueError as err:
            msg = str(err)
            raise ValueError(msg if msg.startswith(f"{field_name}:") else f"{field_name}: {msg}") from None
        for _, v in schedule.knots:
            _check_value(v, field_name, low, high)
        return schedule
    raise ValueError(
        f"{field_name}: a schedule dict needs a 'schedule' or a 'preset' key, got {dict(spec)!r}"
    )
