"""``rl-distill env-check``: build a config's token-generation environment and run Gymnasium's checker.

The environment package (``rl_distill.envs``, registering :data:`ENV_ID`) is imported lazily, so
the rest of the toolkit works without it; when it is missing or does not register the id, the
error says so instead of failing deep inside Gymnasium.
"""

from __future__ import annotations

import warnings
from typing import Any

from rl_distill.config import Config

ENV_ID = "rl_distill/TokenGeneration-v0"


class EnvUnavailableError(RuntimeError):
    """The Gymnasium environment package is missing or does not register :data:`ENV_ID`."""


def require_env() -> None:
    """Import ``rl_distill.envs`` and check that it registers :data:`ENV_ID`.

    Raises:
        EnvUnavailableError: with the reason and what to do.
    """
    import gymnasium

    try:
        import rl_distill.envs  # noqa: F401  (registers the ids on import)
    except ImportError as exc:
        raise EnvUnavailableError(
            f"the Gymnasium environments (rl_distill.envs) cannot be imported: {exc}. "
            "Install the project with its envs/ folder (pip install -e .)"
        ) from exc
    if ENV_ID not in gymnasium.envs.registry:
        raise EnvUnavailableError(
            f"rl_distill.envs does not register {ENV_ID!r} (registered rl_distill ids: "
            f"{sorted(k for k in gymnasium.envs.registry if k.startswith('rl_distill/')) or 'none'})"
        )


def env_kwargs(config: Config, num_prompts: int) -> dict[str, Any]:
    """The environment's arguments from a config: teacher, prompts, alpha, reward, max_new_tokens.

    The prompts are the first ``num_prompts`` training examples (with their metadata).
    """
    from rl_distill.distributed import resolve_device
    from rl_distill.models import load_causal_lm, load_tokenizer
    from rl_distill.rewards.registry import build_reward
    from rl_distill.tasks import load_task

    mc, dc, agent = config.model, config.data, config.agent
    task = load_task(dc.task, seed=dc.seed, num_train=dc.num_train, num_eval=dc.num_eval, **dc.options)
    tokenizer = load_tokenizer(mc.teacher, trust_remote_code=mc.trust_remote_code)
    teacher = load_causal_lm(
        mc.teacher, dtype=mc.dtype, device=resolve_device(mc.device), trust_remote_code=mc.trust_remote_code
    )
    reward_spec = getattr(agent, "reward", None)
    kwargs = {
        "teacher": (teacher.eval().requires_grad_(False), tokenizer),
        # Examples rather than strings: their metadata (answers, fact tables) reaches the reward.
        "prompts": list(task.train[:num_prompts]),
        "alpha": getattr(agent, "alpha", 1.0),
        "reward": build_reward(reward_spec) if reward_spec is not None else None,
        "max_new_tokens": getattr(agent, "max_new_tokens", 32),
    }
    if mc.chat_template is not None:
        kwargs["chat_template"] = mc.chat_template
    return kwargs


def check_config_env(config: Config, *, num_prompts: int = 4) -> list[str]:
    """Make the config's environment and run ``gymnasium.utils.env_checker.check_env`` on it.

    Args:
        config: the run configuration (teacher, task prompts, agent's alpha/reward/budget).
        num_prompts: training prompts given to the environment.

    Returns:
        The checker's warnings (empty when the environment is clean).

    Raises:
        EnvUnavailableError: no environment package or id.
        AssertionError: (or another error from the checker) the environment breaks the API.
    """
    import gymnasium
    from gymnasium.utils.env_checker import check_env

    require_env()
    env = gymnasium.make(ENV_ID, **env_kwargs(config, num_prompts))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_env(env.unwrapped)
    finally:
        env.close()
    return [f"{w.category.__name__}: {w.message}" for w in caught]
