"""AlphaScaled against closed forms: exact line search on a quadratic, dense float64 Hessians elsewhere."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import alphalib
from alphalib.scaled import AlphaScaled

DT = torch.float64


class Theta(nn.Module):
    """A bare parameter vector: ``model(x)`` is θ, so a loss_fn of the output is a function of θ."""

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x):
        return self.theta


def _quadratic(n: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=DT)
    a = m @ m.T + 0.5 * torch.eye(n, dtype=DT)
    b = torch.randn(n, generator=gen, dtype=DT)
    return a, b, (lambda out, y: 0.5 * out @ a @ out - b @ out), torch.randn(n, generator=gen, dtype=DT)


BATCH = (torch.zeros(1, dtype=DT), torch.zeros(1, dtype=DT))


def _step(opt: AlphaScaled, model: nn.Module, loss_fn, batch=BATCH):
    opt.zero_grad()
    loss_fn(model(batch[0]), batch[1]).backward()
    return opt.step(batch)


def test_sgd_scaled_by_the_batch_alpha_is_steepest_descent_with_exact_line_search():
    a, b, loss_fn, theta0 = _quadratic()
    model = Theta(theta0)
    opt = AlphaScaled(torch.optim.SGD(model.parameters(), lr=0.1), model, loss_fn)
    theta = theta0.clone()
    for _ in range(8):
        g = a @ theta - b
        step = (g @ g) / (g @ a @ g)  # the exact minimiser along -g
        theta = theta - step * g
        rec = _step(opt, model, loss_fn)
        assert rec.lr == pytest.approx(float(step), rel=1e-12)
        assert rec.ratio == pytest.approx(1.0, rel=1e-12) and rec.flag == "ok" and rec.fallback == ""
        torch.testing.assert_close(model.theta.detach(), theta, rtol=1e-12, atol=1e-14)
    assert opt.optimizer.param_groups[0]["lr"] == 0.1  # the nominal lr is restored after every step


def test_kappa_scales_the_step_and_bounds_clip_it():
    a, b, loss_fn, theta0 = _quadratic()
    g = a @ theta0 - b
    exact = float((g @ g) / (g @ a @ g))
    for kappa, bounds, expected in (
        (0.25, (0.0, math.inf), 0.25 * exact),
        (1.0, (0.0, exact / 3), exact / 3),
        (1.0, (2 * exact, math.inf), 2 * exact),
    ):
        model = Theta(theta0)
        opt = AlphaScaled(torch.optim.SGD(model.parameters(), lr=0.1), model, loss_fn, kappa=kappa, bounds=bounds)
        rec = _step(opt, model, loss_fn)
        assert rec.lr == pytest.approx(expected, rel=1e-12)
        torch.testing.assert_close(model.theta.detach(), theta0 - expected * g, rtol=1e-12, atol=1e-14)
        assert rec.ratio == pytest.approx(exact / expected, rel=1e-12)


def _least_squares(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 2).double()
    batches = [(torch.randn(16, 4, dtype=DT), torch.randn(16, 2, dtype=DT)) for _ in range(4)]
    return model, batches


def test_ggn_and_hessian_coincide_on_linear_least_squares():
    model, batches = _least_squares()
    runs = []
    for curvature in ("hessian", "ggn"):
        net = copy.deepcopy(model)
        opt = AlphaScaled(torch.optim.Adam(net.parameters(), lr=1e-2), net, F.mse_loss, curvature=curvature)
        lrs = [_step(opt, net, F.mse_loss, batch).lr for batch in batches * 2]
        runs.append((lrs, torch.cat([p.detach().flatten() for p in net.parameters()])))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-12)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-12, atol=1e-14)


def _dense_alpha(model: nn.Module, batches, d) -> float:
    """α* along ``d`` of the mean loss over ``batches``, from a dense float64 Hessian of the flattened parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    v = torch.cat([di.flatten() for di in d])

    def loss(theta):
        chunks = torch.split(theta, [math.prod(s) for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return sum(F.mse_loss(functional_call(model, params, (x,)), y) for x, y in batches) / len(batches)

    g = torch.autograd.functional.jacobian(loss, flat)
    h = torch.autograd.functional.hessian(loss, flat)
    return float(-(v @ g) / (v @ h @ v))


def test_the_optimizer_state_advances_as_it_would_and_the_step_is_lr_times_d():
    model, batches = _least_squares()
    twin = copy.deepcopy(model)
    plain = torch.optim.Adam(twin.parameters(), lr=1e-2)
    opt = AlphaScaled(torch.optim.Adam(model.parameters(), lr=1e-2), model, F.mse_loss)
    for batch in batches:
        for net, o in ((model, opt.optimizer), (twin, plain)):
            o.zero_grad()
            F.mse_loss(net(batch[0]), batch[1]).backward()
        d = alphalib.direction(opt.optimizer)
        expected = _dense_alpha(model, [batch], d)
        before = [p.detach().clone() for p in model.parameters()]
        rec = opt.step(batch)
        plain.step()
        assert rec.lr == pytest.approx(expected, rel=1e-10)
        for p, p0, di in zip(model.parameters(), before, d, strict=True):
            torch.testing.assert_close(p.detach() - p0, rec.lr * di, rtol=1e-10, atol=1e-15)
        for p, q in zip(
            model.parameters(), twin.parameters(), strict=True
        ):  # Adam's moments and step count, bit for bit
            s, t = opt.optimizer.state[p], plain.state[q]
            assert torch.equal(s["exp_avg"], t["exp_avg"]) and torch.equal(s["exp_avg_sq"], t["exp_avg_sq"])
            assert float(s["step"]) == float(t["step"])
        twin.load_state_dict(model.state_dict())  # the same θ for the next gradients


def test_no_step_size_falls_back_to_the_last_lr_and_says_why():
    a, b, loss_fn, theta0 = _quadratic()
    model = Theta(theta0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = AlphaScaled(sgd, model, loss_fn)
    first = _step(opt, model, loss_fn)  # a usable step: exact line search
    sgd.param_groups[0]["maximize"] = True  # now d = +g goes uphill
    theta, g = model.theta.detach().clone(), a @ model.theta.detach() - b
    rec = _step(opt, model, loss_fn)
    assert rec.lr == first.lr and "uphill" in rec.fallback and rec.flag == "ascent"
    torch.testing.assert_close(model.theta.detach(), theta + first.lr * g, rtol=1e-12, atol=1e-14)

    concave = Theta(theta0)  # L = -½|θ|² + bᵀθ: curvature < 0 along any d; before any usable step, the own lr
    neg = AlphaScaled(torch.optim.SGD(concave.parameters(), lr=0.1), concave, lambda out, y: -0.5 * out @ out + b @ out)
    rec = _step(neg, concave, lambda out, y: -0.5 * out @ out + b @ out)
    assert rec.lr == 0.1 and "curvature" in rec.fallback and rec.flag == "negative_curvature"


def test_smoothed_source_is_a_forgetting_geometric_mean_of_the_batch_alphas():
    model, batches = _least_squares()
    opt = AlphaScaled(
        torch.optim.Adam(model.parameters(), lr=1e-2), model, F.mse_loss, source="smoothed", smoothing=0.8, kappa=0.5
    )
    recs = [_step(opt, model, F.mse_loss, batch) for batch in batches * 2]
    logs = []
    for rec in recs:
        if rec.flag == "ok":  # the batch's own α*, recorded beside the step; odd steps leave the mean as it was
            logs.append(math.log(rec.alpha_star))
        weights = [(1 - 0.8) * 0.8 ** (len(logs) - 1 - i) for i in range(len(logs))]
        mean = sum(w * x for w, x in zip(weights, logs, strict=True)) / (1 - 0.8 ** len(logs))
        assert rec.lr == pytest.approx(0.5 * math.exp(mean), rel=1e-12)
    assert recs[0].lr == pytest.approx(0.5 * recs[0].alpha_star, rel=1e-12)
    assert 0 < len(logs) < len(recs)  # both kinds of step were met


def test_heldout_and_full_sources_measure_along_the_same_direction():
    model, batches = _least_squares()
    held = [(torch.randn(8, 4, dtype=DT), torch.randn(8, 2, dtype=DT))]
    opt = AlphaScaled(torch.optim.Adam(model.parameters(), lr=1e-2), model, F.mse_loss, source="heldout", held_out=held)
    for batch in batches:
        opt.zero_grad()
        F.mse_loss(model(batch[0]), batch[1]).backward()
        expected = _dense_alpha(model, held, alphalib.direction(opt.optimizer))
        assert opt.step(batch).lr == pytest.approx(expected, rel=1e-10)

    model, batches = _least_squares(seed=1)
    opt = AlphaScaled(
        torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9),
        model,
        F.mse_loss,
        source="full",
        full_data=batches,
        full_every=3,
    )
    lrs = []
    for i, batch in enumerate(batches * 2):
        opt.zero_grad()
        F.mse_loss(model(batch[0]), batch[1]).backward()
        expected = _dense_alpha(model, batches, alphalib.direction(opt.optimizer)) if i % 3 == 0 else lrs[-1]
        lrs.append(opt.step(batch).lr)
        assert lrs[-1] == pytest.approx(expected, rel=1e-10)  # measured at steps 0 and 3, held in between


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kappa": 0}, ValueError, "kappa"),
        ({"source": "line"}, ValueError, "source must be one of"),
        ({"curvature": "fd"}, ValueError, "'hessian', 'ggn' or 'secant'"),
        ({"bounds": (1.0, 0.5)}, ValueError, "bounds"),
        ({"source": "heldout"}, ValueError, "needs held_out"),
        ({"source": "full"}, ValueError, "needs full_data"),
        ({"full_every": 0}, ValueError, "full_every"),
    ],
)
def test_bad_arguments_are_refused_before_anything_changes(kwargs, error, match):
    model, _ = _least_squares()
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(error, match=match):
        AlphaScaled(adam, model, F.mse_loss, **kwargs)
    assert adam.state == {} and adam.param_groups[0]["lr"] == 1e-2


