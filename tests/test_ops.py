"""The shim over private torch: each wrapper against autograd or the public API, and a broken one caught."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import rel_err
from torch import nn
from torch.func import functional_call, vjp
from torch.nn import functional as F

import alphalib
from alphalib import _ops, _trained, fast
from alphalib.lab.models import CausalSelfAttention

OPS = [
    "gelu_backward",
    "silu_backward",
    "layer_norm",
    "layer_norm_backward",
    "softmax_backward",
    "pool_indices",
    "conv",
]
INTERNALS = ["version", "hooks", "parameter_slot"]  # torch internals the probe reads; each fails safe
RAISING = [name for name in OPS if name != "pool_indices"]  # pool_indices returns None instead


@pytest.fixture
def fresh(monkeypatch):
    """Forget the cached verdicts for this test (restored after it)."""
    monkeypatch.setattr(_ops, "_verdicts", {})


def test_every_op_is_verified_on_this_torch(fresh):
    assert _ops.verify_all() == dict.fromkeys(OPS + INTERNALS)


def test_verification_keeps_grad_mode_and_rng(fresh):
    state = torch.get_rng_state()
    with torch.no_grad():
        _ops.verify_all()
        assert not torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), state)


def test_each_op_is_checked_once(fresh, monkeypatch):
    call, reference, off, check = _ops._CHECKS["gelu_backward"]
    runs = []
    monkeypatch.setitem(_ops._CHECKS, "gelu_backward", (call, reference, off, lambda: runs.append(1) or check()))
    z = torch.linspace(-2, 2, 5, dtype=torch.float64)
    for _ in range(3):
        _ops.gelu_backward(z, z)
    assert runs == [1]


# ---- each wrapper against an independent autograd computation -----------------------------------------------


@pytest.mark.parametrize("fn", [F.gelu, F.silu])
def test_activation_backward_is_the_vjp(fn):
    torch.manual_seed(0)
    z, g = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    wrapper = _ops.gelu_backward if fn is F.gelu else _ops.silu_backward
    assert rel_err(wrapper(g, z), vjp(fn, z)[1](g)[0]) < 1e-14


@pytest.mark.parametrize("shape", [(6,), (5, 6)])
def test_layer_norm_and_its_backward(shape):
    torch.manual_seed(0)
    x, g, eps = 3 * torch.randn(4, 5, 6, dtype=torch.float64) + 1, torch.randn(4, 5, 6, dtype=torch.float64), 1e-3
    x_hat, mean, rstd = _ops.layer_norm(x, shape, eps)
    rows = x.flatten(-len(shape)).flatten(0, -2)  # one row per normalized group
    assert rel_err(mean.flatten(), rows.mean(-1)) < 1e-14
    assert rel_err(rstd.flatten(), 1 / (rows.var(-1, unbiased=False) + eps).sqrt()) < 1e-14
    assert rel_err(x_hat, F.layer_norm(x, shape, eps=eps)) < 1e-14
    ref = vjp(lambda y: F.layer_norm(y, shape, eps=eps), x)[1](g)[0]
    assert rel_err(_ops.layer_norm_backward(g, x, shape, mean, rstd), ref) < 1e-13


@pytest.mark.parametrize("dim", [-1, 1])
def test_softmax_backward_is_the_vjp(dim):
    torch.manual_seed(0)
    s, g = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    if dim == -1:  # causal mask, as in attention
        s = s + torch.full((5, 5), float("-inf"), dtype=torch.float64).triu(1)
    p = torch.softmax(s, dim)
    assert rel_err(_ops.softmax_backward(g, p, dim), vjp(lambda y: torch.softmax(y, dim), s)[1](g)[0]) < 1e-14


def test_pool_indices_are_the_argmax():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
    out = pool(x)
    idx = _ops.pool_indices(out)
    assert torch.equal(idx, F.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)[1])
    assert torch.equal(x.flatten(-2).gather(-1, idx.flatten(-2)).view_as(out), out)
    assert _ops.pool_indices(pool(x.detach())) is None  # no grad_fn: nothing saved
    assert _ops.pool_indices(F.max_pool1d(x.flatten(-2), 2)) is None  # its grad_fn keeps no indices


@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect", "replicate"])
@pytest.mark.parametrize("cls", [nn.Conv1d, nn.Conv2d])
def test_conv_is_the_module_with_other_weights(cls, mode):
    torch.manual_seed(0)
    m = cls(3, 4, 3, stride=2, padding=2, dilation=2, padding_mode=mode).double()
    x = torch.randn(2, 3, *(9,) * (m.weight.dim() - 2), dtype=torch.float64)
    w, b = torch.randn_like(m.weight), torch.randn_like(m.bias)
    assert rel_err(_ops.conv(m, x, w, b), functional_call(m, {"weight": w, "bias": b}, (x,))) < 1e-14
    zero = torch.zeros_like(b)
    assert rel_err(_ops.conv(m, x, w, None), functional_call(m, {"weight": w, "bias": zero}, (x,))) < 1e-14


# ---- a broken op is caught ------------------------------------------------------------------------------------

_X = torch.linspace(-1, 1, 12, dtype=torch.float64).view(3, 4)
CALLS = {  # a call of each raising wrapper
    "gelu_backward": lambda: _ops.gelu_backward(_X, _X),
    "silu_backward": lambda: _ops.silu_backward(_X, _X),
    "layer_norm": lambda: _ops.layer_norm(_X, (4,), 1e-5),
    "layer_norm_backward": lambda: _ops.layer_norm_backward(_X, _X, (4,), *_ops.layer_norm(_X, (4,), 1e-5)[1:]),
    "softmax_backward": lambda: _ops.softmax_backward(_X, _X.softmax(-1), -1),
    "conv": lambda: (lambda m: _ops.conv(m, _X[None], m.weight, None))(nn.Conv1d(3, 2, 3).double()),
}


def _off(out):
    return tuple(_off(o) for o in out) if isinstance(out, tuple) else out * (1 + 1e-9)


def _missing(*args):
    return torch.ops.aten.no_such_op_in_this_torch(*args)  # AttributeError, as for an op torch removed


def test_unverified_is_not_a_runtime_error():
    assert not issubclass(_ops.Unverified, RuntimeError)


@pytest.mark.parametrize("name", RAISING)
def test_a_disagreeing_op_is_caught(fresh, monkeypatch, name):
    impl = getattr(_ops, f"_{name}_impl")
    monkeypatch.setattr(_ops, f"_{name}_impl", lambda *args: _off(impl(*args)))  # off by 1e-9 relative
    call, version = re.escape(_ops._CHECKS[name][0]), re.escape(torch.__version__)
    with pytest.raises(_ops.Unverified, match=rf"^{call} disagrees with .* in torch {version}; "):
        CALLS[name]()
    assert _ops.verify_all()[name].startswith(f"{_ops._CHECKS[name][0]} disagrees")


@pytest.mark.parametrize("name", RAISING)
def test_a_missing_op_is_caught(fresh, monkeypatch, name):
    monkeypatch.setattr(_ops, f"_{name}_impl", _missing)
    with pytest.raises(_ops.Unverified, match=rf"^{re.escape(_ops._CHECKS[name][0])} is missing \(AttributeError: "):
        CALLS[name]()


def test_gelu_backward_off_by_a_factor(fresh, monkeypatch):
    monkeypatch.setattr(_ops, "_gelu_backward_impl", lambda g, z: 2 * g)
    with pytest.raises(_ops.Unverified, match="torch.ops.aten.gelu_backward disagrees with autograd .* GELU$"):
        _ops.gelu_backward(_X, _X)


@pytest.mark.parametrize("impl", [_missing, lambda out: out.grad_fn._saved_result1.flip(-1)])
def test_pool_indices_are_none_when_unverified(fresh, monkeypatch, impl):
    monkeypatch.setattr(_ops, "_pool_indices_impl", impl)
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert _ops.pool_indices(F.max_pool2d(x, 2)) is None
    assert _ops.verify_all()["pool_indices"] is not None
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.MaxPool2d(2)).double()
    cap = fast.Capture(model)
    model(x)
    assert cap.outputs[model[1]].is_floating_point()  # the rule keeps the input and recomputes the argmax


# ---- every call site goes through the shim ----------------------------------------------------------------------


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    if name in ("gelu_backward", "silu_backward"):
        return nn.Sequential(
            nn.Linear(3, 4), nn.GELU() if name == "gelu_backward" else nn.SiLU(), nn.Linear(4, 2)
        ), torch.randn(5, 3)
    if name in ("layer_norm", "layer_norm_backward"):
        return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)), torch.randn(5, 3)
    if name == "softmax_backward":
        return nn.Sequential(nn.Linear(3, 4), CausalSelfAttention(4, 2), nn.Linear(4, 2)), torch.randn(5, 3, 3)
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(15, 2)
    ), torch.randn(5, 2, 5)


@pytest.mark.parametrize("name", RAISING)
def test_the_tangent_pass_raises_unverified(fresh, monkeypatch, name):
    torch.manual_seed(0)
    model, x = _model(name)
    model, x = model.double(), x.double()
    cap = fast.Capture(model, errors=True)
    y = torch.randn_like(model(x))
    F.mse_loss(model(x), y).backward()
    params = list(model.parameters())
    deltas = [1e-3 * torch.randn_like(p) for p in params]
    fast.measure(model, cap, F.mse_loss, y, params, deltas, exact=True)  # verified: runs
    F.mse_loss(model(x), y).backward()
    monkeypatch.setattr(_ops, f"_{name}_impl", _missing)
    monkeypatch.setattr(_ops, "_verdicts", {})
    with pytest.raises(_ops.Unverified, match=re.escape(_ops._CHECKS[name][0])):
        fast.measure(model, cap, F.mse_loss, y, params, deltas, exact=True)


def test_second_order_differentiates_weight_norm_as_its_composite_form():
    """Torch 2.13's double backward of torch._weight_norm is off; under _ops.second_order() it is not."""
    torch.manual_seed(0)
    g, v = torch.rand(4, 1, dtype=torch.float64) + 0.5, torch.randn(4, 3, dtype=torch.float64)
    x, d = torch.randn(5, 3, dtype=torch.float64), (torch.randn(4, 1, dtype=torch.float64), torch.randn_like(v))

    def loss(norm):
        return lambda g, v: torch.tanh(x @ norm(v, g, 0).T).square().sum()

    def composite(v, g, dim):  # w = g v / |v| (rows), written out
        return g * v / v.norm(dim=1, keepdim=True)

    want = torch.autograd.functional.vhp(loss(composite), (g, v), d)[1]
    with _ops.second_order():
        got = torch.autograd.functional.vhp(loss(torch._weight_norm), (g, v), d)[1]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---- torch internals the probe reads: where one is gone, the probe loses a proof, never a value ----------------


