"""The fused one-token decode step (rl_distill/rollout/fused_step.py) against the model's own forward.

Each check compares two paths on the same inputs: the incremental scorer and ``generate`` with the
fused step against the same with the model's ``forward`` (grouped-query attention, biases, inactive
rows, row restarts, bfloat16), the packed copies' keying (made once, remade after a weight change,
dropped when the model becomes trainable), and every reason the step refuses a model.
"""

import pytest
import torch

# The same module marks and prompts as the packed-weights tests (one thread; skipped without oneDNN packing).
from test_packed_weights import PROMPTS, pytestmark  # noqa: F401,E402
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rl_distill.config import TrainConfig
from rl_distill.models import char_tokenizer, tiny_llama
from rl_distill.rollout import RolloutEngine, SamplingConfig
from rl_distill.rollout.fused_step import (
    MIN_TOKENS_TO_PACK_TRAINED,
    FusedDecodeStep,
    FusedSteps,
    unsupported_reason,
)
from rl_distill.rollout.incremental import IncrementalScorer
from rl_distill.rollout.packed import packing_available


def llama(tokenizer, *, kv_heads=2, bias=False, seed=3, dtype=torch.float32):
    """A frozen 2-layer Llama with grouped-query attention (4 query heads over ``kv_heads``)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + 3,  # padding rows beyond the tokenizer, as the engine allows
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        attention_bias=bias,
        mlp_bias=bias,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    if bias:  # non-zero biases, so that a dropped bias would show
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.normal_(0.0, 0.5)
    return model.to(dtype)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def scorers(model, tokenizer):
    engine = RolloutEngine(model, model, tokenizer)
    fused = IncrementalScorer(model, engine.vocab_size, pad_id=engine.pad_id)
    plain = IncrementalScorer(model, engine.vocab_size, pad_id=engine.pad_id, fused_step=False)
    return engine, fused, plain


@pytest.mark.parametrize(("kv_heads", "bias"), [(2, False), (4, False), (1, True)])
def test_scorer_steps_equal_the_forward_with_inactive_rows_and_restarts(tokenizer, kv_heads, bias):
    model = llama(tokenizer, kv_heads=kv_heads, bias=bias)
    engine, fused, plain = scorers(model, tokenizer)
    states = [s.start(engine.encode(PROMPTS)) for s in (fused, plain)]
    gen = torch.Generator().manual_seed(0)
    for t in range(12):
        tokens = torch.randint(3, len(tokenizer), (len(PROMPTS),), generator=gen)
        active = torch.tensor([True, t % 3 != 1, True, t < 6])  # rows pause and stop
        got, want = (s.step(st, tokens, active=active) for s, st in zip((fused, plain), states))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(states[0].next_logprobs, states[1].next_logprobs, rtol=0, atol=1e-5)
        if t in (4, 8):  # autoreset of some rows: new prompts spliced into the shared cache
            rows, new = [1, 3], ["a much longer prompt than before", "q"]
            for s, st in zip((fused, plain), states):
                s.restart(st, rows, engine.encode(new))
    assert torch.equal(states[0].attention_mask, states[1].attention_mask)
    step = fused.fused_steps.get(model)
    assert step is not None and step.packs == 1 and step.nbytes > 0
    # The fused step holds the packed copies; the scorer made no per-module copies besides.
    assert fused.packed is not None and len(fused.packed) == 0
    assert plain.fused_steps is None


@pytest.mark.skipif(not packing_available(torch.bfloat16), reason="no oneDNN bfloat16 on this CPU")
def test_bfloat16_model_steps_equal_its_forward_to_bfloat16_rounding(tokenizer):
    model = llama(tokenizer, dtype=torch.bfloat16)
    engine, fused, plain = scorers(model, tokenizer)
    states = [s.start(engine.encode(PROMPTS)) for s in (fused, plain)]
    assert fused.fused_steps.get(model) is not None
    for t in range(6):
        tokens = torch.full((len(PROMPTS),), 5 + t)
        got, want = (s.step(st, tokens) for s, st in zip((fused, plain), states))
        torch.testing.assert_close(got, want, rtol=0, atol=5e-2)
    assert states[0].past_key_values.layers[0].keys.dtype == torch.bfloat16


def test_generate_uses_the_fused_step_and_equals_the_forward(tokenizer):
    teacher = llama(tokenizer)
    student = tiny_llama(len(tokenizer) + 3, hidden_size=32, num_layers=1, seed=5)  # trainable
    on = RolloutEngine(student, teacher, tokenizer)
    off = RolloutEngine(student, teacher, tokenizer, fused_step=False)
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.0)
    got = on.generate(PROMPTS, sampling, model=teacher)
    want = off.generate(PROMPTS, sampling, model=teacher)
    assert torch.equal(got.completion_ids, want.completion_ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-5)
    step = on.fused_steps.get(teacher)
    on.generate(PROMPTS, sampling, model=teacher)
    assert step.packs == 1  # packed once, kept
    assert on.packed is not None and len(on.packed) == 0  # no second, per-module copy
    # The trainable student: a short decode is not fused (nor packed): bit for bit the plain rollout.
    got, want = on.generate(PROMPTS, sampling), off.generate(PROMPTS, sampling)
    assert torch.equal(got.completion_ids, want.completion_ids) and torch.equal(got.logprobs, want.logprobs)
    assert student not in on.fused_steps._steps
    # A long enough one is, packed anew in each call and released after it (its weights will change).
    longer = SamplingConfig(max_new_tokens=MIN_TOKENS_TO_PACK_TRAINED, temperature=0.0)
    for _ in range(2):
        got, want = on.generate(PROMPTS, longer), off.generate(PROMPTS, longer)
        assert torch.equal(got.completion_ids, want.completion_ids)
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-5)
    trained = on.fused_steps._steps[student]
    assert trained.packs == 2 and trained.nbytes == 0
    # The engine's incremental scorer shares the engine's fused steps.
    assert on.incremental_scorer().fused_steps is on.fused_steps


def test_a_changed_weight_is_repacked_and_an_unfrozen_model_falls_back(tokenizer):
    model = llama(tokenizer)
    engine, fused, plain = scorers(model, tokenizer)
    tokens = torch.full((len(PROMPTS),), 7)

    def both_steps():
        states = [s.start(engine.encode(PROMPTS)) for s in (fused, plain)]
        for s, st in zip((fused, plain), states):
            s.advance(st, tokens)
        return [st.next_logprobs for st in states]

    before = both_steps()
    torch.testing.assert_close(before[0], before[1], rtol=0, atol=1e-5)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(3.0)  # in place: the version counter moves
    after = both_steps()
    assert (after[1] - before[1]).abs().max() > 1e-3  # the change matters
    torch.testing.assert_close(after[0], after[1], rtol=0, atol=1e-5)
    assert fused.fused_steps.get(model).packs == 2
    model.requires_grad_(True)  # a trained model: repacked after each change as well
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)
    got = both_steps()
    torch.testing.assert_close(got[0], got[1], rtol=0, atol=1e-5)
    assert fused.fused_steps.get(model).packs == 3
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the model's own forward
        assert fused.fused_steps.get(model) is None


def test_unsupported_models_are_named_and_refused(tokenizer):
    assert unsupported_reason(llama(tokenizer)) is None
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)).requires_grad_(False)
    assert "not a Llama-style" in unsupported_reason(gpt2)
    assert unsupported_reason(llama(tokenizer).requires_grad_(True)) is None  # trained models qualify too
    adapted = llama(tokenizer)

    class Adapter(nn.Linear):
        pass

    q = adapted.model.layers[1].self_attn.q_proj
    adapted.model.layers[1].self_attn.q_proj = Adapter(q.in_features, q.out_features, bias=False)
    adapted.requires_grad_(False)
    assert "layer 1 has a linear map" in unsupported_reason(adapted)
    windowed = llama(tokenizer)
    windowed.config.sliding_window = 16
    assert "sliding-window" in unsupported_reason(windowed)
    gelu = llama(tokenizer)
    gelu.config.hidden_act = "gelu"
    assert "hidden_act" in unsupported_reason(gelu)
    assert "not a torch module" in unsupported_reason(object())
    with pytest.raises(ValueError, match="no fused decode step for this model: .*sliding-window"):
        FusedDecodeStep(windowed)
    assert FusedSteps().get(gpt2) is None


def test_switches_reach_the_engine():
    assert TrainConfig().engine_options()["fused_step"] is True
    assert TrainConfig(fused_decode_step=False).engine_options()["fused_step"] is False
    tok = char_tokenizer()
    model = tiny_llama(len(tok), seed=1).requires_grad_(False)
    assert RolloutEngine(model, model, tok).fused_steps is not None
    assert RolloutEngine(model, model, tok, fused_step=False).fused_steps is None
    assert RolloutEngine(model, model, tok, packed_weights=False).fused_steps is None  # needs packing


def test_cache_columns_are_appended_in_place_and_rebuilt_after_outside_changes(tokenizer):
    model = llama(tokenizer)
    engine, fused, plain = scorers(model, tokenizer)
    states = [s.start(engine.encode(PROMPTS)) for s in (fused, plain)]
    tokens = torch.full((len(PROMPTS),), 9)
    for s, st in zip((fused, plain), states):
        s.advance(st, tokens)
    layer = states[0].past_key_values.layers[0]
    buffer = layer._rl_distill_buffers[0]
    assert layer.keys.data_ptr() == buffer.data_ptr() and buffer.shape[2] > layer.keys.shape[2]
    for s, st in zip((fused, plain), states):
        s.advance(st, tokens)
    assert layer._rl_distill_buffers[0] is buffer  # one column written, nothing copied
    for s, st in zip((fused, plain), states):  # a restart replaces the layer's tensors
        s.restart(st, [0], engine.encode(["a prompt longer than any of the first ones"]))
        s.advance(st, tokens)
    assert layer._rl_distill_buffers[0] is not buffer
    for got, want in zip(states[0].past_key_values.layers, states[1].past_key_values.layers):
        assert got.keys.shape == want.keys.shape
        torch.testing.assert_close(got.keys, want.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.values, want.values, rtol=0, atol=1e-5)
    torch.testing.assert_close(states[0].next_logprobs, states[1].next_logprobs, rtol=0, atol=1e-5)
