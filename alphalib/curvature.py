r"""Slope and curvature of the mini-batch loss along a direction, and the step that minimises its model.

For a direction :math:`d` at parameters :math:`\theta` on a mini-batch :math:`B`, with the *mean*-reduced
loss :math:`L_B(\theta) = \frac{1}{|B|}\sum_{i\in B} \ell(f(\theta, x_i), y_i)`, gradient :math:`g` and
Hessian :math:`H` of :math:`L_B`, the quadratic model along :math:`d` is

.. math::

    q(\alpha) = L_B(\theta) + \alpha\, d^\top g + \tfrac12 \alpha^2\, d^\top H d,
    \qquad \alpha^* = -\frac{d^\top g}{d^\top H d}.

The backends differ only in how they obtain :math:`d^\top H d` (the *curvature*); the slope
:math:`d^\top g` is always exact and comes from the same function:

``"hessian"``
    exact :math:`d^\top H d` by a Hessian-vector product (double backward). Cost: about two training steps.
``"ggn"``
    :math:`d^\top G d = (J d)^\top \nabla^2_f \ell\, (J d)`, the generalised Gauss-Newton matrix
    :math:`G = J^\top \nabla^2_f \ell\, J` at the model output :math:`f` (Jacobian
    :math:`J = \partial f/\partial\theta`).
    It drops the term :math:`\sum_k \partial_{f_k}\ell\, \nabla^2_\theta f_k`, so it equals the Hessian for
    models linear in :math:`\theta` (linear least squares) and is never negative for losses convex in
    :math:`f` (MSE, cross-entropy). Cost: about two training steps.
``"fd"``
    central differences of gradients,
    :math:`d^\top H d \approx d^\top[g(\theta+\epsilon d) - g(\theta-\epsilon d)]/(2\epsilon)`,
    with :math:`\epsilon\|d\| = u^{1/3}(1+\|\theta\|)` for unit roundoff :math:`u`. Error
    :math:`O(\epsilon^2)` from third derivatives plus :math:`O(u/\epsilon)` roundoff: about 1e-10 relative in
    float64; in float32 :math:`\epsilon` is large enough for ReLU kinks to dominate (measured median relative
    error 0.56 on a ReLU MLP on digits). Cost: three training steps.
``"fd_onesided"``
    forward differences, :math:`d^\top H d \approx d^\top[g(\theta+\epsilon d) - g(\theta)]/\epsilon` with
    :math:`\epsilon\|d\| = u^{1/2}(1+\|\theta\|)`; error :math:`O(\epsilon)` (measured median 6e-8 relative in
    float64 on a ReLU MLP on digits, but 1.2 in float32: use it in float64 only). With the probe's fast path
    :math:`g(\theta)` is the training gradient, so it costs one training step.
``"secant"``
    the parabola through :math:`L_B(\theta)`, :math:`d^\top g` and :math:`L_B(\theta + d)`:
    :math:`d^\top H d \approx 2\,[L_B(\theta+d) - L_B(\theta) - d^\top g]`, i.e. :math:`d^\top H(\xi) d` for some
    :math:`\xi` on the segment. Exact for quadratics; otherwise it is the curvature *averaged along the step*,
    off by third-order terms. It needs the real step length (``lr``), and suffers cancellation when the step
    changes the loss by less than ~1e3 roundoffs (float32). Cost: one training step plus one forward pass,
    or one forward pass when the probe reuses the training step's loss and gradient (its fast path).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import torch
from torch import Tensor, nn

from . import _ops
from ._checks import ParamVector, Vector, check_vector, trainable
from ._function import BatchLoss, LossFn, dot
from .records import alpha

Backend = Literal["hessian", "ggn", "fd", "fd_onesided", "secant"]
BACKENDS: tuple[str, ...] = get_args(Backend)


@dataclass(frozen=True)
class Directional:
    """Loss, slope :math:`v^\\top g` and curvature :math:`v^\\top H v` of :math:`L_B` along ``v``."""

    loss: float
    slope: float
    curvature: float
    grad_norm: float = math.nan  #: :math:`\|g\|`, where the backend computed the gradient


@dataclass(frozen=True)
class AlphaResult:
    """Result of :func:`alpha_star`: the minimiser of the quadratic model along ``d`` and its ingredients."""

    alpha_star: float  #: :math:`-d^\top g / d^\top H d` (NaN when the curvature is zero or not finite)
    slope: float  #: :math:`d^\top g`
    curvature: float  #: :math:`d^\top H d` as estimated by ``backend``
    loss: float  #: :math:`L_B(\theta)`
    backend: str  #: the curvature backend that estimated ``curvature`` (one of :data:`BACKENDS`)


def _leaves(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.detach().requires_grad_(True) for p in params]


def _grad(out: Tensor | Sequence[Tensor], inputs: Tensor | Sequence[Tensor], **kw: Any) -> tuple[Tensor, ...]:
    return torch.autograd.grad(out, inputs, allow_unused=True, materialize_grads=True, **kw)


@dataclass(frozen=True)
class Known:
    """What the training step already computed at ``theta``, for backends that can reuse it."""

    loss: float  #: :math:`L_B(\theta)`
    grad: Sequence[Tensor]  #: :math:`\nabla L_B(\theta)`, or ``scale`` times it (a scaled training loss)
    endpoint: Sequence[Tensor] | None = None  #: the parameters after the step, :math:`\theta + v`
    scale: float = 1.0  #: the constant the training loss was multiplied by
    grad_norm: float = math.nan  #: :math:`\|\nabla L_B(\theta)\|`


def _hessian(fn: BatchLoss, theta: Sequence[Tensor], v: Sequence[Tensor], known: Known | None = None) -> Directional:
    theta = _leaves(theta)
    loss = fn(theta)
    g = _grad(loss, theta, create_graph=True)
    slope = dot(g, v)
    hv = _grad(slope, theta) if slope.requires_grad else [torch.zeros_like(p) for p in theta]
    return _values(loss, slope, dot(hv, v), g)


def _values(loss: Tensor, slope: Tensor, curvature: Tensor, g: Sequence[Tensor]) -> Directional:
    """Return the scalars with one synchronisation."""
    norm = torch.linalg.vector_norm(_ops.norms([gi.detach() for gi in g]))
    values = torch.stack([t.detach().double() for t in (loss, slope, curvature, norm)]).tolist()
    return Directional(*values)


def _ggn(fn: BatchLoss, theta: Sequence[Tensor], v: Sequence[Tensor], known: Known | None = None) -> Directional:
    if not fn.has_outputs:
        raise ValueError(
            "the 'ggn' backend needs loss_fn(model(inputs), targets); an objective has no model "
            "output to split the loss at. Use curvature='hessian'."
        )
    theta = _leaves(theta)
    outs = fn.outputs(theta)
    loss = fn.loss_of(outs)
    jv = [_jvp(out, theta, v) for out in outs]
    g_out = _grad(loss, outs, create_graph=True)
    slope = dot(g_out, jv)
    h_jv = _grad(slope, outs) if slope.requires_grad else [torch.zeros_like(o) for o in outs]
    g = _grad(outs, theta, grad_outputs=[t.detach() for t in g_out])  # J^T ∇_f ℓ, for the gradient's norm
    return _values(loss, slope, dot(h_jv, jv), g)


def _jvp(out: Tensor, theta: Sequence[Tensor], v: Sequence[Tensor]) -> Tensor:
    r"""Return :math:`J v` by the double-vjp trick: :math:`J^\top u` is linear in u, its gradient along v is J v."""
    u = torch.zeros_like(out, requires_grad=True)
    jt_u = _grad(out, theta, grad_outputs=u, create_graph=True)
    pairs = [(t, vi) for t, vi in zip(jt_u, v, strict=True) if t.requires_grad]
    if not pairs:
        return torch.zeros_like(out)
    return _grad([t for t, _ in pairs], u, grad_outputs=[vi for _, vi in pairs])[0]


def _grad_at(fn: BatchLoss, theta: Sequence[Tensor]) -> tuple[Tensor, ...]:
    theta = _leaves(theta)
    return _grad(fn(theta), theta)


def _known(fn: BatchLoss, theta: Sequence[Tensor], v: Sequence[Tensor], known: Known | None) -> Directional:
    r"""Return loss, slope :math:`v^\top g` and :math:`\|g\|` at ``theta``: the training step's when given."""
    if known is not None:
        return Directional(known.loss, dot(known.grad, v).item() / known.scale, math.nan, known.grad_norm)
    leaves = _leaves(theta)
    loss = fn(leaves)
    g = _grad(loss, leaves)
    return _values(loss, dot(g, v), torch.zeros(()), g)


