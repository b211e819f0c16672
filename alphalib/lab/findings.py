r"""The findings table: the key numbers of the notebooks, computed from their records files alone.

:func:`findings` reads the files named in :data:`FILES` from a folder and returns Markdown tables of what the README
quotes: per phase, setup and learning rate, the median over seeds of each seed's median :math:`\alpha^*/\mathrm{lr}
= 1/\operatorname{median}(\mathrm{lr}/\alpha^*)`, counting every step (:func:`alphalib.lab.stats.seed_summary`,
inverted), with its 95% BCa interval over seeds, and the share of steps with :math:`\alpha^* \le 0`; for 09 and 10
(per-epoch summaries of each run), the final held-out loss and its paired difference from Adam at its best fixed
lr on the same seeds (:func:`alphalib.lab.stats.paired_difference`), with what 09 chose on its tune seeds, reported
on its test seeds. Every number goes through :func:`number` (three significant digits), so the README can copy
them; the bootstrap's fixed seed makes two runs give the same bytes. A missing file skips its section, said in one
line. The command line writes the same text::

    python -m alphalib.lab.findings results > figures/findings.md
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..records import read as read_records
from .stats import interval, paired_difference, seed_summary

__all__ = ["findings", "number", "main", "FILES", "LEVEL"]

#: The records files, by section, as the notebooks write them.
FILES = {
    "01": "01_adam_alpha_star.csv.gz",
    "02": "02_optimizers.csv.gz",
    "03": "03_lr_sweep.csv.gz",
    "04": "04_models_and_data.csv.gz",
    "09": "09_closing_the_loop.csv.gz",
    "10": "10_lr_free.csv.gz",
    "11": "11_gpt_at_scale.csv.gz",
}
#: The confidence level of every interval.
LEVEL = 0.95
BEYOND = "beyond any ratio (most steps had α* ≤ 0)"
RULE = (
    "α*/lr = 1 / median(lr/α*): every step counted; α* ≤ 0 sits beyond any ratio (a median ≤ 0 of lr/α* is "
    f"reported as '{BEYOND}'). Per group: the median over seeds of each seed's median, with its "
    f"{LEVEL:.0%} BCa bootstrap interval over seeds; α* ≤ 0: steps with lr/α* ≤ 0 among those where it is defined, "
    "all seeds pooled. Epochs are numbered from 1."
)


def number(x: float) -> str:
    """Return ``x`` rounded to three significant digits, without an exponent below a million; ``"n/a"`` if not finite.

    Example:
        >>> [number(x) for x in (1234.5, 117.6, 8.804, 0.012345, 2.0, float("nan"), -2.54e17)]
        ['1230', '118', '8.8', '0.0123', '2', 'n/a', '-2.54e+17']
    """
    if not math.isfinite(x):
        return "n/a"
    rounded = float(f"{x:.3g}")
    if abs(rounded) >= 1e6:  # a diverged run's loss: its size, not its digits
        return f"{rounded:.3g}"
    return "0" if rounded == 0 else str(np.format_float_positional(rounded, trim="-"))


def findings(results_dir: str | Path) -> str:
    """Return the Markdown findings of the records files in ``results_dir`` (see the module).

    Args:
        results_dir: The folder holding the records files named in :data:`FILES`.

    Returns:
        The document: the sources and the rule, then one section per file (one line for a missing file).
    """
    folder = Path(results_dir)
    frames = {key: _load(folder / name) for key, name in FILES.items()}
    sections = {"01": _seed_problem, "02": _optimizers, "03": _lr_sweep, "04": _models_and_data,
                "09": _closing_the_loop, "10": _lr_free, "11": _gpt}  # fmt: skip
    titles = {"01": "seed problem", "02": "optimizers", "03": "lr sweep", "04": "models and data",
              "09": "closing the loop", "10": "learning-rate-free optimizers", "11": "GPT at scale"}  # fmt: skip
    parts = [f"# Findings: the records in `{folder.name}/`", _sources(frames), RULE]
    for key, section in sections.items():
        frame = frames[key]
        body = (
            f"`{FILES[key]}` is not in `{folder.name}/`: section skipped."
            if frame is None
            else section(frame)
            if len(frame)
            else f"`{FILES[key]}` holds no records: section skipped."
        )
        parts.append(f"## {key} · {titles[key]}\n\n{body}")
    return "\n\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print :func:`findings` of the folder named on the command line; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m alphalib.lab.findings", description="Print the findings table of a folder of records."
    )
    parser.add_argument("results_dir", nargs="?", default="results", help="the folder of records (default: results)")
    args = parser.parse_args(argv)
    sys.stdout.write(findings(args.results_dir))
    return 0


def _load(path: Path) -> pd.DataFrame | None:
    """Read a records file (``None`` if it is missing); one run without a ``seed`` column counts as seed 0."""
    if not path.exists():
        return None
    frame = read_records(path)
    if "seed" not in frame:
        frame["seed"] = 0
    if "lr0" not in frame and "lr" in frame:
        frame["lr0"] = frame["lr"]  # the lr a run was given
    return frame


def _sources(frames: dict[str, pd.DataFrame | None]) -> str:
    """Return the table of the files read: seeds, probed steps and epochs of each, or that it is missing."""
    rows = [
        [f"`{FILES[key]}`", "missing", "", ""]
        if frame is None
        else [f"`{FILES[key]}`", str(frame["seed"].nunique()), str(_probed(frame)), _epochs(frame["epoch"])]
        for key, frame in frames.items()
    ]
    return _table(["file", "seeds", "probed steps", "epochs"], rows)


def _seed_problem(frame: pd.DataFrame) -> str:
    scopes = {"mini-batch": frame["lr_over_alpha"]}
    for name, column in (("full training data", "full_ratio"), ("held-out data", "heldout_ratio")):
        if column in frame and frame[column].notna().any():
            scopes[name] = (1 / frame[column]).replace([np.inf, -np.inf], np.nan)  # lr/α* of the sampled steps
    epoch = frame["epoch"]
    first, last = int(epoch.min()), int(epoch.max())
    half = first + (last - first + 1) // 2
    phases = {
        f"epoch {first + 1} (first)": epoch == first,
        f"epoch {last + 1} (last)": epoch == last,
        f"{_span(half, last)} (second half)": epoch >= half,
        f"{_span(first, last)} (all)": epoch.notna(),
    }
    rows = [
        [phase, scope, _ratio(frame[mask], values[mask]), _share(values[mask])]
        for phase, mask in phases.items()
        for scope, values in scopes.items()
    ]
    return _setting(frame) + "\n\n" + _table(["phase", "scope", "α*/lr", "steps with α* ≤ 0"], rows)


def _optimizers(frame: pd.DataFrame) -> str:
    rows: list[list[str]] = []
    for (optimizer, lr), runs in frame.groupby(["optimizer", "lr0"], sort=False):
        first, last = runs["epoch"] == runs["epoch"].min(), runs["epoch"] == runs["epoch"].max()
        values = runs["lr_over_alpha"]
        rows.append(
            [str(optimizer), _lr(lr), _epochs(runs["epoch"])]
            + [_ratio(runs[first], values[first]), _ratio(runs[last], values[last]), _share(values)]
        )
    header = ["optimizer", "lr", "epochs", "α*/lr, first epoch", "α*/lr, last epoch", "steps with α* ≤ 0 (all epochs)"]
    return _setting(frame, ["problem"]) + "\n\n" + _table(header, rows)


def _lr_sweep(frame: pd.DataFrame) -> str:
    rows: list[list[str]] = []
    closest: dict[float, pd.Series] = {}  # per lr: |log(α*/lr)| of each seed's last epoch
    for lr, runs in frame.groupby("lr0", sort=True):
        last = runs[runs["epoch"] == runs["epoch"].max()]
        rows.append([_lr(lr), str(int(last["epoch"].iloc[0]) + 1), _ratio(last), _share(last["lr_over_alpha"])])
        per_seed = last.groupby("seed")["lr_over_alpha"].median()
        closest[lr] = np.abs(np.log(per_seed.where(per_seed > 0)))  # |log(α*/lr)|; NaN where beyond any ratio
    distance = pd.DataFrame(closest)  # seeds x lrs
    chosen = distance.dropna(how="all").idxmin(axis=1)
    counts = chosen.value_counts()
    seeds = len(chosen)
    for row, lr in zip(rows, closest, strict=True):
        row.append(f"{int(counts.get(lr, 0))} of {_seeds(seeds)}")
    header = ["lr", "last epoch", "α*/lr, last epoch", "steps with α* ≤ 0, last epoch", "α*/lr closest to 1 (log)"]
    if seeds:
        best = [_lr(lr) for lr in sorted(counts.index) if counts[lr] == counts.max()]
        line = f"α*/lr of the last epoch closest to 1 in log, per seed: lr {' and '.join(best)}, "
        line += f"in {int(counts.max())} of {_seeds(seeds)}" + (" each" if len(best) > 1 else "") + "."
    else:
        line = "α*/lr of the last epoch closest to 1 in log, per seed: no seed has a positive median α*."
    return _setting(frame, ["problem", "optimizer"]) + "\n\n" + _table(header, rows) + "\n\n" + line


def _models_and_data(frame: pd.DataFrame) -> str:
    rows: list[list[str]] = []
    for problem, setup in frame.groupby("problem", sort=False):
        for lr, runs in setup.groupby("lr0", sort=True):
            last = runs[runs["epoch"] == runs["epoch"].max()]
            epoch = str(int(last["epoch"].iloc[0]) + 1)
            rows.append([str(problem), _lr(lr), epoch, _ratio(last), _share(last["lr_over_alpha"])])
    header = ["problem", "lr", "last epoch", "α*/lr, last epoch", "steps with α* ≤ 0, last epoch"]
    return _setting(frame, ["optimizer"]) + "\n\n" + _table(header, rows)


def _gpt(frame: pd.DataFrame) -> str:
    """Per phase of the schedule: α*/lr on the step's batch and on a held-out batch along the same step; the gap."""
    heldout = (1 / frame["heldout_ratio"]).replace([np.inf, -np.inf], np.nan)  # lr/α* on the held-out batch
    phase = frame["phase"] if "phase" in frame else pd.Series("all steps", index=frame.index)
    rows = [
        [str(name), str(int(mask.sum())), _ratio(frame[mask]), _share(frame["lr_over_alpha"][mask]),
         _ratio(frame[mask], heldout[mask]), _share(heldout[mask])]
        for name, mask in ((name, phase == name) for name in dict.fromkeys(phase))
    ]  # fmt: skip
    header = ["phase", "probed steps", "α*/lr, step's batch", "α* ≤ 0", "α*/lr, held-out batch", "α* ≤ 0 (held out)"]
    both = (frame["ratio"] > 0) & (frame["heldout_ratio"] > 0)
    gap = np.log(frame["ratio"][both] / frame["heldout_ratio"][both])
    measured = frame["heldout_ratio"].notna() | frame["heldout_slope"].notna()
    flipped = (frame["ratio"] > 0) & ~(frame["heldout_ratio"] > 0) & measured
    noise = (
        f"Along the same step, the step's batch α* over the held-out batch's (steps where both are > 0, "
        f"{int(both.sum())} of {int(measured.sum())}): median factor {number(float(np.exp(gap.median())))}, median "
        f"|ln| {number(float(gap.abs().median()))}; held-out α* ≤ 0 where the batch's is > 0 on "
        f"{number(100 * flipped.sum() / max(int(measured.sum()), 1))}% of the steps."
    )
    return _setting(frame, ["optimizer"]) + "\n\n" + _table(header, rows) + "\n\n" + noise


