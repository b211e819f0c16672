r"""Watch :math:`\alpha^*` while a run trains, and click through finished runs: :func:`watch` and :func:`explore`.

Both draw with :mod:`alphalib.lab.plot`. The live view shows itself only where a notebook frontend is attached to the
kernel (JupyterLab or Notebook through a Jupyter server, VS Code, Colab); under papermill or nbval, in IPython's
terminal or in a plain script it attaches nothing to the probe and costs nothing. It draws on a budget: a drawing
is made only while all drawings so far, with the next (estimated by the last one's time), stay within the share
:math:`b` (``budget``, 5% by default) of the time since training began. The final drawing, made when training
ends, comes on top; a run much shorter than a drawing's time over :math:`b` (about 10 s here) is drawn only then.
"""

from __future__ import annotations

import html
import io
import math
import os
import sys
import time
import warnings
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import matplotlib
from matplotlib.figure import Figure

from ..records import Record, read
from . import plot

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.typing import RcKeyType

    from ..probe import AlphaProbe
    from ..scaled import AlphaScaled

#: the columns a live view keeps of each record, and the ones the explorer needs
#: Text sizes of the live view and the explorer, whose figures are drawn at 100 dpi: 10 pt is 14 px on the screen,
#: as JupyterLab's own text at 100% zoom.
READABLE: dict[RcKeyType, Any] = {
    "font.size": 11,
    "axes.titlesize": 11,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "legend.title_fontsize": 10,
    "figure.titlesize": 12,
}

COLUMNS = ("step", "epoch", "lr", "alpha_star", "ratio", "lr_over_alpha", "flag", "loss")
#: what the explorer lets you choose, in this order, and how its controls are labelled (``lr0``: a run's initial
#: learning rate; records without it are told apart by ``lr``)
DIMENSIONS = {
    "sweep": "results",
    "problem": "problem",
    "optimizer": "optimizer",
    "lr0": "lr",
    "seed": "seed",
    "backend": "curvature",
}
#: records without epochs are drawn every this many records when ``every="epoch"``
_NO_EPOCHS = 25


def frontend() -> bool:
    """Return whether a notebook frontend shows this kernel's output while a cell runs.

    Returns:
        True in a kernel that a Jupyter server started (JupyterLab, Notebook: the server sets ``JPY_SESSION_NAME``),
        in VS Code and in Colab; False under papermill and nbval (they start their kernels without a server), in
        IPython's terminal and in a plain script.
    """
    shell = _shell()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return False
    return (
        bool(os.environ.get("JPY_SESSION_NAME"))
        or "__vsc_ipynb_file__" in shell.user_ns
        or "google.colab" in sys.modules
    )


def _shell() -> Any:
    if "IPython" not in sys.modules:  # never imported: not a kernel
        return None
    from IPython import get_ipython

    return get_ipython()


