"""The batched core shared by the single and the vector token-generation environments.

:class:`TokenGenerationCore` holds ``B`` rows (``B = 1`` for :class:`TokenGenerationEnv`), each one
sequence being generated: the fixed-length observation buffers, the prompt each row started from,
and the teacher's incremental state (:class:`rl_distill.rollout.IncrementalScorer`, one batched KV
cache). One :meth:`TokenGenerationCore.step` is one batched teacher forward of the ``B`` new tokens.
Rewards come from :func:`rl_distill.objective.env_token_rewards`, the same function agents use.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from rl_distill.envs.sources import PromptSource, TeacherSpec, resolve_prompts, resolve_teacher
from rl_distill.objective import env_token_rewards
from rl_distill.rewards.registry import RewardSpec, resolve_reward, score_examples
from rl_distill.rollout import IncrementalState, PromptBatch, PromptTooLongError, Rollout, RolloutEngine
from rl_distill.tasks import Example

#: A prompt choice at reset: an index into the prompt source, a prompt string, an Example, or None
#: (drawn with the environment's ``np_random``).
PromptOption = int | str | Example | None


@dataclass(frozen=True)
class ObservationLayout:
    """Where tokens sit in the fixed-length observation of ``P + N`` slots.

    ::

        slot:  0 ............ P-1 | P ............... P+N-1
        ids:   pad pad p_0 .. p_k | a_0 .. a_{t-1} pad .. pad
        mask:   0   0   1  ..  1  |  1  ..    1     0  ..  0

    The prompt is left-padded into the first ``P = max_prompt_length`` slots, so its last token is
    always at slot ``P - 1``; the ``t`` tokens generated so far follow from slot ``P``, then right
    padding. The last real token (whose next-token distribution a policy reads) is at slot
    ``P - 1 + t``. Position ids follow from the mask (:func:`rl_distill.rollout.position_ids_from_mask`).

    Attributes:
        max_prompt_length: ``P``.
        max_new_tokens: ``N``.
    """

    max_prompt_length: int
    max_new_tokens: int

    @property
    def length(self) -> int:
        """``P + N``, the observation length."""
        return self.max_prompt_length + self.max_new_tokens

    def prompt_batch(self, observation: Mapping[str, np.ndarray], texts: Sequence[str] = ()) -> PromptBatch:
        """The prompts of a batch of observations ``(B, P + N)`` as a left-padded :class:`PromptBatch`.

        Padding columns shared by every row are dropped, as :class:`PromptEncoder` would pad them.
        """
        ids = torch.as_tensor(observation["input_ids"][..., : self.max_prompt_length]).long()
        mask = torch.as_tensor(observation["attention_mask"][..., : self.max_prompt_length]).long()
        ids, mask = ids.reshape(-1, self.max_prompt_length), mask.reshape(-1, self.max_prompt_length)
        keep = int(mask.sum(-1).max())
        names = list(texts) or [""] * ids.shape[0]
        return PromptBatch(ids[:, -keep:].contiguous(), mask[:, -keep:].contiguous(), names)


@dataclass
class EnvRewards:
    """The environment's rewards for a batch of finished sequences (see ``bulk_rewards``).

    Attributes:
        rewards: ``(B, T)`` per-token rewards, exactly what stepping the environment returns.
        teacher_logprobs: ``(B, T)`` ``log pT`` of each token (0 where masked).
        completion_mask: ``(B, T)`` True on real completion tokens.
        external: ``(B,)`` external rewards ``r(x, y)``, or None (no reward, or it has no weight).
    """

    rewards: Tensor
    teacher_logprobs: Tensor
    completion_mask: Tensor
    external: Tensor | None


class TokenGenerationCore:
    """``B`` sequences generated token by token, scored by the teacher with its own KV cache.

    Args:
        teacher: model name/path or ``(model, tokenizer)``.
        prompts: prompt strings, Examples, a task name or TaskData.
        num_rows: ``B``.
        alpha: weight of the distillation term (GKD Eq. 5), in [0, 1].
        reward: optional external reward ``(prompts, completions, **metadata) -> list[float]``.
        beta_ext: reward extrapolation (G-OPD): rewards ``log pT`` per token plus ``beta_ext * r`` at
            the end (>= 0, unbounded; needs ``alpha = 1``); None for Eq. 5's alpha form.
        teacher_temperature: temperature of the teacher's log-probs in the rewards, > 0.
        max_new_tokens: ``N``, the episode's token budget.
        max_prompt_length: ``P``; default: the longest prompt of the source.
        chat_template: see :class:`rl_distill.rollout.PromptEncoder`.
        stop_token_ids: token ids that end an episode besides the tokenizer's EOS.
        return_teacher_logprobs: put the teacher's full next-token log-probs in ``info``.
        split: the split of a task given by name.
        dtype: dtype of a teacher loaded by name.
        device: device of a teacher loaded by name.
    """

    def __init__(
        self,
        teacher: TeacherSpec,
        prompts: PromptSource,
        *,
        num_rows: int = 1,
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
        # Cheap argument checks first: a bad value fails before a model is loaded.
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if beta_ext is not None:
            if isinstance(beta_ext, bool) or not isinstance(beta_ext, numbers.Real) or not beta_ext >= 0:
                raise ValueError(f"beta_ext must be >= 0 (or None), got {beta_ext!r}")
            if alpha != 1.0:
                raise ValueError(
                    f"beta_ext ({beta_ext}) replaces Eq. 5's alpha weighting: leave alpha at 1, got {alpha}"
                )
        if (
            isinstance(teacher_temperature, bool)
            or not isinstance(teacher_temperature, numbers.Real)
            or not teacher_temperature > 0
        ):
            raise ValueError(f"teacher_temperature must be > 0, got {teacher_temperature!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if num_rows < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_rows}")
        self.reward = resolve_reward(reward)
        if alpha == 0.0 and self.reward is None:
            raise ValueError("alpha=0 keeps only the external reward, but no reward was given")
        if beta_ext and self.reward is None:
            raise ValueError(f"beta_ext={beta_ext} weights an external reward, but no reward was given")
        self.examples = resolve_prompts(prompts, split=split)
        model, tokenizer = resolve_teacher(teacher, dtype=dtype, device=device)
        # The environment knows no student: the engine's student slot holds the teacher too, and
        # only its prompt encoding, stop ids, scoring and incremental scorer are used.
        self.engine = RolloutEngine(
            model,
            model,
            tokenizer,
            chat_template=chat_template,
            max_prompt_length=max_prompt_length,
            stop_token_ids=stop_token_ids,
        )
        self.alpha = float(alpha)
        self.beta_ext = None if beta_ext is None else float(beta_ext)
        self.teacher_temperature = float(teacher_temperature)
        self.return_teacher_logprobs = return_teacher_logprobs
        self.layout = ObservationLayout(self._prompt_slots(max_prompt_length, max_new_tokens), max_new_tokens)
        self.scorer = self.engine.incremental_scorer()
        self.stop_ids = self.engine.stop_ids.numpy()
        self.index_of = {ex.prompt: i for i, ex in reversed(list(enumerate(self.examples)))}

        vocab, length = self.engine.vocab_size, self.layout.length
        self.action_space = spaces.Discrete(vocab)
        self.observation_space = spaces.Dict(
            {
                "input_ids": spaces.Box(0, vocab - 1, shape=(length,), dtype=np.int64),
                "attention_mask": spaces.Box(0, 1, shape=(length,), dtype=np.int64),
            }
        )
        self.num_rows = num_rows
        self.ids = np.full((num_rows, length), self.engine.pad_id, dtype=np.int64)  # (B, P + N)
        self.mask = np.zeros((num_rows, length), dtype=np.int64)  # (B, P + N)
        self.lengths = np.zeros(num_rows, dtype=np.int64)  # (B,) tokens generated so far
        self.rows: list[tuple[int, Example]] = [(-1, Example(""))] * num_rows
        self.state: IncrementalState | None = None

    def _prompt_slots(self, max_prompt_length: int | None, max_new_tokens: int) -> int:
        """``P``: check every prompt once (tokenised and cached) and that ``P + N`` fits the context."""
        lengths = [len(self.engine.encoder.token_ids(ex.prompt)) for ex in self.examples]
        slots = max(lengths) if max_prompt_length is None else max_prompt_length
        context = self.engine.context_length
        if slots + max_new_tokens > context:
            raise PromptTooLongError(
                f"prompts of up to {slots} tokens plus max_new_tokens={max_new_tokens} exceed the "
                f"teacher's context length {context}: shorten the prompts or lower max_new_tokens"
            )
        return slots

    @property
    def uses_reward(self) -> bool:
        """Whether the external reward has weight (``alpha < 1`` or ``beta_ext > 0``) and is given."""
        return self.reward is not None and (self.alpha < 1.0 or bool(self.beta_ext))

    def _tempered(self, logprobs: Tensor) -> Tensor:
        """Temperature-1 log-probs ``(..., V)`` -> log-probs at ``teacher_temperature``."""
        if self.teacher_temperature == 1.0:
            return logprobs
        # log_softmax(log_softmax(z) / T) = log_softmax(z / T): the normaliser is a shift.
        return torch.log_softmax(logprobs / self.teacher_temperature, dim=-1)

    @property
    def vocab_size(self) -> int:
        """``V``, the shared vocabulary size (the number of actions)."""
        return self.engine.vocab_size

    # ------------------------------------------------------------------ episode starts
    def pick(self, option: PromptOption, rng: np.random.Generator) -> tuple[int, Example]:
        """``(index, Example)`` of the next episode's prompt: given by ``option``, else drawn with ``rng``.

        The index is -1 for a prompt string that is not in the source.
        """
        if option is None:
            index = int(rng.integers(len(self.examples)))
            return index, self.examples[index]
        if isinstance(option, Example):
            return self.index_of.get(option.prompt, -1), option
        if isinstance(option, str):
            return self.index_of.get(option, -1), self.example_for(option)
        if isinstance(option, int | np.integer) and not isinstance(option, bool):
            if not 0 <= option < len(self.examples):
                raise ValueError(f"prompt index {option} is out of range for {len(self.examples)} prompts")
            return int(option), self.examples[int(option)]
        raise TypeError(f"a prompt option must be an index, a string or an Example, got {option!r}")

    def example_for(self, prompt: str) -> Example:
        """The source's Example of ``prompt`` (its metadata feeds the reward), or a bare Example."""
        index = self.index_of.get(prompt, -1)
        return self.examples[index] if index >= 0 else Example(prompt)

    def _encode(self, picks: Sequence[tuple[int, Example]]) -> PromptBatch:
        return self.engine.encode([ex.prompt for _, ex in picks])

    def _write_prompts(self, rows: np.ndarray, batch: PromptBatch) -> None:
        width, slots = batch.input_ids.shape[1], self.layout.max_prompt_length
        if width > slots:
            raise PromptTooLongError(
                f"a prompt of {width} tokens exceeds max_prompt_length={slots}: {batch.texts[0][:80]!r}"
            )
        self.ids[rows] = self.engine.pad_id
        self.mask[rows] = 0
        self.ids[rows, slots - width : slots] = batch.input_ids.cpu().numpy()
        self.mask[rows, slots - width : slots] = batch.attention_mask.cpu().numpy()
        self.lengths[rows] = 0

    def start(self, picks: Sequence[tuple[int, Example]]) -> None:
        """Start every row on a new prompt (one batched teacher prefill)."""
        if len(picks) != self.num_rows:
            raise ValueError(f"start needs {self.num_rows} prompts, got {len(picks)}")
        batch = self._encode(picks)
        self._write_prompts(np.arange(self.num_rows), batch)
        self.rows = list(picks)
        self.state = self.scorer.start(batch)

    def restart(self, rows: Sequence[int], picks: Sequence[tuple[int, Example]]) -> None:
        """Start ``rows`` on new prompts; the other rows keep their sequences and teacher cache."""
        batch = self._encode(picks)
        self._write_prompts(np.asarray(rows), batch)
        for row, pick in zip(rows, picks):
            self.rows[row] = pick
        assert self.state is not None
        self.scorer.restart(self.state, list(rows), batch)

    # ------------------------------------------------------------------ stepping
    def _check_actions(self, actions: Any) -> np.ndarray:
        acts = np.asarray(actions)
        if acts.shape not in ((self.num_rows,), ()) or not np.issubdtype(acts.dtype, np.integer):
            raise ValueError(
                f"actions must be {self.num_rows} integer token ids, got {acts.dtype} of shape {acts.shape}"
            )
        acts = acts.reshape(self.num_rows).astype(np.int64)
        bad = (acts < 0) | (acts >= self.vocab_size)
        if bad.any():
            raise ValueError(f"token id {int(acts[bad][0])} is outside the vocabulary [0, {self.vocab_size})")
        return acts

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """Append one token per row, score it, and advance the rows that go on.

        Rows that end (EOS or budget) are not advanced: the caller resets or restarts them.

        Returns:
            ``(rewards (B,) float64, terminated (B,) bool, truncated (B,) bool, infos)``, one info
            dict per row.
        """
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        acts = self._check_actions(actions)
        tokens = torch.as_tensor(acts, device=self.state.next_logprobs.device)
        next_logprobs = self._tempered(self.state.next_logprobs)  # (B, V) at teacher_temperature
        teacher_logp = next_logprobs.gather(-1, tokens[:, None]).squeeze(-1).cpu()  # (B,) log pT(a_t | s_t)
        full = next_logprobs.cpu().numpy() if self.return_teacher_logprobs else None  # (B, V)

        every = np.arange(self.num_rows)
        self.ids[every, self.layout.max_prompt_length + self.lengths] = acts
        self.mask[every, self.layout.max_prompt_length + self.lengths] = 1
        self.lengths += 1
        terminated = np.isin(acts, self.stop_ids)
        truncated = ~terminated & (self.lengths >= self.layout.max_new_tokens)
        done = terminated | truncated

        external = self._external_rewards(done)  # (B,) r(x, y) on ending rows, 0 elsewhere; or None
        # A one-token "sequence" per row: the terminal bonus lands on it exactly when the row ends.
        rewards = env_token_rewards(
            teacher_logp[:, None],
            torch.ones((self.num_rows, 1), dtype=torch.bool),
            self.alpha,
            None if external is None else torch.as_tensor(external, dtype=torch.float32),
            beta_ext=self.beta_ext,
        )[:, 0]
        infos = []
        for row in range(self.num_rows):
            info: dict[str, Any] = {"teacher_logprob": float(teacher_logp[row]), "alpha": self.alpha}
            if self.beta_ext is not None:
                info["beta_ext"] = self.beta_ext
            if external is not None and done[row]:
                info["external_reward"] = float(external[row])
            if full is not None:
                info["teacher_logprobs"] = full[row].copy()
            infos.append(info)
        if not done.all():
            self.scorer.advance(self.state, tokens, active=torch.as_tensor(~done, device=tokens.device))
        return rewards.double().numpy(), terminated, truncated, infos

    def _external_rewards(self, done: np.ndarray) -> np.ndarray | None:
        """One batched reward call for the rows that end now (None when the reward has no weight)."""
        if not self.uses_reward or not done.any():
            return None
        ending = np.flatnonzero(done)
        examples = [self.rows[row][1] for row in ending]
        completions = [self.completion_text(row) for row in ending]
        values = score_examples(self.reward, examples, completions)
        external = np.zeros(self.num_rows, dtype=np.float64)
        external[ending] = values
        return external

    # ------------------------------------------------------------------ views
    def completion_ids(self, row: int) -> list[int]:
        """The tokens generated so far in ``row``."""
        start = self.layout.max_prompt_length
        return self.ids[row, start : start + self.lengths[row]].tolist()

    def completion_text(self, row: int) -> str:
        """The completion of ``row`` decoded as :meth:`RolloutEngine.decode` does (special tokens dropped)."""
        return self.engine.tokenizer.decode(self.completion_ids(row), skip_special_tokens=True)

    def observation(self, row: int | None = None) -> dict[str, np.ndarray]:
        """A fresh copy of one row's observation ``(P + N,)``, or of all rows ``(B, P + N)``."""
        index = slice(None) if row is None else row
        return {"input_ids": self.ids[index].copy(), "attention_mask": self.mask[index].copy()}

    def reset_info(self, row: int) -> dict[str, Any]:
        """The info of an episode start: the prompt and its index in the source (-1 if not in it)."""
        index, example = self.rows[row]
        return {"prompt": example.prompt, "prompt_index": index}

    # ------------------------------------------------------------------ bulk
    def bulk_rewards(self, rollout: Rollout, *, examples: Sequence[Example] | None = None) -> EnvRewards:
        """Rewards of finished sequences with one teacher forward; equal to stepping token by token."""
        self.engine.score(rollout, teacher_temperature=self.teacher_temperature)
        external = None
        if self.uses_reward:
            if examples is None:
                examples = [self.example_for(text) for text in rollout.texts]
            if len(examples) != len(rollout):
                raise ValueError(f"got {len(examples)} examples for {len(rollout)} sequences")
            values = score_examples(self.reward, examples, self.engine.decode(rollout))
            external = torch.tensor(values, dtype=torch.float32)
        assert rollout.teacher_logprobs is not None
        rewards = env_token_rewards(
            rollout.teacher_logprobs, rollout.completion_mask, self.alpha, external, beta_ext=self.beta_ext
        )
        return EnvRewards(rewards, rollout.teacher_logprobs, rollout.completion_mask, external)

    def rollout_from_tokens(
        self, prompts: Sequence[str | Example], completion_ids: Sequence[Sequence[int]]
    ) -> Rollout:
        """A :class:`Rollout` of given token ids, kept exactly (no EOS appended), for ``bulk_rewards``."""
        texts = [p.prompt if isinstance(p, Example) else p for p in prompts]
        return self.engine.from_completions(texts, completion_ids, append_eos=False)
