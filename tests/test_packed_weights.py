"""oneDNN-packed weights for decoding (rl_distill/rollout/packed.py): same products, packed once, remade on change.

The packed product is checked against ``F.linear`` (float32, bfloat16, bf16 autocast, with and
without bias, row counts across the regime), its regime boundaries one by one, the cache's keying
(an optimiser step, ``load_state_dict``, a new tensor remake the packed copy; a repeated call does
not), and the engine and incremental scorer: same greedy tokens and log-probs to rounding as the
unpacked path; ``generate`` never packs the trained student and packs a frozen model once.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rl_distill.config import TrainConfig
from rl_distill.models import tiny_llama
from rl_distill.rollout import RolloutEngine, SamplingConfig
from rl_distill.rollout.packed import (
    PACKED_MAX_ROWS,
    PACKED_MIN_FP32_LAYER_ROWS,
    PackedWeights,
    packing_available,
)
from rl_distill.rollout.skinny_head import skinny_decoder_layers, skinny_output_head

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        not packing_available(torch.float32), reason="this PyTorch build has no oneDNN packing"
    ),
]

PROMPTS = ["1+2=", "hello there, friend", "x", "abc"]


def layer(out_features=48, in_features=24, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, PACKED_MAX_ROWS])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_product_equals_linear_float32(rows, bias):
    lin, packed = layer(bias=bias), PackedWeights()
    x = torch.randn(rows, 24)
    with torch.no_grad():
        assert packed.applies(x, lin.weight)
        got = packed.linear(lin, x)
        want = F.linear(x, lin.weight, lin.bias)
    assert got.dtype == torch.float32 and got.shape == (rows, 48)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_packed_product_keeps_leading_dimensions():
    lin, packed = layer(), PackedWeights()
    x = torch.randn(2, 3, 24)  # 6 rows, as a (B, 1, d) decode input would be (B, d) after reshaping
    with torch.no_grad():
        got = packed.linear(lin, x)
    assert got.shape == (2, 3, 48)
    torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not packing_available(torch.bfloat16), reason="no oneDNN bfloat16 on this CPU")
def test_packed_product_in_bfloat16_and_under_bf16_autocast():
    lin, packed = layer(), PackedWeights()
    x = torch.randn(4, 24)
    with torch.no_grad():
        # bfloat16 weights and input: the bfloat16 product, accumulated in float32 on both paths.
        lin16 = layer().to(torch.bfloat16)
        got = packed.linear(lin16, x.bfloat16())
        want = F.linear(x.bfloat16(), lin16.weight, lin16.bias)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
        # float32 weights under bf16 autocast: what autocast's F.linear computes (a bf16 output).
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert packed.applies(x, lin.weight)
            got = packed.linear(lin, x)
            want = F.linear(x, lin.weight, lin.bias)
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    # One packed copy per compute dtype: the float32 module was packed once, in bfloat16.
    assert packed.packs == 2 and len(packed) == 2


def test_regime_boundaries():
    lin = layer()
    w = lin.weight
    with torch.no_grad():
        assert PackedWeights.applies(torch.randn(1, 24), w)
        assert PackedWeights.applies(torch.randn(PACKED_MAX_ROWS, 24), w)
        assert not PackedWeights.applies(torch.randn(PACKED_MAX_ROWS + 1, 24), w)  # a prefill: F.linear
        assert PackedWeights.applies(torch.randn(2, 24), w, head=True)
        # float32 decoder layers: the transposed product keeps 1-2 rows, where it measured faster
        assert not PackedWeights.applies(torch.randn(PACKED_MIN_FP32_LAYER_ROWS - 1, 24), w, head=False)
        assert PackedWeights.applies(torch.randn(PACKED_MIN_FP32_LAYER_ROWS, 24), w, head=False)
        assert not PackedWeights.applies(torch.randn(4, 24).double(), w.double())  # float64: not packed
        assert not PackedWeights.applies(torch.randn(4, 24).bfloat16(), w)  # mixed dtypes, no autocast
        with torch.autocast("cpu", dtype=torch.float16):
            assert not PackedWeights.applies(torch.randn(4, 24), w)  # fp16 autocast: autocast's own path
    # A gradient is needed (a training forward): never packed; without one it may be.
    assert not PackedWeights.applies(torch.randn(4, 24), w)
    assert not PackedWeights.applies(torch.randn(4, 24, requires_grad=True), w.detach())
    assert PackedWeights.applies(torch.randn(4, 24), w.detach())


def test_cache_reuses_and_remakes_on_every_kind_of_weight_change():
    lin, packed = layer(), PackedWeights()
    x = torch.randn(4, 24)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(
                packed.linear(lin, x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-6
            )

    check()
    check()
    assert packed.packs == 1  # the second call reused the packed copy
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin(torch.randn(3, 24)).pow(2).sum().backward()
    opt.step()  # in place: the version counter moves
    check()
    assert packed.packs == 2
    lin.load_state_dict({"weight": torch.randn(48, 24), "bias": torch.randn(48)})  # copy_ in place
    check()
    assert packed.packs == 3
    lin.weight = nn.Parameter(torch.randn(48, 24))  # a new tensor
    check()
    assert packed.packs == 4
    # A change through .data bypasses the version counter: clear() is the documented remedy.
    lin.weight.data.mul_(2.0)
    packed.clear()
    check()
    assert packed.packs == 5 and len(packed) == 1
    assert packed.nbytes == 48 * 24 * 4


def test_switched_blocks_use_it_without_the_transposed_product():
    model = tiny_llama(200, hidden_size=32, num_layers=2, seed=3).eval()
    ids = torch.randint(0, 200, (4, 1))
    packed = PackedWeights()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with (
            skinny_output_head(model, enabled=False, packed=packed) as head_on,
            skinny_decoder_layers(model, enabled=False, rows=4, packed=packed) as layers,
        ):
            got = model(input_ids=ids).logits
            prefill = model(input_ids=torch.randint(0, 200, (4, 9))).logits  # 36 rows: F.linear
    assert head_on and layers == 2 * 7
    assert len(packed) == 1 + 2 * 7  # every linear map of the 4-row forward was packed once
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    assert prefill.shape == (4, 9, 200)
    # Outside the packed regime with no transposed product, nothing is switched at all.
    with skinny_decoder_layers(model, enabled=False, rows=PACKED_MAX_ROWS + 1, packed=packed) as layers:
        assert layers == 0
    with skinny_output_head(model, enabled=False) as head_on:
        assert not head_on


def test_engine_packs_a_frozen_model_once_and_never_the_trainable_student(student, teacher, tokenizer):
    # Per-module packing (the fused step, which holds its own packed copies, is tested in test_fused_step).
    packed = RolloutEngine(student, teacher, tokenizer, fused_step=False)
    plain = RolloutEngine(student, teacher, tokenizer, packed_weights=False)
    assert packed.packed is not None and plain.packed is None
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.0)
    # The student (trainable): not packed, the same rollout bit for bit as without packing.
    got, want = packed.generate(PROMPTS, sampling), plain.generate(PROMPTS, sampling)
    assert packed.packed.packs == 0
    assert torch.equal(got.completion_ids, want.completion_ids) and torch.equal(got.logprobs, want.logprobs)
    # A frozen model (the teacher sampling, e.g. SeqKD data): packed once, kept for the next call,
    # the same greedy tokens and log-probs to rounding.
    got = packed.generate(PROMPTS, sampling, model=packed.teacher)
    want = plain.generate(PROMPTS, sampling, model=plain.teacher)
    assert torch.equal(got.completion_ids, want.completion_ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-5)
    kept, packs = len(packed.packed), packed.packed.packs
    assert kept == packs == 2 * 7 + 1  # every linear map of the 2-layer teacher and its head
    packed.generate(PROMPTS, sampling, model=packed.teacher)
    assert len(packed.packed) == kept and packed.packed.packs == packs
    assert not any("forward" in vars(m) for m in teacher.modules())
    # Frozen, the student is packed too.
    student.requires_grad_(False)
    packed.generate(PROMPTS, sampling)
    assert packed.packed.packs > packs


def test_incremental_scorer_matches_the_unpacked_one(student, teacher, tokenizer):
    engines = [
        RolloutEngine(student, teacher, tokenizer, packed_weights=flag, fused_step=False)
        for flag in (True, False)
    ]
    rollout = engines[1].rollout(
        PROMPTS, SamplingConfig(max_new_tokens=6), generator=torch.Generator().manual_seed(0)
    )
    scorers = [e.incremental_scorer() for e in engines]
    states = [s.start(e.encode(PROMPTS)) for s, e in zip(scorers, engines)]
    for t in range(rollout.completion_ids.shape[1]):
        tok, act = rollout.completion_ids[:, t], rollout.completion_mask[:, t]
        got, want = (s.step(st, tok, active=act) for s, st in zip(scorers, states))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert scorers[0].packed is not None and len(scorers[0].packed) > 0 and scorers[1].packed is None
    scorers[0].release_packed()
    assert len(scorers[0].packed) == 0


def test_config_switch_reaches_the_engine():
    assert TrainConfig().engine_options()["packed_weights"] is True
    assert TrainConfig(packed_weights=False).engine_options()["packed_weights"] is False
