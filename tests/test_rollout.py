import math

import pytest
import torch

from rl_distill.models import tiny_llama
from rl_distill.rollout import (
    PromptTooLongError,
    RolloutEngine,
    SamplingConfig,
    completion_logits,
    position_ids_from_mask,
)

PROMPTS = ["1+2=", "hello there, friend", "x"]
GREEDY = SamplingConfig(max_new_tokens=10, temperature=0.0)


def plain_token_logprobs(model, rollout, vocab):
    """Reference: one full forward over prompt + completion, no logits_to_keep, no cache."""
    with torch.no_grad():
        ids, mask = rollout.input_ids, rollout.attention_mask
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        logp = logits[..., :vocab].float().log_softmax(-1)
        p = rollout.prompt_ids.shape[1]
        tok = logp[:, p - 1 : -1].gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    return tok * rollout.completion_mask


def test_teacher_logprobs_equal_plain_forward(engine, teacher, tokenizer):
    gen = torch.Generator().manual_seed(0)
    r = engine.rollout(PROMPTS, SamplingConfig(max_new_tokens=12), generator=gen)
    ref = plain_token_logprobs(teacher, r, len(tokenizer))
    torch.testing.assert_close(r.teacher_logprobs, ref, atol=1e-5, rtol=0)
    assert r.teacher_logprobs.shape == r.completion_ids.shape


def test_sampling_logprobs_equal_student_recompute(engine, student, tokenizer):
    gen = torch.Generator().manual_seed(1)
    r = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=12), generator=gen)
    ref = plain_token_logprobs(student, r, len(tokenizer))
    torch.testing.assert_close(r.logprobs, ref, atol=1e-5, rtol=0)