def _closing_the_loop(frame: pd.DataFrame) -> str:
    """09: what the tune seeds chose per role, and how it did against the best fixed lr on the test seeds."""
    tune, test = (frame[frame["split"] == split] for split in ("tune", "test"))
    grid = [_lr(lr) for lr in sorted(tune.loc[tune["family"] == "Adam, fixed lr", "lr0"].unique())]
    last, diff = _final(test, "role", "Adam, best fixed lr")
    rows = [
        [str(problem), str(role), str(runs["method"].iloc[0]), _median(runs["val_loss"]),
         _difference(diff, problem, role), _ratio(runs, runs["median_lr_over_alpha"])]
        for (problem, role), runs in last.groupby(["problem", "role"], sort=False)
    ]  # fmt: skip
    header = ["problem", "role", "chosen on the tune seeds", "final held-out loss", "against the best fixed lr",
              "α*/lr (α*/lr_t where α*-scaled), last epoch"]  # fmt: skip
    setting = (
        f"Chosen on {_seeds(tune['seed'].nunique())} (tune: {_seed_range(tune)}) by the lowest median final held-out "
        f"loss: Adam's lr from {len(grid)} values ({', '.join(grid)}), κ per α* source from "
        f"{', '.join(f'{k:g}' for k in sorted(tune['kappa'].dropna().unique()))}; reported on "
        f"{_seeds(test['seed'].nunique())} (test: {_seed_range(test)}). Against the best fixed lr: the mean paired "
        f"relative difference in final held-out loss on the same seeds, with its {LEVEL:.0%} BCa interval, and the "
        "seeds where it ends lower."
    )
    return _setting(frame, ["problem"]) + " " + setting + "\n\n" + _table(header, rows)


