"""The ``few_shot_arithmetic`` task: prompt format, answers, split, grading pattern and errors."""

import re

import pytest

from rl_distill.rewards.registry import build_reward, score_examples
from rl_distill.tasks import available_tasks, load_task, task_options
from rl_distill.tasks.few_shot_arithmetic import ANSWER_PATTERN, solved


def operands(example):
    a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)", example.metadata["equation"]).groups()
    return int(a), op, int(b)


def test_registered_with_its_options():
    assert "few_shot_arithmetic" in available_tasks()
    assert task_options("few_shot_arithmetic") == ["digits", "digits_b", "fixed_b", "op", "shots", "style"]


def test_equation_prompt_is_the_solved_examples_then_the_query():
    data = load_task(
        "few_shot_arithmetic", num_train=3, num_eval=2, digits=3, fixed_b=1, shots=2, style="equation"
    )
    ex = data.eval[0]
    lines = ex.prompt.split("\n")
    assert len(lines) == 3  # two solved examples, then the query
    for line in lines[:2]:
        a, b, c = map(int, re.fullmatch(r"(\d+) \+ (\d+) = (\d+)", line).groups())
        assert b == 1 and c == a + 1 and 100 <= a <= 999
    a, op, b = operands(ex)
    assert lines[2] == f"{a} + 1 =" and (op, b) == ("+", 1)
    assert ex.reference == f" {a + 1}" and ex.metadata["answer"] == a + 1
    # Every prompt shares the same solved examples.
    assert all(e.prompt.rsplit("\n", 1)[0] == ex.prompt.rsplit("\n", 1)[0] for e in data.train + data.eval)


def test_hashes_prompt_format():
    data = load_task("few_shot_arithmetic", seed=3, num_train=2, num_eval=1, op="*", digits=2, shots=1)
    ex = data.eval[0]
    a, op, b = operands(ex)
    shot, query = ex.prompt.split("\n\n")
    assert re.fullmatch(r"Q: \d\d \* \d\d\nA: #### \d+", shot)
    assert query == f"Q: {a} * {b}\nA:" and ex.reference == f" #### {a * b}"
    assert solved(12, "*", 3) == "Q: 12 * 3\nA: #### 36" and solved(12, "-", 3, "equation") == "12 - 3 = 9"


@pytest.mark.parametrize("op", ["+", "-", "*"])
def test_answers_are_right_and_subtraction_never_negative(op):
    data = load_task("few_shot_arithmetic", seed=1, num_train=40, num_eval=10, op=op, digits=2, digits_b=1)
    for ex in data.train + data.eval:
        a, got_op, b = operands(ex)
        assert got_op == op and 10 <= a <= 99 and 1 <= b <= 9
        assert ex.metadata["answer"] == {"+": a + b, "-": a - b, "*": a * b}[op] >= 0


def test_split_is_deterministic_disjoint_and_excludes_the_solved_examples():
    kwargs = {"seed": 5, "num_train": 30, "num_eval": 20, "digits": 2, "shots": 4, "style": "equation"}
    first, again = load_task("few_shot_arithmetic", **kwargs), load_task("few_shot_arithmetic", **kwargs)
    assert [e.prompt for e in first.train + first.eval] == [e.prompt for e in again.train + again.eval]
    queries = [e.prompt.rsplit("\n", 1)[-1] for e in first.train + first.eval]
    assert len(set(queries)) == 50  # train and eval disjoint, no repeat
    shots = {line.rsplit(" = ", 1)[0] + " =" for line in first.eval[0].prompt.split("\n")[:-1]}
    assert len(shots) == 4 and not shots & set(queries)
    other = load_task("few_shot_arithmetic", **{**kwargs, "seed": 6})
    assert [e.prompt for e in other.eval] != [e.prompt for e in first.eval]


def test_answer_pattern_grades_only_the_opening_number():
    data = load_task("few_shot_arithmetic", num_train=1, num_eval=1, digits=3, fixed_b=1, style="equation")
    ex = data.eval[0]
    right = ex.metadata["answer"]
    verifier = build_reward({"name": "exact_match", "pattern": ANSWER_PATTERN})
    completions = [
        f" {right}\n{right + 5} + 1 = {right + 6}",  # the model runs on: later numbers are ignored
        f" #### {right}\n\nQ:",
        f" {right + 1}\n{right - 1} + 1 = {right}",  # wrong first answer, right number later
        f"The answer is {right}",  # not the fixed format
        "",
    ]
    assert score_examples(verifier, [ex] * len(completions), completions) == [1.0, 1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"op": "/"}, "op must be one of"),
        ({"digits": 5}, "digits must be in 1..4"),
        ({"digits_b": 0}, "digits_b must be in 1..4"),
        ({"shots": 17}, "shots must be in 0..16"),
        ({"style": "chat"}, "style must be one of"),
        ({"digits": 1, "fixed_b": 1}, "distinct problems, fewer than num_train \\+ num_eval = 20"),
    ],
)
def test_bad_options_fail_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        load_task("few_shot_arithmetic", num_train=10, num_eval=10, **options)
