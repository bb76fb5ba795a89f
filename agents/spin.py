"""SPIN: Self-Play fINe-tuning (Chen et al. 2024, arXiv 2401.01335; tutorial ch. 6, "Mechanism 2").

The model improves against its own previous version, with no teacher: at round ``r`` the reference
``pref`` is the model frozen as it was when the round began (the SFT start in round 0), and the
model learns to prefer the data over what it generates itself. Training runs in rounds of
``round_steps`` updates; each update, for a batch of prompts ``x`` with references ``y+``:

1. **Chosen and rejected.** ``chosen = y+`` (the dataset references, EOS appended); ``rejected =
   y- ~ pθ(.|x)``, one sample of the *current* model at ``temperature`` (no gradient through sampling).
2. **DPO loss** (Rafailov et al. 2023, Eq. 7; SPIN's Eq. 4.7 with the logistic loss), with sequence
   log-probs ``log p(y|x) = sum_t log p(y_t | y<t, x)`` at temperature 1 (the models' own
   distributions)::

       h    = beta * [(log pθ(y+) - log pref(y+)) - (log pθ(y-) - log pref(y-))]
       loss = mean_x  -log sigmoid(h)

   (:func:`spin_loss`; tutorial: log pθ(y+) = -2.3, log pθ(y-) = -1.8, log pref(y+) = -1.5,
   log pref(y-) = -2.5, beta = 0.1 give h = -0.15 and loss 0.77096.) A sample equal to its reference
   cancels out of ``h``: once the model writes the data, nothing is left to learn.
3. **Round end: saturation check.** After the round's last update, ``KL(pθ || pref)`` of whole
   sequences on ``saturation_prompts`` held-out prompts (the run's eval split; the training batch
   when none was given): completions sampled from ``pθ`` at temperature 1 with a fixed seed, the
   exact per-position ``KL(pθ(.|y<t, x) || pref(.|y<t, x))`` summed over each completion and averaged
   over completions (an unbiased estimate of the sequence-level KL). Logged as ``rollout/spin_kl``
   with ``train/round``; when ``saturation_kl`` is set and the KL falls below it, SPIN has saturated
   (the model no longer moves away from its previous version) and every later update is a no-op
   (``train/skipped`` 1, counted in ``empty_steps``; the learning-rate schedule stops with it).
4. **Next round.** The reference becomes a frozen copy of the current model.

The round follows the trainer's step (``set_progress``), and the reference and saturation state are
the agent's state (checkpointed), so a resumed run continues the same round against the same reference.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl_distill.agents.base import Agent, AgentConfig, token_logprobs
from rl_distill.divergences import reverse_kl
from rl_distill.rollout import Rollout, SamplingConfig
from rl_distill.rollout.engine import completion_forward
from rl_distill.tasks import Example


@dataclass
class SPINConfig(AgentConfig):
    """Hyper-parameters of :class:`SPINAgent` (shared fields: :class:`~rl_distill.agents.base.AgentConfig`).

    ``temperature`` (with ``top_k``, ``top_p``, ``max_new_tokens``) is how the rejected samples are
    drawn. ``alpha`` stays at 1 and is not used (SPIN has no teacher and no reward).
    """

    beta: float = 0.1
    """DPO's beta (SPIN's 1/lambda): scale of the log-ratio margin, > 0."""
    round_steps: int = 10
    """Updates per round; the reference is re-frozen at the start of every round, >= 1."""
    saturation_prompts: int = 16
    """Held-out prompts of the end-of-round ``KL(model || ref)`` check (0: no check), >= 0."""
    saturation_kl: float | None = None
    """Stop (later updates are no-ops) when the end-of-round KL in nats per sequence falls below this (> 0); null: never."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.is_constant("alpha", 1.0):
            raise ValueError(
                f"alpha weights Eq. 5's teacher term, which SPIN does not have: leave it at 1, got {self.alpha}"
            )
        if self.beta_ext is not None:
            raise ValueError("beta_ext weights a reward; SPIN has none: leave it null")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta}")
        if self.round_steps < 1:
            raise ValueError(f"round_steps must be >= 1, got {self.round_steps}")
        if self.saturation_prompts < 0:
            raise ValueError(f"saturation_prompts must be >= 0, got {self.saturation_prompts}")
        if self.saturation_kl is not None:
            if not self.saturation_kl > 0:
                raise ValueError(f"saturation_kl must be > 0 or null, got {self.saturation_kl}")
            if self.saturation_prompts == 0:
                raise ValueError("saturation_kl stops on the end-of-round KL check; saturation_prompts is 0")

    @property
    def needs_teacher(self) -> bool:
        """SPIN's reference is the model's own previous version, never the teacher."""
        return False


