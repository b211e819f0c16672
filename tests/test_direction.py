"""Tests for :mod:`alphalib.direction`: the analytic direction must equal the realized step / lr."""

from __future__ import annotations

import copy
import inspect
import pickle
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from alphalib._checks import ParamVector
from alphalib.direction import direction

NSTEPS = 8
optim = torch.optim
F64 = torch.float64
Kwargs = dict[str, Any]

CASES: list[tuple[str, type[optim.Optimizer], Kwargs]] = [
    ("SGD-plain", optim.SGD, dict(lr=0.05)),
    ("SGD-momentum", optim.SGD, dict(lr=0.05, momentum=0.9)),
    ("SGD-nesterov", optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("SGD-dampening", optim.SGD, dict(lr=0.05, momentum=0.8, dampening=0.3)),
    ("SGD-weight_decay", optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.1)),
    ("SGD-maximize", optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.1, maximize=True)),
    ("Adam-default", optim.Adam, dict(lr=0.05)),
    ("Adam-amsgrad", optim.Adam, dict(lr=0.05, amsgrad=True)),
    ("Adam-weight_decay", optim.Adam, dict(lr=0.05, weight_decay=0.1)),
    ("Adam-maximize", optim.Adam, dict(lr=0.05, weight_decay=0.1, maximize=True)),
    ("Adam-decoupled", optim.Adam, dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True)),
    ("Adam-betas", optim.Adam, dict(lr=0.05, betas=(0.5, 0.7), eps=1e-3)),
    ("AdamW-default", optim.AdamW, dict(lr=0.05)),
    ("AdamW-amsgrad-maximize", optim.AdamW, dict(lr=0.05, weight_decay=0.2, amsgrad=True, maximize=True)),
    ("NAdam-default", optim.NAdam, dict(lr=0.05)),
    ("NAdam-weight_decay", optim.NAdam, dict(lr=0.05, weight_decay=0.1, momentum_decay=0.1)),
    ("NAdam-decoupled", optim.NAdam, dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True)),
    ("NAdam-maximize", optim.NAdam, dict(lr=0.05, maximize=True)),
    ("RAdam-default", optim.RAdam, dict(lr=0.05)),
    ("RAdam-weight_decay", optim.RAdam, dict(lr=0.05, weight_decay=0.1, betas=(0.8, 0.9))),
    ("RAdam-decoupled", optim.RAdam, dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RAdam-maximize", optim.RAdam, dict(lr=0.05, maximize=True)),
    ("RMSprop-plain", optim.RMSprop, dict(lr=0.01)),
    ("RMSprop-centered", optim.RMSprop, dict(lr=0.01, alpha=0.9, centered=True)),
    ("RMSprop-momentum", optim.RMSprop, dict(lr=0.01, momentum=0.9)),
    ("RMSprop-weight_decay", optim.RMSprop, dict(lr=0.01, weight_decay=0.1, centered=True, momentum=0.5)),
    ("RMSprop-maximize", optim.RMSprop, dict(lr=0.01, maximize=True)),
    ("Adagrad-default", optim.Adagrad, dict(lr=0.05)),
    ("Adagrad-lr_decay", optim.Adagrad, dict(lr=0.05, lr_decay=0.1, initial_accumulator_value=0.3)),
    ("Adagrad-weight_decay", optim.Adagrad, dict(lr=0.05, weight_decay=0.1, maximize=True)),
    ("Adamax-default", optim.Adamax, dict(lr=0.05)),
    ("Adamax-weight_decay", optim.Adamax, dict(lr=0.05, weight_decay=0.1, betas=(0.8, 0.9))),
    ("Adamax-maximize", optim.Adamax, dict(lr=0.05, maximize=True)),
]


def _cases(cases: list[tuple[str, type[optim.Optimizer], Kwargs]]) -> list[Any]:
    """The cases as pytest params, skipped where this torch's optimizer lacks an option (Adam's
    ``decoupled_weight_decay`` is newer than torch 2.5)."""

    def missing(cls: type[optim.Optimizer], kwargs: Kwargs) -> list[str]:
        return sorted(set(kwargs) - set(inspect.signature(cls.__init__).parameters))

    return [
        pytest.param(
            cls,
            kwargs,
            id=name,
            marks=pytest.mark.skipif(
                bool(missing(cls, kwargs)),
                reason=f"{cls.__name__} of torch {torch.__version__} has no {missing(cls, kwargs)}",
            ),
        )
        for name, cls, kwargs in cases
    ]


