"""A fused one-token decode step for Llama-family models on CPU (issue #18).

A decode step at ``B`` = 4-8 rows is a few milliseconds of products per layer and, through the
Hugging Face modules, as much again of small operations around them: the 4-D mask built anew, three
separate q/k/v products, the rotary embedding applied to q and k apart (each with its own
``rotate_half`` copies), a norm of five operations, a module call per linear map.
:class:`FusedDecodeStep` runs the same computation from the model's own weights, leaner:

- one packed product for q, k and v together and one for the MLP's gate and up maps (their weights
  concatenated when packed), one for ``o_proj``, ``down_proj`` and the head; in float32 the native
  few-row kernel (:mod:`rl_distill.rollout.native`) where it builds, else oneDNN's packed product
  (:mod:`rl_distill.rollout.packed`, also for bfloat16);
- the rotary embedding applied to q and k in one expression; the norms as ``F.rms_norm``;
- the keys and values appended in place to the model's own ``DynamicCache`` layers (so row restarts,
  splices and crops of :mod:`rl_distill.rollout.incremental` work on it unchanged) and one
  scaled-dot-product attention per layer with grouped query heads, under one additive mask per step;
- in float32 with the native kernel, all of that for every decoder layer in one native call per step
  (``decode_layers_f32``: no PyTorch operation between the embedding and the final norm).

Who uses it: the environment's incremental teacher (packed once: the teacher is frozen), teacher
sampling, and the trained student's ``generate`` (:class:`~rl_distill.rollout.RolloutEngine`: packed
anew in each call after an update, for at least :data:`MIN_TOKENS_TO_PACK_TRAINED` new tokens, and
released after the call). Measured numbers: ``docs/results/performance.md``, sections 6 and 7.

It applies only where it is exact to rounding: a model whose decoder is built of Transformers'
Llama modules (``LlamaForCausalLM``: SmolLM2, TinyLlama, Llama 2/3 and the kept-layer students of
:func:`rl_distill.models.make_kept_layer_student`) with plain ``nn.Linear`` maps, SiLU, full attention,
on CPU, in float32 or bfloat16 where this build packs that dtype
(:func:`~rl_distill.rollout.packed.packing_available`), outside autocast (under CPU autocast the
model's own forward runs, in the autocast dtype). :func:`unsupported_reason` says why another model
falls back to its own ``forward``. The packed copies are remade when a weight changes (storage
pointer or version counter, as :class:`~rl_distill.rollout.packed.PackedWeights`); they cost the
weights' bytes again while kept.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl_distill.rollout.native import DecodeLayer, FewRowKernel, few_row_kernel
from rl_distill.rollout.packed import pack_weight, packed_product, packing_available

__all__ = ["MIN_TOKENS_TO_PACK_TRAINED", "FusedDecodeStep", "FusedSteps", "unsupported_reason"]

#: A trainable model's ``generate`` takes the fused step (packing its weights anew, about 0.1 s for
#: the main job's 6-layer student) only when it decodes at least this many new tokens: each fused
#: token saved about 7 ms there, so shorter decodes would not repay the packing.
MIN_TOKENS_TO_PACK_TRAINED = 16


def _llama_classes() -> tuple[type, ...] | None:
    try:
        from transformers.models.llama.modeling_llama import (
            LlamaAttention,
            LlamaDecoderLayer,
            LlamaMLP,
            LlamaRMSNorm,
        )
    except ImportError:  # pragma: no cover - Transformers without Llama
        return None
    return LlamaDecoderLayer, LlamaAttention, LlamaMLP, LlamaRMSNorm


def unsupported_reason(model: Any) -> str | None:
    """Why :class:`FusedDecodeStep` does not apply to ``model`` (None: it does).

    Args:
        model: a causal LM (any object; only a Llama-family model on CPU qualifies).
    """
    classes = _llama_classes()
    if classes is None:
        return "this Transformers has no Llama modules"
    decoder_cls, attention_cls, mlp_cls, norm_cls = classes
    if not isinstance(model, nn.Module):
        return f"{type(model).__name__} is not a torch module"
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    head = getattr(model, "lm_head", None)
    if layers is None or len(layers) == 0 or type(head) is not nn.Linear:
        return f"{type(model).__name__} has no model.layers / plain lm_head (not a Llama-style causal LM)"
    if not all(hasattr(body, name) for name in ("embed_tokens", "norm", "rotary_emb")):
        return f"{type(model).__name__}.model lacks embed_tokens, norm or rotary_emb"
    if type(body.norm) is not norm_cls or type(body.embed_tokens) is not nn.Embedding:
        return "the final norm or the embedding is not Llama's"
    cfg = model.config
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(cfg, 'hidden_act', None)!r} (only silu)"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    if getattr(cfg, "sliding_window", None) is not None or any(
        kind != "full_attention" for kind in (getattr(cfg, "layer_types", None) or [])
    ):
        return "sliding-window attention"
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if (
            type(layer) is not decoder_cls
            or type(attn) is not attention_cls
            or type(mlp) is not mlp_cls
            or type(layer.input_layernorm) is not norm_cls
            or type(layer.post_attention_layernorm) is not norm_cls
        ):
            return f"layer {i} is not built of Transformers' Llama modules"
        maps = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(m) is not nn.Linear for m in maps):
            return (
                f"layer {i} has a linear map that is not a plain nn.Linear (an adapter or a quantised layer)"
            )
    weight = head.weight
    if weight.device.type != "cpu":
        return f"the model is on {weight.device.type} (the fused step is for CPU)"
    if any(p.dtype != weight.dtype for p in model.parameters()):
        return "mixed parameter dtypes"
    if not packing_available(weight.dtype):
        return f"this PyTorch build cannot pack {weight.dtype} weights on this CPU"
    return None


def _version(tensor: Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor has no version counter
        return -1


def _cat_bias(*linears: nn.Linear) -> Tensor | None:
    if all(m.bias is None for m in linears):
        return None
    return torch.cat(
        [m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears]
    ).contiguous()


class _Matrix:
    """One packed linear map of the step: the native float32 kernel where given, else oneDNN's product."""

    __slots__ = ("bias", "kernel", "out_features", "packed")

    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype, kernel: FewRowKernel | None):
        self.kernel = kernel if dtype == torch.float32 else None
        self.out_features = int(weight.shape[0])
        self.packed = self.kernel.pack(weight) if self.kernel is not None else pack_weight(weight, dtype)
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()

    @property
    def nbytes(self) -> int:
        tensors = [self.packed] + ([] if self.bias is None else [self.bias])
        return sum(t.numel() * t.element_size() for t in tensors)

    def __call__(self, x: Tensor) -> Tensor:
        if self.kernel is not None:
            return self.kernel.product(x, self.packed, self.out_features, self.bias)
        return packed_product(x, self.packed, self.bias)


