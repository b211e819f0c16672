"""The shared training loop: validation metrics against a hand computation, tagged and reproducible runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import alphalib


def _classification(n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen))


def test_evaluate_matches_a_full_batch_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    data = _classification()
    metrics = alphalib.evaluate(model, F.cross_entropy, alphalib.loader(data, batch_size=16))
    model.eval()
    x, y = data.tensors
    with torch.no_grad():
        out = model(x)
    assert metrics["val_loss"] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-6)
    assert metrics["val_accuracy"] == pytest.approx((out.argmax(1) == y).double().mean().item())


def test_run_is_reproducible_and_tags_every_frame():
    kw = dict(
        optimizer="SGD",
        lr=0.1,
        optimizer_kwargs={"momentum": 0.9},
        epochs=2,
        batch_size=8,
        val_set=_classification(seed=1),
        tags={"setup": "toy"},
        progress=False,
    )
    a = alphalib.run(lambda: nn.Linear(4, 3), F.cross_entropy, _classification(), **kw)
    b = alphalib.run(lambda: nn.Linear(4, 3), F.cross_entropy, _classification(), **kw)
    assert a.records["ratio"].tolist() == b.records["ratio"].tolist()
    for frame in (a.steps, a.epochs, a.records):
        assert (frame["optimizer"] == "SGD").all() and (frame["setup"] == "toy").all() and (frame["lr0"] == 0.1).all()
    assert list(a.epochs.columns[:6]) == ["epoch", "train_loss", "seconds", "probe_seconds", "val_loss", "val_accuracy"]
    assert (a.epochs["seconds"].diff().dropna() > 0).all()  # training time so far, growing
    assert len(a.records) == len(a.steps) == 10


def test_unknown_optimizer_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown optimizer .Adamm.*prodigy"):
        alphalib.make_optimizer("Adamm", nn.Linear(2, 1).parameters(), lr=1e-3)


@pytest.mark.parametrize(
    "bad",
    [
        dict(epochs=0),
        dict(epochs=-1),
        dict(batch_size=0),
        dict(every=2.0),
        dict(full_every=0),
        dict(sharpness_every=True),
    ],
)
def test_nonpositive_counts_are_refused_before_anything_runs(bad):
    built = []
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        alphalib.run(
            lambda: built.append(1) or nn.Linear(4, 3), F.cross_entropy, _classification(), progress=False, **bad
        )
    assert not built  # refused before the model was built
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        alphalib.train(model, F.cross_entropy, opt, [_classification().tensors], epochs=0, progress=False)
    assert torch.equal(model.weight, before)


def test_run_records_the_objective_and_looks_without_changing_training():
    kw = dict(lr=0.05, epochs=3, batch_size=8, val_set=_classification(seed=1), progress=False)
    plain = alphalib.run(lambda: nn.Linear(4, 3), F.cross_entropy, _classification(), **kw)
    seen = alphalib.run(lambda: nn.Linear(4, 3), F.cross_entropy, _classification(), full_every=2, looks={1, 3}, **kw)
    assert seen.steps["loss"].tolist() == plain.steps["loss"].tolist()
    assert seen.records["ratio"].tolist() == plain.records["ratio"].tolist()
    full = seen.records.dropna(subset=["full_ratio"])
    assert full["step"].tolist() == list(range(0, 15, 2)) and full["heldout_ratio"].notna().all()
    looks = seen.profiles.groupby(["epoch", "scope"]).trust.first()
    assert sorted(looks.index) == [(1, "batch"), (1, "full data"), (3, "batch"), (3, "full data")]
    assert looks.notna().all() and (seen.profiles["optimizer"] == "Adam").all()
    assert plain.profiles is None
