"""The recurring figures draw what the records say: every step accounted for, log axes, the lr reference."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from alphalib import plot  # noqa: E402


@pytest.fixture
def records() -> pd.DataFrame:
    flags = ["ok"] * 6 + ["negative_curvature", "ascent", "zero_step", "negative_curvature|ascent"]
    ratio = [2.0, 4.0, 8.0, 3.0, 5.0, 7.0, -1.0, -2.0, np.nan, 3.0]
    lr = 0.01
    return pd.DataFrame({
        "step": range(10), "epoch": [0] * 5 + [1] * 5, "flag": flags, "lr": lr,
        "ratio": ratio, "alpha_star": [r * lr for r in ratio], "optimizer": ["A", "B"] * 5,
    })


def test_alpha_per_step_accounts_for_every_step(records):
    ax = plot.alpha_per_step(records)
    sizes = {c.get_label().split(",")[1].split("(")[0].strip(): len(c.get_offsets()) for c in ax.collections}
    assert sizes == {"descent": 6, "negative curvature": 2, "ascent": 1}
    assert "1 of 10 steps undefined" in ax.get_title()
    (lr_line,) = [line for line in ax.lines if line.get_label() == "lr"]
    assert np.all(np.asarray(lr_line.get_ydata()) == 0.01)
    assert ax.get_yscale() == "log" and ax.get_xlabel() and ax.get_ylabel()
    # negative-curvature steps are drawn at |α*|, not dropped
    neg = [c for c in ax.collections if "negative" in c.get_label()][0]
    assert sorted(neg.get_offsets()[:, 1]) == pytest.approx([0.01, 0.03])


def test_ratio_plots_use_log_axes_with_the_optimal_line(records):
    for ax in (plot.ratio_per_epoch(records), plot.ratio_by(records, "optimizer")):
        assert ax.get_yscale() == "log"
        assert any(np.all(np.asarray(line.get_ydata()) == 1.0) for line in ax.lines)
    assert "4 of 10" in plot.ratio_per_epoch(records).get_title()


def test_alpha_vs_lr_has_the_diagonal(records):
    ax = plot.alpha_vs_lr(pd.concat([records, records.assign(lr=0.1, alpha_star=records.ratio * 0.1)]))
    (diag,) = [line for line in ax.lines if line.get_label() == "α* = lr"]
    assert np.allclose(diag.get_xdata(), diag.get_ydata())
    assert ax.get_xscale() == ax.get_yscale() == "log"


def test_save_writes_png_and_svg(tmp_path, records):
    ax = plot.alpha_per_step(records)
    path = plot.save(ax.figure, tmp_path / "sub", "fig", svg=True)
    assert path.read_bytes()[:4] == b"\x89PNG" and path.with_suffix(".svg").exists()