def _fd_step(theta: Sequence[Tensor], v_norm: float, order: int) -> float:
    """Return the step :math:`\\epsilon` along ``v``: :math:`\\epsilon\\|v\\| = u^{1/(order+1)}(1 + \\|\\theta\\|)`."""
    roundoff = torch.finfo(theta[0].dtype).eps
    return roundoff ** (1 / (order + 1)) * (1.0 + math.sqrt(dot(theta, theta).item())) / v_norm


def _differences(
    fn: BatchLoss, theta: Sequence[Tensor], v: Sequence[Tensor], known: Known | None = None, *, central: bool
) -> Directional:
    """Differences of gradients along ``v``: central at θ ± εv, or one-sided against the gradient at θ."""
    at = _known(fn, theta, v, known)
    v_norm = math.sqrt(dot(v, v).item())
    if v_norm == 0.0:
        return Directional(at.loss, 0.0, 0.0, at.grad_norm)
    eps = _fd_step(theta, v_norm, order=2 if central else 1)
    if not (math.isfinite(v_norm) and eps > 0):  # a step too large to difference along (an overflowing lr)
        return Directional(at.loss, at.slope, math.nan, at.grad_norm)
    g_plus = _grad_at(fn, [p + eps * vi for p, vi in zip(theta, v, strict=True)])
    if central:
        g_minus = _grad_at(fn, [p - eps * vi for p, vi in zip(theta, v, strict=True)])
        curvature = (dot(g_plus, v) - dot(g_minus, v)).item() / (2 * eps)
    else:
        curvature = (dot(g_plus, v).item() - at.slope) / eps
    return Directional(at.loss, at.slope, curvature, at.grad_norm)


