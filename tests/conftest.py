"""Seeded float64 toy problems and the dense references every test compares against."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from alphalib import fast


@dataclass
class Case:
    model: nn.Module
    loss_fn: object
    batch: tuple[Tensor, Tensor]


def _mlp_mse() -> Case:
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    return Case(model, F.mse_loss, (torch.randn(8, 4), torch.randn(8, 2)))


def _mlp_ce() -> Case:
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3))
    return Case(model, F.cross_entropy, (torch.randn(8, 4), torch.randint(0, 3, (8,))))


def _cnn() -> Case:
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 3))
    return Case(model, F.cross_entropy, (torch.randn(6, 1, 4, 4), torch.randint(0, 3, (6,))))


def _batchnorm() -> Case:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1))
    return Case(model, F.mse_loss, (torch.randn(8, 4), torch.randn(8, 1)))


def _transformer() -> Case:
    from alphalib.lab.models import CharTransformer, sequence_cross_entropy

    model = CharTransformer(5, d_model=4, n_heads=2, n_layers=1, block=4)
    return Case(model, sequence_cross_entropy, (torch.randint(0, 5, (3, 4)), torch.randint(0, 5, (3, 4))))


class Residual(nn.Module):
    """``x + fc2(tanh(fc1(x)))``: ``fc1``'s input also feeds the residual connection."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


@fast.register(Residual)
def _residual_tangent(sweep, m, t):
    return fast.plus(t, sweep(m.fc2, sweep(m.act, sweep(m.fc1, t))))


def residual_net() -> nn.Module:
    """Two residual blocks with a registered fast-path rule between two linear layers."""
    return nn.Sequential(nn.Linear(3, 4), Residual(4), Residual(4), nn.Linear(4, 2))


CASES = {
    "mlp-mse": _mlp_mse,
    "mlp-ce": _mlp_ce,
    "cnn": _cnn,
    "batchnorm-train": _batchnorm,
    "transformer": _transformer,
}


def make_case(name: str) -> Case:
    """Return the toy problem ``name`` in float64, seeded, model in train mode."""
    torch.manual_seed(0)
    c = CASES[name]()
    c.model.double().train()
    c.batch = tuple(t.double() if t.is_floating_point() else t for t in c.batch)
    return c


@pytest.fixture(params=list(CASES))
def case(request) -> Case:
    """Each toy problem in float64, seeded, model in train mode."""
    return make_case(request.param)


def flat_loss(case: Case, params: list[Tensor] | None = None):
    """Return ``L_B`` as a function of one flat float64 vector, built by hand with functional_call."""
    named = [(n, p) for n, p in case.model.named_parameters()]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    buffers = {n: b.clone() for n, b in case.model.named_buffers()}

    def f(theta: Tensor) -> Tensor:
        pieces = [t.view(s) for t, s in zip(theta.split(sizes), shapes, strict=True)]
        state = {**{n: b.clone() for n, b in buffers.items()}, **dict(zip([n for n, _ in named], pieces, strict=True))}
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
            return case.loss_fn(functional_call(case.model, state, (case.batch[0],)), case.batch[1])

    theta0 = torch.cat([p.detach().reshape(-1) for p in (params or [p for _, p in named])])
    return f, theta0


def dense_hessian(case: Case, params: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Return the dense gradient and Hessian of ``L_B`` at ``params`` (default: the model's)."""
    f, theta0 = flat_loss(case, params)
    theta = theta0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(theta), theta)
    return g, torch.autograd.functional.hessian(f, theta0)


def flat(v) -> Tensor:
    return torch.cat([t.reshape(-1) for t in v])


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