def test_left_padded_batch_equals_one_prompt_at_a_time(engine):
    batch = engine.rollout(PROMPTS, GREEDY, teacher_output="full")
    for i, prompt in enumerate(PROMPTS):
        single = engine.rollout([prompt], GREEDY, teacher_output="full")
        n = single.completion_ids.shape[1]
        assert torch.equal(single.completion_ids[0], batch.completion_ids[i, :n])
        assert torch.equal(single.completion_mask[0], batch.completion_mask[i, :n])
        torch.testing.assert_close(
            single.teacher_logprobs[0], batch.teacher_logprobs[i, :n], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(single.logprobs[0], batch.logprobs[i, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(single.teacher_logits[0], batch.teacher_logits[i, :n], atol=1e-4, rtol=0)


def test_eos_stops_a_sequence_and_masks_what_follows(student, teacher, tokenizer):
    free = RolloutEngine(student, teacher, tokenizer).generate(PROMPTS, GREEDY)
    stop = int(free.completion_ids[0, 3])  # greedy emits this token at step 3 of row 0
    engine = RolloutEngine(student, teacher, tokenizer, stop_token_ids=[stop])
    r = engine.score(engine.generate(PROMPTS, GREEDY))
    for row in range(len(PROMPTS)):
        ids, mask = r.completion_ids[row], r.completion_mask[row]
        hits = (free.completion_ids[row] == stop).nonzero()
        end = int(hits[0]) + 1 if len(hits) else GREEDY.max_new_tokens
        assert mask[:end].all() and not mask[end:].any()
        assert (ids[end:] == tokenizer.pad_token_id).all()
        assert torch.equal(ids[:end], free.completion_ids[row, :end])  # same tokens up to the stop
        assert (r.logprobs[row, end:] == 0).all() and (r.teacher_logprobs[row, end:] == 0).all()
    assert int(r.lengths[0]) == 4
    # Once every sequence has stopped, generation ends early.
    assert r.completion_ids.shape[1] == int(r.lengths.max())


def test_same_generator_seed_gives_same_samples(engine):
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0)
    a = engine.generate(PROMPTS, cfg, generator=torch.Generator().manual_seed(5))
    b = engine.generate(PROMPTS, cfg, generator=torch.Generator().manual_seed(5))
    c = engine.generate(PROMPTS, cfg, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate(PROMPTS, GREEDY)
    topk1 = engine.generate(
        PROMPTS,
        SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=1),
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(greedy.completion_ids, topk1.completion_ids)


def test_top_p_tiny_is_greedy(engine):
    greedy = engine.generate(PROMPTS, GREEDY)
    nucleus = engine.generate(
        PROMPTS, SamplingConfig(max_new_tokens=10, top_p=1e-6), generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(greedy.completion_ids, nucleus.completion_ids)


def test_padding_rows_of_the_logits_are_never_sampled(tokenizer, teacher):
    vocab = len(tokenizer)
    student = tiny_llama(vocab + 6, seed=3)
    with torch.no_grad():  # make the padding rows overwhelmingly likely
        student.lm_head.weight[vocab:] = 50.0 * student.lm_head.weight[:1].sign()
    engine = RolloutEngine(student, teacher, tokenizer)
    r = engine.rollout(PROMPTS * 4, SamplingConfig(max_new_tokens=16), teacher_output="full")
    assert int(r.completion_ids.max()) < vocab
    assert r.teacher_logits.shape[-1] == vocab


def test_completion_logits_keep_only_completion_positions(engine, teacher, tokenizer):
    r = engine.generate(PROMPTS, GREEDY)
    t = r.completion_ids.shape[1]
    kept = completion_logits(teacher, r.input_ids, r.attention_mask, t, len(tokenizer))
    ids, mask = r.input_ids, r.attention_mask
    with torch.no_grad():
        full = teacher(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    assert kept.shape == (len(PROMPTS), t, len(tokenizer))
    torch.testing.assert_close(kept, full[:, -t - 1 : -1, : len(tokenizer)], atol=1e-5, rtol=0)


def test_topk_teacher_output_matches_full(engine):
    full = engine.rollout(PROMPTS, GREEDY, teacher_output="full")
    topk = engine.score(engine.generate(PROMPTS, GREEDY), teacher_output="topk", top_k=5)
    ref = full.teacher_logits.float().log_softmax(-1).topk(5, dim=-1)
    torch.testing.assert_close(topk.teacher_topk_logprobs, ref.values)
    assert torch.equal(topk.teacher_topk_ids, ref.indices)


def test_from_completions_appends_eos_and_masks(engine, tokenizer):
    r = engine.from_completions(["a", "bb"], ["xyz", "q"])
    eos = tokenizer.eos_token_id
    assert r.completion_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert r.completion_ids[0, 3] == eos and r.completion_ids[1, 1] == eos
    assert engine.decode(r) == ["xyz", "q"]


def test_prompt_too_long_is_a_clear_error(student, teacher, tokenizer):
    engine = RolloutEngine(student, teacher, tokenizer, max_prompt_length=5)
    with pytest.raises(PromptTooLongError, match="max_prompt_length=5"):
        engine.generate(["this prompt is long"], GREEDY)
    ctx = RolloutEngine(student, teacher, tokenizer)
    with pytest.raises(PromptTooLongError, match="context length 512"):
        ctx.generate(["a" * 500], SamplingConfig(max_new_tokens=20))


def test_sampling_config_range_checks():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)


def test_inverse_cdf_sampling_matches_the_distribution():
    from rl_distill.rollout.engine import sample_categorical

    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_categorical(probs, gen) for _ in range(20000)])  # (N, 2)
    freq = torch.bincount(draws[:, 0], minlength=4).double() / len(draws)
    # 4 standard errors of a frequency near 0.5 with 20000 draws is about 0.014
    torch.testing.assert_close(freq, probs[0].double(), atol=0.015, rtol=0)
    assert freq[1] == 0 and (draws[:, 1] == 3).all()  # zero-probability tokens are never drawn


def plain_logits(model, rollout, vocab):
    """Reference logits ``(B, T, V)`` at the completion positions from one full forward, no cache."""
    with torch.no_grad():
        ids, mask = rollout.input_ids, rollout.attention_mask
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    p = rollout.prompt_ids.shape[1]
    return logits[:, p - 1 : -1, :vocab].double()


def hand_filtered_logprobs(logits, ids, mask, temperature, top_k=0, top_p=1.0):
    """The sampled distribution's log-prob of each token, by hand: sort, cut, renormalise (python loops)."""
    out = torch.zeros(ids.shape, dtype=torch.float64)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if not mask[b, t]:
                continue
            z = (logits[b, t] / temperature).tolist()
            order = sorted(range(len(z)), key=lambda i: -z[i])
            kept = order[:top_k] if top_k else order
            if top_p < 1.0:
                probs = torch.tensor([z[i] for i in kept], dtype=torch.float64).softmax(0).tolist()
                mass, nucleus = 0.0, []
                for i, pr in zip(kept, probs):
                    if nucleus and mass >= top_p:
                        break
                    nucleus.append(i)
                    mass += pr
                kept = nucleus
            tok = int(ids[b, t])
            assert tok in kept, "a sampled token must be in the kept set"
            out[b, t] = z[tok] - torch.tensor([z[i] for i in kept], dtype=torch.float64).logsumexp(0)
    return out


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.7, 3, 1.0), (1.0, 0, 0.6), (1.3, 8, 0.9)])
def test_logprobs_are_those_of_the_filtered_distribution_sampled(
    engine, student, tokenizer, temperature, top_k, top_p
):
    from rl_distill.rollout.engine import filtered_logprobs

    cfg = SamplingConfig(max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p)
    r = engine.generate(PROMPTS * 2, cfg, generator=torch.Generator().manual_seed(3))
    logits = plain_logits(student, r, len(tokenizer))  # (B, T, V)
    mask = r.completion_mask
    hand = hand_filtered_logprobs(logits, r.completion_ids, mask, temperature, top_k, top_p)
    torch.testing.assert_close(r.logprobs.double(), hand, atol=1e-5, rtol=0)
    # The shared helper gives the same numbers from full-forward logits (what agents differentiate).
    helper = filtered_logprobs(logits, r.completion_ids, temperature, top_k, top_p) * mask
    torch.testing.assert_close(helper, hand, atol=1e-10, rtol=0)
    # Renormalised over fewer tokens: strictly above the unfiltered log-probs somewhere.
    unfiltered = (logits / temperature).log_softmax(-1).gather(-1, r.completion_ids[..., None])[..., 0] * mask
    assert (hand >= unfiltered - 1e-9).all() and (hand > unfiltered + 1e-3).any()


