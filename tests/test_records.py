"""Flags, records and the per-epoch summary, against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

import alphalib
from alphalib.records import classify, make_record


@pytest.mark.parametrize(
    ("slope", "curvature", "step_norm", "flag"),
    [
        (-1.0, 2.0, 1.0, "ok"),
        (-1.0, -2.0, 1.0, "negative_curvature"),
        (1.0, 2.0, 1.0, "ascent"),
        (1.0, -2.0, 1.0, "negative_curvature|ascent"),
        (-1.0, 0.0, 1.0, "zero_curvature"),
        (0.0, 0.0, 0.0, "zero_step"),
        (math.nan, 1.0, 1.0, "nonfinite"),
        (-1.0, math.inf, 1.0, "nonfinite"),
    ],
)
def test_classify(slope, curvature, step_norm, flag):
    assert classify(slope, curvature, step_norm=step_norm) == flag


def test_make_record_converts_the_realized_step_to_lr_units():
    lr = 0.01
    rec = make_record(
        step=3,
        epoch=1,
        loss=0.5,
        lr=lr,
        step_slope=-2e-3,
        step_curvature=4e-5,
        grad_norm=1.0,
        step_norm=0.1,
        backend="hessian",
    )
    assert rec.ratio == pytest.approx(50.0)  # -(-2e-3) / 4e-5
    assert rec.alpha_star == pytest.approx(0.5)
    assert rec.slope == pytest.approx(-0.2) and rec.curvature == pytest.approx(0.4)
    assert rec.alpha_star == pytest.approx(-rec.slope / rec.curvature)


def test_epoch_summary_counts_by_hand():
    frame = pd.DataFrame(
        {
            "epoch": [0, 0, 0, 1, 1],
            "step": [0, 1, 2, 3, 4],
            "alpha_star": [1.0, 3.0, -2.0, 5.0, 7.0],
            "ratio": [10.0, 30.0, -20.0, 50.0, 70.0],
            "loss": [1.0, 2.0, 3.0, 4.0, 6.0],
            "flag": ["ok", "ascent", "negative_curvature", "ok", "ok"],
        }
    )
    summary = alphalib.epoch_summary(frame)
    assert list(summary["steps"]) == [3, 2]
    assert list(summary["median_alpha_star"]) == [1.0, 6.0]
    assert list(summary["negative_curvature"]) == pytest.approx([1 / 3, 0.0])
    assert list(summary["ascent"]) == pytest.approx([1 / 3, 0.0])
    assert list(summary["loss"]) == [2.0, 5.0]


def test_train_records_every_step_with_its_epoch():
    torch.manual_seed(0)
    model = alphalib.SimpleNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt, every=2)
    data = alphalib.loader(alphalib.gaussian_regression(n=100), batch_size=32)  # 4 batches, the last of 4
    history = alphalib.train(model, F.mse_loss, opt, data, epochs=3, probe=probe, progress=False)
    steps, records = history.steps, history.records
    assert list(steps["epoch"]) == [0] * 4 + [1] * 4 + [2] * 4 and list(steps["step"]) == list(range(12))
    assert list(records["step"]) == list(range(0, 12, 2)) and list(records["epoch"]) == [0, 0, 1, 1, 2, 2]
    merged = records.merge(steps, on=["epoch", "step"], suffixes=("", "_train"))
    assert (merged["loss"] - merged["loss_train"]).abs().max() <= 1e-6


def test_gaussian_data_is_seeded():
    a, b = alphalib.gaussian_regression(seed=1), alphalib.gaussian_regression(seed=1)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[0], alphalib.gaussian_regression(seed=2).tensors[0])


@pytest.mark.parametrize("name", ["records.csv", "records.csv.gz"])
def test_written_records_read_back_exactly_and_the_bytes_repeat(tmp_path, name):
    model = torch.nn.Linear(3, 1).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt, tags={"problem": "toy", "seed": 3})
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    for epoch in range(3):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        probe.step((x, y), epoch=epoch)
    frame = probe.to_frame()
    alphalib.write_records(frame, tmp_path / "a" / name)
    back = alphalib.read_records(tmp_path / "a" / name)
    for column in frame:  # every float to the last bit; empty fallbacks stay empty strings
        assert (
            back[column].tolist() == frame[column].tolist() or frame[column].isna().all() and back[column].isna().all()
        )
    alphalib.write_records(frame, tmp_path / "b" / name)
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(ValueError, match="written as .csv"):
        alphalib.write_records(frame, tmp_path / "records.xlsx")


def _stream_run(tmp_path, target, fail_at_epoch=None, seen=None):
    """Train SimpleNet 3 epochs with a probe streaming to ``target``; optionally fail in the middle of an epoch."""
    data = list(alphalib.loader(alphalib.gaussian_regression(n=48, seed=0), 16))

    class Batches:
        epoch = -1

        def __iter__(self):
            self.epoch += 1
            for i, batch in enumerate(data):
                if self.epoch == fail_at_epoch and i == 1:
                    if seen is not None:  # what is on disk when the epoch under way breaks off
                        seen.append(alphalib.read_records(target))
                    raise RuntimeError("the machine went away")
                yield batch

    torch.manual_seed(0)
    model = alphalib.SimpleNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt, tags={"run": "a"})
    try:
        alphalib.train(model, F.mse_loss, opt, Batches(), epochs=3, probe=probe, progress=False, records_to=target)
    except RuntimeError:
        pass
    assert probe.listeners == []  # detached when training ends or fails
    return probe.to_frame()


@pytest.mark.parametrize("target", ["records.csv", "parts"])
def test_records_stream_to_disk_an_epoch_at_a_time(tmp_path, target):
    path = tmp_path / target
    frame = _stream_run(tmp_path, path)
    back = alphalib.read_records(path)
    pd.testing.assert_frame_equal(back, frame, check_dtype=False)  # every float exact
    if target == "parts":
        assert len(list(path.glob("part-*.parquet"))) == 3  # one per epoch


def test_a_crash_loses_at_most_the_epoch_under_way(tmp_path):
    seen = []
    frame = _stream_run(tmp_path, tmp_path / "r.csv", fail_at_epoch=2, seen=seen)
    (on_disk,) = seen
    assert sorted(on_disk.epoch.unique()) == [0, 1] and len(on_disk) == (frame.epoch < 2).sum() == 6
    pd.testing.assert_frame_equal(on_disk, frame[frame.epoch < 2], check_dtype=False)
    pd.testing.assert_frame_equal(alphalib.read_records(tmp_path / "r.csv"), frame, check_dtype=False)


def test_a_torn_last_line_is_dropped_with_a_warning_naming_file_and_line(tmp_path):
    path = tmp_path / "r.csv"
    frame = _stream_run(tmp_path, path)
    whole = path.read_bytes()
    path.write_bytes(whole[: whole.rfind(b"\n", 0, len(whole) - 1) + 40])  # the crash came 40 bytes into the last
    with pytest.warns(RuntimeWarning, match=rf"r\.csv, line {len(frame) + 1}: the last line is incomplete"):
        back = alphalib.read_records(path)
    pd.testing.assert_frame_equal(back, frame.iloc[:-1], check_dtype=False)


def test_a_damaged_line_inside_a_records_file_is_refused(tmp_path):
    path = tmp_path / "r.csv"
    _stream_run(tmp_path, path)
    lines = path.read_text().splitlines(keepends=True)
    lines[3] = lines[3][:30] + "\n"  # (a line torn by one run, then another run appended)
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=r"r\.csv, line 4: \d+ fields where the header has"):
        alphalib.read_records(path)


def test_tensorboard_scalars_are_the_records(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = alphalib.run(
        alphalib.SimpleNet,
        F.mse_loss,
        alphalib.gaussian_regression(n=48, seed=0),
        epochs=2,
        batch_size=16,
        progress=False,
        tensorboard=tmp_path / "tb",
    )
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    for name in ("alpha_star", "ratio", "curvature", "loss"):
        scalars = events.Scalars(f"alphalib/{name}")
        assert [s.step for s in scalars] == history.records.step.tolist()
        np.testing.assert_allclose([s.value for s in scalars], history.records[name], rtol=1e-6)  # stored as float32


def test_epoch_summary_by_run_counts_every_step_by_hand():
    frame = pd.DataFrame(
        {
            "seed": [0, 0, 0, 1, 1],
            "epoch": [0, 0, 0, 0, 1],
            "step": [0, 1, 2, 0, 1],
            "lr": [0.1, 0.3, 0.2, 0.1, 0.1],
            "alpha_star": [1.0, -2.0, float("nan"), 0.5, 4.0],
            "ratio": [10.0, -20.0, float("nan"), 5.0, 40.0],
            "lr_over_alpha": [0.1, -0.05, float("nan"), 0.2, 0.025],  # step 2: zero slope, lr/α* undefined
            "loss": [1.0, 2.0, 3.0, 4.0, 6.0],
            "flag": ["ok", "negative_curvature", "zero_curvature", "ok", "ok"],
        }
    )
    summary = alphalib.epoch_summary(frame, by="seed")
    assert list(summary.index) == [(0, 0), (1, 0), (1, 1)]
    assert list(summary["steps"]) == [3, 1, 1] and list(summary["undefined"]) == [1, 0, 0]
    assert list(summary["median_lr_over_alpha"]) == pytest.approx([(0.1 - 0.05) / 2, 0.2, 0.025])
    assert list(summary["alpha_le_0"]) == pytest.approx([0.5, 0.0, 0.0])  # of the steps where lr/α* is defined
    assert list(summary["median_lr"]) == pytest.approx([0.2, 0.1, 0.1])
    assert "median_step_size" not in summary


def test_key_numbers_put_a_median_of_mostly_odd_steps_beyond_any_ratio():
    frame = pd.DataFrame(
        {
            "run": ["a", "a", "a", "b", "b", "b"],
            "step": [0, 1, 2, 0, 1, 2],
            "epoch": 0,
            "loss": 1.0,
            "flag": ["ok", "negative_curvature", "negative_curvature", "ok", "ok", "ok"],
            "lr_over_alpha": [0.5, -0.1, -0.2, 0.5, 0.25, 0.2],
        }
    )
    # run a: median lr/α* = -0.1, no finite step is the minimum; run b: 1 / 0.25
    assert alphalib.key_numbers(frame, "run")["alpha_over_lr"].tolist() == [math.inf, 4.0]
