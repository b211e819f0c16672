"""Grids of runs in process, and sweeps of a notebook on a Dask LocalCluster: failures, resumption, same records."""

from __future__ import annotations

import json

import nbformat
import pandas as pd
import pytest
import torch.nn.functional as F

import alphalib
from alphalib.__main__ import main

PARAMETERS = """\
scale = 1                  # the lr is scale * 1e-3; scale 3 fails on purpose
seed = 0
records_dir = "."
"""
BODY = """\
import torch.nn.functional as F
import alphalib

if scale == 3:
    raise ValueError("injected failure")
history = alphalib.run(alphalib.SimpleNet, F.mse_loss, alphalib.gaussian_regression(n=64, seed=seed),
                       lr=scale * 1e-3, epochs=1, batch_size=16, seed=seed, progress=False)
alphalib.write_records(history.records, f"{records_dir}/tiny.csv.gz")
"""


def _notebook(path, parameters: str, body: str):
    """Write a notebook of a cell tagged ``parameters`` and a body cell, on the python3 kernel, to ``path``."""
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell(body),
        ]
    )
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture
def tiny(tmp_path):
    """A parameterized notebook that trains one small probed run, and fails for scale == 3."""
    return _notebook(tmp_path / "tiny.ipynb", PARAMETERS, BODY)


def _direct(scale: int, seed: int) -> pd.DataFrame:
    return alphalib.run(
        alphalib.SimpleNet,
        F.mse_loss,
        alphalib.gaussian_regression(n=64, seed=seed),
        lr=scale * 1e-3,
        epochs=1,
        batch_size=16,
        seed=seed,
        progress=False,
    ).records


def test_grid_is_the_product_of_the_axes():
    points = alphalib.grid(optimizer=["adam", "sgd"], lr=[1e-3, 1e-2, 1e-1])
    assert len(points) == 6 and points[1] == {"optimizer": "adam", "lr": 1e-2}
    assert len({tuple(p.items()) for p in points}) == 6
    with pytest.raises(TypeError, match="axis 'lr' must be a list"):
        alphalib.grid(lr=1e-3)


def test_runs_equal_the_runs_made_one_by_one_and_tag_what_run_does_not_take():
    data = alphalib.gaussian_regression(n=64, seed=0)
    points = alphalib.grid(lr=[1e-3, 1e-2], seed=[0, 1])
    history = alphalib.runs(
        [p | {"note": "x"} for p in points],
        model=alphalib.SimpleNet,
        loss_fn=F.mse_loss,
        train_set=data,
        epochs=1,
        batch_size=16,
        progress=False,
    )
    one_by_one = pd.concat(
        [
            alphalib.run(alphalib.SimpleNet, F.mse_loss, data, epochs=1, batch_size=16, progress=False, **p).records
            for p in points
        ],
        ignore_index=True,
    )
    pd.testing.assert_frame_equal(history.records.drop(columns="note"), one_by_one)
    assert (history.records.note == "x").all() and len(history.epochs) == 4
    by_name = alphalib.runs([{"problem": "seed problem", "seed": 1}], epochs=1, progress=False)
    p = alphalib.problem("seed problem", seed=1)
    direct = alphalib.run(
        p.model,
        p.loss_fn,
        p.train,
        val_set=p.val,
        alpha_set=p.alpha,
        seed=1,
        epochs=1,
        progress=False,
        tags={"problem": "seed problem"},
    )
    pd.testing.assert_frame_equal(by_name.records, direct.records)
    with pytest.raises(ValueError, match="points is empty"):
        alphalib.runs([])
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        alphalib.runs(points, workers=0)


def test_runs_on_two_worker_processes_equal_the_runs_made_here():
    points = alphalib.grid(problem=["seed problem"], lr=[1e-3, 1e-2], seed=[0, 1])
    here = alphalib.runs(points, epochs=1, every=3, progress=False)
    there = alphalib.runs(points, epochs=1, every=3, progress=False, workers=2)
    pd.testing.assert_frame_equal(there.records, here.records, rtol=1e-6)  # (float64: one thread each side)
    pd.testing.assert_frame_equal(there.steps, here.steps, rtol=1e-6)
    assert there.epochs.drop(columns=["seconds", "probe_seconds"]).equals(
        here.epochs.drop(columns=["seconds", "probe_seconds"])
    )


