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


def as_batches(data: object | None) -> Iterable[object] | None:
    """Return data as batches: a list or loader of batches as it is, one batch (a tuple, a dict, or a list of
    tensors such as ``[x, y]``) as a list of one."""
    if (
        isinstance(data, (tuple, Mapping))
        or isinstance(data, list)
        and not all(isinstance(b, (tuple, list, Mapping)) for b in data)
    ):
        return [data]
    return data


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
    """:math:`\\alpha^*` of one loss (a batch, the full data, a held-out set) along ``d``, in ``d``'s units."""

    alpha_star: float  #: :math:`-d^\top g / d^\top H d`, NaN when the curvature is zero or not finite
    slope: float  #: :math:`d^\top g`
    curvature: float  #: :math:`d^\top H d`
    loss: float  #: the loss at the expansion point


def alpha_over(
    model: nn.Module,
    loss: LossFn | Objective,
    batches: Iterable[object],
    d: Vector,
    *,
    curvature: Backend = "hessian",
) -> AlphaScope:
    r"""Return :math:`\alpha^*` along ``d`` of the mean loss over ``batches`` (full data, or a held-out set).

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
    """The true loss along ``d`` on a grid beside its quadratic model (see :func:`line_profile`)."""

    alphas: list[float]  #: the grid, in units of ``d``
    loss: list[float]  #: :math:`L(\theta + \alpha d)`
    quadratic: list[float]  #: :math:`q(\alpha) = L(\theta) + \alpha d^\top g + \frac12 \alpha^2 d^\top H d`
    alpha_star: float  #: the model's minimiser (NaN if the curvature is not positive)
    trust: float  #: actual over predicted decrease at ``alpha_star`` (1 for a quadratic loss; NaN if undefined)
    slope: float  #: :math:`d^\top g`
    curvature: float  #: :math:`d^\top H d`

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

    ``batches`` is one batch or a list of batches (their mean loss). The grid defaults to 41 points over
    :math:`[-\alpha^*, 3\alpha^*]` (over ``[-span, 3 span]`` when :math:`\alpha^*` is undefined);
    ``alpha_star`` and 0 are always on it. ``trust`` is
    :math:`(L(\theta) - L(\theta + \alpha^* d)) / (\tfrac12 (d^\top g)^2 / d^\top H d)`: 1 when the loss is
    quadratic along ``d``, smaller when the model promises more than the loss gives.
    """
    v = check_vector(d, model, name="d")
    many = isinstance(batches, list) and batches and all(isinstance(b, (tuple, list, dict)) for b in batches)
    chunks = list(batches) if many else [batches]
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
    on ``batch`` (scope ``"batch"``) and, if given, on the mean loss over ``full_data`` (``"full data"``). As
    for the probe, :math:`\alpha` is a learning rate: :math:`\alpha = \mathrm{lr}` is the step the optimizer
    takes, and ``alpha_star / lr`` is the ratio. Where :math:`\alpha^*` is undefined the grid spans
    :math:`[-\mathrm{lr}, 3\,\mathrm{lr}]`.

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
        value = loss(twin, batch) if isinstance(loss, Objective) else loss(twin(batch[0]), batch[1])
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
