"""Intervals over seeds, against closed forms and hand-computed medians."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from alphalib.lab.stats import interval, paired_difference, seed_summary


def test_the_interval_of_a_mean_matches_the_t_interval_of_a_large_normal_sample():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    lo, hi = interval(x, np.mean, level=0.95)
    t_lo, t_hi = scipy_stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=x.std(ddof=1) / math.sqrt(len(x)))
    width = t_hi - t_lo
    assert lo == pytest.approx(t_lo, abs=0.1 * width) and hi == pytest.approx(t_hi, abs=0.1 * width)
    assert interval(x, np.mean, level=0.95) == (lo, hi), "a fixed random_state repeats the interval"
    narrow = interval(x, np.mean, level=0.5)
    assert lo < narrow[0] < narrow[1] < hi


def test_no_interval_without_two_distinct_runs():
    assert all(math.isnan(v) for v in interval([2.0]))
    assert all(math.isnan(v) for v in interval([2.0, 2.0, 2.0]))
    assert all(math.isnan(v) for v in interval([math.nan, 1.0]))
    assert all(math.isnan(v) for v in interval([1.0, 2.0, 3.0, math.inf]))  # a diverged run: undefined


def _records(levels):
    rows = []
    for seed, level in enumerate(levels):
        for epoch in range(2):
            for step in range(5):  # one NaN step per run and epoch; odd (negative) values stay in
                value = math.nan if step == 0 else level * (epoch + 1) * (step - 1.5)
                rows.append({"seed": seed, "epoch": epoch, "lr_over_alpha": value})
    return pd.DataFrame(rows)


def test_seed_summary_is_the_median_of_the_run_medians_counting_negative_steps():
    levels = [1.0, 2.0, 4.0, 3.0, 5.0, 0.5]
    out = seed_summary(_records(levels))
    for epoch in range(2):
        row = out[out.epoch == epoch].iloc[0]
        # each run's steps: level * (epoch + 1) * [-0.5, 0.5, 1.5, 2.5] (the NaN dropped): median level * (e+1) * 1
        run_medians = [statistics_median([lv * (epoch + 1) * k for k in (-0.5, 0.5, 1.5, 2.5)]) for lv in levels]
        assert row["median"] == pytest.approx(statistics_median(run_medians))
        assert min(run_medians) <= row["lo"] <= row["median"] <= row["hi"] <= max(run_medians)
        assert (row["runs"], row["steps"], row["undefined"]) == (6, 30, 6)
    single = seed_summary(_records([1.0]))
    assert single["runs"].eq(1).all() and single["lo"].isna().all() and single["hi"].isna().all()


def statistics_median(values):
    import statistics

    return statistics.median(values)


def _losses(n_seeds=12, effect=-0.05):
    """Losses that vary 10x across seeds while method b is consistently (1 + effect) times a, with small noise."""
    rng = np.random.default_rng(0)
    scale = np.exp(rng.normal(0.0, 1.0, n_seeds))
    b = scale * (1 + effect) * np.exp(rng.normal(0.0, 0.01, n_seeds))
    frame = pd.DataFrame({"seed": np.tile(np.arange(n_seeds), 2), "method": ["a"] * n_seeds + ["b"] * n_seeds})
    return frame.assign(loss=np.concatenate([scale, b]), problem="p"), scale, b


def test_paired_difference_is_the_mean_relative_difference_on_the_same_seeds():
    frame, a, b = _losses()
    out = paired_difference(frame, "loss", method_column="method", baseline="a", by="problem")
    row = out.iloc[0]
    assert (row["problem"], row["method"], row["pairs"]) == ("p", "b", 12)
    assert row["mean"] == pytest.approx(np.mean(b / a - 1))
    assert row["lower"] == pytest.approx(np.mean(b < a))
    assert row["lo"] < row["mean"] < row["hi"] < 0, "paired, the consistent 5% gain is resolved"
    unpaired = interval(b, np.mean)[0] - interval(a, np.mean)[1]
    assert unpaired < 0 < interval(b, np.mean)[1] - interval(a, np.mean)[0], "unpaired intervals overlap"
    absolute = paired_difference(frame, "loss", method_column="method", baseline="a", relative=False)
    assert absolute["mean"].iloc[0] == pytest.approx(np.mean(b - a))


def test_paired_difference_drops_seeds_one_method_lacks():
    frame, a, b = _losses()
    frame = frame.drop(index=[12, 13])  # method b's seeds 0 and 1
    out = paired_difference(frame, "loss", method_column="method", baseline="a")
    assert out["pairs"].iloc[0] == 10 and out["mean"].iloc[0] == pytest.approx(np.mean(b[2:] / a[2:] - 1))


def test_paired_difference_says_what_is_wrong():
    frame, _, _ = _losses()
    with pytest.raises(ValueError, match="baseline 'c' is not among"):
        paired_difference(frame, "loss", method_column="method", baseline="c")
    with pytest.raises(ValueError, match="two rows for one 'seed'"):
        paired_difference(pd.concat([frame, frame]), "loss", method_column="method", baseline="a")