def _probed_record(model: nn.Module, **kw) -> object:
    """One probed Adam step of ``model`` on a fixed batch; return the record and the dense-Hessian reference."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    params = list(model.parameters())
    theta = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    opt = torch.optim.Adam(params, lr=1e-2)
    with alphalib.AlphaProbe(model, F.mse_loss, opt, **kw) as probe:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        rec = probe.step((x, y))
    delta = torch.cat([p.detach().reshape(-1) for p in params]) - theta
    names = [n for n, _ in model.named_parameters()]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        chunks = flat.split([p.numel() for p in params])
        values = {n: c.view_as(p) for n, c, p in zip(names, chunks, params, strict=True)}
        return F.mse_loss(functional_call(model, values, (x,)), y)

    hess = torch.autograd.functional.hessian(loss, theta)
    return rec, (delta @ hess @ delta).item() / rec.step_size**2


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def test_a_missing_version_counter_sends_every_step_to_the_generic_path(fresh, monkeypatch):
    monkeypatch.setattr(_ops, "_version_impl", _missing)
    assert math.isnan(_ops.version(torch.zeros(1)))
    rec, reference = _probed_record(_net())
    assert rec.path == "generic" and "changed in place" in rec.fallback
    assert rel_err(rec.curvature, reference) <= 1e-10


def test_missing_hook_tables_refuse_before_stepping(fresh, monkeypatch):
    monkeypatch.setattr(_ops, "_hook_tables_impl", _missing)
    model = _net()
    assert "is missing" in _trained.not_textbook(model) and "is missing" in _trained.gradient_modifiers(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"cannot measure on torch .* hook tables .* Nothing was stepped"):
        _probed_record(model)  # backward hooks it can neither see nor switch off could change the gradient
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_the_hook_tables_are_those_register_fills(fresh):
    model = _net()
    handle = model[1].register_full_backward_hook(lambda *args: None)
    assert "Tanh (1) has a backward hook" in _trained.gradient_modifiers(model)
    with _ops.backward_hooks_off(list(model.modules())):
        assert _trained.gradient_modifiers(model) is None
    assert len(_ops.backward_hooks(model[1])) == 1
    handle.remove()
    model[0].register_forward_pre_hook(lambda *args: None)
    assert "Linear (0) has a forward hook" in _trained.not_textbook(model)


def test_a_missing_parameter_slot_is_none(fresh, monkeypatch):
    model = _net()
    assert _ops.parameter_slot(model[0], "weight") is model[0].weight
    monkeypatch.setattr(_ops, "_slot_impl", _missing)
    monkeypatch.setattr(_ops, "_verdicts", {})
    assert _ops.parameter_slot(model[0], "weight") is None


def test_foreach_helpers_match_plain_loops_with_and_without_torchs_kernels(monkeypatch):
    torch.manual_seed(0)
    a, b = [torch.randn(3, 2), torch.randn(5)], [torch.randn(3, 2), torch.randn(5)]
    for kernels in (True, False):
        if not kernels:
            monkeypatch.setattr(_ops, "_foreach", lambda name: None)
        assert torch.allclose(_ops.norms(a), torch.tensor([x.norm().item() for x in a]))
        assert math.isclose(_ops.norm(a), torch.cat([x.reshape(-1) for x in a]).norm().item(), rel_tol=1e-6)
        assert all(torch.equal(x, y - z) for x, y, z in zip(_ops.sub(a, b), a, b, strict=True))
        assert all(torch.equal(x, y / 4) for x, y in zip(_ops.div(a, 4.0), a, strict=True))
        copies = [x.clone() for x in a]
        assert all(torch.equal(x, z - y) for x, y, z in zip(_ops.rsub_(copies, b), a, b, strict=True))


class _Functional(nn.Module):
    """A model the module rules miss (a functional activation): recorded operations would follow it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_without_the_dispatch_mode_the_probe_records_no_operations_and_stays_exact(monkeypatch):
    monkeypatch.setattr(_ops, "DISPATCH", False)
    torch.manual_seed(1)
    model = _Functional().double()
    assert fast.capture_for(model, exact=True) is None
    rec, reference = _probed_record(model)
    assert rec.flag == "ok" and rel_err(rec.curvature, reference) <= 1e-10
