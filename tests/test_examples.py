"""The scripts in examples/ run as written and print what they say; the README's example is examples/plain_loop.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def summary_epochs(out: str) -> list[int]:
    """The epochs of the epoch summary printed last (its rows start with the epoch number)."""
    head = out.rindex("median_alpha_star")
    return [int(m.group(1)) for m in re.finditer(r"^(\d+)\s+\d+\s+\d+\s", out[head:], flags=re.M)]


def test_plain_loop_prints_its_records_and_epoch_summary():
    out = run("plain_loop.py")
    assert summary_epochs(out) == [0, 1, 2, 3, 4]
    first = out.splitlines()[1].split()  # step 0's row: index, step, epoch, loss, slope, curvature, alpha_star, ...
    slope, curvature, alpha_star = map(float, first[4:7])
    assert alpha_star == pytest.approx(-slope / curvature, rel=1e-3)  # printed to 4 significant digits


def test_the_readme_example_is_the_plain_loop_and_shows_its_output():
    readme = (ROOT / "README.md").read_text()
    script = (ROOT / "examples" / "plain_loop.py").read_text()
    body = script.split('"""', 2)[2].strip()
    assert f"```python\n{body}\n```" in readme
    assert "median_alpha_star" in readme  # its output follows it


def test_lightning_example_logs_every_fourth_step():
    pytest.importorskip("lightning")
    assert summary_epochs(run("lightning_loop.py")) == [0, 1, 2]


def test_hf_example_records_every_second_step():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = run("hf_trainer.py")
    steps = [int(line.split()[1]) for line in out.splitlines() if re.match(r"^\d+\s+\d+\s", line)]
    assert steps == list(range(0, 16, 2))
