"""The command line: ``python -m alphalib sweep NOTEBOOK --grid NAME=V1,V2 ... --seeds N --out FOLDER``."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def value(text: str) -> Any:
    """Read a command-line value as papermill's ``-p`` does: an int, a float, a bool, None, or else the string.

    Example:
        >>> [value(t) for t in ("3", "1e-3", "True", "None", "adam")]
        [3, 0.001, True, None, 'adam']
    """
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def axis(text: str) -> tuple[str, list[Any]]:
    """Read ``NAME=V1,V2,...`` into the name and its values (each read by :func:`value`).

    Raises:
        argparse.ArgumentTypeError: If ``text`` lacks the name, the ``=`` or the values.
    """
    name, sep, values = text.partition("=")
    if not sep or not name or not values:
        raise argparse.ArgumentTypeError(f"a grid axis is NAME=V1,V2,... (e.g. lr=1e-3,1e-2), got {text!r}.")
    return name, [value(v) for v in values.split(",")]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return its exit status.

    Args:
        argv: The arguments after ``python -m alphalib``; ``None``: the process's own.

    Returns:
        0 when every run succeeded (or was done already), 1 when a run failed, 2 when the sweep could not start
        (a bad parameter, a missing notebook or package).
    """
    parser = argparse.ArgumentParser(prog="python -m alphalib", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser(
        "sweep",
        help="execute a notebook over a grid of parameters as Dask tasks",
        description="Execute NOTEBOOK through papermill once per combination of the grid "
        "(and seed), each run a Dask task; runs already done are skipped.",
    )
    sweep.add_argument("notebook", help="the parameterized notebook (its cell tagged 'parameters' declares the names)")
    sweep.add_argument(
        "--grid",
        nargs="*",
        type=axis,
        default=[],
        metavar="NAME=V1,V2",
        help="an axis of the grid: a parameter and its values",
    )
    sweep.add_argument("--seeds", type=int, help="also run seed = 0 .. SEEDS-1 (the notebook's 'seed' parameter)")
    sweep.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a parameter passed to every run, as papermill's -p",
    )
    sweep.add_argument("--out", required=True, help="the sweep's folder: one subfolder per run")
    sweep.add_argument("--scheduler", help="address of an existing Dask scheduler (default: a LocalCluster here)")
    sweep.add_argument("--workers", type=int, help="worker processes of the LocalCluster (default: one per core)")
    args = parser.parse_args(argv)

    from .lab.sweep import sweep as run_sweep

    try:
        table = run_sweep(
            args.notebook,
            dict(args.grid),
            out=args.out,
            seeds=args.seeds,
            parameters={k: value(v) for k, v in args.parameter},
            scheduler=args.scheduler,
            workers=args.workers,
        )
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return int((table.status == "failed").any())


if __name__ == "__main__":
    sys.exit(main())