class FusedDecodeStep:
    """The one-token decode step of a Llama-family model on CPU, fused (see the module docstring).

    Example::

        step = FusedDecodeStep(teacher)  # raises ValueError if unsupported_reason(teacher)
        logits = step(tokens, positions, attention_mask, cache)  # (B, V_model); cache grows by one

    Args:
        model: a model for which :func:`unsupported_reason` is None.
        native: float32 products with the native few-row kernel
            (:func:`~rl_distill.rollout.native.few_row_kernel`) where it is available; False (or
            where it is not): oneDNN's packed product. bfloat16 always takes oneDNN's.
        native_layers: with the native kernel, run every decoder layer of a step in one native call
            (norms, products, rotary embedding, cache write, attention, SiLU and residual adds:
            ``decode_layers_f32``); False: only the products are native, the rest PyTorch operations.

    Attributes:
        packs: how many times the packed copies were made (1 unless a weight changed).
        kernel: the native kernel used for float32 products, or None.

    Raises:
        ValueError: naming the reason when the model is not supported.
    """

    def __init__(self, model: nn.Module, *, native: bool = True, native_layers: bool = True) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"no fused decode step for this model: {reason}")
        self.model = model
        self.packs = 0
        self.kernel: FewRowKernel | None = few_row_kernel() if native else None
        self.native_layers = native_layers
        self._params = [p for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0])]
        self._key: tuple[Any, ...] | None = None
        self._layers: list[tuple[_Matrix, _Matrix, _Matrix, _Matrix]] = []
        self._head: _Matrix | None = None
        self._norms: list[tuple[tuple[Tensor, float], tuple[Tensor, float]]] = []
        self._final_norm: tuple[Tensor, float] | None = None
        # float32 with the native kernel: every decoder layer in one native call (decode_layers_f32)
        self._native_layers: ctypes.Array[DecodeLayer] | None = None
        cfg = model.config
        attn = model.model.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(cfg.num_key_value_heads)
        self.scaling = float(attn.scaling)
        self.intermediate = int(model.model.layers[0].mlp.gate_proj.out_features)

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed copies (0 before the first step)."""
        matrices = [m for layer in self._layers for m in layer] + ([self._head] if self._head else [])
        return sum(m.nbytes for m in matrices)

    def release(self) -> None:
        """Drop the packed copies (remade on the next step)."""
        self._layers, self._head, self._key, self._native_layers = [], None, None, None

    def _signature(self) -> tuple[Any, ...]:
        return tuple((p.data_ptr(), _version(p), p.dtype, p.device) for p in self._params)

    def current(self) -> bool:
        """Whether the packed copies exist and match the model's weights (no repacking needed)."""
        return self._key is not None and self._key == self._signature()

    @torch.no_grad()
    def _prepare(self) -> None:
        key = self._signature()
        if key == self._key:
            return
        self.release()
        dtype, kernel = self.model.lm_head.weight.dtype, self.kernel
        layers = []
        for layer in self.model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            layers.append(
                (
                    _Matrix(qkv, _cat_bias(attn.q_proj, attn.k_proj, attn.v_proj), dtype, kernel),
                    _Matrix(attn.o_proj.weight, attn.o_proj.bias, dtype, kernel),
                    _Matrix(gate_up, _cat_bias(mlp.gate_proj, mlp.up_proj), dtype, kernel),
                    _Matrix(mlp.down_proj.weight, mlp.down_proj.bias, dtype, kernel),
                )
            )
            del qkv, gate_up
        self._layers = layers
        self._head = _Matrix(self.model.lm_head.weight, self.model.lm_head.bias, dtype, kernel)
        # The norms' weights and epsilons, looked up once (module attribute lookups cost per step).
        self._norms = [
            (
                (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
            )
            for layer in self.model.model.layers
        ]
        norm = self.model.model.norm
        self._final_norm = (norm.weight, norm.variance_epsilon)
        contiguous = all(w.is_contiguous() for pair in self._norms for w, _ in pair)
        if kernel is not None and dtype == torch.float32 and self.native_layers and contiguous:
            self._native_layers = self._native_table()  # else the PyTorch operations around the products
        self._key = key
        self.packs += 1

    def _native_table(self) -> ctypes.Array[DecodeLayer]:
        """The native kernel's per-layer pointers (weights kept alive by ``self._layers`` and the model).

        The norm weights are read in place, so they must be contiguous (checked by the caller).
        """

        def ptr(t: Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        table = (DecodeLayer * len(self._layers))()
        for entry, (qkv, o, gate_up, down), ((w_in, eps_in), (w_post, eps_post)) in zip(
            table, self._layers, self._norms
        ):
            entry.norm_in, entry.eps_in = w_in.data_ptr(), eps_in
            entry.norm_post, entry.eps_post = w_post.data_ptr(), eps_post
            entry.qkv, entry.qkv_bias = qkv.packed.data_ptr(), ptr(qkv.bias)
            entry.o, entry.o_bias = o.packed.data_ptr(), ptr(o.bias)
            entry.gate_up, entry.gate_up_bias = gate_up.packed.data_ptr(), ptr(gate_up.bias)
            entry.down, entry.down_bias = down.packed.data_ptr(), ptr(down.bias)
        return table

    @staticmethod
    def _norm(h: Tensor, norm: tuple[Tensor, float]) -> Tensor:
        """Llama's RMSNorm (weight, epsilon): in float32, cast back, times the weight (``LlamaRMSNorm``)."""
        weight, eps = norm
        if h.dtype == torch.float32:
            return F.rms_norm(h, (h.shape[-1],), weight, eps)
        return weight * F.rms_norm(h.float(), (h.shape[-1],), None, eps).to(h.dtype)

    @torch.no_grad()
    def __call__(
        self, tokens: Tensor, positions: Tensor, attention_mask: Tensor, cache: Any, *, check: bool = True
    ) -> Tensor:
        """Feed one token per row and return the next-token logits; appends to ``cache`` in place.

        Args:
            tokens: ``(B,)`` token ids.
            positions: ``(B,)`` their position ids.
            attention_mask: ``(B, C + 1)``, nonzero on the columns each row attends to: the ``C``
                cached ones and, last, the new token's.
            cache: the model's ``DynamicCache`` over the ``C`` columns (from a prefill of this model).
            check: compare the packed copies with the model's weights first and remake them if a
                weight changed; False only right after :meth:`FusedSteps.get` returned this step (it
                checked).

        Returns:
            ``(B, V_model)`` logits in the model's dtype, equal to the model's ``forward`` to rounding.
        """
        if check or self._key is None:
            self._prepare()
        if self._native_layers is not None:
            return self._native_step(tokens, positions, attention_mask, cache)
        body = self.model.model
        bsz = tokens.shape[0]
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        h = body.embed_tokens(tokens[:, None])  # (B, 1, H)
        cos, sin = body.rotary_emb(h, positions[:, None])  # (B, 1, D) each, in h's dtype
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, 1, D): broadcast over heads
        # One additive mask for every layer (SDPA would convert a boolean one in each).
        mask = _additive_mask(attention_mask, h.dtype)[:, None, None, :]  # (B, 1, 1, C + 1)
        half = dim // 2
        for (norm_in, norm_post), cache_layer, (qkv_map, o_map, gate_up_map, down_map) in zip(
            self._norms, cache.layers, self._layers
        ):
            x = self._norm(h, norm_in)
            qkv = qkv_map(x[:, 0])  # (B, (heads + 2 kv_heads) D)
            qk = qkv[:, : (heads + kv_heads) * dim].view(bsz, heads + kv_heads, 1, dim)
            rotated = torch.cat([-qk[..., half:], qk[..., :half]], dim=-1)
            qk = qk * cos + rotated * sin
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[:, (heads + kv_heads) * dim :].view(bsz, kv_heads, 1, dim)
            keys, values = _append(cache_layer, k, v)
            attn = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=heads != kv_heads
            )  # (B, heads, 1, D)
            h = h + o_map(attn.reshape(bsz, heads * dim))[:, None]
            x = self._norm(h, norm_post)
            gate, up = gate_up_map(x[:, 0]).chunk(2, dim=-1)
            h = h + down_map(F.silu(gate) * up)[:, None]
        h = self._norm(h, self._final_norm)
        assert self._head is not None
        return self._head(h[:, 0])

    def _native_step(self, tokens: Tensor, positions: Tensor, attention_mask: Tensor, cache: Any) -> Tensor:
        """The float32 step with every decoder layer in one native call (same contract as ``__call__``)."""
        assert self._native_layers is not None and self._head is not None and self._final_norm is not None
        body = self.model.model
        bsz, dim = tokens.shape[0], self.head_dim
        h = body.embed_tokens(tokens).contiguous()  # (B, H): a new tensor, updated in place by the kernel
        cos, sin = body.rotary_emb(h, positions[:, None])  # (B, 1, D) each
        cos, sin = cos.reshape(bsz, dim).contiguous(), sin.reshape(bsz, dim).contiguous()
        mask = _additive_mask(attention_mask, torch.float32)  # (B, C + 1)
        table, used, buffers = self._native_layers, None, []
        for entry, cache_layer in zip(table, cache.layers):
            keys, values, columns = _reserve(cache_layer, torch.float32)
            if used is None:
                used = columns
            if columns != used or keys.shape[0] != bsz or mask.shape[1] != used + 1:
                raise ValueError(
                    f"cache layers of {columns} and {used} columns, {keys.shape[0]} rows, a mask of "
                    f"{tuple(mask.shape)}: not one step of {bsz} rows"
                )
            # Set at every step: a remade buffer may reuse a freed one's address with another capacity.
            entry.keys, entry.values, entry.cap = keys.data_ptr(), values.data_ptr(), keys.shape[2]
            buffers.append((cache_layer, keys, values))
        assert used is not None and self.kernel is not None
        self.kernel.decode_layers(
            table,
            h,
            heads=self.num_heads,
            kv_heads=self.num_kv_heads,
            head_dim=dim,
            intermediate=self.intermediate,
            cos=cos,
            sin=sin,
            mask=mask,
            used=used,
            scaling=self.scaling,
        )
        for cache_layer, keys, values in buffers:  # the kernel wrote column `used` of each
            cache_layer.keys, cache_layer.values = keys[:, :, : used + 1], values[:, :, : used + 1]
        return self._head(self._norm(h, self._final_norm))