def test_sweep_on_a_local_cluster_reports_a_failure_finishes_the_rest_and_resumes(tiny, tmp_path):
    out = tmp_path / "sweep"
    table = alphalib.sweep.sweep(tiny, {"scale": [1, 2, 3]}, out=out, seeds=2, workers=2, progress=False)
    status = dict(zip(table.run, table.status, strict=True))
    assert len(status) == 6 and sum(s == "ok" for s in status.values()) == 4
    failed = table[table.status == "failed"]
    assert set(failed.run) == {"scale=3,seed=0", "scale=3,seed=1"} and failed.error.str.contains("injected").all()
    assert json.loads((out / "scale=3,seed=0" / "run.json").read_text())["status"] == "failed"
    assert (out / "scale=1,seed=1" / "tiny.ipynb").is_file()  # the executed notebook

    # the sweep's records are those of the same run made directly
    records = alphalib.sweep.load(out)
    got = records[records.run == "scale=2,seed=1"].drop(columns=["run", "scale"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, _direct(2, 1), check_dtype=False)

    # again: the runs done are skipped, the failed ones retried; a run whose record is lost runs again
    (out / "scale=1,seed=0" / "run.json").unlink()
    again = alphalib.sweep.sweep(tiny, {"scale": [1, 2, 3]}, out=out, seeds=2, workers=2, progress=False)
    status = dict(zip(again.run, again.status, strict=True))
    assert status["scale=1,seed=0"] == "ok" and status["scale=3,seed=1"] == "failed"
    assert sum(s == "skipped" for s in status.values()) == 3
    other = alphalib.sweep.sweep(
        tiny, {"scale": [2]}, out=out, seeds=1, parameters={"records_dir": str(out / "x")}, workers=1, progress=False
    )
    assert list(other.status) == ["ok"]  # other parameters in the same folder: run again, not skipped


def test_command_line_runs_the_same_sweep_and_says_what_is_wrong(tiny, tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(["sweep", str(tiny), "--grid", "scale=1,3", "-p", "seed", "1", "--out", str(out), "--workers", "1"]) == 1
    )  # one run failed
    said = capsys.readouterr().out
    assert "2 runs: 1 done, 1 failed" in said and "injected failure" in said
    assert json.loads((out / "scale=1" / "run.json").read_text())["params"] == {"seed": 1, "scale": 1}
    assert main(["sweep", str(tiny), "--grid", "rate=1,2", "--out", str(out)]) == 2
    assert "has no parameter 'rate'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", str(tiny), "--grid", "scale", "--out", str(out)])


def test_an_existing_cluster_is_used_unchanged_through_its_address(tiny, tmp_path):
    """--scheduler ADDRESS: the sweep submits to that cluster (here one started in the test) and leaves it running."""
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        assert (
            main(
                [
                    "sweep",
                    str(tiny),
                    "--grid",
                    "scale=1,2",
                    "--out",
                    str(tmp_path / "remote"),
                    "--scheduler",
                    cluster.scheduler_address,
                ]
            )
            == 0
        )
        with Client(cluster.scheduler_address) as client:  # still there, its worker too
            assert len(client.scheduler_info()["workers"]) == 1
    records = alphalib.sweep.load(tmp_path / "remote")
    assert sorted(records.run.unique()) == ["scale=1", "scale=2"]


STATE = """\
import json, os
import matplotlib, matplotlib.pyplot as plt, torch
from matplotlib import rcParamsDefault

seen = {"left": sorted(k for k in ("marker", "scale_seen") if k in globals()), "dtype": str(torch.get_default_dtype()),
        "grad": torch.is_grad_enabled(), "backend": matplotlib.get_backend(),
        "rc": sorted(k for k, v in matplotlib.rcParams.items() if k != "backend" and v != rcParamsDefault[k]),
        "seed 5": torch.rand(1).item() == torch.rand(1, generator=torch.Generator().manual_seed(5)).item(),
        "figures": len(plt.get_fignums())}
json.dump({"seen": seen, "pid": os.getpid()}, open(f"{records_dir}/state.json", "w"))
marker, scale_seen = 1, scale  # what a careless run leaves behind for the next
torch.set_default_dtype(torch.float64); torch.set_grad_enabled(False); torch.manual_seed(5)
matplotlib.rcParams["lines.linewidth"] = 9.0; plt.figure()
"""


def test_a_kept_kernel_shows_each_run_what_a_fresh_one_shows(tmp_path):
    """One worker runs three notebooks in one kernel (one process); each sees what a fresh kernel shows it."""
    _notebook(tmp_path / "state.ipynb", "scale = 1\nrecords_dir = '.'", STATE)

    def states(reuse: bool) -> list[dict]:
        out = tmp_path / f"reuse={reuse}"
        table = alphalib.sweep.sweep(
            tmp_path / "state.ipynb", {"scale": [1, 2, 3]}, out=out, workers=1, reuse_kernels=reuse, progress=False
        )
        assert (table.status == "ok").all(), table.error.tolist()
        return [json.loads((out / f"scale={s}" / "state.json").read_text()) for s in (1, 2, 3)]

    kept, fresh = states(True), states(False)
    assert len({s["pid"] for s in kept}) == 1 and len({s["pid"] for s in fresh}) == 3
    assert [s["seen"] for s in kept] == [s["seen"] for s in fresh] == [fresh[0]["seen"]] * 3
    assert fresh[0]["seen"]["left"] == [] and fresh[0]["seen"]["dtype"] == "torch.float32"