def sequence_logprobs(logits: Tensor, token_ids: Tensor, mask: Tensor) -> Tensor:
    """``log p(y|x) = sum_t log softmax(logits_t)[y_t]`` over real tokens: ``(B, T, V), (B, T) -> (B,)``."""
    return (token_logprobs(logits, token_ids) * mask.to(torch.float32)).sum(-1)


def spin_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor]:
    """DPO's logistic loss on sequence log-probs (Rafailov et al. 2023, Eq. 7; SPIN, Chen et al. 2024, Eq. 4.7).

    ``h = beta * [(log pθ(y+) - log pref(y+)) - (log pθ(y-) - log pref(y-))]``,
    ``loss = mean(-log sigmoid(h))``.

    Args:
        policy_chosen: ``(B,)`` ``log pθ(y+|x)``, with gradient.
        policy_rejected: ``(B,)`` ``log pθ(y-|x)``, with gradient.
        ref_chosen: ``(B,)`` ``log pref(y+|x)``.
        ref_rejected: ``(B,)`` ``log pref(y-|x)``.
        beta: the margin scale.

    Returns:
        The loss and the logits ``h`` ``(B,)`` (detached).
    """
    logits = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))  # (B,)
    return -F.logsigmoid(logits).mean(), logits.detach()


class _RoundState(nn.Module):
    """Checkpointed scalars of the saturation check: saturated (0/1) and the last round's KL."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("saturated", torch.zeros(()))
        self.register_buffer("last_kl", torch.full((), float("nan")))


class SPINAgent(Agent):
    """Self-play fine-tuning in rounds: DPO of the references against the model's own samples.

    Args:
        engine: rollout engine (its teacher, if any, is never used).
        optimizer: optimizer over the student.
        config: :class:`SPINConfig`.
        **kwargs: passed to :class:`~rl_distill.agents.base.Agent`.
    """

    name = "spin"

    config_cls = SPINConfig
    config: SPINConfig

    def __init__(self, engine, optimizer, config: SPINConfig | None = None, **kwargs) -> None:  # noqa: D417
        super().__init__(engine, optimizer, config, **kwargs)
        # Round 0's reference: the starting model. Agent state (not trained): checkpointed with it.
        self.reference = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.round_state = _RoundState().to(self.engine.device)
        self._modules["reference"] = self.reference
        self._modules["round_state"] = self.round_state
        self.heldout: list[Example] = []
        self.step = 0

    def set_heldout(self, examples: Sequence[Example]) -> None:
        """The prompts of the end-of-round saturation check (the run's eval split; set by the build step)."""
        self.heldout = list(examples)

    def set_progress(self, step: int, total_steps: int) -> None:
        """The trainer's step (rounds follow it) and the scheduled values."""
        super().set_progress(step, total_steps)
        self.step = step

    @property
    def round(self) -> int:
        """The current round (0-based)."""
        return self.step // self.config.round_steps

    @property
    def saturated(self) -> bool:
        """Whether the saturation check stopped training."""
        return bool(self.round_state.saturated > 0)

    def state_dict(self) -> dict[str, Any]:
        """The reference's weights and the round state, each tensor its own copy (tied weights stay savable)."""
        return {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in self._modules.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the names must match exactly."""
        if set(state) != set(self._modules):
            raise ValueError(
                f"agent state has modules {sorted(state)}, this agent has {sorted(self._modules)}"
            )
        for name, m in self._modules.items():
            m.load_state_dict(state[name])

    # --- pieces -----------------------------------------------------------------------------
    def sequence_logprobs_of(self, model: nn.Module, rollout: Rollout) -> Tensor:
        """``log p(y|x)`` of the rollout's completions under ``model`` (gradient if enabled): ``(B,)``."""
        logits, _ = completion_forward(
            model,
            rollout.input_ids,
            rollout.attention_mask,
            rollout.completion_ids.shape[1],
            self.engine.vocab_size,
            dense_head_input=self.engine.dense_head_input,
        )
        return sequence_logprobs(logits, rollout.completion_ids, rollout.completion_mask)

    @torch.no_grad()
    def saturation_kl(self, examples: Sequence[Example], *, seed: int = 1234) -> float:
        """``KL(pθ || pref)`` of whole completions on ``examples`` (module docstring, step 3), in nats.

        Samples at temperature 1 with its own generator (seeded ``seed``): the training stream is not moved.
        """
        cfg = self.config
        was_training = self.student.training
        self.student.eval()
        generator = torch.Generator(device=self.engine.device).manual_seed(seed)
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0)
        r = self.engine.generate([ex.prompt for ex in examples], sampling, generator=generator)
        num = r.completion_ids.shape[1]
        args = (r.input_ids, r.attention_mask, num, self.engine.vocab_size)
        dense = self.engine.dense_head_input
        model_logits, _ = completion_forward(self.student, *args, dense_head_input=dense)  # (B, T, V)
        ref_logits, _ = completion_forward(self.reference, *args, dense_head_input=dense)  # (B, T, V)
        self.student.train(was_training)
        # reverse_kl(teacher, student) = KL(student || teacher): here KL(model || ref) per position.
        per_token = reverse_kl(ref_logits, model_logits, r.completion_mask, reduction="token")  # (B, T)
        return float(per_token.sum(-1).mean())

    def _start_round(self) -> None:
        """Freeze the current model as the new round's reference."""
        self.reference.load_state_dict(self.student.state_dict())

    # --- step -------------------------------------------------------------------------------
    def update(self, batch: Sequence[Example]) -> dict[str, float]:
        """One SPIN update: chosen references vs the model's own samples, DPO loss, and the round bookkeeping."""
        t0 = time.perf_counter()
        cfg = self.config
        if self.saturated:
            self.optimizer.zero_grad(set_to_none=True)
            self.empty_steps += 1
            return {
                "train/loss": 0.0,
                "train/skipped": 1.0,
                "train/grad_norm": 0.0,
                "train/round": float(self.round),
                "train/saturated": 1.0,
                "time/step": time.perf_counter() - t0,
                "time/tokens": 0.0,
            }
        if self.step > 0 and self.step % cfg.round_steps == 0:
            self._start_round()
        missing = [ex.prompt for ex in batch if ex.reference is None]
        if missing:
            raise ValueError(
                f"SPIN's chosen sequences are the dataset references, but {len(missing)} example(s) have none "
                f"(first: {missing[0][:60]!r})"
            )
        prompts = [ex.prompt for ex in batch]
        chosen = self.engine.from_completions(prompts, [ex.reference for ex in batch])
        rejected = self.engine.generate(prompts, cfg.sampling, generator=self.generator)
        t1 = time.perf_counter()
        with torch.no_grad():
            ref_chosen = self.sequence_logprobs_of(self.reference, chosen)  # (B,)
            ref_rejected = self.sequence_logprobs_of(self.reference, rejected)  # (B,)
        self.student.train()
        policy_chosen = self.sequence_logprobs_of(self.student, chosen)  # (B,), with gradient
        policy_rejected = self.sequence_logprobs_of(self.student, rejected)  # (B,), with gradient
        loss, logits = spin_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, cfg.beta)
        stats = self.optimizer_step(loss)
        t2 = time.perf_counter()

        same = [a == b for a, b in zip(self.engine.decode(rejected), self.engine.decode(chosen))]
        stats.update(
            {
                "train/loss": float(loss.detach()),
                "train/round": float(self.round),
                "train/saturated": 0.0,
                "rollout/dpo_logit": float(logits.mean()),
                "rollout/chosen_reward": float(cfg.beta * (policy_chosen.detach() - ref_chosen).mean()),
                "rollout/rejected_reward": float(cfg.beta * (policy_rejected.detach() - ref_rejected).mean()),
                "rollout/reward_accuracy": float((logits > 0).float().mean()),
                "rollout/rejected_equals_chosen": sum(same) / len(same),
                "rollout/completion_length": float(rejected.lengths.float().mean()),
                "time/generate": rejected.timings.get("generate", 0.0),
                "time/teacher": 0.0,
                "time/student_update": t2 - t1,
                "time/step": t2 - t0,
                "time/tokens": float(rejected.lengths.sum()),
            }
        )
        if (self.step + 1) % cfg.round_steps == 0 and cfg.saturation_prompts > 0:
            probe = (self.heldout or list(batch))[: cfg.saturation_prompts]
            kl = self.saturation_kl(probe)
            self.round_state.last_kl.fill_(kl)
            stats["rollout/spin_kl"] = kl
            if cfg.saturation_kl is not None and kl < cfg.saturation_kl:
                self.round_state.saturated.fill_(1.0)
        return stats
