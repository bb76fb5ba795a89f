"""What every agent shares: the ``update()`` interface, the optimizer step, rewards, small estimators.

Contract with the trainer (agents with trainable parameters of their own)
-------------------------------------------------------------------------
The trainer builds ``optimizer`` over the **student's parameters only** and passes it to the
agent's constructor. An agent that owns extra trainable parameters (the value head of
``reinforce`` with ``baseline="value"`` and of ``ppo``) adds them to that same optimizer itself,
as one new param group, in its constructor (:meth:`Agent.register_trainable`; the group takes the
optimizer's defaults, or the config's ``value_lr``); a parameter already in the optimizer is never
added twice. Consequences for the trainer:

- build the LR scheduler **after** the agent, so that the scheduler also drives the agent's group
  (a ``LambdaLR`` made before would leave that group at its initial learning rate);
- :meth:`Agent.extra_parameters` lists the agent's own parameters (empty for GKD); gradient
  clipping in :meth:`Agent.optimizer_step` covers them together with the student's;
- :meth:`Agent.state_dict` / :meth:`Agent.load_state_dict` hold their weights for checkpoints
  (the optimizer's own ``state_dict`` already includes their param group and moments). Restore
  after constructing the agent, so the param groups line up.

They live on the student's device in float32. Under multi-process Accelerate their gradients are
averaged across processes in :meth:`Agent.optimizer_step` (they are not wrapped in DDP).

Configs: every agent's config dataclass inherits :class:`AgentConfig`, which holds the fields all
agents share (``alpha``, ``reward``, the sampling settings) with their range checks and the
``sampling`` property; the trainer, evaluation, ``env-check`` and the build step read these typed
attributes.

Schedules (``self.alpha_now``): config fields listed in ``AgentConfig.scheduled_fields`` (``alpha``
for every agent; GKD adds ``lmbda``) accept a number or a schedule over training progress
(``{schedule: [[p, v], ...]}``, ``{preset: industrial}``; :mod:`rl_distill.schedules`), parsed once
when the config is built (``config.schedules[name]``). The config field keeps the spec as written,
so **an agent must not read** ``self.config.alpha`` **as a number**: it reads ``self.alpha_now``
(and ``self.scheduled_values[name]`` for its own scheduled fields), the value for the current
update. The trainer calls :meth:`Agent.set_progress` ``(step, total_steps)`` before every
``update`` (``step`` = updates done so far, so a resumed run continues the schedules exactly);
without a trainer the values are those at progress 0. Load-time checks that depend on a scheduled
value use its range over training, :meth:`AgentConfig.value_range` (``alpha < 1`` somewhere needs
a reward).

Flawed-prefix rejection: :meth:`Agent.reject_flawed` applies ``self.sample_filter`` (a
:class:`~rl_distill.filters.SampleFilter`, None = off; GKD builds it from ``agent.reject`` with
:func:`sample_filter_from_spec`) to freshly sampled rows, before the teacher scores them, with
optional resampling of the rejected rows.

Per-example measurements for the curriculum: after ``update``, ``self.example_scores`` may hold one
float per example of the batch (NaN where nothing was measured, e.g. a rejected sample), which the
trainer feeds to a curriculum sampler's measured difficulty; None (the default) when the agent
measures nothing. GKD stores each example's Eq. 2 divergence. Metrics stay floats-only.

Skipped updates: ``train/skipped`` is 1.0 when the optimizer did not step this update, for either
reason: a non-finite loss or gradient (counted in ``skipped_steps``, which ``train.max_consecutive_skips``
guards), or nothing left to train on after rejection (counted in ``empty_steps``; not an error).

Gradient accumulation (``train.grad_accum_steps``, ``grad_accum_steps=``): an agent that supports it
(``supports_grad_accum``; GKD and REINFORCE) collects the whole batch first (samples, teacher scores,
rewards, baselines), then runs its gradient pass over :meth:`Agent.micro_batches` of rows, calling
:meth:`Agent.accumulate_backward` on each micro-batch's *share* of the batch loss (its terms divided
by the whole batch's counts), and :meth:`Agent.optimizer_step` once without a loss. The update equals
the whole batch's. Other agents refuse ``grad_accum_steps > 1``.

Mixed precision (``train.precision``): the trainer runs ``update`` under autocast
(:mod:`rl_distill.precision`); the backward pass runs with autocast off, and with ``fp16`` through the
``grad_scaler`` (its scale is unscaled before clipping; a step with non-finite gradients lowers it).

Rewards: an agent takes ``reward=`` as a callable, or a name/spec that is resolved with
:func:`rl_distill.rewards.registry.resolve_reward` when the agent is built (the config field
``agent.reward``). It is called through :func:`rl_distill.rewards.registry.score_examples`, the one
path by which agents, environments and evaluation call a reward (:meth:`Agent.external_rewards`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from rl_distill.filters import FilterResult, SampleFilter
from rl_distill.rewards.registry import RewardSpec, resolve_reward, score_examples
from rl_distill.rollout import Rollout, RolloutEngine, SamplingConfig
from rl_distill.rollout.prompts import PromptBatch
from rl_distill.schedules import Schedule, parse_schedule
from rl_distill.tasks import Example

Baseline = Literal["none", "batch_mean", "leave_one_out"]

__all__ = ["Agent", "AgentConfig", "RewardSpec", "resolve_reward", "sample_filter_from_spec"]


def sample_filter_from_spec(spec: Mapping[str, Any] | None, field_name: str) -> SampleFilter | None:
    """A :class:`~rl_distill.filters.SampleFilter` from a config mapping (None or ``{}``: no filter).

    Args:
        spec: keyword arguments of ``SampleFilter`` (``max_perplexity``, ``loop_repeats``, ...).
        field_name: the config field (``"reject"``); every error message starts with it.

    Raises:
        ValueError: ``"<field_name>.<key>: ..."`` for an unknown key or a value out of range.
    """
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise ValueError(f"{field_name}: expected a mapping of SampleFilter settings, got {spec!r}")
    known = [f.name for f in fields(SampleFilter)]
    unknown = sorted(set(spec) - set(known), key=str)
    if unknown:
        raise ValueError(f"{field_name}: unknown keys {unknown}; it accepts {', '.join(known)}")
    try:
        sample_filter = SampleFilter(**spec)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{field_name}.{err}") from None
    return sample_filter if sample_filter.enabled else None


@dataclass
class AgentConfig:
    """The fields every agent's config shares (paper Eq. 5's alpha and reward, and the sampling).

    Agent configs inherit it (``@dataclass class GKDConfig(AgentConfig)``) and call
    ``super().__post_init__()`` first in their own ``__post_init__``.
    """

    alpha: float | dict[str, Any] = 1.0
    """Weight of the distillation term in paper Eq. 5, in [0, 1]; 1 - alpha weights the external reward.
    A number, or a schedule over training progress (``{schedule: [[p, v], ...]}``, ``{preset: ...}``)."""
    reward: str | dict[str, Any] | None = None
    """External reward of Eq. 5 (used when alpha < 1): a name, ``module:function`` path or spec dict."""
    temperature: float = 1.0
    """Student sampling temperature (> 0); the agent's log-probs of the student are taken at it."""
    top_k: int = 0
    """Top-k filter for sampling (0 = off)."""
    top_p: float = 1.0
    """Nucleus filter for sampling (1.0 = off)."""
    max_new_tokens: int = 32
    """Completion budget for sampled sequences."""
    beta_ext: float | None = None
    """Reward extrapolation (G-OPD): the return ``log pT(y) + beta_ext * r(y)`` (>= 0, unbounded) instead of
    Eq. 5's convex form; needs ``alpha = 1``. Eq. 5 with alpha is the same objective up to the positive
    scale alpha when ``beta_ext = (1 - alpha) / alpha``."""
    teacher_temperature: float | None = None
    """Temperature of the teacher's distribution in rewards and divergences (> 0); None: ``temperature``."""

    #: Fields that accept a schedule over training progress, with their allowed value range.
    scheduled_fields: ClassVar[dict[str, tuple[float, float]]] = {"alpha": (0.0, 1.0)}

    def __post_init__(self) -> None:
        self.schedules: dict[str, Schedule] = {}
        for name, (low, high) in self.scheduled_fields.items():
            spec = getattr(self, name)
            if isinstance(spec, Schedule):  # built in Python: keep the plain spec in the field
                spec = spec.to_spec()
                setattr(self, name, spec)
            if isinstance(spec, int | float) and not isinstance(spec, bool) and not low <= spec <= high:
                raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {spec}")
            self.schedules[name] = parse_schedule(spec, name, low=low, high=high)
        if self.beta_ext is not None:
            if not self.beta_ext >= 0:
                raise ValueError(f"beta_ext must be >= 0 (or null), got {self.beta_ext}")
            if self.value_range("alpha") != (1.0, 1.0):
                raise ValueError(
                    f"beta_ext ({self.beta_ext}) replaces Eq. 5's alpha weighting: leave alpha at 1, got {self.alpha}"
                )
        if self.teacher_temperature is not None and not self.teacher_temperature > 0:
            raise ValueError(f"teacher_temperature must be > 0 (or null), got {self.teacher_temperature}")
        if self.reward is not None and not isinstance(self.reward, str | dict):
            raise ValueError(
                f"reward must be a name, a 'module:function' path or a spec dict, got {self.reward!r}"
            )
        if not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 (training samples are stochastic), got {self.temperature}"
            )
        SamplingConfig(self.max_new_tokens, self.temperature, self.top_k, self.top_p)  # range checks

    @property
    def sampling(self) -> SamplingConfig:
        """The sampling settings of the agent's own (on-policy) samples."""
        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_k, self.top_p)

    @property
    def teacher_temp(self) -> float:
        """The teacher's temperature in rewards and divergences (``teacher_temperature`` or ``temperature``)."""
        return self.teacher_temperature if self.teacher_temperature is not None else self.temperature

    @property
    def uses_reward(self) -> bool:
        """Whether the external reward enters the objective (``alpha < 1`` at some point, or ``beta_ext > 0``)."""
        return self.value_range("alpha")[0] < 1.0 or bool(self.beta_ext)

    def value_range(self, name: str) -> tuple[float, float]:
        """``(min, max)`` of a scheduled field over training (the schedules are piecewise linear)."""
        values = [v for _, v in self.schedules[name].knots]
        return min(values), max(values)

    def is_constant(self, name: str, value: float | None = None) -> bool:
        """Whether a scheduled field is the same at every step (and equal to ``value``, when given)."""
        low, high = self.value_range(name)
        return low == high and (value is None or low == value)

    @property
    def eval_beta(self) -> float:
        """The beta of the JSD reported at evaluation: the agent's own when it trains on a JSD, else 0.5."""
        return 0.5

    @property
    def needs_teacher(self) -> bool:
        """Whether the agent scores with a teacher (False: ``model.teacher: null`` is allowed; SPIN, GRPO)."""
        return True