def test_optimizers_it_cannot_follow_are_refused():
    model, _ = _least_squares()
    with pytest.raises(TypeError, match="LBFGS"):
        AlphaScaled(torch.optim.LBFGS(model.parameters()), model, F.mse_loss)
    groups = [{"params": [model.weight], "lr": 1e-2}, {"params": [model.bias], "lr": 1e-3}]
    with pytest.raises(ValueError, match="share one lr"):
        AlphaScaled(torch.optim.Adam(groups), model, F.mse_loss)


def test_records_are_the_probes_kind():
    model, batches = _least_squares()
    opt = AlphaScaled(torch.optim.Adam(model.parameters(), lr=1e-2), model, F.mse_loss, kappa=0.5, tags={"seed": 0})
    for batch in batches:
        _step(opt, model, F.mse_loss, batch)
    frame = opt.to_frame()
    assert list(frame.columns[: len(alphalib.Record.__dataclass_fields__)]) == list(
        alphalib.Record.__dataclass_fields__
    )
    assert (frame["source"] == "batch").all() and (frame["kappa"] == 0.5).all() and (frame["seed"] == 0).all()
    ok = frame[frame["flag"] == "ok"]
    np.testing.assert_allclose(ok["ratio"], 2.0, rtol=1e-12)  # α*_batch / (κ α*_batch)


