"""The README's examples (lines starting with ``>>>``) run as written."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    pytest.importorskip("transformers")  # the Hugging Face example (the models extra)
    threads = torch.get_num_threads()
    try:
        result = doctest.testfile(str(README), module_relative=False, optionflags=doctest.ELLIPSIS, verbose=False)
    finally:
        torch.set_num_threads(threads)
    assert result.attempted > 0 and result.failed == 0
