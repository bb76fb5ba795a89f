"""Incremental scoring: advance a causal LM one token at a time over a batch, with its own KV cache.

:meth:`RolloutEngine.score` scores finished sequences with one teacher forward. An environment cannot
wait for the sequence to finish: it owes the reward ``log pT(a_t | s_t)`` at step ``t``. An
:class:`IncrementalScorer` keeps, for ``B`` rows, the model's KV cache, the attention mask over that
cache, the position of each row's next token and the model's next-token log-probs, so that one step
is one forward of ``B`` new tokens and never recomputes a prefix. It uses the engine's conventions
(left padding, :func:`position_ids_from_mask`, logits cut to the shared vocabulary) and is equally a
sampler's state: the benchmark samples the student from :attr:`IncrementalState.next_logprobs`.

Rows are independent: :meth:`IncrementalScorer.restart` replaces some rows with fresh prompts in
place (what a vector environment's autoreset needs) while the other rows keep their caches.

Cache layout: every row's tokens end at the right edge of the cache (column ``C - 1``); a row's older
or missing columns are masked out. A restarted row's prompt is written right-aligned, so the rows
keep sharing one cache length ``C``. Columns that no row attends to any more are cropped from the left
after each restart, so ``C`` stays at most the longest live row (prompt plus its generated tokens).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from rl_distill.rollout.fused_step import FusedDecodeStep, FusedSteps
from rl_distill.rollout.packed import PackedWeights, trainable
from rl_distill.rollout.prefix_cache import PrefixKVCache
from rl_distill.rollout.prompts import PromptBatch, position_ids_from_mask
from rl_distill.rollout.skinny_head import dense_head_input, skinny_decoder_layers, skinny_output_head


@dataclass
class IncrementalState:
    """The per-row state of an :class:`IncrementalScorer` (``B`` rows, cache length ``C``).

    Tensors are inference tensors (created under ``torch.inference_mode``): read them, do not use
    them in autograd graphs (clone first).

    Attributes:
        past_key_values: the model's KV cache over the ``C`` columns.
        attention_mask: ``(B, C)`` long, 1 on the cached real tokens of each row.
        next_positions: ``(B,)`` long, the position id of each row's next token (its real length).
        next_logprobs: ``(B, V)`` float32 log-probs of each row's next token, temperature 1.
    """

    past_key_values: Any
    attention_mask: Tensor
    next_positions: Tensor
    next_logprobs: Tensor

    def __len__(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def cache_length(self) -> int:
        """``C``, the number of cached columns (shared by all rows)."""
        return self.attention_mask.shape[1]


class IncrementalScorer:
    """Score (or sample) token by token with a KV cache: ``start``, then ``step`` per token.

    Example::

        scorer = IncrementalScorer(teacher, vocab_size)
        state = scorer.start(engine.encode(prompts))
        for t in range(T):
            logp_t = scorer.step(state, tokens[:, t], active=completion_mask[:, t])  # (B,)

    Args:
        model: a causal LM (put in eval mode; no gradients are taken).
        vocab_size: the shared vocabulary size; wider logits (padding rows) are cut off.
        pad_id: the token fed for inactive rows (any valid id: it is masked out).
        skinny_head: the few-row output-head product (:mod:`rl_distill.rollout.skinny_head`) for
            the prefill's and each step's logits (float32 on CPU; False: the model's ``F.linear``).
        skinny_layers: the few-row product for the decoder layers' linear maps at 2-4 rows
            (:func:`~rl_distill.rollout.skinny_head.skinny_decoder_layers`; False: ``F.linear``).
        dense_head_input: the prefill hands the output head a densely strided input
            (:func:`~rl_distill.rollout.skinny_head.dense_head_input`; False: the model's strided slice).
        packed_weights: each step's products with oneDNN-packed weights on CPU when the model is
            frozen (no parameter requires a gradient: the environment's teacher), as
            :meth:`RolloutEngine.generate` (:mod:`rl_distill.rollout.packed`; equal to ``F.linear`` to
            rounding). The scorer keeps the packed copies (the weights' bytes again) while it lives and
            remakes one when its weight changes; :meth:`release_packed` drops them. False: the few-row
            products above.
        prefix_cache: the prefill runs the prompts after the keys and values of the prefix every
            row shares, cached (:class:`~rl_distill.rollout.prefix_cache.PrefixKVCache`: a chat
            template's system turn is computed once, not per episode; equal to float32 rounding). Give
            it for a frozen model (the engine's teacher cache: entries are keyed by the model and its
            weight versions). None: every prefill runs the whole prompts.
        fused_step: each step of a frozen Llama-family model on CPU runs the fused one-token step
            (:class:`~rl_distill.rollout.fused_step.FusedDecodeStep`: fused packed q/k/v and gate/up
            products, a lean attention; equal to the model's ``forward`` to rounding; other models
            take their ``forward``). A :class:`~rl_distill.rollout.fused_step.FusedSteps` shares
            its packed copies (the engine's); True: the scorer's own; False: off. Needs
            ``packed_weights``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        vocab_size: int,
        *,
        pad_id: int = 0,
        skinny_head: bool = True,
        skinny_layers: bool = True,
        dense_head_input: bool = True,
        packed_weights: bool = True,
        prefix_cache: PrefixKVCache | None = None,
        fused_step: bool | FusedSteps = True,
    ) -> None:
        self.model = model
        #: The fused steps (None: off).
        self.fused_steps: FusedSteps | None = (
            fused_step if isinstance(fused_step, FusedSteps) else FusedSteps() if fused_step else None
        )
        self.prefix_cache = prefix_cache
        #: The packed weights of the steps (None: ``packed_weights=False``).
        self.packed: PackedWeights | None = PackedWeights() if packed_weights else None
        self.dense_head_input = dense_head_input
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.skinny_head = skinny_head
        self.skinny_layers = skinny_layers

    def _fused(self) -> FusedDecodeStep | None:
        """The fused step for this model's steps, or None (off, or the model is not supported)."""
        if self.fused_steps is None or self.packed is None:
            return None
        return self.fused_steps.get(self.model)

    @contextmanager
    def _few_row_products(self, rows: int) -> Iterator[None]:
        """The few-row head and decoder-layer products (:mod:`rl_distill.rollout.skinny_head`), as switched.

        ``rows``: this forward's rows (the layers are switched only in their regime).
        """
        # Packed weights for a frozen model only (the environment's teacher), as RolloutEngine.generate;
        # not where the fused step serves the steps (it holds its own packed copies: one copy, not two).
        packed = self.packed if self.packed is not None and not trainable(self.model) else None
        if packed is not None and self._fused() is not None:
            packed = None
        with (
            skinny_output_head(self.model, self.skinny_head, packed=packed),
            skinny_decoder_layers(self.model, self.skinny_layers, rows=rows, packed=packed),
        ):
            yield

    def release_packed(self) -> None:
        """Drop the packed weight copies (remade on the next step); also after changing weights via ``.data``."""
        if self.packed is not None:
            self.packed.clear()
        fused = self._fused()
        if fused is not None:
            fused.release()

    def _logprobs(self, logits: Tensor) -> Tensor:
        """``(B, V_model)`` last-position logits -> ``(B, V)`` float32 log-probs."""
        return torch.log_softmax(logits[:, : self.vocab_size].float(), dim=-1)

    @torch.inference_mode()
    def start(self, prompts: PromptBatch) -> IncrementalState:
        """Run the left-padded prompts once (the prefill) and return the state after them.

        Args:
            prompts: ``B`` left-padded prompts (``RolloutEngine.encode``).
        """
        mask = prompts.attention_mask.long()
        with (
            _eval_mode(self.model),
            dense_head_input(self.model, self.dense_head_input),  # the logits_to_keep=1 slice
            self._few_row_products(prompts.input_ids.numel()),
        ):
            reused = (
                None
                if self.prefix_cache is None
                else self.prefix_cache.prompt_forward(
                    # Real tokens only where the fused step serves the model (a frozen Llama).
                    self.model,
                    prompts.input_ids,
                    mask,
                    packed_rows=self._fused() is not None,
                )
            )
            if reused is not None:
                out, mask = reused  # mask: the shared prefix's columns, then each row's rest
            else:
                out = self.model(
                    input_ids=prompts.input_ids,
                    attention_mask=mask,
                    position_ids=position_ids_from_mask(mask),
                    use_cache=True,
                    logits_to_keep=1,
                )
        return IncrementalState(
            past_key_values=out.past_key_values,
            attention_mask=mask,
            next_positions=mask.sum(-1),  # (B,) real prompt lengths
            next_logprobs=self._logprobs(out.logits[:, -1]),
        )

    @staticmethod
    def token_logprobs(state: IncrementalState, tokens: Tensor, active: Tensor | None = None) -> Tensor:
        """``(B,)`` log-probs of ``tokens`` as each row's next token (0 on inactive rows); no forward."""
        logp = state.next_logprobs.gather(-1, tokens.long()[:, None]).squeeze(-1).clone()
        return logp if active is None else logp.masked_fill(~active.bool(), 0.0)

    @torch.inference_mode()
    def advance(self, state: IncrementalState, tokens: Tensor, active: Tensor | None = None) -> None:
        """Append ``tokens`` (one per row) to the cache and update the next-token log-probs in place.

        Args:
            state: from :meth:`start`; modified in place.
            tokens: ``(B,)`` token ids.
            active: ``(B,)`` bool; inactive rows feed a masked pad token and keep their position.
        """
        active = torch.ones_like(tokens, dtype=torch.bool) if active is None else active.bool()
        tokens = tokens.long().masked_fill(~active, self.pad_id)
        # The new column is attended to only where the row is active, as in RolloutEngine.generate.
        mask = torch.cat([state.attention_mask, active.long()[:, None]], dim=1)  # (B, C + 1)
        fused = self._fused()
        if fused is not None:  # appends to state.past_key_values in place
            logits = fused(tokens, state.next_positions, mask, state.past_key_values, check=False)
        else:
            with _eval_mode(self.model), self._few_row_products(len(tokens)):
                out = self.model(
                    input_ids=tokens[:, None],
                    attention_mask=mask,
                    position_ids=state.next_positions[:, None],
                    past_key_values=state.past_key_values,
                    use_cache=True,
                )
            state.past_key_values, logits = out.past_key_values, out.logits[:, -1]
        state.attention_mask = mask
        state.next_positions = state.next_positions + active.long()
        state.next_logprobs = self._logprobs(logits)

    def step(self, state: IncrementalState, tokens: Tensor, active: Tensor | None = None) -> Tensor:
        """Log-probs of ``tokens`` under the current state, then :meth:`advance` past them.

        Returns:
            ``(B,)`` float32 ``log p(tokens | prefix)``, 0 on inactive rows.
        """
        logp = self.token_logprobs(state, tokens, active)
        self.advance(state, tokens, active)
        return logp

    @torch.inference_mode()
    def restart(self, state: IncrementalState, rows: Tensor | list[int], prompts: PromptBatch) -> None:
        """Replace ``rows`` of ``state`` by fresh prompts (one prefill of those rows only), in place.

        The other rows keep their caches untouched. Restarting every row is :meth:`start`.

        Args:
            state: from :meth:`start`; modified in place.
            rows: ``k`` distinct row indices.
            prompts: ``k`` left-padded prompts, in the order of ``rows``.
        """
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=state.attention_mask.device)
        if len(rows_t) != len(prompts):
            raise ValueError(f"restart got {len(prompts)} prompts for {len(rows_t)} rows")
        fresh = self.start(prompts)
        every = torch.arange(len(state), device=rows_t.device)
        if len(rows_t) == len(state) and torch.equal(rows_t.sort().values, every):
            order = torch.argsort(rows_t)  # every row restarts: the fresh state is the new state
            fresh = _select_rows(fresh, order)
            state.past_key_values, state.attention_mask = fresh.past_key_values, fresh.attention_mask
            state.next_positions, state.next_logprobs = fresh.next_positions, fresh.next_logprobs
            return
        _splice_rows(state, fresh, rows_t)
        _crop_dead_columns(state)


@contextmanager
def _eval_mode(model: PreTrainedModel) -> Iterator[None]:
    """Run ``model`` in eval mode (no dropout) and restore its mode; a no-op if already in eval."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _cache_layers(cache: Any) -> list[Any]:
    """The per-layer ``keys``/``values`` holders of a Transformers ``DynamicCache``.

    Raises:
        NotImplementedError: for caches whose rows cannot be spliced column by column (sliding
            windows, quantised or offloaded caches).
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise NotImplementedError(f"cannot restart rows of a {type(cache).__name__}: no per-layer tensors")
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise NotImplementedError(
                f"cannot restart rows of a cache with {type(layer).__name__} layers (sliding-window "
                "attention); use one IncrementalScorer state per episode instead"
            )
    return list(layers)


def _select_rows(state: IncrementalState, order: Tensor) -> IncrementalState:
    """``state`` with its rows permuted by ``order`` (used when every row restarts at once)."""
    if torch.equal(order, torch.arange(len(order), device=order.device)):
        return state
    for layer in _cache_layers(state.past_key_values):
        layer.keys, layer.values = layer.keys[order], layer.values[order]
    return IncrementalState(
        state.past_key_values,
        state.attention_mask[order],
        state.next_positions[order],
        state.next_logprobs[order],
    )


def _splice_rows(state: IncrementalState, fresh: IncrementalState, rows: Tensor) -> None:
    """Write ``fresh`` (``k`` rows, cache length ``p``) into ``rows`` of ``state``, right-aligned."""
    old_layers, new_layers = _cache_layers(state.past_key_values), _cache_layers(fresh.past_key_values)
    width, p = state.cache_length, fresh.cache_length
    if p > width:
        # The new prompt is longer than the shared cache: grow every row on the left, masked out.
        grow = p - width
        for layer in old_layers:
            layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, grow, 0))  # (B, H, C + grow, D)
            layer.values = torch.nn.functional.pad(layer.values, (0, 0, grow, 0))
        state.attention_mask = torch.nn.functional.pad(state.attention_mask, (grow, 0))
        width = p
    for old, new in zip(old_layers, new_layers):
        # Zero the row first so that no stale key survives outside the mask (cleaner, not needed).
        old.keys[rows] = 0.0
        old.values[rows] = 0.0
        old.keys[rows, :, width - p :] = new.keys.to(old.keys.dtype)
        old.values[rows, :, width - p :] = new.values.to(old.values.dtype)
    state.attention_mask[rows] = 0
    state.attention_mask[rows, width - p :] = fresh.attention_mask
    state.next_positions[rows] = fresh.next_positions
    state.next_logprobs[rows] = fresh.next_logprobs


def _crop_dead_columns(state: IncrementalState) -> None:
    """Drop leading cache columns that no row attends to (bounds the cache length)."""
    alive = state.attention_mask.any(dim=0)  # (C,)
    first = int(alive.long().argmax()) if bool(alive.any()) else state.cache_length - 1
    if first == 0:
        return
    for layer in _cache_layers(state.past_key_values):
        layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
    state.attention_mask = state.attention_mask[:, first:]
