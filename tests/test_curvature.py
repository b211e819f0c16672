"""Curvature backends, ``hvp`` and ``alpha_star`` against dense float64 Hessians and closed forms."""

from __future__ import annotations

import pytest
import torch
from conftest import Case, dense_hessian, flat, rel_err
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import alphalib
from alphalib._checks import ParamVector


def _random_direction(model: nn.Module) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn_like(p) for p in model.parameters())


def _dense_ggn(case: Case) -> torch.Tensor:
    """``J^T (d²ℓ/df²) J`` from a dense Jacobian of the outputs and a dense Hessian of the loss in f."""
    named = list(case.model.named_parameters())
    sizes = [p.numel() for _, p in named]
    buffers = {n: b.clone() for n, b in case.model.named_buffers()}

    def outputs(theta):
        pieces = [t.view_as(p) for t, (_, p) in zip(theta.split(sizes), named, strict=True)]
        state = {
            **{n: b.clone() for n, b in buffers.items()},
            **{n: t for (n, _), t in zip(named, pieces, strict=True)},
        }
        return functional_call(case.model, state, (case.batch[0],))

    theta0 = flat([p.detach() for _, p in named])
    out = outputs(theta0).detach()
    jac = torch.autograd.functional.jacobian(outputs, theta0).reshape(out.numel(), -1)
    h_out = torch.autograd.functional.hessian(lambda o: case.loss_fn(o.view_as(out), case.batch[1]), out.reshape(-1))
    return jac.T @ h_out @ jac


def test_hvp_matches_dense_hessian(case):
    v = _random_direction(case.model)
    _, hess = dense_hessian(case)
    hv = alphalib.hvp(case.model, case.loss_fn, case.batch, v)
    assert rel_err(flat(hv), hess @ flat(v)) <= 1e-10


def test_alpha_star_hessian_matches_dense(case):
    d = _random_direction(case.model)
    g, hess = dense_hessian(case)
    res = alphalib.alpha_star(case.model, case.loss_fn, case.batch, d, curvature="hessian")
    dv = flat(d)
    assert rel_err(res.slope, dv @ g) <= 1e-10
    assert rel_err(res.curvature, dv @ hess @ dv) <= 1e-10
    assert rel_err(res.alpha_star, -(dv @ g) / (dv @ hess @ dv)) <= 1e-10
    assert rel_err(res.loss, case.loss_fn(case.model(case.batch[0]), case.batch[1]).detach()) <= 1e-12


def test_ggn_matches_dense_ggn(case):
    d = _random_direction(case.model)
    g, _ = dense_hessian(case)
    ggn = _dense_ggn(case)
    res = alphalib.alpha_star(case.model, case.loss_fn, case.batch, d, curvature="ggn")
    dv = flat(d)
    assert rel_err(res.slope, dv @ g) <= 1e-10
    assert rel_err(res.curvature, dv @ ggn @ dv) <= 1e-10


def test_fd_close_to_dense_hessian(case):
    d = _random_direction(case.model)
    _, hess = dense_hessian(case)
    res = alphalib.alpha_star(case.model, case.loss_fn, case.batch, d, curvature="fd")
    dv = flat(d)
    assert rel_err(res.curvature, dv @ hess @ dv) <= 1e-7


def test_secant_close_to_dense_hessian_for_short_steps(case):
    d = _random_direction(case.model)
    _, hess = dense_hessian(case)
    res = alphalib.alpha_star(case.model, case.loss_fn, case.batch, d, curvature="secant", lr=1e-4)
    dv = flat(d)
    assert rel_err(res.curvature, dv @ hess @ dv) <= 1e-2


@pytest.fixture
def least_squares():
    torch.manual_seed(1)
    n, k = 40, 5
    X, y = torch.randn(n, k, dtype=torch.float64), torch.randn(n, 1, dtype=torch.float64)
    model = nn.Linear(k, 1).double()
    return model, X, y


@pytest.mark.parametrize("backend", ["hessian", "ggn", "fd", "secant"])
def test_linear_least_squares_closed_form(least_squares, backend):
    model, X, y = least_squares
    n = X.shape[0]
    d = _random_direction(model)
    Xb = torch.cat([X, torch.ones(n, 1, dtype=X.dtype)], dim=1)  # bias as a last column
    w = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    dw = torch.cat([d[0].reshape(-1), d[1]])
    g = 2 / n * Xb.T @ (Xb @ w - y[:, 0])
    curvature = 2 / n * (Xb @ dw).square().sum()
    res = alphalib.alpha_star(model, F.mse_loss, (X, y), d, curvature=backend, lr=1e-2)
    tol = {"hessian": 1e-12, "ggn": 1e-12, "fd": 1e-8, "secant": 1e-8}[backend]
    assert rel_err(res.curvature, curvature) <= tol
    assert rel_err(res.alpha_star, -(dw @ g) / curvature) <= tol


