"""Cross-tokenizer distillation: span alignment of two tokenizations and the ULD loss.

When teacher and student tokenise differently, their token ids mean different things and a
token-level divergence (paper Eq. 2) is undefined. This module makes the two comparable:

1. **Re-tokenisation.** The student's completion is decoded to text; the teacher reads its own
   encoding of the prompt (its own format) followed by its own tokens of that text, and scores it in
   one forward (:class:`CrossTokenizerTeacher`, through a second :class:`~rl_distill.rollout.RolloutEngine`
   over the teacher and its tokenizer).
2. **Span alignment** (GOLD-style, "General On-policy Logit Distillation", TRL's GOLD trainer):
   each token covers a character span of the completion text (:func:`char_ends`). Tokens are grouped
   into the smallest runs whose text spans coincide on both sides (:func:`align_spans`): a group is
   ``student tokens [s0, s1)`` and ``teacher tokens [t0, t1)`` covering the same characters, so both
   sides condition on the *same text prefix* at a group's first token. The end-of-sequence tokens of
   both sides (zero characters, the same event "the text ends here") form a last group of their own.
3. **Merged probabilities** within a group (:func:`group_logprobs`): the group's vector is the
   first token's next-token distribution times the probability of the group's remaining actual
   tokens, ``m(v) = p_first(v) * prod_{k > first} p_k(y_k)`` (log space: a sum). A one-token group is
   just its next-token distribution.
4. **ULD** (Universal Logit Distillation, Boizard et al. 2024, arXiv 2402.12030): the
   Wasserstein-1 distance between the two vectors with a uniform transport cost has the closed form
   ``ULD(p, q) = sum_i |p_(i) - q_(i)|``, where ``p_(i)``, ``q_(i)`` are the probabilities sorted in
   decreasing order and the shorter vector is zero-padded to the larger vocabulary
   (:func:`uld_distance`). It needs no shared vocabulary.

Limits (stated, not hidden):

- **ULD ignores token identity.** It compares sorted probability vectors: a student that puts all its
  mass on the *wrong* token has distance 0 to a teacher that puts all its mass on the right one. It
  transfers the *shape* (confidence, entropy) of the teacher's distributions, not which token is
  right; Boizard et al. pair it with cross-entropy on teacher-generated text, which carries the
  identity (:class:`~rl_distill.agents.uld.ULDConfig` ``ce_weight``).
- **Alignment only where spans coincide.** Positions are paired only at group starts, where both
  sides have read exactly the same text; inside a multi-token group the remaining positions enter
  only through the merged probability. Text the teacher cannot round-trip (characters its tokenizer
  maps to ``<unk>``, normalisation) ends the alignment there: the rest of that row is not aligned.
- **The merged vector is an approximation** (as in GOLD): ``p_k(y_k)`` for ``k > first`` is conditioned
  on the *actual* first token, not on each alternative ``v``; it is exact only at ``v = y_first``.
  Merged vectors are sub-probability vectors (mass ``<= 1``).
- **One tokenization per text.** The teacher scores its canonical tokenization of the text; other
  tokenizations of the same text (and the student's non-canonical ones) are not summed over, so
  sequence log-probabilities are of token sequences, not of texts (exact for a character-level
  teacher, where each text has one tokenization).
- Per-token :func:`char_ends` decodes growing prefixes (``O(T^2)`` decode calls per row; fine for
  completions of tens to a few hundred tokens). A token whose decoded prefix is not a prefix of the
  next one (a partial UTF-8 byte of a byte-level BPE) has no boundary of its own and joins the next
  token's group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rl_distill.rollout import Rollout, RolloutEngine, SamplingConfig

__all__ = [
    "CROSS_TOKENIZER_METHODS",
    "CrossTokenizerTeacher",
    "Group",
    "RowAlignment",
    "TeacherView",
    "align_rollout",
    "align_spans",
    "char_ends",
    "evaluate_cross",
    "group_logprobs",
    "sequence_logprob_gap",
    "span_teacher_rewards",
    "student_rollout_from_texts",
    "uld_distance",
    "uld_terms",
]

#: Values of ``model.cross_tokenizer``: the cross-tokenizer methods this toolkit implements.
CROSS_TOKENIZER_METHODS = ("uld",)

#: One aligned group: student tokens ``[s0, s1)`` and teacher tokens ``[t0, t1)`` covering the same text.
Group = tuple[int, int, int, int]


# --------------------------------------------------------------------------------------------
# Pure functions: spans, alignment, merged probabilities, ULD
# --------------------------------------------------------------------------------------------
def char_ends(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[int | None]:
    """The character offset where each token's text ends in ``decode(ids)`` (None: no boundary there).

    ``ends[i] = len(decode(ids[: i + 1]))`` when the decoded prefix of ``i`` tokens is a prefix of
    the decoded prefix of ``i + 1`` tokens (the token appended text); otherwise None (the token
    changed earlier text, e.g. half of a UTF-8 character): it has no boundary of its own. Special
    tokens decode to nothing (``skip_special_tokens``): their end equals the previous one.

    Args:
        tokenizer: the tokenizer of ``ids``.
        ids: token ids (no padding).
    """
    ends: list[int | None] = []
    previous = ""
    for i in range(len(ids)):
        text = tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=True)
        if text.startswith(previous) and "\ufffd" not in text[len(previous) :]:
            ends.append(len(text))
            previous = text
        else:
            ends.append(None)
    return ends


def align_spans(student_ends: Sequence[int | None], teacher_ends: Sequence[int | None]) -> list[Group]:
    """Group two tokenizations of one text into the smallest runs whose character spans coincide.

    Two pointers walk both token lists; a group closes as soon as both sides reach the same
    character boundary. Zero-width tokens (special tokens, whose end equals the previous end) are
    left out here (:func:`align_rollout` pairs the EOS tokens); a ``None`` end is no boundary. Tokens
    after the last common boundary (texts that differ at their ends) are in no group.

    Args:
        student_ends: per student token, the character offset where its text ends (:func:`char_ends`).
        teacher_ends: the same for the teacher's tokens.

    Returns:
        Groups ``(s0, s1, t0, t1)`` of half-open token index ranges, in text order.

    >>> align_spans([2, 3, 5], [1, 2, 3, 4, 5])  # "12+34": student "12","+","34"; teacher one char each
    [(0, 1, 0, 2), (1, 2, 2, 3), (2, 3, 3, 5)]
    """

    def real(ends: Sequence[int | None]) -> list[tuple[int, int | None]]:
        out, last = [], 0
        for i, e in enumerate(ends):
            if e is not None and e == last:
                continue  # zero width: a special token
            out.append((i, e))
            last = e if e is not None else last
        return out

    s, t = real(student_ends), real(teacher_ends)
    groups: list[Group] = []
    i = j = 0
    gs = gt = 0  # where the open group starts (indices into s and t)
    while i < len(s) and j < len(t):
        es, et = s[i][1], t[j][1]
        if es is None:  # no boundary after this student token: it extends the open group
            i += 1
        elif et is None:
            j += 1
        elif es == et:  # a common boundary closes the group
            groups.append((s[gs][0], s[i][0] + 1, t[gt][0], t[j][0] + 1))
            i, j = i + 1, j + 1
            gs, gt = i, j
        elif es < et:
            i += 1
        else:
            j += 1
    return groups


def group_logprobs(logprobs: Tensor, token_ids: Tensor, starts: Tensor, stops: Tensor) -> Tensor:
    """Merged log-probability vectors of token groups of one row: ``(T, V), (T,), (G,), (G,) -> (G, V)``.

    Group ``g`` covers tokens ``[starts[g], stops[g])``; its vector is
    ``log p_first(v) + sum_{k = first + 1}^{stop - 1} log p_k(y_k)`` (the first position's full
    distribution times the actual probability of the group's remaining tokens; GOLD-style merging).

    Args:
        logprobs: ``(T, V)`` next-token log-probs at each completion position.
        token_ids: ``(T,)`` the completion tokens.
        starts: ``(G,)`` first token of each group.
        stops: ``(G,)`` one past its last token (``> starts``).
    """
    tok = logprobs.gather(-1, token_ids[:, None]).squeeze(-1)  # (T,)
    csum = torch.cat([tok.new_zeros(1), tok.cumsum(0)])  # (T + 1,): csum[k] = sum of tok[:k]
    rest = csum[stops] - csum[starts + 1]  # (G,) log-prob of tokens first+1 .. stop-1
    return logprobs[starts] + rest[:, None]  # (G, V)


def uld_distance(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """Universal Logit Distillation distance (Boizard et al. 2024, arXiv 2402.12030): ``(..., Vs), (..., Vt) -> (...)``.

    ``ULD(pS, pT) = sum_i |pS_(i) - pT_(i)|`` over the probabilities of each side sorted in decreasing
    order, the shorter vector zero-padded to ``max(Vs, Vt)``: the Wasserstein-1 distance between the
    two distributions with a uniform transport cost, which needs no shared vocabulary. Symmetric,
    0 for equal distributions, invariant to permuting either vocabulary, at most ``mass(pS) +
    mass(pT)``, and never larger than the identity-paired L1 distance ``sum_v |pS(v) - pT(v)|`` when
    the vocabularies coincide (sorting both is the cheapest pairing). Differentiable in both inputs
    (through the sort's gather).

    Args:
        student_probs: ``(..., Vs)`` probabilities (or merged sub-probability vectors).
        teacher_probs: ``(..., Vt)`` the same for the teacher; leading shapes must match.
    """
    if student_probs.shape[:-1] != teacher_probs.shape[:-1]:
        raise ValueError(
            f"uld_distance: leading shapes differ: {tuple(student_probs.shape)} vs {tuple(teacher_probs.shape)}"
        )
    width = max(student_probs.shape[-1], teacher_probs.shape[-1])
    s = torch.sort(student_probs, dim=-1, descending=True).values  # (..., Vs)
    t = torch.sort(teacher_probs, dim=-1, descending=True).values  # (..., Vt)
    s = torch.nn.functional.pad(s, (0, width - s.shape[-1]))  # (..., W)
    t = torch.nn.functional.pad(t, (0, width - t.shape[-1]))  # (..., W)
    return (s - t.to(s.dtype)).abs().sum(-1)


# --------------------------------------------------------------------------------------------
# Teacher side: re-tokenise the student's text and score it with the teacher's own engine
# --------------------------------------------------------------------------------------------
@dataclass
class TeacherView:
    """The teacher's reading of a batch of completions given as text.

    Attributes:
        rollout: the teacher's own sequences (its prompt encoding + its tokens of the completion texts,
            its EOS where the student's completion ended), scored: ``teacher_logprobs`` of its tokens at
            ``teacher_temperature`` and, when read with full logits, ``teacher_logits`` ``(B, T', Vt)`` raw.
        texts: the completion texts it read.
    """

    rollout: Rollout
    texts: list[str]


@dataclass
class RowAlignment:
    """The aligned groups of one row (:func:`align_rollout`), as index tensors.

    Attributes:
        student_starts, student_stops: ``(G,)`` each group's student token range.
        teacher_starts, teacher_stops: ``(G,)`` its teacher token range.
        student_aligned: student tokens inside some group (the rest are not compared).
        student_tokens: the row's completion tokens.
    """

    student_starts: Tensor
    student_stops: Tensor
    teacher_starts: Tensor
    teacher_stops: Tensor
    student_aligned: int
    student_tokens: int

    @property
    def num_groups(self) -> int:
        """Number of aligned groups."""
        return int(self.student_starts.numel())


def _row_ids(rollout: Rollout, row: int) -> list[int]:
    return rollout.completion_ids[row][rollout.completion_mask[row]].tolist()


def align_rollout(
    student: Rollout,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher: Rollout,
    teacher_tokenizer: PreTrainedTokenizerBase,
) -> list[RowAlignment]:
    """Align every row's student completion with the teacher's tokens of the same text.

    Text tokens are grouped by :func:`align_spans`; when both sides end with their EOS token, the two
    EOS tokens form one more group (both predict "the text ends here" after the same text).
    """
    s_eos, t_eos = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
    out = []
    for row in range(len(student)):
        s_ids, t_ids = _row_ids(student, row), _row_ids(teacher, row)
        groups = align_spans(char_ends(student_tokenizer, s_ids), char_ends(teacher_tokenizer, t_ids))
        if s_ids and t_ids and s_ids[-1] == s_eos and t_ids[-1] == t_eos:
            groups.append((len(s_ids) - 1, len(s_ids), len(t_ids) - 1, len(t_ids)))
        cols = list(zip(*groups)) if groups else [(), (), (), ()]
        s0, s1, t0, t1 = (torch.tensor(c, dtype=torch.long) for c in cols)
        out.append(RowAlignment(s0, s1, t0, t1, int((s1 - s0).sum()) if groups else 0, len(s_ids)))
    return out


class CrossTokenizerTeacher:
    """A teacher with its own tokenizer: re-tokenises student text, scores it, samples its own text.

    Holds a second :class:`~rl_distill.rollout.RolloutEngine` over the teacher and its tokenizer (its
    "student" is the teacher itself, never trained), so sampling and scoring go through the one
    rollout engine: one causal teacher forward, logits at completion positions only.

    Args:
        teacher: the frozen teacher.
        teacher_tokenizer: its tokenizer.
        student_tokenizer: the student's tokenizer (for decoding student completions).
        chat_template: whether the teacher's prompts use its chat template (None: if it has one).
        engine_options: extra :class:`~rl_distill.rollout.RolloutEngine` keyword arguments (the
            fast-path switches, ``TrainConfig.engine_options``).
    """

    def __init__(
        self,
        teacher: PreTrainedModel,
        teacher_tokenizer: PreTrainedTokenizerBase,
        student_tokenizer: PreTrainedTokenizerBase,
        *,
        chat_template: bool | None = None,
        engine_options: Mapping[str, bool] | None = None,
    ) -> None:
        teacher.eval().requires_grad_(False)
        self.teacher = teacher
        self.tokenizer = teacher_tokenizer
        self.student_tokenizer = student_tokenizer
        self.engine = RolloutEngine(
            teacher, teacher, teacher_tokenizer, chat_template=chat_template, **(engine_options or {})
        )

    @property
    def vocab_size(self) -> int:
        """The teacher's vocabulary size (``len(tokenizer)``)."""
        return self.engine.vocab_size

    def teacher_ids(self, texts: Sequence[str], ended: Sequence[bool]) -> list[list[int]]:
        """The teacher's tokens of each text, its EOS appended where the student's completion ended."""
        eos = self.tokenizer.eos_token_id
        out = []
        for text, end in zip(texts, ended):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append([*ids, eos] if end or not ids else ids)
        return out

    def read(
        self,
        student: Rollout,
        student_engine: RolloutEngine,
        *,
        teacher_temperature: float = 1.0,
        full_logits: bool = True,
    ) -> TeacherView:
        """Score the student's completions as text: the teacher's prompt + its tokens of the text.

        Args:
            student: a rollout of the student (prompt texts in ``texts``).
            student_engine: the student's engine (decodes its completions).
            teacher_temperature: temperature of the teacher's token log-probs (logits stay raw).
            full_logits: keep the teacher's ``(B, T', Vt)`` logits (ULD needs them; the span rewards do not).
        """
        texts = student_engine.decode(student)
        stop = set(student_engine.stop_ids.tolist())
        ended = [bool(ids) and ids[-1] in stop for ids in (_row_ids(student, r) for r in range(len(student)))]
        view = self.engine.from_completions(student.texts, self.teacher_ids(texts, ended), append_eos=False)
        output = "full" if full_logits else "none"
        self.engine.score(view, teacher_output=output, teacher_temperature=teacher_temperature)
        return TeacherView(view, texts)

    @torch.no_grad()
    def sample_texts(
        self, prompts: Sequence[str], sampling: SamplingConfig, generator: torch.Generator | None = None
    ) -> tuple[list[str], list[bool]]:
        """Teacher samples as text (SeqKD data): ``(texts, ended_with_eos)``."""
        r = self.engine.generate(list(prompts), sampling, model=self.teacher, generator=generator)
        stop = set(self.engine.stop_ids.tolist())
        ended = [bool(ids) and ids[-1] in stop for ids in (_row_ids(r, i) for i in range(len(r)))]
        return self.engine.decode(r), ended


def student_rollout_from_texts(
    engine: RolloutEngine, prompts: Sequence[str], texts: Sequence[str], ended: Sequence[bool]
) -> Rollout:
    """Fixed sequences for the student from text (teacher samples, references): its tokens, EOS where ended."""
    tok = engine.tokenizer
    eos = tok.eos_token_id if tok.eos_token_id is not None else int(engine.stop_ids[0])
    ids = []
    for text, end in zip(texts, ended):
        row = tok(text, add_special_tokens=False)["input_ids"]
        ids.append([*row, eos] if end or not row else row)
    return engine.from_completions(list(prompts), ids, append_eos=False)


def uld_terms(
    student_logits: Tensor,
    student: Rollout,
    view: TeacherView,
    alignments: Sequence[RowAlignment],
    *,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-row ULD: the mean of :func:`uld_distance` over the row's aligned groups (paper Eq. 2's 1/L, per group).

    Args:
        student_logits: ``(B, T, Vs)`` the student's logits at its completion positions (gradient).
        student: the student's rollout.
        view: the teacher's reading of the same completions (:meth:`CrossTokenizerTeacher.read`).
        alignments: one :class:`RowAlignment` per row.
        temperature: the student's temperature.
        teacher_temperature: the teacher's temperature.

    Returns:
        ``(per_row, has_groups)``: ``(B,)`` mean ULD per row (0 where a row has no group) and ``(B,)``
        bool, True where a row has at least one group.
    """
    s_logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, Vs)
    t_logits = view.rollout.teacher_logits
    assert t_logits is not None, "the teacher view carries full logits"
    t_logp = torch.log_softmax(t_logits.float() / teacher_temperature, dim=-1)  # (B, T', Vt)
    per_row, has = [], []
    for b, a in enumerate(alignments):
        if a.num_groups == 0:
            per_row.append(s_logp.new_zeros(()) * s_logp[b, 0, 0])  # keeps the graph, value 0
            has.append(False)
            continue
        dev = s_logp.device
        s_merged = group_logprobs(
            s_logp[b], student.completion_ids[b], a.student_starts.to(dev), a.student_stops.to(dev)
        )  # (G, Vs)
        t_merged = group_logprobs(
            t_logp[b], view.rollout.completion_ids[b], a.teacher_starts.to(dev), a.teacher_stops.to(dev)
        )  # (G, Vt)
        per_row.append(uld_distance(s_merged.exp(), t_merged.exp()).mean())
        has.append(True)
    return torch.stack(per_row), torch.tensor(has, device=s_logp.device)


def span_teacher_rewards(
    teacher_logprobs: Tensor, alignments: Sequence[RowAlignment], shape: tuple[int, int]
) -> Tensor:
    """The teacher's log-prob of each aligned span, placed at the span's last student token: ``(B, T)``.

    ``out[b, s1 - 1] = sum_{k in [t0, t1)} log pT(teacher token k)`` for each group ``(s0, s1, t0, t1)``
    of row ``b``; 0 elsewhere (inside a group, and at tokens in no group). Summed over a row it is
    ``log pT`` of the aligned text: the cross-tokenizer form of the per-token environment reward
    ``log pT(a_t | s_t)`` of paper 2306.13649 Eq. 5, credited when the student finishes a span.

    Args:
        teacher_logprobs: ``(B, T')`` the teacher's log-probs of its own tokens.
        alignments: one :class:`RowAlignment` per row.
        shape: ``(B, T)`` of the student's completion.
    """
    out = teacher_logprobs.new_zeros(shape)
    csum = torch.cat([teacher_logprobs.new_zeros(shape[0], 1), teacher_logprobs.cumsum(-1)], dim=-1)
    for b, a in enumerate(alignments):
        if a.num_groups == 0:
            continue
        span = csum[b, a.teacher_stops] - csum[b, a.teacher_starts]  # (G,)
        out[b].index_add_(0, a.student_stops - 1, span)
    return out


def sequence_logprob_gap(student_logprobs: Tensor, student_mask: Tensor, view: TeacherView) -> Tensor:
    """``log pS(y) - log pT(text(y))`` per row ``(B,)``: a sample of the sequence-level reverse KL.

    Over student samples ``y ~ pS`` its mean estimates ``KL(pS || pT)`` at the sequence level, a
    divergence defined for any pair of tokenizers (with the one-tokenization-per-text limit of the
    module docstring). ``student_logprobs`` are the sampler's (``Rollout.logprobs``).
    """
    t = view.rollout.teacher_logprobs
    assert t is not None
    return (student_logprobs * student_mask).sum(-1) - t.sum(-1).to(student_logprobs.device)


@torch.no_grad()
def evaluate_cross(
    engine: RolloutEngine,
    teacher: CrossTokenizerTeacher,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    *,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Held-out divergences of the student to a teacher with another tokenizer, on student samples.

    Returns (means over the prompts' samples):
        ``uld``: ULD per aligned group; ``reverse_kl_seq``: :func:`sequence_logprob_gap` (nats per
        sequence, an estimate of the sequence-level ``KL(pS || pT)``); ``reverse_kl_char``: the same
        per character of completion text; ``teacher_nll_char``: ``-log pT(text)`` per character;
        ``aligned_fraction``: the share of student tokens inside an aligned group;
        ``completion_chars``: text length.
    """
    if not math.isfinite(sampling.temperature) or sampling.temperature <= 0:
        raise ValueError("evaluate_cross samples from the student: temperature must be > 0")
    uld, gap, chars, nll, aligned, tokens = [], [], [], [], 0, 0
    for lo in range(0, len(prompts), batch_size):
        chunk = list(prompts[lo : lo + batch_size])
        r = engine.generate(chunk, sampling, generator=generator)
        view = teacher.read(r, engine)
        alignments = align_rollout(r, engine.tokenizer, view.rollout, teacher.tokenizer)
        logits = engine.score_student(r)
        per_row, has = uld_terms(logits, r, view, alignments, temperature=sampling.temperature)
        uld += per_row[has].tolist()
        gap += sequence_logprob_gap(r.logprobs, r.completion_mask, view).tolist()
        n_chars = [max(1, len(t)) for t in view.texts]
        chars += n_chars
        nll += (-view.rollout.teacher_logprobs.sum(-1)).tolist()
        aligned += sum(a.student_aligned for a in alignments)
        tokens += sum(a.student_tokens for a in alignments)
    total_chars = sum(chars)
    return {
        "uld": sum(uld) / max(1, len(uld)),
        "reverse_kl_seq": sum(gap) / len(gap),
        "reverse_kl_char": sum(gap) / total_chars,
        "teacher_nll_char": sum(nll) / total_chars,
        "aligned_fraction": aligned / max(1, tokens),
        "completion_chars": total_chars / len(chars),
    }
