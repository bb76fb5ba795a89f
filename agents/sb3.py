"""stable-baselines3 PPO on the token-generation environment, with a Hugging Face causal LM as the policy.

:class:`LMActorCriticPolicy` is an SB3 ``ActorCriticPolicy`` whose actor is a causal LM: the action
distribution is the categorical over the vocabulary given by the LM's next-token logits at the last
real token of the observation, and the critic is a linear value head on that token's last hidden
state. SB3 then runs its own PPO (rollout buffer, GAE, clipped surrogate, value loss, entropy bonus)
on :class:`rl_distill.envs.SB3VecEnvAdapter`::

    venv = SB3VecEnvAdapter(VectorTokenGenerationEnv(teacher_and_tokenizer, prompts, num_envs=8))
    ppo = stable_baselines3.PPO(LMActorCriticPolicy, venv, policy_kwargs={"lm": student}, gamma=1.0)
    ppo.learn(total_timesteps=4096)

The environment rewards ``alpha * log pT(a_t | s_t)`` (+ the terminal task reward); the agent's own
term of GKD Eq. 5, ``-alpha * log pS(a_t | s_t)``, has expectation ``alpha * H(pS(. | s_t))``: SB3's
entropy bonus with ``ent_coef = alpha`` (and ``normalize_advantage=False``, which would rescale the
policy term against it) adds it exactly in expectation, making the objective
``(1 - alpha) r - alpha KL(pS || pT)``. :func:`make_ppo` sets these defaults.

What SB3 cannot do that ``rl_distill.agents.ppo`` does: SB3 recomputes the LM over the whole
observation at every step (no KV cache across steps) and stores observations as float32 buffers.
It is the reference implementation to compare against, not the fast path.
"""

from __future__ import annotations

from typing import Any

import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from stable_baselines3.common.vec_env import VecEnv
from torch import Tensor, nn
from transformers import PreTrainedModel

from rl_distill.models import load_causal_lm, logit_width
from rl_distill.rollout import position_ids_from_mask


