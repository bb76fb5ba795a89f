"""Pre-packed (oneDNN blocked-layout) weights for the few-row products of decoding on CPU (issue #18).

A decode step multiplies ``B`` rows (the batch, 1-16) by every weight of the model; its time is the
time to stream the weights from memory. On CPU both ``F.linear`` (MKL's few-row path) and the
transposed product of :mod:`rl_distill.rollout.skinny_head` stream a plain row-major weight at a
fraction of the machine's bandwidth. oneDNN can reorder a weight once into the blocked layout its
inner-product kernel reads fastest ("packing", what PyTorch's ``torch.compile`` freezing does for
CPU inference); the product with the packed weight then runs 1.5-4x faster for 1-16 rows, in float32
and in bfloat16 (the ``decode`` section of ``benchmarks/perf_round2.py``, ``packed`` columns of the
head and layer tables in ``docs/results/performance.md``, section 3).

:class:`PackedWeights` holds the packed copies: one per plain :class:`torch.nn.Linear`, made on
first use and made again when the weight changes (a new tensor, or an in-place update such as an
optimiser step or ``load_state_dict``: the key is the weight's storage pointer and version counter).
A change made through ``weight.data`` bypasses the version counter: call :meth:`PackedWeights.clear`
after one. A packed copy costs the weight's bytes again (in the compute dtype) and its making costs
more than a copy of it (about 0.1 s for the main job's 6-layer student, 0.35 s for the SmolLM2
teacher), so it pays only where one packing serves many decode steps: the rollout engine packs frozen
models (the teacher sampling, the environment's incremental teacher) once and keeps the copy, and
never packs a trainable student in ``generate`` (its weights change at every update; packing it per
call measured slower end to end in float32, 0.88x the throughput, and within the noise in bf16
autocast, 1.08x with 0.95-1.17x over the repeats, for 64 MiB more peak memory:
``benchmarks/results/perf_round2_packed_student.json``).

:meth:`PackedWeights.applies` is the regime: on CPU, no gradient needed (the decode runs under
``no_grad``/``inference_mode``; a training forward never takes this path), 1 to :data:`PACKED_MAX_ROWS`
rows, float32 or bfloat16, and under CPU autocast to bfloat16 the bfloat16 product of a bfloat16
copy of a float32 weight (what autocast's ``F.linear`` computes, without casting the weight at every
call). Everything else goes through the caller's product unchanged. The packed product is the same
sum in another order: equal to ``F.linear`` to rounding (float32: about 1e-6 relative; bfloat16
products accumulate in float32 on both paths), not bit-identical, so a sampled token can differ
where two candidates are that close.
"""

from __future__ import annotations

import weakref
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn

#: Largest number of rows a packed product is used for (decoding batches; the benchmark measured it
#: faster than both other products for 1 to 16 rows).
PACKED_MAX_ROWS = 16
#: In float32 the decoder layers' transposed product (``skinny_head.skinny_decoder_layers``) was
#: measured faster than the packed one at 2 rows; the packed product takes over from this many rows.
PACKED_MIN_FP32_LAYER_ROWS = 3
#: The row count oneDNN is told to expect when packing (its layout choice for decoding batches).
PACK_ROWS_HINT = 8

__all__ = [
    "PACKED_MAX_ROWS",
    "PACKED_MIN_FP32_LAYER_ROWS",
    "PackedWeights",
    "pack_weight",
    "packed_product",
    "packing_available",
    "trainable",
]


@cache
def packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this PyTorch build can pack and multiply ``dtype`` weights with oneDNN on this CPU.

    Checked once per dtype with a tiny product against ``F.linear``.
    """
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        weight = torch.arange(12, dtype=torch.float32).reshape(3, 4).to(dtype)
        x = torch.ones(2, 4, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool(torch.equal(out.float(), torch.nn.functional.linear(x, weight).float()))


def pack_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """A packed copy of an ``(out, in)`` weight for products in ``dtype`` (see :func:`packed_product`)."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous(), PACK_ROWS_HINT)