class LiveView:
    r"""A live figure of :math:`\alpha^*` per step (with the lr), :math:`\alpha^*/\mathrm{lr}` per epoch and the loss.

    It redraws as records arrive, at each new epoch or every ``every`` records, within the drawing ``budget`` (see
    the module). :func:`watch` is the usual way to make one.

    Args:
        every: ``"epoch"``: draw when a record of a new epoch arrives (every 25 records for records without
            epochs); a number: every this many records.
        budget: The share of the time since the first record that drawing may take, in (0, 1).
        title: The figure's title; by default it counts the probed steps.
        show: Display the drawings below the running cell; ``False`` draws into :attr:`png` without displaying
            anything (what tests and scripts can read).

    Raises:
        ValueError: If ``every`` is neither ``"epoch"`` nor a positive integer, or ``budget`` is not in (0, 1).
    """

    def __init__(
        self, *, every: int | Literal["epoch"] = "epoch", budget: float = 0.05, title: str = "", show: bool = True
    ):
        if every != "epoch" and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be 'epoch' or a positive number of records, got {every!r}.")
        if not 0 < budget < 1:
            raise ValueError(f"budget is the share of training time drawing may take, in (0, 1); got {budget!r}.")
        self.every, self.budget, self.title = every, budget, title
        self.rows: list[tuple] = []  #: the :data:`COLUMNS` of each record taken
        self.times: list[float] = []  #: the seconds each drawing took
        self.png = b""  #: the last drawing
        #: not pyplot's: the inline backend would show a pyplot figure again when the cell ends
        self.figure = Figure(figsize=(9.6, 6.4), dpi=100)
        self._since, self._clock = 0, time.perf_counter
        self._start: float | None = None  #: when the first record came
        self._estimate = 0.5  #: what the next drawing will take, in seconds: a guess until one has been made
        self._handle = None
        if show:
            from IPython.display import HTML, display

            self._handle = display(
                HTML(
                    f"<i>α* live view: the first drawing comes after about "
                    f"{self._estimate / budget:.0f} s of training (drawing takes at most "
                    f"{budget:.0%} of the time)…</i>"
                ),
                display_id=True,
            )

    def update(self, rec: Record) -> None:
        """Take one record; redraw when ``every`` says so and the budget allows.

        Args:
            rec: The probe's record of a step (the view is one of the probe's ``listeners``).
        """
        if self._start is None:
            self._start = self._clock()
        epoch = self.rows[-1][1] if self.rows else rec.epoch
        self.rows.append(tuple(getattr(rec, c) for c in COLUMNS))
        self._since += 1
        if self.every == "epoch":
            due = rec.epoch != epoch if rec.epoch is not None else self._since >= _NO_EPOCHS
        else:
            due = self._since >= self.every
        if due and self.seconds + self._estimate <= self.budget * (self._clock() - self._start):
            self.draw()

    def frame(self) -> pd.DataFrame:
        """Return the records taken so far (the :data:`COLUMNS`)."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=list(COLUMNS))

    @matplotlib.rc_context(READABLE)
    def draw(self) -> None:
        """Draw the records taken so far, and show the drawing where the view is shown."""
        start = self._clock()
        records, fig = self.frame(), self.figure
        if not fig.axes:  # made once: new axes would make their ticks anew at every drawing, the slow part
            for box in ((0.08, 0.6, 0.6, 0.31), (0.1, 0.075, 0.37, 0.32), (0.585, 0.075, 0.39, 0.32)):
                fig.add_axes(box)  # α* per step (its legend to the right, the odd steps' strip below), α*/lr, loss
        alpha, ratio, loss = fig.axes
        for ax in fig.axes:
            for artist in [*ax.lines, *ax.collections, *ax.texts, *ax.child_axes, *filter(None, [ax.get_legend()])]:
                artist.remove()
        plot.alpha_per_step(records, ax=alpha)
        if records["epoch"].notna().any():
            plot.ratio_per_epoch(records, ax=ratio)
            ratio.set_title(f"α*/lr per epoch (epoch {int(records['epoch'].max()) + 1} so far)")
        else:
            ratio.text(
                0.5, 0.5, "no epochs: pass epoch= to probe.step", ha="center", va="center", transform=ratio.transAxes
            )
        plot.loss_curve(records.fillna({"epoch": -1}), ax=loss)
        loss.set_title("mini-batch loss at θ_t")
        for ax in fig.axes:
            plot.plain_log(ax)
        fig.suptitle(self.title or f"live: {len(records)} probed steps")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        self.png = buffer.getvalue()
        if self._handle is not None:
            from IPython.display import Image

            self._handle.update(Image(data=self.png, format="png"))
        self._estimate = self._clock() - start
        self.times.append(self._estimate)
        self._since = 0

    @property
    def draws(self) -> int:
        """How often it has drawn."""
        return len(self.times)

    @property
    def seconds(self) -> float:
        """The time spent drawing, in seconds."""
        return sum(self.times)

    def close(self) -> None:
        """Draw what has not been drawn yet, whatever the budget: the run's final picture."""
        if self._since:
            self.draw()