def last_real_index(attention_mask: Tensor) -> Tensor:
    """``(N,)`` index of each row's last 1 in ``(N, L)`` ``attention_mask`` (the token to predict from)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


class LMActorCriticPolicy(ActorCriticPolicy):
    """An SB3 actor-critic policy backed by a causal LM, for ``rl_distill/TokenGeneration-v0``.

    The observation is the environment's ``Dict`` of fixed-length ``input_ids`` and
    ``attention_mask`` (left-padded prompt, generated tokens, right padding): the LM runs on it with
    position ids computed from the mask, and reads the last real position.

    Args:
        observation_space: ``Dict`` with ``input_ids`` and ``attention_mask`` boxes.
        action_space: ``Discrete(V)``, V the shared vocabulary size (wider logits are cut).
        lr_schedule: SB3's learning-rate schedule.
        lm: the causal LM (e.g. the student), or a name/path for
            :func:`rl_distill.models.load_causal_lm`. It is trained in place.
        temperature: the policy samples from ``softmax(logits / temperature)``.
        **kwargs: ``ActorCriticPolicy`` options (``optimizer_class``, ``optimizer_kwargs``, ...);
            the MLP options (``net_arch``, ``activation_fn``) are unused, and ``ortho_init`` is off
            (it would re-initialise the pretrained LM).

    Raises:
        ValueError: other spaces, or an LM with fewer logits than actions.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        *,
        lm: PreTrainedModel | str,
        temperature: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(observation_space, spaces.Dict) or {"input_ids", "attention_mask"} - set(
            observation_space.spaces
        ):
            raise ValueError(
                f"LMActorCriticPolicy needs a Dict observation with input_ids and attention_mask, got {observation_space}"
            )
        if not isinstance(action_space, spaces.Discrete):
            raise ValueError(f"LMActorCriticPolicy needs a Discrete action space, got {action_space}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        # The base constructor calls _build(), which creates the networks, but nn.Module refuses a
        # module attribute before Module.__init__ has run: hand the LM over inside a tuple.
        self._lm_source = (lm,)
        self.temperature = temperature
        kwargs["ortho_init"] = False
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        """Create the LM actor, the value head and the optimizer (replaces SB3's MLP extractor)."""
        (lm,) = self._lm_source
        del self._lm_source
        self.lm = load_causal_lm(lm) if isinstance(lm, str) else lm
        self.vocab_size = int(self.action_space.n)
        if logit_width(self.lm) < self.vocab_size:
            raise ValueError(
                f"the LM has {logit_width(self.lm)} output logits, fewer than the {self.vocab_size} actions"
            )
        hidden = self.lm.get_input_embeddings().weight.shape[1]
        self.value_net = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_net.weight)  # start from V = 0 instead of noise on a large hidden state
        nn.init.zeros_(self.value_net.bias)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(lm=self.lm, temperature=self.temperature)
        return data

    def lm_forward(self, obs: PyTorchObs) -> tuple[Tensor, Tensor]:
        """Next-token logits ``(N, V)`` (tempered) and values ``(N, 1)`` at each row's last real token."""
        assert isinstance(obs, dict)
        # SB3's rollout buffer stores observations as float32: token ids are exact below 2**24.
        ids, mask = obs["input_ids"].long(), obs["attention_mask"].long()  # (N, L)
        # Drop the columns that are padding in every row (the layout pads on both sides).
        used = mask.any(dim=0).nonzero().squeeze(-1)
        lo, hi = int(used[0]), int(used[-1]) + 1
        ids, mask = ids[:, lo:hi], mask[:, lo:hi]
        out = self.lm.base_model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
        )
        rows = torch.arange(ids.shape[0], device=ids.device)
        last = out.last_hidden_state[rows, last_real_index(mask)]  # (N, H)
        # The LM head on one position per row only: no (N, L, V) logits.
        logits = self.lm.get_output_embeddings()(last)[:, : self.vocab_size].float()  # (N, V)
        return logits / self.temperature, self.value_net(last.float())

    def _distribution(self, logits: Tensor) -> Distribution:
        return self.action_dist.proba_distribution(action_logits=logits)

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Sample (or take the argmax) token; return ``(actions, values, log_prob)`` as SB3 expects."""
        logits, values = self.lm_forward(obs)
        dist = self._distribution(logits)
        actions = dist.get_actions(deterministic=deterministic)
        return actions, values, dist.log_prob(actions)

    def evaluate_actions(self, obs: PyTorchObs, actions: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Values, log-probs of ``actions`` and entropies under the current policy (PPO's update)."""
        logits, values = self.lm_forward(obs)
        dist = self._distribution(logits)
        return values, dist.log_prob(actions), dist.entropy()

    def get_distribution(self, obs: PyTorchObs) -> Distribution:
        """The categorical over the vocabulary at each observation's last real token."""
        return self._distribution(self.lm_forward(obs)[0])

    def predict_values(self, obs: PyTorchObs) -> Tensor:
        """The value head's estimate ``(N, 1)``."""
        return self.lm_forward(obs)[1]


def make_ppo(
    venv: VecEnv, lm: PreTrainedModel | str, *, alpha: float | None = None, **ppo_kwargs: Any
) -> PPO:
    """SB3 PPO with :class:`LMActorCriticPolicy` and the defaults of GKD Eq. 5 (see the module docstring).

    Defaults (each overridable through ``ppo_kwargs``): ``gamma=1`` (the objective is an undiscounted
    sum over the sequence), ``ent_coef=alpha`` and ``normalize_advantage=False`` (the agent's own
    ``-alpha log pS`` term, in expectation).

    Args:
        venv: an :class:`rl_distill.envs.SB3VecEnvAdapter`.
        lm: the student LM, trained in place.
        alpha: the environment's alpha; default: read from the adapted environment.
        **ppo_kwargs: any ``stable_baselines3.PPO`` argument; ``policy_kwargs`` are merged.
    """
    if alpha is None:
        alpha = float(venv.get_attr("alpha")[0])
    policy_kwargs = {"lm": lm, **ppo_kwargs.pop("policy_kwargs", {})}
    defaults: dict[str, Any] = {"gamma": 1.0, "ent_coef": alpha, "normalize_advantage": False}
    return PPO(LMActorCriticPolicy, venv, policy_kwargs=policy_kwargs, **{**defaults, **ppo_kwargs})
