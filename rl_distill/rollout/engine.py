"""The one batched rollout core: sample from a policy with a KV cache, score with the teacher.

Every agent and environment goes through :class:`RolloutEngine`:

1. :meth:`RolloutEngine.generate` samples ``B`` completions from a model (the student, or the
   teacher for SeqKD) token by token with a KV cache, stopping each sequence at EOS;
2. :meth:`RolloutEngine.score` runs the teacher once, causally, over prompt + completion under
   ``torch.inference_mode`` and keeps logits only at the completion positions;
3. :meth:`RolloutEngine.rollout` does both and returns a :class:`Rollout`.

Sampling and scoring temperatures: the sampler's log-probs (``Rollout.logprobs``) are those of the
distribution actually sampled, at the sampling temperature and after top-k/top-p
(:func:`filtered_logprobs`, which policy-gradient agents also use for their current log-probs, so
that the gradient and PPO's ratio are taken against the sampling policy). The teacher's token
log-probs are at ``teacher_temperature`` (:meth:`RolloutEngine.score`; default 1); its full logits
are kept raw.

:func:`completion_forward` is the shared "logits at completion positions" forward (with the last
hidden states when a value head needs them), used for the teacher here and for the student's
gradient forward in the agents.

Privileged-information teachers (on-policy self-distillation, OPSD; tutorial ch. 6): the teacher may
score the student's completion under a *different* prompt than the student saw, e.g. the question
plus its reference answer. :meth:`RolloutEngine.set_teacher_template` renders one teacher prompt per
example from a template (:func:`format_teacher_prompt`, fields ``{prompt}``, ``{reference}`` and any
metadata key) and :meth:`RolloutEngine.score` then scores each row's completion tokens after the
teacher prompt of its student prompt (``Rollout.texts``), or after explicit ``teacher_prompts``.
The teacher prompts are left-padded to their own width, which may differ from the student's; the
guarantees stay those of the plain case: one teacher forward, logits only at completion positions,
and row ``i`` scored exactly as ``teacher prompt i + completion i`` alone would be.

No teacher (``teacher=None``; verifier-only RL, SPIN): the engine samples and builds sequences, and
:meth:`RolloutEngine.score` refuses with :class:`NoTeacherError`.

Lock-step decoding (sharded models, docs/scaling.md): a model sharded with FSDP gathers its
parameters with a collective at every forward, so every process must run the same number of
forwards. With :attr:`RolloutEngine.lockstep` set (a callable that all-reduces "all my sequences
are finished" and returns whether every process is), :meth:`RolloutEngine.generate` keeps decoding
until every process is done: a process whose sequences have all finished feeds padding (masked
out, not attended to) without drawing from its generator, and the padding columns are cut off
before returning. So each process's rollout, and its generator's state, are exactly what they are
without lock-step; only the number of forwards changes. Unset (one process, DDP), the loop stops
as soon as this process's sequences have finished. The teacher's scoring forward is already one
call per :meth:`RolloutEngine.score` whatever the shapes, which is all FSDP needs of it.
"""

from __future__ import annotations

import string
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rl_distill.models.loading import VocabInfo, check_pair
from rl_distill.rollout.fused_step import MIN_TOKENS_TO_PACK_TRAINED, FusedDecodeStep, FusedSteps
from rl_distill.rollout.incremental import IncrementalScorer
from rl_distill.rollout.packed import PackedWeights, trainable
from rl_distill.rollout.prefix_cache import PrefixKVCache
from rl_distill.rollout.prompts import PromptBatch, PromptEncoder, PromptTooLongError, position_ids_from_mask
from rl_distill.rollout.skinny_head import dense_head_input as _dense_head
from rl_distill.rollout.skinny_head import skinny_decoder_layers, skinny_output_head

TeacherOutput = Literal["none", "full", "topk"]


class NoTeacherError(ValueError):
    """A teacher score was asked of an engine built without a teacher (``model.teacher: null``)."""


class _ExampleLike(Protocol):
    prompt: str
    reference: str | None
    metadata: Mapping[str, Any]


