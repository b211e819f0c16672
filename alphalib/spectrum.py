r"""The loss around the step beyond one batch: full-data and held-out :math:`\alpha^*`, and line profiles.

The probe's :math:`\alpha^*` is that of the mini-batch the step was computed on. Along the same direction
:math:`d`, the *full-data* loss :math:`L(\theta) = \sum_b \frac{n_b}{N} L_b(\theta)` (mean-reduced batch losses
:math:`L_b` of :math:`n_b` samples, :math:`N = \sum_b n_b`) has its own slope and curvature,

.. math::

    d^\top \nabla L = \sum_b \frac{n_b}{N}\, d^\top \nabla L_b, \qquad
    d^\top \nabla^2 L\, d = \sum_b \frac{n_b}{N}\, d^\top \nabla^2 L_b\, d, \qquad
    \alpha^*_{\mathrm{full}} = -\frac{d^\top \nabla L}{d^\top \nabla^2 L\, d},

computed one batch at a time (memory of one batch) with the same backends as the probe. A *held-out* batch
gives :math:`\alpha^*` of data the step never saw. :func:`line_profile` evaluates the true loss
:math:`L(\theta + \alpha d)` on a grid beside the quadratic model :math:`q(\alpha)` and says how far the model
can be trusted: the actual decrease at :math:`\alpha^*` over the predicted one,
:math:`\big(L(\theta) - L(\theta + \alpha^* d)\big) / \big(q(0) - q(\alpha^*)\big)`, where
:math:`q(0) - q(\alpha^*) = \tfrac12 (d^\top g)^2 / d^\top H d`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast, overload

import torch
from torch import Tensor, nn

from ._checks import Vector, check_vector, trainable
from ._function import BatchLoss, LossFn, Objective
from .curvature import Backend, Directional, directional
from .records import alpha


def batch_size(batch: object) -> int:
    """Return the number of samples in ``batch``: the leading size of its first tensor."""
    stack = [batch]
    while stack:
        item = stack.pop(0)
        if isinstance(item, Tensor):
            return int(item.shape[0]) if item.dim() else 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
    raise ValueError(f"cannot tell the number of samples of a {type(batch).__name__} batch: it holds no tensor.")


@overload
def as_batches(data: None) -> None: ...


@overload
def as_batches(data: object) -> Iterable[object]: ...


def as_batches(data: object) -> Iterable[object] | None:
    """Return data as batches: a list or loader of batches as it is, one batch (a tuple, a dict, or a list of
    tensors such as ``[x, y]``) as a list of one."""
    if (
        isinstance(data, (tuple, Mapping))
        or isinstance(data, list)
        and not all(isinstance(b, (tuple, list, Mapping)) for b in data)
    ):
        return [data]
    return cast("Iterable[object] | None", data)  # batches already (or None)


def along(
    model: nn.Module,
    loss: LossFn | Objective,
    batches: Iterable[object],
    v: Sequence[Tensor],
    *,
    curvature: Backend = "hessian",
    theta: Sequence[Tensor] | None = None,
) -> Directional:
    r"""Return loss, :math:`v^\top g` and :math:`v^\top H v` of the mean loss over ``batches``, one batch at a time.

    Each batch counts with its number of samples (the leading size of its first tensor), so a ``DataLoader``
    over a dataset gives the dataset's mean loss whatever its last batch's size. ``v`` is aligned with the
    trainable parameters; ``theta`` (default: the model's parameters) is where the loss is expanded. The model
    is evaluated in its current mode; put it in ``eval()`` for a deterministic full-data loss with dropout or
    BatchNorm.
    """
    params = [p.detach() for p in trainable(model)] if theta is None else list(theta)
    parts: list[tuple[int, Directional]] = []
    for batch in batches:
        fn = BatchLoss(model, loss, batch)
        parts.append((batch_size(batch), directional(fn, params, v, curvature)))
    if not parts:
        raise ValueError("batches is empty: give at least one batch (e.g. a DataLoader over the training set).")
    total = sum(n for n, _ in parts)
    mean = [sum(n * getattr(d, f) for n, d in parts) / total for f in ("loss", "slope", "curvature")]
    return Directional(*mean)


@dataclass(frozen=True)
class AlphaScope:
    r""":math:`\alpha^*` of one loss (a batch, the full data, a held-out set) along ``d``, in ``d``'s units.

    Attributes:
        alpha_star: :math:`-d^\top g / d^\top H d`, NaN when the curvature is zero or not finite.
        slope: :math:`d^\top g`.
        curvature: :math:`d^\top H d`.
        loss: The loss at the expansion point.
    """

    alpha_star: float
    slope: float
    curvature: float
    loss: float


def alpha_over(
    model: nn.Module,
    loss: LossFn | Objective,
    batches: Iterable[object],
    d: Vector,
    *,
    curvature: Backend = "hessian",
) -> AlphaScope:
    r"""Return :math:`\alpha^*` along ``d`` of the mean loss over ``batches`` (full data, or a held-out set).

    The slope and curvature are accumulated one batch at a time (memory of one batch), each batch weighted by its
    number of samples, at the model's current trainable parameters. The model is evaluated in its current mode;
    put it in ``eval()`` for a deterministic full-data loss with dropout or BatchNorm.

    Args:
        model: The network; the loss is expanded at its trainable parameters.
        loss: The mean-reduced ``loss_fn(model(inputs), targets)``, or an :class:`~alphalib.Objective` of the
            model and a batch.
        batches: The batches whose mean loss is measured (a list, a ``DataLoader``); each counts with the leading
            size of its first tensor.
        d: The direction: a tuple aligned with ``[p for p in model.parameters() if p.requires_grad]``, a dict
            keyed by their names, or a :class:`~alphalib.ParamVector`.
        curvature: The backend that estimates :math:`d^\top H d` (:data:`alphalib.BACKENDS`).

    Returns:
        :math:`\alpha^*` in units of ``d``, with the slope :math:`d^\top g`, the curvature :math:`d^\top H d` and
        the loss of the mean over ``batches``.

    Raises:
        ValueError: If ``d`` does not match the model's trainable parameters or ``batches`` is empty.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1).double()
        >>> data = [(torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64))] * 2
        >>> loss = torch.nn.functional.mse_loss
        >>> g = torch.autograd.grad(loss(model(data[0][0]), data[0][1]), list(model.parameters()))
        >>> alpha_over(model, loss, data, tuple(-gi for gi in g)).alpha_star > 0
        True
    """
    v = check_vector(d, model, name="d")
    res = along(model, loss, batches, v, curvature=curvature)
    return AlphaScope(alpha(res.slope, res.curvature), res.slope, res.curvature, res.loss)


@dataclass(frozen=True)
class LineProfile:
    r"""The true loss along ``d`` on a grid beside its quadratic model (see :func:`line_profile`).

    Attributes:
        alphas: The grid, in units of ``d``, sorted.
        loss: :math:`L(\theta + \alpha d)` at each point of the grid.
        quadratic: :math:`q(\alpha) = L(\theta) + \alpha d^\top g + \frac12 \alpha^2 d^\top H d` at each point.
        alpha_star: The model's minimiser (NaN if the curvature is not positive).
        trust: Actual over predicted decrease at ``alpha_star`` (1 for a quadratic loss; NaN if undefined).
        slope: :math:`d^\top g`.
        curvature: :math:`d^\top H d`.
    """

    alphas: list[float]
    loss: list[float]
    quadratic: list[float]
    alpha_star: float
    trust: float
    slope: float
    curvature: float

    def to_frame(self):
        """Return the profile as a DataFrame with columns ``alpha``, ``loss`` and ``quadratic``."""
        import pandas as pd

        return pd.DataFrame({"alpha": self.alphas, "loss": self.loss, "quadratic": self.quadratic})


@torch.no_grad()
def _losses(
    model: nn.Module,
    loss: LossFn | Objective,
    batches: list[object],
    theta: Sequence[Tensor],
    d: Sequence[Tensor],
    alphas: Sequence[float],
) -> list[float]:
    out = []
    for a in alphas:
        point = [p + a * di for p, di in zip(theta, d, strict=True)]
        total = sum(batch_size(b) * BatchLoss(model, loss, b)(point).item() for b in batches)
        out.append(total / sum(batch_size(b) for b in batches))
    return out


def line_profile(
    model: nn.Module,
    loss: LossFn | Objective,
    batches: object | Iterable[object],
    d: Vector,
    *,
    alphas: Sequence[float] | None = None,
    span: float = 1.0,
    curvature: Backend = "hessian",
) -> LineProfile:
    r"""Evaluate the loss along ``d`` on a grid and compare it with the quadratic model; measure the model's trust.

    The slope and curvature are taken at the model's trainable parameters :math:`\theta`, and the loss is
    evaluated at :math:`\theta + \alpha d` for every :math:`\alpha` of the grid, the model left as it was.
    ``alpha_star`` and 0 are always on the grid. ``trust`` is
    :math:`(L(\theta) - L(\theta + \alpha^* d)) / (\tfrac12 (d^\top g)^2 / d^\top H d)`: 1 when the loss is
    quadratic along ``d``, smaller when the model promises more than the loss gives.

    Args:
        model: The network; the loss is expanded at its trainable parameters.
        loss: The mean-reduced ``loss_fn(model(inputs), targets)``, or an :class:`~alphalib.Objective` of the
            model and a batch.
        batches: One batch, or a list of batches (their mean loss, each weighted by its number of samples).
        d: The direction: a tuple aligned with ``[p for p in model.parameters() if p.requires_grad]``, a dict
            keyed by their names, or a :class:`~alphalib.ParamVector`.
        alphas: The grid, in units of ``d``; by default 41 points over :math:`[-\alpha^*, 3\alpha^*]`.
        span: The default grid's unit when :math:`\alpha^*` is undefined: it spans ``[-span, 3 span]``.
        curvature: The backend that estimates :math:`d^\top H d` (:data:`alphalib.BACKENDS`).

    Returns:
        The loss and its quadratic model on the grid, with :math:`\alpha^*` (NaN unless the curvature is
        positive), ``trust``, the slope and the curvature.

    Raises:
        ValueError: If ``d`` does not match the model's trainable parameters.
    """
    v = check_vector(d, model, name="d")
    if isinstance(batches, list) and batches and all(isinstance(b, (tuple, list, dict)) for b in batches):
        chunks = list(batches)
    else:
        chunks = [batches]
    theta = [p.detach() for p in trainable(model)]
    res = along(model, loss, chunks, v, curvature=curvature)
    star = alpha(res.slope, res.curvature) if res.curvature > 0 else math.nan
    if alphas is None:
        unit = abs(star) if math.isfinite(star) and star != 0 else span
        alphas = torch.linspace(-unit, 3 * unit, 41).tolist()
    grid = sorted({float(a) for a in alphas} | {0.0} | ({star} if math.isfinite(star) else set()))
    values = _losses(model, loss, chunks, theta, v, grid)
    quad = [res.loss + a * res.slope + 0.5 * a * a * res.curvature for a in grid]
    trust = math.nan
    if math.isfinite(star):
        predicted = 0.5 * res.slope**2 / res.curvature
        actual = res.loss - values[grid.index(star)]
        trust = actual / predicted if predicted > 0 else math.nan
    return LineProfile(grid, values, quad, star, trust, res.slope, res.curvature)


def next_step_profiles(
    model: nn.Module,
    loss: LossFn | Objective,
    optimizer: torch.optim.Optimizer,
    batch: object,
    *,
    full_data: Iterable[object] | None = None,
    alphas: Sequence[float] | None = None,
    curvature: Backend = "hessian",
) -> dict[str, LineProfile]:
    r"""Profile the loss along the step ``optimizer`` would take next on ``batch``, leaving training untouched.

    The step is taken on copies of the model and the optimizer (so any optimizer works, and the model, its
    ``.grad``, the optimizer state and the global RNG stream are left as they were); its direction
    :math:`d = (\theta_{t+1} - \theta_t)/\mathrm{lr}` (first param group's lr) is profiled at :math:`\theta_t`
    with :func:`line_profile`. As for the probe, :math:`\alpha` is a learning rate: :math:`\alpha = \mathrm{lr}`
    is the step the optimizer takes, and ``alpha_star / lr`` is the ratio. Where :math:`\alpha^*` is undefined the
    grid spans :math:`[-\mathrm{lr}, 3\,\mathrm{lr}]`.

    Args:
        model: The network being trained.
        loss: The mean-reduced ``loss_fn(model(inputs), targets)``, or an :class:`~alphalib.Objective` of the
            model and a batch.
        optimizer: The model's optimizer; a copy of it takes the step, on a copy of the model.
        batch: The batch the next step is computed on and profiled on (scope ``"batch"``): a pair
            ``(inputs, targets)`` for a ``loss_fn``, anything an :class:`~alphalib.Objective` takes.
        full_data: Batches whose mean loss is profiled too (scope ``"full data"``), e.g. a ``DataLoader`` over the
            training set.
        alphas: The grid, in learning-rate units; by default 41 points over :math:`[-\alpha^*, 3\alpha^*]`.
        curvature: The backend that estimates :math:`d^\top H d` (:data:`alphalib.BACKENDS`).

    Returns:
        A :class:`LineProfile` per scope: ``"batch"`` and, with ``full_data``, ``"full data"``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1).double()
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> batch = (torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64))
        >>> prof = next_step_profiles(model, torch.nn.functional.mse_loss, opt, batch)["batch"]
        >>> round(prof.trust, 6)  # the loss of a linear model is quadratic along any line
        1.0
    """
    import copy

    twin, twin_opt = copy.deepcopy((model, optimizer))  # one memo: the optimizer copy steps the model copy
    params = trainable(twin)
    with torch.random.fork_rng(devices=[]):
        twin_opt.zero_grad()
        pair = cast("Sequence[Tensor]", batch)  # (inputs, targets), for a loss_fn
        value = loss(twin, batch) if isinstance(loss, Objective) else loss(twin(pair[0]), pair[1])
        value.backward()
        before = [p.detach().clone() for p in params]
        twin_opt.step()
    lr = float(twin_opt.param_groups[0]["lr"])
    with torch.no_grad():
        d = tuple((p - b) / lr for p, b in zip(params, before, strict=True))
        for p, b in zip(params, before, strict=True):
            p.copy_(b)
    scopes = {"batch": batch} | ({"full data": list(full_data)} if full_data is not None else {})
    return {
        name: line_profile(twin, loss, data, d, alphas=alphas, span=lr, curvature=curvature)
        for name, data in scopes.items()
    }