class Watching:
    """What :func:`watch` returns: the view, attached to the probe until :meth:`close` (or the ``with`` ends).

    Args:
        probe: The probe whose records the view takes, as one of its ``listeners``.
        view: The live view, or ``None`` where nothing would be seen (then nothing is attached).
    """

    def __init__(self, probe: AlphaProbe | AlphaScaled, view: LiveView | None):
        self.probe, self.view = probe, view
        if view is not None:
            probe.listeners.append(view.update)

    def close(self) -> None:
        """Detach the view and draw the final picture (a drawing that fails warns: the run's results come first)."""
        if self.view is not None:
            with suppress(ValueError):
                self.probe.listeners.remove(self.view.update)
            try:
                self.view.close()
            except Exception as exc:
                warnings.warn(
                    f"alphalib: the live view's final drawing failed ({exc!r}).", RuntimeWarning, stacklevel=2
                )

    def __repr__(self) -> str:
        if self.view is None:
            return "Watching(nothing shown: no notebook frontend)"
        return f"Watching({len(self.view.rows)} records, {self.view.draws} drawings)"

    def __enter__(self) -> Watching:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def watch(
    probe: AlphaProbe | AlphaScaled,
    *,
    every: int | Literal["epoch"] = "epoch",
    budget: float = 0.05,
    title: str = "",
    show: bool | None = None,
) -> Watching:
    """Show the probe's records as a live figure below the running cell, where a notebook frontend shows it.

    Use it as a context manager around the training loop, or call ``close()`` after it.

    Args:
        probe: The :class:`~alphalib.AlphaProbe` (or :class:`~alphalib.AlphaScaled`) whose records are drawn.
        every: When to redraw: ``"epoch"``, at each new epoch, or every this many records (see :class:`LiveView`).
        budget: The share of training time that drawing may take, in (0, 1).
        title: The figure's title; by default it counts the probed steps.
        show: Whether to show the figure; ``None`` asks :func:`frontend`. Where nothing would be seen the probe gets
            no listener at all.

    Returns:
        A :class:`Watching` holding the view (``None`` where nothing is shown), attached until it is closed.

    Raises:
        ValueError: If ``every`` or ``budget`` is out of range (where a view is made).

    Example:
        Silent here, as in any script:

        >>> import torch
        >>> from alphalib import AlphaProbe
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        >>> probe = AlphaProbe(model, torch.nn.functional.mse_loss, opt)
        >>> with watch(probe) as live:
        ...     for epoch in range(2):
        ...         opt.zero_grad()
        ...         torch.nn.functional.mse_loss(model(torch.ones(4, 3)), torch.zeros(4, 1)).backward()
        ...         rec = probe.step((torch.ones(4, 3), torch.zeros(4, 1)), epoch=epoch)
        >>> live.view is None, probe.listeners
        (True, [])
    """
    shown = frontend() if show is None else show
    view = LiveView(every=every, budget=budget, title=title, show=True) if shown else None
    return Watching(probe, view)


# ---- the explorer -------------------------------------------------------------------------------------------


def load(source: pd.DataFrame | str | Path) -> pd.DataFrame:
    """Return records from a DataFrame, a records file, or a folder of them (searched recursively).

    Files are read by :func:`alphalib.records.read`; in a folder each file's rows get a ``sweep`` column naming the
    file (its path in the folder, without suffixes) unless they have one, and files without per-step records (no
    ``step`` column: the per-epoch summaries of notebooks 09 and 10) are left out.

    Args:
        source: A DataFrame (returned as it is), a records file (``.csv``, ``.csv.gz`` or ``.parquet``) or a folder.

    Returns:
        The records, a folder's concatenated.

    Raises:
        FileNotFoundError: If ``source`` is neither a file nor a folder, or the folder holds no records file.
    """
    import pandas as pd

    if isinstance(source, pd.DataFrame):
        return source
    path = Path(source)
    if path.is_file():
        return read(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no records at {path}: give a DataFrame, a records file or a folder of them.")
    files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p))
    if not files:
        raise FileNotFoundError(f"{path} holds no records file (.csv, .csv.gz or .parquet).")
    frames = []
    for file in files:
        frame = read(file)
        if "step" not in frame:  # per-epoch summaries, not the probe's records
            continue
        if "sweep" not in frame:
            frame.insert(0, "sweep", str(file.relative_to(path))[: -len(_suffix(file))])
        frames.append(frame)
    if not frames:
        raise FileNotFoundError(f"{path} holds no per-step records (files with a 'step' column).")
    return pd.concat(frames, ignore_index=True)


def _suffix(path: Path) -> str:
    return next((s for s in (".csv.gz", ".csv", ".parquet") if path.name.endswith(s)), "")


