r"""What a sweep run costs beyond its notebook's own work: a fresh kernel per run against one kernel kept per worker.

    python benchmarks/sweep_kernels.py [--runs 8] [--rounds 3] [--workers 1]

The notebook swept imports what the project's notebooks import (torch, pandas, matplotlib, seaborn, alphalib) and
trains 10 steps of the seed net, so a run's time is almost all overhead: starting a kernel and importing. Both
ways are swept in alternating rounds in one process; the table gives the median seconds per run (``run.json``'s,
from papermill's start to the records written) and the wall time of a whole sweep, with their ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import nbformat

import alphalib

BODY = """\
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch

import alphalib

history = alphalib.run(alphalib.SimpleNet, torch.nn.MSELoss(), alphalib.gaussian_regression(n=320, seed=seed),
                       epochs=1, batch_size=32, seed=seed, progress=False)
alphalib.write_records(history.records, f"{records_dir}/records.csv")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8, help="runs per sweep")
    parser.add_argument("--rounds", type=int, default=3, help="sweeps of each kind, alternating")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="sweep-kernels-"))
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell('seed = 0\nrecords_dir = "."', metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell(BODY),
        ]
    )
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "tiny.ipynb")
    per_run: dict[bool, list[float]] = {True: [], False: []}
    wall: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.rounds):
        for reuse in (False, True):
            out = folder / f"round{r}-reuse{reuse}"
            start = time.perf_counter()
            table = alphalib.sweep.sweep(
                folder / "tiny.ipynb",
                {"seed": list(range(args.runs))},
                out=out,
                workers=args.workers,
                reuse_kernels=reuse,
                progress=False,
            )
            wall[reuse].append(time.perf_counter() - start)
            assert (table.status == "ok").all(), table.error.tolist()
            per_run[reuse] += [json.loads(p.read_text())["seconds"] for p in out.glob("*/run.json")]
    median = {k: statistics.median(v) for k, v in per_run.items()}
    sweep = {k: statistics.median(v) for k, v in wall.items()}
    print(f"{args.runs} runs per sweep, {args.workers} worker(s), {args.rounds} rounds; medians in seconds\n")
    print("| | fresh kernel per run | one kernel per worker | ratio |")
    print("|---|---|---|---|")
    print(f"| a run (run.json) | {median[False]:.2f} | {median[True]:.2f} | {median[True] / median[False]:.2f} |")
    print(f"| a sweep (wall) | {sweep[False]:.1f} | {sweep[True]:.1f} | {sweep[True] / sweep[False]:.2f} |")


if __name__ == "__main__":
    main()
