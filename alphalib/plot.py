"""The recurring figures, in one seaborn style: α* per step, α*/lr per epoch, the loss curve."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.ticker import MaxNLocator, PercentFormatter

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

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
    """Plot :math:`|\\alpha^*|` per step on a log axis with its per-epoch median and the learning rate.

    Steps with negative curvature or an ascent direction are drawn with their own markers (their α* is
    negative or meaningless as a step size, so its absolute value is shown); steps where α* is undefined
    (zero step, non-finite values, a failed backend) are counted in the title.
    """
    ax = ax or plt.subplots(figsize=(8, 4.5))[1]
    kinds = records["flag"].map(_kind)
    for kind, spec in KINDS.items():
        sel = records[kinds == kind]
        if len(sel):
            ax.scatter(sel["step"], sel["alpha_star"].abs(), s=6 if kind.startswith("descent") else 18,
                       alpha=0.35 if kind.startswith("descent") else 0.9, linewidths=0.8,
                       label=f"|α*|, {kind} ({len(sel)})", **spec)
    if "epoch" in records and records["epoch"].notna().any():
        ok = records[kinds == "descent, H>0"].groupby("epoch").agg(step=("step", "mean"), a=("alpha_star", "median"))
        ax.plot(ok["step"], ok["a"], color="black", lw=1.8, label="per-epoch median α*")
    ax.plot(records["step"], records["lr"], color="tab:green", ls="--", lw=1.8, label="lr")
    ax.set_yscale("log")
    ax.set(xlabel="optimizer step", ylabel="α*  (learning-rate units)")
    undefined = int(kinds.isna().sum())
    ax.set_title(f"α* along the realized step ({undefined} of {len(records)} steps undefined)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", markerscale=1.5)
    return ax


def ratio_per_epoch(records: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Box-plot :math:`\\alpha^*/\\mathrm{lr}` per epoch on a log axis, with the line where the step is optimal.

    Only steps with positive curvature and a descent direction have a positive ratio; the others are counted
    in the title rather than dropped silently.
    """
    ax = ax or plt.subplots(figsize=(8, 4.5))[1]
    ok = records[records["flag"] == "ok"]
    sns.boxplot(data=ok, x="epoch", y="ratio", native_scale=True, showfliers=False, color="tab:blue",
                linewidth=0.8, ax=ax, log_scale=(False, True))
    ax.axhline(1.0, color="tab:green", ls="--", lw=1.8, label="α* = lr (step lands on the model's minimum)")
    ax.set(xlabel="epoch", ylabel="α* / lr")
    ax.xaxis.set_major_locator(MaxNLocator(10, integer=True))
    ax.set_ylim(min(ax.get_ylim()[0], 0.5), max(ax.get_ylim()[1], 2.0))
    ax.set_title(f"α*/lr per epoch ({len(records) - len(ok)} of {len(records)} steps with H≤0 or ascent not shown)")
    ax.legend(loc="best", fontsize="small")
    return ax


def _log_ratio_axis(ax: Axes) -> None:
    ax.set_yscale("log")
    ax.axhline(1.0, color="tab:green", ls="--", lw=1.8, label="α* = lr")
    ax.set_ylabel("α* / lr")


def ratio_by(records: pd.DataFrame, hue: str, *, ax: Axes | None = None) -> Axes:
    """Plot the per-epoch median :math:`\\alpha^*/\\mathrm{lr}` with its interquartile band, one line per ``hue``.

    Only steps flagged ``"ok"`` (positive curvature, descent) enter; :func:`odd_share` shows the rest.
    """
    ax = ax or plt.subplots(figsize=(8, 4.5))[1]
    ok = records[records["flag"] == "ok"]
    sns.lineplot(data=ok, x="epoch", y="ratio", hue=hue, estimator="median", errorbar=("pi", 50), ax=ax)
    _log_ratio_axis(ax)
    ax.set(xlabel="epoch", title="α*/lr per epoch (median, band: 25–75th percentile)")
    ax.xaxis.set_major_locator(MaxNLocator(10, integer=True))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return ax


