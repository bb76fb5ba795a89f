"""The few-row products (rl_distill/rollout/skinny_head.py): same logits, switched only where they should be."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from rl_distill.models import tiny_llama
from rl_distill.rollout import RolloutEngine, SamplingConfig
from rl_distill.rollout import skinny_head as sh
from rl_distill.rollout.skinny_head import (
    SKINNY_LAYER_MAX_ROWS,
    SKINNY_MAX_ROWS,
    SKINNY_MIN_ROWS,
    skinny_decoder_layers,
    skinny_linear,
    skinny_output_head,
    supports_skinny_head,
)

PROMPTS = ["1+2=", "hello there, friend", "x", "abc"]
# A vocabulary head much taller than wide (1024 x 32), as a real LM's (49152 x 576): the switched regime.
TALL_VOCAB = 1024


@pytest.fixture
def tall_student():
    return tiny_llama(TALL_VOCAB, hidden_size=32, num_layers=2, seed=3)


@pytest.fixture
def tall_teacher():
    return tiny_llama(TALL_VOCAB, hidden_size=32, num_layers=2, seed=4)


@pytest.mark.parametrize("rows", range(SKINNY_MIN_ROWS, SKINNY_MAX_ROWS + 1))
@pytest.mark.parametrize("bias", [False, True])
def test_transposed_product_equals_linear(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(512, 48, generator=gen)
    b = torch.randn(512, generator=gen) if bias else None
    x = torch.randn(rows, 1, 48, generator=gen)  # (B, 1, d): a decode step's hidden states
    assert sh._uses_transposed(x, w)
    got = skinny_linear(x, w, b)
    assert got.shape == (rows, 1, 512) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    # float32 rounding only: as close to the float64 product as F.linear is, within a small factor.
    assert (got.double() - exact).abs().max() <= 4 * (F.linear(x, w, b).double() - exact).abs().max() + 1e-6


@pytest.mark.parametrize(
    "case",
    ["one row", "too many rows", "bfloat16", "autocast", "square weight"],
)
def test_outside_the_regime_it_is_linear_bit_for_bit(case):
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(512, 48, generator=gen), torch.randn(4, 48, generator=gen)
    if case == "one row":
        x = x[:1]
    elif case == "too many rows":
        x = torch.randn(SKINNY_MAX_ROWS + 1, 48, generator=gen)
    elif case == "bfloat16":
        w, x = w.bfloat16(), x.bfloat16()
    elif case == "square weight":
        w = torch.randn(48, 48, generator=gen)
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not sh._uses_transposed(x, w)
            got, ref = skinny_linear(x, w), F.linear(x, w)
    else:
        assert not sh._uses_transposed(x, w)
        got, ref = skinny_linear(x, w), F.linear(x, w)
    assert torch.equal(got, ref)


def test_switch_is_scoped_and_restored(tall_student):
    head = tall_student.get_output_embeddings()
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.no_grad():
        plain = tall_student(input_ids=ids).logits[:, -1]
        with skinny_output_head(tall_student) as switched:
            assert switched and "forward" in vars(head)
            with skinny_output_head(tall_student) as inner:  # nested: the outer block owns the switch
                assert inner
            assert "forward" in vars(head)
            fast = tall_student(input_ids=ids, logits_to_keep=1).logits[:, -1]
        assert "forward" not in vars(head)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="boom"), skinny_output_head(tall_student):
        raise RuntimeError("boom")
    assert "forward" not in vars(head)  # restored on error too
    with skinny_output_head(tall_student, enabled=False) as switched:
        assert not switched and "forward" not in vars(head)


def test_unsupported_heads_are_left_alone(tall_student):
    assert supports_skinny_head(tall_student)

    class Custom(torch.nn.Linear):  # a subclass may compute something else: not switched
        pass

    old = tall_student.get_output_embeddings()
    custom = Custom(old.in_features, old.out_features, bias=False)
    tall_student.set_output_embeddings(custom)
    assert not supports_skinny_head(tall_student)
    with skinny_output_head(tall_student) as switched:
        assert not switched and "forward" not in vars(custom)
    assert not supports_skinny_head(torch.nn.Linear(4, 4))  # no get_output_embeddings at all


def test_lora_head_is_not_switched(tall_student):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tall_student, peft.LoraConfig(r=2, target_modules=["lm_head"], lora_alpha=4, lora_dropout=0.0)
    )
    assert not supports_skinny_head(model)


def _count_calls(monkeypatch):
    """Counts the transposed products taken: ``transposed`` by the head, ``layers`` by decoder layers."""
    calls = {"transposed": 0, "layers": 0}
    real = sh._uses_transposed

    def spy(x, w, head=True):
        used = real(x, w, head)
        calls["transposed" if head else "layers"] += int(used)
        return used

    monkeypatch.setattr(sh, "_uses_transposed", spy)
    return calls


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("lever", ["skinny_head", "skinny_layers"])
def test_engine_generate_uses_each_product_and_samples_the_same(
    monkeypatch, tall_student, tall_teacher, tokenizer, lever, on
):
    calls = _count_calls(monkeypatch)
    engine = RolloutEngine(
        tall_student, tall_teacher, tokenizer, packed_weights=False, **{lever: on}
    )  # the other one stays on
    plain = RolloutEngine(
        tall_student, tall_teacher, tokenizer, skinny_head=False, skinny_layers=False, packed_weights=False
    )
    sampling = SamplingConfig(max_new_tokens=8)
    got = engine.generate(PROMPTS, sampling, generator=torch.Generator().manual_seed(0))
    # The head: the prefill's last position and every later one-token forward (4 rows each). The
    # decoder layers: the one-token forwards only (the prefill feeds 4 x prompt-width rows).
    forwards = got.completion_ids.shape[1]
    head_on, layers_on = on or lever != "skinny_head", on or lever != "skinny_layers"
    assert calls == {
        "transposed": forwards if head_on else 0,
        "layers": 2 * 7 * (forwards - 1) if layers_on else 0,
    }
    calls.update(transposed=0, layers=0)
    ref = plain.generate(PROMPTS, sampling, generator=torch.Generator().manual_seed(0))
    assert calls == {"transposed": 0, "layers": 0}
    assert not any("forward" in vars(m) for m in _plain_linears(tall_student))
    # Same tokens (the logits differ by float32 rounding only), same log-probs to rounding.
    assert torch.equal(got.completion_ids, ref.completion_ids)
    torch.testing.assert_close(got.logprobs, ref.logprobs, rtol=0, atol=1e-5)


def test_incremental_scorer_uses_it_and_matches_the_teacher_forward(
    monkeypatch, tall_student, tall_teacher, tokenizer
):
    engine = RolloutEngine(tall_student, tall_teacher, tokenizer, packed_weights=False)
    rollout = engine.rollout(
        PROMPTS, SamplingConfig(max_new_tokens=6), generator=torch.Generator().manual_seed(1)
    )
    calls = _count_calls(monkeypatch)
    scorer = engine.incremental_scorer()
    assert scorer.skinny_head
    state = scorer.start(engine.encode(PROMPTS))
    steps = [
        scorer.step(state, rollout.completion_ids[:, t], active=rollout.completion_mask[:, t])
        for t in range(rollout.completion_ids.shape[1])
    ]
    assert calls["transposed"] == 1 + len(steps)
    assert calls["layers"] == 2 * 7 * len(steps)  # the decoder layers at 4 rows, not in the prefill
    torch.testing.assert_close(torch.stack(steps, 1), rollout.teacher_logprobs, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The decoder layers' linear maps (skinny_decoder_layers)
# ----------------------------------------------------------------------------------------------
LAYER_SHAPES = [(48, 48), (16, 48), (96, 48), (48, 96)]  # square, narrow (GQA k/v), MLP up, MLP down


@pytest.mark.parametrize("rows", range(SKINNY_MIN_ROWS, SKINNY_LAYER_MAX_ROWS + 1))
@pytest.mark.parametrize("shape", LAYER_SHAPES)
def test_layer_regime_equals_linear(rows, shape):
    gen = torch.Generator().manual_seed(rows)
    w, b = torch.randn(*shape, generator=gen), torch.randn(shape[0], generator=gen)
    x = torch.randn(rows, 1, shape[1], generator=gen)
    assert sh._uses_transposed(x, w, head=False)
    assert not sh._uses_transposed(x, w)  # not a tall head: the head regime would not take it
    for bias in (None, b):
        got = skinny_linear(x, w, bias, head=False)
        assert got.shape == (rows, 1, shape[0]) and got.is_contiguous()
        torch.testing.assert_close(got, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["one row", "too many rows", "bfloat16", "autocast"])
def test_outside_the_layer_regime_it_is_linear_bit_for_bit(case):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(96, 48, generator=gen)
    x = torch.randn(
        {"one row": 1, "too many rows": SKINNY_LAYER_MAX_ROWS + 1}.get(case, 3), 48, generator=gen
    )
    if case == "bfloat16":
        w, x = w.bfloat16(), x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        assert not sh._uses_transposed(x, w, head=False)
        assert torch.equal(skinny_linear(x, w, head=False), F.linear(x, w))


def test_layer_limit_is_read_at_call_time(monkeypatch):
    x, w = torch.randn(3, 48), torch.randn(48, 48)
    assert sh._uses_transposed(x, w, head=False)
    monkeypatch.setattr(sh, "SKINNY_LAYER_MAX_ROWS", 0)  # how the benchmark switches the lever off
    assert not sh._uses_transposed(x, w, head=False)


def _plain_linears(model):
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


def test_decoder_layers_switch_is_scoped_and_restored(monkeypatch, tall_student):
    head = tall_student.get_output_embeddings()
    layers = [m for m in _plain_linears(tall_student) if m is not head]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    ids = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        out = tall_student(input_ids=ids[:, :2], use_cache=True)
        step = {"input_ids": ids[:, 2:], "position_ids": torch.full((3, 1), 2)}
        plain = tall_student(**step, past_key_values=copy.deepcopy(out.past_key_values)).logits[:, -1]
        with skinny_decoder_layers(tall_student) as switched:
            assert switched == len(layers)
            assert all("forward" in vars(m) for m in layers) and "forward" not in vars(head)
            with skinny_decoder_layers(tall_student) as inner:  # nested: the outer block owns it
                assert inner == 0
            assert all("forward" in vars(m) for m in layers)
            fast = tall_student(**step, past_key_values=copy.deepcopy(out.past_key_values)).logits[:, -1]
        assert not any("forward" in vars(m) for m in layers)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert calls["layers"] == len(layers)  # the one 3-row step took the transposed product in every layer
    with pytest.raises(RuntimeError, match="boom"), skinny_decoder_layers(tall_student):
        raise RuntimeError("boom")
    assert not any("forward" in vars(m) for m in layers)  # restored on error too
    with skinny_decoder_layers(tall_student, enabled=False) as switched:
        assert switched == 0 and not any("forward" in vars(m) for m in layers)

    class Sampler:  # not a module (MiniLLM's teacher-mixed policy is such a sampler object)
        def __call__(self, **kwargs):
            return tall_student(**kwargs)

    with skinny_decoder_layers(Sampler()) as switched:
        assert switched == 0


def test_decoder_layers_leave_subclasses_alone(tall_student):
    class Custom(torch.nn.Linear):  # a subclass may compute something else: not switched
        pass

    mlp = tall_student.model.layers[0].mlp
    old = mlp.down_proj
    mlp.down_proj = Custom(old.in_features, old.out_features, bias=False)
    with skinny_decoder_layers(tall_student) as switched:
        assert switched == 2 * 7 - 1 and "forward" not in vars(mlp.down_proj)


def test_incremental_scorer_switches_the_layer_products_by_flag():
    """Its flag follows the engine's (the call counts are in the head test above)."""
    from rl_distill.models import char_tokenizer

    model = tiny_llama(TALL_VOCAB, hidden_size=32, num_layers=1, seed=0)
    on = RolloutEngine(model, model, char_tokenizer(), packed_weights=False).incremental_scorer()
    assert on.skinny_layers
    off = RolloutEngine(
        model, model, char_tokenizer(), skinny_layers=False, packed_weights=False
    ).incremental_scorer()
    assert not off.skinny_layers


