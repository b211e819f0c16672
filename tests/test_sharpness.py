"""Sharpness against dense float64 eigendecompositions and least-squares closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import dense_hessian, make_case
from torch import nn
from torch.nn import functional as F

import alphalib
from alphalib.sharpness import preconditioner


def _adam_state(case, steps=3, **kw):
    opt = torch.optim.Adam(case.model.parameters(), lr=1e-2, **kw)
    for _ in range(steps):
        opt.zero_grad()
        case.loss_fn(case.model(case.batch[0]), case.batch[1]).backward()
        opt.step()
    return opt


def _p(opt, model):
    """Adam's P_t = (1 - b1^t)(sqrt(v_t / (1 - b2^t)) + eps), built here from the state."""
    group = opt.param_groups[0]
    (b1, b2), eps = group["betas"], group["eps"]
    parts = []
    for p in model.parameters():
        st = opt.state[p]
        t = st["step"].item()
        v = st["max_exp_avg_sq"] if group["amsgrad"] else st["exp_avg_sq"]
        parts.append(((1 - b1**t) * ((v / (1 - b2**t)).sqrt() + eps)).reshape(-1))
    return torch.cat(parts)


@pytest.mark.parametrize("problem", ["mlp-mse", "mlp-ce", "batchnorm-train", "cnn"])
def test_extreme_eigenvalues_match_a_dense_eigendecomposition(problem):
    case = make_case(problem)
    _, hess = dense_hessian(case)
    exact = torch.linalg.eigvalsh(hess)
    before = [p.detach().clone() for p in case.model.parameters()]
    res = alphalib.top_eigenvalue(case.model, case.loss_fn, case.batch, tol=1e-10)
    assert res.lambda_max == pytest.approx(exact[-1].item(), rel=1e-8)
    assert res.lambda_min == pytest.approx(exact[0].item(), rel=1e-8, abs=1e-10)
    assert not res.preconditioned and res.matvecs > 0
    assert all(torch.equal(a, b) for a, b in zip(before, case.model.parameters(), strict=True))
    assert all(p.grad is None for p in case.model.parameters())


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("problem", ["mlp-mse", "mlp-ce"])
def test_preconditioned_sharpness_is_the_top_eigenvalue_of_p_inverse_h(problem, amsgrad):
    case = make_case(problem)
    opt = _adam_state(case, amsgrad=amsgrad)
    _, hess = dense_hessian(case)
    p = _p(opt, case.model)
    exact = torch.linalg.eigvals(torch.diag(1 / p) @ hess).real.sort().values  # P^-1 H, not symmetrised
    res = alphalib.top_eigenvalue(case.model, case.loss_fn, case.batch, optimizer=opt, tol=1e-10)
    assert res.preconditioned
    assert res.lambda_max == pytest.approx(exact[-1].item(), rel=1e-7)
    assert res.lambda_min == pytest.approx(exact[0].item(), rel=1e-7)
    plain = alphalib.top_eigenvalue(case.model, case.loss_fn, case.batch, which="max")
    assert math.isnan(plain.lambda_min) and plain.lambda_max < res.lambda_max / 10  # P < 1: the two differ


def test_full_data_is_the_size_weighted_mean_over_batches():
    case = make_case("mlp-mse")
    x, y = torch.randn(23, 4, dtype=torch.float64), torch.randn(23, 2, dtype=torch.float64)
    chunks = [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]
    case.batch = (x, y)
    _, hess = dense_hessian(case)  # of the mean loss over all 23 samples
    exact = torch.linalg.eigvalsh(hess)
    res = alphalib.top_eigenvalue(case.model, case.loss_fn, chunks, tol=1e-10)
    assert res.lambda_max == pytest.approx(exact[-1].item(), rel=1e-8)
    assert res.lambda_min == pytest.approx(exact[0].item(), rel=1e-8)
    as_list = alphalib.top_eigenvalue(case.model, case.loss_fn, [x, y], which="max", tol=1e-10)  # one batch as [x, y]
    assert as_list.lambda_max == pytest.approx(
        alphalib.top_eigenvalue(case.model, case.loss_fn, (x, y), which="max", tol=1e-10).lambda_max, rel=1e-12
    )
    loader = alphalib.loader(torch.utils.data.TensorDataset(x, y), 10)
    assert alphalib.top_eigenvalue(
        case.model, case.loss_fn, loader, which="max", tol=1e-10
    ).lambda_max == pytest.approx(exact[-1].item(), rel=1e-8)


