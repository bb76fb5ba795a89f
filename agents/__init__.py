"""Agents: one file per algorithm. The trainer looks them up by name in :data:`AGENTS`.

Every agent is built as ``cls(engine, optimizer, config, max_grad_norm=..., generator=...,
reward=None)`` and trained by ``agent.update(batch) -> metrics``; see :mod:`rl_distill.agents.base`
for the contract on the agents' own parameters (value heads) and the optimizer.
"""

from rl_distill.agents.base import Agent
from rl_distill.agents.gkd import SPECIAL_CASES, GKDAgent, GKDConfig
from rl_distill.agents.grpo import GRPOAgent, GRPOConfig
from rl_distill.agents.minillm import MiniLLMAgent, MiniLLMConfig
from rl_distill.agents.ppo import PPOAgent, PPOConfig
from rl_distill.agents.reinforce import REINFORCEAgent, REINFORCEConfig
from rl_distill.agents.spin import SPINAgent, SPINConfig
from rl_distill.agents.uld import ULDAgent, ULDConfig

#: name -> (agent class, its config dataclass)
AGENTS: dict[str, tuple[type[Agent], type]] = {
    "gkd": (GKDAgent, GKDConfig),
    "reinforce": (REINFORCEAgent, REINFORCEConfig),
    "ppo": (PPOAgent, PPOConfig),
    "minillm": (MiniLLMAgent, MiniLLMConfig),
    "spin": (SPINAgent, SPINConfig),
    "grpo": (GRPOAgent, GRPOConfig),
    "uld": (ULDAgent, ULDConfig),
}

__all__ = [
    "AGENTS",
    "SPECIAL_CASES",
    "Agent",
    "GKDAgent",
    "GKDConfig",
    "GRPOAgent",
    "GRPOConfig",
    "MiniLLMAgent",
    "MiniLLMConfig",
    "PPOAgent",
    "PPOConfig",
    "REINFORCEAgent",
    "REINFORCEConfig",
    "SPINAgent",
    "SPINConfig",
    "ULDAgent",
    "ULDConfig",
]
