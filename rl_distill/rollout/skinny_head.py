"""Faster few-row products for decoding on CPU: the output head and the decoder layers (issue #18).

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

The decoder layers' linear maps (attention projections, MLP) have the same problem at 2-4 rows:
there ``F.linear`` ran 1.5-4x slower than the transposed product for every SmolLM2 layer shape,
and with the head switched they were most of a decode step. :func:`skinny_decoder_layers` switches
every plain ``nn.Linear`` of the model other than the head, for 2 to :data:`SKINNY_LAYER_MAX_ROWS`
rows only (at 6-8 rows neither product won consistently), under the same conditions (float32, CPU,
no autocast, ordinary tensors), with the same scoping and the same float32-rounding caveat.

Both switches also take the oneDNN-packed product (:mod:`rl_distill.rollout.packed`, the engine's
``packed_weights``): given a :class:`~rl_distill.rollout.packed.PackedWeights`, a switched map uses it
wherever it applies (1-16 rows, float32 or bfloat16, no gradient; float32 decoder layers from 3
rows), else the transposed product in its regime, else ``F.linear``. It was measured faster than both
for the head at every row count and for the layers from 3 rows, and it is the only one of the three
that also speeds up bfloat16 (and bf16 autocast, where ``F.linear`` casts every weight per call).

The head's input when scoring: Hugging Face models keep the logits of the last ``k`` positions
(``logits_to_keep``) by slicing the hidden states, ``h[:, -k:, :]``, which hands the head a view whose
outer strides are those of the whole sequence. On CPU, ``F.linear`` with such an input can fall off
its fast path: in bfloat16 many times slower for every slice measured, including a one-position
slice (``logits_to_keep=1``) that PyTorch calls contiguous; in float32 slower for the many-position
scoring slice and not for one position (the head-input table of ``docs/results/performance.md``,
section 3, measured by ``measure_head_input`` in ``benchmarks/perf_round2.py``). The hook is not
limited to CPU (on other devices the copy is equally harmless). :func:`dense_head_input`
makes the head's input densely strided for the duration of a block (a forward pre-hook that copies
a strided input, a few kilobytes per row); the engine's scoring, training and prefill forwards run
inside it. The product is the same computation on the same numbers (bit-identical where the two
paths reach the same kernel; otherwise equal to rounding).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl_distill.rollout.packed import PACKED_MAX_ROWS, PackedWeights

#: Largest number of rows computed as ``(W @ h.T).T`` by the output head: the few-row regime of
#: decoding where the benchmark measured it clearly faster (``benchmarks/results/perf_round2.json``,
#: ``decode.head``).
SKINNY_MAX_ROWS = 8
#: Smallest number of rows (one row is a matrix-vector product either way).
SKINNY_MIN_ROWS = 2
#: The head must have at least this many output rows per input feature (a vocabulary head).
TALL_RATIO = 8
#: Largest number of rows computed as ``(W @ h.T).T`` by the decoder layers' linear maps (attention
#: projections, MLP): at 2-4 rows the transposed product was 1.5-4x faster than ``F.linear`` for every
#: SmolLM2 layer shape (576x576, 192x576, 1536x576, 576x1536); at 6-8 rows neither won consistently
#: (``decode`` section of ``benchmarks/perf_round2.py``), so those keep ``F.linear``.
SKINNY_LAYER_MAX_ROWS = 4

__all__ = [
    "SKINNY_LAYER_MAX_ROWS",
    "SKINNY_MAX_ROWS",
    "SKINNY_MIN_ROWS",
    "dense_head_input",
    "skinny_decoder_layers",
    "skinny_linear",
    "skinny_output_head",
    "supports_skinny_head",
]


def _uses_transposed(x: Tensor, weight: Tensor, head: bool = True) -> bool:
    """Whether :func:`skinny_linear` takes the transposed product for this input.

    ``head``: the output head's regime (2 to :data:`SKINNY_MAX_ROWS` rows, a tall weight); False: a
    decoder layer's (2 to :data:`SKINNY_LAYER_MAX_ROWS` rows, any shape). The limits are read at call
    time (a benchmark may change them).
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    if not head:
        return SKINNY_MIN_ROWS <= rows <= SKINNY_LAYER_MAX_ROWS
    return SKINNY_MIN_ROWS <= rows <= SKINNY_MAX_ROWS and weight.shape[0] >= TALL_RATIO * weight.shape[1]


