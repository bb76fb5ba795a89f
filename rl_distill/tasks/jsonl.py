"""``jsonl``: prompts from a user's JSON Lines file.

Each non-blank line is a JSON object with a non-empty string ``prompt`` and optional fields:

- ``reference``: a reference completion (string or null);
- ``source``: a premise for the NLI reward (string), kept in metadata;
- ``answer``: a reference answer for the verifier (string or number), kept in metadata;
- any other field goes to metadata unchanged.

The prompt is kept as raw text: the chat template is applied later, at encoding time, by the rollout
engine. Every bad line is reported with the file name and its line number.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from rl_distill.tasks.base import Example, TaskData, register_task, split_disjoint

_MAX_REPORTED = 10  # bad lines listed in one error; the total is always given


def _parse_line(text: str) -> Example:
    """One line as an :class:`Example`; raises ``ValueError`` with a message without the location."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    prompt = record.pop("prompt", None)
    if prompt is None:
        raise ValueError("missing 'prompt'")
    if not isinstance(prompt, str):
        raise ValueError(f"'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("empty 'prompt'")
    reference = record.pop("reference", None)
    if reference is not None and not isinstance(reference, str):
        raise ValueError(f"'reference' must be a string or null, got {type(reference).__name__}")
    if "source" in record and not isinstance(record["source"], str):
        raise ValueError(f"'source' must be a string, got {type(record['source']).__name__}")
    answer = record.get("answer")
    if "answer" in record and (not isinstance(answer, str | int | float) or isinstance(answer, bool)):
        raise ValueError(f"'answer' must be a string or a number, got {type(answer).__name__}")
    return Example(prompt=prompt, reference=reference, metadata=record)


def read_jsonl(path: str | os.PathLike[str]) -> list[Example]:
    """Read and validate every line of ``path``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: bad lines (each listed as ``file:line: problem``), or no examples at all.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"jsonl task: no such file {str(path)!r}")
    examples: list[Example] = []
    errors: list[str] = []
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is reported like any bad line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is not content
            except UnicodeDecodeError as exc:
                byte = f"0x{raw[exc.start]:02x}"
                errors.append(
                    f"{path.name}:{lineno}: not UTF-8 text (byte {byte} at position {exc.start + 1})"
                )
                continue
            if not line.strip():
                continue  # blank lines (a trailing newline, spacing) are not records
            try:
                examples.append(_parse_line(line))
            except ValueError as exc:
                errors.append(f"{path.name}:{lineno}: {exc}")
    if len(errors) == 1:
        raise ValueError(f"bad line in {str(path)!r}: {errors[0]}")
    if errors:
        shown = "\n  ".join(errors[:_MAX_REPORTED])
        more = f"\n  ... and {len(errors) - _MAX_REPORTED} more" if len(errors) > _MAX_REPORTED else ""
        raise ValueError(f"{len(errors)} bad line(s) in {str(path)!r}:\n  {shown}{more}")
    if not examples:
        raise ValueError(f"jsonl task: {str(path)!r} has no examples (the file is empty or blank)")
    return examples


@register_task("jsonl")
def make_jsonl(
    *, path: str | os.PathLike[str] | None = None, seed: int = 0, num_train: int = 256, num_eval: int = 32
) -> TaskData:
    """Deterministic disjoint train/eval split of a user's JSONL prompts.

    Args:
        path: the JSONL file.
        seed: seed of the shuffle before the split.
        num_train: training examples.
        num_eval: held-out examples.

    Raises:
        ValueError: no ``path``, bad lines, an empty file, or fewer distinct prompts
            than ``num_train + num_eval``.
    """
    if path is None:
        raise ValueError("the jsonl task needs the option path= (a JSON Lines file)")
    examples = read_jsonl(path)
    distinct = len({ex.prompt for ex in examples})
    if distinct < len(examples):
        # Repeated prompts would otherwise land on both sides of the split; the last copy is kept.
        warnings.warn(
            f"{Path(path).name}: {len(examples) - distinct} repeated prompt(s) dropped", stacklevel=2
        )
    return split_disjoint(examples, num_train, num_eval, seed, "jsonl")
