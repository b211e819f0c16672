"""The conda environment and the pip install stay in step."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_TO_PIP = {"pytorch": "torch"}


def _split(spec: str) -> tuple[str, str]:
    name, pin = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", spec).groups()
    return CONDA_TO_PIP.get(name.lower(), name.lower()).replace("_", "-"), pin.lstrip("=")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {k: v for k, v in project["optional-dependencies"].items() if k != "bench"}  # make bench's peer only
    pip_specs = project["dependencies"] + [s for extra in extras.values() for s in extra]
    pip = dict(_split(s) for s in pip_specs)
    entries = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    pip_section = next(e["pip"] for e in entries if isinstance(e, dict))  # packages conda-forge lacks, and -e .
    conda_specs = [e for e in entries if isinstance(e, str)] + [e for e in pip_section if not e.startswith("-")]
    conda = {name: pin for name, pin in map(_split, conda_specs) if name not in {"python", "pip"}}
    assert conda == pip


def test_torch_is_pinned_everywhere():
    assert "torch==2.13.0" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().split()
