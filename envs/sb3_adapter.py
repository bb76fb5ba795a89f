"""A stable-baselines3 ``VecEnv`` over :class:`VectorTokenGenerationEnv`.

stable-baselines3 predates Gymnasium 1.x vector environments and expects: ``reset()`` returning only
observations (seeds and options set beforehand with ``seed()`` / ``set_options()``), same-step
autoreset, ``dones = terminated | truncated``, and a list of per-environment info dicts in which an
ended episode carries ``terminal_observation`` and ``TimeLimit.truncated`` (so that PPO bootstraps
the value of a truncated episode and not of a terminated one). The vector environment already
autoresets in the same step; this adapter only reshapes its outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn

from rl_distill.envs.token_generation import VectorTokenGenerationEnv, unbatch_info


class SB3VecEnvAdapter(VecEnv):
    """Expose a :class:`VectorTokenGenerationEnv` as a stable-baselines3 ``VecEnv``.

    Example::

        venv = SB3VecEnvAdapter(VectorTokenGenerationEnv(teacher, prompts, num_envs=8))
        model = stable_baselines3.PPO(LMActorCriticPolicy, venv, policy_kwargs={"lm": student})

    Args:
        env: the vector environment (same-step autoreset).

    Raises:
        ValueError: if ``env`` does not autoreset in the same step.
    """

    def __init__(self, env: VectorTokenGenerationEnv) -> None:
        if env.metadata.get("autoreset_mode") != AutoresetMode.SAME_STEP:
            raise ValueError(
                f"stable-baselines3 needs same-step autoreset, got {env.metadata.get('autoreset_mode')!r}"
            )
        self.env = env
        self._actions: np.ndarray | None = None
        super().__init__(env.num_envs, env.single_observation_space, env.single_action_space)

    def reset(self) -> VecEnvObs:
        """Reset every sub-environment with the seeds/options set by ``seed()``/``set_options()``."""
        seeds = None if all(s is None for s in self._seeds) else list(self._seeds)
        prompts = [opts.get("prompt") for opts in self._options]
        options = {"prompts": prompts} if any(p is not None for p in prompts) else None
        obs, infos = self.env.reset(seed=seeds, options=options)
        self.reset_infos = [unbatch_info(infos, i) for i in range(self.num_envs)]
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        """Remember the actions; the step runs in :meth:`step_wait`."""
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        """Step, and move each ended episode's last observation and info into SB3's places."""
        if self._actions is None:
            raise RuntimeError("step_wait() called without step_async()")
        obs, rewards, terminated, truncated, infos = self.env.step(self._actions)
        self._actions = None
        dones = terminated | truncated
        out = []
        for i in range(self.num_envs):
            if dones[i]:
                info = unbatch_info(infos["final_info"], i)
                info["terminal_observation"] = infos["final_obs"][i]
                info["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
                reset_info = unbatch_info(infos, i)
                for key in ("final_obs", "final_info"):
                    reset_info.pop(key, None)
                self.reset_infos[i] = reset_info
            else:
                info = unbatch_info(infos, i)
            out.append(info)
        return obs, rewards.astype(np.float32), dones, out

    def close(self) -> None:
        """Close the vector environment."""
        self.env.close()

    def _indices(self, indices: VecEnvIndices) -> Sequence[int]:
        if indices is None:
            return range(self.num_envs)
        return [indices] if isinstance(indices, int) else list(indices)

    # The sub-environments share one object, so attributes and methods are those of the vector env.
    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """The vector environment's attribute, once per requested index."""
        return [getattr(self.env, attr_name) for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Set an attribute of the vector environment (shared by every index)."""
        setattr(self.env, attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        """Call a method of the vector environment once; its result is given for each index."""
        result = getattr(self.env, method_name)(*method_args, **method_kwargs)
        return [result for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        """Never wrapped: the vector environment holds no Gymnasium wrappers."""
        return [False for _ in self._indices(indices)]
