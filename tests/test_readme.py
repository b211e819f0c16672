"""The examples in the README and the docs pages (lines starting with ``>>>``) run as written."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_examples_run(page):
    if "transformers" in page.read_text():
        pytest.importorskip("transformers")  # the Hugging Face examples (the models extra)
    threads = torch.get_num_threads()
    try:
        result = doctest.testfile(str(page), module_relative=False, optionflags=doctest.ELLIPSIS, verbose=False)
    finally:
        torch.set_num_threads(threads)
    assert result.failed == 0


def test_the_pages_have_examples():
    """The doctests above run somewhere: the pages that teach the API carry examples."""
    attempted = {
        p.name: doctest.DocTestParser().get_examples(p.read_text())
        for p in PAGES
        if p.name in {"probe.md", "backends.md"}
    }
    assert all(attempted.values()), attempted


def _numbers(text: str) -> list[str]:
    """The numbers a text states (1e-3, 0.92, 21.2%, 1230), notebook references like (01) or (01–04) left out."""
    import re

    text = re.sub(r"\((?:\d\d(?:–\d\d)?(?:, )?)+\)", "", text)
    return re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?:e-\d+)?%?", text)


def test_the_readme_findings_are_copied_from_the_generated_findings_table():
    """Every number the README's findings state is in figures/findings.md, which the committed records give."""
    pytest.importorskip("scipy")
    from alphalib.lab.findings import findings

    table = (ROOT / "figures" / "findings.md").read_text()
    assert table == findings(ROOT / "results"), "figures/findings.md is what results/ gives: make figures"
    section = (ROOT / "README.md").read_text().split("## What the notebooks found", 1)[1].split("\n## ", 1)[0]
    quoted = _numbers(section)
    assert len(quoted) >= 8, "the findings quote the table's numbers"
    available = set(_numbers(table))
    assert [n for n in quoted if n not in available] == []