def test_no_layer_switch_outside_the_row_regime(monkeypatch, tall_student, tall_teacher, tokenizer):
    """Outside 2-4 rows the scorer and generate do not walk the model nor shadow any layer."""
    switched = []
    real = sh.skinny_decoder_layers

    @contextlib.contextmanager
    def spy(model, enabled=True, *, rows=None, packed=None):
        with real(model, enabled, rows=rows, packed=packed) as n:
            switched.append((rows, n))
            yield n

    monkeypatch.setattr("rl_distill.rollout.incremental.skinny_decoder_layers", spy)
    monkeypatch.setattr("rl_distill.rollout.engine.skinny_decoder_layers", spy)
    prompts = [*PROMPTS, "five"]  # 5 rows > SKINNY_LAYER_MAX_ROWS
    engine = RolloutEngine(tall_student, tall_teacher, tokenizer, packed_weights=False)
    rollout = engine.generate(
        prompts, SamplingConfig(max_new_tokens=3), generator=torch.Generator().manual_seed(0)
    )
    scorer = engine.incremental_scorer()
    state = scorer.start(engine.encode(prompts))
    scorer.advance(state, rollout.completion_ids[:, 0])
    one_prompt = engine.encode(PROMPTS[1:2])  # one prompt of more than 4 tokens
    one = scorer.start(one_prompt)
    scorer.advance(one, rollout.completion_ids[:1, 0])  # one row: a matrix-vector product either way
    wide = (engine.encode(prompts).input_ids.numel(), one_prompt.input_ids.numel())
    assert wide[1] > 4
    assert switched == [(5, 0), (wide[0], 0), (5, 0), (wide[1], 0), (1, 0)]
    four = scorer.start(engine.encode(PROMPTS))
    scorer.advance(four, rollout.completion_ids[:4, 0])
    assert switched[-1] == (4, 2 * 7)  # 4 rows: every decoder linear switched


