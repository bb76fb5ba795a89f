r"""``few_shot_arithmetic``: one operation on two numbers after a few solved examples, fixed answer format.

Every prompt is the same ``shots`` solved problems followed by the query, in a format a small base or
instruct model continues without a chat template. Two styles:

- ``hashes`` (default)::

      Q: 23 + 45
      A: #### 68

      Q: 36 + 17
      A:

  reference ``" #### 53"``;
- ``equation``: ``"964 + 1 = 965\n494 + 1 = 495\n508 + 1 ="``, reference ``" 509"``.

Operands have ``digits`` and ``digits_b`` digits, or the second is fixed (``fixed_b``: ``a + 1``,
``a * 10``). ``metadata["answer"]`` is the value as an int, ``metadata["equation"]`` e.g. ``"508+1"``.
The completion is graded by :data:`ANSWER_PATTERN` (``exact_match`` with ``pattern=ANSWER_PATTERN``):
the completion must *open* with the answer, so whatever a raw language model writes after it (the
next problem) is ignored, and an answer in another format scores 0.

The solved examples are drawn first from the seed and never appear as train or eval queries.
"""

from __future__ import annotations

import random

from rl_distill.tasks.base import Example, TaskData, register_task, split_disjoint

#: ``exact_match`` pattern: the completion opens with the answer (``#### N``, or ``N`` in the equation
#: style); leading spaces allowed.
ANSWER_PATTERN = r"\A\s*(?:####\s*)?(?P<answer>-?\d+)"

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
STYLES = ("hashes", "equation")


def _span(digits: int) -> tuple[int, int]:
    """The operand range of ``digits`` digits: 1-9, 10-99, 100-999, ..."""
    return (10 ** (digits - 1) if digits > 1 else 1), 10**digits - 1


def _operands(
    rng: random.Random, op: str, digits: int, digits_b: int, fixed_b: int | None
) -> tuple[int, int]:
    """Operands with ``digits`` and ``digits_b`` digits (or ``fixed_b``); a subtraction never goes below zero."""
    a = rng.randint(*_span(digits))
    b = rng.randint(*_span(digits_b)) if fixed_b is None else fixed_b
    if op == "-" and b > a:
        a, b = b, a
    return a, b


def query(a: int, op: str, b: int, style: str) -> str:
    r"""The unanswered problem: ``"Q: 23 + 45\nA:"`` (hashes) or ``"23 + 45 ="`` (equation)."""
    return f"Q: {a} {op} {b}\nA:" if style == "hashes" else f"{a} {op} {b} ="


def solved(a: int, op: str, b: int, style: str = "hashes") -> str:
    r"""One solved example: ``"Q: 23 + 45\nA: #### 68"`` (hashes) or ``"23 + 45 = 68"`` (equation)."""
    answer = OPERATIONS[op](a, b)
    return (
        f"{query(a, op, b, style)} #### {answer}"
        if style == "hashes"
        else f"{query(a, op, b, style)} {answer}"
    )


@register_task("few_shot_arithmetic")
def make_few_shot_arithmetic(
    *,
    seed: int = 0,
    num_train: int = 256,
    num_eval: int = 256,
    op: str = "+",
    digits: int = 2,
    digits_b: int | None = None,
    fixed_b: int | None = None,
    shots: int = 4,
    style: str = "hashes",
) -> TaskData:
    """Deterministic train/eval split of few-shot single-operation problems.

    Args:
        seed: seeds the solved examples, the problems and the split.
        num_train: training examples.
        num_eval: held-out examples.
        op: the operation, ``"+"``, ``"-"`` or ``"*"``.
        digits: the first operand has exactly this many digits (1 to 4; 1 means 1-9).
        digits_b: digits of the second operand (default: ``digits``).
        fixed_b: a fixed second operand (e.g. ``1`` for ``a + 1``, ``10`` for ``a * 10``) instead of a
            random one.
        shots: solved examples before the query (0 to 16).
        style: ``"hashes"`` (``Q: a + b`` / ``A: #### c`` blocks, a blank line between them) or
            ``"equation"`` (``a + b = c`` lines).

    Raises:
        ValueError: an option out of range, or fewer distinct problems than ``num_train + num_eval``.
    """
    if op not in OPERATIONS:
        raise ValueError(f"op must be one of {', '.join(OPERATIONS)}, got {op!r}")
    if not 1 <= digits <= 4:
        raise ValueError(f"digits must be in 1..4, got {digits}")
    digits_b = digits if digits_b is None else digits_b
    if not 1 <= digits_b <= 4:
        raise ValueError(f"digits_b must be in 1..4, got {digits_b}")
    if not 0 <= shots <= 16:
        raise ValueError(f"shots must be in 0..16, got {shots}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    needed = num_train + num_eval
    (lo_a, hi_a), (lo_b, hi_b) = _span(digits), _span(digits_b)
    # Subtraction orders the pair, so it has about half as many distinct problems.
    count_b = 1 if fixed_b is not None else hi_b - lo_b + 1
    space = (hi_a - lo_a + 1) * count_b // (2 if op == "-" and digits == digits_b and fixed_b is None else 1)
    if space - shots < needed:
        raise ValueError(
            f"few_shot_arithmetic with op={op!r}, digits={digits}, digits_b={digits_b} has about "
            f"{space - shots} distinct problems, fewer than num_train + num_eval = {needed}; increase digits"
        )
    rng = random.Random(seed)
    examples = [_operands(rng, op, digits, digits_b, fixed_b) for _ in range(shots)]
    gap = "\n\n" if style == "hashes" else "\n"
    prefix = "".join(solved(a, op, b, style) + gap for a, b in examples)
    used = set(examples)
    pool: list[Example] = []
    while len(pool) < needed:
        a, b = _operands(rng, op, digits, digits_b, fixed_b)
        if (a, b) in used:
            continue
        used.add((a, b))
        answer = OPERATIONS[op](a, b)
        pool.append(
            Example(
                prompt=prefix + query(a, op, b, style),
                reference=f" #### {answer}" if style == "hashes" else f" {answer}",
                metadata={"answer": answer, "equation": f"{a}{op}{b}"},
            )
        )
    return split_disjoint(pool, num_train, num_eval, seed, "few_shot_arithmetic")
