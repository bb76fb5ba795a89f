"""Token generation as a Gymnasium environment: one token per step, rewarded by the teacher (GKD Eq. 5).

:class:`TokenGenerationEnv` generates one sequence per episode; :class:`VectorTokenGenerationEnv`
generates ``B`` at once with one batched teacher step. Both are registered as
``rl_distill/TokenGeneration-v0`` (``gymnasium.make`` / ``gymnasium.make_vec``) on
``import rl_distill.envs``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from rl_distill.envs.core import EnvRewards, ObservationLayout, PromptOption, TokenGenerationCore
from rl_distill.envs.sources import PromptSource, TeacherSpec
from rl_distill.rewards.registry import RewardSpec
from rl_distill.rollout import Rollout, RolloutEngine
from rl_distill.tasks import Example

Observation = dict[str, np.ndarray]


class _CoreAccessors:
    """Read-only views of the shared :class:`TokenGenerationCore` (both env classes have one)."""

    core: TokenGenerationCore

    @property
    def engine(self) -> RolloutEngine:
        """The rollout engine holding the teacher and the prompt encoder."""
        return self.core.engine

    @property
    def layout(self) -> ObservationLayout:
        """Where prompt and completion sit in each observation row."""
        return self.core.layout

    @property
    def alpha(self) -> float:
        """Weight of the distillation term."""
        return self.core.alpha

    @property
    def beta_ext(self) -> float | None:
        """Reward-extrapolation weight of the external reward (None: Eq. 5's alpha form)."""
        return self.core.beta_ext

    @property
    def teacher_temperature(self) -> float:
        """Temperature of the teacher's log-probs in the rewards."""
        return self.core.teacher_temperature


class TokenGenerationEnv(_CoreAccessors, gym.Env[Observation, np.int64]):
    """Generate one completion token by token; the reward is the teacher's log-prob of each token.

    This is the RL view of on-policy distillation (GKD, Agarwal et al. 2023, Eq. 5): the agent is
    the student, a state is the prompt plus the tokens so far, an action is the next token.

    ## Action Space

    ``Discrete(V)``: a token id of the shared vocabulary, ``V = len(tokenizer)``. Logit rows of the
    teacher beyond ``V`` (embedding padding) are not actions and never scored.

    ## Observation Space

    ``Dict`` of two ``Box`` es of length ``L = P + N`` (``P = max_prompt_length``,
    ``N = max_new_tokens``), both ``int64``:

    - ``"input_ids"``: token ids in ``[0, V - 1]``;
    - ``"attention_mask"``: 1 on real tokens, 0 on padding.

    Layout (:class:`ObservationLayout`): the prompt left-padded into slots ``[0, P)``, so it ends at
    slot ``P - 1``; the ``t`` generated tokens in slots ``[P, P + t)``; padding after them. The last
    real token is at slot ``P - 1 + t``. Compute position ids from the mask.

    ## Rewards

    At step ``t``, ``alpha * log pT(a_t | s_t)``; at the step that ends the episode, plus
    ``(1 - alpha) * r(prompt, completion)`` from the optional external ``reward`` (called through
    :func:`rl_distill.rewards.registry.score_examples`, metadata from the prompt's Example). With
    ``beta_ext`` (reward extrapolation, G-OPD; needs ``alpha = 1``): ``log pT(a_t | s_t)`` per step
    plus ``beta_ext * r`` at the end, ``beta_ext >= 0`` unbounded. Eq. 5 with ``alpha`` is the same
    objective up to the positive scale ``alpha`` when ``beta_ext = (1 - alpha) / alpha``: its rewards
    are ``alpha`` times these (see :mod:`rl_distill.objective`). Computed by
    :func:`rl_distill.objective.env_token_rewards`, the function agents use. The student's own term
    ``-alpha * log pS(a_t | s_t)`` (``-log pS`` with ``beta_ext``) belongs to the agent. When the
    reward has no weight (``alpha = 1`` and no ``beta_ext > 0``) it is never called.

    ``pT`` is the teacher's softmax at ``teacher_temperature`` (default 1.0, the teacher's own
    distribution: the environment knows no student and so no sampling temperature). An agent that
    samples at temperature ``tau`` and wants the teacher on the same footing, as GKD's divergence
    and the ``reinforce``/``ppo`` agents by default, passes ``teacher_temperature=tau``.

    ``info`` holds ``teacher_logprob`` (``log pT(a_t | s_t)``, at ``teacher_temperature``),
    ``alpha``, ``beta_ext`` (only when given), ``external_reward`` (the raw ``r``, at the end only,
    when it has weight) and, with ``return_teacher_logprobs=True``, ``teacher_logprobs``: the
    teacher's full ``(V,)`` float32 log-probs at ``s_t`` (at ``teacher_temperature``), the
    distribution ``a_t`` was scored under. The reset info holds ``prompt`` and ``prompt_index`` (-1
    for a prompt given as text that is not in the source).

    ## Episode End

    Terminated when the action is a stop token (the tokenizer's EOS, or ``stop_token_ids``); the
    stop token is part of the completion and rewarded. Truncated when ``N`` tokens have been
    generated without a stop token (never both). Stepping after the end raises; call ``reset``.

    ## Starting State

    A prompt drawn uniformly from the prompt source with ``self.np_random``, or chosen with
    ``reset(options={"prompt": p})``: ``p`` an index into the source, a prompt string (its Example
    is looked up in the source) or an Example. The teacher runs its KV-cache prefill of the prompt;
    each step then costs one incremental teacher forward of one token.

    ## Arguments

    - ``teacher``: a model name/path (``smollm2-135m-instruct``, a checkpoint folder) or a loaded
      ``(model, tokenizer)`` pair.
    - ``prompts``: prompt strings, :class:`Example` s, a task name or a :class:`TaskData`.
    - ``reward`` (None): a callable ``(prompts, completions, **metadata)``, or a registered name,
      ``module:function`` or spec dict (:func:`rl_distill.rewards.registry.resolve_reward`).
    - ``alpha`` (1.0), ``beta_ext`` (None), ``teacher_temperature`` (1.0), ``max_new_tokens`` (32),
      ``max_prompt_length`` (default:
      the longest prompt), ``chat_template``, ``stop_token_ids``, ``return_teacher_logprobs``,
      ``split`` (``"train"``; a task's split), ``dtype``/``device`` (teacher loaded by name),
      ``render_mode`` (None or ``"ansi"``).

    Bad arguments fail at construction with the argument named: an unknown teacher, an empty prompt
    source, ``alpha`` outside [0, 1], ``alpha = 0`` without a reward, a negative ``beta_ext``,
    ``beta_ext`` with ``alpha != 1``, ``beta_ext > 0`` without a reward, ``teacher_temperature <= 0``,
    a prompt longer than ``max_prompt_length`` or prompts that with ``N`` new tokens exceed the
    teacher's context.

    ## Version History

    - v0: initial version (Gymnasium 1.x API).
    """

    # render_fps means nothing for text, but Gymnasium's checker asks every render mode for one.
    metadata: dict[str, Any] = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        teacher: TeacherSpec,
        prompts: PromptSource,
        *,
        alpha: float = 1.0,
        reward: RewardSpec = None,
        beta_ext: float | None = None,
        teacher_temperature: float = 1.0,
        max_new_tokens: int = 32,
        max_prompt_length: int | None = None,
        chat_template: bool | None = None,
        stop_token_ids: Sequence[int] = (),
        return_teacher_logprobs: bool = False,
        split: str = "train",
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        render_mode: str | None = None,
    ) -> None:
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(
                f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}"
            )
        self.core = TokenGenerationCore(
            teacher,
            prompts,
            num_rows=1,
            alpha=alpha,
            reward=reward,
            beta_ext=beta_ext,
            teacher_temperature=teacher_temperature,
            max_new_tokens=max_new_tokens,
            max_prompt_length=max_prompt_length,
            chat_template=chat_template,
            stop_token_ids=stop_token_ids,
            return_teacher_logprobs=return_teacher_logprobs,
            split=split,
            dtype=dtype,
            device=device,
        )
        self.action_space = self.core.action_space
        self.observation_space = self.core.observation_space
        self.render_mode = render_mode
        self._episode_over = True

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Observation, dict[str, Any]]:
        """Start a new episode on a prompt drawn with ``self.np_random`` or given in ``options["prompt"]``."""
        super().reset(seed=seed)
        option = _prompt_option(options, allowed=("prompt",)).get("prompt")
        self.core.start([self.core.pick(option, self.np_random)])
        self._episode_over = False
        return self.core.observation(0), self.core.reset_info(0)

    def step(self, action: Any) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        """Append the token ``action``; see the class docstring for rewards and episode end."""
        if self._episode_over:
            raise RuntimeError("the episode has ended (or never started): call reset() before step()")
        rewards, terminated, truncated, infos = self.core.step(np.asarray(action).reshape(1))
        self._episode_over = bool(terminated[0] or truncated[0])
        return self.core.observation(0), float(rewards[0]), bool(terminated[0]), bool(truncated[0]), infos[0]

    def render(self) -> str | None:
        """``"ansi"``: the prompt and the completion so far as text."""
        if self.render_mode != "ansi":
            return None
        return f"{self.core.rows[0][1].prompt}\n>>> {self.core.completion_text(0)}"

    def close(self) -> None:
        """Drop the teacher's cache (the teacher itself may be shared and is kept)."""
        self.core.state = None
        self._episode_over = True

    def bulk_rewards(self, rollout: Rollout, *, examples: Sequence[Example] | None = None) -> EnvRewards:
        """The rewards stepping would give, for a whole batch of finished sequences at once.

        What fast agents use: one causal teacher forward (:meth:`RolloutEngine.score`) and
        :func:`rl_distill.objective.env_token_rewards`, instead of ``B * T`` environment steps. The
        result equals stepping this environment through each sequence's tokens, episode end included
        (a sequence's last real token gets the external reward, whether it is a stop token or the
        budget ran out).

        Args:
            rollout: prompts and completions, e.g. from ``engine.generate`` (on-policy student samples)
                or :meth:`rollout_from_tokens`; encoded like this environment's prompts. Its
                ``teacher_logprobs`` are (re)computed with this environment's teacher, at its
                ``teacher_temperature``.
            examples: the Examples of the prompts (reward metadata); default: looked up by prompt text
                in the prompt source.

        Returns:
            :class:`EnvRewards` with ``(B, T)`` rewards.
        """
        return self.core.bulk_rewards(rollout, examples=examples)

    def rollout_from_tokens(
        self, prompts: Sequence[str | Example], completion_ids: Sequence[Sequence[int]]
    ) -> Rollout:
        """A rollout of the given completion token ids (kept exactly, no EOS added), for :meth:`bulk_rewards`."""
        return self.core.rollout_from_tokens(prompts, completion_ids)


