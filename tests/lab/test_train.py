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


def test_train_loss_weighs_each_batch_by_its_size():
    """10 samples in batches of 4, 4 and 2: the epoch's train_loss is the mean over samples, not over batches."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    data = _classification(n=10)
    x, y = data.tensors
    y[8:] = model(x[8:]).argmin(1)  # the last, small batch has a loss far from the others'
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # no step: every batch's loss is that of the same model
    history = alphalib.train(model, F.cross_entropy, opt, alphalib.loader(data, 4), epochs=1, progress=False)
    with torch.no_grad():
        per_sample = F.cross_entropy(model(x), y, reduction="none")
    batch_means = [per_sample[i : i + 4].mean().item() for i in (0, 4, 8)]
    assert history.epochs["train_loss"].item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    assert history.epochs["train_loss"].item() != pytest.approx(sum(batch_means) / 3, rel=1e-3)  # the old mean
    assert history.steps["loss"].tolist() == pytest.approx(batch_means, rel=1e-6)


def test_scheduler_steps_after_every_step_and_each_step_records_its_lr():
    def warmup(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 4))

    kw = dict(lr=0.1, optimizer="SGD", epochs=2, batch_size=8, every=2, progress=False)
    history = alphalib.run(lambda: nn.Linear(4, 3), F.cross_entropy, _classification(), scheduler=warmup, **kw)
    expected = [0.1 * min(1.0, (t + 1) / 4) for t in range(10)]
    assert history.steps["lr"].tolist() == pytest.approx(expected)
    assert history.records["lr"].tolist() == pytest.approx(expected[::2])  # the probe saw the same lr
    assert history.records["ratio"].to_numpy() == pytest.approx(
        (history.records["alpha_star"] / history.records["lr"]).to_numpy()
    )
    assert (history.steps["lr0"] == 0.1).all()
    plain = alphalib.run(lambda: nn.Linear(4, 3), F.cross_entropy, _classification(), **kw)
    assert plain.steps["lr"].tolist() == [0.1] * 10


def test_after_step_sees_the_parameters_before_the_step_and_the_probes_record():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def after(step):
        for p, b in zip(model.parameters(), step.before, strict=True):  # plain SGD: theta_t+1 = theta_t - lr g
            assert torch.allclose(p.detach(), b - step.lr * p.grad)
        seen.append((step.index, step.epoch, step.record is not None, len(step.batch[1])))

    with alphalib.AlphaProbe(model, F.cross_entropy, opt, every=2) as probe:
        alphalib.train(
            model, F.cross_entropy, opt, alphalib.loader(_classification(n=20), 8), epochs=2, probe=probe,
            progress=False, after_step=after,
        )  # fmt: skip
    assert seen == [(0, 0, True, 8), (1, 0, False, 8), (2, 0, True, 4), (3, 1, False, 8), (4, 1, True, 8),
                    (5, 1, False, 4)]  # fmt: skip


def test_run_measures_blocks_and_fresh_held_out_batches_without_changing_training():
    def net():
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    kw = dict(lr=0.01, epochs=2, batch_size=8, every=2, progress=False)
    plain = alphalib.run(net, F.cross_entropy, _classification(), **kw)
    groups = {"first": ["0"], "last": ["2.weight", "2.bias"]}
    seen = alphalib.run(net, F.cross_entropy, _classification(), blocks=groups, held_out_set=_classification(seed=2),
                        tags={"setup": "toy"}, **kw)  # fmt: skip
    assert seen.steps["loss"].tolist() == plain.steps["loss"].tolist()
    assert seen.records["ratio"].tolist() == plain.records["ratio"].tolist()
    assert plain.blocks is None and plain.records["heldout_ratio"].isna().all()
    # a fresh held-out batch on every probed step (a different loss each time); no full-data scope without full_every
    assert seen.records["heldout_ratio"].notna().all() and seen.records["heldout_loss"].nunique() == len(seen.records)
    assert seen.records["full_ratio"].isna().all()
    blocks = seen.blocks
    assert blocks["step"].tolist() == [s for s in seen.records["step"] for _ in groups]
    assert blocks["group"].tolist() == list(groups) * len(seen.records)
    assert (blocks["setup"] == "toy").all() and (blocks["seed"] == 0).all()
    assert blocks["ratio"].to_numpy() == pytest.approx((blocks["alpha_star"] / blocks["lr"]).to_numpy())
    assert blocks.groupby("step").slope.sum().to_numpy() == pytest.approx(seen.records["slope"].to_numpy(), rel=1e-4)
    # one group holding every parameter: the whole step's alpha*, as the probe recorded it
    whole = alphalib.run(net, F.cross_entropy, _classification(), blocks={"all": [""]}, **kw)
    assert whole.blocks["alpha_star"].to_numpy() == pytest.approx(whole.records["alpha_star"].to_numpy(), rel=1e-4)
    # with dropout, training draws from the global RNG: the blocks and the held-out draws leave it as it was

    def dropped():
        return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 3))

    plain = alphalib.run(dropped, F.cross_entropy, _classification(), **kw)
    extra = dict(blocks={"all": [""]}, held_out_set=_classification(seed=3))
    seen = alphalib.run(dropped, F.cross_entropy, _classification(), **extra, **kw)
    assert seen.steps["loss"].tolist() == plain.steps["loss"].tolist()


def test_bad_blocks_are_refused_before_training():
    with pytest.raises(ValueError, match="group 'head' names 'head', which is neither a parameter nor a module"):
        alphalib.run(lambda: nn.Linear(4, 3), F.cross_entropy, _classification(), blocks={"head": ["head"]},
                     progress=False)  # fmt: skip