def template_fields(template: str) -> list[str]:
    """The field names a teacher template uses, in order: ``"{prompt} [{answer}]"`` -> ``["prompt", "answer"]``.

    Raises:
        ValueError: a malformed template, or a positional (``{}``, ``{0}``) or attribute field.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"teacher_template {template!r} is not a valid format string: {err}") from None
    names = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name or name.isdigit() or not name.isidentifier():
            raise ValueError(
                f"teacher_template {template!r}: field {{{name}}} must be a name (prompt, reference or a "
                "metadata key)"
            )
        names.append(name)
    return names


def format_teacher_prompt(template: str, example: _ExampleLike) -> str:
    r"""The privileged teacher prompt of one example: ``template`` filled from the example.

    Fields: ``{prompt}`` (the student's prompt), ``{reference}`` (the reference completion) and any
    key of ``example.metadata`` (``{answer}``); e.g. ``"{prompt}\n[Answer: {answer}]"``.

    Raises:
        ValueError: a field the example does not have (naming it and the fields it has), or a
            ``reference`` that is None.
    """
    values: dict[str, Any] = {**example.metadata, "prompt": example.prompt, "reference": example.reference}
    for name in template_fields(template):
        if name not in values or values[name] is None:
            have = ", ".join(sorted(k for k, v in values.items() if v is not None))
            raise ValueError(
                f"teacher_template field {{{name}}} is missing from the example {example.prompt[:60]!r} "
                f"(it has: {have})"
            )
    return template.format(**values)


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled.

    Attributes:
        max_new_tokens: completion budget per sequence.
        temperature: sampling temperature; 0 means greedy decoding.
        top_k: keep the ``top_k`` most likely tokens (0 = off).
        top_p: nucleus sampling mass (1.0 = off).
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Rollout:
    """A batch of prompts with completions and their per-token scores.

    Shapes: ``B`` sequences, ``P`` padded prompt length, ``T`` completion length (the longest
    completion in the batch), ``V`` the shared vocabulary size.

    Attributes:
        prompt_ids: ``(B, P)`` left-padded prompts.
        prompt_mask: ``(B, P)`` 1 on real prompt tokens.
        completion_ids: ``(B, T)`` sampled tokens; pad id after a sequence's EOS.
        completion_mask: ``(B, T)`` bool, True on real completion tokens (EOS included).
        logprobs: ``(B, T)`` log-prob of each token under the distribution it was sampled from:
            the sampling model's softmax at the sampling temperature, restricted by top-k/top-p and
            renormalised (:func:`filtered_logprobs`; the full softmax when neither is on), 0 where
            masked. For on-policy rollouts this is ``log pS`` of the policy actually sampled.
            Greedy decoding (temperature 0) records the temperature-1 log-probs, unfiltered.
        teacher_logprobs: ``(B, T)`` teacher log-probs of the same tokens at the scoring call's
            ``teacher_temperature`` (default 1), or None.
        teacher_logits: ``(B, T, V)`` raw teacher logits at the completion positions (no
            temperature applied), when asked.
        teacher_topk_logprobs: ``(B, T, k)`` the teacher's k largest log-probs (at
            ``teacher_temperature``), when asked.
        teacher_topk_ids: ``(B, T, k)`` their token ids.
        texts: prompt strings.
        timings: seconds spent in ``generate`` and ``score``.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    logprobs: Tensor
    teacher_logprobs: Tensor | None = None
    teacher_logits: Tensor | None = None
    teacher_topk_logprobs: Tensor | None = None
    teacher_topk_ids: Tensor | None = None
    texts: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def input_ids(self) -> Tensor:
        """``(B, P + T)`` prompt followed by completion."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """``(B, P + T)`` 1 on real prompt and completion tokens."""
        return torch.cat([self.prompt_mask, self.completion_mask.to(self.prompt_mask.dtype)], dim=1)

    @property
    def lengths(self) -> Tensor:
        """``(B,)`` number of completion tokens per sequence."""
        return self.completion_mask.sum(-1)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]


class _SparseGradEmbedding(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose backward returns a sparse gradient (the rows of ``ids`` only).

    For a tied input/output embedding the weight's gradient is the sum of the output head's dense
    ``(V, d)`` gradient and the lookup's; the lookup's dense gradient (``embedding_dense_backward``) is a
    second ``(V, d)`` tensor alive while the two are added (113 MB for SmolLM2). Sparse, it is added
    into the dense one in place: same sum (to float rounding), one ``(V, d)`` tensor fewer at the
    backward's peak. ``padding_idx`` rows get no gradient, as in ``F.embedding``.
    """

    @staticmethod
    def forward(ctx: Any, ids: Tensor, weight: Tensor, padding_idx: int | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(ids)
        ctx.shape, ctx.padding_idx = weight.shape, padding_idx
        return torch.nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        (ids,) = ctx.saved_tensors
        flat = ids.reshape(-1)
        values = grad.reshape(flat.numel(), -1)
        if ctx.padding_idx is not None:
            values = values.masked_fill((flat == ctx.padding_idx)[:, None], 0.0)
        return None, torch.sparse_coo_tensor(flat[None], values, ctx.shape, check_invariants=False), None


def sparse_grad_embeddings(model: Any, input_ids: Tensor) -> Tensor | None:
    """The input embeddings of ``input_ids`` through :class:`_SparseGradEmbedding`, or None where it does not apply.

    It applies when gradients are on and the model's input embedding is a plain ``nn.Embedding``
    (no ``max_norm``, ``scale_grad_by_freq`` or ``sparse``) whose trainable weight is *tied* to the
    output head (the head's dense gradient makes the weight's summed gradient dense again, as every
    optimizer expects); otherwise the model embeds ``input_ids`` itself.
    """
    if not torch.is_grad_enabled():
        return None
    get_in, get_out = (
        getattr(model, "get_input_embeddings", None),
        getattr(model, "get_output_embeddings", None),
    )
    if not callable(get_in) or not callable(get_out):
        return None
    emb, head = get_in(), get_out()
    if type(emb) is not torch.nn.Embedding or head is None or getattr(head, "weight", None) is not emb.weight:
        return None
    if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse or not emb.weight.requires_grad:
        return None
    if type(emb.weight) is not torch.nn.Parameter:  # e.g. an FSDP DTensor
        return None
    return _SparseGradEmbedding.apply(input_ids, emb.weight, emb.padding_idx)


def completion_forward(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    num_completion: int,
    vocab_size: int,
    *,
    output_hidden_states: bool = False,
    sparse_embedding_grad: bool = False,
    dense_head_input: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Logits (and optionally last hidden states) at the completion positions, from one causal forward.

    The last token is not fed (nothing reads its prediction) and logits are kept only for the
    ``num_completion`` positions that predict completion tokens: no ``(B, P, V)`` prompt logits.

    Args:
        model: a causal LM.
        input_ids: ``(B, P + T)`` prompt and completion.
        attention_mask: ``(B, P + T)``.
        num_completion: ``T``.
        vocab_size: the tokenizer's vocabulary size; wider logits (padding rows) are cut off.
        output_hidden_states: also return the last layer's hidden states at the same positions
            (what a value head reads), from the same forward.
        sparse_embedding_grad: embed the tokens with a sparse-gradient lookup when the input and
            output embeddings are tied (:func:`sparse_grad_embeddings`): one ``(V, d)`` gradient
            tensor fewer at the backward's peak, the same gradient to float rounding.
        dense_head_input: hand the output head a densely strided copy of the kept positions'
            hidden states (:func:`~rl_distill.rollout.skinny_head.dense_head_input`: ``F.linear`` on
            the strided slice is many times slower on CPU, in bfloat16 above all).

    Returns:
        ``(B, T, V)`` logits, where ``[:, t]`` is the distribution of completion token ``t``, and
        ``(B, T, H)`` hidden states of the positions that predict them (None unless asked).
    """
    ids, mask = input_ids[:, :-1], attention_mask[:, :-1]
    embeds = sparse_grad_embeddings(model, ids) if sparse_embedding_grad else None
    with _dense_head(model, dense_head_input):
        out = model(
            input_ids=ids if embeds is None else None,
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
            logits_to_keep=num_completion,
            output_hidden_states=output_hidden_states,
        )
    logits = out.logits  # (B, T, V_model)
    logits = logits[..., :vocab_size] if logits.shape[-1] != vocab_size else logits
    hidden = out.hidden_states[-1][:, -num_completion:] if output_hidden_states else None  # (B, T, H)
    return logits, hidden


def completion_logits(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    num_completion: int,
    vocab_size: int,
    *,
    dense_head_input: bool = True,
) -> Tensor:
    """Logits ``(B, T, V)`` that predict the last ``num_completion`` tokens: :func:`completion_forward`."""
    return completion_forward(
        model, input_ids, attention_mask, num_completion, vocab_size, dense_head_input=dense_head_input
    )[0]


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row of ``probs`` ``(B, V)`` by inverse CDF: ``(B,)`` token ids.

    ``torch.multinomial`` on CPU draws an exponential variate per vocabulary entry (B x V random
    numbers per step, about 4 ms at B=4, V=49152); the inverse CDF needs B uniforms. The cumulative
    sum is in float64; ``u`` lies in (0, 1], so a zero-probability token is never chosen (the first
    index whose cumulative mass reaches ``u * total`` always carries mass).
    """
    cdf = probs.double().cumsum(-1)  # (B, V)
    u = 1.0 - torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    tok = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1)
    return tok.clamp_(max=probs.shape[-1] - 1)


def filter_logits(logits: Tensor, top_k: int, top_p: float, *, keep: Tensor | None = None) -> Tensor:
    """Mask all but the top-k / top-p tokens with -inf: ``(..., V)`` (already tempered) -> ``(..., V)``.

    Args:
        logits: tempered logits.
        top_k: keep the ``top_k`` largest (0 = off).
        top_p: keep the smallest set of most likely tokens whose mass reaches ``top_p`` (1.0 = off).
        keep: ``(...)`` token ids that are never masked (see :func:`filtered_logprobs`).
    """
    use_k = 0 < top_k < logits.shape[-1]
    if not use_k and top_p >= 1.0:
        return logits
    drop = torch.zeros_like(logits, dtype=torch.bool)  # (..., V)
    if use_k:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        drop = drop | (logits < kth)
    if top_p < 1.0:
        masked = logits.masked_fill(drop, float("-inf"))
        sorted_logits, order = torch.sort(masked, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token if the mass before it already reaches top_p (the top token is always kept).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop | torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    if keep is not None:
        drop = drop.scatter(-1, keep[..., None].long(), False)
    return logits.masked_fill(drop, float("-inf"))


def filtered_logprobs(
    logits: Tensor, token_ids: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Tensor:
    """Log-probs of ``token_ids`` under the distribution the sampler draws from: ``(..., V), (...) -> (...)``.

    ``log softmax(filter(logits / temperature))`` at ``token_ids``, where the filter keeps the top-k
    and top-p tokens and renormalises over them (:func:`filter_logits`; no filter when both are
    off, then this is the plain tempered log-softmax). What :meth:`RolloutEngine.generate` records
    and what policy-gradient agents differentiate: the gradient through the filtered softmax is
    well defined on the kept tokens (the kept set is piecewise constant in the logits).

    The token itself is always kept. A sampled token is in the kept set by construction, so this
    changes nothing for sampled tokens at the parameters that sampled them; it keeps the result
    finite where the filter would drop the token (padding after EOS, a tie at the k-th logit that
    flips between the cached and the full forward, or a later PPO epoch in which the student moved
    the token out of its top-k).

    Computed in at least float32 (float64 logits stay float64).

    Args:
        logits: ``(..., V)`` raw logits.
        token_ids: ``(...)`` token ids.
        temperature: sampling temperature, > 0.
        top_k: top-k of the sampler (0 = off).
        top_p: top-p of the sampler (1.0 = off).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    scaled = logits.to(dtype) / temperature  # (..., V)
    if top_k > 0 or top_p < 1.0:
        scaled = filter_logits(scaled, top_k, top_p, keep=token_ids)
    logp = torch.log_softmax(scaled, dim=-1)  # (..., V)
    return logp.gather(-1, token_ids[..., None]).squeeze(-1)


class RolloutEngine:
    """Batched sampling and teacher scoring for a student/teacher pair sharing one tokenizer.

    Args:
        student: the policy being trained.
        teacher: the frozen teacher (put in eval mode, never given gradients), or None for none
            (sampling and fixed sequences only; :meth:`score` raises :class:`NoTeacherError`).
        tokenizer: the shared tokenizer (pad token set).
        chat_template: passed to :class:`PromptEncoder` (None = use it if the tokenizer has one).
        max_prompt_length: longest allowed prompt in tokens; default: the context length minus
            nothing (checked against ``max_new_tokens`` at sampling time).
        stop_token_ids: extra token ids that end a sequence besides the tokenizer's EOS.
        skinny_head: compute the decode steps' logits with the few-row product of
            :mod:`rl_distill.rollout.skinny_head` (float32 on CPU only; equal to float32 rounding,
            faster; False: the model's own ``F.linear``).
        skinny_layers: the same for the decoder layers' linear maps at 2-4 rows
            (:func:`~rl_distill.rollout.skinny_head.skinny_decoder_layers`; False: ``F.linear``).
        teacher_prefix_cache: reuse the teacher's KV cache of the prompt prefix every row shares
            (a chat template's system turn, a fixed instruction) across :meth:`score` calls
            (:mod:`rl_distill.rollout.prefix_cache`; equal to float32 rounding). Off for sharded
            teachers (:attr:`lockstep` set).
        sparse_embedding_grad: the student's gradient forward embeds its tokens with a
            sparse-gradient lookup when its input and output embeddings are tied
            (:func:`sparse_grad_embeddings`: less peak memory in backward, same gradient to rounding).
        dense_head_input: the scoring, training and prefill forwards hand the output head a densely
            strided input (:func:`~rl_distill.rollout.skinny_head.dense_head_input`; on CPU
            ``F.linear`` on Hugging Face's ``logits_to_keep`` slice is many times slower, above all
            in bfloat16). False: the model's own strided slice.
        packed_weights: decode frozen models (the teacher sampling, e.g. SeqKD data; the
            environment's incremental teacher) with oneDNN-packed weights on CPU
            (:mod:`rl_distill.rollout.packed`: 1-16 rows, float32 and bfloat16, equal to ``F.linear``
            to rounding); packed once, the copy (the weights' bytes again) kept while the engine
            lives. A trainable model (the student) is never packed by :meth:`generate`: repacking it
            after every update cost what it gained. False: the few-row products above, or ``F.linear``.
        fused_step: decode Llama-family models on CPU outside autocast with the fused one-token step
            (:class:`~rl_distill.rollout.fused_step.FusedDecodeStep`: fused packed q/k/v and gate/up
            products, the native float32 kernel where it builds, a lean attention step; equal to the
            model's ``forward`` to rounding); needs ``packed_weights``. A frozen model (teacher
            sampling, the environment's incremental teacher) is packed once; the trained student is
            packed anew in each :meth:`generate` of at least
            :data:`~rl_distill.rollout.fused_step.MIN_TOKENS_TO_PACK_TRAINED` tokens and its copies
            dropped after the call. Other models take their ``forward``.

    Raises:
        TokenizerMismatchError: if a model's logit width is smaller than the vocabulary.
    """

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: PreTrainedModel | None,
        tokenizer: PreTrainedTokenizerBase,
        *,
        chat_template: bool | None = None,
        max_prompt_length: int | None = None,
        stop_token_ids: Sequence[int] = (),
        skinny_head: bool = True,
        skinny_layers: bool = True,
        teacher_prefix_cache: bool = True,
        sparse_embedding_grad: bool = True,
        dense_head_input: bool = True,
        packed_weights: bool = True,
        fused_step: bool = True,
    ) -> None:
        self.student = student
        self.dense_head_input = dense_head_input
        self.packed_weights = packed_weights
        #: The packed weights of the decoding forwards (None: ``packed_weights=False``).
        self.packed: PackedWeights | None = PackedWeights() if packed_weights else None
        #: The fused decode steps of the models it decodes (None: ``fused_step`` or ``packed_weights`` off).
        self.fused_steps: FusedSteps | None = FusedSteps() if fused_step and packed_weights else None
        self.skinny_head = skinny_head
        self.skinny_layers = skinny_layers
        self.sparse_embedding_grad = sparse_embedding_grad
        #: The teacher's shared-prefix KV cache (None: off); ``hits``/``misses`` count its use.
        self.prefix_cache: PrefixKVCache | None = PrefixKVCache() if teacher_prefix_cache else None
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.tokenizer = tokenizer
        # Without a teacher only the student's width is checked (it stands in for the teacher's).
        self.vocab: VocabInfo = check_pair(teacher if teacher is not None else student, student, tokenizer)
        #: student prompt -> privileged teacher prompt (:meth:`set_teacher_template`); None: the same prompt.
        self.teacher_prompt_map: dict[str, str] | None = None
        self.teacher_template: str | None = None
        self.encoder = PromptEncoder(
            tokenizer, chat_template=chat_template, max_prompt_length=max_prompt_length
        )
        stops = set(stop_token_ids)
        if tokenizer.eos_token_id is not None:
            stops.add(int(tokenizer.eos_token_id))
        if not stops:
            raise ValueError("no stop token: the tokenizer has no EOS id and no stop_token_ids were given")
        self.stop_ids = torch.tensor(sorted(stops), dtype=torch.long)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops))
        self.context_length = min(
            _context_length(student) or 1 << 30,
            (_context_length(teacher) if teacher is not None else None) or 1 << 30,
        )
        #: Lock-step decoding across processes (sharded models): ``lockstep(done)`` takes whether all
        #: of this process's sequences have finished and returns whether every process's have (one
        #: small all-reduce; :meth:`rl_distill.distributed.Distributed.all_finished`). None: stop
        #: when this process's sequences have finished (one process, DDP).
        self.lockstep: Callable[[bool], bool] | None = None

    @property
    def has_teacher(self) -> bool:
        """Whether the engine has a teacher to score with."""
        return self.teacher is not None

    def set_teacher_template(self, template: str | None, examples: Iterable[_ExampleLike]) -> None:
        r"""Score with a privileged teacher prompt per example (OPSD): ``template`` rendered for each example.

        Afterwards :meth:`score` looks each row's student prompt (``Rollout.texts``) up and scores its
        completion after that example's teacher prompt. ``None`` (or ``""``) switches it off: the
        teacher sees the student's prompt.

        Args:
            template: a format string over ``prompt``, ``reference`` and metadata keys
                (:func:`format_teacher_prompt`), e.g. ``"{prompt}\n[Answer: {answer}]"``.
            examples: every example whose prompt may be scored (a task's train and eval splits).

        Raises:
            ValueError: a field missing from an example, or two examples with the same prompt but
                different teacher prompts (the lookup would be ambiguous).
        """
        if not template:
            self.teacher_prompt_map, self.teacher_template = None, None
            return
        mapping: dict[str, str] = {}
        for ex in examples:
            rendered = format_teacher_prompt(template, ex)
            if mapping.setdefault(ex.prompt, rendered) != rendered:
                raise ValueError(
                    f"teacher_template: two examples share the prompt {ex.prompt[:60]!r} but render different "
                    "teacher prompts; make the prompts unique"
                )
        self.teacher_prompt_map, self.teacher_template = mapping, template

    def teacher_prompts_for(self, texts: Sequence[str]) -> list[str] | None:
        """The teacher prompts of student prompts ``texts`` (:meth:`set_teacher_template`); None when off.

        Raises:
            KeyError: a prompt that was not registered (naming it).
        """
        if self.teacher_prompt_map is None:
            return None
        out = []
        for text in texts:
            found = self.teacher_prompt_map.get(text)
            if found is None:
                raise KeyError(
                    f"no teacher prompt for the prompt {text[:60]!r}: set_teacher_template was not given its example"
                )
            out.append(found)
        return out

    @property
    def device(self) -> torch.device:
        """Device of the student's parameters."""
        return next(self.student.parameters()).device

    @property
    def vocab_size(self) -> int:
        """Shared vocabulary size (logits are cut to this width)."""
        return self.vocab.vocab_size

    def encode(self, prompts: Sequence[str] | PromptBatch) -> PromptBatch:
        """Tokenise (cached) and left-pad prompts on the student's device."""
        if isinstance(prompts, PromptBatch):
            return prompts
        return self.encoder(prompts, device=self.device)

    def _check_fits(self, prompts: PromptBatch, max_new_tokens: int, *, what: str = "prompt") -> None:
        longest = int(prompts.attention_mask.sum(-1).max())
        if longest + max_new_tokens > self.context_length:
            raise PromptTooLongError(
                f"a {what} of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the context length "
                f"{self.context_length}"
            )

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str] | PromptBatch,
        sampling: SamplingConfig,
        *,
        model: PreTrainedModel | None = None,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Sample one completion per prompt with a KV cache; no teacher scores yet.

        Args:
            prompts: prompt strings or an encoded batch.
            sampling: temperature (0 = greedy), top-k, top-p, budget.
            model: the sampler, default the student (pass the teacher for SeqKD data).
            generator: RNG for sampling (reproducible rollouts).

        Returns:
            A :class:`Rollout` with ``logprobs`` of the sampled distribution (sampling temperature,
            after top-k/top-p).
        """
        model = self.student if model is None else model
        batch = self.encode(prompts)
        self._check_fits(batch, sampling.max_new_tokens)
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            # Per-module packing for a frozen model only: packing a trainable one anew per call (about
            # 0.1 s for the main job's student) cost about what oneDNN's products gained
            # (docs/results/performance.md, section 7, item 7). A frozen one is packed once.
            frozen = isinstance(model, torch.nn.Module) and not trainable(model)
            packed = self.packed if frozen else None
            # The fused step (its own packed copies) for a supported model: a frozen one kept packed, a
            # trained one packed anew after each update when the decode is long enough to repay it.
            fused = None
            if self.fused_steps is not None and (
                frozen or sampling.max_new_tokens >= MIN_TOKENS_TO_PACK_TRAINED
            ):
                fused = self.fused_steps.get(model)
            packed = None if fused is not None else packed
            with (
                skinny_output_head(model, self.skinny_head, packed=packed),
                skinny_decoder_layers(model, self.skinny_layers, rows=len(batch), packed=packed),
            ):
                tokens, logps, alive = self._decode(model, batch, sampling, generator, fused)
        finally:
            if was_training:
                model.train()
            if not frozen and self.fused_steps is not None:
                self.fused_steps.release(model)  # a trained model's copies go stale at its next update
        # Lock-step padding steps come after this process's last real token: cut them off, so the
        # rollout is the one this process would have sampled alone.
        width = (
            len(alive) if self.lockstep is None else 1 + max(t for t, a in enumerate(alive) if bool(a.any()))
        )
        completion_mask = torch.stack(alive[:width], dim=1)  # (B, T)
        return Rollout(
            prompt_ids=batch.input_ids,
            prompt_mask=batch.attention_mask,
            completion_ids=torch.stack(tokens[:width], dim=1),
            completion_mask=completion_mask,
            logprobs=torch.stack(logps[:width], dim=1),
            texts=batch.texts,
            timings={"generate": time.perf_counter() - start},
        )

    def _decode(
        self,
        model: PreTrainedModel,
        batch: PromptBatch,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        fused: FusedDecodeStep | None = None,
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The decode loop of :meth:`generate`: per step, the sampled tokens, their log-probs, alive rows.

        ``fused``: the model's fused one-token step (after the model's own prefill), or None.
        """
        device = batch.input_ids.device
        stop_ids = self.stop_ids.to(device)
        bsz, vocab = len(batch), self.vocab_size
        mask = batch.attention_mask
        positions = position_ids_from_mask(mask)
        finished = torch.zeros(bsz, dtype=torch.bool, device=device)
        tokens: list[Tensor] = []
        logps: list[Tensor] = []
        alive: list[Tensor] = []
        mine_done = False  # every sequence of this process has finished (lock-step: others may not have)
        with _dense_head(model, self.dense_head_input):  # the prefill's strided logits_to_keep=1 slice
            out = model(
                input_ids=batch.input_ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
            )
        past, last_logits = out.past_key_values, out.logits[:, -1]
        next_pos = positions[:, -1:] + 1  # (B, 1)
        for step in range(sampling.max_new_tokens):
            if mine_done:  # lock-step padding: nothing sampled, the generator does not move
                tok = torch.full((bsz,), self.pad_id, dtype=torch.long, device=device)
                logp_tok = torch.zeros(bsz, dtype=torch.float32, device=device)
            else:
                logits = last_logits[:, :vocab].float()  # (B, V)
                temp = sampling.temperature if sampling.temperature > 0 else 1.0
                if sampling.temperature == 0:
                    logp_all = torch.log_softmax(logits / temp, dim=-1)
                    tok = logits.argmax(-1)
                else:
                    filtered = filter_logits(logits / temp, sampling.top_k, sampling.top_p)  # (B, V)
                    # The log-prob of the distribution actually sampled (filtered, renormalised): the
                    # policy whose gradient the agents take (see filtered_logprobs).
                    logp_all = torch.log_softmax(filtered, dim=-1)
                    tok = sample_categorical(filtered.softmax(-1), generator)
                tok = tok.masked_fill(finished, self.pad_id)
                logp_tok = logp_all.gather(-1, tok[:, None]).squeeze(-1).masked_fill(finished, 0.0)
            tokens.append(tok)
            logps.append(logp_tok)
            alive.append(~finished)
            finished = finished | torch.isin(tok, stop_ids)
            mine_done = bool(finished.all())
            # Lock-step: one all-reduce per step; every process stops at the same step.
            all_done = mine_done if self.lockstep is None else self.lockstep(mine_done)
            if all_done or step == sampling.max_new_tokens - 1:
                break
            # The new token is attended to only if it is a real token (finished rows feed padding).
            mask = torch.cat([mask, alive[-1].long()[:, None]], dim=1)
            if fused is not None:  # appends to past in place
                last_logits = fused(tok, next_pos[:, 0], mask, past, check=False)
            else:
                out = model(
                    input_ids=tok[:, None],
                    attention_mask=mask,
                    position_ids=next_pos,
                    past_key_values=past,
                    use_cache=True,
                )
                past, last_logits = out.past_key_values, out.logits[:, -1]
            next_pos = next_pos + 1
        return tokens, logps, alive

    def from_completions(
        self,
        prompts: Sequence[str] | PromptBatch,
        completions: Sequence[str] | Sequence[Sequence[int]],
        *,
        append_eos: bool = True,
    ) -> Rollout:
        """Build a rollout from fixed completions (dataset references): tokenised, EOS appended.

        ``logprobs`` is left at zero (no sampler); call :meth:`score` for the teacher.

        Args:
            prompts: prompt strings or an encoded batch.
            completions: texts or token-id lists, one per prompt.
            append_eos: append EOS where a completion does not end with it (default). ``False``
                keeps the tokens exactly as given (a completion cut at a token budget has no EOS).
        """
        batch = self.encode(prompts)
        if len(completions) != len(batch):
            raise ValueError(f"got {len(completions)} completions for {len(batch)} prompts")
        eos = (
            int(self.stop_ids[0]) if self.tokenizer.eos_token_id is None else int(self.tokenizer.eos_token_id)
        )
        seqs = []
        for c in completions:
            ids = (
                list(c)
                if not isinstance(c, str)
                else self.tokenizer(c, add_special_tokens=False)["input_ids"]
            )
            if append_eos and (not ids or ids[-1] != eos):
                ids = [*ids, eos]
            if not ids:
                raise ValueError("a completion is empty (and append_eos=False)")
            seqs.append(ids)
        width = max(len(s) for s in seqs)
        self._check_fits(batch, width)
        device = batch.input_ids.device
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long, device=device)
        cmask = torch.zeros((len(seqs), width), dtype=torch.bool, device=device)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            cmask[row, : len(s)] = True
        return Rollout(
            prompt_ids=batch.input_ids,
            prompt_mask=batch.attention_mask,
            completion_ids=ids,
            completion_mask=cmask,
            logprobs=torch.zeros(ids.shape, dtype=torch.float32, device=device),
            texts=batch.texts,
        )

    def score(
        self,
        rollout: Rollout,
        *,
        teacher_output: TeacherOutput = "none",
        top_k: int = 0,
        teacher_temperature: float = 1.0,
        teacher_prompts: Sequence[str] | PromptBatch | None = None,
    ) -> Rollout:
        """Score the rollout's completions with the teacher in one causal forward.

        Fills ``teacher_logprobs`` (``log softmax(logits / teacher_temperature)`` at the tokens) and,
        when asked, ``teacher_logits`` (full, raw: no temperature) or the top-k teacher log-probs (at
        ``teacher_temperature``). Modifies and returns ``rollout``.

        The teacher reads ``teacher prompt + completion``: the teacher prompt is ``teacher_prompts[i]``
        when given, else the registered privileged prompt of ``rollout.texts[i]``
        (:meth:`set_teacher_template`), else the student's own prompt. The teacher prompts are
        left-padded among themselves (their width may differ from the student's), so the completion
        tokens keep the same positions relative to each row's last prompt token.

        Args:
            rollout: from :meth:`generate` or :meth:`from_completions`.
            teacher_output: ``"none"``, ``"full"`` (``(B, T, V)`` logits) or ``"topk"``.
            top_k: k for ``"topk"``.
            teacher_temperature: temperature of the teacher's log-probs, > 0. Default 1 (the
                teacher's own distribution); the policy-gradient agents pass their
                ``teacher_temp`` (by default the sampling temperature, as GKD's divergence).
            teacher_prompts: one teacher prompt per row (strings or an encoded batch), overriding
                the registered template.

        Raises:
            NoTeacherError: the engine has no teacher.
            PromptTooLongError: a teacher prompt plus the completion exceeds the context length.
        """
        if self.teacher is None:
            raise NoTeacherError(
                "this engine has no teacher (model.teacher: null): nothing can score the completions"
            )
        if not teacher_temperature > 0:
            raise ValueError(f"teacher_temperature must be > 0, got {teacher_temperature}")
        if teacher_output not in ("none", "full", "topk"):
            raise ValueError(f"teacher_output must be 'none', 'full' or 'topk', got {teacher_output!r}")
        if teacher_output == "topk" and top_k < 1:
            raise ValueError("teacher_output='topk' needs top_k >= 1")
        start = time.perf_counter()
        num = rollout.completion_ids.shape[1]
        input_ids, attention_mask = self.teacher_inputs(rollout, teacher_prompts)
        with torch.inference_mode(), _dense_head(self.teacher, self.dense_head_input):
            logits = None
            if self.prefix_cache is not None and self.lockstep is None:
                logits = self.prefix_cache.completion_logits(
                    self.teacher, input_ids, attention_mask, num, self.vocab_size
                )
            if logits is None:
                logits = completion_logits(
                    self.teacher,
                    input_ids,
                    attention_mask,
                    num,
                    self.vocab_size,
                    dense_head_input=False,  # the enclosing block already hooks the teacher's head
                )
            scaled = logits.float() if teacher_temperature == 1.0 else logits.float() / teacher_temperature
            logp = torch.log_softmax(scaled, dim=-1)  # (B, T, V)
            tok_logp = logp.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
            tok_logp = tok_logp.masked_fill(~rollout.completion_mask, 0.0)
            topk = logp.topk(min(top_k, logp.shape[-1]), dim=-1) if teacher_output == "topk" else None
        # Small outputs are cloned out of inference mode so that agents may use them in autograd
        # graphs (inference tensors cannot be saved for backward). The full logits stay inference
        # tensors: the divergences read them without saving them.
        rollout.teacher_logprobs = tok_logp.clone()
        if teacher_output == "full":
            rollout.teacher_logits = logits
        elif topk is not None:
            rollout.teacher_topk_logprobs, rollout.teacher_topk_ids = (
                topk.values.clone(),
                topk.indices.clone(),
            )
        rollout.timings["score"] = time.perf_counter() - start
        return rollout

    def teacher_inputs(
        self, rollout: Rollout, teacher_prompts: Sequence[str] | PromptBatch | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)`` ``(B, P' + T)`` the teacher reads: teacher prompt + completion.

        The student's own prompt and completion (``rollout.input_ids``) unless a teacher prompt
        applies (``teacher_prompts``, or the registered template; see :meth:`score`).
        """
        if teacher_prompts is None:
            teacher_prompts = self.teacher_prompts_for(rollout.texts) if rollout.texts else None
            if teacher_prompts is None and self.teacher_prompt_map is not None:
                raise ValueError(
                    "a teacher template is set, but the rollout carries no prompt texts to look up"
                )
        if teacher_prompts is None:
            return rollout.input_ids, rollout.attention_mask
        batch = self.encode(teacher_prompts)
        if len(batch) != len(rollout):
            raise ValueError(f"got {len(batch)} teacher prompts for {len(rollout)} sequences")
        self._check_fits(batch, rollout.completion_ids.shape[1], what="teacher prompt")
        cmask = rollout.completion_mask.to(batch.attention_mask.dtype)
        ids = torch.cat([batch.input_ids.to(rollout.completion_ids.device), rollout.completion_ids], dim=1)
        mask = torch.cat([batch.attention_mask.to(cmask.device), cmask], dim=1)
        return ids, mask

    def score_student(self, rollout: Rollout) -> Tensor:
        """Student logits ``(B, T, V)`` at the rollout's completion positions (gradient if enabled)."""
        return self.student_forward(rollout)[0]

    def student_forward(
        self, rollout: Rollout, *, output_hidden_states: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Student logits ``(B, T, V)`` and, when asked, last hidden states ``(B, T, H)``: one forward."""
        return completion_forward(
            self.student,
            rollout.input_ids,
            rollout.attention_mask,
            rollout.completion_ids.shape[1],
            self.vocab_size,
            output_hidden_states=output_hidden_states,
            sparse_embedding_grad=self.sparse_embedding_grad,
            dense_head_input=self.dense_head_input,
        )

    def rollout(
        self,
        prompts: Sequence[str] | PromptBatch,
        sampling: SamplingConfig,
        *,
        teacher_output: TeacherOutput = "none",
        top_k: int = 0,
        generator: torch.Generator | None = None,
        teacher_temperature: float = 1.0,
        teacher_prompts: Sequence[str] | PromptBatch | None = None,
    ) -> Rollout:
        """Sample from the student, then score with the teacher: :meth:`generate` + :meth:`score`."""
        out = self.generate(prompts, sampling, generator=generator)
        return self.score(
            out,
            teacher_output=teacher_output,
            top_k=top_k,
            teacher_temperature=teacher_temperature,
            teacher_prompts=teacher_prompts,
        )

    def incremental_scorer(self, model: PreTrainedModel | None = None) -> IncrementalScorer:
        """A token-by-token scorer (own KV cache) for the teacher, or for ``model`` (e.g. the student).

        What environments use to give ``log pT(a_t | s_t)`` at each step without recomputing the
        prefix; see :mod:`rl_distill.rollout.incremental`.
        """
        if model is None and self.teacher is None:
            raise NoTeacherError("this engine has no teacher (model.teacher: null) to score incrementally")
        if model is None and self.teacher_prompt_map is not None:
            raise ValueError(
                "the incremental scorer reads the student's prompt; it does not support a teacher template"
            )
        return IncrementalScorer(
            self.teacher if model is None else model,
            self.vocab_size,
            pad_id=self.pad_id,
            skinny_head=self.skinny_head,
            skinny_layers=self.skinny_layers,
            dense_head_input=self.dense_head_input,
            packed_weights=self.packed_weights,
            fused_step=self.fused_steps if self.fused_steps is not None else False,
            # The teacher's shared-prompt-prefix cache serves the prefills too (a trainable model's
            # entries would go stale at every update: none for it).
            prefix_cache=self.prefix_cache if model is None and self.lockstep is None else None,
        )

    def decode(self, rollout: Rollout) -> list[str]:
        """Completion texts (special tokens and everything after EOS dropped)."""
        texts = []
        for ids, m in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist()):
            texts.append(
                self.tokenizer.decode([i for i, keep in zip(ids, m) if keep], skip_special_tokens=True)
            )
        return texts


def _context_length(model: PreTrainedModel) -> int | None:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