def _additive_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where ``attention_mask`` is nonzero, -inf elsewhere (one mask for every layer of a step)."""
    return torch.zeros(attention_mask.shape, dtype=dtype).masked_fill_(attention_mask == 0, float("-inf"))


#: Spare columns allocated when a cache layer's buffer is (re)made (see :func:`_append`).
SPARE_COLUMNS = 64


def _reserve(cache_layer: Any, dtype: torch.dtype) -> tuple[Tensor, Tensor, int]:
    """The key and value buffers of a ``DynamicCache`` layer with room for one more column, and its columns.

    The layer's ``keys``/``values`` are kept as views of buffers with spare columns (kept on the
    layer), so that a step writes one column instead of copying the whole cache (``torch.cat``).
    Whenever the layer's tensors are not exactly the leading columns of its buffers (a prefill, a row
    restart, a crop, any assignment by other code) or the buffers are full, new contiguous
    ``(B, H, C + SPARE_COLUMNS, D)`` buffers are made from the layer's current tensors. Other code
    sees ordinary ``(B, H, C, D)`` tensors.
    """
    keys, values = cache_layer.keys, cache_layer.values
    used = keys.shape[2]
    buffers = getattr(cache_layer, "_rl_distill_buffers", None)
    fits = (
        buffers is not None
        and buffers[0].shape[2] > used
        and keys.data_ptr() == buffers[0].data_ptr()
        and values.data_ptr() == buffers[1].data_ptr()
        and keys.shape[:2] == buffers[0].shape[:2]
        and keys.stride() == buffers[0].stride()
        and values.stride() == buffers[1].stride()
        and keys.dtype == dtype
    )
    if not fits:
        shape = (*keys.shape[:2], used + SPARE_COLUMNS, keys.shape[3])
        buffers = (keys.new_empty(shape, dtype=dtype), values.new_empty(shape, dtype=dtype))
        buffers[0][:, :, :used] = keys
        buffers[1][:, :, :used] = values
        cache_layer._rl_distill_buffers = buffers
    return buffers[0], buffers[1], used


def _append(cache_layer: Any, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Append one column of keys and values to a ``DynamicCache`` layer; return its keys and values."""
    keys, values, used = _reserve(cache_layer, k.dtype)
    keys[:, :, used : used + 1] = k
    values[:, :, used : used + 1] = v
    cache_layer.keys, cache_layer.values = keys[:, :, : used + 1], values[:, :, : used + 1]
    return cache_layer.keys, cache_layer.values


