"""Curriculum by difficulty: a seeded sampler of training-example indices (tutorial ch. 7, PACED).

Tutorial ch. 7, "Pillar 2: Curriculum Scheduling (PACED)": start with easy prompts and ramp the
difficulty; a beta-kernel sampler picks examples at the *frontier*, just beyond what the student can
do (too easy: no signal; too hard: noise). Two modes:

- ``"easy_to_hard"``: examples sorted by difficulty; at progress ``p`` the pool is the easiest
  ``ceil(c(p) * n)`` of them, sampled uniformly. The pacing ``c(p)`` is the competence function of
  Platanios et al. (2019, "Competence-based curriculum learning", NAACL):
  ``"root"``: ``min(1, sqrt(c0^2 + (1 - c0^2) p / full_at))``; ``"linear"``:
  ``min(1, c0 + (1 - c0) p / full_at)``, with ``c0 = start_fraction``.
- ``"frontier"``: every example is drawn with probability proportional to a beta-shaped kernel of
  its normalised difficulty ``d`` in ``(0, 1)``, ``w = d^(k mu) (1 - d)^(k (1 - mu))`` (the density
  of ``Beta(1 + k mu, 1 + k (1 - mu))``, whose mode is ``mu``), centred on the frontier
  ``mu(p) = frontier_start + (frontier_end - frontier_start) p``. ``k = concentration`` is the
  inverse width: 0 is uniform sampling, 8 puts most of the mass within about 0.2 of ``mu``.

Difficulty (both modes) is normalised by rank, so its scale does not matter: ``q_i`` is the mid-rank
quantile ``(#{d_j < d_i} + #{d_j <= d_i}) / (2 n)`` in ``(0, 1)`` (ties share one value). Two sources:

- *static*: a number per example, from :func:`difficulty_scores` (a metadata field, the prompt or
  reference length, or any function of the :class:`~rl_distill.tasks.Example`); None: all equal;
- *measured*: a running score per example fed from outside with :meth:`CurriculumSampler.update`
  (e.g. the student's divergence on that prompt at its last visit), an exponential moving average
  with ``measured_momentum``.

The difficulty used is ``(1 - measured_weight) q_static + measured_weight q_measured``, where
``q_measured`` ranks the measured examples among themselves and is ``q_static`` for the examples
not measured yet.

Batches within one draw never repeat an example unless fewer examples have a non-zero probability
than the batch size (then they are drawn with replacement). Draws are deterministic under the
seed: :meth:`CurriculumSampler.state_dict` holds the generator state and the measured scores, so a
resumed run draws the same batches.

Wiring (for the trainer, in place of the uniform shuffle of ``Trainer.next_batch``)::

    sampler = CurriculumSampler.from_examples(task.train, CurriculumConfig(mode="frontier"), seed=seed)
    idx = sampler.next_indices(step, total_steps, batch_size * world_size)   # the global batch
    batch = [task.train[i] for i in idx[rank * batch_size : (rank + 1) * batch_size]]
    ...
    sampler.update(idx, per_example_divergence)   # optional; the same values on every process
    state["curriculum"] = sampler.state_dict()    # torch.save-able (weights_only=True)

Every process must build the sampler with the same seed and call :meth:`~CurriculumSampler.update`
with the same (gathered) indices and values, or their batches diverge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from rl_distill.schedules import progress
from rl_distill.tasks import Example

Mode = Literal["easy_to_hard", "frontier"]
Pacing = Literal["root", "linear"]
DifficultySpec = str | Callable[[Example], float]
MODES = ("easy_to_hard", "frontier")


def difficulty_scores(examples: Sequence[Example], difficulty: DifficultySpec) -> list[float]:
    """One static difficulty per example.

    Args:
        examples: the task's training examples.
        difficulty: ``"prompt_length"`` or ``"reference_length"`` (characters), the name of a numeric
            metadata field present in every example, or a function ``Example -> float``.

    Raises:
        ValueError: a missing or non-numeric metadata value, or a non-finite score.
    """
    scores = []
    for i, ex in enumerate(examples):
        if callable(difficulty):
            value = difficulty(ex)
        elif difficulty == "prompt_length":
            value = len(ex.prompt)
        elif difficulty == "reference_length":
            value = len(ex.reference or "")
        elif difficulty in ex.metadata:
            value = ex.metadata[difficulty]
        else:
            raise ValueError(
                f"difficulty: example {i} has no metadata field {difficulty!r} (fields: {sorted(ex.metadata)}); "
                "use 'prompt_length', 'reference_length', a metadata field or a function"
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"difficulty: example {i} has a non-numeric or non-finite difficulty {value!r}")
        scores.append(float(value))
    return scores


def quantile_normalise(values: Tensor) -> Tensor:
    """Mid-rank quantiles ``(#{v_j < v_i} + #{v_j <= v_i}) / (2 n)`` in ``(0, 1)``: ``(n,) -> (n,)`` float64."""
    v = values.double()
    ordered = v.sort().values
    below = torch.searchsorted(ordered, v, right=False)
    upto = torch.searchsorted(ordered, v, right=True)
    return (below + upto).double() / (2 * max(1, v.numel()))


def pacing_fraction(
    p: float, *, start_fraction: float = 0.2, full_at: float = 0.5, kind: Pacing = "root"
) -> float:
    """Share of the examples (easiest first) in the pool at progress ``p`` (Platanios et al., 2019)."""
    t = min(1.0, max(0.0, p) / full_at)
    if kind == "root":
        return min(1.0, math.sqrt(start_fraction**2 + (1.0 - start_fraction**2) * t))
    if kind == "linear":
        return min(1.0, start_fraction + (1.0 - start_fraction) * t)
    raise ValueError(f"pacing must be 'root' or 'linear', got {kind!r}")


def beta_kernel_weights(difficulty: Tensor, center: float, concentration: float) -> Tensor:
    """Sampling probabilities ``∝ d^(k mu) (1 - d)^(k (1 - mu))`` for ``d`` in ``(0, 1)``: ``(n,) -> (n,)``.

    The unnormalised density of ``Beta(1 + k mu, 1 + k (1 - mu))`` (mode ``mu = center``), computed
    in log space; ``concentration = k = 0`` gives uniform probabilities.
    """
    d = difficulty.double()
    log_w = concentration * (center * torch.log(d) + (1.0 - center) * torch.log1p(-d))  # (n,)
    w = torch.exp(log_w - log_w.max())
    return w / w.sum()


@dataclass(frozen=True)
class CurriculumConfig:
    """How a :class:`CurriculumSampler` orders and paces the training examples."""

    mode: Mode = "frontier"
    """``"easy_to_hard"`` (a growing pool of the easiest examples) or ``"frontier"`` (beta kernel)."""
    difficulty: str = "prompt_length"
    """Static difficulty for :meth:`CurriculumSampler.from_examples`: a metadata field or a length (see :func:`difficulty_scores`)."""
    pacing: Pacing = "root"
    """easy_to_hard: the competence function, ``"root"`` or ``"linear"``."""
    start_fraction: float = 0.2
    """easy_to_hard: share of the examples (easiest first) in the pool at progress 0, in (0, 1]."""
    full_at: float = 0.5
    """easy_to_hard: progress at which the pool holds every example, in (0, 1]."""
    frontier_start: float = 0.1
    """frontier: kernel centre (normalised difficulty) at progress 0, in [0, 1]."""
    frontier_end: float = 0.9
    """frontier: kernel centre at progress 1, in [0, 1]."""
    concentration: float = 8.0
    """frontier: inverse width of the kernel (0: uniform), >= 0."""
    measured_weight: float = 0.5
    """Weight of the measured difficulty against the static one, in [0, 1]."""
    measured_momentum: float = 0.5
    """Moving-average momentum of the measured scores: ``m <- momentum m + (1 - momentum) v``, in [0, 1)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.pacing not in ("root", "linear"):
            raise ValueError(f"pacing: must be 'root' or 'linear', got {self.pacing!r}")
        checks = {
            "start_fraction": (self.start_fraction, 0.0, 1.0, False),
            "full_at": (self.full_at, 0.0, 1.0, False),
            "frontier_start": (self.frontier_start, 0.0, 1.0, True),
            "frontier_end": (self.frontier_end, 0.0, 1.0, True),
            "measured_weight": (self.measured_weight, 0.0, 1.0, True),
        }
        for name, (v, low, high, closed) in checks.items():
            ok = math.isfinite(v) and (low <= v if closed else low < v) and v <= high
            if not ok:
                interval = f"[{low}, {high}]" if closed else f"({low}, {high}]"
                raise ValueError(f"{name}: must be in {interval}, got {v}")
        if not (math.isfinite(self.concentration) and self.concentration >= 0):
            raise ValueError(f"concentration: must be a finite number >= 0, got {self.concentration}")
        if not 0.0 <= self.measured_momentum < 1.0:
            raise ValueError(f"measured_momentum: must be in [0, 1), got {self.measured_momentum}")


class CurriculumSampler:
    """Seeded sampler of example indices following a difficulty curriculum (module docstring).

    Args:
        difficulties: static difficulty of each training example (any scale), or None for all
            equal (then only measured difficulty orders them).
        config: mode and pacing.
        seed: seed of the draws.
        num_examples: number of examples; needed only when ``difficulties`` is None.
    """

    def __init__(
        self,
        difficulties: Sequence[float] | Tensor | None,
        config: CurriculumConfig | None = None,
        *,
        seed: int = 0,
        num_examples: int | None = None,
    ) -> None:
        self.config = config or CurriculumConfig()
        if difficulties is None:
            if num_examples is None or num_examples < 1:
                raise ValueError("num_examples must be >= 1 when difficulties is None")
            static = torch.zeros(num_examples, dtype=torch.float64)
        else:
            static = torch.as_tensor(difficulties, dtype=torch.float64).flatten()
            if num_examples is not None and num_examples != static.numel():
                raise ValueError(f"got {static.numel()} difficulties for num_examples={num_examples}")
        if static.numel() < 1:
            raise ValueError("the curriculum needs at least one example")
        if not torch.isfinite(static).all():
            raise ValueError("difficulties must be finite")
        self.static = static  # (n,)
        self.measured = torch.full_like(static, math.nan)  # (n,); NaN = not measured yet
        self.generator = torch.Generator().manual_seed(seed)
        # Fixed tie-break among equal difficulties, so the easy-to-hard order is not the data order.
        self._tiebreak = torch.randperm(static.numel(), generator=torch.Generator().manual_seed(seed + 1))
        self.draws = 0

    @classmethod
    def from_examples(
        cls, examples: Sequence[Example], config: CurriculumConfig | None = None, *, seed: int = 0
    ) -> CurriculumSampler:
        """A sampler whose static difficulty is ``config.difficulty`` of each example."""
        config = config or CurriculumConfig()
        return cls(difficulty_scores(examples, config.difficulty), config, seed=seed)

    def __len__(self) -> int:
        return self.static.numel()

    # --- difficulty -----------------------------------------------------------------------
    def update(self, indices: Sequence[int] | Tensor, values: Sequence[float] | Tensor) -> None:
        """Fold new measurements into the running scores (in order; repeated indices apply in turn).

        Raises:
            ValueError: mismatched lengths, an index out of range, or a non-finite value.
        """
        idx = torch.as_tensor(indices, dtype=torch.long).flatten().tolist()
        vals = torch.as_tensor(values, dtype=torch.float64).flatten().tolist()
        if len(idx) != len(vals):
            raise ValueError(f"update got {len(idx)} indices and {len(vals)} values")
        n, beta = len(self), self.config.measured_momentum
        for i, v in zip(idx, vals):
            if not 0 <= i < n:
                raise ValueError(f"index {i} out of range for {n} examples")
            if not math.isfinite(v):
                raise ValueError(f"measured difficulty must be finite, got {v} for example {i}")
            old = float(self.measured[i])
            self.measured[i] = v if math.isnan(old) else beta * old + (1.0 - beta) * v

    def difficulty(self) -> Tensor:
        """``(n,)`` float64 normalised difficulty in ``(0, 1)`` that the sampler uses now."""
        q_static = quantile_normalise(self.static)
        seen = ~torch.isnan(self.measured)
        q_measured = q_static.clone()
        if seen.any():
            q_measured[seen] = quantile_normalise(self.measured[seen])
        w = self.config.measured_weight
        return (1.0 - w) * q_static + w * q_measured

    # --- sampling -------------------------------------------------------------------------
    def probabilities(self, step: int, total_steps: int) -> Tensor:
        """``(n,)`` float64 probability of each example at ``progress(step, total_steps)``."""
        cfg, p, d = self.config, progress(step, total_steps), self.difficulty()
        if cfg.mode == "frontier":
            center = cfg.frontier_start + (cfg.frontier_end - cfg.frontier_start) * p
            return beta_kernel_weights(d, center, cfg.concentration)
        n = len(self)
        frac = pacing_fraction(p, start_fraction=cfg.start_fraction, full_at=cfg.full_at, kind=cfg.pacing)
        size = min(n, max(1, math.ceil(frac * n - 1e-9)))
        # Sort by difficulty, ties in the fixed random order: a stable sort of the shuffled list.
        order = self._tiebreak[torch.sort(d[self._tiebreak], stable=True).indices]
        probs = torch.zeros(n, dtype=torch.float64)
        probs[order[:size]] = 1.0 / size
        return probs

    def next_indices(self, step: int, total_steps: int, batch_size: int) -> list[int]:
        """Draw the indices of the next batch at ``progress(step, total_steps)``.

        Without replacement unless fewer than ``batch_size`` examples can be drawn.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        probs = self.probabilities(step, total_steps)
        replacement = int((probs > 0).sum()) < batch_size
        idx = torch.multinomial(probs, batch_size, replacement=replacement, generator=self.generator)
        self.draws += 1
        return idx.tolist()

    # --- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Generator state, measured scores, static difficulties and tie-break order (tensors and an int)."""
        return {
            "generator": self.generator.get_state(),
            "measured": self.measured.clone(),
            "static": self.static.clone(),
            "tiebreak": self._tiebreak.clone(),
            "draws": self.draws,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: if the state was saved for different examples (difficulties differ).
        """
        static = torch.as_tensor(state["static"], dtype=torch.float64)
        if static.shape != self.static.shape or not torch.equal(static, self.static):
            raise ValueError(
                f"curriculum state was saved for {static.numel()} examples with other difficulties; "
                f"this sampler has {len(self)} (did the task or its options change?)"
            )
        self.generator.set_state(state["generator"])
        self.measured = torch.as_tensor(state["measured"], dtype=torch.float64).clone()
        self._tiebreak = torch.as_tensor(state["tiebreak"], dtype=torch.long).clone()
        self.draws = int(state["draws"])
