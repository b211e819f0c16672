r"""What a probed step measures once the router chose the path: the tangent sweep, a backend, and the extras.

Each function returns slope and curvature along the realized step :math:`\Delta` at :math:`\theta_t`; the ones
called after the optimizer stepped never raise for a failure of their own: they append the reason to
``fallback`` and leave the value out.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import _ops, fast
from .._checks import check_loss, trainable
from .._function import BatchLoss, LossFn, Objective, replay_rng
from ..curvature import Backend, Directional, Known, directional
from ..fast import Capture, OpCapture
from ..sharpness import preconditioner, top_eigenvalue
from ..spectrum import along
from .evidence import Verdict


def sweep(
    model: nn.Module,
    capture: Capture | OpCapture,
    loss: LossFn,
    targets: Any,
    params: list[Tensor],
    delta: list[Tensor],
    verdict: Verdict,
    *,
    exact: bool,
) -> Directional:
    """Return the exact (or GGN) slope and curvature from the captured training step, by the tangent sweep."""
    value, slope, curvature = fast.measure(
        model, capture, loss, targets, params, delta, exact=exact, scale=verdict.scale
    )
    return Directional(value, slope, curvature, math.nan if verdict.grad_norm is None else verdict.grad_norm)


def backend(
    fn: BatchLoss,
    curvature: Backend,
    theta: list[Tensor],
    delta: list[Tensor],
    *,
    verdict: Verdict | None = None,
    loss: LossFn | Objective | None = None,
    batch: Any = None,
    endpoint: list[Tensor] | None = None,
    precise: bool = False,
) -> Directional:
    """Return loss, slope and curvature of ``fn`` along the step from the backend ``curvature``.

    ``endpoint`` (θ_{t+1}), given when the loss and gradient at θ_t may be taken from the training step (the fast
    path of ``fd``, ``secant``; with the ``verdict``, ``loss`` and ``(inputs, targets)`` they come from). ``precise``:
    parameters below float64 are measured in float64 (for the backends that take differences, which are mostly
    rounding there, for a step below their resolution and for a loss near zero).
    """
    if precise and theta[0].dtype != torch.float64:
        wide = copy.copy(fn)
        wide.dtype = torch.float64
        return directional(wide, [t.double() for t in theta], [d.double() for d in delta], curvature)
    if endpoint is None:
        return directional(fn, theta, delta, curvature)
    # an endpoint comes with the fast verdict of a loss_fn's training step (the router's reuse), which holds the
    # training forward's output and gradient
    assert verdict is not None and verdict.output is not None and verdict.grad is not None
    assert loss is not None and not isinstance(loss, Objective)
    with replay_rng(verdict.rngs_after[0], theta[0].device):
        value = check_loss(loss(verdict.output, batch[1])).item()
    known = Known(
        value,
        verdict.grad,
        endpoint=endpoint,
        scale=verdict.scale,
        grad_norm=math.nan if verdict.grad_norm is None else verdict.grad_norm,
    )
    return directional(fn, theta, delta, curvature, known=known)


def scopes(
    model: nn.Module,
    loss: LossFn | Objective,
    data: Mapping[str, Iterable[object]],
    curvature: Backend,
    current: list[Tensor],
    delta: list[Tensor],
    fallback: list[str],
) -> dict[str, Directional]:
    """Slope and curvature along the same step of the full-data and held-out losses (generic path, at θ_t)."""
    theta, out = _ops.sub(current, delta), {}
    for name, batches in data.items():
        try:
            with torch.autocast(current[0].device.type, enabled=False):
                out[name] = along(model, loss, batches, delta, curvature=curvature, theta=theta)
        except Exception as exc:  # the step is taken: record, never raise
            fallback.append(f"{name}: {type(exc).__name__}: {exc}")
    return out


def sharpness(
    model: nn.Module,
    loss: LossFn | Objective,
    optimizer: torch.optim.Optimizer,
    fn: BatchLoss,
    current: list[Tensor],
    delta: list[Tensor],
    fallback: list[str],
) -> dict[str, float]:
    """The largest eigenvalue at θ_t of the Hessian of ``fn`` (the measured loss: the step's batches, their weights
    and random draws), and Adam's preconditioned sharpness (after its step)."""
    theta, out = _ops.sub(current, delta), {}
    try:
        with torch.autocast(current[0].device.type, enabled=False):
            out["lambda_max"] = top_eigenvalue(model, loss, fn, theta=theta, which="max").lambda_max
            if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
                preconditioner(optimizer, trainable(model))  # raises before Lanczos if it cannot
                out["precond_lambda_max"] = top_eigenvalue(
                    model, loss, fn, theta=theta, optimizer=optimizer, which="max"
                ).lambda_max
    except Exception as exc:  # the step is taken: record, never raise
        fallback.append(f"sharpness: {type(exc).__name__}: {exc}")
    return out
