"""The live view and the explorer: they draw what the records say, stay silent headless and never touch training."""

from __future__ import annotations

import itertools
import statistics

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

import alphalib
from alphalib import live, plot
from alphalib.lab.live import LiveView


def _train(epochs: int = 3, listener=None, seed: int = 0):
    """Train a tiny regression net for ``epochs`` epochs of 4 batches; return the probe and the final weights."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt)
    if listener is not None:
        probe.listeners.append(listener)
    x, y = torch.randn(4, 8, 3, dtype=torch.float64), torch.randn(4, 8, 1, dtype=torch.float64)
    for epoch in range(epochs):
        for xb, yb in zip(x, y, strict=True):
            opt.zero_grad()
            F.mse_loss(model(xb), yb).backward()
            probe.step((xb, yb), epoch=epoch)
    return probe, torch.cat([p.detach().flatten() for p in model.parameters()])


# ---- when to show --------------------------------------------------------------------------------------------


class ZMQInteractiveShell:  # the class name is what frontend() looks at
    def __init__(self, **user_ns):
        self.user_ns = user_ns


@pytest.mark.parametrize(
    ("shell", "env", "shown"),
    [
        (None, {}, False),  # a plain script
        (ZMQInteractiveShell(), {}, False),  # papermill, nbval: a kernel without a server
        (ZMQInteractiveShell(), {"JPY_SESSION_NAME": "/nb/00_explore.ipynb"}, True),  # JupyterLab, Notebook
        (ZMQInteractiveShell(__vsc_ipynb_file__="/nb/x.ipynb"), {}, True),  # VS Code
        (type("TerminalInteractiveShell", (), {"user_ns": {}})(), {"JPY_SESSION_NAME": "x"}, False),  # terminal
    ],
)
def test_frontend_is_seen_only_where_a_notebook_shows_output(monkeypatch, shell, env, shown):
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(live, "_shell", lambda: shell)
    assert live.frontend() is shown


def test_this_test_run_is_headless():
    assert not live.frontend()


# ---- headless: nothing attached, training unchanged --------------------------------------------------------------


def test_watch_headless_attaches_nothing_and_training_is_unchanged():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt)
    with live.watch(probe) as watching:
        assert watching.view is None and probe.listeners == []
    _, plain = _train()
    seen = []
    probe2, watched = _train(listener=seen.append)
    assert torch.equal(plain, watched) and len(seen) == len(probe2.records) == 12


def test_train_live_headless_is_the_same_run_and_needs_a_probe():
    data = alphalib.gaussian_regression(n=64, seed=0)
    a = alphalib.run(alphalib.SimpleNet, F.mse_loss, data, epochs=2, progress=False)
    b = alphalib.run(alphalib.SimpleNet, F.mse_loss, data, epochs=2, progress=False, live=True)
    pd.testing.assert_frame_equal(a.records, b.records)
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="pass a probe"):
        alphalib.train(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.1), [], epochs=1, live=True)


def test_a_listener_that_raises_is_dropped_with_a_warning_and_training_goes_on():
    _, plain = _train()

    def broken(rec):
        raise RuntimeError("boom")

    with pytest.warns(RuntimeWarning, match="boom"):
        probe, weights = _train(listener=broken)
    assert torch.equal(plain, weights) and probe.listeners == [] and len(probe.records) == 12


# ---- the live figure draws what the records say ----------------------------------------------------------------


def test_live_view_draws_the_records():
    view = LiveView(show=False, budget=0.5)
    probe, _ = _train(listener=view.update)
    view.close()
    recs = probe.records
    alpha, ratio, loss = view.figure.axes
    assert view.png.startswith(b"\x89PNG") and view.draws >= 1

    # α* per step: the descent steps with H > 0 as dots at (step, α*), the lr as a line, log axis
    (strip,) = alpha.child_axes  # the odd steps' strip below, which carries the step axis
    assert alpha.get_yscale() == "log" and alpha.get_ylabel() == "α*" and strip.get_xlabel() == "optimizer step"
    ok = [(r.step, r.alpha_star) for r in recs if r.flag == "ok"]
    dots = np.concatenate([c.get_offsets() for c in alpha.collections if len(c.get_offsets()) == len(ok)])
    np.testing.assert_allclose(dots, np.array(ok, dtype=float))
    lr_line = next(line for line in alpha.lines if line.get_label() == "lr")
    np.testing.assert_array_equal(lr_line.get_ydata(), [r.lr for r in recs])

    # α*/lr per epoch: the median of each epoch's steps (every step: 1 / median lr/α*), at epoch + 1
    assert ratio.get_yscale() == "log" and ratio.get_ylabel() == "α* / lr" and ratio.get_xlabel() == "epoch"
    medians = [1 / statistics.median(r.lr_over_alpha for r in recs if r.epoch == e) for e in range(3)]
    median_line = next(line for line in ratio.lines if line.get_label().startswith("median"))
    np.testing.assert_allclose(median_line.get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(median_line.get_ydata(), medians)

    # the loss: every step's mini-batch loss at θ_t
    per_step = next(line for line in loss.lines if line.get_label() == "mini-batch loss")
    np.testing.assert_array_equal(per_step.get_ydata(), [r.loss for r in recs])


def _generous(**kwargs) -> LiveView:
    """A view whose clock ticks a second per reading, with a budget that then never holds a drawing back."""
    view = LiveView(show=False, budget=0.999, **kwargs)
    view._clock = itertools.count().__next__
    return view


def test_live_view_draws_at_each_new_epoch_or_every_k_records():
    by_epoch = _generous()
    _train(epochs=3, listener=by_epoch.update)
    assert by_epoch.draws == 2  # when epochs 2 and 3 begin
    by_epoch.close()
    assert by_epoch.draws == 3  # and the rest at the end
    by_epoch.close()
    assert by_epoch.draws == 3  # nothing new: nothing drawn
    every5 = _generous(every=5)
    _train(epochs=3, listener=every5.update)
    assert every5.draws == 2  # 12 records


def test_live_view_keeps_drawing_within_its_budget(monkeypatch):
    """With drawings of 0.5 s and 10 ms of training per record, drawing never takes more than 5% of the time so far."""
    now = [0.0]
    real = plot.alpha_per_step

    def slow_draw(*args, **kwargs):
        now[0] += 0.5
        return real(*args, **kwargs)

    monkeypatch.setattr(plot, "alpha_per_step", slow_draw)
    view = LiveView(show=False, budget=0.05)
    view._clock = lambda: now[0]
    probe, _ = _train(epochs=1)
    rec, shares = probe.records[0], []
    for epoch in range(6000):  # one record per epoch, so every record is due: 60 s of training
        now[0] += 0.01
        drawn = view.draws
        view.update(type(rec)(**{**rec.__dict__, "step": epoch, "epoch": epoch}))
        if view.draws > drawn:
            shares.append(view.seconds / now[0])
    assert view.draws == 6 and view.times == pytest.approx([0.5] * 6)  # k-th once 0.5 k s ≤ 5% of the time: 10k s
    assert max(shares) <= 0.05


def test_live_view_without_epochs_and_bad_arguments():
    view = _generous()
    probe, _ = _train(epochs=1)
    for i in range(30):
        view.update(type(probe.records[0])(**{**probe.records[0].__dict__, "step": i, "epoch": None}))
    assert view.draws == 1  # every 25 records without epochs
    view.close()
    assert "pass epoch=" in view.figure.axes[1].texts[0].get_text()
    with pytest.raises(ValueError, match="every must be"):
        LiveView(show=False, every=0)
    with pytest.raises(ValueError, match="budget"):
        LiveView(show=False, budget=1.5)


def test_watch_shown_displays_and_updates_one_output(monkeypatch):
    """Where a frontend is seen, the view displays once and then updates that same display."""
    shown = []

    class Handle:
        def update(self, obj):
            shown.append(obj)

    import IPython.display

    monkeypatch.setattr(IPython.display, "display", lambda obj, display_id=False: shown.append(obj) or Handle())
    monkeypatch.setattr(live, "frontend", lambda: True)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt)
    with live.watch(probe, budget=0.999) as watching:
        assert probe.listeners == [watching.view.update]
        watching.view._clock = itertools.count().__next__
        for epoch in range(3):
            opt.zero_grad()
            F.mse_loss(model(torch.ones(4, 3, dtype=torch.float64)), torch.zeros(4, 1, dtype=torch.float64)).backward()
            probe.step((torch.ones(4, 3, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64)), epoch=epoch)
    assert probe.listeners == []
    assert "first drawing comes after" in shown[0].data and all(isinstance(s, IPython.display.Image) for s in shown[1:])
    assert len(shown) == 1 + watching.view.draws == 3  # the placeholder, then as epochs 2 and 3 begin (one step each)


# ---- the explorer -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep():
    """Records of a small sweep: two optimizers at their own learning rates, two seeds, 3 epochs of 6 steps."""
    frames = []
    for optimizer, lrs in (("Adam", (1e-3, 1e-2)), ("SGD", (1e-1,))):
        for lr in lrs:
            for seed in (0, 1):
                torch.manual_seed(seed)
                model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
                opt = getattr(torch.optim, optimizer)(model.parameters(), lr=lr)
                probe = alphalib.AlphaProbe(
                    model, F.mse_loss, opt, tags={"optimizer": optimizer, "lr0": lr, "seed": seed, "problem": "toy"}
                )
                x, y = torch.randn(6, 8, 3, dtype=torch.float64), torch.randn(6, 8, 1, dtype=torch.float64)
                for epoch in range(3):
                    for xb, yb in zip(x, y, strict=True):
                        opt.zero_grad()
                        F.mse_loss(model(xb), yb).backward()
                        probe.step((xb, yb), epoch=epoch)
                frames.append(probe.to_frame())
    return pd.concat(frames, ignore_index=True)


def test_explorer_offers_what_the_records_hold_and_cascades(sweep):
    ex = live.explore(sweep)
    assert ex.dimensions == ["problem", "optimizer", "lr0", "seed", "backend"]
    assert ex.selection == {"problem": "toy", "optimizer": "Adam", "lr0": 1e-3, "seed": 0, "backend": "hessian"}
    assert [v for _, v in ex.controls["lr0"].options] == [1e-3, 1e-2]
    assert ex.controls["problem"].disabled and not ex.controls["optimizer"].disabled
    ex.controls["optimizer"].value = "SGD"  # SGD ran at one lr only: the lr control follows
    assert [v for _, v in ex.controls["lr0"].options] == [0.1] and ex.selection["lr0"] == 0.1
    assert ex.controls["lr0"].disabled and ex.draws == 2


def test_explorer_draws_the_chosen_run_and_its_sweep(sweep):
    ex = live.explore(sweep)
    ex.controls["lr0"].value = 1e-2
    ex.controls["seed"].value = 1
    run = sweep[(sweep.optimizer == "Adam") & (sweep.lr0 == 1e-2) & (sweep.seed == 1)]
    every_lr = sweep[(sweep.optimizer == "Adam") & (sweep.seed == 1)]
    left, right = ex.figure.axes[:2]

    # left: one dot per (lr, epoch) at the median α* of its steps (every step: lr / median lr/α*), log-log axes
    assert (left.get_xscale(), left.get_yscale()) == ("log", "log") and left.get_xlabel() == "learning rate"
    expected = sorted((lr, lr / float(np.median(g.lr_over_alpha))) for (lr, _), g in every_lr.groupby(["lr", "epoch"]))
    dots = sorted(map(tuple, left.collections[0].get_offsets()))
    np.testing.assert_allclose(dots, expected)
    chosen = left.collections[-1].get_offsets()[0]  # the ring: the chosen run's last epoch
    last = run[run.epoch == 2]
    np.testing.assert_allclose(chosen, [1e-2, 1e-2 / np.median(last.lr_over_alpha)])

    # right: the chosen run's per-epoch median α*/lr
    medians = [1 / np.median(run.lr_over_alpha[run.epoch == e]) for e in range(3)]
    np.testing.assert_allclose(right.lines[0].get_ydata(), medians)
    assert "optimizer Adam, lr 0.01, seed 1" in ex.figure.get_suptitle()

    # the table: one row per epoch (from 1) with the same medians over every step, the odd steps, as HTML
    assert ex.summary.index.tolist() == [1, 2, 3]
    np.testing.assert_allclose(ex.summary["median α*/lr"], medians)
    np.testing.assert_allclose(ex.summary["α* ≤ 0"], [(run.lr_over_alpha[run.epoch == e] <= 0).sum() for e in range(3)])
    np.testing.assert_allclose(
        ex.summary["H<0 share"], [run.flag[run.epoch == e].str.contains("negative").mean() for e in range(3)]
    )
    np.testing.assert_allclose(ex.summary["mean loss"], [run.loss[run.epoch == e].mean() for e in range(3)])
    assert "median α*/lr" in ex.table.value and bytes(ex.image.value).startswith(b"\x89PNG")


def test_explorer_and_live_view_are_readable_at_100_percent_zoom(sweep, tmp_path):
    """At JupyterLab's 100% zoom one pixel of the PNG is one pixel of the screen: every text of both figures is at
    least 12 px high, and each figure fits an output area 1000 px wide without being scaled down."""
    from matplotlib.text import Text

    view = LiveView(show=False, budget=0.5)
    _train(listener=view.update)
    view.close()
    ex = live.explore(sweep)
    for fig in (view.figure, ex.figure):
        width, _ = fig.get_size_inches() * fig.dpi
        assert width <= 1000
        fig.savefig(tmp_path / "drawn.png")  # lays out the ticks
        texts = [t for t in fig.findobj(Text) if t.get_text() and t.get_visible()]
        smallest = min(texts, key=Text.get_fontsize)
        assert smallest.get_fontsize() * fig.dpi / 72 >= 12, f"{smallest.get_text()!r} is too small"
    assert "font-size: 14px" in ex.table.value and "overflow-y:scroll" in ex.table.value


def test_explorer_table_counts_odd_steps_in_the_medians():
    """Steps with H < 0 along d have a negative α*: the table's medians, like the figure's, count them (through
    lr/α*, continuous across them), as steps beyond any positive α*."""
    rows = [
        dict(step=s, epoch=0, lr=1e-3, alpha_star=a, ratio=a / 1e-3, flag=f, loss=1.0, optimizer="Adam")
        for s, (a, f) in enumerate(
            [(-0.5, "negative_curvature"), (-0.4, "negative_curvature"), (0.02, "ok"), (0.04, "ok"), (0.03, "ok")]
        )
    ]
    ex = live.explore(pd.DataFrame(rows))
    row = ex.summary.loc[1]
    # 1/α*: -2, -2.5, 50, 25, 33.3: the median is 25, so the median α* is 0.04 (0.03 with the odd steps dropped)
    assert (row["steps"], row["α* ≤ 0"], row["H<0 share"]) == (5, 2, 0.4)
    assert row["median α*"] == pytest.approx(0.04) and row["median α*/lr"] == pytest.approx(40.0)


def test_explorer_reads_a_folder_of_records_files(sweep, tmp_path):
    alphalib.write_records(sweep[sweep.optimizer == "Adam"], tmp_path / "adam.csv.gz")
    alphalib.write_records(sweep[sweep.optimizer == "SGD"], tmp_path / "more" / "sgd.csv")
    (tmp_path / "notes.txt").write_text("not records")
    alphalib.write_records(pd.DataFrame({"epoch": [0], "val_loss": [1.0]}), tmp_path / "per_epoch.csv.gz")  # 09, 10
    ex = live.explore(tmp_path)
    assert [v for _, v in ex.controls["sweep"].options] == ["adam", "more/sgd"]
    ex.controls["sweep"].value = "more/sgd"
    assert ex.selection["optimizer"] == "SGD" and len(ex.rows()) == len(
        sweep[(sweep.optimizer == "SGD") & (sweep.seed == 0)]
    )


def test_explorer_says_what_is_wrong(tmp_path, sweep):
    with pytest.raises(FileNotFoundError, match="no records at"):
        live.explore(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="holds no records file"):
        live.explore(tmp_path)
    with pytest.raises(ValueError, match=r"lack the columns \['alpha_star'"):
        live.explore(sweep.drop(columns=["alpha_star"]))
    with pytest.raises(ValueError, match="no records"):
        live.explore(sweep.iloc[:0])


def test_explorer_and_live_view_leave_no_pyplot_figure(sweep):
    """Neither leaves a pyplot figure behind, which the inline backend would show a second time."""
    import matplotlib.pyplot as plt

    plt.close("all")
    view = LiveView(show=False)
    _train(epochs=2, listener=view.update)
    view.close()
    live.explore(sweep)
    assert view.draws and plt.get_fignums() == []


def test_explorer_starts_where_asked_and_says_what_it_cannot_show(sweep):
    ex = live.explore(sweep, optimizer="SGD")
    assert ex.selection["optimizer"] == "SGD" and ex.selection["lr0"] == 0.1 and ex.draws == 1
    ex = live.explore(sweep, lr0=1e-2, seed=1)
    assert (ex.selection["lr0"], ex.selection["seed"]) == (1e-2, 1)
    with pytest.raises(ValueError, match=r"optimizer 'Lion' is not among these records' \['Adam', 'SGD'\]"):
        live.explore(sweep, optimizer="Lion")
    with pytest.raises(ValueError, match=r"cannot choose \['sweep'\]"):
        live.explore(sweep, sweep="03_lr_sweep")


@pytest.mark.parametrize("server", [False, True], ids=["papermill", "kernel-of-a-jupyter-server"])
def test_in_a_real_kernel_the_view_is_silent_headless_and_shown_under_a_server(tmp_path, monkeypatch, server):
    """Papermill's kernel gets no figure; a kernel started as a Jupyter server starts it (``JPY_SESSION_NAME`` set)
    shows one, updated in place to the final drawing."""
    nbformat = pytest.importorskip("nbformat")
    papermill = pytest.importorskip("papermill")
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    if server:
        monkeypatch.setenv("JPY_SESSION_NAME", str(tmp_path / "live.ipynb"))
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import torch, alphalib\n"
            "h = alphalib.run(alphalib.SimpleNet, torch.nn.MSELoss(), alphalib.gaussian_regression(n=64), epochs=3,\n"
            "                 live=True, progress=False)\n"
            "print(alphalib.live.frontend(), len(h.records))"
        )
    ]
    nbformat.write(nb, tmp_path / "live.ipynb")
    papermill.execute_notebook(
        tmp_path / "live.ipynb", tmp_path / "out.ipynb", kernel_name="python3", progress_bar=False, cwd=tmp_path
    )
    outputs = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[0].outputs
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    shown = [o for o in outputs if o.output_type == "display_data"]
    assert printed.strip() == f"{server} 6"
    if server:
        assert len(shown) == 1 and "image/png" in shown[0].data  # the placeholder, replaced by the final drawing
    else:
        assert shown == []