def packed_product(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for 2-D ``x`` (rows, in) and ``packed = pack_weight(weight, x.dtype)``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def trainable(model: Any) -> bool:
    """Whether ``model`` is a module with a parameter that requires a gradient (its weights may change).

    Packed copies are made only for models where this is False (frozen: the teacher).
    """
    return isinstance(model, nn.Module) and any(p.requires_grad for p in model.parameters())


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """The dtype of the packed product for this call, or None when it is not taken (see the module docstring)."""
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return None
        ok = x.dtype in (torch.float32, torch.bfloat16) and weight.dtype in (torch.float32, torch.bfloat16)
        return torch.bfloat16 if ok else None
    if x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    return x.dtype


class PackedWeights:
    """oneDNN-packed copies of plain ``nn.Linear`` weights, made on first use, remade when a weight changes.

    Example::

        packed = PackedWeights()
        with torch.no_grad():
            y = packed.linear(layer, x)  # == F.linear(x, layer.weight, layer.bias) to rounding

    Attributes:
        packs: how many packed copies have been made (a new weight, a changed one, a new dtype).
    """

    def __init__(self) -> None:
        self._store: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], Tensor, Tensor | None]]
        self._store = weakref.WeakKeyDictionary()
        self.packs = 0

    def __len__(self) -> int:
        return len(self._store)

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed copies (their logical size; the blocked layout may pad a little)."""
        return sum(p.numel() * p.element_size() for _, p, _ in self._store.values())

    def clear(self) -> None:
        """Drop every packed copy (they are remade on next use)."""
        self._store.clear()

    @staticmethod
    def applies(x: Tensor, weight: Tensor, *, head: bool = True) -> bool:
        """Whether :meth:`linear` takes the packed product for this input (the regime of the module docstring).

        ``head``: the output head (any row count of the regime); False: a decoder layer (float32 from
        :data:`PACKED_MIN_FP32_LAYER_ROWS` rows, where the transposed product was faster below).
        """
        if x.device.type != "cpu" or weight.device.type != "cpu" or x.dim() < 1:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return False
        dtype = _compute_dtype(x, weight)
        if dtype is None or not packing_available(dtype):
            return False
        rows = x.numel() // max(x.shape[-1], 1)
        low = 1 if head or dtype != torch.float32 else PACKED_MIN_FP32_LAYER_ROWS
        return low <= rows <= PACKED_MAX_ROWS

    def packed(self, module: nn.Linear, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """The packed weight (and the bias in ``dtype``) of ``module`` for products in ``dtype``."""
        weight, bias = module.weight, module.bias
        try:
            version = weight._version
        except RuntimeError:  # an inference tensor has no version counter (it cannot change outside one)
            version = -1
        key = (weight.data_ptr(), version, tuple(weight.shape), weight.dtype, dtype)
        hit = self._store.get(module)
        if hit is not None and hit[0] == key:
            return hit[1], hit[2]
        packed = pack_weight(weight, dtype)
        packed_bias = None if bias is None else bias.detach().to(dtype).contiguous()
        self._store[module] = (key, packed, packed_bias)
        self.packs += 1
        return packed, packed_bias

    def linear(self, module: nn.Linear, x: Tensor) -> Tensor:
        """``module(x)`` with the packed weight (call only where :meth:`applies`).

        Returns:
            ``(..., out_features)`` in the compute dtype (bfloat16 under bf16 autocast, as autocast's
            ``F.linear``), equal to ``F.linear`` to rounding.
        """
        dtype = _compute_dtype(x, module.weight)
        if dtype is None:
            raise ValueError(f"no packed product for a {x.dtype} input and a {module.weight.dtype} weight")
        packed, bias = self.packed(module, dtype)
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        out = packed_product(flat, packed, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])