def skinny_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, head: bool = True) -> Tensor:
    """``F.linear(x, weight, bias)``, computed as ``(weight @ x.T).T`` in the few-row CPU regime.

    Args:
        x: ``(..., d)`` input.
        weight: ``(V, d)`` weight.
        bias: ``(V,)`` or None.
        head: use the output head's regime (True) or a decoder layer's (False); see
            :data:`SKINNY_MAX_ROWS` and :data:`SKINNY_LAYER_MAX_ROWS`.

    Returns:
        ``(..., V)`` contiguous, equal to ``F.linear`` up to float32 rounding (identical outside the
        regime, where it *is* ``F.linear``).
    """
    if not _uses_transposed(x, weight, head):
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])  # (R, d)
    out = torch.mm(weight, flat.t()).t()  # (R, V), a view of the (V, R) product
    if bias is not None:
        out = out + bias
    return out.contiguous().reshape(*x.shape[:-1], weight.shape[0])


def _plain_linear(module: Any) -> bool:
    """Exactly :class:`torch.nn.Linear` (no subclass) with ordinary tensor parameters (not FSDP's ``DTensor``)."""
    if type(module) is not nn.Linear:
        return False
    return all(type(p) in (torch.Tensor, nn.Parameter) for p in module.parameters(recurse=False))


def supports_skinny_head(model: Any) -> bool:
    """Whether :func:`skinny_output_head` would switch ``model``'s output head.

    True for a plain :class:`torch.nn.Linear` head (exactly that class) with ordinary tensor
    parameters; False for anything else (no head, LoRA/quantised/custom heads, FSDP ``DTensor``).
    """
    getter = getattr(model, "get_output_embeddings", None)
    return _plain_linear(getter() if callable(getter) else None)


def _few_row_forward(
    layer: nn.Linear,
    input: Tensor,  # noqa: A002 - nn.Linear.forward's name
    *,
    head: bool,
    transposed: bool,
    packed: PackedWeights | None,
) -> Tensor:
    """A switched linear map's forward: packed product, else transposed (if ``transposed``), else ``F.linear``.

    The packed product (:mod:`rl_distill.rollout.packed`) where it applies; else :func:`skinny_linear`
    in its regime.
    """
    if packed is not None and packed.applies(input, layer.weight, head=head):
        return packed.linear(layer, input)
    if transposed:
        return skinny_linear(input, layer.weight, layer.bias, head=head)
    return F.linear(input, layer.weight, layer.bias)


@contextmanager
def skinny_output_head(
    model: Any, enabled: bool = True, *, packed: PackedWeights | None = None
) -> Iterator[bool]:
    """Within the block, ``model``'s output head computes its logits with the few-row products.

    Args:
        model: a causal LM (``get_output_embeddings()``).
        enabled: the transposed product (:func:`skinny_linear`); False: not (the engine's
            ``skinny_head=False``).
        packed: where given, the packed product (:mod:`rl_distill.rollout.packed`) wherever it
            applies, before the transposed one; None: not used. With ``enabled=False`` and no
            ``packed`` the block is a no-op.

    Yields:
        Whether the head was switched (False: unsupported head, or nothing to switch to).
    """
    if not (enabled or packed is not None) or not supports_skinny_head(model):
        yield False
        return
    head: nn.Linear = model.get_output_embeddings()
    if "forward" in vars(head):  # already switched (nested blocks): leave it to the outer one
        yield True
        return

    # nn.Linear.forward's signature (one argument, named ``input``), bound to this head.
    forward = partial(_few_row_forward, head, head=True, transposed=enabled, packed=packed)
    head.forward = forward  # type: ignore[method-assign]  # shadows nn.Linear.forward on this instance
    try:
        yield True
    finally:
        del head.forward


