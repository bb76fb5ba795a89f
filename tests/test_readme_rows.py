"""README result rows quote their pages: every number in a row is on the page it links.

The pages themselves are written from their raw JSON by their scripts, and tests rebuild them from it
(``tests/test_topk_divergence.py``, ``tests/test_cross_tokenizer_example.py``), so a number in one of
these README rows cannot drift from the JSON without failing here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?: ± \d+\.\d+)?")

ROWS = {
    "| top-k teacher signals": "docs/results/topk_divergence.md",
    "| cross-tokenizer": "docs/results/cross_tokenizer.md",
}


def readme_row(prefix: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    results = text[text.index("## Results") :]
    rows = [line for line in results.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, prefix
    return rows[0]


@pytest.mark.parametrize(("prefix", "page"), sorted(ROWS.items()))
def test_every_number_in_the_row_is_on_its_page(prefix, page):
    row = readme_row(prefix)
    assert f"]({page})" in row  # the row links the page it quotes
    headline = row.split(" | ")[-1]
    headline = re.sub(r"\(issue #\d+\)", "", headline)
    numbers = NUMBER.findall(headline)
    assert len(numbers) >= 5, numbers
    body = (ROOT / page).read_text(encoding="utf-8")
    missing = [n for n in numbers if n not in body]
    assert not missing, f"{page} does not say {missing}"


def test_a_number_not_on_the_page_is_caught():
    # the check itself: a changed digit is not found on the page
    body = (ROOT / ROWS["| cross-tokenizer"]).read_text(encoding="utf-8")
    assert "0.026 ± 0.002" in body and "0.027 ± 0.002" not in body
    assert NUMBER.findall("(1.39x to 2.32x)") == ["1.39", "2.32"]
