"""Agents: one file per algorithm. The trainer looks them up by name in :data:`AGENTS`."""

from rl_distill.agents.base import Agent
from rl_distill.agents.gkd import GKDAgent, GKDConfig

#: name -> (agent class, its config dataclass)
AGENTS: dict[str, tuple[type[Agent], type]] = {
    "gkd": (GKDAgent, GKDConfig),
}

__all__ = ["AGENTS", "Agent", "GKDAgent", "GKDConfig"]
