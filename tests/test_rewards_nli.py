"""NLIEntailmentReward against a tiny local BERT classifier with a known label order (no network)."""

import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import BertConfig, BertForSequenceClassification

from rl_distill.models import char_tokenizer
from rl_distill.rewards import NLIEntailmentReward, split_sentences

LABELS = {0: "contradiction", 1: "neutral", 2: "entailment"}
PREMISE = "The cat sat on the red mat all day."
HYPOTHESIS = "A cat was on a mat."


def make_tokenizer():
    tok = char_tokenizer()
    # Pair encoding as an NLI tokenizer does it: <bos> premise <eos> hypothesis <eos>.
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A <eos>",
        pair="<bos> $A <eos> $B:1 <eos>:1",
        special_tokens=[("<bos>", tok.bos_token_id), ("<eos>", tok.eos_token_id)],
    )
    return tok


def make_classifier(id2label, seed=0):
    config = BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        initializer_range=0.5,  # large weights: clearly different probabilities for different inputs
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return make_classifier(LABELS)


def direct_probs(model, tok, premise, hypothesis):
    with torch.no_grad():
        enc = tok(premise, hypothesis, return_tensors="pt")
        return model(**enc).logits.softmax(-1)[0]


def test_pair_order_is_premise_then_hypothesis(model, tok):
    reward = NLIEntailmentReward((model, tok))
    score = reward(["prompt"], [HYPOTHESIS], source=[PREMISE])[0]
    right = direct_probs(model, tok, PREMISE, HYPOTHESIS)[2].item()
    swapped = direct_probs(model, tok, HYPOTHESIS, PREMISE)[2].item()
    assert score == pytest.approx(right, abs=1e-6)
    assert abs(right - swapped) > 1e-3  # the check above could tell the two orders apart


def test_entailment_column_found_by_name(model, tok):
    reordered = {0: "ENTAILMENT", 1: "Neutral", 2: "contradiction"}  # same weights, other label names
    other = make_classifier(reordered)
    probs = direct_probs(model, tok, PREMISE, HYPOTHESIS)
    score_a = NLIEntailmentReward((model, tok))([""], [HYPOTHESIS], source=[PREMISE])[0]
    score_b = NLIEntailmentReward(other, tok)([""], [HYPOTHESIS], source=[PREMISE])[0]
    assert score_a == pytest.approx(probs[2].item(), abs=1e-6)
    assert score_b == pytest.approx(probs[0].item(), abs=1e-6)
    assert abs(score_a - score_b) > 1e-3


def test_hard_scores_are_the_argmax(model, tok):
    hypotheses = ["A cat was on a mat.", "Dogs bark.", "The mat is red.", "Nothing.", "x"]
    hard = NLIEntailmentReward((model, tok), hard=True)([""] * 5, hypotheses, source=[PREMISE] * 5)
    expected = [float(direct_probs(model, tok, PREMISE, h).argmax().item() == 2) for h in hypotheses]
    assert hard == expected


def test_batching_equals_one_by_one(model, tok):
    sources = [PREMISE, "Short.", "It rained in the city of Oslo.", PREMISE, "A bird."]
    hypotheses = ["A cat was on a mat.", "Long hypothesis that goes on for a while.", "Rain.", "Red.", "A"]
    batched = NLIEntailmentReward((model, tok), batch_size=3)([""] * 5, hypotheses, source=sources)
    single = NLIEntailmentReward((model, tok), batch_size=1)([""] * 5, hypotheses, source=sources)
    direct = [direct_probs(model, tok, s, h)[2].item() for s, h in zip(sources, hypotheses)]
    assert batched == pytest.approx(single, abs=1e-5)
    assert batched == pytest.approx(direct, abs=1e-5)
    assert len(set(round(x, 4) for x in batched)) > 1  # not a constant model


def test_loads_from_a_saved_path(model, tok, tmp_path):
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    from_path = NLIEntailmentReward(str(tmp_path))
    assert from_path([""], [HYPOTHESIS], source=[PREMISE]) == pytest.approx(
        NLIEntailmentReward((model, tok))([""], [HYPOTHESIS], source=[PREMISE]), abs=1e-6
    )


