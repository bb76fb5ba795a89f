"""A teacher known on every prefix: a hand-defined stochastic process wrapped as a causal LM.

The OPD lab (``examples/opd_lab.py``) needs a teacher whose next-token distribution is defined and
computable on *every* prefix, including the prefixes it never produces itself, so that exposure
bias exists by construction and every metric can be computed exactly. :class:`ProcessLM` is that
teacher, as a Hugging Face ``PreTrainedModel``: the whole toolkit (rollout engine, incremental
scorer, agents) runs on it unchanged.

The process (the tutorial's "bimodal teacher": two equally valid phrasings):

- The completion starts after the first ``sep_token_id`` (the end of the prompt); before it, the
  model is uniform.
- Two (or more) phrasings ("modes"): phrase ``m`` repeats its token cycle ``phrases[m]`` forever.
  The first completion token chooses the phrase: the teacher emits phrase ``m``'s first token with
  probability ``mode_probs[m]``.
- At completion position ``t`` the correct token is token ``t`` of the chosen phrase, *whatever
  the tokens in between were*: the teacher knows what it means to say and says it in order. After
  a mistake at position ``k`` (a prefix the teacher never produces) the correct continuation is
  still the phrase at ``k + 1, k + 2, ...``: skip the wrong token and go on. If the first token
  chose no phrase, every phrase stays possible (the rule mixes them with ``mode_probs``).
- Every probability is smoothed: ``p = (1 - floor) * rule + floor / V``; KLs stay finite.

The phrases are cycles that share their tokens in different orders (``abcdef`` and ``fedcba``), so
on teacher prefixes "continue from the last token in the phrase's direction" is right every time.
A student trained only there (off-policy) continues from its own mistake instead of skipping it,
so it is out of phase, and wrong, at every later step: error ``O(eps T^2)``. A student trained on
its own prefixes (on-policy) is taught to skip the mistake: error ``O(eps T)``.

The "KV cache" is a :class:`~transformers.DynamicCache` whose one layer holds the token ids seen so
far (as a ``(B, 1, C, 1)`` float tensor): the next-token distribution is recomputed from the ids,
so cached and full forwards agree exactly, and the incremental scorer can splice and crop rows.

The last part of the module computes exact (or stratified Monte Carlo) metrics of any student
against the process: :func:`exact_student_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

#: Scanner state: ``None`` before the separator, else ``(position t, bitmask of the phrases still chosen)``.
State = tuple[int, int] | None


class ProcessLMConfig(PretrainedConfig):
    """Configuration of :class:`ProcessLM` (the process of the module docstring).

    Fields (keyword arguments):
        vocab_size: logit width (the tokenizer's ``len``).
        phrases: one token cycle per mode; phrase ``m`` at completion index ``i`` is
            ``phrases[m][i % len(phrases[m])]``. First tokens must differ between modes.
        mode_probs: probability of starting each phrase (default uniform).
        sep_token_id: the token that ends the prompt.
        floor: total probability spread uniformly over the vocabulary, in ``[0, 1)``.
        max_position_embeddings: context length reported to the rollout engine.
    """

    model_type = "rl_distill_process_lm"

    vocab_size: int = 12
    phrases: list[list[int]] | None = None
    mode_probs: list[float] | None = None
    sep_token_id: int = 10
    floor: float = 1e-5
    max_position_embeddings: int = 4096
    num_hidden_layers: int = 1
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self, **kwargs: Any) -> None:
        if self.phrases is None:
            self.phrases = [[4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4]]
        self.phrases = [[int(t) for t in p] for p in self.phrases]
        if self.mode_probs is None:
            self.mode_probs = [1.0 / len(self.phrases)] * len(self.phrases)
        self.mode_probs = [float(p) for p in self.mode_probs]
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        if not self.phrases or any(len(p) == 0 for p in self.phrases):
            raise ValueError(f"phrases must be non-empty token cycles, got {self.phrases}")
        firsts = [p[0] for p in self.phrases]
        if len(set(firsts)) != len(firsts):
            raise ValueError(f"phrases must start with different tokens, got first tokens {firsts}")
        for p in self.phrases:
            if self.sep_token_id in p or not all(0 <= t < self.vocab_size for t in p):
                raise ValueError(
                    f"phrase {p} must use ids in [0, {self.vocab_size}) other than the separator {self.sep_token_id}"
                )
        if len(self.mode_probs) != len(self.phrases):
            raise ValueError(f"mode_probs needs one entry per phrase, got {self.mode_probs}")
        if min(self.mode_probs) < 0 or not math.isclose(sum(self.mode_probs), 1.0, abs_tol=1e-6):
            raise ValueError(f"mode_probs must be >= 0 and sum to 1, got {self.mode_probs}")
        if not 0.0 <= self.floor < 1.0:
            raise ValueError(f"floor must be in [0, 1), got {self.floor}")
        if not 0 <= self.sep_token_id < self.vocab_size:
            raise ValueError(f"sep_token_id must be in [0, {self.vocab_size}), got {self.sep_token_id}")

    @property
    def num_modes(self) -> int:
        """Number of phrasings."""
        return len(self.phrases)

    def phrase(self, mode: int, length: int) -> list[int]:
        """The first ``length`` tokens of phrase ``mode``."""
        cycle = self.phrases[mode]
        return [cycle[i % len(cycle)] for i in range(length)]


# ---------------------------------------------------------------------------------------------
# The process itself: a left-to-right scan over one row of token ids.
# ---------------------------------------------------------------------------------------------
class _Scanner:
    """State of one row, token by token: the completion position and the phrase its first token chose."""

    def __init__(self, config: ProcessLMConfig) -> None:
        self.config = config
        self.all_modes = (1 << config.num_modes) - 1
        self.firsts = {p[0]: m for m, p in enumerate(config.phrases)}
        self.position = -1  # -1: still in the prompt
        self.modes = self.all_modes

    def push(self, token: int) -> None:
        """Feed one token (a prompt token before the separator, else a completion token)."""
        if self.position < 0:
            if token == self.config.sep_token_id:
                self.position = 0
            return
        if self.position == 0 and token in self.firsts:
            self.modes = 1 << self.firsts[token]
        self.position += 1

    @property
    def state(self) -> State:
        """Hashable state that determines the next-token rule."""
        return None if self.position < 0 else (self.position, self.modes)


def rule_distribution(config: ProcessLMConfig, state: State) -> dict[int, float]:
    """The unsmoothed next-token rule in ``state``: ``{token: probability}``.

    Args:
        config: the process.
        state: None (inside the prompt: uniform), or ``(t, modes)``: the next token is completion
            token ``t`` of one of the phrases in the bitmask ``modes``, chosen with ``mode_probs``.
    """
    if state is None:
        return {t: 1.0 / config.vocab_size for t in range(config.vocab_size)}
    position, mask = state
    weights = {m: config.mode_probs[m] for m in range(config.num_modes) if mask >> m & 1}
    total = sum(weights.values())
    out: dict[int, float] = {}
    for m, w in weights.items():
        cycle = config.phrases[m]
        tok = cycle[position % len(cycle)]
        out[tok] = out.get(tok, 0.0) + (w / total if total > 0 else 1.0 / len(weights))
    return out


def prefix_states(config: ProcessLMConfig, tokens: Sequence[int]) -> list[State]:
    """The state after each prefix ``tokens[:j + 1]``, for ``j = 0 .. len(tokens) - 1``."""
    scanner = _Scanner(config)
    states = []
    for tok in tokens:
        scanner.push(int(tok))
        states.append(scanner.state)
    return states


def valid_mode(config: ProcessLMConfig, completion: Sequence[int]) -> int | None:
    """The phrase that ``completion`` is a non-empty prefix of (a teacher sequence), or None."""
    tokens = [int(t) for t in completion]
    for m in range(config.num_modes):
        if tokens and tokens == config.phrase(m, len(tokens)):
            return m
    return None


class ProcessLM(PreTrainedModel, GenerationMixin):
    """The process of the module docstring as a causal LM (no parameters).

    ``forward`` takes ``input_ids``, ``attention_mask`` (left padding: masked columns are skipped),
    ``past_key_values``/``use_cache`` and ``logits_to_keep`` like any Hugging Face causal LM and
    returns ``CausalLMOutputWithPast`` with ``log p`` as logits. ``position_ids`` are accepted and
    ignored: the order of the unmasked tokens defines the prefix.

    Args:
        config: :class:`ProcessLMConfig`.
    """

    config_class = ProcessLMConfig
    config: ProcessLMConfig
    main_input_name = "input_ids"
    _supports_cache_class = True

    def __init__(self, config: ProcessLMConfig) -> None:
        super().__init__(config)
        # No weights; an empty frozen parameter gives the model a device and a dtype.
        self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)
        self._index: dict[State, int] = {}
        self._rule_table: Tensor | None = None
        self._prob_table: Tensor | None = None
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing to initialise."""

    def _lookup(self, states: list[list[State]]) -> tuple[Tensor, Tensor]:
        """Smoothed probabilities and unsmoothed rule, ``(B, k, V)`` each, of a grid of states."""
        cfg = self.config
        for row in states:
            for state in row:
                if state not in self._index:
                    self._index[state] = len(self._index)
                    self._rule_table = None
        if self._rule_table is None:
            rule = torch.zeros(len(self._index), cfg.vocab_size, dtype=torch.float64)
            for state, i in self._index.items():
                for tok, p in rule_distribution(cfg, state).items():
                    rule[i, tok] = p
            self._rule_table = rule.float()
            self._prob_table = ((1.0 - cfg.floor) * rule + cfg.floor / cfg.vocab_size).float()
        idx = torch.tensor([[self._index[s] for s in row] for row in states], dtype=torch.long)
        idx = idx.view(len(states), -1)
        return self._prob_table[idx], self._rule_table[idx]

    def rule_probs(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Unsmoothed rule ``(B, L, V)`` after each prefix (what counts as a correct next token)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return self._lookup(self._states(input_ids, mask))[1].to(input_ids.device)

    @staticmethod
    def _real_tokens(ids: Tensor, mask: Tensor) -> list[list[tuple[int, int]]]:
        """Per row: ``(column, token)`` of the unmasked columns, in order."""
        rows = []
        for ids_row, mask_row in zip(ids.tolist(), mask.tolist()):
            rows.append([(j, t) for j, (t, keep) in enumerate(zip(ids_row, mask_row)) if keep])
        return rows

    def _states(self, ids: Tensor, mask: Tensor, columns: range | None = None) -> list[list[State]]:
        """Scanner state after each column (masked columns repeat the previous state)."""
        width = ids.shape[1]
        columns = range(width) if columns is None else columns
        out = []
        for real in self._real_tokens(ids, mask):
            scanner, states, it = _Scanner(self.config), [], iter(real)
            nxt = next(it, None)
            for j in range(width):
                while nxt is not None and nxt[0] == j:
                    scanner.push(nxt[1])
                    nxt = next(it, None)
                if j >= columns.start:
                    states.append(scanner.state)
            out.append(states)
        return out

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: DynamicCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        output_hidden_states: bool | None = None,
        labels: Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Log-probabilities of the next token after each position.

        Args:
            input_ids: ``(B, n)`` new token ids (all of them when there is no cache).
            attention_mask: ``(B, C + n)`` over cached and new columns (1 = real token).
            position_ids: ignored.
            past_key_values: a cache from a previous call (the ids seen so far).
            use_cache: return the cache extended by ``input_ids``.
            logits_to_keep: keep the last ``k`` positions (0 = all), or a tensor of positions.
            output_hidden_states: return the probabilities as the single "hidden state".
            labels: ``(B, n)`` for the usual shifted cross-entropy loss.
            return_dict: ignored (always a ``CausalLMOutputWithPast``).
            **kwargs: other generation arguments (``cache_position``...), ignored.

        Returns:
            ``logits`` ``(B, k, V)`` float32 log-probabilities, ``past_key_values`` when asked.
        """
        if input_ids is None:
            raise ValueError("ProcessLM needs input_ids (it has no embeddings)")
        past = _cached_ids(past_key_values)
        full = input_ids if past is None else torch.cat([past.to(input_ids.device), input_ids], dim=1)
        width, n = full.shape[1], input_ids.shape[1]
        mask = torch.ones_like(full) if attention_mask is None else attention_mask
        if mask.shape != full.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}, expected {tuple(full.shape)} (cache + new tokens)"
            )
        if isinstance(logits_to_keep, int):
            keep = range(width - n if logits_to_keep == 0 else width - min(logits_to_keep, n), width)
        else:
            keep = range(width - n, width)
        states = self._states(full, mask, keep)
        probs = self._lookup(states)[0]  # (B, k, V)
        if not isinstance(logits_to_keep, int):
            probs = probs[:, logits_to_keep]
        logits = probs.log().to(input_ids.device)
        cache = None
        if use_cache:
            cache = past_key_values if past_key_values is not None else DynamicCache()
            new = input_ids.to(torch.float32)[:, None, :, None]  # (B, 1, n, 1)
            cache.update(new, new, 0)
        loss = None
        if labels is not None:
            if labels.shape[1] != logits.shape[1]:
                raise ValueError("labels need logits at every position (logits_to_keep=0)")
            loss = torch.nn.functional.nll_loss(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        hidden = (probs,) if output_hidden_states else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache, hidden_states=hidden)

    def prepare_inputs_for_generation(
        self, input_ids: Tensor, past_key_values: Any = None, **kwargs: Any
    ) -> dict:
        """Feed only the tokens the cache has not seen (for ``generate``)."""
        seen = 0 if _cached_ids(past_key_values) is None else past_key_values.get_seq_length()
        return {
            "input_ids": input_ids[:, seen:],
            "attention_mask": kwargs.get("attention_mask"),
            "past_key_values": past_key_values,
            "use_cache": kwargs.get("use_cache", True),
        }


def _cached_ids(cache: Any) -> Tensor | None:
    """The ``(B, C)`` token ids held by a :class:`ProcessLM` cache (None if empty)."""
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    if not layers or getattr(layers[0], "keys", None) is None or layers[0].keys.numel() == 0:
        return None
    return layers[0].keys[:, 0, :, 0].round().long()


try:
    AutoConfig.register(ProcessLMConfig.model_type, ProcessLMConfig)
    AutoModelForCausalLM.register(ProcessLMConfig, ProcessLM)
except ValueError:  # already registered (module reloaded)
    pass


# ---------------------------------------------------------------------------------------------
# Exact metrics of a student against the process.
# ---------------------------------------------------------------------------------------------
@dataclass
class StudentMetrics:
    """What :func:`exact_student_metrics` returns (``T`` positions, ``M`` modes).

    Per-step error: the student's probability mass on tokens the rule gives probability 0.

    Attributes:
        forward_kl: sequence-level ``KL(teacher || student)``, exact on the teacher's paths.
        reverse_kl: sequence-level ``KL(student || teacher)``, stratified Monte Carlo.
        expected_errors: expected number of wrong steps in a student sample (a step after an EOS
            counts as wrong): the "total error" of the DAgger bound.
        step_accuracy: ``1 - expected_errors / T``, the tutorial's "success" heuristic (chapter 2).
        success: probability that a student sample is a teacher sequence (a phrase, no mistake).
        mode_mass: ``(M,)`` probability that a student sample is phrase ``m``.
        mode_coverage: ``mode_mass`` normalised to sum to 1.
        first_token_mass: ``(M,)`` student probability of each phrase's first token.
        error_teacher_prefix: ``(T,)`` per-step error on teacher prefixes (exact).
        error_own_prefix: ``(T,)`` per-step error on the student's own prefixes.
        error_after_mistake: ``(T,)`` per-step error on own prefixes that already contain a
            mistake (NaN where the student has essentially no such prefix).
        off_support: ``(T,)`` probability that the student's prefix of step ``t`` contains a mistake.
        forward_kl_teacher_prefix: ``(T,)`` per-position ``KL(pT || pS)`` on teacher prefixes.
        reverse_kl_own_prefix: ``(T,)`` per-position ``KL(pS || pT)`` on own prefixes.
    """

    forward_kl: float
    reverse_kl: float
    expected_errors: float
    step_accuracy: float
    success: float
    mode_mass: list[float]
    mode_coverage: list[float]
    first_token_mass: list[float]
    error_teacher_prefix: list[float]
    error_own_prefix: list[float]
    error_after_mistake: list[float]
    off_support: list[float]
    forward_kl_teacher_prefix: list[float]
    reverse_kl_own_prefix: list[float]
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _kl(p_log: Tensor, q_log: Tensor) -> Tensor:
    """``KL(p || q)`` over the last axis from log-probabilities; ``0 * log 0 = 0``."""
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return terms.sum(-1)


@torch.no_grad()
def _student_logprobs(student: PreTrainedModel, ids: Tensor, num: int, vocab: int) -> Tensor:
    """``(B, num, V)`` student log-probs of the last ``num`` tokens of unpadded ``ids``."""
    logits = student(input_ids=ids[:, :-1], use_cache=False).logits[:, -num:, :vocab]
    return torch.log_softmax(logits.double(), dim=-1)


@torch.no_grad()
def _sample_continuations(
    student: PreTrainedModel,
    prompt: Tensor,
    forced: Tensor,
    deviate_at: Tensor,
    invalid: Tensor,
    length: int,
    eos_id: int,
    generator: torch.Generator,
) -> Tensor:
    """Rows of ``length`` completion tokens: ``forced`` before ``deviate_at``, then a mistake, then samples.

    The token at ``deviate_at`` is drawn from the student restricted to ``invalid`` ``(R, V)`` (the
    tokens the rule forbids there). After an EOS a row keeps sampling; callers mask it.
    """
    rows = forced.shape[0]
    vocab = invalid.shape[-1]
    tokens = forced.clone()
    ids = prompt.expand(rows, -1)
    out = student(input_ids=ids, use_cache=True, logits_to_keep=1)
    for t in range(length):
        probs = torch.softmax(out.logits[:, -1, :vocab].double(), dim=-1)  # (R, V)
        at = deviate_at == t
        probs = torch.where(at[:, None], probs * invalid, probs)
        probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-300)
        probs = torch.where(probs.sum(-1, keepdim=True) > 0, probs, torch.full_like(probs, 1.0 / vocab))
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        tokens[:, t] = torch.where(deviate_at <= t, drawn, tokens[:, t])
        if t < length - 1:
            out = student(input_ids=tokens[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
    del eos_id
    return tokens


def exact_student_metrics(
    student: PreTrainedModel,
    teacher: ProcessLM,
    prompt_ids: Sequence[int],
    length: int,
    *,
    continuations: int = 16,
    seed: int = 0,
) -> StudentMetrics:
    """Metrics of ``student`` against the process over completions of ``length`` tokens.

    Exact where it can be: the teacher's support is ``M`` paths (one per phrase), so everything
    measured on teacher prefixes is one student forward over them (exact up to the ``O(length *
    floor)`` teacher mass off its paths). On the student's own prefixes, the expectation is split
    by the position ``k`` and path of the student's *first* mistake: the probability of each such
    event is exact, and only what follows it is sampled (``continuations`` samples per event, the
    mistake itself drawn from the student restricted to wrong tokens). This stratified estimate is
    unbiased and has no variance from the (rare) mistake events themselves.

    Args:
        student: any causal LM over the same vocabulary (a :class:`ProcessLM` too).
        teacher: the process.
        prompt_ids: the prompt's token ids, ending with the separator.
        length: completion length ``T`` (the sampling budget).
        continuations: samples per first-mistake event.
        seed: seed of the sampling.
    """
    cfg = teacher.config
    vocab, num_modes = cfg.vocab_size, cfg.num_modes
    eos = cfg.eos_token_id
    device = next(iter(student.parameters()), teacher.anchor).device
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    was_training = student.training
    student.eval()

    # --- teacher paths: exact --------------------------------------------------------------
    paths = torch.tensor([cfg.phrase(m, length) for m in range(num_modes)], device=device)  # (M, T)
    path_ids = torch.cat([prompt.expand(num_modes, -1), paths], dim=1)  # (M, P + T)
    ls = _student_logprobs(student, path_ids, length, vocab)  # (M, T, V)
    lt = teacher(input_ids=path_ids[:, :-1]).logits[:, -length:].double()  # (M, T, V)
    rule = teacher.rule_probs(path_ids[:, :-1])[:, -length:].double()  # (M, T, V)
    valid = rule > 0
    err_on = 1.0 - (ls.exp() * valid).sum(-1)  # (M, T) student mass on wrong tokens
    fkl_on, rkl_on = _kl(lt, ls), _kl(ls, lt)  # (M, T)
    tok_logp = ls.gather(-1, paths[..., None]).squeeze(-1)  # (M, T)
    # reach[m, t]: probability that the student's first t tokens are path m's (t = 0: empty prefix).
    reach = torch.cat([torch.ones(num_modes, 1, dtype=ls.dtype), tok_logp.cumsum(-1).exp()], dim=1)
    weights = torch.tensor(cfg.mode_probs, dtype=ls.dtype)
    # Position 0 is the same prefix for every mode: count it once.
    share = torch.ones(num_modes, length, dtype=ls.dtype)
    share[:, 0] = 0.0
    share[0, 0] = 1.0

    err_teacher = (weights[:, None] * err_on).sum(0)  # (T,)
    fkl_teacher = (weights[:, None] * fkl_on).sum(0)
    forward_kl = float(fkl_teacher.sum())

    # --- own prefixes: on-support part exact, post-mistake part stratified -----------------
    on_err = (share * reach[:, :length] * err_on).sum(0)  # (T,)
    on_rkl = (share * reach[:, :length] * rkl_on).sum(0)
    events = [(m, k) for k in range(length) for m in range(num_modes) if share[m, k] > 0]
    event_p = torch.tensor([float(reach[m, k] * err_on[m, k]) for m, k in events], dtype=ls.dtype)
    n_ev = len(events)
    rows = n_ev * continuations
    forced = paths[[m for m, _ in events]].repeat_interleave(continuations, 0)  # (R, T)
    dev_at = torch.tensor([k for _, k in events], device=device).repeat_interleave(continuations)
    invalid = (~valid[[m for m, _ in events], [k for _, k in events]]).double()  # (E, V)
    invalid = invalid.repeat_interleave(continuations, 0)
    gen = torch.Generator().manual_seed(seed)
    seqs = _sample_continuations(student, prompt, forced, dev_at, invalid, length, eos, gen)  # (R, T)
    full = torch.cat([prompt.expand(rows, -1), seqs], dim=1)
    s_logp = _student_logprobs(student, full, length, vocab)  # (R, T, V)
    t_logp = teacher(input_ids=full[:, :-1]).logits[:, -length:].double()
    r_valid = teacher.rule_probs(full[:, :-1])[:, -length:] > 0  # (R, T, V)
    pos = torch.arange(length, device=device)
    # Alive: the sequence has not ended with an EOS before position t.
    is_eos = (seqs == eos).long()
    ended_before = (is_eos.cumsum(-1) - is_eos) > 0  # (R, T)
    after = pos[None, :] > dev_at[:, None]  # positions after the first mistake
    step_err = 1.0 - (s_logp.exp() * r_valid).sum(-1)  # (R, T)
    step_err = torch.where(ended_before, torch.ones_like(step_err), step_err)
    step_rkl = torch.where(ended_before, torch.zeros_like(step_err), _kl(s_logp, t_logp))
    cond_err = (step_err * after).view(n_ev, continuations, length).mean(1)  # (E, T)
    cond_rkl = (step_rkl * after).view(n_ev, continuations, length).mean(1)
    off_err = (event_p[:, None] * cond_err).sum(0)  # (T,)
    off_rkl = (event_p[:, None] * cond_rkl).sum(0)
    after_e = after.view(n_ev, continuations, length)[:, 0].double()  # (E, T)
    off_mass = (event_p[:, None] * after_e).sum(0)  # (T,) P(prefix of t has a mistake)

    own_err, own_rkl = on_err + off_err, on_rkl + off_rkl
    mode_mass = reach[:, length]  # (M,) exact: a sample with a mistake is no teacher sequence
    total = float(mode_mass.sum())
    first_tokens = [cfg.phrases[m][0] for m in range(num_modes)]
    after_mistake = torch.where(off_mass > 1e-12, off_err / off_mass.clamp(min=1e-300), torch.nan)
    if was_training:
        student.train()
    return StudentMetrics(
        forward_kl=forward_kl,
        reverse_kl=float(own_rkl.sum()),
        expected_errors=float(own_err.sum()),
        step_accuracy=1.0 - float(own_err.sum()) / length,
        success=total,
        mode_mass=mode_mass.tolist(),
        mode_coverage=(mode_mass / total).tolist() if total > 0 else [math.nan] * num_modes,
        first_token_mass=[float(ls[0, 0, t].exp()) for t in first_tokens],
        error_teacher_prefix=err_teacher.tolist(),
        error_own_prefix=own_err.tolist(),
        error_after_mistake=after_mistake.tolist(),
        off_support=off_mass.tolist(),
        forward_kl_teacher_prefix=fkl_teacher.tolist(),
        reverse_kl_own_prefix=own_rkl.tolist(),
    )