FUSED = [
    ("SGD-fused", optim.SGD, dict(lr=0.05, momentum=0.9, fused=True)),
    ("Adam-fused", optim.Adam, dict(lr=0.05, amsgrad=True, weight_decay=0.1, fused=True)),
    ("AdamW-fused", optim.AdamW, dict(lr=0.05, fused=True)),
    ("Adagrad-fused", optim.Adagrad, dict(lr=0.05, lr_decay=0.1, fused=True)),
]


def _setup(seed: int = 0) -> tuple[nn.Module, nn.Parameter, list[nn.Parameter], Tensor, Tensor]:
    """Small float64 model, an unused parameter (grad stays None) in the middle, and data."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    unused = nn.Parameter(torch.randn(5, dtype=F64))
    params = [*model[0].parameters(), unused, *model[2].parameters()]
    return model, unused, params, torch.randn(16, 4, dtype=F64), torch.randn(16, 2, dtype=F64)


def _backward(opt: optim.Optimizer, model: nn.Module, x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()


def _flat(opt: optim.Optimizer) -> list[tuple[Tensor, float]]:
    return [(p, float(g["lr"])) for g in opt.param_groups for p in g["params"]]


def _assert_step_matches(opt: optim.Optimizer, model: nn.Module, x: Tensor, y: Tensor) -> None:
    """Run NSTEPS steps, checking direction(opt) against the realized step each time."""
    for step in range(NSTEPS):
        _backward(opt, model, x, y)
        d = direction(opt)
        flat = _flat(opt)
        assert len(d) == len(flat)
        old = [p.detach().clone() for p, _ in flat]
        opt.step()
        for i, ((p, lr), before, di) in enumerate(zip(flat, old, d, strict=True)):
            realized = (p.detach() - before) / lr
            assert di.shape == p.shape and di.dtype == p.dtype
            err = (di - realized).abs().max().item()
            msg = f"step {step}, param {i}: max abs err {err:.3e}"
            assert torch.allclose(di, realized, rtol=1e-12, atol=1e-14), msg


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize(("cls", "kwargs"), _cases(CASES))
def test_direction_matches_realized_step(cls: type[optim.Optimizer], kwargs: Kwargs, foreach: bool) -> None:
    model, unused, params, x, y = _setup()
    opt = cls(params, foreach=foreach, **kwargs)
    _assert_step_matches(opt, model, x, y)


@pytest.mark.parametrize(("cls", "kwargs"), _cases(CASES))
def test_direction_default_implementation(cls: type[optim.Optimizer], kwargs: Kwargs) -> None:
    model, _, params, x, y = _setup(seed=1)
    _assert_step_matches(cls(params, **kwargs), model, x, y)


@pytest.mark.parametrize(("cls", "kwargs"), [c[1:] for c in FUSED], ids=[c[0] for c in FUSED])
def test_direction_matches_fused(cls: type[optim.Optimizer], kwargs: Kwargs) -> None:
    model, _, params, x, y = _setup(seed=2)
    _assert_step_matches(cls(params, **kwargs), model, x, y)


@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.AdamW], ids=lambda c: c.__name__)
def test_tensor_lr(cls: type[optim.Optimizer]) -> None:
    model, _, params, x, y = _setup()
    opt = cls(params, lr=torch.tensor(0.05, dtype=F64), foreach=False)
    _assert_step_matches(opt, model, x, y)


def test_radam_cases_exercise_both_rectification_branches() -> None:
    for name, cls, kwargs in CASES:
        if cls is optim.RAdam:
            beta2 = kwargs.get("betas", (0.9, 0.999))[1]
            rho_inf = 2 / (1 - beta2) - 1
            rho = [rho_inf - 2 * t * beta2**t / (1 - beta2**t) for t in range(1, NSTEPS + 1)]
            assert min(rho) <= 5 < max(rho), name


@pytest.mark.parametrize(
    "cls", [optim.SGD, optim.Adam, optim.NAdam, optim.RMSprop, optim.Adagrad], ids=lambda c: c.__name__
)
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_two_param_groups_use_their_own_lr(cls: type[optim.Optimizer], foreach: bool) -> None:
    model, _, params, x, y = _setup()
    kw = dict(momentum=0.9) if cls in (optim.SGD, optim.RMSprop) else {}
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.003}]
    opt = cls(groups, lr=0.05, foreach=foreach, **kw)
    _assert_step_matches(opt, model, x, y)


def _assert_same(a: Any, b: Any) -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            _assert_same(u, v)
    else:
        assert a == b


@pytest.mark.parametrize(("cls", "kwargs"), _cases(CASES))
def test_direction_does_not_mutate_state(cls: type[optim.Optimizer], kwargs: Kwargs) -> None:
    model, _, params, x, y = _setup()
    opt = cls(params, **kwargs)
    for _ in range(3):
        _backward(opt, model, x, y)
        before = copy.deepcopy(opt.state_dict())
        grads = [p.grad.clone() if p.grad is not None else None for p in params]
        direction(opt)
        _assert_same(opt.state_dict(), before)
        for p, g in zip(params, grads, strict=True):
            assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g))
        opt.step()


def test_direction_does_not_alias_grad() -> None:
    model, _, params, x, y = _setup()
    opt = optim.SGD(params, lr=0.05)
    _backward(opt, model, x, y)
    d = direction(opt)
    expected = [-p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(a, b) for a, b in zip(d, expected, strict=True))


@pytest.mark.parametrize("cls", [optim.SGD, optim.AdamW, optim.Adagrad], ids=lambda c: c.__name__)
def test_param_without_grad_gets_zero_direction(cls: type[optim.Optimizer]) -> None:
    model, unused, params, x, y = _setup()
    opt = cls(params, lr=0.05, weight_decay=0.1)
    start = unused.detach().clone()
    for _ in range(3):
        _backward(opt, model, x, y)
        assert unused.grad is None
        d = direction(opt)
        assert torch.equal(d[2], torch.zeros_like(unused))
        opt.step()
        assert torch.equal(unused.detach(), start)


class _MyAdam(optim.Adam):
    pass


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: optim.LBFGS(ps),
        lambda ps: optim.Rprop(ps),
        lambda ps: optim.Adadelta(ps),
        lambda ps: _MyAdam(ps),
    ],
    ids=["LBFGS", "Rprop", "Adadelta", "Adam-subclass"],
)
def test_unsupported_optimizer_raises_type_error(make: Any) -> None:
    model, _, params, x, y = _setup()
    opt = make(params)
    _backward(opt, model, x, y)
    with pytest.raises(TypeError, match=type(opt).__name__) as info:
        direction(opt)
    assert "AlphaProbe.step" in str(info.value) and "Adam" in str(info.value)


def test_zero_lr_raises_value_error() -> None:
    model, _, params, x, y = _setup()
    opt = optim.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.0}], lr=0.05)
    _backward(opt, model, x, y)
    with pytest.raises(ValueError, match="lr"):
        direction(opt)


def test_sparse_grad_raises_value_error() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3, sparse=True).double()
    opt = optim.SGD(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        direction(opt)


def test_complex_param_raises_value_error() -> None:
    p = nn.Parameter(torch.randn(3, dtype=torch.complex128))
    opt = optim.Adam([p], lr=0.1)
    (p.abs() ** 2).sum().backward()
    with pytest.raises(ValueError, match="complex"):
        direction(opt)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_adagrad_param_group_added_later(foreach: bool) -> None:
    def adagrad(params: list[nn.Parameter]) -> optim.Optimizer:
        opt = optim.Adagrad(params[:2], lr=0.05, initial_accumulator_value=0.3, foreach=foreach)
        opt.add_param_group({"params": params[2:], "initial_accumulator_value": 0.7})
        return opt

    trial, _, params, x, y = _setup()
    opt = adagrad(params)
    _backward(opt, trial, x, y)
    try:  # older torch's own Adagrad (2.5, 2.8) cannot step such a group (KeyError 'sum'): no step to match
        opt.step()
    except KeyError as e:
        pytest.skip(f"torch {torch.__version__}'s Adagrad cannot step a param group added later ({e!r})")
    model, _, params, x, y = _setup()
    _assert_step_matches(adagrad(params), model, x, y)


def test_direction_carries_the_optimizer_params_in_its_order() -> None:
    model, _, params, x, y = _setup()
    opt = optim.Adam([{"params": params[3:]}, {"params": params[:3]}], lr=0.05)
    _backward(opt, model, x, y)
    d = direction(opt)
    assert isinstance(d, ParamVector) and len(d.params) == len(d) == len(params)
    assert all(a is b for a, b in zip(d.params, [*params[3:], *params[:3]], strict=True))
    for copied in (pickle.loads(pickle.dumps(d)), copy.deepcopy(d)):
        assert isinstance(copied, ParamVector) and len(copied.params) == len(d)
        assert all(torch.equal(a, b) for a, b in zip(copied, d, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(copied.params, d.params, strict=True))
