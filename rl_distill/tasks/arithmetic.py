"""``arithmetic``: multi-step addition/subtraction word problems with chain-of-thought references.

A problem starts from a number and applies ``steps`` additions or subtractions of numbers with up to
``digits`` digits; a subtraction never takes more than there is, so every intermediate value is >= 0.

- default: ``"Tom has 12 apples. He gets 7 more. He gives away 5. How many?"``
- ``compact=True``: ``"12+7-5=?"``

The reference is the chain ``"12+7=19. 19-5=14. #### 14"`` (what :class:`ExactMatchVerifier` reads),
and ``metadata["answer"]`` is the final value as an int. The vocabulary is small and regular and all
text is printable ASCII, so tiny character-level teachers can learn the task.
"""

from __future__ import annotations

import random

from rl_distill.tasks.base import Example, TaskData, register_task, split_disjoint

# (name, pronoun) pairs, object nouns, and the phrasings of each operation.
PEOPLE = [("Tom", "He"), ("Ann", "She"), ("Sam", "He"), ("Mia", "She"), ("Ben", "He"), ("Eva", "She")]
ITEMS = ["apples", "pens", "cards", "coins", "books", "eggs"]
ADD_PHRASES = ["{p} gets {n} more.", "{p} finds {n} more.", "{p} buys {n} more."]
SUB_PHRASES = ["{p} gives away {n}.", "{p} loses {n}.", "{p} sells {n}."]


def chain_reference(start: int, ops: list[tuple[str, int]]) -> tuple[str, int]:
    """The chain-of-thought reference and the answer, e.g. ``("12+7=19. 19-5=14. #### 14", 14)``."""
    value, parts = start, []
    for op, n in ops:
        new = value + n if op == "+" else value - n
        parts.append(f"{value}{op}{n}={new}.")
        value = new
    return " ".join(parts) + f" #### {value}", value


def _random_problem(rng: random.Random, digits: int, steps: int) -> tuple[int, list[tuple[str, int]]]:
    high = 10**digits - 1
    start = rng.randint(1, high)
    value, ops = start, []
    for _ in range(steps):
        # Subtract only when something is left, and never more than is left: no negative counts.
        if value > 0 and rng.random() < 0.5:
            n = rng.randint(1, min(value, high))
            ops.append(("-", n))
            value -= n
        else:
            n = rng.randint(1, high)
            ops.append(("+", n))
            value += n
    return start, ops


def _prompt(rng: random.Random, start: int, ops: list[tuple[str, int]], compact: bool) -> str:
    if compact:
        return f"{start}" + "".join(f"{op}{n}" for op, n in ops) + "=?"
    name, pronoun = rng.choice(PEOPLE)
    sentences = [f"{name} has {start} {rng.choice(ITEMS)}."]
    for op, n in ops:
        sentences.append(rng.choice(ADD_PHRASES if op == "+" else SUB_PHRASES).format(p=pronoun, n=n))
    return " ".join(sentences) + " How many?"


def make_problem(rng: random.Random, *, digits: int, steps: int, compact: bool = False) -> Example:
    """One random problem drawn from ``rng``."""
    start, ops = _random_problem(rng, digits, steps)
    reference, answer = chain_reference(start, ops)
    equation = f"{start}" + "".join(f"{op}{n}" for op, n in ops)
    return Example(
        prompt=_prompt(rng, start, ops, compact),
        reference=reference,
        metadata={"answer": answer, "equation": equation},
    )


@register_task("arithmetic")
def make_arithmetic(
    *,
    seed: int = 0,
    num_train: int = 256,
    num_eval: int = 32,
    digits: int = 2,
    steps: int = 2,
    compact: bool = False,
) -> TaskData:
    """Deterministic train/eval split of generated arithmetic word problems.

    Args:
        seed: seeds generation and the split.
        num_train: training examples.
        num_eval: held-out examples.
        digits: the largest operand has this many digits (1 to 6).
        steps: number of additions/subtractions (1 to 8).
        compact: ``"12+7-5=?"`` instead of a short story.

    Raises:
        ValueError: an option out of range, or too few distinct problems for the requested sizes.
    """
    if not 1 <= digits <= 6:
        raise ValueError(f"digits must be in 1..6, got {digits}")
    if not 1 <= steps <= 8:
        raise ValueError(f"steps must be in 1..8, got {steps}")
    rng = random.Random(seed)
    needed = num_train + num_eval
    pool: dict[str, Example] = {}
    # Small problem spaces (1 digit, 1 step, compact) run out of distinct prompts: give up after a
    # generous number of draws instead of looping forever.
    for _ in range(20 * needed + 1000):
        example = make_problem(rng, digits=digits, steps=steps, compact=compact)
        pool.setdefault(example.prompt, example)
        if len(pool) == needed:
            break
    else:
        raise ValueError(
            f"arithmetic with digits={digits}, steps={steps}, compact={compact} gave only {len(pool)} "
            f"distinct problems, fewer than num_train + num_eval = {needed}; increase digits or steps"
        )
    return split_disjoint(list(pool.values()), num_train, num_eval, seed, "arithmetic")
