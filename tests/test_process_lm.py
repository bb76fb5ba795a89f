"""The process teacher of the OPD lab: hand-defined probabilities, HF causal-LM contract, exact metrics."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from rl_distill.models import char_tokenizer, tiny_llama
from rl_distill.models.process_lm import (
    ProcessLM,
    ProcessLMConfig,
    exact_student_metrics,
    prefix_states,
    rule_distribution,
    valid_mode,
)
from rl_distill.rollout import RolloutEngine, SamplingConfig
from rl_distill.rollout.prompts import PromptBatch

torch.set_num_threads(1)

SEP = 10  # ">" in char_tokenizer("abcdef>"): a..f are ids 4..9
A, B = [4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4]


def process(floor=0.0, mode_probs=None, phrases=None):
    cfg = ProcessLMConfig(
        vocab_size=11, phrases=phrases or [A, B], mode_probs=mode_probs, sep_token_id=SEP, floor=floor
    )
    return ProcessLM(cfg)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer("abcdef>")


def next_probs(model, ids):
    """Next-token probabilities after the whole of ``ids`` (one row, no padding)."""
    return model(input_ids=torch.tensor([ids])).logits[0, -1].exp()


# Hand-computed: prefix -> {token: probability} of the rule (floor 0).
HAND = [
    ([SEP], {4: 0.5, 9: 0.5}),  # empty completion: either phrase
    ([1, SEP, 4], {5: 1.0}),  # phrase A continues
    ([SEP, 9, 8, 7], {6: 1.0}),  # phrase B continues
    ([SEP, 4, 9], {6: 1.0}),  # off support: a mistake at t=1; the teacher skips it (A at t=2)
    ([SEP, 4, 9, 8, 7], {8: 1.0}),  # still A at t=4 after the student followed its mistake
    ([SEP, 6], {5: 0.5, 8: 0.5}),  # a first token that chose no phrase: both phrases at t=1
    ([SEP, 4, 5, 6, 7, 8, 9], {4: 1.0}),  # the cycle wraps around
    ([SEP, 4, 2, SEP], {7: 1.0}),  # EOS and a second separator are ordinary (wrong) completion tokens
]


@pytest.mark.parametrize(("prefix", "expected"), HAND)
def test_probabilities_equal_the_hand_defined_process(prefix, expected):
    probs = next_probs(process(), prefix)
    want = torch.zeros(11)
    for t, p in expected.items():
        want[t] = p
    torch.testing.assert_close(probs, want)
    assert rule_distribution(process().config, prefix_states(process().config, prefix)[-1]) == pytest.approx(
        expected
    )


def test_floor_smooths_every_token_and_the_prompt_is_uniform():
    floor = 0.11
    probs = next_probs(process(floor=floor), [SEP, 4, 9])  # off-support prefix
    want = torch.full((11,), floor / 11)
    want[6] += 1 - floor
    torch.testing.assert_close(probs, want)
    assert float(probs.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(next_probs(process(floor=floor), [1, 4, 5]), torch.full((11,), 1 / 11))


def test_mode_probs_and_validation():
    probs = next_probs(process(mode_probs=[0.8, 0.2]), [SEP])
    assert float(probs[4]) == pytest.approx(0.8) and float(probs[9]) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="different tokens"):
        ProcessLMConfig(vocab_size=11, phrases=[[4, 5], [4, 6]], sep_token_id=SEP)
    with pytest.raises(ValueError, match="separator"):
        ProcessLMConfig(vocab_size=11, phrases=[[4, SEP], [9]], sep_token_id=SEP)
    with pytest.raises(ValueError, match="mode_probs"):
        ProcessLMConfig(vocab_size=11, phrases=[A, B], mode_probs=[0.7, 0.7], sep_token_id=SEP)
    with pytest.raises(ValueError, match="floor"):
        ProcessLMConfig(vocab_size=11, phrases=[A, B], sep_token_id=SEP, floor=1.0)
    cfg = process().config
    assert valid_mode(cfg, [9, 8, 7]) == 1 and valid_mode(cfg, [4, 9]) is None and valid_mode(cfg, []) is None


def test_logits_at_every_position_match_prefix_by_prefix():
    model = process(floor=1e-3)
    ids = [1, SEP, 4, 9, 6, 2, 7]
    full = model(input_ids=torch.tensor([ids])).logits[0]  # (L, V)
    for j in range(len(ids)):
        torch.testing.assert_close(full[j], model(input_ids=torch.tensor([ids[: j + 1]])).logits[0, -1])
    kept = model(input_ids=torch.tensor([ids]), logits_to_keep=2).logits[0]
    torch.testing.assert_close(kept, full[-2:])


def test_left_padded_batch_equals_one_at_a_time():
    model = process(floor=1e-3)
    rows = [[SEP, 4, 5, 9], [1, SEP, 6], [SEP, 9]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    batch = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    for i, r in enumerate(rows):
        alone = model(input_ids=torch.tensor([r])).logits[0]
        torch.testing.assert_close(batch[i, width - len(r) :], alone)


def test_kv_cached_incremental_logits_equal_the_full_forward():
    model = process(floor=1e-3)
    ids = torch.tensor([[0, SEP, 4, 5, 9, 7], [SEP, 9, 8, 4, 4, 6]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    full = model(input_ids=ids, attention_mask=mask).logits
    out = model(input_ids=ids[:, :3], attention_mask=mask[:, :3], use_cache=True)
    torch.testing.assert_close(out.logits, full[:, :3])
    for j in range(3, ids.shape[1]):
        out = model(
            input_ids=ids[:, j : j + 1],
            attention_mask=mask[:, : j + 1],
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        torch.testing.assert_close(out.logits[:, -1], full[:, j])
    assert out.past_key_values.get_seq_length() == ids.shape[1]


def test_rollout_engine_samples_scores_and_increments(tok):
    teacher = process(floor=1e-5)
    student = tiny_llama(len(tok), hidden_size=16, num_layers=1, seed=0)
    engine = RolloutEngine(student, teacher, tok)
    # The teacher as the sampler (SeqKD data): always one of the two phrases.
    gen = torch.Generator().manual_seed(0)
    sampled = engine.generate([">"] * 16, SamplingConfig(max_new_tokens=8), model=teacher, generator=gen)
    texts = engine.decode(sampled)
    assert set(texts) <= {"abcdefab", "fedcbafe"} and len(set(texts)) == 2
    # Scoring a reference: log 0.5 for the choice of phrase, then ~0; a mistake costs log(floor / V).
    ref = engine.score(engine.from_completions([">", ">"], ["abcd", "abxd"]), teacher_output="full")
    logp = ref.teacher_logprobs
    assert float(logp[0, 0]) == pytest.approx(math.log(0.5), abs=1e-4)
    assert float(logp[0, 1:4].abs().max()) < 1e-4
    assert float(logp[1, 2]) == pytest.approx(math.log(1e-5 / len(tok)), abs=1e-3)  # "x" is <unk>
    assert ref.teacher_logits.shape == (2, 5, len(tok))
    # The student's own samples are scored position by position like the full forward.
    roll = engine.rollout(
        [">", ">bb"], SamplingConfig(max_new_tokens=6), teacher_output="full", generator=gen
    )
    full = teacher(input_ids=roll.input_ids, attention_mask=roll.attention_mask.long()).logits
    torch.testing.assert_close(
        roll.teacher_logits, full[:, -roll.completion_ids.shape[1] - 1 : -1], rtol=0, atol=1e-6
    )
    # The incremental scorer (what the environments use), including a restart of one row.
    scorer = engine.incremental_scorer()
    prompts = engine.encode([">", ">bb"])
    state = scorer.start(prompts)
    for t in range(roll.completion_ids.shape[1]):
        step = scorer.step(state, roll.completion_ids[:, t], active=roll.completion_mask[:, t])
        torch.testing.assert_close(step, roll.teacher_logprobs[:, t], rtol=0, atol=1e-6)
    scorer.restart(state, [1], engine.encode([">a"]))
    torch.testing.assert_close(
        state.next_logprobs[1], teacher(input_ids=torch.tensor([[SEP, 4]])).logits[0, -1]
    )


def test_generate_and_save_pretrained_round_trip(tmp_path):
    teacher = process(floor=1e-5)
    out = teacher.generate(torch.tensor([[SEP]]), max_new_tokens=7, do_sample=True)
    assert out[0, 1:].tolist() in ([4, 5, 6, 7, 8, 9, 4], [9, 8, 7, 6, 5, 4, 9])
    teacher.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, ProcessLM) and loaded.config.phrases == [A, B]
    ids = torch.tensor([[SEP, 4, 9, 8]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, teacher(input_ids=ids).logits)


# --- exact metrics ----------------------------------------------------------------------------
def test_student_equal_to_teacher_has_zero_kl_and_balanced_modes():
    teacher = process(floor=1e-4)
    m = exact_student_metrics(process(floor=1e-4), teacher, [SEP], 6, continuations=2)
    assert m.reverse_kl == pytest.approx(0.0, abs=1e-5) and m.forward_kl == pytest.approx(0.0, abs=1e-5)
    assert m.mode_coverage == pytest.approx([0.5, 0.5], abs=1e-6)
    # Its only errors are the floor's: 1e-4 * (V - valid) / V per step.
    assert m.error_teacher_prefix[1] == pytest.approx(1e-4 * 10 / 11, rel=1e-3)


def test_one_mode_student_has_coverage_one_zero_and_hand_computed_kls():
    teacher = process(floor=0.0)
    one = exact_student_metrics(process(mode_probs=[1.0, 0.0]), teacher, [SEP], 5, continuations=2)
    assert one.mode_coverage == [1.0, 0.0] and one.success == pytest.approx(1.0)
    assert one.expected_errors == pytest.approx(0.0, abs=1e-12)
    biased = exact_student_metrics(process(mode_probs=[0.8, 0.2]), teacher, [SEP], 5, continuations=2)
    rkl = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    fkl = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert biased.reverse_kl == pytest.approx(rkl, rel=1e-5)
    assert biased.forward_kl == pytest.approx(fkl, rel=1e-5)
    assert biased.mode_coverage == pytest.approx([0.8, 0.2], rel=1e-5)


def test_errors_compound_after_a_mistake_exactly_as_computed_by_hand():
    # The student writes phrase B as 9,3,9,3,...: right on its first token, wrong at every later step,
    # so half of its samples (mode B) make a mistake at t=1 and stay wrong: expected errors 0.5 * (T - 1).
    floor, length, vocab = 1e-3, 4, 11
    teacher = process(floor=floor)
    student = process(phrases=[A, [9, 3]])
    m = exact_student_metrics(student, teacher, [SEP], length, continuations=3)
    assert m.expected_errors == pytest.approx(0.5 * (length - 1), rel=1e-6)
    assert m.error_teacher_prefix == pytest.approx([0.0, 0.5, 0.5, 0.5], abs=1e-9)
    assert m.error_own_prefix == pytest.approx([0.0, 0.5, 0.5, 0.5], abs=1e-9)
    assert m.error_after_mistake[2:] == pytest.approx([1.0, 1.0])
    assert m.off_support == pytest.approx([0.0, 0.0, 0.5, 0.5])
    assert m.success == pytest.approx(0.5) and m.mode_coverage == pytest.approx([1.0, 0.0])
    right, wrong = -math.log(1 - floor + floor / vocab), -math.log(floor / vocab)
    first = math.log(0.5 / ((1 - floor) / 2 + floor / vocab))
    assert m.reverse_kl == pytest.approx(first + 0.5 * (length - 1) * (right + wrong), rel=1e-5)


def test_metrics_can_fail_for_a_broad_student(tok):
    teacher = process(floor=1e-5)
    student = tiny_llama(len(tok), hidden_size=16, num_layers=1, seed=0)  # untrained: near uniform
    m = exact_student_metrics(student, teacher, [SEP], 5, continuations=4)
    assert m.expected_errors > 3.0 and m.success < 1e-3 and m.reverse_kl > 10.0
    assert m.error_teacher_prefix[0] == pytest.approx(1 - sum(m.first_token_mass), abs=1e-6)


def test_prompt_batch_left_padding_helper_is_consistent(tok):
    # The engine's PromptBatch carries masks the process reads: a padded prompt scores like a bare one.
    teacher = process(floor=1e-5)
    batch = PromptBatch(
        torch.tensor([[0, 0, SEP], [1, 4, SEP]]), torch.tensor([[0, 0, 1], [1, 1, 1]]), ["", ""]
    )
    logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -1]
    torch.testing.assert_close(logits[0], logits[1])