def test_switched_layers_keep_nn_linear_s_calling_convention_and_hooks(tall_student):
    layer = tall_student.model.layers[0].self_attn.q_proj
    seen = []
    handle = layer.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    x = torch.randn(3, 1, layer.in_features)
    try:
        with torch.no_grad(), skinny_decoder_layers(tall_student, rows=3):
            by_name = layer(input=x)  # nn.Linear.forward's parameter is called ``input``
            positional = layer(x)
    finally:
        handle.remove()
    torch.testing.assert_close(by_name, F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
    assert torch.equal(by_name, positional) and seen == [(3, 1, layer.out_features)] * 2


def test_lora_models_switch_base_and_adapter_layers_but_not_the_head(tall_student):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tall_student,
        peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"], lora_alpha=4, lora_dropout=0.0),
    )
    head = model.get_output_embeddings()
    inside_head = [m for m in head.modules() if type(m) is torch.nn.Linear]
    assert inside_head  # the LoRA head's base layer and adapters are plain nn.Linear
    ids = torch.tensor([[5, 6], [7, 8], [9, 10]])
    with torch.no_grad():
        with skinny_decoder_layers(model, rows=3) as switched:
            assert not any("forward" in vars(m) for m in inside_head)
            q = model.base_model.model.model.layers[0].self_attn.q_proj
            assert all("forward" in vars(m) for m in (q.base_layer, q.lora_A["default"], q.lora_B["default"]))
            # every plain linear outside the head: 2 layers x 7 base maps + 2 layers x 2 q_proj adapters
            assert switched == 2 * 7 + 2 * 2
            one_step = model(input_ids=ids[:, :1]).logits  # 3 rows: in the regime
        torch.testing.assert_close(one_step, model(input_ids=ids[:, :1]).logits, rtol=1e-5, atol=1e-5)
