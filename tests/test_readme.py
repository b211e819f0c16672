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
