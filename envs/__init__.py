"""Gymnasium environments for on-policy distillation; importing this module registers them.

- ``rl_distill/TokenGeneration-v0``: ``gymnasium.make(ENV_ID, teacher=..., prompts=..., alpha=...,
  reward=..., beta_ext=..., teacher_temperature=..., max_new_tokens=...)`` gives a
  :class:`TokenGenerationEnv`;
  ``gymnasium.make_vec(ENV_ID, num_envs=B, ...)`` a :class:`VectorTokenGenerationEnv` (its
  ``vector_entry_point``; pass ``vectorization_mode="sync"`` for ``B`` single copies instead).
- :class:`SB3VecEnvAdapter` (``rl_distill.envs.sb3_adapter``, imported on first use) makes the
  vector environment a stable-baselines3 ``VecEnv``.
"""

from typing import Any

import gymnasium

from rl_distill.envs.core import EnvRewards, ObservationLayout, TokenGenerationCore
from rl_distill.envs.token_generation import TokenGenerationEnv, VectorTokenGenerationEnv, unbatch_info

#: The registered id of the token-generation environment.
ENV_ID = "rl_distill/TokenGeneration-v0"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(
        id=ENV_ID,
        entry_point="rl_distill.envs.token_generation:TokenGenerationEnv",
        vector_entry_point="rl_distill.envs.token_generation:VectorTokenGenerationEnv",
    )


def __getattr__(name: str) -> Any:
    # stable-baselines3 is imported only by those who use the adapter.
    if name == "SB3VecEnvAdapter":
        from rl_distill.envs.sb3_adapter import SB3VecEnvAdapter

        return SB3VecEnvAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ENV_ID",
    "EnvRewards",
    "ObservationLayout",
    "SB3VecEnvAdapter",
    "TokenGenerationCore",
    "TokenGenerationEnv",
    "VectorTokenGenerationEnv",
    "unbatch_info",
]
