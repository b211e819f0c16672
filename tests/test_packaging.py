"""The conda environment and the pip install stay in step; torch is loose in the metadata, pinned for installs."""

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
    pins = dict(_split(s) for s in _constraints())  # what every install of the project's own runs holds
    pip = {name: pins.get(name, pin) for name, pin in map(_split, pip_specs)}
    entries = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    pip_section = next(e["pip"] for e in entries if isinstance(e, dict))  # packages conda-forge lacks, and -e .
    conda_specs = [e for e in entries if isinstance(e, str)] + [e for e in pip_section if not e.startswith("-")]
    conda = {name: pin for name, pin in map(_split, conda_specs) if name not in {"python", "pip"}}
    assert conda == pip


def _constraints() -> list[str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_torch_is_loose_in_the_metadata_and_pinned_for_installs():
    """Installing the package keeps a user's torch (from the oldest that `make test-oldest` runs on); the project's
    own runs pin one at least as new."""
    (pin,) = [c for c in _constraints() if c.startswith("torch==")]
    (claim,) = [
        d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"] if "torch" in d
    ]
    assert re.fullmatch(r"torch>=[0-9.]+", claim), claim  # a lower bound only: never a pin or an upper bound

    def release(version: str) -> tuple[int, ...]:
        return tuple(int(n) for n in version.split("+")[0].split("."))

    assert release(claim.removeprefix("torch>=")) <= release(pin.removeprefix("torch=="))
