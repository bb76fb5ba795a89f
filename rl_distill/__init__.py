"""rl_distill: on-policy distillation of language models framed as reinforcement learning."""

__version__ = "0.1.0"