def test_missing_entailment_label_lists_the_labels(tok):
    generic = make_classifier({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    with pytest.raises(
        ValueError, match=r"no label named 'entailment'.*0='LABEL_0', 1='LABEL_1', 2='LABEL_2'"
    ):
        NLIEntailmentReward((generic, tok))
    # Naming the label explicitly works.
    assert NLIEntailmentReward((generic, tok), entailment_label="label_1").entailment_index == 1


def test_premises_from_metadata_or_prompts(model, tok):
    reward = NLIEntailmentReward((model, tok))
    with pytest.raises(ValueError, match=r"metadata 'source'"):
        reward([PREMISE], [HYPOTHESIS])
    from_prompts = NLIEntailmentReward((model, tok), premise_key=None)([PREMISE], [HYPOTHESIS])
    assert from_prompts == reward(["ignored"], [HYPOTHESIS], source=[PREMISE])
    assert reward(["p"], ["  "], source=[PREMISE]) == [0.0]  # empty completion: 0 without the model


def test_truncation_is_counted_and_warned(model, tok):
    reward = NLIEntailmentReward((model, tok), max_length=24, granularity="document")
    with pytest.warns(UserWarning, match=r"truncated 1 of 2 .*max_length=24"):
        # 3 special tokens + 6 + 4 = 13 tokens fit; 3 + 35 + 4 = 42 do not.
        scores = reward(["", ""], ["Yes.", "Yes."], source=["Short.", PREMISE])
    assert reward.num_truncated == 1 and reward.last_num_truncated == 1
    assert all(0.0 <= s <= 1.0 for s in scores)
    with pytest.warns(UserWarning):
        reward([""], ["Yes."], source=[PREMISE])
        reward([""], ["Yes."], source=[PREMISE])
    assert reward.num_truncated == 3 and reward.last_num_truncated == 1


def stub_scorer(reward, table, calls):
    def score_pairs(premises, hypotheses):
        calls.extend(zip(premises, hypotheses))
        return [table[(p, h)] for p, h in zip(premises, hypotheses)]

    reward.score_pairs = score_pairs


def test_sentence_aggregation_is_mean_over_sentences_of_max_over_chunks(model, tok):
    table = {
        ("A1.", "H1."): 0.1, ("A2!", "H1."): 0.7, ("A3?", "H1."): 0.2,
        ("A1.", "H2."): 0.4, ("A2!", "H2."): 0.3, ("A3?", "H2."): 0.5,
        ("A1.", "Solo"): 0.9, ("A2!", "Solo"): 0.0, ("A3?", "Solo"): 0.3,
    }  # fmt: skip
    reward = NLIEntailmentReward((model, tok), granularity="sentence")
    calls = []
    stub_scorer(reward, table, calls)
    scores = reward(["", "", ""], ["H1. H2.", "", "Solo"], source=["A1. A2! A3?"] * 3)
    assert scores == pytest.approx([(0.7 + 0.5) / 2, 0.0, 0.9])
    assert len(calls) == 9  # 3 chunks x (2 + 1) sentences; nothing for the empty completion


def test_chunks_of_two_sentences(model, tok):
    table = {("A1. A2!", "H1."): 0.25, ("A3?", "H1."): 0.75, ("A1. A2!", "H2."): 0.5, ("A3?", "H2."): 0.125}
    reward = NLIEntailmentReward((model, tok), granularity="sentence", chunk_sentences=2)
    stub_scorer(reward, table, [])
    assert reward([""], ["H1. H2."], source=["A1. A2! A3?"]) == [pytest.approx((0.75 + 0.5) / 2)]


def test_auto_granularity_splits_only_long_pairs(model, tok):
    long_source = "The cat sat. The dog ran. It was sunny."  # 39 chars: > 30 tokens with the hypothesis
    calls = []
    reward = NLIEntailmentReward((model, tok), max_length=30)
    table = {(s, "Cat sat."): v for s, v in zip(split_sentences(long_source), [0.8, 0.1, 0.2])}
    table[("Short.", "Cat sat.")] = 0.6
    stub_scorer(reward, table, calls)
    assert reward(["", ""], ["Cat sat.", "Cat sat."], source=[long_source, "Short."]) == [0.8, 0.6]
    assert calls[-1] == ("Short.", "Cat sat.")  # the short pair was scored whole


def test_split_sentences():
    assert split_sentences("One. Two!  Three? four") == ["One.", "Two!", "Three?", "four"]
    assert split_sentences("   ") == []
    assert split_sentences("3.5 is a number.") == ["3.5 is a number."]
