"""Full-data and held-out α*, line profiles and lr/α* against dense float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Case, dense_hessian, flat, flat_loss, rel_err
from torch import nn
from torch.nn import functional as F

import alphalib
from alphalib.spectrum import alpha_over, line_profile


def _data(sizes=(8, 8, 5), d_in=4, d_out=2, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, d_in, generator=gen, dtype=torch.float64),
            torch.randn(n, d_out, generator=gen, dtype=torch.float64),
        )
        for n in sizes
    ]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def _union(batches):
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@pytest.mark.parametrize("backend", ["hessian", "ggn", "fd"])
def test_full_data_alpha_matches_the_dense_hessian_of_the_data_loss(backend):
    """Batches of unequal size: the mean loss over the data is the loss of their union."""
    model, data = _mlp(), _data()
    d = tuple(torch.randn_like(p) for p in model.parameters())
    g, hess = dense_hessian(Case(model, F.mse_loss, _union(data)))
    dv = flat(d)
    res = alpha_over(model, F.mse_loss, data, d, curvature=backend)
    assert rel_err(res.slope, dv @ g) <= 1e-10
    if backend == "hessian":
        assert rel_err(res.curvature, dv @ hess @ dv) <= 1e-10
        assert rel_err(res.alpha_star, -(dv @ g) / (dv @ hess @ dv)) <= 1e-10
    elif backend == "fd":
        assert rel_err(res.curvature, dv @ hess @ dv) <= 1e-6


def test_line_profile_is_exact_on_a_quadratic_and_trust_is_one():
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()  # least squares: the loss is quadratic in θ along any line
    data = _data()
    d = tuple(torch.randn_like(p) for p in model.parameters())
    prof = line_profile(model, F.mse_loss, data, d)
    assert all(abs(a - b) <= 1e-10 * max(1.0, abs(b)) for a, b in zip(prof.loss, prof.quadratic, strict=True))
    assert rel_err(prof.trust, 1.0) <= 1e-8
    x, y = _union(data)  # closed form: α* = -dᵀg / dᵀHd with H = (2/n) X̃ᵀX̃ per output (mean over n·2 entries)
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    w = torch.cat([model.weight, model.bias[:, None]], 1).detach()
    dw = torch.cat([d[0], d[1][:, None]], 1)
    r, jd = xt @ w.T - y, xt @ dw.T
    n = r.numel()
    assert rel_err(prof.alpha_star, -(2 / n * (r * jd).sum()) / (2 / n * (jd * jd).sum())) <= 1e-10


def test_line_profile_follows_the_true_loss_of_a_network():
    model, data = _mlp(), _data()
    batch = data[0]
    case = Case(model, F.mse_loss, batch)
    f, theta0 = flat_loss(case)
    g, hess = dense_hessian(case)
    d = tuple(-gi for gi in torch.autograd.grad(F.mse_loss(model(batch[0]), batch[1]), list(model.parameters())))
    dv = flat(d)
    prof = line_profile(model, F.mse_loss, batch, d, alphas=[0.0, 0.1, 0.5, 1.0])
    for a, value, quad in zip(prof.alphas, prof.loss, prof.quadratic, strict=True):
        assert rel_err(value, f(theta0 + a * dv).detach()) <= 1e-12
        assert rel_err(quad, f(theta0).detach() + a * (dv @ g) + 0.5 * a * a * (dv @ hess @ dv)) <= 1e-10
    star = -(dv @ g) / (dv @ hess @ dv)
    trust = (f(theta0) - f(theta0 + star * dv)).detach() / (0.5 * (dv @ g) ** 2 / (dv @ hess @ dv))
    assert rel_err(prof.alpha_star, star) <= 1e-10 and rel_err(prof.trust, trust) <= 1e-8
    assert 0 < prof.trust < 1.5 and prof.to_frame().shape == (len(prof.alphas), 3)


@pytest.mark.parametrize("backend", ["hessian", "secant"])
def test_probe_records_full_data_and_held_out_alpha_along_the_realized_step(backend):
    model, data = _mlp(), _data()
    held = _data(sizes=(7,), seed=9)[0]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt, curvature=backend, full_data=data, held_out=held, full_every=2)
    twin = _mlp()
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    for step in range(3):
        batch = data[step % len(data)]
        before = flat([p.detach().clone() for p in model.parameters()])
        refs = {name: flat_loss(Case(model, F.mse_loss, b)) for name, b in (("full", _union(data)), ("heldout", held))}
        dense = {
            name: dense_hessian(Case(model, F.mse_loss, b)) for name, b in (("full", _union(data)), ("heldout", held))
        }
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            F.mse_loss(m(batch[0]), batch[1]).backward()
        rec = probe.step(batch)
        twin_opt.step()
        delta, lr = flat(model.parameters()).detach() - before, rec.lr
        for name in ("full", "heldout"):
            got = {k: getattr(rec, f"{name}_{k}") for k in ("loss", "slope", "curvature", "ratio")}
            if step % 2:
                assert all(math.isnan(v) for v in got.values())
                continue
            g, hess = dense[name]
            f, theta0 = refs[name]
            curv = delta @ hess @ delta if backend == "hessian" else 2 * (f(theta0 + delta) - f(theta0) - delta @ g)
            assert rel_err(got["loss"], f(theta0).detach()) <= 1e-12
            assert rel_err(got["slope"], delta @ g / lr) <= 1e-10
            assert rel_err(got["curvature"], curv.detach() / lr**2) <= 1e-8
            assert rel_err(got["ratio"], -(delta @ g) / curv.detach()) <= 1e-8
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))  # a pure observer


def test_lr_over_alpha_stays_defined_on_odd_steps():
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    x, y = _data(sizes=(8,), d_out=1)[0]
    cases = {
        "concave": lambda out, t: -(out - t).square().mean(),
        "linear": lambda out, t: (out * t).mean(),
        "convex": F.mse_loss,
    }
    for name, loss_fn in cases.items():
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        probe = alphalib.AlphaProbe(model, loss_fn, opt)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        rec = probe.step((x, y))
        probe.remove()
        assert rel_err(rec.lr_over_alpha, -rec.curvature * rec.lr / rec.slope) <= 1e-12
        if name == "linear":
            assert rec.lr_over_alpha == 0.0 and math.isnan(rec.ratio)
        else:
            assert rel_err(rec.lr_over_alpha, 1 / rec.ratio) <= 1e-12
    frame = probe.to_frame().assign(epoch=0)
    summary = alphalib.epoch_summary(frame)
    assert {"undefined", "median_lr_over_alpha"} <= set(summary.columns)


def test_bad_full_every_is_refused():
    model = nn.Linear(4, 1)
    with pytest.raises(ValueError, match="full_every"):
        alphalib.AlphaProbe(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.1), full_every=0)


def test_next_step_profiles_follow_adams_first_step_and_leave_training_untouched():
    """Adam's first step has the closed form d = -g / (|g| + eps); α* and trust are checked on a dense Hessian."""
    torch.manual_seed(0)
    model, data = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.3), nn.Tanh(), nn.Linear(6, 2)).double(), _data()
    model = model.eval()  # a deterministic loss for the reference; the copy steps in the same mode
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-8)
    batch = data[0]
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    profs = alphalib.next_step_profiles(model, F.mse_loss, opt, batch, full_data=data)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters()) and not opt.state
    assert torch.equal(rng, torch.get_rng_state())
    for scope, batches in (("batch", [batch]), ("full data", data)):
        g_batch, _ = dense_hessian(Case(model, F.mse_loss, batch))
        d = -g_batch / (g_batch.abs() + 1e-8)
        g, hess = dense_hessian(Case(model, F.mse_loss, _union(batches)))
        want = -(d @ g) / (d @ hess @ d)
        prof = profs[scope]
        assert rel_err(prof.alpha_star, want.item()) <= 1e-8
        f, theta = flat_loss(Case(model, F.mse_loss, _union(batches)))
        actual = f(theta) - f(theta + prof.alpha_star * d)
        assert rel_err(prof.trust, (actual / (0.5 * (d @ g) ** 2 / (d @ hess @ d))).item()) <= 1e-8


def test_next_step_profiles_work_for_any_optimizer():
    """The step is taken on copies, so optimizers without an analytic direction() work too (SGD: d = -g)."""
    torch.manual_seed(0)
    model, batch = nn.Linear(4, 2).double(), _data()[0]
    rprop = alphalib.next_step_profiles(model, F.mse_loss, torch.optim.Rprop(model.parameters(), lr=1e-3), batch)
    assert rel_err(rprop["batch"].trust, 1.0) <= 1e-8  # quadratic along any line
    sgd = alphalib.next_step_profiles(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.1), batch)
    g, hess = dense_hessian(Case(model, F.mse_loss, batch))
    assert rel_err(sgd["batch"].alpha_star, ((g @ g) / (g @ hess @ g)).item()) <= 1e-10
