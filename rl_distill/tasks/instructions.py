"""``instructions``: short general-purpose instruction prompts for distilling a chat teacher.

The prompts are composed from templates and topic lists, so the pool is large (a few thousand
distinct prompts) and the split is deterministic by seed. They suit the built-in SmolLM2 teacher:
short answers, everyday topics, simple arithmetic.
"""

from __future__ import annotations

import itertools

from rl_distill.tasks.base import Example, TaskData, register_task, split_disjoint

_TOPICS = [
    "the moon",
    "volcanoes",
    "honey bees",
    "the ocean",
    "rainbows",
    "bicycles",
    "coffee",
    "the heart",
    "photosynthesis",
    "gravity",
    "the internet",
    "penguins",
    "deserts",
    "electricity",
    "music",
    "trees",
    "the sun",
    "clouds",
    "bread",
    "chess",
    "friendship",
    "sleep",
    "recycling",
    "mountains",
    "rivers",
    "dinosaurs",
    "computers",
    "winter",
    "libraries",
    "cats",
    "dogs",
    "trains",
    "tea",
    "the brain",
    "earthquakes",
    "birds",
    "gardening",
    "soap",
    "maps",
    "the weather",
]
_TEMPLATES = [
    "Write one sentence about {t}.",
    "Give me a fun fact about {t}.",
    "Explain {t} to a child in two sentences.",
    "What is the most important thing to know about {t}?",
    "Describe {t} in three words.",
    "Write a short poem about {t}.",
    "Why do people find {t} interesting?",
    "List two facts about {t}.",
]
_NUMBER_TEMPLATES = [
    "What is {a} plus {b}?",
    "What is {a} times {b}?",
    "If I have {a} apples and buy {b} more, how many apples do I have?",
]


def _pool() -> list[Example]:
    items = [Example(prompt=tpl.format(t=topic)) for tpl, topic in itertools.product(_TEMPLATES, _TOPICS)]
    for tpl, a, b in itertools.product(_NUMBER_TEMPLATES, range(2, 13), range(2, 13)):
        items.append(Example(prompt=tpl.format(a=a, b=b)))
    return items


@register_task("instructions")
def make_instructions(*, seed: int = 0, num_train: int = 256, num_eval: int = 32) -> TaskData:
    """Deterministic train/eval split of the instruction pool (about 680 distinct prompts)."""
    return split_disjoint(_pool(), num_train, num_eval, seed, "instructions")
