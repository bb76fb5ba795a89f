"""``rl-distill env-check``: build a config's token-generation environment and run Gymnasium's checker.

The environment's arguments come from :func:`rl_distill.build.env_kwargs` (the one place that
assembles runs); when the id is not registered, the error says so instead of failing deep inside
Gymnasium.
"""

from __future__ import annotations

import warnings

from rl_distill.build import ENV_ID, env_kwargs
from rl_distill.config import Config

__all__ = ["ENV_ID", "EnvUnavailableError", "check_config_env", "env_kwargs", "require_env"]


class EnvUnavailableError(RuntimeError):
    """The Gymnasium environment package is missing or does not register :data:`ENV_ID`."""


def require_env() -> None:
    """Check that ``rl_distill.envs`` (imported by :mod:`rl_distill.build`) registered :data:`ENV_ID`.

    Raises:
        EnvUnavailableError: with the reason and what to do.
    """
    import gymnasium

    if ENV_ID not in gymnasium.envs.registry:
        raise EnvUnavailableError(
            f"rl_distill.envs does not register {ENV_ID!r} (registered rl_distill ids: "
            f"{sorted(k for k in gymnasium.envs.registry if k.startswith('rl_distill/')) or 'none'})"
        )


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
