r"""Intervals over seeds: a summary per group of runs, and paired differences between two methods on the same seeds.

Both resample *runs* (seeds), never steps: the steps of one run are not independent, the runs are. Intervals are
``scipy.stats.bootstrap``'s bias-corrected and accelerated (BCa) percentile intervals at ``level`` (95% unless told)
with a fixed ``random_state``, so a figure or a table drawn twice shows the same interval; with fewer than two runs,
or runs that all agree, there is nothing to resample and the interval is NaN (said, not invented). Say "over N
seeds" beside every interval: the ``runs`` / ``pairs`` columns hold N.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..records import _beyond

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["interval", "seed_summary", "paired_difference", "ratio"]

Method = Literal["BCa", "percentile", "basic"]


def interval(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[..., Any] = np.median,
    *,
    level: float = 0.95,
    method: Method = "BCa",
    n_resamples: int = 9999,
    random_state: int = 0,
) -> tuple[float, float]:
    """Return the bootstrap interval of ``statistic`` over ``values`` (one value per run), NaN where undefined.

    Args:
        values: One number per run; NaNs are dropped.
        statistic: A function of a 1-D array with an ``axis`` keyword (``np.median``, ``np.mean``).
        level: The confidence level.
        method: ``scipy.stats.bootstrap``'s interval method.
        n_resamples: The number of bootstrap resamples.
        random_state: Seeds the resampling, so the interval repeats.

    Returns:
        ``(lo, hi)``; ``(nan, nan)`` with fewer than two values, when all values are equal, or when one is infinite
        (a diverged run: the BCa interval is undefined, said rather than guessed).

    Example:
        >>> lo, hi = interval([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], np.mean)
        >>> bool(lo < 5.5 < hi), interval([1.0]), interval([1.0, 2.0, float("inf")])
        (True, (nan, nan), (nan, nan))
    """
    from scipy import stats

    data = np.asarray(values, dtype=float)
    data = data[~np.isnan(data)]
    if len(data) < 2 or np.all(data == data[0]) or not np.isfinite(data).all():
        return math.nan, math.nan
    with warnings.catch_warnings():  # a degenerate resample leaves BCa undefined: NaN, said in the result
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(
            (data,),
            statistic,
            confidence_level=level,
            method=method,
            n_resamples=n_resamples,
            random_state=np.random.default_rng(random_state),
            vectorized=True,
        )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def seed_summary(
    frame: pd.DataFrame,
    value: str = "lr_over_alpha",
    *,
    by: str | Sequence[str] = "epoch",
    runs: str = "seed",
    level: float = 0.95,
    method: Method = "BCa",
    n_resamples: int = 9999,
    random_state: int = 0,
) -> pd.DataFrame:
    r"""Return, per ``by`` group, the median over runs of each run's median ``value``, with a bootstrap interval.

    Each run is summarised by the median of ``value`` over its steps in the group (NaN steps dropped and counted in
    ``undefined``). The default ``lr_over_alpha`` (:math:`\mathrm{lr}/\alpha^*`) is defined on every step with a
    nonzero slope, odd ones included, so no step with :math:`\alpha^* \le 0` leaves the median; its reciprocal is
    the median :math:`\alpha^*/\mathrm{lr}` counting every step.

    Args:
        frame: Records of several runs as a DataFrame, with the ``by`` and ``runs`` columns.
        value: The column to summarise.
        by: The column or columns to group by.
        runs: The column that tells runs apart (the seed).
        level: The confidence level of the interval.
        method: The bootstrap interval's method (:func:`interval`).
        n_resamples: The number of bootstrap resamples.
        random_state: Seeds the resampling.

    Returns:
        One row per group: the ``by`` columns, ``runs`` (N, the runs with a median), ``steps``, ``undefined`` (the
        NaN steps), ``median`` (the median of the run medians) and ``lo``/``hi`` (its ``level`` bootstrap interval
        over the N runs; NaN with fewer than two).

    Example:
        >>> import pandas as pd
        >>> frame = pd.DataFrame({"epoch": 0, "seed": [0, 0, 1, 1, 2, 2], "lr_over_alpha": [1, 3, 2, 4, 3, 5.0]})
        >>> seed_summary(frame)[["epoch", "runs", "steps", "median"]].to_dict("records")
        [{'epoch': 0, 'runs': 3, 'steps': 6, 'median': 3.0}]
    """
    import pandas as pd

    keys = [by] if isinstance(by, str) else list(by)
    grouped = frame.groupby([*keys, runs])[value]
    per_run = pd.DataFrame({"median": grouped.median(), "steps": grouped.size(), "undefined": grouped.size()})
    per_run["undefined"] -= grouped.count()
    rows = []
    for key, group in per_run.groupby(level=list(range(len(keys)))):
        medians = group["median"].dropna().to_numpy()
        lo, hi = interval(medians, level=level, method=method, n_resamples=n_resamples, random_state=random_state)
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        row |= dict(runs=len(medians), steps=int(group["steps"].sum()), undefined=int(group["undefined"].sum()))
        row |= dict(median=float(np.median(medians)) if len(medians) else math.nan, lo=lo, hi=hi)
        rows.append(row)
    return pd.DataFrame(rows)


def paired_difference(
    frame: pd.DataFrame,
    value: str,
    *,
    method_column: str,
    baseline: str,
    pair: str = "seed",
    by: str | Sequence[str] = (),
    relative: bool = True,
    level: float = 0.95,
    n_resamples: int = 9999,
    random_state: int = 0,
) -> pd.DataFrame:
    r"""Return each method's mean paired difference from ``baseline`` on the same seeds, with a bootstrap interval.

    For method :math:`m` and seed :math:`s` (one row per method and seed in each ``by`` group), the difference is

    .. math:: \delta_s = v_{m,s}/v_{\mathrm{base},s} - 1 \quad (\texttt{relative}) \qquad\text{or}\qquad
        \delta_s = v_{m,s} - v_{\mathrm{base},s},

    summarised by its mean over the seeds both ran, the BCa interval of that mean, and the share of seeds where the
    method's value is lower than the baseline's (for a loss: where it wins).

    Args:
        frame: One row per method, seed and ``by`` group, holding ``value`` (say, the final held-out loss).
        value: The column compared.
        method_column: The column naming the methods.
        baseline: The method the others are compared with.
        pair: The column that pairs rows (the seed).
        by: Columns that split the comparison (the problem).
        relative: Compare ratios (``True``) or differences.
        level: The confidence level of the interval.
        n_resamples: The number of bootstrap resamples.
        random_state: Seeds the resampling.

    Returns:
        One row per ``by`` group and method other than ``baseline``: ``pairs`` (N seeds both ran with finite
        values), ``mean``, ``lo``, ``hi`` and ``lower`` (the share of pairs where the method is below the baseline).

    Raises:
        ValueError: If ``baseline`` is not among the methods, or a method has two rows for one seed and group.

    Example:
        >>> import pandas as pd
        >>> frame = pd.DataFrame({"seed": [0, 1, 2, 0, 1, 2], "method": ["a"] * 3 + ["b"] * 3,
        ...                       "loss": [1.0, 2.0, 4.0, 0.9, 2.1, 3.0]})
        >>> paired_difference(frame, "loss", method_column="method", baseline="a")[["method", "pairs", "lower"]]
          method  pairs     lower
        0      b      3  0.666667
    """
    import pandas as pd

    keys = [by] if isinstance(by, str) else list(by)
    if baseline not in set(frame[method_column]):
        raise ValueError(
            f"baseline {baseline!r} is not among the values of {method_column!r}: "
            f"{sorted(map(str, frame[method_column].unique()))}. Name one of them."
        )
    if frame.duplicated([*keys, method_column, pair]).any():
        raise ValueError(
            f"some method has two rows for one {pair!r}"
            + (f" in a group of {keys}" if keys else "")
            + ": aggregate to one value per run first (e.g. the last epoch's loss)."
        )
    wide = frame.pivot_table(index=[*keys, pair], columns=method_column, values=value, aggfunc="first")
    rows = []
    for key, group in wide.groupby(level=list(range(len(keys)))) if keys else [((), wide)]:
        base = group[baseline]
        for name in (c for c in group.columns if c != baseline):
            both = pd.concat([group[name], base], axis=1).dropna()
            a, b = both.iloc[:, 0].to_numpy(float), both.iloc[:, 1].to_numpy(float)
            delta = a / b - 1 if relative else a - b
            lo, hi = interval(delta, np.mean, level=level, n_resamples=n_resamples, random_state=random_state)
            row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
            row |= {method_column: name, "pairs": len(delta)}
            row |= dict(mean=float(delta.mean()) if len(delta) else math.nan, lo=lo, hi=hi)
            row["lower"] = float((a < b).mean()) if len(delta) else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


def ratio(inverse: float | Sequence[float] | np.ndarray) -> np.ndarray:
    r"""Return :math:`\alpha^*/\mathrm{lr}` from a median or quantile of :math:`\mathrm{lr}/\alpha^*`: ``1/x`` where
    ``x > 0``, ``+inf`` where ``x <= 0``, NaN where ``x`` is NaN.

    ``lr_over_alpha`` is defined on every step with a nonzero slope; a median of it that is ≤ 0 (most steps had
    :math:`\alpha^* \le 0`) means no finite step is the model's minimum: beyond any ratio.

    Example:
        >>> ratio([0.25, -1.0, float("nan")]).tolist(), float(ratio(0.5))
        ([4.0, inf, nan], 2.0)
    """
    return np.vectorize(_beyond, otypes=[float])(np.asarray(inverse, dtype=float))  # the core's rule, elementwise