class Explorer:
    r"""An explorer of finished runs: dropdowns that choose a run above its figures and its table.

    The dropdowns cover the records' runs — results, problem, optimizer, lr, seed, curvature: those that vary —
    above the per-epoch median :math:`\alpha^*` against the learning rate (every lr of the chosen run's sweep; the
    chosen lr ringed), :math:`\alpha^*/\mathrm{lr}` per epoch of the chosen run, and a table of its per-epoch
    medians. Each control offers only what the ones before it leave.

    It is displayed as an ipywidgets panel; :attr:`controls`, :attr:`figure` and :attr:`summary` hold what it
    shows. :func:`explore` is the usual way to make one.

    Args:
        records: Records as :func:`load` takes them: a DataFrame, a records file or a folder of them.
        **chosen: What to show first, by the names of :data:`DIMENSIONS` (``optimizer="SGD"``, ``lr0=1e-2``).

    Raises:
        ValueError: If the records lack the probe's columns or are empty, or ``chosen`` names a control or a value
            they do not offer.
    """

    def __init__(self, records: pd.DataFrame | str | Path, **chosen: Any):
        import ipywidgets as w

        frame = load(records)
        missing = [c for c in COLUMNS if c not in frame and c != "lr_over_alpha"]  # (plot.inverse falls back)
        if missing:
            raise ValueError(
                f"these records lack the columns {missing}: give the probe's records "
                "(AlphaProbe.to_frame(), History.records) or files written from them."
            )
        if frame.empty:
            raise ValueError("there are no records to explore.")
        self.records = frame
        lr = "lr0" if "lr0" in frame else "lr"
        self.dimensions = [d for d in DIMENSIONS if (d if d != "lr0" else lr) in frame]
        self._column = {d: lr if d == "lr0" else d for d in self.dimensions}
        self.controls = {
            d: w.Dropdown(description=DIMENSIONS[d], layout=w.Layout(width="220px")) for d in self.dimensions
        }
        self.figure = Figure(figsize=(9.6, 4.2), dpi=100, layout="constrained")
        self.summary: pd.DataFrame | None = None  #: the per-epoch medians of the chosen run, as in the table
        self.caption = w.HTML()  #: the chosen run in words, drawn with the figure
        self.image = w.Image(format="png")
        self.table = w.HTML()
        self.draws = 0  #: how often it has drawn
        self._quiet = False
        unknown = set(chosen) - set(self.dimensions)
        if unknown:
            raise ValueError(f"cannot choose {sorted(unknown)}: these records offer {self.dimensions}.")
        self._cascade(0, chosen)
        for control in self.controls.values():
            control.observe(self._changed, names="value")
        self.widget = w.VBox(
            [
                w.HBox(list(self.controls.values()), layout=w.Layout(flex_flow="row wrap")),
                self.caption,
                self.image,
                self.table,
            ]
        )
        self.draw()

    def _repr_mimebundle_(self, **kwargs: Any) -> dict:
        return self.widget._repr_mimebundle_(**kwargs)

    @property
    def selection(self) -> dict[str, Any]:
        """Return the chosen value of each control."""
        return {d: c.value for d, c in self.controls.items()}

    def rows(self, *, every_lr: bool = False) -> pd.DataFrame:
        """Return the chosen run's records, or with ``every_lr`` those of its sweep at every learning rate.

        Args:
            every_lr: Ignore the learning-rate control: return the run's records at every learning rate.
        """
        return self._matching([d for d in self.dimensions if not (every_lr and d == "lr0")])

    def _matching(self, dimensions: list[str]) -> pd.DataFrame:
        """Return the records whose ``dimensions`` hold the controls' chosen values (all records for none)."""
        keep = True
        for d in dimensions:
            keep = keep & (self.records[self._column[d]] == self.controls[d].value)
        return self.records if keep is True else self.records[keep]

    def _cascade(self, start: int, chosen: dict[str, Any] | None = None) -> None:
        """Offer each control from ``start`` on only the values the controls before it leave; keep its choice (or
        take the one in ``chosen``)."""
        self._quiet = True
        try:
            for i, d in enumerate(self.dimensions):
                if i < start:
                    continue
                column = self._matching(self.dimensions[:i])[self._column[d]]
                values = sorted(column.dropna().unique().tolist(), key=_order)
                control, keep = self.controls[d], self.controls[d].value
                if chosen and d in chosen:
                    keep = chosen[d]
                    if keep not in values:
                        raise ValueError(f"{DIMENSIONS[d]} {keep!r} is not among these records' {values}.")
                control.options = [(_label(v), v) for v in values]
                control.value = keep if keep in values else values[0]
                control.disabled = len(values) < 2
        finally:
            self._quiet = False

    def _changed(self, change: dict) -> None:
        if self._quiet:
            return
        self._cascade(self.dimensions.index(next(d for d, c in self.controls.items() if c is change["owner"])) + 1)
        self.draw()

    @matplotlib.rc_context(READABLE)
    def draw(self) -> None:
        """Draw the chosen run and its sweep, and fill the table."""
        run, sweep, fig = self.rows(), self.rows(every_lr=True), self.figure
        fig.clear()
        left, right = fig.subplots(1, 2, width_ratios=[1, 1.25])
        plot.alpha_vs_lr(sweep, ax=left)
        last = run[run["epoch"] == run["epoch"].max()]
        chosen = last["lr"].iloc[-1] / plot.inverse(last).median() if len(last) else math.nan
        if math.isfinite(chosen) and chosen > 0:  # the last epoch's median α*, every step counted
            left.scatter(
                [last["lr"].iloc[-1]],
                [chosen],
                s=160,
                facecolors="none",
                edgecolors="tab:red",
                lw=2,
                zorder=5,
                label="chosen run",
            )
            left.legend(title="epoch", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        plot.ratio_per_epoch(run, ax=right)
        for ax in fig.axes:
            plot.plain_log(ax)
        chosen = ", ".join(f"{DIMENSIONS[d]} {_label(v)}" for d, v in self.selection.items())
        fig.suptitle(chosen)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        self.image.value = buffer.getvalue()
        self.caption.value = (
            f"<b>{html.escape(chosen)}</b>: {len(run)} probed steps over {run['epoch'].nunique()} "
            f"epochs, {int((plot.inverse(run) <= 0).sum())} with α* ≤ 0, counted in the medians"
        )
        self.summary = _per_epoch(run)
        table = self.summary.reset_index().to_html(
            float_format="{:.3g}".format, classes="alphalib-epochs", border=0, index=False
        )  # one header row, which stays in view
        self.table.value = (
            f"<style>{_TABLE_STYLE}</style><div class='alphalib-scroll' style='max-height:320px;"
            f"overflow-y:scroll;display:inline-block'>{table}</div>"
        )
        self.draws += 1


def explore(records: pd.DataFrame | str | Path, **chosen: Any) -> Explorer:
    """Open an explorer over records: a frame, a records file or a folder of them (a sweep's output).

    Args:
        records: Records as :func:`load` takes them: a DataFrame, a records file or a folder of them.
        **chosen: What to show first, by the columns of :data:`DIMENSIONS` (``sweep="03_lr_sweep"``,
            ``optimizer="SGD"``, ``lr0=1e-2``).

    Returns:
        The :class:`Explorer`, which displays itself as a widget panel as a cell's last expression.

    Raises:
        ValueError: If the records lack the probe's columns or are empty, or ``chosen`` names a control or a value
            they do not offer.
        FileNotFoundError: If ``records`` names no records file or folder of them.

    Example:
        >>> import pandas as pd
        >>> rows = [dict(step=s, epoch=s // 4, lr=lr, lr0=lr, alpha_star=2 * lr, ratio=2.0, flag="ok", loss=1.0,
        ...              optimizer="Adam") for lr in (1e-3, 1e-2) for s in range(8)]
        >>> ex = explore(pd.DataFrame(rows))
        >>> ex.controls["lr0"].options, ex.selection
        ((('0.001', 0.001), ('0.01', 0.01)), {'optimizer': 'Adam', 'lr0': 0.001})
        >>> ex.controls["lr0"].value = 0.01
        >>> ex.summary["median α*"].tolist(), ex.draws
        ([0.02, 0.02], 2)
    """
    return Explorer(records, **chosen)


def _per_epoch(run: pd.DataFrame) -> pd.DataFrame:
    """Return the explorer's table: per epoch (from 1), the medians of α* and α*/lr over every step (as in the
    figure: the reciprocals of the medians of lr/α*, NaN where most steps have α* ≤ 0), how many steps have α* ≤ 0,
    the shares of steps with H < 0 along d and going uphill, the mean loss."""
    flag, inv = run["flag"], plot.inverse(run)
    table = (
        run.assign(
            inverse=inv,
            inverse_alpha=inv / run["lr"],
            odd=inv <= 0,
            negative=flag.str.contains("negative_curvature"),
            ascent=flag.str.contains("ascent"),
        )
        .groupby("epoch")
        .agg(
            **{
                "steps": ("step", "size"),
                "α* ≤ 0": ("odd", "sum"),
                "median α*": ("inverse_alpha", "median"),
                "median α*/lr": ("inverse", "median"),
                "H<0 share": ("negative", "mean"),
                "ascent share": ("ascent", "mean"),
                "mean loss": ("loss", "mean"),
            }
        )
    )
    for column in ("median α*", "median α*/lr"):
        table[column] = 1 / table[column].where(table[column] > 0)
    table.index = (table.index + 1).rename("epoch")
    return table


def _order(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, int | float) and not isinstance(value, bool) else (1, 0, str(value))


def _label(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    return str(value)


_TABLE_STYLE = (
    ".alphalib-epochs {border-collapse: collapse; font-size: 14px}"
    ".alphalib-epochs th, .alphalib-epochs td {padding: 2px 10px; text-align: right}"
    ".alphalib-epochs thead th {border-bottom: 1px solid #999; position: sticky; top: 0; background: #fff}"
)
