"""A faster output head for few-row decoding on CPU (issue #18, decode lever).

During decoding every forward computes the logits of ``B`` new tokens (``B`` = the batch, 1-8 rows)
against the whole vocabulary: ``logits = h @ W.T`` with ``W`` the ``(V, d)`` output embedding
(``V = 49152``, ``d = 576`` for SmolLM2: 113 MB of float32 streamed per token, more than the student's
six decoder layers together). For that shape oneDNN/MKL's few-row kernel (``F.linear``, what every
Hugging Face ``lm_head`` calls) streams ``W`` at a fraction of the machine's bandwidth, while the same
product written the other way round, ``(W @ h.T).T`` (a tall matrix times a few columns), runs at close
to it: the ``decode`` section of ``benchmarks/perf_round2.py`` measures both on the machine at hand
(its ``head`` table in ``docs/results/performance.md``, section 3: 2.0-6.2x faster at 2-8 rows, 1.0-1.2x at 1 and 16).

:func:`skinny_output_head` switches a model's output head to that product for the duration of a
``with`` block (the rollout engine's decode loop, the environment's incremental scorer), and only
where it is measured to help: float32 on CPU, no autocast, at most :data:`SKINNY_MAX_ROWS` rows and
at least ``2`` (one row is a matrix-vector product, already fast), a head much taller than wide.
Anything else (prefill, scoring, the training forward, GPUs, bf16) goes through ``F.linear``
unchanged. The two products are the same sum in a different order: equal to float32 rounding
(about 1e-6 relative), not bit-identical, so sampled tokens can differ from the unswitched head's
where two candidates are that close.

The head is switched only when it is a plain :class:`torch.nn.Linear` holding ordinary tensors: a
LoRA-wrapped head, an FSDP-sharded one (its parameters are ``DTensor``), a quantised or a custom
head keep their own forward. The switch shadows the module's ``forward`` on the instance and removes
the shadow on exit (also on error), so hooks, tied weights and the model's own post-processing of
logits (soft-capping, scaling) are untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Largest number of rows computed as ``(W @ h.T).T``: the few-row regime of decoding where the
#: benchmark measured it clearly faster (``benchmarks/results/perf_round2.json``, ``decode.head``).
SKINNY_MAX_ROWS = 8
#: Smallest number of rows (one row is a matrix-vector product either way).
SKINNY_MIN_ROWS = 2
#: The head must have at least this many output rows per input feature (a vocabulary head).
TALL_RATIO = 8

__all__ = [
    "SKINNY_MAX_ROWS",
    "SKINNY_MIN_ROWS",
    "skinny_linear",
    "skinny_output_head",
    "supports_skinny_head",
]


def _uses_transposed(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`skinny_linear` takes the transposed product for this input."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    return SKINNY_MIN_ROWS <= rows <= SKINNY_MAX_ROWS and weight.shape[0] >= TALL_RATIO * weight.shape[1]


def skinny_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, computed as ``(weight @ x.T).T`` in the few-row CPU regime.

    Args:
        x: ``(..., d)`` input.
        weight: ``(V, d)`` weight.
        bias: ``(V,)`` or None.

    Returns:
        ``(..., V)`` contiguous, equal to ``F.linear`` up to float32 rounding (identical outside the
        regime, where it *is* ``F.linear``).
    """
    if not _uses_transposed(x, weight):
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])  # (R, d)
    out = torch.mm(weight, flat.t()).t()  # (R, V), a view of the (V, R) product
    if bias is not None:
        out = out + bias
    return out.contiguous().reshape(*x.shape[:-1], weight.shape[0])


def supports_skinny_head(model: Any) -> bool:
    """Whether :func:`skinny_output_head` would switch ``model``'s output head.

    True for a plain :class:`torch.nn.Linear` head (exactly that class) with ordinary tensor
    parameters; False for anything else (no head, LoRA/quantised/custom heads, FSDP ``DTensor``).
    """
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if type(head) is not nn.Linear:
        return False
    return all(type(p) in (torch.Tensor, nn.Parameter) for p in head.parameters(recurse=False))


@contextmanager
def skinny_output_head(model: Any, enabled: bool = True) -> Iterator[bool]:
    """Within the block, ``model``'s output head computes its logits with :func:`skinny_linear`.

    Args:
        model: a causal LM (``get_output_embeddings()``).
        enabled: False makes the block a no-op (the engine's ``skinny_head=False``).

    Yields:
        Whether the head was switched (False: unsupported head, or ``enabled=False``).
    """
    if not enabled or not supports_skinny_head(model):
        yield False
        return
    head: nn.Linear = model.get_output_embeddings()
    if "forward" in vars(head):  # already switched (nested blocks): leave it to the outer one
        yield True
        return

    def forward(x: Tensor) -> Tensor:
        return skinny_linear(x, head.weight, head.bias)

    head.forward = forward  # type: ignore[method-assign]  # shadows nn.Linear.forward on this instance
    try:
        yield True
    finally:
        del head.forward