class Agent(ABC):
    """An algorithm that improves the student from a batch of prompts.

    Subclasses implement :meth:`update`: collect what they need through the rollout engine,
    build a loss, and call :meth:`optimizer_step`. The trainer only ever calls ``update`` (and,
    for checkpoints, :meth:`state_dict` / :meth:`load_state_dict`).

    Args:
        engine: the rollout engine holding student, teacher and tokenizer.
        optimizer: optimizer over the student's trainable parameters (agents add their own group).
        max_grad_norm: gradient-norm clipping threshold (``<= 0`` disables clipping).
        generator: RNG for sampling and coin flips (seeded by the trainer).
        accelerator: optional ``accelerate.Accelerator``; its ``backward`` is used when given.
        reward: external reward of paper Eq. 5: a callable ``(prompts, completions, **metadata)``,
            a registered name, an import path ``module:function``, a spec dict, or None.
        grad_accum_steps: micro-batches per update (``train.grad_accum_steps``; agents with
            ``supports_grad_accum`` only).
        grad_scaler: a ``torch.amp.GradScaler`` for ``train.precision: fp16``, or None.

    Raises:
        ValueError: ``train.grad_accum_steps: ...`` for an agent that does not accumulate gradients.
    """

    #: Registry name (``agent.name`` in configs).
    name: str = ""

    #: The agent's config dataclass (its defaults are used when no config is given).
    config_cls: type[AgentConfig] = AgentConfig

    #: Whether the agent splits its gradient pass into ``grad_accum_steps`` micro-batches.
    supports_grad_accum: ClassVar[bool] = False

    def __init__(
        self,
        engine: RolloutEngine,
        optimizer: torch.optim.Optimizer,
        config: Any | None = None,
        *,
        max_grad_norm: float = 1.0,
        generator: torch.Generator | None = None,
        accelerator: Any | None = None,
        reward: RewardSpec = None,
        grad_accum_steps: int = 1,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.config = config if config is not None else self.config_cls()
        if grad_accum_steps < 1:
            raise ValueError(f"train.grad_accum_steps: must be >= 1, got {grad_accum_steps}")
        if grad_accum_steps > 1 and not self.supports_grad_accum:
            hint = " (PPO: use agent.num_minibatches)" if self.name == "ppo" else ""
            raise ValueError(
                f"train.grad_accum_steps: the {self.name or type(self).__name__} agent does not accumulate "
                f"gradients; set it to 1{hint}"
            )
        if not isinstance(self.config, AgentConfig):
            raise TypeError(
                f"{type(self).__name__} needs a config derived from AgentConfig, got {type(self.config).__name__}"
            )
        alpha = self.config.value_range("alpha")[0]  # the smallest alpha over training
        reward = reward if reward is not None else self.config.reward
        if self.config.beta_ext and reward is None:
            raise ValueError(
                f"beta_ext > 0 ({self.config.beta_ext}) weights an external reward, but none was given"
            )
        if alpha < 1.0 and reward is None:
            raise ValueError(
                f"alpha < 1 ({alpha}) weights an external reward (paper Eq. 5), but none was given"
            )
        self.engine = engine
        self.student = engine.student
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.generator = generator if generator is not None else torch.Generator(device=engine.device)
        self.accelerator = accelerator
        self.reward = resolve_reward(reward)
        self.grad_accum_steps = grad_accum_steps
        self.grad_scaler = grad_scaler
        self._backward_calls = 0  # accumulate_backward calls since the last optimizer step
        self._non_finite = False  # a loss of this step was not finite: the step is skipped
        self.skipped_steps = 0
        self.empty_steps = 0
        self.sample_filter: SampleFilter | None = None
        self.example_scores: list[float] | None = None
        self._modules: dict[str, nn.Module] = {}
        self.set_progress(0, 1)

    # --- schedules (see the module docstring) ---------------------------------------------
    def set_progress(self, step: int, total_steps: int) -> None:
        """Set the scheduled values for the next update: ``step`` updates done out of ``total_steps``."""
        self.scheduled_values: dict[str, float] = {
            name: schedule.value(step, total_steps) for name, schedule in self.config.schedules.items()
        }

    @property
    def alpha_now(self) -> float:
        """Eq. 5's alpha for the current update (``agent.alpha``, scheduled or constant)."""
        return self.scheduled_values["alpha"]

    def schedule_metrics(self) -> dict[str, float]:
        """``train/<field>``: the current value of every schedulable field (``train/alpha``, ``train/lmbda``)."""
        return {f"train/{name}": value for name, value in self.scheduled_values.items()}

    @abstractmethod
    def update(self, batch: Sequence[Example]) -> dict[str, float]:
        """One training step on a batch of examples; returns metrics keyed ``rollout/...``, ``train/...``."""

    # --- the agent's own parameters (see the module docstring) ----------------------------
    def register_trainable(self, name: str, module: nn.Module, *, lr: float | None = None) -> nn.Module:
        """Keep ``module`` as agent state and add its parameters to the optimizer as a new group.

        Args:
            name: key in :meth:`state_dict`.
            module: the module (moved to the student's device, float32).
            lr: learning rate of its param group (None: the optimizer's default).

        Returns:
            The module, on the student's device.
        """
        module = module.to(device=self.engine.device, dtype=torch.float32)
        self._modules[name] = module
        params = [p for p in module.parameters() if p.requires_grad]
        known = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        new = [p for p in params if id(p) not in known]
        if new:
            group: dict[str, Any] = {"params": new}
            if lr is not None:
                group["lr"] = lr
            self.optimizer.add_param_group(group)
        return module

    def extra_parameters(self) -> list[nn.Parameter]:
        """The agent's own trainable parameters (value heads), not the student's; empty by default."""
        return [p for m in self._modules.values() for p in m.parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, Any]:
        """Weights of the agent's own modules, by name (empty for agents without any)."""
        return {name: m.state_dict() for name, m in self._modules.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the names must match exactly."""
        if set(state) != set(self._modules):
            raise ValueError(
                f"agent state has modules {sorted(state)}, this agent has {sorted(self._modules)}"
            )
        for name, m in self._modules.items():
            m.load_state_dict(state[name])

    # --- rewards --------------------------------------------------------------------------
    def external_rewards(self, examples: Sequence[Example], rollout: Rollout) -> Tensor:
        """The external reward ``r(x, y)`` of paper Eq. 5 for each row of ``rollout``: ``(B,)`` float32.

        ``examples[i]`` is the example of row ``i``; the reward is called through
        :func:`~rl_distill.rewards.registry.score_examples`, as everywhere else.
        """
        if self.reward is None:
            raise ValueError("this agent has no reward; pass reward= or set agent.reward")
        if len(examples) != len(rollout):
            raise ValueError(f"got {len(examples)} examples for {len(rollout)} sequences")
        values = score_examples(self.reward, examples, self.engine.decode(rollout))
        return torch.tensor(values, dtype=torch.float32, device=rollout.completion_ids.device)

    # --- flawed-prefix rejection ------------------------------------------------------------
    def reject_flawed(
        self,
        rollout: Rollout,
        *,
        resample: int = 0,
        sample_filter: SampleFilter | None = None,
    ) -> tuple[Rollout | None, FilterResult, Tensor]:
        """Drop degenerate samples (tutorial ch. 7, Pillar 3) before the teacher scores them.

        Rejected rows are sampled again from their prompts up to ``resample`` more times (each try
        with the agent's generator); a row still rejected after the last try is dropped. The kept
        rows keep their order.

        Args:
            rollout: on-policy samples from :meth:`RolloutEngine.generate`, not scored yet.
            resample: extra tries for rejected rows.
            sample_filter: the filter; default ``self.sample_filter`` (None: keep everything).

        Returns:
            ``(kept, first, rows)``: the kept rollout (None when every row is rejected), the
            :class:`~rl_distill.filters.FilterResult` of the first try (what ``rollout/filter/...``
            logs), and the ``(K,)`` indices into ``rollout`` of the kept rows.
        """
        sample_filter = sample_filter if sample_filter is not None else self.sample_filter
        if sample_filter is None:
            keep = torch.ones(len(rollout), dtype=torch.bool, device=rollout.completion_ids.device)
            result = FilterResult(keep, {}, 0.0, torch.ones(len(rollout)))
            return rollout, result, keep.nonzero().flatten()
        first = sample_filter(rollout)
        replaced: dict[int, Rollout] = {}  # row -> a one-row accepted resample
        pending = (~first.keep).nonzero().flatten()
        seconds = rollout.timings.get("generate", 0.0)
        for _ in range(resample):
            if pending.numel() == 0:
                break
            prompts = PromptBatch(rollout.prompt_ids, rollout.prompt_mask, rollout.texts).select(pending)
            again = self.engine.generate(prompts, self.config.sampling, generator=self.generator)
            seconds += again.timings.get("generate", 0.0)
            result = sample_filter(again)
            for j in result.rows.tolist():
                replaced[int(pending[j])] = select_rows(again, again.completion_ids.new_tensor([j]))
            pending = pending[~result.keep]
        rows = first.keep.nonzero().flatten()
        if replaced:
            rows = rows.new_tensor(sorted([*rows.tolist(), *replaced]))
        if rows.numel() == 0:
            return None, first, rows
        if rows.numel() == len(rollout) and not replaced:
            return rollout, first, rows
        if replaced:
            parts = [
                replaced[i] if i in replaced else select_rows(rollout, rows[k : k + 1])
                for k, i in enumerate(rows.tolist())
            ]
            kept = concat_rollouts(parts, self.engine.pad_id)
        else:
            kept = select_rows(rollout, rows)
        kept.timings["generate"] = seconds
        return kept, first, rows

    # --- the step -------------------------------------------------------------------------
    def mean_across_processes(self, value: Tensor) -> Tensor:
        """Mean of a tensor over Accelerate processes (itself with one process): for shared decisions."""
        if self.accelerator is not None and getattr(self.accelerator, "num_processes", 1) > 1:
            return self.accelerator.reduce(value, reduction="mean")
        return value

    def micro_batches(self, num_rows: int, group_size: int = 1) -> list[Tensor]:
        """Row indices of the ``grad_accum_steps`` micro-batches of ``num_rows`` rows, in order.

        Contiguous and made of whole groups of ``group_size`` consecutive rows (the samples of one
        prompt, so RLOO groups are never split); fewer micro-batches when there are fewer groups.
        """
        groups = torch.arange(num_rows // group_size)
        parts = torch.tensor_split(groups, min(self.grad_accum_steps, max(1, len(groups))))
        return [torch.arange(int(p[0]) * group_size, (int(p[-1]) + 1) * group_size) for p in parts if len(p)]

    def accumulate_backward(self, loss: Tensor) -> None:
        """Add the gradient of ``loss`` (one micro-batch's share of the step's loss) to the step's gradient.

        The first call after an optimizer step clears the gradients. A non-finite loss marks the step
        to be skipped (every process agrees, or DDP's all-reduce would wait forever); later calls of
        the step then do no backward pass. Autocast is off in the backward pass.
        """
        if self._backward_calls == 0:
            self.optimizer.zero_grad(set_to_none=True)
            self._non_finite = False
        self._backward_calls += 1
        non_finite = self.mean_across_processes((~torch.isfinite(loss.detach())).float())
        if non_finite > 0 or self._non_finite:
            self._non_finite = True
            return
        if self.grad_scaler is not None:
            loss = self.grad_scaler.scale(loss)
        with torch.autocast(self.engine.device.type, enabled=False):
            if self.accelerator is not None:
                self.accelerator.backward(loss)
            else:
                loss.backward()

    def optimizer_step(self, loss: Tensor | None = None) -> dict[str, float]:
        """Backward (``loss``, or the micro-batches already passed to :meth:`accumulate_backward`), clip, step.

        A non-finite loss or gradient skips the step.

        Returns:
            ``train/grad_norm`` and ``train/skipped`` (1.0 if the step was skipped).
        """
        if loss is not None:
            self._backward_calls = 0
            self.accumulate_backward(loss)
        if self._backward_calls == 0:
            raise RuntimeError("optimizer_step() without a loss needs accumulate_backward() calls first")
        self._backward_calls = 0
        if self._non_finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return {"train/grad_norm": float("nan"), "train/skipped": 1.0}
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)  # clip the true gradient
        extra = [p for p in self.extra_parameters() if p.grad is not None]
        for p in extra:  # not inside DDP: average by hand
            p.grad = self.mean_across_processes(p.grad)
        params = [p for p in self.student.parameters() if p.grad is not None] + extra
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            if self.grad_scaler is not None:
                self.grad_scaler.update()  # fp16 overflow: a smaller loss scale next step
            return {"train/grad_norm": grad_norm, "train/skipped": 1.0}
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        return {"train/grad_norm": grad_norm, "train/skipped": 0.0}


# ---------------------------------------------------------------------------------------------
# Pieces shared by the policy-gradient agents: pure functions over (B, T) tensors and a mask.
# ---------------------------------------------------------------------------------------------
class ValueHead(nn.Module):
    """``V(s_t)``: a linear map of the student's last hidden state at the position predicting token ``t``.

    It reads the hidden states *detached*: the value loss trains only this head, so the student's
    gradient stays exactly the policy gradient. Zero-initialised (``V = 0`` at the start).

    Args:
        hidden_size: width of the student's last hidden state.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """``(B, T, H)`` hidden states -> ``(B, T)`` values."""
        return self.linear(hidden.detach().to(self.linear.weight.dtype)).squeeze(-1)


def hidden_size_of(model: nn.Module) -> int:
    """Width of a causal LM's last hidden state (the input width of its output embedding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        return head.in_features
    return int(model.config.hidden_size)


def token_logprobs(logits: Tensor, token_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / temperature)`` at ``token_ids``: ``(B, T, V), (B, T) -> (B, T)``.

    Computed in at least float32 (float64 logits stay float64).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)  # (B, T, V)
    return logp.gather(-1, token_ids[..., None]).squeeze(-1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is True (0 if there are none)."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / (std + eps)`` over the masked positions (unbiased std, as cleanrl); 0 elsewhere."""
    m = mask.to(values.dtype)
    n = m.sum()
    mean = (values * m).sum() / n.clamp(min=1)
    var = (((values - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    return (values - mean) / (var.sqrt() + eps) * m


def explained_variance(predicted: Tensor, target: Tensor, mask: Tensor) -> float:
    """``1 - Var[target - predicted] / Var[target]`` over the masked positions (NaN if Var[target] = 0)."""
    m = mask.bool()
    y, y_pred = target[m].double(), predicted[m].double()
    var_y = y.var(unbiased=False) if y.numel() else y.new_tensor(0.0)
    if var_y == 0:
        return float("nan")
    return float(1.0 - (y - y_pred).var(unbiased=False) / var_y)


def sequence_loss(token_losses: Tensor, mask: Tensor, *, weights: Tensor | None = None) -> Tensor:
    """Aggregate per-token losses ``(B, T)``: sum over each sequence's tokens, then mean over sequences.

    The sum over tokens matches the sequence-level objective of paper Eq. 5 (the per-token rewards
    of :mod:`rl_distill.objective` add up over a sequence).

    Args:
        token_losses: ``(B, T)``.
        mask: ``(B, T)`` True on real tokens.
        weights: ``(B,)`` sequence weights replacing the uniform ``1/B`` (e.g. exact probabilities
            of enumerated sequences in tests).
    """
    per_seq = (token_losses * mask.to(token_losses.dtype)).sum(-1)  # (B,)
    if weights is None:
        return per_seq.mean()
    return (weights.to(per_seq.dtype) * per_seq).sum()


def group_baseline(values: Tensor, mask: Tensor, kind: Baseline, group_size: int | None = None) -> Tensor:
    """Baselines from other samples, position by position: ``(B, T) -> (B, T)`` (0 where masked).

    Rows are split into consecutive groups of ``group_size`` (default: the whole batch; the ``k``
    samples of one prompt for RLOO). At each position ``t``, over the rows of a group that have a
    token there:

    - ``"batch_mean"``: the mean of ``values[:, t]`` (includes the row itself: slightly biased);
    - ``"leave_one_out"``: the mean over the *other* rows (RLOO, Kool et al. 2019; Ahmadian et al.
      2024): independent of the row's own sample, so unbiased; 0 when no other row has a token at ``t``;
    - ``"none"``: zeros.

    For one value per sequence (a whole-sequence return) pass ``(B, 1)`` and an all-True mask.
    """
    if kind == "none":
        return torch.zeros_like(values)
    n, width = values.shape
    k = n if group_size is None else group_size
    if k < 1 or n % k:
        raise ValueError(f"group_size must divide the batch size {n}, got {k}")
    m = mask.to(values.dtype).view(n // k, k, width)
    v = (values * mask.to(values.dtype)).view(n // k, k, width)
    total, count = v.sum(1, keepdim=True), m.sum(1, keepdim=True)  # (G, 1, T)
    if kind == "batch_mean":
        base = (total / count.clamp(min=1)).expand_as(v)
    elif kind == "leave_one_out":
        base = (total - v) / (count - m).clamp(min=1)  # (G, k, T); 0 if alone
    else:
        raise ValueError(f"baseline must be 'none', 'batch_mean' or 'leave_one_out', got {kind!r}")
    return base.reshape(n, width) * mask.to(values.dtype)


def select_rows(rollout: Rollout, rows: Tensor) -> Rollout:
    """The sub-rollout of ``rows``, trimmed to its own longest prompt and completion.

    Per-token tensors of the parent rollout line up with the result after
    ``x[rows][:, : result.completion_ids.shape[1]]``.
    """
    pmask = rollout.prompt_mask[rows]
    keep_p = int(pmask.sum(-1).max())
    cmask = rollout.completion_mask[rows]
    keep_t = max(1, int(cmask.sum(-1).max()))

    def per_token(x: Tensor | None) -> Tensor | None:
        return None if x is None else x[rows][:, :keep_t]

    p0 = pmask.shape[1] - keep_p
    return Rollout(
        prompt_ids=rollout.prompt_ids[rows][:, p0:],
        prompt_mask=pmask[:, p0:],
        completion_ids=rollout.completion_ids[rows][:, :keep_t],
        completion_mask=cmask[:, :keep_t],
        logprobs=rollout.logprobs[rows][:, :keep_t],
        teacher_logprobs=per_token(rollout.teacher_logprobs),
        teacher_logits=per_token(rollout.teacher_logits),
        teacher_topk_logprobs=per_token(rollout.teacher_topk_logprobs),
        teacher_topk_ids=per_token(rollout.teacher_topk_ids),
        texts=[rollout.texts[int(i)] for i in rows] if rollout.texts else [],
    )


def concat_rollouts(parts: Sequence[Rollout], pad_id: int) -> Rollout:
    """Stack unscored rollouts row-wise: prompts re-left-padded, completions re-right-padded.

    Keeps the sampling fields (ids, masks, ``logprobs``, ``texts``); teacher scores are not carried
    (score the result). ``timings["generate"]`` is the sum of the parts'.
    """
    width_p = max(r.prompt_ids.shape[1] for r in parts)
    width_t = max(r.completion_ids.shape[1] for r in parts)

    def left(x: Tensor, fill: float | int) -> Tensor:
        return torch.nn.functional.pad(x, (width_p - x.shape[1], 0), value=fill)

    def right(x: Tensor, fill: float | int | bool) -> Tensor:
        return torch.nn.functional.pad(x, (0, width_t - x.shape[1]), value=fill)

    return Rollout(
        prompt_ids=torch.cat([left(r.prompt_ids, pad_id) for r in parts]),
        prompt_mask=torch.cat([left(r.prompt_mask, 0) for r in parts]),
        completion_ids=torch.cat([right(r.completion_ids, pad_id) for r in parts]),
        completion_mask=torch.cat([right(r.completion_mask, False) for r in parts]),
        logprobs=torch.cat([right(r.logprobs, 0.0) for r in parts]),
        texts=[t for r in parts for t in r.texts],
        timings={"generate": sum(r.timings.get("generate", 0.0) for r in parts)},
    )
