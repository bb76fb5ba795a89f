"""Rewards: the verifier, the fact checker, the output checks, composition and the config lookup."""

import math

import numpy as np
import pytest

from rl_distill.rewards import (
    ExactMatchVerifier,
    FactualConsistencyReward,
    RewardError,
    RunningNormalizedReward,
    WeightedSum,
    call_reward,
    checked,
    hallucination_rate,
    load_reward_from_path,
)
from rl_distill.rewards.registry import available_rewards, build_reward
from rl_distill.tasks import load_task


def verify(completion, answer, **options):
    return ExactMatchVerifier(**options)([""], [completion], answer=[answer])[0]


# --- ExactMatchVerifier ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("I do not know.", 5, 0.0),  # no number
        ("", 0, 0.0),  # empty completion
        ("3 apples and 4 apples make 7", 7, 1.0),  # several numbers: the last one counts
        ("3 apples and 4 apples make 7", 3, 0.0),
        ("The result is -5.", -5, 1.0),  # negative number
        ("The result is -5.", 5, 0.0),
        ("10-15", 15, 1.0),  # a minus right after a digit is a subtraction, not a sign
        ("The total is 1,234 coins.", 1234, 1.0),  # thousands separator
        ("The total is 1,234 coins.", "1,234", 1.0),
        ("The total is 1,234 coins.", 234, 0.0),
        ("1,2,3", 3, 1.0),  # not a thousands group: three numbers
        ("It costs 3.50", 3.5, 1.0),  # decimals compared exactly
        ("It costs 3.50", 3.51, 0.0),
        ("so the answer is 14.", "14", 1.0),  # trailing full stop
        ("12+7=19. 19-5=14. #### 14", 14, 1.0),
        ("#### 14\nCheck: 14+1=15", 14, 1.0),  # the #### answer wins over a later number
        ("#### -1,000", -1000, 1.0),
        (r"so \boxed{42}. Also 7.", 42, 1.0),  # \boxed wins over the last number
        (r"\boxed{1} then \boxed{2} then #### 3", 2, 1.0),  # \boxed before ####, last box
        ("#### Paris", "paris", 1.0),  # non-numeric answers: case-folded string match
    ],
)
def test_exact_match_cases(completion, answer, expected):
    assert verify(completion, answer) == expected


def test_exact_match_user_regex_named_group_and_group_1():
    text = "Answer: 12. Not 13."
    assert verify(text, 12, pattern=r"Answer: (\S+)") == 1.0
    assert verify(text, 13, pattern=r"Answer: (\S+)") == 0.0
    assert verify("x=4; ans=<9>; 10", 9, pattern=r"ans=<(?P<answer>\d+)>") == 1.0
    assert verify("no match here: 9", 9, pattern=r"ans=(\d+)") == 0.0  # no fallback to the last number


def test_exact_match_strict_formats_and_format_credit():
    assert verify("The answer is 14", 14, answer_format="hashes") == 0.0
    assert verify("The answer is 14", 14, answer_format="boxed") == 0.0
    assert verify(r"\boxed{14} #### 15", 15, answer_format="hashes") == 1.0
    # A wrong answer in the explicit format earns the format credit; a bare wrong number does not.
    assert verify("#### 13", 14, format_credit=0.25) == 0.25
    assert verify("13", 14, format_credit=0.25) == 0.0
    assert verify("#### 14", 14, format_credit=0.25) == 1.0


def test_exact_match_needs_answers_and_validates_options():
    with pytest.raises(ValueError, match="'answer'"):
        ExactMatchVerifier()(["p"], ["1"])
    with pytest.raises(ValueError, match="format_credit"):
        ExactMatchVerifier(format_credit=1.0)
    with pytest.raises(ValueError, match="answer_format"):
        ExactMatchVerifier(answer_format="first")


# --- FactualConsistencyReward ---------------------------------------------------------------------

FACTS = {"name": "Anna Berg", "city": "Oslo", "year": 1987, "count": 12}


@pytest.mark.parametrize(
    ("completion", "score", "counts"),
    [
        # (supported, unsupported, contradicted); score = (S - C) / (S + U + C)
        ("Anna Berg, born in Oslo in 1987, wrote 12 books.", 1.0, (4, 0, 0)),
        ("In 1987 Berg moved to Oslo. Anna Berg wrote 12 books.", 1.0, (4, 0, 0)),  # repeats count once
        ("Anna Berg, born in Oslo in 1987, wrote 15 books.", 0.5, (3, 0, 1)),  # wrong number
        ("Anna Berg, born in Oslo in 1990, wrote 12 books.", 0.5, (3, 0, 1)),  # wrong year
        ("Anna Berg was born in Paris.", 0.0, (1, 0, 1)),  # wrong (known) city
        ("Anna Berg met Tom Hall in Oslo in 1987.", 0.75, (3, 1, 0)),  # invented entity
        ("Anna Smith lives in Oslo.", 0.0, (1, 0, 1)),  # wrong surname of the table's person
        ("She wrote many books.", 0.0, (0, 0, 0)),  # no facts stated
        ("", 0.0, (0, 0, 0)),  # empty completion
    ],
)
def test_factual_hand_written_cases(completion, score, counts):
    reward = FactualConsistencyReward()
    assert reward([""], [completion], facts=[FACTS]) == [score]
    check = reward.last_checks[0]
    assert (len(check.supported), len(check.unsupported), len(check.contradicted)) == counts
    assert check.hallucinated == (counts[1] + counts[2] > 0)


