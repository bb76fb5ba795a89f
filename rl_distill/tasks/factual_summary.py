"""``factual_summary``: summarise a short templated passage of facts in one sentence.

Each passage states four facts about one person, kept in a fact table (metadata ``facts``):
``{"name": "Anna Berg", "city": "Oslo", "year": 1987, "count": 12}``. The prompt is
``"Summarize: <passage>"``; the passage itself is metadata ``source`` (the premise for the NLI reward)
and the table is what :class:`rl_distill.rewards.FactualConsistencyReward` checks against.

``hallucination_rate`` corrupts that fraction of the training references with one unsupported fact (a
wrong city, year or count), for experiments that train a teacher on noisy data; such examples carry
``metadata["hallucinated"] = True`` and ``metadata["hallucination"] = {"field", "value"}``. The fact
table and the source stay true. Eval references stay clean unless ``hallucinate_eval=True``.

Everything is printable ASCII and short (passages of about 80 characters), for character-level models.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from rl_distill.tasks.base import Example, TaskData, register_task, split_disjoint

FIRST_NAMES = "Anna Ben Clara David Emma Felix Grace Hugo Ida Jonas Lena Omar".split()
LAST_NAMES = "Berg Costa Dahl Evans Fischer Garcia Hansen Ito Kim Lopez Meyer".split()
#: Cities used in passages; also the gazetteer the factual checker uses to recognise a (wrong) place.
CITIES = "Oslo Lima Cairo Paris Rome Berlin Madrid Vienna Dublin Tokyo Quito Lisbon".split()
YEARS = range(1900, 2020)
COUNTS = range(2, 100)  # never year-shaped, so a number's role is clear from its form

# (passage, reference summary); {last} is the surname alone, as a second mention of the person.
TEMPLATES = [
    (
        "{name} was born in {city} in {year}. {last} later wrote {count} books.",
        "{name}, born in {city} in {year}, wrote {count} books.",
    ),
    (
        "In {year}, {name} opened a bakery in {city}. It sold {count} cakes on the first day.",
        "{name} opened a bakery in {city} in {year} and sold {count} cakes on day one.",
    ),
    (
        "{name} moved to {city} in {year}. There {last} planted {count} trees.",
        "{name} moved to {city} in {year} and planted {count} trees.",
    ),
    (
        "{name} founded a school in {city} in {year}. The school now has {count} teachers.",
        "{name} founded a school in {city} in {year} that has {count} teachers.",
    ),
]
PROMPT = "Summarize: {passage}"


def _random_fields(rng: random.Random) -> dict[str, Any]:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    return {
        "name": f"{first} {last}",
        "last": last,
        "city": rng.choice(CITIES),
        "year": rng.choice(YEARS),
        "count": rng.choice(COUNTS),
    }


def make_example(fields: dict[str, Any], template: int) -> Example:
    """The example for one fact table and template index (``fields`` also holds ``last``)."""
    passage_tpl, summary_tpl = TEMPLATES[template]
    passage = passage_tpl.format(**fields)
    facts = {key: fields[key] for key in ("name", "city", "year", "count")}
    return Example(
        prompt=PROMPT.format(passage=passage),
        reference=summary_tpl.format(**fields),
        metadata={
            "source": passage,
            "facts": facts,
            "template": template,
            "hallucinated": False,
            "hallucination": None,
        },
    )


def _corrupt(example: Example, rng: random.Random) -> Example:
    """Replace one fact of the reference (city, year or count) by a wrong value; the table stays true."""
    facts = example.metadata["facts"]
    field = rng.choice(["city", "year", "count"])
    if field == "city":
        wrong: Any = rng.choice([c for c in CITIES if c != facts["city"]])
    elif field == "year":
        wrong = rng.choice([y for y in YEARS if y != facts["year"]])
    else:
        wrong = rng.choice([c for c in COUNTS if c != facts["count"]])
    # Re-render the summary rather than replace text: a count of 12 also occurs inside the year 1912.
    fields = {**facts, "last": facts["name"].split()[-1], field: wrong}
    reference = TEMPLATES[example.metadata["template"]][1].format(**fields)
    metadata = {**example.metadata, "hallucinated": True, "hallucination": {"field": field, "value": wrong}}
    return replace(example, reference=reference, metadata=metadata)


def _corrupt_fraction(examples: list[Example], rate: float, rng: random.Random) -> list[Example]:
    """Corrupt exactly ``round(rate * len(examples))`` examples chosen by ``rng``."""
    chosen = set(rng.sample(range(len(examples)), round(rate * len(examples))))
    return [_corrupt(ex, rng) if i in chosen else ex for i, ex in enumerate(examples)]


@register_task("factual_summary")
def make_factual_summary(
    *,
    seed: int = 0,
    num_train: int = 256,
    num_eval: int = 32,
    hallucination_rate: float = 0.0,
    hallucinate_eval: bool = False,
) -> TaskData:
    """Deterministic split of generated fact passages with one-sentence reference summaries.

    Args:
        seed: seeds generation, the split and the choice of corrupted references.
        num_train: training examples.
        num_eval: held-out examples.
        hallucination_rate: fraction in ``[0, 1]`` of training references given one unsupported fact.
        hallucinate_eval: also corrupt that fraction of the eval references.

    Raises:
        ValueError: ``hallucination_rate`` outside ``[0, 1]``.
    """
    if not 0.0 <= hallucination_rate <= 1.0:
        raise ValueError(f"hallucination_rate must be in [0, 1], got {hallucination_rate}")
    rng = random.Random(seed)
    # Draw until there are enough distinct prompts; the fact space (~10^8) makes collisions rare.
    pool: dict[str, Example] = {}
    while len(pool) < num_train + num_eval:
        example = make_example(_random_fields(rng), rng.randrange(len(TEMPLATES)))
        pool.setdefault(example.prompt, example)
    data = split_disjoint(list(pool.values()), num_train, num_eval, seed, "factual_summary")
    if hallucination_rate == 0.0:
        return data
    corrupt_rng = random.Random(f"factual_summary-hallucination-{seed}")
    train = _corrupt_fraction(data.train, hallucination_rate, corrupt_rng)
    eval_ = _corrupt_fraction(data.eval, hallucination_rate, corrupt_rng) if hallucinate_eval else data.eval
    return TaskData(name=data.name, train=train, eval=eval_)
