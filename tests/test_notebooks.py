"""The notebooks are stored as papermill and nbval expect them: one ``parameters`` cell, no outputs but the last
cell's, the summary nbval compares."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9]*.ipynb"))


def test_nbval_compares_rows_labels_and_counts_not_the_digits_that_differ_between_cpus():
    """``make test`` runs nbval with notebooks/nbval-sanitize.cfg: what it masks, read by nbval's own parser."""
    nbval = pytest.importorskip("nbval.plugin")
    patterns = nbval.get_sanitize_patterns((NOTEBOOKS[0].parent / "nbval-sanitize.cfg").read_text())

    def seen(text: str) -> str:
        for regex, replace in patterns:
            text = re.sub(regex, replace, text)
        return text

    # 03's row at lr 0.03 as stored (an AMD EPYC) and as run on an AVX-512 Xeon, same code and seeds
    stored = "0.0300    675  0.87            1.9        0.68      0.015\n0.1000    675  0.91            1.9  \n"
    here = "0.0300    675  0.87            1.9        0.68      0.032\n0.1000    675  0.92           10.1  \n"
    assert seen(stored) == seen(here)
    assert seen(stored) != seen(stored.replace("675", "674", 1)), "a count of steps is compared"
    assert seen(stored) != seen(stored.replace("1.9", "inf", 1)), "a ratio beyond any (inf) is compared"
    assert seen(stored) != seen(stored.replace("0.015", "nan")), "a NaN is compared"
    assert seen("Adam, η = 0.002 0") != seen("SGD, η = 0.002 0"), "the rows' labels are compared"


def test_there_are_numbered_notebooks():
    assert len(NOTEBOOKS) >= 6


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_with_one_parameters_cell_and_only_its_summary_output(path):
    cells = json.loads(path.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code[:-1]), "clear the outputs first"
    summary = code[-1]
    assert cells[-1] is summary and "".join(summary["source"]).startswith("# NBVAL_CHECK_OUTPUT\n")
    # nbval reads a marker only as a comment of its own: "# NBVAL_CHECK_OUTPUT: ..." would compare nothing
    nbval = pytest.importorskip("nbval.plugin")
    assert dict(nbval.find_comment_markers("".join(summary["source"]))).get("check"), "nbval must see the marker"
    assert "alphalib.key_numbers(" in "".join(summary["source"]), "the summary prints the run's key numbers"
    assert [o["output_type"] for o in summary["outputs"]] == ["stream"]
    assert summary["execution_count"] == len(code), "nbval skips a stored output without its execution count"
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], "the first code cell, and only it, is tagged 'parameters'"
    source = "".join("".join(c["source"]) for c in code)
    assert "import alphalib" in source
    # an interactive run writes to scratch folders; `make figures` passes -p figures_dir ../figures and
    # -p records_dir ../results
    parameters = "".join(tagged[0]["source"])
    assert "plot.save" not in source or 'figures_dir: str = "../build/figures"' in parameters
    assert "write_records" not in source or 'records_dir: str = "../build/results"' in parameters


def test_make_figures_writes_the_records_that_the_explorer_opens():
    """01–04 write their records where 00_explore looks, and those files are committed."""
    root = NOTEBOOKS[0].parents[1]
    makefile = (root / "Makefile").read_text()
    for path in NOTEBOOKS:
        writes = "write_records" in path.read_text()
        assert writes == (f"PARAMS_{path.stem} := $(FIGURES) $(RECORDS)" in makefile), path.stem
        assert not writes or (root / "results" / f"{path.stem}.csv.gz").is_file(), path.stem
    explore = json.loads((root / "notebooks" / "00_explore.ipynb").read_text())["cells"]
    assert any('results: str = "../results"' in "".join(c["source"]) for c in explore)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_reads_every_parameter_the_cell_assigns(path):
    """papermill -p and the sweep can set only what papermill parses (a comment holding '=' hides a line)."""
    import re

    papermill = pytest.importorskip("papermill")
    cell = next(c for c in json.loads(path.read_text())["cells"] if "parameters" in c["metadata"].get("tags", []))
    assigned = re.findall(r"^([A-Za-z_]\w*)\s*(?::[^=]+)?=", "".join(cell["source"]), re.M)
    assert list(papermill.inspect_notebook(str(path))) == assigned


def _parameters(path: Path) -> dict:
    """The namespace the parameters cell leaves, as a kernel runs it."""
    cell = next(c for c in json.loads(path.read_text())["cells"] if "parameters" in c["metadata"].get("tags", []))
    namespace: dict = {}
    exec(compile("".join(cell["source"]), path.name, "exec", dont_inherit=True), namespace)  # (no __future__ here)
    namespace.pop("__builtins__")
    return namespace


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_parameter_is_typed_and_checked_before_anything_runs(path):
    """Each parameter is annotated (papermill reads the types); the next cell checks them right after its imports:
    its defaults pass, a misspelt name and text where a number belongs do not."""
    import alphalib

    namespace = _parameters(path)
    names = [k for k in namespace if k != "__annotations__"]
    assert names and names == list(namespace["__annotations__"]), "annotate every parameter"
    alphalib.check_parameters(namespace)
    with pytest.raises(ValueError, match=f"unknown parameter '{names[0]}z' \\(did you mean '{names[0]}'"):
        alphalib.check_parameters({**namespace, f"{names[0]}z": 1})
    numeric = next((k for k in names if namespace["__annotations__"][k] in (int, float)), None)  # (every one has)
    if numeric is not None:
        with pytest.raises(TypeError, match=f"parameter '{numeric}' must be"):
            alphalib.check_parameters({**namespace, numeric: "1e-3"})
    code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    lines = "".join(code[1]["source"]).splitlines()
    first = next(i for i, line in enumerate(lines) if line and not line.startswith(("import ", "from ")))
    assert lines[first].startswith("alphalib.check_parameters(globals())"), "check first thing after the imports"


def test_papermill_refuses_a_misspelt_parameter_before_training(tmp_path):
    papermill = pytest.importorskip("papermill")
    path = next(p for p in NOTEBOOKS if p.stem.startswith("05"))
    with pytest.raises(papermill.PapermillExecutionError, match="unknown parameter 'epochz'.*did you mean 'epochs'"):
        papermill.execute_notebook(
            str(path),
            str(tmp_path / "out.ipynb"),
            parameters={"epochz": 1},
            cwd=str(path.parent),
            progress_bar=False,
            kernel_name="python3",
        )


MISMATCH = """\
import math
print(f"{math.pi:.2g}")
"""


@pytest.mark.parametrize("stored", ["3.1\n", "3.2\n"])
def test_nbval_compares_the_summary_cell_with_its_stored_output(tmp_path, stored):
    """Under --nbval-lax a cell marked NBVAL_CHECK_OUTPUT fails when its output differs from the stored one."""
    import subprocess
    import sys

    nbformat = pytest.importorskip("nbformat")
    cell = nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\n" + MISMATCH)
    cell.outputs, cell.execution_count = [nbformat.v4.new_output("stream", name="stdout", text=stored)], 2
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"), cell])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "summary.ipynb")
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "summary.ipynb"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    if stored == "3.1\n":
        assert ran.returncode == 0, ran.stdout
    else:
        assert ran.returncode == 1 and "1 failed, 1 passed" in ran.stdout, ran.stdout
        assert "3.2" in ran.stdout and "3.1" in ran.stdout  # nbval shows the stored and the new output
