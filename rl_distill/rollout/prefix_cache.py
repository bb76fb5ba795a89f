"""Teacher prompt reuse: the frozen teacher's KV cache of a shared prompt prefix (issue #18, lever 4).

Chat prompts start with the same tokens: the template's system turn (SmolLM2's default system prompt
is about half of a short prompt), a task instruction, few-shot examples. The teacher is frozen, so its
keys and values over those tokens are the same at every step: :class:`PrefixKVCache` computes them
once and every later teacher forward starts after them.

How one scoring forward uses it (:meth:`PrefixKVCache.completion_logits`, called by
:meth:`rl_distill.rollout.RolloutEngine.score`):

1. the longest token prefix shared by every row's prompt (rows are left-padded: each row's prefix
   starts at its first real token), leaving at least one prompt token per row to the forward;
2. a cached prefix whose tokens agree with it on at least ``min_tokens`` tokens is sliced to the
   agreeing length (causal attention: the keys and values of the first ``L`` tokens depend on those
   tokens only); on a miss the batch's shared prefix is run once (batch 1) and stored;
3. each row's remaining prompt tokens and completion are left-padded to a common width and run
   against the prefix cache (broadcast over the rows, never written to), with the attention mask
   ``[1 x L, row mask]`` and position ids continuing from ``L``.

The result is the same function of the inputs as one forward over the left-padded rows (equal to
float32 rounding: the products are blocked differently), so the logits at the completion positions
agree to about 1e-5; ``tests/test_prefix_cache.py`` checks it against the plain forward.

Entries are keyed by the prefix tokens and by the teacher's identity and parameter versions (an in-place
weight update, e.g. ``teacher_refresh_every``, invalidates them), its dtype and the autocast state.
The cache is skipped (the plain forward runs) when the teacher's KV cache is not a plain
per-layer ``DynamicCache`` (sliding windows, custom caches), when the shared prefix is shorter than
``min_tokens``, and by the engine for sharded teachers (a sharded forward must run the same calls on
every process).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from rl_distill.rollout.prompts import position_ids_from_mask

__all__ = ["PrefixKVCache"]


class PrefixKVCache:
    """The teacher's keys and values of recently seen shared prompt prefixes (LRU).

    Args:
        min_tokens: shortest prefix worth reusing (shorter ones run the plain forward).
        max_entries: prefixes kept (least recently used dropped first).

    Attributes:
        hits: forwards that reused a cached prefix.
        misses: forwards that computed and stored one.
        disabled_reason: why the cache switched itself off for this teacher (None while on).
    """

    def __init__(self, min_tokens: int = 8, max_entries: int = 4) -> None:
        if min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.min_tokens = min_tokens
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[Any, ...], tuple[Tensor, list[tuple[Tensor, Tensor]]]] = (
            OrderedDict()
        )
        self.hits = 0
        self.misses = 0
        self.disabled_reason: str | None = None

    def clear(self) -> None:
        """Drop every cached prefix."""
        self._entries.clear()

    @staticmethod
    def shared_prefix(input_ids: Tensor, attention_mask: Tensor, prompt_width: int) -> Tensor:
        """The token ids every row's prompt starts with, at most ``min(prompt length) - 1`` of them.

        Args:
            input_ids: ``(B, W)`` left-padded prompts followed by completions.
            attention_mask: ``(B, W)``.
            prompt_width: columns of ``input_ids`` that hold the (left-padded) prompts.
        """
        mask = attention_mask[:, :prompt_width].bool()
        first = (~mask).long().cumprod(-1).sum(-1)  # (B,) leading padding columns
        longest = int((prompt_width - first).min()) - 1  # leave one prompt token per row
        if longest < 1:
            return input_ids.new_empty(0)
        cols = first[:, None] + torch.arange(longest, device=input_ids.device)[None]  # (B, longest)
        rows = input_ids.gather(1, cols)
        agree = (rows == rows[:1]).all(0).long().cumprod(0)  # (longest,) 1 while every row agrees
        return rows[0, : int(agree.sum())]

    def _key(self, model: Any) -> tuple[Any, ...]:
        params = list(model.parameters())
        return (
            id(model),
            tuple(p._version for p in params),
            params[0].dtype if params else None,
            torch.is_autocast_enabled("cpu"),
            torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None,
        )

    def _lookup(self, key: tuple[Any, ...], prefix: Tensor) -> tuple[int, list[tuple[Tensor, Tensor]]] | None:
        """The cached entry agreeing longest with ``prefix`` (at least ``min_tokens``), and that length."""
        best: tuple[int, Any, list[tuple[Tensor, Tensor]]] | None = None
        for entry_key, (tokens, kv) in self._entries.items():
            if entry_key[:-1] != key:
                continue
            n = min(len(tokens), len(prefix))
            same = int((tokens[:n] == prefix[:n].to(tokens.device)).long().cumprod(0).sum()) if n else 0
            if same >= self.min_tokens and (best is None or same > best[0]):
                best = (same, entry_key, kv)
        if best is None:
            return None
        self._entries.move_to_end(best[1])
        return best[0], best[2]

    def _compute(
        self, model: Any, key: tuple[Any, ...], prefix: Tensor
    ) -> list[tuple[Tensor, Tensor]] | None:
        from rl_distill.rollout.incremental import _cache_layers

        out = model(input_ids=prefix[None], use_cache=True, logits_to_keep=1)
        try:
            layers = _cache_layers(out.past_key_values)
        except NotImplementedError as err:
            self.disabled_reason = str(err)
            return None
        kv = [(layer.keys, layer.values) for layer in layers]
        self._entries[(*key, tuple(prefix.tolist()))] = (prefix.clone(), kv)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return kv

    def completion_logits(
        self, model: Any, input_ids: Tensor, attention_mask: Tensor, num_completion: int, vocab_size: int
    ) -> Tensor | None:
        """Logits ``(B, T, V)`` at the completion positions, reusing the prefix cache; None if it does not apply.

        The same contract as :func:`rl_distill.rollout.engine.completion_logits` (call it under
        ``torch.inference_mode``); None means: run the plain forward instead.
        """
        found = self._prefix_kv(model, input_ids, attention_mask, input_ids.shape[1] - num_completion)
        if found is None:
            return None
        length, kv = found
        ids, row_mask = _after_prefix(input_ids, attention_mask, num_completion, length)
        # The last token is not fed (as the plain forward).
        out, _ = _forward_after(model, ids[:, :-1], row_mask[:, :-1], length, kv, keep=num_completion)
        logits = out.logits
        return logits[..., :vocab_size] if logits.shape[-1] != vocab_size else logits

    def prompt_forward(
        self, model: Any, input_ids: Tensor, attention_mask: Tensor, *, packed_rows: bool = False
    ) -> tuple[Any, Tensor] | None:
        """The prefill of left-padded prompts (``use_cache=True``, ``logits_to_keep=1``) after the cached prefix.

        What :meth:`rl_distill.rollout.IncrementalScorer.start` runs: each row's prompt after the shared
        prefix, against the prefix's keys and values. The output's KV cache covers the prefix and the
        rows (``L + W'`` columns, fresh tensors, one per row); the returned mask is its attention mask
        (a shorter row's padding sits between the prefix and its tokens; position ids follow the mask).

        Args:
            model: the frozen teacher.
            input_ids: ``(B, P)`` left-padded prompts.
            attention_mask: ``(B, P)``.
            packed_rows: run only the rows' real tokens, packed into one sequence with a
                block-causal mask (:func:`_packed_rows_forward`: no products on padding; the model must
                take a 4-D attention mask and index ``logits_to_keep``, as Transformers' Llama does);
                the returned cache and mask have the same layout.

        Returns:
            ``(model output, (B, L + W') attention mask)``, or None: run the plain prefill instead.
            The output has ``logits`` ``(B, 1, V)`` and ``past_key_values``.
        """
        found = self._prefix_kv(model, input_ids, attention_mask, input_ids.shape[1])
        if found is None:
            return None
        length, kv = found
        ids, row_mask = _after_prefix(input_ids, attention_mask, 0, length)
        if packed_rows and len(ids) > 1 and bool((row_mask == 0).any()):
            return _packed_rows_forward(model, ids, row_mask, length, kv)
        return _forward_after(model, ids, row_mask, length, kv, keep=1)

    def _prefix_kv(
        self, model: Any, input_ids: Tensor, attention_mask: Tensor, prompt_width: int
    ) -> tuple[int, list[tuple[Tensor, Tensor]]] | None:
        """The cached (or newly computed) prefix of these rows: ``(length L, per-layer keys/values)``, or None."""
        if self.disabled_reason is not None:
            return None
        prefix = self.shared_prefix(input_ids, attention_mask, prompt_width)
        if len(prefix) < self.min_tokens:
            return None
        key = self._key(model)
        found = self._lookup(key, prefix)
        if found is not None:
            self.hits += 1
            return found
        kv = self._compute(model, key, prefix)
        if kv is None:
            return None
        self.misses += 1
        return len(prefix), kv


def _after_prefix(
    input_ids: Tensor, attention_mask: Tensor, num_completion: int, length: int
) -> tuple[Tensor, Tensor]:
    """Each row's prompt after the ``length`` shared tokens, then its completion, left-padded to one width.

    Returns:
        ``(ids, mask)``, ``(B, max rest + num_completion)``; padding is id 0, mask 0.
    """
    prompt_width = input_ids.shape[1] - num_completion
    first = (~attention_mask[:, :prompt_width].bool()).long().cumprod(-1).sum(-1)  # (B,) leading padding
    rest = prompt_width - first - length  # (B,) >= 1 prompt tokens after the prefix
    width = int(rest.max()) + num_completion
    # Source column of each target column: target j of row i reads column first_i + length + j - pad_i.
    pad = int(rest.max()) - rest  # (B,) left padding of each row
    j = torch.arange(width, device=input_ids.device)[None]  # (1, width)
    src = ((first + length - pad)[:, None] + j).clamp(0, input_ids.shape[1] - 1)  # (B, width)
    real = j >= pad[:, None]
    ids = torch.where(real, input_ids.gather(1, src), input_ids.new_zeros(()))
    mask = torch.where(real, attention_mask.gather(1, src), attention_mask.new_zeros(()))
    return ids, mask


def _forward_after(
    model: Any, ids: Tensor, row_mask: Tensor, length: int, kv: list[tuple[Tensor, Tensor]], *, keep: int
) -> tuple[Any, Tensor]:
    """One forward of ``ids`` after the ``length`` cached prefix columns; returns ``(output, full mask)``.

    ``keep``: the positions whose logits are kept (``logits_to_keep``). The full mask is the prefix's
    columns (all ones) followed by ``row_mask``; position ids continue from ``length`` along it.
    """
    full_mask = torch.cat([row_mask.new_ones(len(ids), length), row_mask], dim=1)
    out = model(
        input_ids=ids,
        attention_mask=full_mask,
        position_ids=position_ids_from_mask(full_mask)[:, length:],
        past_key_values=_expanded_cache(kv, length, len(ids)),
        use_cache=True,
        logits_to_keep=keep,
    )
    return out, full_mask


class _PrefillOutput:
    """What the prefill's callers read of a model output: ``logits`` and ``past_key_values``."""

    def __init__(self, logits: Tensor, past_key_values: Any) -> None:
        self.logits = logits
        self.past_key_values = past_key_values


def _packed_rows_forward(
    model: Any, ids: Tensor, row_mask: Tensor, length: int, kv: list[tuple[Tensor, Tensor]]
) -> tuple[_PrefillOutput, Tensor]:
    """:func:`_forward_after` with ``keep=1`` for left-padded rows, computing their real tokens only.

    The ``N`` real tokens of the ``B`` rows are run as one sequence after the prefix, under a 4-D
    mask that lets each token see the prefix and its own row's earlier tokens (block-causal), with
    each row's own position ids. The keys and values are then laid out as the padded forward's
    (``(B, H, L + W, D)``, each row right-aligned, zeros on padding) and the logits of each row's
    last token returned, so callers cannot tell the two apart (equal to float32 rounding).
    """
    from transformers import DynamicCache

    bsz, width = ids.shape
    real = row_mask.bool()
    counts = real.sum(-1)  # (B,) tokens per row
    rows = torch.repeat_interleave(torch.arange(bsz, device=ids.device), counts)  # (N,) row of each token
    starts = torch.cumsum(counts, 0) - counts  # (B,) first packed index of each row
    offsets = torch.arange(len(rows), device=ids.device) - starts[rows]  # (N,) index within its row
    packed = ids[real][None]  # (1, N): row-major order, each row's tokens in order
    dtype = model.get_input_embeddings().weight.dtype
    same_row = rows[:, None] == rows[None, :]
    visible = torch.cat(
        [
            torch.ones(len(rows), length, dtype=torch.bool, device=ids.device),
            same_row & (offsets[None] <= offsets[:, None]),
        ],
        dim=1,
    )  # (N, L + N)
    mask = torch.zeros(visible.shape, dtype=dtype, device=ids.device).masked_fill_(~visible, float("-inf"))
    out = model(
        input_ids=packed,
        attention_mask=mask[None, None],
        position_ids=(length + offsets)[None],
        past_key_values=_expanded_cache(kv, length, 1),
        use_cache=True,
        logits_to_keep=starts + counts - 1,  # each row's last token
    )
    columns = length + width - counts[rows] + offsets  # (N,) each token's column in the padded layout
    layers = []
    for layer in out.past_key_values.layers:
        made = []
        for tensor in (layer.keys, layer.values):  # (1, H, L + N, D)
            full = tensor.new_zeros(bsz, tensor.shape[1], length + width, tensor.shape[3])
            full[:, :, :length] = tensor[:, :, :length]
            full[rows, :, columns] = tensor[0, :, length:].transpose(0, 1)  # (N, H, D) into place
            made.append(full)
        layers.append((made[0], made[1]))
    full_mask = torch.cat([row_mask.new_ones(bsz, length), row_mask], dim=1)
    logits = out.logits[0][:, None]  # (B, 1, V)
    return _PrefillOutput(logits, DynamicCache(ddp_cache_data=layers)), full_mask


def _expanded_cache(kv: list[tuple[Tensor, Tensor]], length: int, rows: int) -> Any:
    """A ``DynamicCache`` holding the first ``length`` cached columns, broadcast to ``rows`` rows (views)."""
    from transformers import DynamicCache

    return DynamicCache(
        ddp_cache_data=[
            (k[:, :, :length].expand(rows, -1, -1, -1), v[:, :, :length].expand(rows, -1, -1, -1))
            for k, v in kv
        ]
    )
