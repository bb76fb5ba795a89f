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

Rewards: an agent takes ``reward=`` as a callable, or a name/spec that is resolved with
:func:`rl_distill.rewards.registry.resolve_reward` when the agent is built (the config field
``agent.reward``). It is called through :func:`rl_distill.rewards.registry.score_examples`, the one
path by which agents, environments and evaluation call a reward (:meth:`Agent.external_rewards`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rl_distill.rewards.registry import RewardSpec, resolve_reward, score_examples
from rl_distill.rollout import Rollout, RolloutEngine, SamplingConfig
from rl_distill.tasks import Example

Baseline = Literal["none", "batch_mean", "leave_one_out"]

__all__ = ["Agent", "AgentConfig", "RewardSpec", "resolve_reward"]


@dataclass
class AgentConfig:
    """The fields every agent's config shares (paper Eq. 5's alpha and reward, and the sampling).

    Agent configs inherit it (``@dataclass class GKDConfig(AgentConfig)``) and call
    ``super().__post_init__()`` first in their own ``__post_init__``.
    """

    alpha: float = 1.0
    """Weight of the distillation term in paper Eq. 5, in [0, 1]; 1 - alpha weights the external reward."""
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

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
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
    def eval_beta(self) -> float:
        """The beta of the JSD reported at evaluation: the agent's own when it trains on a JSD, else 0.5."""
        return 0.5


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
    """

    #: Registry name (``agent.name`` in configs).
    name: str = ""

    #: The agent's config dataclass (its defaults are used when no config is given).
    config_cls: type[AgentConfig] = AgentConfig

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
    ) -> None:
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, AgentConfig):
            raise TypeError(
                f"{type(self).__name__} needs a config derived from AgentConfig, got {type(self.config).__name__}"
            )
        alpha = self.config.alpha
        reward = reward if reward is not None else self.config.reward
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
        self.skipped_steps = 0
        self._modules: dict[str, nn.Module] = {}

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

    # --- the step -------------------------------------------------------------------------
    def mean_across_processes(self, value: Tensor) -> Tensor:
        """Mean of a tensor over Accelerate processes (itself with one process): for shared decisions."""
        if self.accelerator is not None and getattr(self.accelerator, "num_processes", 1) > 1:
            return self.accelerator.reduce(value, reduction="mean")
        return value

    def optimizer_step(self, loss: Tensor) -> dict[str, float]:
        """Backward, clip, and step; a non-finite loss or gradient skips the step.

        Returns:
            ``train/grad_norm`` and ``train/skipped`` (1.0 if the step was skipped).
        """
        self.optimizer.zero_grad(set_to_none=True)
        # Every process must agree to skip, or DDP's gradient all-reduce would wait forever.
        non_finite = self.mean_across_processes((~torch.isfinite(loss.detach())).float())
        if non_finite > 0:
            self.skipped_steps += 1
            return {"train/grad_norm": float("nan"), "train/skipped": 1.0}
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()
        extra = [p for p in self.extra_parameters() if p.grad is not None]
        for p in extra:  # not inside DDP: average by hand
            p.grad = self.mean_across_processes(p.grad)
        params = [p for p in self.student.parameters() if p.grad is not None] + extra
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return {"train/grad_norm": grad_norm, "train/skipped": 1.0}
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