def test_filtered_logprobs_keep_the_given_token_finite_and_differentiable():
    from rl_distill.rollout.engine import filtered_logprobs

    logits = torch.tensor([[[3.0, 2.0, 1.0, 0.0]]], requires_grad=True)  # (1, 1, 4)
    kept = filtered_logprobs(logits, torch.tensor([[1]]), top_k=2)
    torch.testing.assert_close(kept, torch.tensor([[2.0 - math.log(math.exp(3) + math.exp(2))]]))
    # A token outside the top-k (padding after EOS, a tie that flips) is kept, not -inf.
    outside = filtered_logprobs(logits, torch.tensor([[3]]), top_k=2)
    torch.testing.assert_close(outside, torch.tensor([[0.0 - math.log(math.exp(3) + math.exp(2) + 1)]]))
    (grad,) = torch.autograd.grad((kept + outside).sum(), logits)
    assert torch.isfinite(grad).all() and grad[0, 0, 2] == 0.0  # a dropped token gets no gradient
    # No filter: the plain tempered log-softmax.
    plain = filtered_logprobs(logits, torch.tensor([[2]]), temperature=2.0)
    torch.testing.assert_close(plain, (logits / 2.0).log_softmax(-1)[..., 2])


@pytest.mark.parametrize("teacher_temperature", [0.5, 2.0])
def test_teacher_logprobs_at_the_teacher_temperature(engine, teacher, tokenizer, teacher_temperature):
    r = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=8), generator=torch.Generator().manual_seed(2))
    ref = plain_logits(teacher, r, len(tokenizer))  # (B, T, V)
    scored = engine.score(r, teacher_output="full", teacher_temperature=teacher_temperature)
    want = (ref / teacher_temperature).log_softmax(-1).gather(-1, r.completion_ids[..., None])[..., 0]
    torch.testing.assert_close(scored.teacher_logprobs.double(), want * r.completion_mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(scored.teacher_logits.double(), ref, atol=1e-4, rtol=0)  # full logits: raw
    topk = engine.score(r, teacher_output="topk", top_k=4, teacher_temperature=teacher_temperature)
    torch.testing.assert_close(
        topk.teacher_topk_logprobs.double(),
        (ref / teacher_temperature).log_softmax(-1).topk(4).values,
        atol=1e-5,
        rtol=0,
    )
    with pytest.raises(ValueError, match="teacher_temperature must be > 0"):
        engine.score(r, teacher_temperature=0.0)