def _lr_free(frame: pd.DataFrame) -> str:
    """10: where each optimizer's self-chosen step lands on the model, and its loss against Adam's best fixed lr."""
    last, diff = _final(frame, "method", "Adam (best fixed lr)")
    rows = [
        [str(problem), str(method), _ratio(runs, runs["median_lr_over_alpha"]),
         f"{number(100 * runs['alpha_le_0'].mean())}%", _median(runs["val_loss"]),
         _difference(diff, problem, method)]
        for (problem, method), runs in last.groupby(["problem", "method"], sort=False)
    ]  # fmt: skip
    header = ["problem", "method", "α*/s, last epoch", "steps with α* ≤ 0 (mean over seeds)", "final held-out loss",
              "against Adam's best fixed lr"]  # fmt: skip
    setting = (
        f"Epoch {int(last['epoch'].iloc[0]) + 1}, seeds {_seed_range(frame)}: none of them chose 09's lr or κ·α*; "
        "s is the step size each optimizer used (α*/s = 1: on the model's minimum)."
    )
    return _setting(frame, ["problem"]) + " " + setting + "\n\n" + _table(header, rows)


def _final(frame: pd.DataFrame, method_column: str, baseline: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the last epoch's rows (a diverged run's NaN loss as +inf) and their paired differences from
    ``baseline``, indexed by problem and method."""
    last = frame[frame["epoch"] == frame["epoch"].max()].assign(val_loss=lambda f: f["val_loss"].fillna(np.inf))
    diff = paired_difference(last, "val_loss", method_column=method_column, baseline=baseline, by="problem")
    return last, diff.set_index(["problem", method_column])


def _median(values: pd.Series) -> str:
    """Return the median over seeds of one value per seed with its BCa interval."""
    lo, hi = interval(values.to_numpy(float), level=LEVEL)
    head = number(float(values.median()))
    if len(values) < 2 or math.isnan(lo):
        return f"{head} (over {_seeds(len(values))}: no interval)"
    return f"{head} [{number(lo)}, {number(hi)}]"


def _difference(diff: pd.DataFrame, *key: str) -> str:
    """Return a paired difference as ``+3.1% [−1.2%, +7.4%], lower on 4 of 10 seeds``; ``baseline`` for its own."""
    if key not in diff.index:
        return "baseline"
    row = diff.loc[key]
    pairs, lower = int(row["pairs"]), int(round(row["lower"] * row["pairs"]))
    won = f"lower on {lower} of {_seeds(pairs)}"
    if not math.isfinite(row["mean"]):
        return f"a run diverged; {won}"
    bounds = "no interval" if math.isnan(row["lo"]) else f"[{_percent(row['lo'])}, {_percent(row['hi'])}]"
    return f"{_percent(row['mean'])} {bounds}, {won}"


def _percent(x: float) -> str:
    return ("+" if x > 0 else "") + number(100 * x) + "%"


def _seed_range(frame: pd.DataFrame) -> str:
    seeds = sorted(int(s) for s in frame["seed"].unique())
    return f"{seeds[0]}–{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])


def _probed(frame: pd.DataFrame) -> int:
    """Return the probed steps a file holds: its rows, or the steps its per-epoch summaries count (09, 10)."""
    return int(frame["steps"].sum()) if "median_lr_over_alpha" in frame else len(frame)


def _ratio(rows: pd.DataFrame, values: pd.Series | None = None) -> str:
    """Return the median over seeds of each seed's median α*/lr (every step counted) with its interval over seeds."""
    data = rows.assign(_value=rows["lr_over_alpha"] if values is None else values, _group=0)
    summary = seed_summary(data, "_value", by="_group", level=LEVEL)
    if summary.empty or not summary["runs"].iloc[0]:
        return "n/a (no defined steps)"
    median, lo, hi, runs = (summary[c].iloc[0] for c in ("median", "lo", "hi", "runs"))
    head = number(1 / median) if median > 0 else BEYOND
    if runs == 1:
        return f"{head} (1 seed: no interval)"
    if math.isnan(lo):
        return f"{head} (no interval: all {runs} seeds agree)"
    if hi <= 0:
        bounds = "[both ends beyond any ratio]"
    else:  # lr/α* from lo to hi is α*/lr from 1/hi up, through infinity when lo ≤ 0
        bounds = f"[{number(1 / hi)}, {number(1 / lo) if lo > 0 else 'beyond any ratio'}]"
    return f"{head} {bounds} ({LEVEL:.0%} BCa, over {runs} seeds)"