def _secant(fn: BatchLoss, theta: Sequence[Tensor], v: Sequence[Tensor], known: Known | None = None) -> Directional:
    at = _known(fn, theta, v, known)
    with torch.no_grad():
        end = known.endpoint if known is not None else None
        loss_next = fn(end if end is not None else [p + vi for p, vi in zip(theta, v, strict=True)])
    return Directional(at.loss, at.slope, 2 * (loss_next.item() - at.loss - at.slope), at.grad_norm)


_BACKENDS: dict[str, Callable[..., Directional]] = {
    "hessian": _hessian,
    "ggn": _ggn,
    "fd": functools.partial(_differences, central=True),
    "fd_onesided": functools.partial(_differences, central=False),
    "secant": _secant,
}


def check_backend(curvature: str) -> Backend:
    """Return ``curvature`` if it names a backend, else raise a ``ValueError`` listing them."""
    if curvature not in _BACKENDS:
        raise ValueError(f"unknown curvature backend {curvature!r}; choose one of {', '.join(BACKENDS)}.")
    return cast(Backend, curvature)


def directional(
    fn: BatchLoss,
    theta: Sequence[Tensor],
    v: Sequence[Tensor],
    curvature: Backend = "hessian",
    known: Known | None = None,
) -> Directional:
    """Return loss, :math:`v^\\top g` and :math:`v^\\top H v` of ``fn`` at ``theta`` (``secant``: over ``theta + v``).

    ``known`` (loss and gradient at ``theta``, and the endpoint ``theta + v``) lets ``fd``, ``fd_onesided`` and
    ``secant`` skip recomputing them.
    """
    return _BACKENDS[check_backend(curvature)](fn, theta, v, known)


