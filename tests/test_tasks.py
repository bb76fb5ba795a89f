"""Tasks: deterministic disjoint splits, correct arithmetic chains, fact passages, jsonl validation."""

import json
import re
import string

import pytest

from rl_distill.tasks import available_tasks, load_task
from rl_distill.tasks.factual_summary import CITIES

PRINTABLE = set(string.printable) - set("\t\n\r\x0b\x0c")


@pytest.fixture
def jsonl_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": f"Question {i}?", "reference": f"Answer {i}.", "answer": i, "topic": "t"}
        for i in range(30)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def task_options(name, jsonl_file):
    return {"path": str(jsonl_file)} if name == "jsonl" else {}


def prompts(data):
    return [ex.prompt for ex in data.train], [ex.prompt for ex in data.eval]


def test_new_tasks_are_registered():
    assert {"arithmetic", "factual_summary", "jsonl", "instructions"} <= set(available_tasks())


@pytest.mark.parametrize("name", ["arithmetic", "factual_summary", "jsonl"])
def test_splits_are_deterministic_disjoint_and_seeded(name, jsonl_file):
    options = task_options(name, jsonl_file)
    a = load_task(name, seed=1, num_train=20, num_eval=6, **options)
    b = load_task(name, seed=1, num_train=20, num_eval=6, **options)
    c = load_task(name, seed=2, num_train=20, num_eval=6, **options)
    assert a == b  # same seed: same examples, same order
    assert prompts(a) != prompts(c)
    assert set(prompts(a)[1]) != set(prompts(c)[1])  # a different held-out set, not just another order
    train, eval_ = prompts(a)
    assert (len(train), len(eval_)) == (20, 6)
    assert not set(train) & set(eval_)
    assert len(set(train)) == 20


# --- arithmetic -----------------------------------------------------------------------------------

STEP = re.compile(r"(\d+)([+-])(\d+)=(\d+)\.")


def replay_chain(reference):
    """Re-evaluate every step of a reference; returns (start, [(op, n)], answer)."""
    body, _, final = reference.partition(" #### ")
    steps = STEP.findall(body)
    assert " ".join(f"{a}{op}{b}={c}." for a, op, b, c in steps) == body  # nothing but steps
    value = int(steps[0][0])
    for a, op, b, c in steps:
        assert int(a) == value  # each step continues from the previous result
        value = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert value == int(c) and value >= 0
    assert int(final) == value
    return int(steps[0][0]), [(op, int(b)) for _, op, b, _ in steps], value


@pytest.mark.parametrize(("digits", "steps"), [(1, 1), (2, 2), (3, 4)])
def test_arithmetic_chains_are_correct_and_match_the_prompt(digits, steps):
    data = load_task("arithmetic", seed=0, num_train=40, num_eval=8, digits=digits, steps=steps)
    for ex in data.train + data.eval:
        start, ops, answer = replay_chain(ex.reference)
        assert ex.metadata["answer"] == answer
        assert len(ops) == steps
        assert all(1 <= n < 10**digits for _, n in ops) and 1 <= start < 10**digits
        # The words prompt states the start and the operands in order, and nothing else numeric.
        assert [int(n) for n in re.findall(r"\d+", ex.prompt)] == [start] + [n for _, n in ops]
        assert ex.prompt.endswith(" How many?")
        assert set(ex.prompt + ex.reference) <= PRINTABLE and len(ex.prompt) <= 40 + 22 * steps


def test_arithmetic_compact_format():
    data = load_task("arithmetic", seed=5, num_train=10, num_eval=2, compact=True, steps=3)
    for ex in data.train:
        start, ops, answer = replay_chain(ex.reference)
        assert ex.prompt == f"{start}" + "".join(f"{op}{n}" for op, n in ops) + "=?"
        assert ex.metadata == {"answer": answer, "equation": ex.prompt[:-2]}


def test_arithmetic_verifier_accepts_the_references():
    from rl_distill.rewards import ExactMatchVerifier

    data = load_task("arithmetic", seed=0, num_train=16, num_eval=4)
    refs = [ex.reference for ex in data.train]
    answers = [ex.metadata["answer"] for ex in data.train]
    assert ExactMatchVerifier()([""] * 16, refs, answer=answers) == [1.0] * 16
    assert ExactMatchVerifier()([""] * 16, refs, answer=[a + 1 for a in answers]) == [0.0] * 16


def test_arithmetic_too_small_problem_space_and_bad_options():
    # 1 digit, 1 step, compact: at most 9 * 9 + 45 = 126 distinct problems.
    with pytest.raises(ValueError, match="distinct problems"):
        load_task("arithmetic", num_train=200, num_eval=10, digits=1, steps=1, compact=True)
    with pytest.raises(ValueError, match="digits"):
        load_task("arithmetic", digits=0)
    with pytest.raises(ValueError, match="steps"):
        load_task("arithmetic", steps=0)


