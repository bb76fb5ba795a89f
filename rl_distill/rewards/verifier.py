"""``exact_match``: a verifier that extracts a completion's final answer and compares it with a reference."""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

# A number: optional minus sign (not when it follows a digit or letter: "19-5" is a subtraction),
# thousands groups of exactly three digits ("1,234"; "1,2,3" is three numbers), an optional decimal part.
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")

AnswerFormat = Literal["auto", "hashes", "boxed", "last_number"]


def parse_number(text: str) -> Decimal | None:
    """The number written in ``text`` (commas, a leading ``$`` and a trailing ``.`` allowed), or ``None``.

    >>> parse_number("1,234.50")
    Decimal('1234.50')
    """
    cleaned = text.strip().removeprefix("$").rstrip(".").replace(",", "").strip()
    if not re.fullmatch(r"-?\d+(?:\.\d+)?", cleaned):
        return None
    try:
        return Decimal(cleaned)
    except InvalidOperation:  # pragma: no cover - the regex already guarantees a valid literal
        return None


def last_number(text: str) -> str | None:
    """The last number in ``text`` as written (``"-1,234.5"``), or ``None`` if there is none."""
    matches = _NUMBER.findall(text)
    return matches[-1] if matches else None


def _marked_answer(text: str, marker: re.Pattern[str]) -> str | None:
    """The content of the last ``marker`` match, reduced to its first number when it has one."""
    matches = marker.findall(text)
    if not matches:
        return None
    content = matches[-1].strip()
    number = _NUMBER.search(content)
    return number.group(0) if number else content


class ExactMatchVerifier:
    r"""Reward 1.0 when a completion's final answer equals the reference answer, else 0.0.

    The answer is extracted from the completion as follows (``answer_format``):

    - ``"auto"`` (default): the last ``\boxed{...}``, else the last ``#### ...``, else the last number;
    - ``"boxed"`` / ``"hashes"``: only that marker (no marker: 0.0);
    - ``"last_number"``: the last number in the text;
    - ``pattern``: a user regex; its last match is used, taking the group named ``answer``, else group 1,
      else the whole match. It overrides ``answer_format``.

    Answers that parse as numbers are compared as exact decimals, so ``"1,234"`` equals ``1234`` and
    ``"3.50"`` equals ``3.5``; negative numbers keep their sign (a ``-`` right after a digit is a
    subtraction, not a sign). Non-numeric answers are compared as case-folded, whitespace-collapsed
    strings. A completion with no extractable answer scores 0.0.

    With ``format_credit > 0`` a wrong answer that was given in the explicit format (a ``\boxed{}``,
    ``####`` or ``pattern`` match, not a bare last number) scores ``format_credit`` instead of 0.0.

    Args:
        answer_format: how to find the answer, see above.
        pattern: a user regex for the answer (overrides ``answer_format``).
        format_credit: partial credit in ``[0, 1)`` for a well-formatted wrong answer.
        answer_key: the metadata key holding the reference answers.
    """

    name = "exact_match"

    def __init__(
        self,
        *,
        answer_format: AnswerFormat = "auto",
        pattern: str | None = None,
        format_credit: float = 0.0,
        answer_key: str = "answer",
    ) -> None:
        if answer_format not in ("auto", "hashes", "boxed", "last_number"):
            raise ValueError(
                f"answer_format must be auto, hashes, boxed or last_number, got {answer_format!r}"
            )
        if not 0.0 <= format_credit < 1.0:
            raise ValueError(f"format_credit must be in [0, 1), got {format_credit}")
        self.answer_format = answer_format
        self.pattern = re.compile(pattern) if pattern is not None else None
        self.format_credit = format_credit
        self.answer_key = answer_key

    def extract(self, completion: str) -> tuple[str | None, bool]:
        r"""Extract the final answer.

        Returns:
            ``(answer, formatted)``: the answer text (``None`` when nothing is found) and whether it came
            from an explicit marker (``\boxed``, ``####`` or the user pattern) rather than a bare number.
        """
        if self.pattern is not None:
            return self._extract_pattern(completion)
        if self.answer_format in ("auto", "boxed"):
            boxed = _marked_answer(completion, _BOXED)
            if boxed is not None or self.answer_format == "boxed":
                return boxed, boxed is not None
        if self.answer_format in ("auto", "hashes"):
            hashes = _marked_answer(completion, _HASHES)
            if hashes is not None or self.answer_format == "hashes":
                return hashes, hashes is not None
        return last_number(completion), False

    def _extract_pattern(self, completion: str) -> tuple[str | None, bool]:
        assert self.pattern is not None
        matches = list(self.pattern.finditer(completion))
        if not matches:
            return None, False
        match = matches[-1]
        if "answer" in self.pattern.groupindex:
            text = match.group("answer")
        elif self.pattern.groups >= 1:
            text = match.group(1)
        else:
            text = match.group(0)
        return (text.strip() if text is not None else None), True

    def is_correct(self, answer: str | None, reference: Any) -> bool:
        """Whether the extracted ``answer`` equals ``reference`` (numerically when both are numbers)."""
        if answer is None or reference is None:
            return False
        ref_text = str(reference)
        got, want = parse_number(answer), parse_number(ref_text)
        if got is not None and want is not None:
            return got == want
        return _normalise(answer) == _normalise(ref_text)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **metadata: Any) -> list[float]:
        """Score each completion against ``metadata[answer_key]``: 1.0, ``format_credit`` or 0.0."""
        if self.answer_key not in metadata:
            raise ValueError(f"exact_match needs the reference answers as metadata {self.answer_key!r}")
        scores = []
        for completion, reference in zip(completions, metadata[self.answer_key], strict=True):
            answer, formatted = self.extract(completion)
            if self.is_correct(answer, reference):
                scores.append(1.0)
            else:
                scores.append(self.format_credit if formatted and answer is not None else 0.0)
        return scores


def _normalise(text: str) -> str:
    return " ".join(text.strip().rstrip(".").casefold().split())