def odd_share(records: pd.DataFrame, by: str, *, ax: Axes | None = None) -> Axes:
    """Bar-plot, per value of ``by``, the share of steps with negative curvature and with an ascent direction."""
    ax = ax or plt.subplots(figsize=(8, 4))[1]
    flag = records["flag"]
    share = (
        records.assign(**{"negative curvature": flag.str.contains("negative_curvature"),
                          "ascent (dᵀg > 0)": flag.str.contains("ascent")})
        .groupby(by)[["negative curvature", "ascent (dᵀg > 0)"]].mean()
        .reset_index().melt(id_vars=by, var_name="kind", value_name="share")
    )
    sns.barplot(data=share, x=by, y="share", hue="kind", ax=ax)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set(ylabel="share of probed steps", title="odd steps: negative curvature along d, or d points uphill")
    return ax


def alpha_vs_lr(records: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Plot the per-epoch median :math:`\\alpha^*` against the learning rate on log-log axes, with α* = lr.

    Each dot is one epoch of one run (colour: epoch); the line joins the last epoch's medians.
    """
    ax = ax or plt.subplots(figsize=(6, 5))[1]
    ok = records[records["flag"] == "ok"]
    med = ok.groupby(["lr", "epoch"], as_index=False)["alpha_star"].median()
    sns.scatterplot(data=med, x="lr", y="alpha_star", hue="epoch", palette="viridis", s=25, ax=ax, legend="brief")
    last = med[med["epoch"] == med.groupby("lr")["epoch"].transform("max")]
    ax.plot(last["lr"], last["alpha_star"], color="black", lw=1.5, marker="o", label="last epoch")
    lo, hi = min(med["lr"].min(), med["alpha_star"].min()), max(med["lr"].max(), med["alpha_star"].max())
    ax.plot([lo, hi], [lo, hi], color="tab:green", ls="--", lw=1.8, label="α* = lr")
    ax.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="median α* per epoch (lr units)")
    ax.legend(title="epoch", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return ax


def final_loss_vs_lr(epochs: pd.DataFrame, *, column: str = "train_loss", ax: Axes | None = None) -> Axes:
    """Plot the last epoch's ``column`` (e.g. ``train_loss``, ``val_loss``) against the learning rate."""
    ax = ax or plt.subplots(figsize=(6, 5))[1]
    last = epochs[epochs["epoch"] == epochs["epoch"].max()].sort_values("lr0")
    ax.plot(last["lr0"], last[column], marker="o", color="black")
    ax.set(xscale="log", xlabel="learning rate", ylabel=f"final {column.replace('_', ' ')}")
    return ax


def loss_curve(steps: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Plot the training loss per step and its per-epoch mean."""
    ax = ax or plt.subplots(figsize=(8, 4.5))[1]
    ax.plot(steps["step"], steps["loss"], color="tab:gray", lw=0.6, alpha=0.5, label="mini-batch loss")
    per_epoch = steps.groupby("epoch").agg(step=("step", "mean"), loss=("loss", "mean"))
    ax.plot(per_epoch["step"], per_epoch["loss"], color="black", lw=1.8, label="per-epoch mean")
    ax.set(xlabel="optimizer step", ylabel="training loss", yscale="log" if np.all(steps["loss"] > 0) else "linear")
    ax.set_title("training loss")
    ax.legend(loc="best", fontsize="small")
    return ax


def save(fig: Figure, figures_dir: str | Path, name: str, *, svg: bool = False) -> Path:
    """Save ``fig`` as ``figures_dir/name.png`` (and ``.svg``), creating the folder; return the PNG's path."""
    path = Path(figures_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    if svg:
        fig.savefig(path.with_suffix(".svg"), bbox_inches="tight")
    return path
