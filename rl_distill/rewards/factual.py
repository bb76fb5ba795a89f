"""``factual_consistency``: a programmatic fact checker for the ``factual_summary`` task.

It parses the facts a completion states (named entities, places, numbers, years) and checks each one
against the source's fact table (metadata ``facts``). Being exact and cheap, it is the ground truth
for hallucination-rate measurements, where an NLI model would be a noisy proxy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from rl_distill.rewards.verifier import parse_number

_PLACE_KEYS = frozenset({"city", "place", "country", "location", "town", "region"})
_DATE_KEYS = frozenset({"year", "date"})
# Numbers without sign (a "-" in text is a dash); thousands groups of exactly three digits.
_NUMBER = re.compile(r"(?<![\w.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
# Runs of capitalised words separated by single spaces: candidate names and places.
_CAPITALISED_RUN = re.compile(r"\b[A-Z][a-zA-Z'-]*(?: [A-Z][a-zA-Z'-]*)*")
# Capitalised words that are not entities: sentence starters, pronouns, months (the year is the fact).
STOPWORDS = frozenset(
    """a an the this that these those it its he she his her him they their them we our i you your
    in on at by for from to of with into after before during since until about as and but or so
    then later now there here today also when while where what who which how yes no not one day
    born summary summarize answer note first last
    january february march april may june july august september october november december
    monday tuesday wednesday thursday friday saturday sunday""".split()
)


@dataclass(frozen=True)
class FactCheck:
    """The verdict on one completion.

    Attributes:
        supported: stated facts found in the table, by table key (each key once).
        unsupported: stated facts the table says nothing about (an invented person, an extra date).
        contradicted: stated facts that conflict with a table entry (a wrong city, year or count).
        coverage: fraction of the table's checkable facts that the completion states correctly.
        score: the reward, see :class:`FactualConsistencyReward`.
    """

    supported: tuple[str, ...]
    unsupported: tuple[str, ...]
    contradicted: tuple[str, ...]
    coverage: float
    score: float

    @property
    def num_stated(self) -> int:
        """Number of distinct facts the completion states."""
        return len(self.supported) + len(self.unsupported) + len(self.contradicted)

    @property
    def hallucinated(self) -> bool:
        """Whether the completion states any unsupported or contradicted fact."""
        return bool(self.unsupported or self.contradicted)


def hallucination_rate(checks: Iterable[FactCheck]) -> float:
    """Fraction of completions stating at least one unsupported or contradicted fact (0.0 for none)."""
    checks = list(checks)
    return sum(c.hallucinated for c in checks) / len(checks) if checks else 0.0


class FactualConsistencyReward:
    """Score completions by the facts they state, checked against a fact table.

    **Parsing.** Numbers (``1,234`` and decimals included; number words are not parsed) and runs of
    capitalised words that are not in :data:`STOPWORDS` (``"Anna Berg"``, ``"Oslo"``). Facts are
    counted once each: two mentions of the same person are one fact.

    **Checking** against the table ``{"name": ..., "city": ..., "year": ..., "count": ...}`` (keys named
    like a place - city, country, ... - are places; ``year``/``date`` keys are dates; other numeric
    values are numbers; other strings are entities):

    - a number equal to a numeric table value is *supported*; otherwise it is *contradicted* if the table
      has a value of its kind (a 4-digit integer in 1000-2100 is a date, anything else a number), and
      *unsupported* if not;
    - a name whose words are all words of a table value (``"Berg"`` for ``"Anna Berg"``) is *supported*;
    - a known place (``known_places``, default the task's cities) that is not the table's place is
      *contradicted* if the table has a place, else *unsupported*;
    - a name sharing some but not all words with a table entity (``"Anna Smith"``) is *contradicted*;
    - any other name is *unsupported* (an invented entity).

    **Score.** With ``S``, ``U``, ``C`` the numbers of supported, unsupported and contradicted facts and
    ``N = S + U + C``::

        precision = (S - contradiction_penalty * C) / N        # in [-contradiction_penalty, 1]
        score = (1 - coverage_weight) * precision + coverage_weight * coverage

    where ``coverage`` is the fraction of table facts stated and supported. An empty completion, or one
    stating no fact at all, scores 0.0. Examples with the table above: ``"Anna Berg, born in Oslo in
    1987, wrote 12 books."`` scores 1.0; with ``15 books`` instead, 0.5; ``"Anna Berg met Tom Hall in
    Oslo in 1987."`` 0.75.

    Per-completion details of the last call are in :attr:`last_checks` (see :class:`FactCheck`); use
    :meth:`check` for one completion and :func:`hallucination_rate` to aggregate.

    Args:
        contradiction_penalty: weight of a contradicted fact (``>= 0``; 0 treats it as merely unsupported).
        coverage_weight: weight in ``[0, 1]`` of coverage in the score; above 0 it rewards stating the
            table's facts, not only avoiding wrong ones.
        known_places: the gazetteer for recognising places; default the ``factual_summary`` cities.
        ignore_words: extra capitalised words that are not entities.
        facts_key: the metadata key holding the fact tables (dicts, or JSON strings of dicts).
    """

    name = "factual_consistency"

    def __init__(
        self,
        *,
        contradiction_penalty: float = 1.0,
        coverage_weight: float = 0.0,
        known_places: Iterable[str] | None = None,
        ignore_words: Iterable[str] = (),
        facts_key: str = "facts",
    ) -> None:
        if contradiction_penalty < 0:
            raise ValueError(f"contradiction_penalty must be >= 0, got {contradiction_penalty}")
        if not 0.0 <= coverage_weight <= 1.0:
            raise ValueError(f"coverage_weight must be in [0, 1], got {coverage_weight}")
        if known_places is None:
            from rl_distill.tasks.factual_summary import CITIES

            known_places = CITIES
        self.contradiction_penalty = contradiction_penalty
        self.coverage_weight = coverage_weight
        self.known_places = frozenset(p.casefold() for p in known_places)
        self.stopwords = STOPWORDS | {w.casefold() for w in ignore_words}
        self.facts_key = facts_key
        self.last_checks: list[FactCheck] = []

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **metadata: Any) -> list[float]:
        """Score each completion against its fact table; details go to :attr:`last_checks`."""
        if self.facts_key not in metadata:
            raise ValueError(f"factual_consistency needs the fact tables as metadata {self.facts_key!r}")
        self.last_checks = [
            self.check(c, f) for c, f in zip(completions, metadata[self.facts_key], strict=True)
        ]
        return [c.score for c in self.last_checks]

    def check(self, completion: str, facts: dict[str, Any] | str) -> FactCheck:
        """Check one completion against one fact table (a dict or its JSON string)."""
        table = _Table(json.loads(facts) if isinstance(facts, str) else facts)
        verdicts: dict[str, set[str]] = {"supported": set(), "unsupported": set(), "contradicted": set()}
        for number in _NUMBER.findall(completion):
            verdict, fact = table.check_number(number)
            verdicts[verdict].add(fact)
        for name in self.entities(completion):
            verdict, fact = table.check_name(name, self.known_places)
            verdicts[verdict].add(fact)
        return self._verdict(table, verdicts)

    def entities(self, text: str) -> list[str]:
        """The capitalised word runs in ``text``, split at stopwords (``"In Oslo"`` -> ``["Oslo"]``)."""
        found = []
        for run in _CAPITALISED_RUN.findall(text):
            current: list[str] = []
            for word in [*run.split(" "), ""]:  # "" flushes the last run
                if word and word.casefold() not in self.stopwords:
                    current.append(word)
                elif current:
                    found.append(" ".join(current))
                    current = []
        return found

    def _verdict(self, table: _Table, verdicts: dict[str, set[str]]) -> FactCheck:
        s, u, c = (len(verdicts[k]) for k in ("supported", "unsupported", "contradicted"))
        coverage = len(verdicts["supported"] & set(table.kinds)) / len(table.kinds) if table.kinds else 0.0
        if s + u + c == 0:
            score = 0.0  # nothing stated (empty completion included): nothing to reward
        else:
            precision = (s - self.contradiction_penalty * c) / (s + u + c)
            score = (1.0 - self.coverage_weight) * precision + self.coverage_weight * coverage
        return FactCheck(
            supported=tuple(sorted(verdicts["supported"])),
            unsupported=tuple(sorted(verdicts["unsupported"])),
            contradicted=tuple(sorted(verdicts["contradicted"])),
            coverage=coverage,
            score=score,
        )


class _Table:
    """A fact table with each key's kind: ``place``, ``date``, ``number`` or ``entity``."""

    def __init__(self, facts: dict[str, Any]) -> None:
        if not isinstance(facts, dict):
            raise TypeError(f"a fact table must be a dict, got {type(facts).__name__}")
        self.facts = {k: v for k, v in facts.items() if v is not None and not isinstance(v, bool)}
        self.kinds = {key: _kind(key, value) for key, value in self.facts.items()}
        self.numbers = {
            key: parse_number(str(value))
            for key, value in self.facts.items()
            if self.kinds[key] in ("date", "number")
        }

    def keys_of(self, kind: str) -> list[str]:
        return [key for key, k in self.kinds.items() if k == kind]

    def check_number(self, text: str) -> tuple[str, str]:
        """``(verdict, fact)`` for a stated number; ``fact`` is the table key when supported."""
        value = parse_number(text)
        assert value is not None  # the regex only finds well-formed numbers
        for key, table_value in self.numbers.items():
            if table_value == value:
                return "supported", key
        kind = "date" if _is_year(text, value) else "number"
        verdict = "contradicted" if self.keys_of(kind) else "unsupported"
        return verdict, f"{kind}:{value}"

    def check_name(self, name: str, known_places: frozenset[str]) -> tuple[str, str]:
        """``(verdict, fact)`` for a stated capitalised name; ``fact`` is the table key when supported."""
        words = set(name.casefold().split())
        strings = {
            k: str(v).casefold() for k, v in self.facts.items() if self.kinds[k] in ("place", "entity")
        }
        for key, value in strings.items():
            if words <= set(value.split()):
                return "supported", key
        if name.casefold() in known_places:
            return ("contradicted" if self.keys_of("place") else "unsupported"), f"place:{name}"
        for key in self.keys_of("entity"):
            if words & set(strings[key].split()):
                return "contradicted", f"{key}:{name}"
        return "unsupported", f"entity:{name}"


def _kind(key: str, value: Any) -> str:
    key = key.casefold()
    if parse_number(str(value)) is not None:
        return "date" if key in _DATE_KEYS or key.endswith("year") else "number"
    return "place" if key in _PLACE_KEYS else "entity"


def _is_year(text: str, value: Decimal) -> bool:
    return text.isdigit() and len(text) == 4 and 1000 <= value <= 2100