def test_factual_details_name_the_facts():
    check = FactualConsistencyReward().check(
        "Anna Berg met Tom Hall in Paris in 1987 and sold 15 cakes.", FACTS
    )
    assert check.supported == ("name", "year")
    assert check.unsupported == ("entity:Tom Hall",)
    assert check.contradicted == ("number:15", "place:Paris")
    assert check.coverage == 0.5
    assert check.score == pytest.approx((2 - 2) / 5)


def test_factual_penalty_and_coverage_options():
    text = "Anna Berg wrote 15 books."  # S = 1 (name), C = 1 (count)
    assert FactualConsistencyReward(contradiction_penalty=0.0).check(text, FACTS).score == 0.5
    assert FactualConsistencyReward(contradiction_penalty=2.0).check(text, FACTS).score == -0.5
    # Precision 1.0 but only 2 of 4 facts covered: 0.5 * 1.0 + 0.5 * 0.5.
    assert (
        FactualConsistencyReward(coverage_weight=0.5).check("Anna Berg lives in Oslo.", FACTS).score == 0.75
    )
    # A table given as a JSON string (e.g. from a jsonl file) works the same.
    assert (
        FactualConsistencyReward()
        .check("Anna Berg lives in Oslo.", '{"name": "Anna Berg", "city": "Oslo"}')
        .score
        == 1.0
    )


def test_factual_references_of_the_task_and_hallucination_rate():
    data = load_task("factual_summary", seed=3, num_train=40, num_eval=8, hallucination_rate=0.25)
    reward = FactualConsistencyReward()
    scores = reward(
        [ex.prompt for ex in data.train],
        [ex.reference for ex in data.train],
        facts=[ex.metadata["facts"] for ex in data.train],
    )
    for ex, score, check in zip(data.train, scores, reward.last_checks):
        if ex.metadata["hallucinated"]:  # one wrong fact among four: (3 - 1) / 4
            assert score == 0.5 and len(check.contradicted) == 1
        else:
            assert score == 1.0 and check.coverage == 1.0
    assert hallucination_rate(reward.last_checks) == 10 / 40
    # The source passages state exactly the table's facts too (surname-only mentions included).
    sources = [ex.metadata["source"] for ex in data.train]
    assert reward([""] * 40, sources, facts=[ex.metadata["facts"] for ex in data.train]) == [1.0] * 40
    assert hallucination_rate([]) == 0.0


# --- checks on every reward's output --------------------------------------------------------------


def test_call_reward_accepts_floats_ints_and_arrays():
    assert call_reward(lambda p, c, **m: np.array([1, 2.5]), ["a", "b"], ["x", "y"]) == [1.0, 2.5]
    assert call_reward(lambda p, c, **m: (1, True), ["a", "b"], ["x", "y"]) == [1.0, 1.0]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("fixtures_rewards:nan_reward", r"'fixtures_rewards:nan_reward'.*non-finite value at index 1: nan"),
        (
            "fixtures_rewards:short_reward",
            r"'fixtures_rewards:short_reward' returned 2 values for 3 completions",
        ),
        (
            "fixtures_rewards:text_reward",
            r"'fixtures_rewards:text_reward'.*non-numeric value at index 0: 'high'",
        ),
    ],
)
def test_bad_reward_outputs_name_the_reward_and_index(path, message):
    reward = build_reward(path)
    with pytest.raises(RewardError, match=message):
        reward(["p"] * 3, ["a", "b", "c"])


def test_exception_inside_a_reward_is_reraised_naming_it():
    reward = checked(load_reward_from_path("fixtures_rewards:failing_reward"), "my_reward")
    with pytest.raises(RewardError, match=r"reward 'my_reward' raised KeyError") as info:
        reward(["p"], ["c"])
    assert isinstance(info.value.__cause__, KeyError)


def test_infinite_and_misaligned_inputs():
    with pytest.raises(RewardError, match=r"'inf_reward'.*index 0: inf"):
        call_reward(lambda p, c, **m: [math.inf], ["p"], ["c"], name="inf_reward")
    with pytest.raises(RewardError, match=r"metadata 'answer' has 1 values for 2 completions"):
        call_reward(lambda p, c, **m: [0.0, 0.0], ["p", "q"], ["c", "d"], answer=[1])
    with pytest.raises(RewardError, match=r"returned float"):
        call_reward(lambda p, c, **m: 1.0, ["p"], ["c"])


# --- user rewards by import path ------------------------------------------------------------------