def test_least_squares_closed_form_and_exact_trace():
    """MSE of a linear model: H = 2 X'X / n; with orthogonal columns H is diagonal and Hutchinson is exact."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    model = nn.Linear(5, 1, bias=False).double()
    batch = (x, torch.randn(40, 1, generator=gen, dtype=torch.float64))
    h = 2 * x.T @ x / 40
    exact = torch.linalg.eigvalsh(h)
    res = alphalib.top_eigenvalue(model, F.mse_loss, batch, tol=1e-12)
    assert res.lambda_max == pytest.approx(exact[-1].item(), rel=1e-10)
    assert res.lambda_min == pytest.approx(exact[0].item(), rel=1e-10)
    q, _ = torch.linalg.qr(x)
    scaled = q * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)  # X'X = diag(1, 4, 9, 16, 25)
    trace = alphalib.hessian_trace(model, F.mse_loss, (scaled, batch[1]), samples=3)
    assert trace == pytest.approx(2 * 55 / 40, rel=1e-12)


def test_hutchinson_is_within_its_standard_error_of_the_dense_trace():
    case = make_case("mlp-ce")
    _, hess = dense_hessian(case)
    m = 400
    stderr = math.sqrt(2 * (hess.square().sum() - hess.diagonal().square().sum()).item() / m)
    est = alphalib.hessian_trace(case.model, case.loss_fn, case.batch, samples=m, seed=1)
    assert abs(est - hess.trace().item()) < 4 * stderr
    opt = _adam_state(case)
    p = _p(opt, case.model)
    pre = hess / torch.outer(p.sqrt(), p.sqrt())
    stderr = math.sqrt(2 * (pre.square().sum() - pre.diagonal().square().sum()).item() / m)
    est = alphalib.hessian_trace(case.model, case.loss_fn, case.batch, optimizer=opt, samples=m, seed=1)
    assert abs(est - (hess.diagonal() / p).sum().item()) < 4 * stderr


def test_the_hessian_is_taken_at_theta_when_given():
    case = make_case("mlp-mse")
    theta = [p.detach() + 0.3 for p in case.model.parameters()]
    _, hess = dense_hessian(case, theta)
    res = alphalib.top_eigenvalue(case.model, case.loss_fn, case.batch, theta=theta, which="max", tol=1e-10)
    assert res.lambda_max == pytest.approx(torch.linalg.eigvalsh(hess)[-1].item(), rel=1e-8)


def test_stability_thresholds():
    params = nn.Linear(2, 1).parameters
    assert alphalib.stability_threshold(torch.optim.SGD(params(), lr=0.1)) == pytest.approx(20.0)
    assert alphalib.stability_threshold(torch.optim.SGD(params(), lr=0.1, momentum=0.9)) == pytest.approx(38.0)
    assert alphalib.stability_threshold(
        torch.optim.SGD(params(), lr=0.1, momentum=0.9, nesterov=True)
    ) == pytest.approx(3.8 / 2.8 / 0.1)
    assert alphalib.stability_threshold(torch.optim.Adam(params(), lr=0.01)) == pytest.approx(3800.0)
    assert alphalib.stability_threshold(torch.optim.AdamW(params(), lr=0.01, betas=(0.5, 0.99))) == pytest.approx(600.0)
    with pytest.raises(TypeError, match="RMSprop"):
        alphalib.stability_threshold(torch.optim.RMSprop(params()))


def test_bad_input_is_refused_with_what_to_do():
    case = make_case("mlp-mse")
    fresh = torch.optim.Adam(case.model.parameters())
    with pytest.raises(ValueError, match="take a step first"):
        alphalib.top_eigenvalue(case.model, case.loss_fn, case.batch, optimizer=fresh)
    with pytest.raises(TypeError, match="Adam or AdamW"):
        alphalib.top_eigenvalue(
            case.model, case.loss_fn, case.batch, optimizer=torch.optim.SGD(case.model.parameters(), lr=0.1)
        )
    with pytest.raises(ValueError, match="data is empty"):
        alphalib.top_eigenvalue(case.model, case.loss_fn, [])
    with pytest.raises(ValueError, match="not in the optimizer"):
        preconditioner(_adam_state(case), [torch.zeros(3)])
    with pytest.raises(ValueError, match="which"):
        alphalib.top_eigenvalue(case.model, case.loss_fn, case.batch, which="min")
    with pytest.raises(ValueError, match="samples"):
        alphalib.hessian_trace(case.model, case.loss_fn, case.batch, samples=0)


def test_the_probe_records_sharpness_at_theta_t_every_k_steps_and_changes_nothing():
    """λmax of the batch Hessian at θ_t (before the step), λmax(P_t⁻¹H) with the step's own P_t."""
    runs = []
    for k in (None, 2):
        case = make_case("mlp-ce")
        opt = torch.optim.Adam(case.model.parameters(), lr=0.05)
        probe = alphalib.AlphaProbe(case.model, case.loss_fn, opt, sharpness_every=k)
        for t in range(4):
            before = [p.detach().clone() for p in case.model.parameters()]
            _, hess = dense_hessian(case)
            opt.zero_grad()
            case.loss_fn(case.model(case.batch[0]), case.batch[1]).backward()
            rec = probe.step(case.batch)
            if k is None or t % k:
                assert math.isnan(rec.lambda_max) and math.isnan(rec.precond_lambda_max)
                continue
            exact = torch.linalg.eigvalsh(hess)
            p = _p(opt, case.model)  # after the step: the preconditioner that step applied
            pre = torch.linalg.eigvalsh(hess / torch.outer(p.sqrt(), p.sqrt()))
            assert rec.lambda_max == pytest.approx(exact[-1].item(), rel=1e-5)
            assert rec.precond_lambda_max == pytest.approx(pre[-1].item(), rel=1e-5)
            assert not torch.equal(before[0], case.model[0].weight)  # it stepped: θ_t is not θ_{t+1}
        runs.append([p.detach().clone() for p in case.model.parameters()] + [opt.state_dict()["state"][0]["exp_avg"]])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    with pytest.raises(ValueError, match="sharpness_every"):
        alphalib.AlphaProbe(case.model, case.loss_fn, opt, sharpness_every=0)


def test_the_probe_takes_the_sharpness_of_the_loss_that_stepped_dropout_mask_included():
    """With dropout, λmax is that of the training forward's own mask (replayed), not of a fresh one."""
    from torch.func import functional_call

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = alphalib.AlphaProbe(model, F.mse_loss, opt, sharpness_every=1)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    for _ in range(3):
        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        state = torch.get_rng_state()  # the training forward's draws

        def loss(flat_theta, state=state):
            pieces = [t.view(s) for t, s in zip(flat_theta.split([s.numel() for s in shapes]), shapes, strict=True)]
            with torch.random.fork_rng():
                torch.set_rng_state(state)
                return F.mse_loss(functional_call(model, dict(zip(names, pieces, strict=True)), (x,)), y)

        exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, theta))[-1].item()
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        rec = probe.step((x, y))
        assert rec.lambda_max == pytest.approx(exact, rel=1e-6)