def test_ggn_differs_from_hessian_off_linear_models(case):
    # The two must agree on linear models only; if they agreed here the GGN test would be vacuous.
    d = _random_direction(case.model)
    exact = alphalib.alpha_star(case.model, case.loss_fn, case.batch, d).curvature
    ggn = alphalib.alpha_star(case.model, case.loss_fn, case.batch, d, curvature="ggn").curvature
    assert rel_err(ggn, exact) > 1e-6


def test_functions_leave_model_grad_buffers_and_rng_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.3), nn.Linear(6, 1)).double()
    batch = (torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = _random_direction(model)
    rng = torch.get_rng_state()
    alphalib.hvp(model, F.mse_loss, batch, d)
    for backend in alphalib.BACKENDS:
        alphalib.alpha_star(model, F.mse_loss, batch, d, curvature=backend, lr=1e-3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_frozen_parameters_are_left_out_of_vectors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    model[0].weight.requires_grad_(False)
    batch = (torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64))
    trainable = [p for p in model.parameters() if p.requires_grad]
    v = tuple(torch.randn_like(p) for p in trainable)
    full_v = (torch.zeros_like(model[0].weight), *v)
    _, hess = dense_hessian(Case(model, F.mse_loss, batch))
    expected = (hess @ flat(full_v))[model[0].weight.numel() :]
    assert rel_err(flat(alphalib.hvp(model, F.mse_loss, batch, v)), expected) <= 1e-10


def test_bad_inputs_get_clear_errors(case):
    d = _random_direction(case.model)
    with pytest.raises(ValueError, match="pair"):
        alphalib.hvp(case.model, case.loss_fn, case.batch[0], d)
    with pytest.raises(ValueError, match="scalar"):
        alphalib.hvp(case.model, lambda out, y: (out - out.detach()).square() + 1, case.batch, d)
    with pytest.raises(ValueError, match=r"d\[0\] has shape"):
        alphalib.alpha_star(case.model, case.loss_fn, case.batch, (d[0][..., :1], *d[1:]))
    with pytest.raises(ValueError, match="trainable"):
        alphalib.hvp(case.model, case.loss_fn, case.batch, d[:-1])
    with pytest.raises(ValueError, match="tuple of tensors"):
        alphalib.hvp(case.model, case.loss_fn, case.batch, flat(d))
    with pytest.raises(ValueError, match="unknown curvature backend"):
        alphalib.alpha_star(case.model, case.loss_fn, case.batch, d, curvature="exact")
    with pytest.raises(ValueError, match="lr="):
        alphalib.alpha_star(case.model, case.loss_fn, case.batch, d, curvature="secant")


class _Attention(nn.Module):
    """One causal self-attention layer written the way users write it: F.scaled_dot_product_attention."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, 1)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, 2, c // 2).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        return self.out(y).mean(dim=1)


def test_attention_models_get_exact_curvature():
    """Fused CPU attention (float32) has no double backward; the probe's function must still be exact."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = _Attention()
    batch = (torch.randn(4, 5, 8), torch.randn(4, 1))
    d = _random_direction(model)
    res = alphalib.alpha_star(model, F.mse_loss, batch, d)
    case = Case(model.double(), F.mse_loss, tuple(t.double() for t in batch))
    with sdpa_kernel(SDPBackend.MATH):  # the dense reference needs a double backward too
        g, hess = dense_hessian(case)
    dv = flat(d).double()
    assert rel_err(res.curvature, dv @ hess @ dv) <= 1e-4  # float32 arithmetic
    assert rel_err(res.slope, dv @ g) <= 1e-4


def _swapped_layers() -> tuple[Case, torch.optim.Optimizer]:
    """Two Linear(4, 4) layers and an Adam whose param groups list them last layer first: same shapes, other order."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    batch = (torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64))
    opt = torch.optim.Adam([{"params": list(model[2].parameters())}, {"params": list(model[0].parameters())}], lr=0.01)
    case = Case(model, F.mse_loss, batch)
    for _ in range(3):  # nontrivial Adam moments
        opt.zero_grad()
        case.loss_fn(model(batch[0]), batch[1]).backward()
        opt.step()
    opt.zero_grad()
    case.loss_fn(model(batch[0]), batch[1]).backward()
    return case, opt


def _realized_alpha(case: Case, opt: torch.optim.Optimizer) -> tuple[float, list[torch.Tensor]]:
    """Dense reference -(d'g)/(d'Hd) at the current parameters, d = the realized step / lr in model order."""
    g, hess = dense_hessian(case)
    before = [p.detach().clone() for p in case.model.parameters()]
    opt.step()
    d = [(p.detach() - b) / opt.param_groups[0]["lr"] for p, b in zip(case.model.parameters(), before, strict=True)]
    with torch.no_grad():
        for p, b in zip(case.model.parameters(), before, strict=True):
            p.copy_(b)
    dv = flat(d)
    return (-(dv @ g) / (dv @ hess @ dv)).item(), d


def test_alpha_star_of_direction_in_another_order_matches_dense():
    case, opt = _swapped_layers()
    res = alphalib.alpha_star(case.model, case.loss_fn, case.batch, alphalib.direction(opt))
    expected, _ = _realized_alpha(case, opt)
    assert rel_err(res.alpha_star, expected) <= 1e-10


def test_dict_keyed_vectors_give_the_same_alpha_star():
    case, opt = _swapped_layers()
    names = {id(p): n for n, p in case.model.named_parameters()}
    d = alphalib.direction(opt)
    by_name = {names[id(p)]: di for p, di in zip(d.params, d, strict=True)}
    res = alphalib.alpha_star(case.model, case.loss_fn, case.batch, by_name)
    expected, realized = _realized_alpha(case, opt)
    assert rel_err(res.alpha_star, expected) <= 1e-10
    named_realized = {n: di for (n, _), di in zip(case.model.named_parameters(), realized, strict=True)}
    for v in (named_realized, tuple(realized)):  # the realized step keyed by name, and in model order
        assert rel_err(alphalib.alpha_star(case.model, case.loss_fn, case.batch, v).alpha_star, expected) <= 1e-10


def test_hvp_of_a_param_vector_in_another_order_matches_dense():
    case, _ = _swapped_layers()
    params = list(case.model.parameters())
    v = _random_direction(case.model)
    swapped = ParamVector(v[::-1], params[::-1])
    _, hess = dense_hessian(case)
    hv = alphalib.hvp(case.model, case.loss_fn, case.batch, swapped)
    assert isinstance(hv, ParamVector) and all(a is b for a, b in zip(hv.params, params, strict=True))
    assert rel_err(flat(hv), hess @ flat(v)) <= 1e-10
    assert rel_err(flat(alphalib.hvp(case.model, case.loss_fn, case.batch, hv)), hess @ hess @ flat(v)) <= 1e-10


def test_param_vector_gets_zeros_for_parameters_it_lacks():
    case, _ = _swapped_layers()
    opt = torch.optim.SGD(case.model[2].parameters(), lr=0.1)  # never moves the first layer
    d = alphalib.direction(opt)
    res = alphalib.alpha_star(case.model, case.loss_fn, case.batch, d)
    expected, realized = _realized_alpha(case, opt)
    assert flat(realized[:2]).abs().max() == 0
    assert rel_err(res.alpha_star, expected) <= 1e-10


def test_frozen_parameter_in_a_param_vector_must_not_move():
    case, _ = _swapped_layers()
    case.model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1, weight_decay=0.1)  # holds the frozen weight, no grad
    opt.zero_grad()
    case.loss_fn(case.model(case.batch[0]), case.batch[1]).backward()
    d = alphalib.direction(opt)
    res = alphalib.alpha_star(case.model, case.loss_fn, case.batch, d)
    trainable = [p for p in case.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    opt.step()
    step = tuple((p.detach() - b) / 0.1 for p, b in zip(trainable, before, strict=True))
    with torch.no_grad():
        for p, b in zip(trainable, before, strict=True):
            p.copy_(b)
    assert rel_err(res.alpha_star, alphalib.alpha_star(case.model, case.loss_fn, case.batch, step).alpha_star) <= 1e-12
    moved = ParamVector((torch.ones_like(d[0]), *d[1:]), d.params)
    with pytest.raises(ValueError, match=r"d\[0\] moves the frozen parameter '0.weight'"):
        alphalib.alpha_star(case.model, case.loss_fn, case.batch, moved)


def test_vector_for_a_parameter_not_in_the_model_raises_before_anything_changes():
    case, _ = _swapped_layers()
    other = nn.Linear(4, 4).double()
    opt = torch.optim.Adam([*other.parameters(), *case.model.parameters()], lr=0.01)
    opt.zero_grad()
    (case.loss_fn(case.model(case.batch[0]), case.batch[1]) + other(case.batch[0]).square().mean()).backward()
    state = {k: v.clone() for k, v in case.model.state_dict().items()}
    grads = [p.grad.clone() for p in case.model.parameters()]
    d = alphalib.direction(opt)
    for call in (alphalib.hvp, alphalib.alpha_star):
        with pytest.raises(ValueError, match=r"\[0\] belongs to a parameter of shape \(4, 4\) that is not in the"):
            call(case.model, case.loss_fn, case.batch, d)
    assert all(torch.equal(v, case.model.state_dict()[k]) for k, v in state.items())
    assert all(torch.equal(p.grad, g) for p, g in zip(case.model.parameters(), grads, strict=True))
    assert opt.state == {}


def test_dict_with_missing_or_unknown_names_raises():
    case, _ = _swapped_layers()
    v = {n: torch.randn_like(p) for n, p in case.model.named_parameters()}
    del v["2.bias"]
    with pytest.raises(ValueError, match=r"no tensor for '2.bias'"):
        alphalib.alpha_star(case.model, case.loss_fn, case.batch, v)
    v["2.bias"], v["3.weight"] = torch.zeros(4, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"unknown names '3.weight'"):
        alphalib.hvp(case.model, case.loss_fn, case.batch, v)
    del v["3.weight"]
    v["0.bias"] = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"v\[1\] has shape \(3,\), expected \(4,\) \(parameter 1, '0.bias'\)"):
        alphalib.hvp(case.model, case.loss_fn, case.batch, v)
