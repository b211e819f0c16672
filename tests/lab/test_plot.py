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
    return pd.DataFrame(
        {
            "step": range(10),
            "epoch": [0] * 5 + [1] * 5,
            "flag": flags,
            "lr": lr,
            "ratio": ratio,
            "alpha_star": [r * lr for r in ratio],
            "lr_over_alpha": [1 / r for r in ratio],  # continuous through the odd steps, NaN where undefined
            "optimizer": ["A", "B"] * 5,
        }
    )


def test_alpha_per_step_accounts_for_every_step(records):
    ax = plot.alpha_per_step(records)
    (strip,) = ax.child_axes
    sizes = {c.get_label().split("(")[0].strip(): len(c.get_offsets()) for c in [*ax.collections, *strip.collections]}
    assert sizes == {"α*, descent, H>0": 6, "step with negative curvature, α* ≤ 0": 2, "step with ascent, α* ≤ 0": 1}
    assert "3 of 10 steps odd" in ax.get_title() and "1 undefined" in ax.get_title()
    (lr_line,) = [line for line in ax.lines if line.get_label() == "lr"]
    assert np.all(np.asarray(lr_line.get_ydata()) == 0.01)
    assert ax.get_yscale() == "log" and strip.get_xlabel() == "optimizer step" and ax.get_ylabel() == "α*"
    # negative-curvature and ascent steps are ticks in the strip below, not step sizes on the α* axis
    assert not [c for c in ax.collections if "ascent" in c.get_label() or "negative" in c.get_label()]
    (descent,) = [c for c in ax.collections if "descent" in c.get_label()]
    assert np.all(descent.get_offsets()[:, 1] > 0)
    # the per-epoch median counts every step: 1 / median(1/α*); epoch 2 has more odd steps than not: no finite median
    median = _line(ax, "per-epoch median")
    assert median.get_ydata()[0] == pytest.approx(1 / np.median([50, 25, 12.5, 100 / 3, 20]))
    assert np.isinf(median.get_ydata()[1])


def test_alpha_per_step_draws_the_step_size_a_learning_rate_free_optimizer_chose(records):
    size = [0.02 * (1 + k) for k in range(10)]  # Prodigy's d * lr, say, with lr = 0.01 nominal
    ax = plot.alpha_per_step(records.assign(step_size=size, alpha_star=records.ratio * size))
    (line,) = [line for line in ax.lines if line.get_label() == "step size"]
    assert np.allclose(line.get_ydata(), size)
    assert [line.get_label() for line in plot.alpha_per_step(records.assign(step_size=0.01)).lines][-1] == "lr"


def test_ratio_bands_and_losses_draw_each_scope_and_the_references():
    summary = pd.DataFrame(  # of lr / alpha*: the lines are the reciprocals
        {
            "epoch": [0, 1] * 2,
            "runs": 5,
            "median": [0.25, 0.5, 0.025, 0.05],
            "lo": [0.2, 0.4, 0.02, 0.04],
            "hi": [0.5, 1.0, 0.05, 0.1],
            "scope": ["full data"] * 2 + ["batch"] * 2,
        }
    )
    ax = plot.ratio_bands(summary)
    assert ax.get_yscale() == "log"
    full, batch = _line(ax, "full data (over 5 seeds)"), _line(ax, "batch (over 5 seeds)")
    assert list(full.get_ydata()) == [4.0, 2.0] and list(batch.get_ydata()) == [40.0, 20.0]
    ((band,), _) = [c.get_paths() for c in ax.collections]
    assert band.vertices[:, 1].min() == pytest.approx(1.0) and band.vertices[:, 1].max() == pytest.approx(5.0)
    assert len(ax.collections) == 2 and any(np.all(np.asarray(line.get_ydata()) == 1.0) for line in ax.lines)
    epochs = pd.DataFrame({"epoch": [0, 1, 0, 1], "train_loss": [1.0, 0.9, 1.1, 0.8], "val_loss": [1.0, 1.1, 1.2, 1.3]})
    ax = plot.losses_per_epoch(epochs, baseline=1.05)
    labels = {line.get_label() for line in ax.lines}
    assert {"training loss", "held-out loss"} <= labels and any("Var y" in label for label in labels)
    (train,) = [line for line in ax.lines if line.get_label() == "training loss"]
    assert list(train.get_ydata()) == pytest.approx([1.05, 0.85])  # medians over runs


def _line(ax, start):
    (line,) = [line for line in ax.lines if line.get_label().startswith(start)]
    return line


def test_ratio_per_epoch_draws_the_median_and_its_band_from_epoch_1(records):
    ax = plot.ratio_per_epoch(records)
    median = _line(ax, "median")
    # every step counts: epoch 1's lr/α* are 1/2, 1/4, 1/8, 1/3, 1/5 (median 1/4); epoch 2's median is negative
    assert list(median.get_xdata()) == [1, 2] and list(median.get_ydata()) == [4.0, np.inf]
    assert "10–90%" in median.get_label() and "2 of 10 steps with α* ≤ 0, counted; 1 undefined" in median.get_label()
    ((band,),) = [c.get_paths() for c in ax.collections]
    lo = 1 / np.quantile([1 / 2, 1 / 4, 1 / 8, 1 / 3, 1 / 5], 0.9)
    assert band.vertices[:, 1].min() == pytest.approx(lo) and band.vertices[:, 1].max() > 1e20  # off the top
    assert ax.get_ylim()[1] < 100, "the view keeps to the finite values"
    assert np.all(np.asarray(_line(ax, "α* = lr").get_ydata()) == 1.0) and ax.get_yscale() == "log"
    assert "5 probed steps per epoch" in ax.get_title()
    assert not ax.patches  # no boxes


