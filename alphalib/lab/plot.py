"""The recurring figures, in one seaborn style: α* per step, α*/lr per epoch, the loss curve."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.ticker import LogFormatter, MaxNLocator, PercentFormatter

from .stats import ratio

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.typing import ColorType

#: how each kind of step is drawn in :func:`alpha_per_step`
KINDS = {
    "descent, H>0": dict(color="tab:blue", marker="o"),
    "negative curvature": dict(color="tab:red", marker="x"),
    "ascent": dict(color="tab:orange", marker="^"),
}


def style() -> None:
    """Set the package's seaborn theme."""
    sns.set_theme(context="notebook", style="whitegrid", palette="deep")


def _kind(flag: str) -> str | None:
    if "negative_curvature" in flag:
        return "negative curvature"
    if "ascent" in flag:
        return "ascent"
    return "descent, H>0" if flag == "ok" else None


def alpha_per_step(records: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    r"""Plot :math:`\alpha^*` per step on a log axis with its per-epoch median and the learning rate.

    Where the optimizer chose its own step size (a ``step_size`` column that differs from ``lr``) that is drawn in
    place of the lr. Only descent steps with positive curvature have an :math:`\alpha^*` that is a step size; steps
    with negative curvature or an ascent direction (:math:`\alpha^* \le 0`: the model has no minimum ahead) are
    marked in a strip below the axes (which carries the step axis), counted in the title and the legend, not drawn
    as step sizes. The per-epoch
    median counts every step: it is :math:`1/\operatorname{median}(1/\alpha^*)`, with :math:`1/\alpha^* =
    -d^\top H d / d^\top g` continuous through the odd steps (a median of them is drawn only while fewer than half
    are odd). Steps where α* is undefined (zero step, non-finite values, a failed backend) are counted in the title.

    Args:
        records: The probe's records (:meth:`alphalib.AlphaProbe.to_frame`): ``step``, ``alpha_star``, ``flag``,
            ``lr``, ``lr_over_alpha``, and ``epoch`` and ``step_size`` where there are.
        ax: The axes to draw on; ``None`` makes a new figure.

    Returns:
        The axes drawn on (the strip is an inset of it).
    """
    ax = ax or plt.subplots(figsize=(8, 4.5))[1]
    kinds = records["flag"].map(_kind)
    strip = ax.inset_axes((0.0, -0.15, 1.0, 0.11), sharex=ax)  # below, carrying the step axis
    odd_rows = [kind for kind in KINDS if not kind.startswith("descent")]
    for kind, spec in KINDS.items():
        sel = records[kinds == kind]
        if kind.startswith("descent"):
            ax.scatter(
                sel["step"],
                sel["alpha_star"],
                s=6,
                alpha=0.35,
                linewidths=0.8,
                label=f"α*, {kind} ({len(sel)})",
                color=spec["color"],
                marker=spec["marker"],
            )
        else:  # no step size: a tick in the strip
            strip.scatter(
                sel["step"],
                np.zeros(len(sel)),
                s=40,
                marker="|",
                color=spec["color"],
                linewidths=1.2,
                label=f"step with {kind}, α* ≤ 0 ({len(sel)})",
            )
    strip.set_ylim(-1, 1)
    strip.set_yticks([0], ["odd"])
    strip.tick_params(axis="y", length=0)
    strip.grid(False, axis="y")
    ax.tick_params(labelbottom=False)
    size = records["step_size"] if "step_size" in records else records["lr"]  # α* is in units of the step size
    if "epoch" in records and records["epoch"].notna().any():
        per = records.assign(inverse=inverse(records) / size)  # 1/α*, every step with a nonzero slope
        per = per.groupby("epoch").agg(step=("step", "mean"), inverse=("inverse", "median"))
        ax.plot(per["step"], ratio(per["inverse"]), color="black", lw=1.8, label="per-epoch median α* (every step)")
    own = not size.equals(records["lr"])  # chosen by a learning-rate-free optimizer
    ax.plot(records["step"], size, color="tab:green", ls="--", lw=1.8, label="step size" if own else "lr")
    ax.set_yscale("log")
    ax.set_ylabel("α*")
    strip.set_xlabel("optimizer step")
    odd, undefined = int(kinds.isin(odd_rows).sum()), int(kinds.isna().sum())
    ax.set_title(f"α* along the realized step ({odd} of {len(records)} steps odd: strip below; {undefined} undefined)")
    handles = [h for a in (ax, strip) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", markerscale=1.5)
    return ax


def inverse(records: pd.DataFrame) -> pd.Series:
    r"""Return each step's :math:`\mathrm{lr}/\alpha^*`: ``lr_over_alpha``, or ``1/ratio`` for records without it.

    Defined on odd steps too (negative where :math:`\alpha^* < 0`), so medians of it count every step.
    """
    if "lr_over_alpha" in records:
        return records["lr_over_alpha"]
    return 1 / records["ratio"]


def ratio_per_epoch(records: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    r"""Plot the per-epoch median :math:`\alpha^*/\mathrm{lr}` with its 10–90% band on a log axis, beside α* = lr.

    Every step counts: medians and quantiles are taken of :math:`\mathrm{lr}/\alpha^*` (``lr_over_alpha``,
    defined on odd steps too) and inverted, so a step with :math:`\alpha^* \le 0` sits beyond any ratio (a band
    that reaches them runs off the top); the legend counts them.

    Args:
        records: The probe's records of one run: ``epoch``, ``lr_over_alpha``, ``flag``.
        ax: The axes to draw on; ``None`` makes a new figure.

    Returns:
        The axes drawn on.
    """
    ax = ax or plt.subplots(figsize=(8, 4.5))[1]
    _median_band(ax, records, (0.1, 0.9), "tab:blue", f"median, band 10–90%\n({_odd(records)})")
    _log_ratio_axis(ax)
    _epoch_axis(ax)
    ax.set_title(f"α*/lr per epoch ({_per_epoch(records, ['epoch'])} probed steps per epoch)")
    ax.legend(loc="best", fontsize="small")
    return ax


def _median_band(ax: Axes, records: pd.DataFrame, band: tuple[float, float], color: ColorType, label: str) -> None:
    """Draw the per-epoch median α*/lr of every step at epoch + 1, with the quantile ``band`` around it."""
    qs = [0.5, 1 - band[0], 1 - band[1]]  # quantiles of lr/α*: the reciprocal reverses the order
    per = inverse(records).groupby(records["epoch"]).quantile(qs).unstack()
    _line_band(ax, per.index, ratio(per[0.5]), ratio(per[qs[1]]), ratio(per[qs[2]]), color, label)


def _line_band(
    ax: Axes,
    epoch: pd.Index | pd.Series,
    mid: pd.Series | np.ndarray,
    lo: pd.Series | np.ndarray,
    hi: pd.Series | np.ndarray,
    color: ColorType,
    label: str,
    alpha: float = 0.2,
) -> None:
    """Draw ``mid`` against 0-based ``epoch`` (at epoch + 1) with the band ``lo``–``hi`` around it.

    A band edge at +inf (steps beyond any ratio) runs off the top of the axes, which keep to the finite values.
    """
    x = np.asarray(epoch) + 1
    ax.plot(x, mid, color=color, label=label)
    limits = ax.dataLim.frozen()
    lo, hi = (np.where(np.isposinf(v), 1e30, v) for v in (np.asarray(lo, float), np.asarray(hi, float)))
    ax.fill_between(x, lo, hi, color=color, alpha=alpha, linewidth=0)
    ax.dataLim.set(limits)  # the band's finite edges only, below
    edges = np.concatenate([lo, hi])
    edges = edges[np.isfinite(edges) & (edges < 1e30)]
    if len(edges):
        ax.update_datalim(np.column_stack([np.full(len(edges), x[0]), edges]), updatex=False)
    ax.autoscale_view()


def _epoch_axis(ax: Axes) -> None:
    """Label the x axis "epoch" with integer ticks in steps of 1, 2 or 5."""
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(10, integer=True, steps=[1, 2, 5, 10]))


def _odd(records: pd.DataFrame) -> str:
    """Say how many steps have α* ≤ 0 (counted in the medians, beyond any ratio) and how many are undefined."""
    values = inverse(records)
    odd, undefined = int((values <= 0).sum()), int(values.isna().sum())
    return f"{odd} of {len(records)} steps with α* ≤ 0, counted" + (f"; {undefined} undefined" if undefined else "")


def _per_epoch(records: pd.DataFrame, keys: list[str]) -> str:
    """Return the number of probed steps per group of ``keys`` (one epoch of one run), as a range if it varies."""
    sizes = records.groupby(keys).size()
    return f"{sizes.min()}" if sizes.min() == sizes.max() else f"{sizes.min()}–{sizes.max()}"


def _lr_text(records: pd.DataFrame) -> str:
    """Return "lr 1e-3" when the records ran at one initial learning rate (``lr0``, else ``lr``), otherwise ""."""
    column = next((c for c in ("lr0", "lr") if c in records), None)
    if column is None or records[column].nunique() != 1:
        return ""
    return f"lr {np.format_float_scientific(records[column].iloc[0], trim='-', exp_digits=1)}"


def _log_ratio_axis(ax: Axes) -> None:
    ax.set_yscale("log")
    ax.axhline(1.0, color="tab:green", ls="--", lw=1.8, label="α* = lr")
    ax.set_ylabel("α* / lr")


def ratio_by(records: pd.DataFrame, hue: str, *, ax: Axes | None = None) -> Axes:
    r"""Plot the per-epoch median :math:`\alpha^*/\mathrm{lr}` with its 25–75% band, one line per ``hue``.

    Every step counts (as in :func:`ratio_per_epoch`); each legend entry gives the line's learning rate (when it
    has one) and how many of its steps had :math:`\alpha^* \le 0`; :func:`odd_share` shows what they were.

    Args:
        records: Records of several runs: ``epoch``, ``lr_over_alpha`` and the ``hue`` column.
        hue: The column whose values tell the lines apart (``"optimizer"``, ``"lr0"``).
        ax: The axes to draw on; ``None`` makes a new figure.

    Returns:
        The axes drawn on.
    """
    ax = ax or plt.subplots(figsize=(8, 4.5))[1]
    groups = records.groupby(hue, sort=False)
    for (name, rows), color in zip(groups, sns.color_palette(n_colors=groups.ngroups), strict=True):
        lr = _lr_text(rows)
        _median_band(ax, rows, (0.25, 0.75), color, f"{name}{f' ({lr})' if lr else ''}, {_odd(rows)}")
    _log_ratio_axis(ax)
    _epoch_axis(ax)
    per_epoch = _per_epoch(records, [hue, "epoch"])
    ax.set_title(f"α*/lr per epoch: median and 25–75% band of each epoch's {per_epoch} probed steps")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return ax


def odd_share(records: pd.DataFrame, by: str, *, ax: Axes | None = None) -> Axes:
    """Bar-plot, per value of ``by``, the share of steps with negative curvature and with an ascent direction.

    Each tick names the group's learning rate (when it has one) and how many probed steps the shares are of.

    Args:
        records: Records of several runs: ``flag`` and the ``by`` column.
        by: The column whose values make the groups of bars (``"optimizer"``).
        ax: The axes to draw on; ``None`` makes a new figure.

    Returns:
        The axes drawn on.
    """
    ax = ax or plt.subplots(figsize=(8, 4))[1]
    flag = records["flag"]
    share = (
        records.assign(
            **{
                "negative curvature": flag.str.contains("negative_curvature"),
                "ascent (dᵀg > 0)": flag.str.contains("ascent"),
            }
        )
        .groupby(by, sort=False)[["negative curvature", "ascent (dᵀg > 0)"]]
        .mean()
        .reset_index()
        .melt(id_vars=by, var_name="kind", value_name="share")
    )
    sns.barplot(data=share, x=by, y="share", hue="kind", ax=ax)
    groups = records.groupby(by, sort=False)
    ticks = ["\n".join(filter(None, (f"{name}", _lr_text(rows), f"{len(rows)} steps"))) for name, rows in groups]
    ax.set_xticks(range(groups.ngroups), ticks)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set(ylabel="share of probed steps", title="odd steps: negative curvature along d, or d points uphill")
    return ax


def alpha_vs_lr(records: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    r"""Plot the per-epoch median :math:`\alpha^*` against the learning rate on log-log axes, with α* = lr.

    Each dot is one epoch of one run (colour: epoch, from 1); the line joins the last epoch's medians; the title
    gives the probed steps per epoch and how many had :math:`\alpha^* \le 0`. Every step counts: the median is
    :math:`\mathrm{lr}/\operatorname{median}(\mathrm{lr}/\alpha^*)` (an epoch where most steps are odd has no
    finite median and no dot).

    Args:
        records: Records of runs at several learning rates: ``lr``, ``epoch``, ``lr_over_alpha``.
        ax: The axes to draw on; ``None`` makes a new figure.

    Returns:
        The axes drawn on.
    """
    ax = ax or plt.subplots(figsize=(6, 5))[1]
    med = records.assign(lr_over_alpha=inverse(records)).groupby(["lr", "epoch"], as_index=False)["lr_over_alpha"]
    med = med.median()
    med = med.assign(epoch=med["epoch"] + 1, alpha_star=med["lr"] * ratio(med["lr_over_alpha"]))
    med = med[np.isfinite(med["alpha_star"])]
    sns.scatterplot(data=med, x="lr", y="alpha_star", hue="epoch", palette="viridis", s=25, ax=ax, legend="brief")
    last = med[med["epoch"] == med.groupby("lr")["epoch"].transform("max")]
    ax.plot(last["lr"], last["alpha_star"], color="black", lw=1.5, marker="o", label="last epoch")
    lo, hi = min(med["lr"].min(), med["alpha_star"].min()), max(med["lr"].max(), med["alpha_star"].max())
    ax.axline((lo, lo), (hi, hi), color="tab:green", ls="--", lw=1.8, label="α* = lr")  # across the whole panel
    ax.update_datalim([(lo, lo), (hi, hi)])
    ax.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="median α* per epoch")
    ax.set_title(
        f"dots: medians of {_per_epoch(records, ['lr', 'epoch'])} probed steps; {_odd(records)}", fontsize="small"
    )
    ax.legend(title="epoch", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return ax


def ratio_bands(summary: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    r"""Plot per-epoch medians of :math:`\alpha^*/\mathrm{lr}` across runs with their interval, one line per scope.

    ``summary`` summarises :math:`\mathrm{lr}/\alpha^*` (defined on every step, odd ones included), so the line is
    its reciprocal and the band the reciprocal of its interval; the legend says over how many runs. Epochs are drawn
    from 1.

    Args:
        summary: :func:`alphalib.seed_summary` of ``lr_over_alpha`` (``epoch``, ``runs``, ``median``, ``lo``,
            ``hi``) with a ``scope`` column (``"batch"``, ``"full data"``, ...).
        ax: The axes to draw on; ``None`` makes a new figure.

    Returns:
        The axes drawn on.
    """
    ax = ax or plt.subplots(figsize=(8, 4.5))[1]
    colors = [f"C{i}" for i in (0, 3, 4, 1, 5)]  # blue, red, purple, ...: apart from the green α* = lr line
    for (scope, rows), color in zip(summary.groupby("scope", sort=False), colors, strict=False):
        n = f"{rows['runs'].min()}" if rows["runs"].nunique() == 1 else f"{rows['runs'].min()}–{rows['runs'].max()}"
        label = f"{scope} (over {n} seeds)"
        _line_band(ax, rows["epoch"], ratio(rows["median"]), ratio(rows["hi"]), ratio(rows["lo"]), color, label)
    _log_ratio_axis(ax)
    _epoch_axis(ax)
    ax.legend(loc="best", fontsize="small", ncols=2)
    return ax


def losses_per_epoch(epochs: pd.DataFrame, *, baseline: float | None = None, ax: Axes | None = None) -> Axes:
    """Plot training and held-out loss per epoch (median over runs, band: their range) beside a baseline.

    Args:
        epochs: Per-epoch rows of one or more runs (:attr:`History.epochs <alphalib.lab.train.History.epochs>`):
            ``epoch`` and ``train_loss`` or ``val_loss`` (each drawn where present).
        baseline: A loss to draw as a horizontal line, the loss of predicting the targets' mean (their variance);
            ``None`` for none.
        ax: The axes to draw on; ``None`` makes a new figure.

    Returns:
        The axes drawn on.
    """
    ax = ax or plt.subplots(figsize=(8, 4.5))[1]
    for column, color in (("train_loss", "black"), ("val_loss", "tab:purple")):
        if column in epochs:
            per = epochs.groupby("epoch")[column].agg(["median", "min", "max"])
            label = "training loss" if column == "train_loss" else "held-out loss"
            _line_band(ax, per.index, per["median"], per["min"], per["max"], color, label, alpha=0.15)
    if baseline is not None:
        ax.axhline(baseline, color="tab:gray", ls=":", lw=1.8, label=f"predict the mean (Var y = {baseline:.3g})")
    ax.set(xlabel="epoch", ylabel="loss")
    ax.legend(loc="best", fontsize="small")
    return ax


def final_loss_vs_lr(epochs: pd.DataFrame, *, column: str = "train_loss", ax: Axes | None = None) -> Axes:
    """Plot the last epoch's ``column`` against the initial learning rate: a dot per run, a line through the medians.

    Args:
        epochs: Per-epoch rows of runs at several learning rates: ``epoch``, ``lr0`` and ``column``.
        column: The loss to plot (``"train_loss"``, ``"val_loss"``).
        ax: The axes to draw on; ``None`` makes a new figure.

    Returns:
        The axes drawn on.
    """
    ax = ax or plt.subplots(figsize=(6, 5))[1]
    last = epochs[epochs["epoch"] == epochs["epoch"].max()]
    median = last.groupby("lr0")[column].median()
    ax.scatter(last["lr0"], last[column], s=12, color="black", alpha=0.35, linewidths=0)
    ax.plot(median.index, median.to_numpy(), marker="o", color="black")
    runs = last.groupby("lr0").size()
    each = f"{runs.min()}" if runs.min() == runs.max() else f"{runs.min()}–{runs.max()}"
    ax.set(
        xscale="log",
        xlabel="learning rate",
        ylabel=f"final {column.replace('_', ' ')}",
        title=f"after epoch {int(last['epoch'].iloc[0]) + 1}: median of {each} runs, a dot per run",
    )
    return ax


def loss_curve(steps: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Plot the training loss per step and its per-epoch mean, on a log axis where every loss is positive.

    Args:
        steps: Per-step rows (:attr:`History.steps <alphalib.lab.train.History.steps>`): ``step``, ``epoch``,
            ``loss``.
        ax: The axes to draw on; ``None`` makes a new figure.

    Returns:
        The axes drawn on.
    """
    ax = ax or plt.subplots(figsize=(8, 4.5))[1]
    ax.plot(steps["step"], steps["loss"], color="tab:gray", lw=0.6, alpha=0.5, label="mini-batch loss")
    per_epoch = steps.groupby("epoch").agg(step=("step", "mean"), loss=("loss", "mean"))
    ax.plot(per_epoch["step"], per_epoch["loss"], color="black", lw=1.8, label="per-epoch mean")
    ax.set(xlabel="optimizer step", ylabel="training loss", yscale="log" if np.all(steps["loss"] > 0) else "linear")
    ax.set_title("training loss")
    ax.legend(loc="best", fontsize="small")
    return ax


def plain_log(ax: Axes) -> Axes:
    """Label ``ax``'s log axes with plain numbers (0.001, 0.25, 2) instead of powers of ten, which also draw faster.

    Args:
        ax: The axes whose log-scaled axes get the plain labels (linear ones are left as they are).

    Returns:
        ``ax``.
    """
    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() == "log":
            axis.set_major_formatter(_Plain(labelOnlyBase=False))
            axis.set_minor_formatter(_Plain(labelOnlyBase=False))
    return ax


class _Plain(LogFormatter):
    """Log tick labels as plain numbers, chosen as matplotlib's own log labels are."""

    def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
        return f"{x:g}"


def save(fig: Figure, figures_dir: str | Path, name: str, *, svg: bool = False) -> None:
    """Save ``fig`` as ``figures_dir/name.png`` (and ``.svg``), creating the folder.

    It returns nothing, so that a notebook cell ending in ``plot.save(...)`` shows the figure and no path.

    Args:
        fig: The figure to save.
        figures_dir: The folder to save it in, created if missing.
        name: The file name, without suffix.
        svg: Also save an ``.svg`` beside the ``.png``.
    """
    path = Path(figures_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    if svg:
        fig.savefig(path.with_suffix(".svg"), bbox_inches="tight")
