"""The batched rollout engine shared by every agent and environment."""

from rl_distill.rollout.engine import Rollout, RolloutEngine, SamplingConfig, completion_logits
from rl_distill.rollout.incremental import IncrementalScorer, IncrementalState
from rl_distill.rollout.prompts import PromptBatch, PromptEncoder, PromptTooLongError, position_ids_from_mask

__all__ = [
    "IncrementalScorer",
    "IncrementalState",
    "PromptBatch",
    "PromptEncoder",
    "PromptTooLongError",
    "Rollout",
    "RolloutEngine",
    "SamplingConfig",
    "completion_logits",
    "position_ids_from_mask",
]
