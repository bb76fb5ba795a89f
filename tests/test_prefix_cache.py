"""Teacher prompt reuse (rl_distill/rollout/prefix_cache.py): same scores as the plain forward, reused when it should be."""

import copy

import pytest
import torch

from rl_distill.rollout import RolloutEngine, SamplingConfig
from rl_distill.rollout.prefix_cache import PrefixKVCache

pytestmark = pytest.mark.usefixtures("one_thread")

SYSTEM = "system: you are a careful calculator. "
PROMPTS = [SYSTEM + "1+2=", SYSTEM + "hello there, friend", SYSTEM + "x", SYSTEM + "7*8?"]
SAMPLING = SamplingConfig(max_new_tokens=10)


def pair(student, teacher, tokenizer):
    return (
        RolloutEngine(student, teacher, tokenizer),
        RolloutEngine(student, teacher, tokenizer, teacher_prefix_cache=False),
    )


def assert_same_scores(a, b):
    torch.testing.assert_close(a.teacher_logprobs, b.teacher_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.teacher_logits, b.teacher_logits, rtol=0, atol=1e-5)


def test_shared_prefix_by_hand():
    pad = 0
    ids = torch.tensor(
        [
            [pad, pad, 5, 6, 7, 8, 9, 1, 1],  # prompt 5 6 7 8 9, completion 1 1
            [5, 6, 7, 3, 3, 3, 3, 1, pad],
            [pad, 5, 6, 7, 8, 2, 2, 1, 1],
        ]
    )
    mask = (ids != pad).long()
    got = PrefixKVCache.shared_prefix(ids, mask, prompt_width=7)
    assert got.tolist() == [5, 6, 7]  # row 1 differs at its 4th token
    # At most the shortest prompt minus one token: rows of prompt length 5, 7, 6 -> 4 tokens.
    same = torch.tensor([[pad, pad, 5, 6, 7, 8, 9, 1], [5, 6, 7, 8, 9, 4, 4, 1], [pad, 5, 6, 7, 8, 9, 4, 1]])
    assert PrefixKVCache.shared_prefix(same, (same != pad).long(), prompt_width=7).tolist() == [5, 6, 7, 8]
    one = torch.tensor([[pad, 5, 1], [5, 6, 1]])
    assert PrefixKVCache.shared_prefix(one, (one != pad).long(), prompt_width=2).numel() == 0


def test_scores_equal_the_plain_forward_and_the_prefix_is_reused(student, teacher, tokenizer):
    on, off = pair(student, teacher, tokenizer)
    for seed in range(3):
        r = on.generate(PROMPTS, SAMPLING, generator=torch.Generator().manual_seed(seed))
        assert_same_scores(
            on.score(copy.copy(r), teacher_output="full"), off.score(copy.copy(r), teacher_output="full")
        )
    assert (on.prefix_cache.misses, on.prefix_cache.hits) == (1, 2)
    assert off.prefix_cache is None


def test_a_shorter_shared_prefix_reuses_the_longer_entry(student, teacher, tokenizer):
    on, off = pair(student, teacher, tokenizer)
    r = on.generate(PROMPTS, SAMPLING, generator=torch.Generator().manual_seed(0))
    on.score(r)
    # Two rows only share "system: you are a " with a new prompt: the cached entry is sliced (causal).
    other = [SYSTEM + "2+2=", "system: you are a poet. write"]
    r2 = on.generate(other, SAMPLING, generator=torch.Generator().manual_seed(1))
    assert_same_scores(
        on.score(copy.copy(r2), teacher_output="full"), off.score(copy.copy(r2), teacher_output="full")
    )
    assert (on.prefix_cache.misses, on.prefix_cache.hits) == (1, 1)


def test_changed_teacher_weights_invalidate_the_cache(student, teacher, tokenizer):
    on, off = pair(student, teacher, tokenizer)
    r = on.generate(PROMPTS, SAMPLING, generator=torch.Generator().manual_seed(0))
    before = on.score(r).teacher_logprobs.clone()
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(1.1)  # in place, as teacher_refresh_every copies the student in
    after = on.score(copy.copy(r), teacher_output="full")
    assert on.prefix_cache.misses == 2
    assert not torch.allclose(after.teacher_logprobs, before)
    assert_same_scores(after, off.score(copy.copy(r), teacher_output="full"))


def test_short_prefix_or_lockstep_take_the_plain_forward(student, teacher, tokenizer):
    on, _ = pair(student, teacher, tokenizer)
    r = on.generate(["ab", "cd", "ef"], SAMPLING, generator=torch.Generator().manual_seed(0))
    on.score(r)
    assert (on.prefix_cache.misses, on.prefix_cache.hits) == (0, 0)
    on.lockstep = lambda done: done  # a sharded teacher: every process must run the same forwards
    r = on.generate(PROMPTS, SAMPLING, generator=torch.Generator().manual_seed(0))
    on.score(r)
    assert (on.prefix_cache.misses, on.prefix_cache.hits) == (0, 0)