# --- factual_summary ------------------------------------------------------------------------------


def test_factual_summary_examples_state_their_facts():
    data = load_task("factual_summary", seed=0, num_train=30, num_eval=5)
    for ex in data.train + data.eval:
        facts, source = ex.metadata["facts"], ex.metadata["source"]
        assert set(facts) == {"name", "city", "year", "count"} and facts["city"] in CITIES
        assert ex.prompt == f"Summarize: {source}"
        for value in facts.values():
            assert str(value) in source and str(value) in ex.reference
        assert not ex.metadata["hallucinated"]
        assert set(ex.prompt + ex.reference) <= PRINTABLE and len(source) <= 100


def test_factual_summary_hallucination_rate():
    clean = load_task("factual_summary", seed=4, num_train=40, num_eval=10)
    noisy = load_task("factual_summary", seed=4, num_train=40, num_eval=10, hallucination_rate=0.3)
    assert prompts(clean) == prompts(noisy)  # the same passages; only references change
    marked = [ex for ex in noisy.train if ex.metadata["hallucinated"]]
    assert len(marked) == 12
    for before, after in zip(clean.train, noisy.train):
        if not after.metadata["hallucinated"]:
            assert after == before
            continue
        field, wrong = after.metadata["hallucination"]["field"], after.metadata["hallucination"]["value"]
        assert (
            wrong != before.metadata["facts"][field] and after.metadata["facts"] == before.metadata["facts"]
        )
        # Exactly one word differs: the true value replaced by the wrong one.
        diff = [
            (x, y)
            for x, y in zip(re.findall(r"\w+", before.reference), re.findall(r"\w+", after.reference))
            if x != y
        ]
        assert diff == [(str(before.metadata["facts"][field]), str(wrong))]
    assert not any(ex.metadata["hallucinated"] for ex in noisy.eval)  # eval stays clean by default
    both = load_task(
        "factual_summary", seed=4, num_train=40, num_eval=10, hallucination_rate=0.3, hallucinate_eval=True
    )
    assert sum(ex.metadata["hallucinated"] for ex in both.eval) == 3
    with pytest.raises(ValueError, match="hallucination_rate"):
        load_task("factual_summary", hallucination_rate=1.5)


# --- jsonl ----------------------------------------------------------------------------------------


def test_jsonl_fields_and_metadata(jsonl_file):
    data = load_task("jsonl", path=str(jsonl_file), seed=0, num_train=25, num_eval=5)
    ex = next(ex for ex in data.train + data.eval if ex.prompt == "Question 7?")
    assert ex.reference == "Answer 7." and ex.metadata == {"answer": 7, "topic": "t"}


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"prompt": "ok", ', "invalid JSON"),
        ('["a list"]', "expected a JSON object, got list"),
        ('{"reference": "r"}', "missing 'prompt'"),
        ('{"prompt": "   "}', "empty 'prompt'"),
        ('{"prompt": 3}', "'prompt' must be a string, got int"),
        ('{"prompt": "p", "reference": 5}', "'reference' must be a string or null, got int"),
        ('{"prompt": "p", "source": ["s"]}', "'source' must be a string, got list"),
        ('{"prompt": "p", "answer": {"x": 1}}', "'answer' must be a string or a number, got dict"),
    ],
)
def test_jsonl_bad_line_reported_with_file_and_line_number(tmp_path, line, problem):
    path = tmp_path / "data.jsonl"
    # Line 3 is bad; line 2 is blank (skipped, but still counted).
    path.write_text('{"prompt": "first"}\n\n' + line + '\n{"prompt": "last"}\n')
    with pytest.raises(ValueError, match=re.escape(f"data.jsonl:3: {problem}")):
        load_task("jsonl", path=str(path), num_train=1, num_eval=1)


def test_jsonl_reports_every_bad_line(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(["{}"] * 12 + ['{"prompt": "fine"}']))
    with pytest.raises(ValueError, match=r"12 bad line\(s\)") as info:
        load_task("jsonl", path=str(path), num_train=1, num_eval=1)
    assert "many.jsonl:10: missing 'prompt'" in str(info.value) and "... and 2 more" in str(info.value)


def test_jsonl_empty_missing_and_too_small(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="has no examples"):
        load_task("jsonl", path=str(empty), num_train=1, num_eval=1)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_task("jsonl", path=str(tmp_path / "nope.jsonl"), num_train=1, num_eval=1)
    with pytest.raises(ValueError, match="needs the option path="):
        load_task("jsonl", num_train=1, num_eval=1)
    small = tmp_path / "small.jsonl"
    small.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "a"}\n')
    with (
        pytest.warns(UserWarning, match="1 repeated prompt"),
        pytest.raises(ValueError, match="2 distinct prompts"),
    ):
        load_task("jsonl", path=str(small), num_train=2, num_eval=1)
