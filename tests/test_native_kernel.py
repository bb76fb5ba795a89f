"""The native few-row float32 product (rl_distill/rollout/few_rows.c, loaded by native.py).

Checked against ``F.linear`` (every row count of a block and past it, ragged panels, odd inner
sizes, biases, row-strided inputs), its input errors, its build (cache named by a hash, reused,
reasons for a missing or failing compiler, the switch-off variable) and its use by the fused step.
"""

import os
import stat

import pytest
import torch
import torch.nn.functional as F

from rl_distill.models import char_tokenizer
from rl_distill.rollout import RolloutEngine, native
from rl_distill.rollout.fused_step import FusedSteps
from rl_distill.rollout.incremental import IncrementalScorer
from rl_distill.rollout.native import ENV_SWITCH, few_row_kernel, unavailable_reason
from rl_distill.rollout.packed import packing_available

needs_kernel = pytest.mark.skipif(
    few_row_kernel() is None, reason=f"no native kernel: {unavailable_reason()}"
)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 16, 17])
@pytest.mark.parametrize(("out_features", "in_features"), [(48, 16), (100, 40), (7, 1), (49, 33)])
def test_product_equals_linear(rows, out_features, in_features):
    kernel = few_row_kernel()
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen)
    x = torch.randn(rows, in_features, generator=gen)
    packed = kernel.pack(weight)
    assert packed.shape == (-(-out_features // 48), in_features, 48)
    for b in (None, bias):
        got = kernel.product(x, packed, out_features, b)
        assert got.shape == (rows, out_features) and got.dtype == torch.float32
        torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_row_strided_input_and_bad_inputs():
    kernel = few_row_kernel()
    weight = torch.randn(60, 24)
    packed = kernel.pack(weight)
    wide = torch.randn(5, 40)
    x = wide[:, 8:32]  # rows 40 floats apart, columns contiguous
    assert x.stride() == (40, 1)
    torch.testing.assert_close(kernel.product(x, packed, 60), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    cols = torch.randn(24, 5).t()  # column-major: copied, same result
    torch.testing.assert_close(kernel.product(cols, packed, 60), F.linear(cols, weight), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2-D float32 CPU rows"):
        kernel.product(x.bfloat16(), packed, 60)
    with pytest.raises(ValueError, match="does not match 23 inputs"):
        kernel.product(torch.randn(2, 23), packed, 60)
    with pytest.raises(ValueError, match="does not match 24 inputs, 97 outputs"):
        kernel.product(torch.randn(2, 24), packed, 97)


@needs_kernel
def test_build_is_cached_by_hash_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernel = native._build()
    built = list((tmp_path / "rl_distill" / "kernels").iterdir())
    assert [p.name for p in built] == [kernel.path.name] and kernel.path.name.startswith("few_rows-")
    mtime = kernel.path.stat().st_mtime_ns
    again = native._build()
    assert again.path == kernel.path and kernel.path.stat().st_mtime_ns == mtime  # not rebuilt


def test_reasons_when_it_cannot_be_built(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx512f"})
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(native.KernelUnavailable, match="no-such-compiler.* does not run"):
        native._build()
    broken = tmp_path / "broken-cc"  # answers --version, fails to compile
    broken.write_text(
        '#!/bin/sh\nif [ "$1" = --version ]; then echo broken 1.0; exit 0; fi\necho "no way" >&2\nexit 1\n'
    )
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(broken))
    with pytest.raises(native.KernelUnavailable, match="building few_rows.c failed: no way"):
        native._build()
    assert not any(p.suffix in (".so", ".tmp") for p in (tmp_path / "rl_distill" / "kernels").iterdir())
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx2"})
    with pytest.raises(native.KernelUnavailable, match="no AVX-512F"):
        native._build()
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    with pytest.raises(native.KernelUnavailable, match="x86-64 only"):
        native._build()


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert few_row_kernel() is None
    assert unavailable_reason() == f"switched off by {ENV_SWITCH}=0"
    with pytest.raises(native.KernelUnavailable, match="switched off"):
        native._build()
    monkeypatch.delenv(ENV_SWITCH)
    assert (few_row_kernel() is None) == (unavailable_reason() is not None)
    assert os.environ.get(ENV_SWITCH) is None


@needs_kernel
@pytest.mark.skipif(not packing_available(torch.float32), reason="no oneDNN packing")
def test_fused_step_with_and_without_the_kernel_agree():
    from test_fused_step import PROMPTS, llama

    tokenizer = char_tokenizer()
    model = llama(tokenizer, bias=True)
    engine = RolloutEngine(model, model, tokenizer)
    scorers = [
        IncrementalScorer(model, engine.vocab_size, fused_step=FusedSteps(native=flag))
        for flag in (True, False)
    ]
    assert scorers[0].fused_steps.get(model).kernel is not None
    assert scorers[1].fused_steps.get(model).kernel is None
    states = [s.start(engine.encode(PROMPTS)) for s in scorers]
    for t in range(5):
        tokens = torch.full((len(PROMPTS),), 4 + t)
        got, want = (s.step(st, tokens) for s, st in zip(scorers, states))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@needs_kernel
@pytest.mark.skipif(not packing_available(torch.float32), reason="no oneDNN packing")
def test_native_layers_are_thread_count_invariant_and_follow_a_remade_buffer_at_the_same_address():
    """The whole-layer kernel: bit-identical with 1 and 2 threads (each output has one owner thread),
    and a cache buffer remade at the same address with another capacity is written at the new
    layout (the kernel's per-layer table is refreshed at every step, not keyed by the address)."""
    from test_fused_step import PROMPTS, llama

    tokenizer = char_tokenizer()
    model = llama(tokenizer, kv_heads=2, bias=True)
    engine = RolloutEngine(model, model, tokenizer)
    native_scorer = IncrementalScorer(model, engine.vocab_size, fused_step=FusedSteps(native=True))
    plain = IncrementalScorer(model, engine.vocab_size, fused_step=False)
    assert native_scorer.fused_steps.get(model)._native_layers is not None
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            state = native_scorer.start(engine.encode(PROMPTS))
            for t in range(4):
                native_scorer.advance(state, torch.full((len(PROMPTS),), 4 + t))
            results.append(state.next_logprobs)
        assert torch.equal(results[0], results[1])

        states = [s.start(engine.encode(PROMPTS)) for s in (native_scorer, plain)]
        tokens = torch.full((len(PROMPTS),), 7)
        for s, st in zip((native_scorer, plain), states):
            s.advance(st, tokens)  # the native side now has buffers with spare columns
        with torch.inference_mode():  # the cache holds inference tensors
            remake_at_the_same_address(states[0].past_key_values.layers)
        for t in range(3):
            got, want = (s.step(st, tokens + t) for s, st in zip((native_scorer, plain), states))
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            torch.testing.assert_close(states[0].next_logprobs, states[1].next_logprobs, rtol=0, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def remake_at_the_same_address(layers):
    """Re-lay each cache layer's buffers in their own storage with one column fewer (same address)."""
    for layer in layers:
        used = layer.keys.shape[2]
        bsz, heads, cap, dim = layer._rl_distill_buffers[0].shape
        remade = []
        for buf in layer._rl_distill_buffers:
            content = buf[:, :, :used].clone()
            view = buf.view(-1)[: bsz * heads * (cap - 1) * dim].view(bsz, heads, cap - 1, dim)
            view[:, :, :used] = content
            assert view.data_ptr() == buf.data_ptr()
            remade.append(view)
        layer._rl_distill_buffers = tuple(remade)
        layer.keys, layer.values = remade[0][:, :, :used], remade[1][:, :, :used]


@needs_kernel
@pytest.mark.skipif(not packing_available(torch.float32), reason="no oneDNN packing")
def test_a_strided_norm_weight_falls_back_to_pytorch_operations_around_the_products():
    """The native layers read norm weights in place: a non-contiguous one keeps the PyTorch path."""
    from test_fused_step import PROMPTS, llama

    tokenizer = char_tokenizer()
    model = llama(tokenizer)
    norm = model.model.layers[1].post_attention_layernorm
    wide = torch.stack([norm.weight.detach() * 1.5, torch.zeros_like(norm.weight)], dim=1)
    norm.weight = torch.nn.Parameter(wide[:, 0], requires_grad=False)  # stride 2
    assert not norm.weight.is_contiguous()
    engine = RolloutEngine(model, model, tokenizer)
    fused = IncrementalScorer(model, engine.vocab_size, fused_step=FusedSteps())
    plain = IncrementalScorer(model, engine.vocab_size, fused_step=False)
    step = fused.fused_steps.get(model)
    assert step is not None and step.kernel is not None and step._native_layers is None
    states = [s.start(engine.encode(PROMPTS)) for s in (fused, plain)]
    for t in range(3):
        got, want = (s.step(st, torch.full((len(PROMPTS),), 4 + t)) for s, st in zip((fused, plain), states))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
