r"""Sweeps: a grid of runs in this process (:func:`runs`), or of notebook executions on Dask (:func:`sweep`).

A *grid* is a list of points, each a dict of parameters; :func:`grid` builds the product of axes. :func:`runs` calls
:func:`alphalib.run` once per point and concatenates the histories: what a notebook does with its own grid.

:func:`sweep` executes a parameterized notebook once per point through papermill, each execution a Dask task: on a
``dask.distributed.LocalCluster`` sized to the machine (one single-threaded worker process per core) or, given
``scheduler``, on an existing cluster unchanged (the notebook and the output folder must then be on a file system
the workers share). Each run gets a folder under ``out`` named after its parameters, holding the executed notebook,
what the notebook wrote there (its ``records_dir`` and ``figures_dir`` are pointed at it when it has them), its
records gathered into ``records.parquet`` and ``run.json`` (parameters, status, seconds, error). A failed run is
reported with its error and the others finish; running the same sweep again skips the runs whose ``run.json`` says
``ok`` for the same parameters (a folder left by other parameters is run again), so a killed sweep loses at most the
runs in flight.

Each worker keeps one kernel for the runs of a sweep (``reuse_kernels``): before its next run the kernel is reset to
the state of a fresh one where a notebook can see it (no names left in its namespace; matplotlib's settings and
figures, torch's default dtype and grad mode, the global random generators as at start), so only the imports stay
loaded (the kernel's own log stays in its first run's ``kernel.log``). A run that fails takes its kernel with it;
the next run starts a fresh one. The command line is the same function::

    python -m alphalib sweep notebooks/01_adam_alpha_star.ipynb --grid lr=1e-3,1e-2 --seeds 3 -p runs 1 \
        --out runs/lr [--scheduler tcp://host:8786]

Needs the ``sweep`` extra (``dask[distributed]``, ``pyarrow``) besides papermill.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import os
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..records import read, write

if TYPE_CHECKING:
    import pandas as pd

    from .train import History

__all__ = ["axis", "grid", "runs", "sweep", "load"]


def axis(values: Any) -> list[Any]:
    """Return a notebook's grid parameter as a list: a list or tuple as it is, one value as a list of one.

    So a notebook can declare ``lrs = [1e-3, 1e-2]`` and still run when a sweep passes one value per run
    (``--grid lrs=1e-3,1e-2`` sends ``lrs=0.001`` to one run, ``lrs=0.01`` to another).

    Args:
        values: A list or tuple of values, or one value.

    Returns:
        The values as a list.

    Example:
        >>> axis([1e-3, 1e-2]), axis(1e-3)
        ([0.001, 0.01], [0.001])
    """
    return list(values) if isinstance(values, (list, tuple)) else [values]


def grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    """Return every combination of the axes' values as a list of dicts, the last axis varying fastest.

    Args:
        **axes: Each parameter's values, a list (or another iterable that is not a string).

    Returns:
        The points of the grid, each a dict of one value per axis.

    Raises:
        TypeError: If an axis is a string or not iterable.

    Example:
        >>> grid(lr=[1e-3, 1e-2], seed=[0, 1])
        [{'lr': 0.001, 'seed': 0}, {'lr': 0.001, 'seed': 1}, {'lr': 0.01, 'seed': 0}, {'lr': 0.01, 'seed': 1}]
    """
    for name, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise TypeError(f"axis {name!r} must be a list of values, got {values!r}.")
    names = list(axes)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(list(axes[n]) for n in names))]


def runs(points: Iterable[Mapping[str, Any]], *, workers: int = 1, **common: Any) -> History:
    """Call :func:`alphalib.run` with ``common`` updated by each point; return the histories concatenated.

    A point's ``problem`` names an :func:`alphalib.problem`, which gives the model, loss, training, α* and judging
    sets for the point's ``seed`` (keywords given as well take precedence). Keys :func:`alphalib.run` does not take
    become tags (columns of every frame), as ``problem`` does. With ``workers`` > 1 the runs are Dask tasks on a
    ``LocalCluster`` of that many single-threaded worker processes (the ``sweep`` extra): each run is seeded, so the
    histories are those of the runs made one by one, in the order of ``points`` (Dask starts its workers with one
    thread each: ``OMP_NUM_THREADS=1``).

    Args:
        points: The runs, each a mapping of keywords for :func:`alphalib.run` and tags (:func:`grid` builds them).
        workers: Worker processes to spread the runs over; 1 runs them here, one after the other.
        **common: Keywords for every run; a point's own values take precedence.

    Returns:
        One :class:`~alphalib.lab.train.History` with the runs' frames concatenated (``profiles`` and ``blocks``
        ``None`` unless a run had looks or blocks).

    Raises:
        ValueError: If ``points`` is empty or ``workers`` is not a positive integer.
        ImportError: If ``workers`` > 1 and ``dask.distributed`` is not installed.
    """
    import pandas as pd

    from .train import History

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer (worker processes), got {workers!r}.")
    jobs = [{**common, **point} for point in points]
    if not jobs:
        raise ValueError("points is empty: give at least one point (alphalib.grid(...) builds them).")
    if workers == 1 or len(jobs) == 1:
        histories = [_run_one(kw) for kw in jobs]
    else:
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError as exc:
            raise ImportError('runs(workers=...) needs dask.distributed: pip install "alphalib-probe[sweep]".') from exc
        with (
            LocalCluster(
                n_workers=min(workers, len(jobs)),
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,  # not the nanny's warnings as the workers shut down
            ) as cluster,
            Client(cluster) as client,
        ):
            histories = client.gather(client.map(_run_one, jobs, pure=False))
    steps, epochs, records = (
        pd.concat([getattr(h, f) for h in histories], ignore_index=True) for f in ("steps", "epochs", "records")
    )
    optional = {}
    for name in ("profiles", "blocks"):  # present where a run had looks, or blocks
        frames = [getattr(h, name) for h in histories if getattr(h, name) is not None]
        optional[name] = pd.concat(frames, ignore_index=True) if frames else None
    return History(steps, epochs, records, **optional)


def _run_one(kw: dict[str, Any]) -> History:
    """Make one run of :func:`runs`: a point's keywords, its ``problem`` looked up, the rest as tags."""
    import inspect

    from .problems import problem
    from .train import run

    accepted = set(inspect.signature(run).parameters)
    kw = dict(kw)
    tags = dict(kw.pop("tags", None) or {})
    if "problem" in kw:
        p = problem(kw["problem"], seed=kw.get("seed", 0))
        tags["problem"] = kw.pop("problem")
        kw = dict(model=p.model, loss_fn=p.loss_fn, train_set=p.train, val_set=p.val, alpha_set=p.alpha) | kw
    tags |= {k: kw.pop(k) for k in list(kw) if k not in accepted}
    return run(**kw, tags=tags)