def hvp(model: nn.Module, loss_fn: LossFn, batch: object, v: Vector) -> ParamVector:
    """Return the Hessian-vector product :math:`H v` of the mean mini-batch loss at the model's parameters.

    The model, its buffers, its ``.grad`` fields and the global RNG are left as they were; a model with dropout is
    differentiated with one fixed mask.

    Args:
        model: The network; :math:`H` is taken with respect to its trainable parameters (those with
            ``requires_grad=True``) at their current values.
        loss_fn: The mean-reduced loss ``loss_fn(model(inputs), targets)``.
        batch: The pair ``(inputs, targets)``.
        v: A tuple aligned with ``[p for p in model.parameters() if p.requires_grad]``, a dict keyed by those
            parameters' names in ``model.named_parameters()``, or a :class:`~alphalib.ParamVector` (what
            :func:`alphalib.direction` and :func:`hvp` return), which is matched to the model's parameters by
            identity, in any order, with zeros for trainable parameters it lacks.

    Returns:
        :math:`H v`, a :class:`~alphalib.ParamVector` aligned with the model's trainable parameters.

    Raises:
        ValueError: If ``v`` does not match the model's trainable parameters (names, number, shapes), the model
            has no trainable parameter, ``batch`` is not a pair, or ``loss_fn`` does not return a real scalar.
    """
    params = trainable(model)
    v = check_vector(v, model)
    theta = _leaves(params)
    slope = dot(_grad(BatchLoss(model, loss_fn, batch)(theta), theta, create_graph=True), v)
    if not slope.requires_grad:
        return ParamVector((torch.zeros_like(p) for p in params), params)
    return ParamVector(_grad(slope, theta), params)


def alpha_star(
    model: nn.Module,
    loss_fn: LossFn,
    batch: object,
    d: Vector,
    *,
    curvature: Backend = "hessian",
    lr: float | None = None,
    rng: Tensor | None = None,
) -> AlphaResult:
    r"""Return :math:`\alpha^* = -d^\top g / d^\top H d` along ``d`` at the model's current parameters.

    For an optimizer's step at learning rate ``lr`` use :func:`alphalib.direction`, whose ``ParamVector`` makes
    the order of the optimizer's param groups irrelevant; then :math:`\alpha^*` is in learning-rate units and
    :math:`\alpha^*/\mathrm{lr} = 1` means the step lands on the model's minimum. The global RNG is left as it
    was.

    Args:
        model: The network; :math:`g` and :math:`H` are the gradient and Hessian of the mean mini-batch loss with
            respect to its trainable parameters, at their current values.
        loss_fn: The mean-reduced loss ``loss_fn(model(inputs), targets)``.
        batch: The pair ``(inputs, targets)``.
        d: The direction, as :func:`hvp` takes ``v``: a tuple aligned with
            ``[p for p in model.parameters() if p.requires_grad]``, a dict keyed by their names, or a
            :class:`~alphalib.ParamVector` matched by parameter identity.
        curvature: The backend that estimates :math:`d^\top H d` (see the module): ``"hessian"``, ``"ggn"``,
            ``"fd"``, ``"fd_onesided"`` or ``"secant"``.
        lr: The step's learning rate; needed by the ``"secant"`` backend only, which evaluates the loss at
            :math:`\theta + \mathrm{lr}\, d`.
        rng: The RNG state the model's random operations (dropout) draw from, e.g. that of the training forward
            pass (taken with ``torch.get_rng_state()`` just before it), so that the loss measured is the one that
            gave the gradient; by default one mask is drawn from the current state.

    Returns:
        :math:`\alpha^*` with its slope :math:`d^\top g`, curvature :math:`d^\top H d` and loss
        :math:`L_B(\theta)`; ``alpha_star`` is NaN when the curvature is zero or not finite.

    Raises:
        ValueError: If ``d`` does not match the model's trainable parameters, ``curvature`` names no backend,
            ``"secant"`` is asked for without ``lr``, ``lr`` is not positive, ``batch`` is not a pair, or
            ``loss_fn`` does not return a real scalar.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> loss = torch.nn.functional.mse_loss(model(x), y)
        >>> d = tuple(-g for g in torch.autograd.grad(loss, list(model.parameters())))
        >>> res = alpha_star(model, torch.nn.functional.mse_loss, (x, y), d)
        >>> res.alpha_star > 0
        True
    """
    params = trainable(model)
    d = check_vector(d, model, name="d")
    fn = BatchLoss(model, loss_fn, batch, rng)
    check_backend(curvature)
    if curvature == "secant" and lr is None:
        raise ValueError(
            "the 'secant' backend evaluates the loss at theta + lr * d: pass lr=<the step's learning rate>."
        )
    scale = 1.0 if lr is None else float(lr)
    if scale <= 0:
        raise ValueError(f"lr must be positive, got {lr}.")
    res = directional(fn, [p.detach() for p in params], [scale * di for di in d], curvature)
    slope, curv = res.slope / scale, res.curvature / scale**2
    return AlphaResult(alpha(slope, curv), slope, curv, res.loss, curvature)
