"""Sphinx configuration: `make docs` builds build/docs/html from these pages, the docstrings and the notebooks."""

from __future__ import annotations

import shutil
from pathlib import Path

import alphalib

ROOT = Path(__file__).resolve().parents[1]

project = "alphalib"
author = "the alphalib developers"
copyright = "2026, the alphalib developers"
version = release = alphalib.__version__

extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
exclude_patterns = ["_build", "screenshots"]
html_theme = "furo"
html_title = f"alphalib {release}"

# Markdown pages (MyST): $...$ and $$...$$ math, anchors for the headings the pages link to
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# The notebooks are rendered as they were executed by `make figures` (build/notebooks/), or as stored in notebooks/
# (code, and the summary cell's output) where they have not been: never executed by the docs build.
nb_execution_mode = "off"
NOTEBOOKS = Path(__file__).parent / "notebooks"
NOTEBOOKS.mkdir(exist_ok=True)
for stored in sorted((ROOT / "notebooks").glob("[0-9]*.ipynb")):
    executed = ROOT / "build" / "notebooks" / stored.name
    shutil.copyfile(executed if executed.exists() else stored, NOTEBOOKS / stored.name)

# The API reference: docstrings in Google style (Args/Returns/Raises/Example), signatures with their type hints
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": False}