def test_ratio_by_names_each_lines_lr_and_odd_steps(records):
    ax = plot.ratio_by(records.assign(lr0=records.optimizer.map({"A": 1e-3, "B": 3e-2})), "optimizer")
    a, b = _line(ax, "A"), _line(ax, "B")
    assert a.get_label() == "A (lr 1e-3), 1 of 5 steps with α* ≤ 0, counted; 1 undefined"
    assert b.get_label() == "B (lr 3e-2), 1 of 5 steps with α* ≤ 0, counted"
    assert list(a.get_ydata()) == [5.0, np.inf]  # epoch 2 of A: one step with α* < 0, one undefined
    assert list(b.get_xdata()) == [1, 2] and list(b.get_ydata()) == pytest.approx([1 / np.median([1 / 4, 1 / 3]), 7.0])
    assert a.get_color() != b.get_color() and len(ax.collections) == 2
    assert np.all(np.asarray(_line(ax, "α* = lr").get_ydata()) == 1.0) and ax.get_yscale() == "log"
    assert "25–75%" in ax.get_title() and "2–3 probed steps" in ax.get_title()
    # without lr0 the current lr names the line; a line that mixes learning rates gets none
    assert _line(plot.ratio_by(records, "optimizer"), "A").get_label().startswith("A (lr 1e-2), ")
    mixed = records.assign(lr=[0.1, 0.2] * 5, run="both")
    label = _line(plot.ratio_by(mixed, "run"), "both").get_label()
    assert label == "both, 2 of 10 steps with α* ≤ 0, counted; 1 undefined"


def test_odd_share_counts_each_group_and_names_its_lr(records):
    ax = plot.odd_share(records.assign(lr0=records.optimizer.map({"A": 1e-3, "B": 3e-2})), "optimizer")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["A\nlr 1e-3\n5 steps", "B\nlr 3e-2\n5 steps"]
    kinds = [t.get_text() for t in ax.get_legend().get_texts()]
    heights = {kind: [bar.get_height() for bar in bars] for kind, bars in zip(kinds, ax.containers, strict=True)}
    assert heights == {"negative curvature": [0.2, 0.2], "ascent (dᵀg > 0)": [0.0, 0.4]}


def test_alpha_vs_lr_has_the_diagonal_epochs_from_1_and_counts(records):
    ax = plot.alpha_vs_lr(pd.concat([records, records.assign(lr=0.1, alpha_star=records.ratio * 0.1)]))
    diag = _line(ax, "α* = lr")
    (x1, y1), (x2, y2) = diag.get_xy1(), diag.get_xy2()
    assert x1 == y1 == pytest.approx(0.01) and x2 == y2 == pytest.approx(0.4)  # the least lr, the largest median α*
    assert ax.get_ylim()[0] <= y1 and ax.get_xlim()[1] >= x2  # the diagonal's span stays in view
    assert ax.get_xscale() == ax.get_yscale() == "log" and ax.get_ylabel() == "median α* per epoch"
    entries = {t.get_text() for t in ax.get_legend().get_texts()}
    assert "1" in entries and not {"0", "2"} & entries  # epoch 2: more odd steps than not, no finite median
    assert "medians of 5 probed steps" in ax.get_title() and "4 of 20 steps with α* ≤ 0" in ax.get_title()
    last = _line(ax, "last epoch")
    assert list(last.get_xdata()) == [0.01, 0.1] and list(last.get_ydata()) == pytest.approx([0.04, 0.4])


def test_no_axis_is_labelled_in_lr_units(records):
    assert plot.alpha_per_step(records).get_ylabel() == "α*"
    assert "units" not in plot.alpha_vs_lr(records).get_ylabel()


def test_final_loss_vs_lr_takes_the_last_epoch_sorted_by_lr():
    epochs = pd.DataFrame({"epoch": [0, 1] * 2, "lr0": [0.1, 0.1, 0.01, 0.01], "train_loss": [2.0, 1.0, 3.0, 1.5]})
    ax = plot.final_loss_vs_lr(epochs)
    (line,) = ax.lines
    assert list(line.get_xdata()) == [0.01, 0.1] and list(line.get_ydata()) == [1.5, 1.0]
    assert ax.get_xscale() == "log" and ax.get_title().startswith("after epoch 2")
    two = pd.concat([epochs, epochs.assign(train_loss=epochs.train_loss * 3)])  # a second run per lr
    ax = plot.final_loss_vs_lr(two)
    assert list(ax.lines[0].get_ydata()) == [3.0, 2.0] and len(ax.collections[0].get_offsets()) == 4  # medians


def test_save_writes_png_and_svg(tmp_path, records):
    ax = plot.alpha_per_step(records)
    assert plot.save(ax.figure, tmp_path / "sub", "fig", svg=True) is None  # nothing for a notebook cell to show
    path = tmp_path / "sub" / "fig.png"
    assert path.read_bytes()[:4] == b"\x89PNG" and path.with_suffix(".svg").exists()


def test_plain_log_labels_log_axes_with_plain_numbers():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.subplots()
    ax.plot([1, 2], [1e-3, 10])
    ax.set_yscale("log")
    plot.plain_log(ax)
    fig.canvas.draw()
    labels = {t.get_text() for t in ax.get_yticklabels() if t.get_text()}
    assert {"0.001", "0.01", "0.1", "1", "10"} <= labels and not any("10^" in x or "$" in x for x in labels)
    assert ax.xaxis.get_major_formatter().__class__.__name__ != "_Plain"  # linear axes are left alone