class FusedSteps:
    """The :class:`FusedDecodeStep` of each model, made on first use (None for an unsupported model).

    Shared by a :class:`~rl_distill.rollout.RolloutEngine` and its incremental scorers, so that the
    teacher's sampling and its environment steps hold one packed copy.

    Args:
        native: passed to each :class:`FusedDecodeStep` (the native float32 kernel where available).
        native_layers: passed to each :class:`FusedDecodeStep` (whole decoder layers in one native call).
    """

    def __init__(self, *, native: bool = True, native_layers: bool = True) -> None:
        self.native = native
        self.native_layers = native_layers
        self._steps: weakref.WeakKeyDictionary[nn.Module, FusedDecodeStep] = weakref.WeakKeyDictionary()

    def get(self, model: Any) -> FusedDecodeStep | None:
        """The fused step of ``model``, or None where :func:`unsupported_reason` gives a reason.

        A step whose packed copies match the model's weights is returned at once; otherwise (the
        first call, a changed, moved or cast weight) support is checked again (about 2 ms for the
        30-layer teacher, so not at every step) and the copies are remade. The returned step is
        current: call it with ``check=False`` until the weights may change again.
        """
        if not isinstance(model, nn.Module) or torch.is_autocast_enabled("cpu"):
            return None  # under autocast the model's forward computes in the autocast dtype: not fused
        step = self._steps.get(model)
        if step is not None and step.current():
            return step
        if unsupported_reason(model) is not None:
            self._steps.pop(model, None)
            return None
        if step is None:
            step = self._steps[model] = FusedDecodeStep(
                model, native=self.native, native_layers=self.native_layers
            )
        step._prepare()  # (re)packs: the step is current when returned
        return step

    def release(self, model: Any) -> None:
        """Drop the packed copies of ``model``'s step (a trained model's, after a decode)."""
        step = self._steps.get(model) if isinstance(model, nn.Module) else None
        if step is not None:
            step.release()