@contextmanager
def skinny_decoder_layers(
    model: Any, enabled: bool = True, *, rows: int | None = None, packed: PackedWeights | None = None
) -> Iterator[int]:
    """Within the block, ``model``'s decoder-layer linear maps use :func:`skinny_linear` (layer regime).

    Every plain :class:`torch.nn.Linear` of ``model`` outside its output head (attention projections,
    MLP; under LoRA the frozen base layers and the adapter matrices, which are plain ``nn.Linear``
    too) is switched; the output head and everything inside it (a LoRA-wrapped head's base layer)
    are left to :func:`skinny_output_head`; subclasses, quantised and FSDP-sharded layers keep their
    own forward. Outside the few-row regime (the prefill, scoring, training forwards, bf16, autocast)
    the switched layers call ``F.linear`` exactly as before.

    The switch is an instance attribute for the duration of the block: do not copy, pickle or save
    the model inside it (a deep copy would keep the switched forwards), and do not enter it for one
    model from two threads at once.

    Args:
        model: any module (anything else, e.g. a custom sampler object, is left alone).
        enabled: the transposed product; False: not (the engine's ``skinny_layers=False``).
        rows: the rows of the forwards the block will run, when known: outside the layer regime (2 to
            :data:`SKINNY_LAYER_MAX_ROWS`, or 1 to :data:`~rl_distill.rollout.packed.PACKED_MAX_ROWS`
            with ``packed``) nothing is switched, which saves walking the model and shadowing every
            layer where no product would change (a cost paid per token by the environment's
            incremental scorer).
        packed: where given, the packed product (:mod:`rl_distill.rollout.packed`) wherever it
            applies, before the transposed one; None: not used. With ``enabled=False`` and no
            ``packed`` the block is a no-op.

    Yields:
        The number of layers switched by this block (0 when disabled, outside the row regime, or
        inside an enclosing block that already switched them).
    """
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    skip = set(head.modules()) if isinstance(head, nn.Module) else set()
    switched: list[nn.Linear] = []
    transposed = enabled and (rows is None or SKINNY_MIN_ROWS <= rows <= SKINNY_LAYER_MAX_ROWS)
    if packed is not None and rows is not None and not 1 <= rows <= PACKED_MAX_ROWS:
        packed = None
    if (transposed or packed is not None) and isinstance(model, nn.Module):  # a custom sampler is left alone
        for module in model.modules():
            if module in skip or not _plain_linear(module) or "forward" in vars(module):
                continue
            # nn.Linear.forward's signature (one argument, named ``input``), bound to this layer.
            module.forward = partial(  # type: ignore[method-assign]
                _few_row_forward, module, head=False, transposed=transposed, packed=packed
            )
            switched.append(module)
    try:
        yield len(switched)
    finally:
        for module in switched:
            del module.forward


def _output_head(model: Any) -> nn.Module | None:
    """``model``'s output head (``get_output_embeddings()``; through a DDP wrapper's ``module``), or None."""
    for owner in (model, getattr(model, "module", None)):
        getter = getattr(owner, "get_output_embeddings", None)
        if callable(getter):
            head = getter()
            return head if isinstance(head, nn.Module) else None
    return None


def _dense_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides of a densely packed (row-major) tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _densify_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook of :func:`dense_head_input`: a strided first argument is copied densely packed."""
    if not args or not isinstance(args[0], Tensor):
        return None
    x = args[0]
    if x.dim() < 2 or x.numel() == 0 or x.stride() == _dense_strides(x.shape):
        return None
    return (x.clone(memory_format=torch.contiguous_format), *args[1:])


@contextmanager
def dense_head_input(model: Any, enabled: bool = True) -> Iterator[bool]:
    """Within the block, ``model``'s output head receives densely strided input (see the module docstring).

    A forward pre-hook on the head (any head module: plain, LoRA-wrapped, sharded; reached through
    ``get_output_embeddings``, also under a DDP wrapper) copies an input whose strides are not the
    densely packed ones, e.g. the ``h[:, -k:, :]`` slice of ``logits_to_keep``; the hook is removed
    on exit (also on error). Differentiable (the copy is a ``clone``); nested blocks are harmless
    (the inner hook sees a dense input).

    Args:
        model: a causal LM; anything without an output head (a custom sampler) is left alone.
        enabled: False makes the block a no-op (the engine's ``dense_head_input=False``).

    Yields:
        Whether a hook was installed.
    """
    head = _output_head(model) if enabled else None
    if head is None:
        yield False
        return
    handle = head.register_forward_pre_hook(_densify_input)
    try:
        yield True
    finally:
        handle.remove()