def test_run_steps_by_kappa_alpha_with_each_source():
    data, other = alphalib.gaussian_regression(n=96, seed=0), alphalib.gaussian_regression(n=64, seed=1)
    for source in ("batch", "smoothed", "heldout", "full"):
        history = alphalib.run(
            alphalib.SimpleNet,
            F.mse_loss,
            data,
            epochs=2,
            progress=False,
            alpha_set=other,
            optimizer="alpha_scaled",
            tags={"problem": "seed"},
            optimizer_kwargs={"kappa": 0.5, "source": source, "full_every": 2},
        )
        recs = history.records
        assert len(recs) == 6 and (recs["source"] == source).all() and (recs["kappa"] == 0.5).all()
        assert (recs["problem"] == "seed").all() and len(history.epochs) == 2
        if source == "batch":
            ok = recs[recs["flag"] == "ok"]
            np.testing.assert_allclose(ok["ratio"], 2.0, rtol=1e-10)
        else:  # another source's α*: the step is not the batch's own κ α*
            assert not np.allclose(recs["ratio"], 2.0)
        assert (recs["optimizer"] == "alpha_scaled").all() and (history.epochs["probe_seconds"] == 0).all()
    with pytest.raises(ValueError, match="alpha_set"):
        alphalib.run(
            alphalib.SimpleNet,
            F.mse_loss,
            data,
            epochs=1,
            progress=False,
            optimizer="alpha_scaled",
            optimizer_kwargs={"source": "heldout"},
        )


def test_a_step_size_the_optimizer_could_not_take_falls_back_instead_of_crashing():
    """A nearly flat direction (H = 1e-30 along g) asks for lr 1e30: beyond float32's arithmetic, so the last lr."""
    a = torch.diag(torch.tensor([1e-30, 1.0]))
    b = torch.tensor([1.0, 0.0])

    def loss_fn(out, y):
        return 0.5 * out @ a @ out - b @ out

    model = Theta(torch.zeros(2))
    opt = AlphaScaled(torch.optim.Adam(model.parameters(), lr=1e-3), model, loss_fn)
    rec = _step(opt, model, loss_fn, (torch.zeros(1), torch.zeros(1)))
    assert rec.lr == 1e-3 and "would overflow torch.float32" in rec.fallback
    assert torch.isfinite(model.theta).all()


def test_dropout_is_measured_with_the_training_steps_own_mask():
    """The record's slope is dᵀg of the gradient training computed, through a dropout mask the measurement replays;
    an evaluation forward under no_grad in between does not change which mask that is."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 1)).double()
    opt = AlphaScaled(torch.optim.Adam(model.parameters(), lr=1e-2), model, F.mse_loss, kappa=0.5)
    x, y = torch.randn(32, 4, dtype=DT), torch.randn(32, 1, dtype=DT)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        with torch.no_grad():
            model(x)  # a metric forward: another mask, no gradient
        d = alphalib.direction(opt.optimizer)
        slope = sum(float((di * p.grad).sum()) for di, p in zip(d, model.parameters(), strict=True))
        rec = opt.step((x, y))
        assert rec.slope == pytest.approx(slope, rel=1e-12)
    opt.remove()
    assert not model._forward_pre_hooks