def _name(params: Mapping[str, Any]) -> str:
    """Return a run's folder name: ``lr=0.001,seed=1`` (characters a path cannot hold replaced)."""
    text = ",".join(f"{k}={v}" for k, v in params.items()) or "defaults"
    return "".join(c if c.isalnum() or c in "=,.-_+" else "_" for c in text)


def _status(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Send file descriptor 2 (which the kernel papermill starts inherits) to ``path`` for the block."""
    saved = os.dup(2)
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


#: Run in a kept kernel before its next notebook: what a notebook could see of the one before, set as a fresh kernel
#: has it (the global random generators seeded from the system's entropy, as at start).
RESET = """\
get_ipython().run_line_magic("reset", "-f")
import os, random, matplotlib, matplotlib.pyplot, numpy, torch
matplotlib.pyplot.close("all")
matplotlib.rcParams.update({k: v for k, v in matplotlib.rcParamsDefault.items() if k != "backend"})
matplotlib.use(os.environ.get("MPLBACKEND", "agg"))  # the kernel's inline backend
matplotlib.rcParams["backend_fallback"] = matplotlib.rcParamsDefault["backend_fallback"]
torch.set_default_dtype(torch.float32)
torch.set_grad_enabled(True)
random.seed(), numpy.random.seed(), torch.seed()
get_ipython().run_line_magic("reset", "-f")
"""

#: This worker process's kept kernels: (sweep, the notebook's folder) -> a kernel manager.
_KERNELS: dict[tuple[str, str], Any] = {}


def _shutdown(km: Any) -> None:
    with contextlib.suppress(Exception):
        from jupyter_core.utils import run_sync

        run_sync(km.shutdown_kernel)(now=True)


@atexit.register
def _shutdown_all() -> None:
    """Shut down the kernels this process kept, when it exits."""
    for km in _KERNELS.values():
        _shutdown(km)


def _kernel(sweep: str, notebook: str) -> Any:
    """Return this worker's kernel manager for ``sweep``'s runs of ``notebook``, its kernel reset by :data:`RESET`
    (or one without a kernel yet, for the notebook's kernelspec, which papermill starts); shut down the kernels of
    other sweeps."""
    from jupyter_client.manager import AsyncKernelManager  # what papermill's client starts its kernels with
    from jupyter_core.utils import run_sync

    cwd = str(Path(notebook).parent)

    for key in [k for k in _KERNELS if k[0] != sweep]:
        _shutdown(_KERNELS.pop(key))
    km = _KERNELS.get((sweep, cwd))
    if km is not None and km.has_kernel and run_sync(km.is_alive)():
        client = km.blocking_client()
        client.start_channels()
        try:
            reply = client.execute_interactive(RESET, timeout=60, store_history=False, output_hook=lambda msg: None)
            if reply["content"]["status"] == "ok":
                return km
        finally:
            client.stop_channels()
        _shutdown(_KERNELS.pop((sweep, cwd)))
    spec = json.loads(Path(notebook).read_text()).get("metadata", {}).get("kernelspec", {})
    km = _KERNELS[(sweep, cwd)] = AsyncKernelManager(kernel_name=spec.get("name", "python3"))
    return km


def execute(
    notebook: str, folder: str, params: dict[str, Any], outputs: Sequence[str] = (), kernel: str | None = None
) -> dict[str, Any]:
    """Execute ``notebook`` with ``params`` into ``folder``; gather its records; write and return ``run.json``.

    Never raises: a failure is returned (and written) with its error. The records ``.csv`` files the run wrote in
    ``folder`` are gathered into ``records.parquet``, with columns for the run's name and its parameters (those that
    are neither lists nor dicts, nor columns already).

    Args:
        notebook: The parameterized notebook's path.
        folder: The run's folder (made if missing), which gets the executed notebook.
        params: The parameters papermill passes.
        outputs: The notebook's parameters that name folders (``records_dir``, ``figures_dir``), pointed at
            ``folder``.
        kernel: A name shared by the runs that may reuse one kernel of this process (a sweep's), or ``None`` for a
            fresh kernel.

    Returns:
        What ``run.json`` holds: ``run`` (the folder's name), ``params``, ``status`` (``"ok"`` or ``"failed"``),
        ``error``, ``seconds``, and for a failure its ``traceback``.
    """
    import pandas as pd
    import papermill

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per run: the cluster runs one per core
    out, start = Path(folder), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("run.json", "records.parquet"):  # what an earlier run left here
        (out / stale).unlink(missing_ok=True)
    info: dict[str, Any] = {"run": out.name, "params": params, "status": "ok", "error": ""}
    cwd, km = str(Path(notebook).parent), None
    try:
        with _stderr_to(out / "kernel.log"):  # the kernel's own log lines, not the caller's output
            if kernel is not None:
                km = _kernel(kernel, notebook)
            papermill.execute_notebook(
                notebook,
                str(out / Path(notebook).name),
                parameters={**params, **{name: str(out.resolve()) for name in outputs}},
                cwd=cwd,
                progress_bar=False,
                log_output=False,
                **({"km": km} if km is not None else {}),
            )
        found = sorted(p for p in out.iterdir() if p.name.endswith((".csv", ".csv.gz")))
        if found:
            frame = pd.concat([read(p) for p in found], ignore_index=True)
            frame = frame.assign(
                run=out.name, **{k: v for k, v in params.items() if k not in frame and not isinstance(v, (list, dict))}
            )
            write(frame, out / "records.parquet")
    except Exception as exc:  # a failed run is reported, the others go on
        if km is not None and kernel is not None:  # and its kernel is not reused (km is only made for a kernel name)
            _KERNELS.pop((kernel, cwd), None)
            _shutdown(km)
        info.update(status="failed", error=f"{type(exc).__name__}: {exc}"[-4000:], traceback=traceback.format_exc())
    info["seconds"] = round(time.perf_counter() - start, 3)
    (out / "run.json").write_text(json.dumps(info, indent=1, default=str))
    return info


def sweep(
    notebook: str | Path,
    axes: Mapping[str, Sequence[Any]],
    *,
    out: str | Path,
    seeds: int | None = None,
    parameters: Mapping[str, Any] | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    reuse_kernels: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Execute ``notebook`` once per point of the ``axes`` grid (× ``seed`` in ``range(seeds)``) as Dask tasks.

    See the module for the folders, the cluster and the runs that are skipped.

    Args:
        notebook: The parameterized notebook (its cell tagged ``parameters`` declares the names).
        axes: Each swept parameter's values.
        out: The sweep's folder: one subfolder per run.
        seeds: Also sweep the notebook's ``seed`` over ``range(seeds)``; ``None`` leaves it alone.
        parameters: Passed to every run unchanged.
        scheduler: The address of an existing Dask scheduler; ``None`` starts a ``LocalCluster`` here.
        workers: The ``LocalCluster``'s worker processes; ``None``: one per core.
        reuse_kernels: Keep one kernel per worker for the sweep's runs, reset between them; ``False`` starts a fresh
            kernel for every run.
        progress: Show a progress bar over the runs and print a summary at the end.

    Returns:
        One row per run: ``run``, ``status`` (``ok``, ``failed`` or ``skipped``: done by an earlier sweep),
        ``seconds``, ``error``.

    Raises:
        ImportError: If ``dask.distributed`` is not installed.
        FileNotFoundError: If there is no notebook at ``notebook``.
        ValueError: If ``seeds`` is not a positive integer, or ``axes`` or ``parameters`` name a parameter the
            notebook does not declare.
    """
    import pandas as pd
    import papermill
    from tqdm.auto import tqdm

    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError as exc:
        raise ImportError('sweep needs dask.distributed: pip install -c constraints.txt "alphalib[sweep]".') from exc
    notebook = Path(notebook).resolve()
    if not notebook.is_file():
        raise FileNotFoundError(f"no notebook at {notebook}.")
    declared = papermill.inspect_notebook(str(notebook))
    axes = dict(axes)
    if seeds is not None:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ValueError(f"seeds must be a positive integer, got {seeds!r}.")
        axes["seed"] = list(range(seeds))
    fixed = dict(parameters or {})
    unknown = [k for k in [*axes, *fixed] if k not in declared]
    if unknown:
        raise ValueError(
            f"{notebook.name} has no parameter {', '.join(map(repr, unknown))}; its parameters cell "
            f"declares {', '.join(declared) or 'none'}."
        )
    outputs = [k for k in ("records_dir", "figures_dir") if k in declared and k not in fixed]
    root = Path(out)
    plan = [(root / _name(point), {**fixed, **point}) for point in grid(**axes)]
    rows, todo = [], []
    for folder, params in plan:
        done = _status(folder)
        if (
            done is not None
            and done.get("params") == json.loads(json.dumps(params, default=str))
            and done.get("status") == "ok"
        ):
            rows.append({"run": folder.name, "status": "skipped", "seconds": done.get("seconds"), "error": ""})
        else:
            todo.append((folder, params))
    if todo:
        cluster = (
            None
            if scheduler
            else LocalCluster(
                n_workers=workers or os.cpu_count() or 1, threads_per_worker=1, processes=True, dashboard_address=None
            )
        )
        try:
            with Client(scheduler or cluster) as client:
                kernel = f"{notebook}@{time.time_ns()}" if reuse_kernels else None
                futures = [
                    client.submit(
                        execute,
                        str(notebook),
                        str(folder.resolve()),
                        params,
                        outputs,
                        kernel,
                        key=f"alphalib-sweep-{folder.name}-{time.time_ns()}",
                        pure=False,
                    )
                    for folder, params in todo
                ]
                for future in tqdm(as_completed(futures), total=len(futures), desc="runs", disable=not progress):
                    info = future.result()
                    rows.append({k: info.get(k) for k in ("run", "status", "seconds", "error")})
        finally:
            if cluster is not None:
                cluster.close()
    table = pd.DataFrame(rows, columns=["run", "status", "seconds", "error"])
    counts = table.status.value_counts()
    if progress:
        print(
            f"{len(table)} runs: {counts.get('ok', 0)} done, {counts.get('failed', 0)} failed, "
            f"{counts.get('skipped', 0)} already done"
        )
        for r in table[table.status == "failed"].itertuples():
            print(f"  failed {r.run}: {r.error.splitlines()[-1] if r.error else ''}")
    return table


def load(folder: str | Path) -> pd.DataFrame:
    """Return the records of every finished run of the sweep in ``folder`` as one DataFrame (a ``run`` column).

    Args:
        folder: The sweep's folder (:func:`sweep`'s ``out``).

    Returns:
        The ``records.parquet`` of every run under ``folder``, concatenated.

    Raises:
        FileNotFoundError: If no run under ``folder`` has records.
    """
    import pandas as pd

    found = sorted(Path(folder).glob("*/records.parquet"))
    if not found:
        raise FileNotFoundError(f"no runs with records under {folder}: run alphalib.sweep.sweep(..., out={folder!r}).")
    return pd.concat([read(p) for p in found], ignore_index=True)
