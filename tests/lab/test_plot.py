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
            "optimizer": ["A", "B"] * 5,
        }
    )


def test_alpha_per_step_accounts_for_every_step(records):
    ax = plot.alpha_per_step(records)
    sizes = {c.get_label().split("(")[0].strip(): len(c.get_offsets()) for c in ax.collections}
    assert sizes == {"α*, descent, H>0": 6, "step with negative curvature": 2, "step with ascent": 1}
    assert "1 of 10 steps undefined" in ax.get_title()
    (lr_line,) = [line for line in ax.lines if line.get_label() == "lr"]
    assert np.all(np.asarray(lr_line.get_ydata()) == 0.01)
    assert ax.get_yscale() == "log" and ax.get_xlabel() and ax.get_ylabel()
    # negative-curvature and ascent steps are ticks at the bottom (axes coordinates), not step sizes
    for kind in ("negative", "ascent"):
        (odd,) = [c for c in ax.collections if kind in c.get_label()]
        assert np.all(odd.get_offsets()[:, 1] < 0.1) and odd.get_transform() is not ax.transData
    (descent,) = [c for c in ax.collections if "descent" in c.get_label()]
    assert np.all(descent.get_offsets()[:, 1] > 0)


def test_alpha_per_step_draws_the_step_size_a_learning_rate_free_optimizer_chose(records):
    size = [0.02 * (1 + k) for k in range(10)]  # Prodigy's d * lr, say, with lr = 0.01 nominal
    ax = plot.alpha_per_step(records.assign(step_size=size, alpha_star=records.ratio * size))
    (line,) = [line for line in ax.lines if line.get_label() == "step size"]
    assert np.allclose(line.get_ydata(), size)
    assert [line.get_label() for line in plot.alpha_per_step(records.assign(step_size=0.01)).lines][-1] == "lr"


def test_ratio_bands_and_losses_draw_each_scope_and_the_references():
    summary = pd.DataFrame(
        {
            "epoch": [0, 1] * 2,
            "median": [3.0, 4.0, 30.0, 40.0],
            "lo": [2.0, 3.0, 20.0, 30.0],
            "hi": [4.0, 5.0, 40.0, 50.0],
            "scope": ["full data"] * 2 + ["batch"] * 2,
        }
    )
    ax = plot.ratio_bands(summary)
    assert ax.get_yscale() == "log" and {"full data", "batch"} <= {line.get_label() for line in ax.lines}
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
    assert list(median.get_xdata()) == [1, 2] and list(median.get_ydata()) == [4.0, 7.0]  # ok steps only
    assert "10–90%" in median.get_label() and "4 of 10 steps left out" in median.get_label()
    ((band,),) = [c.get_paths() for c in ax.collections]
    assert band.vertices[:, 1].min() == pytest.approx(2.4) and band.vertices[:, 1].max() == pytest.approx(7.0)
    assert np.all(np.asarray(_line(ax, "α* = lr").get_ydata()) == 1.0) and ax.get_yscale() == "log"
    assert "5 probed steps per epoch" in ax.get_title()
    assert not ax.patches  # no boxes


def test_ratio_by_names_each_lines_lr_and_left_out_steps(records):
    ax = plot.ratio_by(records.assign(lr0=records.optimizer.map({"A": 1e-3, "B": 3e-2})), "optimizer")
    a, b = _line(ax, "A"), _line(ax, "B")
    assert a.get_label() == "A (lr 1e-3), 2 of 5 steps left out"
    assert b.get_label() == "B (lr 3e-2), 2 of 5 steps left out"
    assert list(a.get_xdata()) == [1] and list(a.get_ydata()) == [5.0]  # epoch 1 of A has no ok step
    assert list(b.get_xdata()) == [1, 2] and list(b.get_ydata()) == [3.5, 7.0]
    assert a.get_color() != b.get_color() and len(ax.collections) == 2
    assert np.all(np.asarray(_line(ax, "α* = lr").get_ydata()) == 1.0) and ax.get_yscale() == "log"
    assert "25–75%" in ax.get_title() and "2–3 probed steps" in ax.get_title()
    # without lr0 the current lr names the line; a line that mixes learning rates gets none
    assert _line(plot.ratio_by(records, "optimizer"), "A").get_label().startswith("A (lr 1e-2), ")
    mixed = records.assign(lr=[0.1, 0.2] * 5, run="both")
    assert _line(plot.ratio_by(mixed, "run"), "both").get_label() == "both, 4 of 10 steps left out"


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
    assert x1 == y1 == pytest.approx(0.01) and x2 == y2 == pytest.approx(0.7)  # the least lr, the largest median α*
    assert ax.get_ylim()[0] <= y1 and ax.get_xlim()[1] >= x2  # the diagonal's span stays in view
    assert ax.get_xscale() == ax.get_yscale() == "log" and ax.get_ylabel() == "median α* per epoch"
    entries = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {"1", "2"} <= entries and "0" not in entries
    assert "medians of 5 probed steps" in ax.get_title() and "8 of 20 steps left out" in ax.get_title()
    last = _line(ax, "last epoch")
    assert list(last.get_xdata()) == [0.01, 0.1] and list(last.get_ydata()) == pytest.approx([0.07, 0.7])


def test_no_axis_is_labelled_in_lr_units(records):
    assert plot.alpha_per_step(records).get_ylabel() == "α*"
    assert "units" not in plot.alpha_vs_lr(records).get_ylabel()


def test_final_loss_vs_lr_takes_the_last_epoch_sorted_by_lr():
    epochs = pd.DataFrame({"epoch": [0, 1] * 2, "lr0": [0.1, 0.1, 0.01, 0.01], "train_loss": [2.0, 1.0, 3.0, 1.5]})
    ax = plot.final_loss_vs_lr(epochs)
    (line,) = ax.lines
    assert list(line.get_xdata()) == [0.01, 0.1] and list(line.get_ydata()) == [1.5, 1.0]
    assert ax.get_xscale() == "log" and ax.get_title().startswith("after epoch 2")


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