def _share(values: pd.Series) -> str:
    """Return the share of the defined values that are ≤ 0 (steps with α* ≤ 0), and the counts."""
    defined = values.dropna()
    if defined.empty:
        return "n/a (no defined steps)"
    odd = int((defined <= 0).sum())
    return f"{number(100 * odd / len(defined))}% ({odd} of {len(defined)})"


def _setting(frame: pd.DataFrame, columns: Sequence[str] = ("problem", "optimizer", "lr0")) -> str:
    """Return one line naming the values that ``columns`` take in the file."""
    named = {"problem": "problem", "optimizer": "optimizer", "lr0": "lr"}
    parts = []
    for column in (c for c in columns if c in frame):
        values = list(dict.fromkeys(frame[column].dropna()))
        shown = [_lr(v) for v in values] if column == "lr0" else [str(v) for v in values]
        parts.append(f"{named[column]}: {', '.join(shown)}")
    return "; ".join(parts) + "."


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _epochs(epoch: pd.Series) -> str:
    return _span(int(epoch.min()), int(epoch.max())).removeprefix("epochs ").removeprefix("epoch ")


def _span(first: int, last: int) -> str:
    """Name the epochs ``first`` to ``last`` (counted from 0) as ``epochs 11–20``, or ``epoch 20``."""
    return f"epochs {first + 1}–{last + 1}" if last > first else f"epoch {first + 1}"


def _lr(lr: float) -> str:
    """Write a learning rate as ``1e-3``, ``3e-4``, ``2.5e-2``."""
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{np.format_float_positional(float(mantissa), trim='-')}e{int(exponent)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


if __name__ == "__main__":
    raise SystemExit(main())