def test_privileged_teacher_prompts_and_autocast(student, teacher, tokenizer):
    on, off = pair(student, teacher, tokenizer)
    r = on.generate(PROMPTS, SAMPLING, generator=torch.Generator().manual_seed(0))
    teacher_prompts = [p + " [answer: 3]" for p in PROMPTS]
    a = on.score(copy.copy(r), teacher_output="full", teacher_prompts=teacher_prompts)
    b = off.score(copy.copy(r), teacher_output="full", teacher_prompts=teacher_prompts)
    assert_same_scores(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = on.score(copy.copy(r), teacher_output="full")
        b = off.score(copy.copy(r), teacher_output="full")
    assert on.prefix_cache.misses == 2  # a bf16 prefix is another entry than the float32 one
    torch.testing.assert_close(a.teacher_logprobs, b.teacher_logprobs, rtol=0, atol=0.05)


def test_bad_arguments():
    with pytest.raises(ValueError, match="min_tokens"):
        PrefixKVCache(min_tokens=0)
    with pytest.raises(ValueError, match="max_entries"):
        PrefixKVCache(max_entries=0)


def test_incremental_prefill_reuses_the_prefix_and_scores_the_same(student, teacher, tokenizer):
    """The environment's scorer: prefill after the cached prefix, steps and row restarts as without it."""
    on, off = pair(student, teacher, tokenizer)
    rollout = off.rollout(PROMPTS, SAMPLING, generator=torch.Generator().manual_seed(0))
    scorers = [on.incremental_scorer(), off.incremental_scorer()]
    assert scorers[0].prefix_cache is on.prefix_cache and scorers[1].prefix_cache is None
    assert on.incremental_scorer(student).prefix_cache is None  # a trainable model: never cached
    states = [s.start(e.encode(PROMPTS)) for s, e in zip(scorers, (on, off))]
    # The cached state holds the shared prefix once per row, then each row's rest (right-aligned).
    assert states[0].cache_length < states[1].cache_length + len(SYSTEM)
    torch.testing.assert_close(states[0].next_logprobs, states[1].next_logprobs, rtol=0, atol=1e-5)
    assert torch.equal(states[0].next_positions, states[1].next_positions)
    for t in range(rollout.completion_ids.shape[1]):
        tok, act = rollout.completion_ids[:, t], rollout.completion_mask[:, t]
        got, want = (s.step(st, tok, active=act) for s, st in zip(scorers, states))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        if t <= 3:  # before the restart: the bulk scores of the same tokens
            torch.testing.assert_close(rollout.teacher_logprobs[:, t], want, rtol=0, atol=1e-5)
        if t == 3:  # two rows restart on new prompts mid-episode (a vector env's autoreset)
            fresh = [SYSTEM + "9-4=", SYSTEM + "a much longer fresh prompt than any before it"]
            for s, st, e in zip(scorers, states, (on, off)):
                s.restart(st, [2, 0], e.encode(fresh))
            torch.testing.assert_close(states[0].next_logprobs, states[1].next_logprobs, rtol=0, atol=1e-5)
    assert on.prefix_cache.misses == 1 and on.prefix_cache.hits == 1  # the start computed, the restart reused


def test_packed_rows_prefill_equals_the_padded_one(student, teacher, tokenizer):
    """``prompt_forward(packed_rows=True)``: only the real tokens run, same logits, mask and cache layout."""
    engine = RolloutEngine(student, teacher, tokenizer)
    batch = engine.encode(PROMPTS)
    mask = batch.attention_mask.long()
    cache = PrefixKVCache()
    (packed, packed_mask), (padded, padded_mask) = (
        cache.prompt_forward(engine.teacher, batch.input_ids, mask, packed_rows=flag)
        for flag in (True, False)
    )
    assert type(packed).__name__ == "_PrefillOutput" and type(padded).__name__ != "_PrefillOutput"
    assert torch.equal(packed_mask, padded_mask) and bool((packed_mask == 0).any())  # rows were padded
    assert packed.logits.shape == (len(PROMPTS), 1, padded.logits.shape[-1])
    torch.testing.assert_close(packed.logits[:, -1], padded.logits[:, -1], rtol=0, atol=1e-5)
    real = packed_mask.bool()[:, None, :, None]  # (B, 1, C, 1)
    for got, want in zip(packed.past_key_values.layers, padded.past_key_values.layers):
        assert got.keys.shape == want.keys.shape and got.values.shape == want.values.shape
        for g, w in ((got.keys, want.keys), (got.values, want.values)):
            torch.testing.assert_close(g * real, w * real, rtol=0, atol=1e-5)
            assert not bool((g * ~real).any())  # padding columns are zeros (masked out either way)
    one = engine.encode(PROMPTS[:1])  # a single row has no padding: the plain path
    out, _ = cache.prompt_forward(engine.teacher, one.input_ids, one.attention_mask.long(), packed_rows=True)
    assert type(out).__name__ != "_PrefillOutput"