class VectorTokenGenerationEnv(_CoreAccessors, VectorEnv):
    """``num_envs`` token-generation episodes stepped together: one batched teacher forward per step.

    Spaces, rewards and episode ends are those of :class:`TokenGenerationEnv` (see its docstring),
    batched: observations ``Dict`` of ``(B, P + N)`` int64 boxes, actions ``MultiDiscrete([V] * B)``.
    The teacher keeps one KV cache for the ``B`` rows (:class:`rl_distill.rollout.IncrementalScorer`);
    external rewards of the episodes that end at the same step are computed in one reward call.

    ## Autoreset

    ``metadata["autoreset_mode"]`` is ``AutoresetMode.SAME_STEP``: when sub-environment ``i`` ends,
    the same ``step`` call starts its next episode (a prompt drawn with its own generator, one
    prefill of that row only, the other rows keep their caches). The returned observation of ``i``
    is the new episode's first; the last observation and info of the ended episode are in
    ``infos["final_obs"][i]`` and ``infos["final_info"]`` (masked by ``infos["_final_obs"]``), and the
    reset info (``prompt``, ``prompt_index``) of the new episode is in ``infos``. This is the layout
    of ``SyncVectorEnv(autoreset_mode=SAME_STEP)`` over ``B`` :class:`TokenGenerationEnv` s and what
    stable-baselines3 expects; every step yields ``B`` real tokens, with no idle step.

    ## Seeding

    ``reset(seed=s)`` seeds sub-environment ``i`` with ``s + i`` (or ``seed`` may be a list), exactly
    as ``SyncVectorEnv`` seeds its copies, so this environment equals ``B`` single environments
    step for step.

    ## Options

    ``reset(options={"prompt": p})`` starts every sub-environment on ``p``;
    ``options={"prompts": [p_0, ..., p_{B-1}]}`` gives one prompt (or None: drawn) per
    sub-environment.

    ## Version History

    - v0: initial version.
    """

    metadata: dict[str, Any] = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(
        self,
        teacher: TeacherSpec,
        prompts: PromptSource,
        num_envs: int = 1,
        *,
        alpha: float = 1.0,
        reward: RewardSpec = None,
        beta_ext: float | None = None,
        teacher_temperature: float = 1.0,
        max_new_tokens: int = 32,
        max_prompt_length: int | None = None,
        chat_template: bool | None = None,
        stop_token_ids: Sequence[int] = (),
        return_teacher_logprobs: bool = False,
        split: str = "train",
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
    ) -> None:
        self.core = TokenGenerationCore(
            teacher,
            prompts,
            num_rows=num_envs,
            alpha=alpha,
            reward=reward,
            beta_ext=beta_ext,
            teacher_temperature=teacher_temperature,
            max_new_tokens=max_new_tokens,
            max_prompt_length=max_prompt_length,
            chat_template=chat_template,
            stop_token_ids=stop_token_ids,
            return_teacher_logprobs=return_teacher_logprobs,
            split=split,
            dtype=dtype,
            device=device,
        )
        self.num_envs = num_envs
        self.single_observation_space = self.core.observation_space
        self.single_action_space = self.core.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._rngs: list[np.random.Generator | None] = [None] * num_envs

    def reset(
        self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Observation, dict[str, Any]]:
        """Start every sub-environment on a new prompt (one batched teacher prefill)."""
        seeds = _vector_seeds(seed, self.num_envs)
        super().reset(seed=seed if isinstance(seed, int) else None)
        for i, s in enumerate(seeds):
            if s is not None or self._rngs[i] is None:
                self._rngs[i] = seeding.np_random(s)[0]
        choices = _vector_prompt_options(options, self.num_envs)
        self.core.start([self.core.pick(choice, rng) for choice, rng in zip(choices, self._rngs)])
        infos: dict[str, Any] = {}
        for i in range(self.num_envs):
            infos = self._add_info(infos, self.core.reset_info(i), i)
        return self.core.observation(), infos

    def step(self, actions: Any) -> tuple[Observation, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Append one token per sub-environment; ended episodes restart in the same call (SAME_STEP)."""
        rewards, terminated, truncated, step_infos = self.core.step(actions)
        done = np.flatnonzero(terminated | truncated)
        final_obs = {int(i): self.core.observation(int(i)) for i in done}
        if len(done):
            picks = [self.core.pick(None, self._rngs[i]) for i in done]
            self.core.restart(done.tolist(), picks)
        infos: dict[str, Any] = {}
        for i in range(self.num_envs):
            if i in final_obs:
                infos = self._add_info(infos, {"final_obs": final_obs[i], "final_info": step_infos[i]}, i)
                infos = self._add_info(infos, self.core.reset_info(i), i)
            else:
                infos = self._add_info(infos, step_infos[i], i)
        return self.core.observation(), rewards, terminated, truncated, infos

    def close_extras(self, **kwargs: Any) -> None:
        """Drop the teacher's cache (the teacher itself may be shared and is kept)."""
        self.core.state = None

    def bulk_rewards(self, rollout: Rollout, *, examples: Sequence[Example] | None = None) -> EnvRewards:
        """See :meth:`TokenGenerationEnv.bulk_rewards`."""
        return self.core.bulk_rewards(rollout, examples=examples)

    def rollout_from_tokens(
        self, prompts: Sequence[str | Example], completion_ids: Sequence[Sequence[int]]
    ) -> Rollout:
        """See :meth:`TokenGenerationEnv.rollout_from_tokens`."""
        return self.core.rollout_from_tokens(prompts, completion_ids)


def unbatch_info(infos: dict[str, Any], index: int) -> dict[str, Any]:
    """The info dict of sub-environment ``index`` from Gymnasium's batched infos (``key``/``_key``)."""
    out: dict[str, Any] = {}
    for key, value in infos.items():
        if key.startswith("_"):
            continue
        present = infos.get(f"_{key}")
        if present is not None and not present[index]:
            continue
        out[key] = unbatch_info(value, index) if isinstance(value, dict) else value[index]
    return out


def _prompt_option(options: Mapping[str, Any] | None, allowed: tuple[str, ...]) -> dict[str, Any]:
    """``options`` checked for unknown keys (a typo would silently draw a random prompt)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown reset options {unknown}; accepted: {list(allowed)}")
    return options


def _vector_prompt_options(options: Mapping[str, Any] | None, num_envs: int) -> list[PromptOption]:
    """One prompt choice per sub-environment from ``{"prompt": p}`` or ``{"prompts": [...]}``."""
    opts = _prompt_option(options, allowed=("prompt", "prompts"))
    if "prompt" in opts and "prompts" in opts:
        raise ValueError(
            "give reset option 'prompt' (all sub-environments) or 'prompts' (one each), not both"
        )
    if "prompts" in opts:
        choices = list(opts["prompts"])
        if len(choices) != num_envs:
            raise ValueError(f"options['prompts'] has {len(choices)} entries for {num_envs} sub-environments")
        return choices
    return [opts.get("prompt")] * num_envs


def _vector_seeds(seed: int | Sequence[int | None] | None, num_envs: int) -> list[int | None]:
    """Per-sub-environment seeds, as ``SyncVectorEnv`` derives them: ``seed + i``."""
    if seed is None:
        return [None] * num_envs
    if isinstance(seed, int | np.integer):
        return [int(seed) + i for i in range(num_envs)]
    seeds = list(seed)
    if len(seeds) != num_envs:
        raise ValueError(f"got {len(seeds)} seeds for {num_envs} sub-environments")
    return seeds