def test_load_reward_from_path_function_and_class():
    length = load_reward_from_path("fixtures_rewards:length_reward")
    assert length(["p", "p"], ["ab", "abcd"]) == [2.0, 4.0]
    contains = load_reward_from_path("fixtures_rewards:ContainsReward", word="ok", bonus=0.5)
    assert contains(["p", "p"], ["ok!", "no"]) == [0.5, 0.0]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("fixtures_rewards", "must look like 'package.module:function'"),
        ("fixtures_rewards:", "must look like"),
        ("no_such_module_xyz:reward", "cannot import module 'no_such_module_xyz'"),
        ("fixtures_rewards:missing", "has no attribute 'missing'"),
        ("fixtures_rewards:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a callable"),
        ("fixtures_rewards:no_arguments", r"must accept \(prompts, completions, \*\*metadata\)"),
    ],
)
def test_load_reward_from_path_errors(path, message):
    with pytest.raises(ValueError, match=message):
        load_reward_from_path(path)


def test_class_reward_with_bad_arguments_fails_at_load_time():
    with pytest.raises(ValueError, match="cannot construct ContainsReward"):
        load_reward_from_path("fixtures_rewards:ContainsReward", colour="red")


# --- composition ----------------------------------------------------------------------------------


def test_weighted_sum_hand_computed():
    exact = ExactMatchVerifier()
    length = load_reward_from_path("fixtures_rewards:length_reward")
    total = WeightedSum([(2.0, exact), (-0.5, length)])
    # "#### 4": exact 1, length 6 -> 2 - 3 = -1; "5": exact 0, length 1 -> -0.5.
    assert total(["p", "q"], ["#### 4", "5"], answer=[4, 4]) == [-1.0, -0.5]
    assert total.last_components == {"exact_match": [1.0, 0.0], "length_reward": [6.0, 1.0]}
    with pytest.raises(RewardError, match="nan_reward"):
        WeightedSum([(1.0, exact), (1.0, load_reward_from_path("fixtures_rewards:nan_reward"))])(
            ["p", "q"], ["1", "2"], answer=[1, 2]
        )


def test_weighted_sum_duplicate_names_and_bad_weights():
    exact = ExactMatchVerifier()
    assert WeightedSum([(1.0, exact), (1.0, exact)]).term_names == ["exact_match", "exact_match_1"]
    with pytest.raises(ValueError, match="finite"):
        WeightedSum([(math.nan, exact)])
    with pytest.raises(ValueError, match="at least one"):
        WeightedSum([])


def test_running_normalisation_matches_welford_by_hand():
    length = load_reward_from_path("fixtures_rewards:length_reward")
    norm = RunningNormalizedReward(length, eps=1e-12)
    # Batch 1: values 1, 2, 3 -> mean 2, population std sqrt(2/3).
    out = norm(["p"] * 3, ["a", "ab", "abc"])
    std = math.sqrt(2 / 3)
    assert out == pytest.approx([-1 / std, 0.0, 1 / std])
    # Batch 2: value 4 -> statistics over 1..4: mean 2.5, std sqrt(1.25).
    assert norm(["p"], ["abcd"]) == pytest.approx([1.5 / math.sqrt(1.25)])
    assert (norm.count, norm.mean, norm.std) == (4, pytest.approx(2.5), pytest.approx(math.sqrt(1.25)))
    # Restored statistics give the same output; update=False freezes them.
    frozen = RunningNormalizedReward(length, eps=1e-12, update=False, clip=1.0)
    frozen.load_state_dict(norm.state_dict())
    assert frozen(["p", "p"], ["a", "abcdefgh"]) == pytest.approx([-1.0, 1.0])  # clipped to [-1, 1]
    assert frozen.count == 4


# --- config lookup --------------------------------------------------------------------------------


def test_build_reward_names_paths_and_specs():
    assert available_rewards() == ["exact_match", "factual_consistency", "nli"]
    exact = build_reward("exact_match", answer_format="hashes")
    assert exact.name == "exact_match" and exact([""], ["14 #### 3"], answer=[3]) == [1.0]
    assert build_reward("fixtures_rewards:length_reward")([""], ["abc"]) == [3.0]
    spec = {
        "weighted_sum": [
            {"weight": 1.0, "name": "exact_match"},
            {"weight": 0.5, "name": "fixtures_rewards:ContainsReward", "word": "####"},
        ]
    }
    assert build_reward(spec)(["", ""], ["#### 2", "2"], answer=[2, 3]) == [1.5, 0.0]
    normalised = build_reward({"name": "fixtures_rewards:length_reward", "normalize": True})
    assert normalised.name == "normalized_fixtures_rewards:length_reward"
    assert normalised(["", ""], ["a", "abc"]) == pytest.approx([-1.0, 1.0])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bleu", "unknown reward 'bleu'; use one of exact_match, factual_consistency, nli"),
        ({"weight": 1.0}, "needs 'name' or 'weighted_sum'"),
        ({"weighted_sum": [{"name": "exact_match"}]}, "item 0 must be a dict with a 'weight'"),
        ({"name": "exact_match", "colour": "red"}, "reward 'exact_match': bad arguments"),
        ("fixtures_rewards:missing", "has no attribute"),
    ],
)
def test_build_reward_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        build_reward(spec)
