r"""The fast path: exact :math:`\Delta^\top H \Delta` from the training step's own activations and errors.

The probe keeps, from the training step, references to what the derivatives need (activations, the errors
:math:`\delta = \partial L/\partial(\cdot)` the backward computed, dropout draws); after ``optimizer.step()`` one
forward-mode sweep along the realized step :math:`\Delta` at :math:`\theta_t` gives the slope and the exact
curvature (:mod:`alphalib.fast.sweep`), with no second backward pass. Two ways to follow the model:

* **module rules** (:mod:`alphalib.fast.layers`), when every module of the model has one (``nn.Sequential``
  chains of the layers in :data:`LAYERS`, the package's models, and classes given a rule with :func:`register`);
* **recorded operations** (:mod:`alphalib.fast.ops`) for any other model: the ATen operations its training
  forward ran, whatever calls them (residual blocks, a module used twice, ``F.relu``, ``x + y``, in-place ops).

Module rules are tried first because they are cheaper when they apply: a few Python calls per layer instead of
per operation and nothing recorded during training (measured in ``make bench``; see the README's table). The
pieces, one concept a file: :mod:`~alphalib.fast.capture` (what the step leaves), :mod:`~alphalib.fast.layers`
and :mod:`~alphalib.fast.ops` (the rules), :mod:`~alphalib.fast.calculus` (closed forms both share),
:mod:`~alphalib.fast.sweep` (the engine) and :mod:`~alphalib.fast.output` (the loss at the model's output).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import _ops, _trained
from .._function import LossFn
from .calculus import inner, plus
from .capture import Capture, OpCapture
from .layers import LAYERS, Sweep, register, uncovered
from .ops import NoRule
from .sweep import module_pass, op_pass

Follow = Literal["modules", "ops"]


def covers(model: nn.Module, *example: Any) -> str | None:
    """Return ``None`` if the fast path follows ``model``, else a sentence naming what stops it and where.

    Without an example input only the module rules are checked (the operations a model runs are known once it
    runs); with one, where the module rules do not cover the model, ``model(*example)`` runs once on a copy of the
    model, recording its operations.

    Args:
        model: The network.
        *example: Inputs for ``model``, to check the operations its forward runs as well.

    Returns:
        ``None`` if the fast path follows ``model``, else why not.

    Example:
        >>> class Residual(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(3, 3)
        ...     def forward(self, x):
        ...         return x + torch.atan(self.fc(x))
        >>> print(covers(Residual()))  # doctest: +ELLIPSIS
        Residual has no rule (its forward: ...)
        >>> print(covers(Residual(), torch.randn(2, 3)))  # doctest: +ELLIPSIS
        the forward pass ran aten.atan.default, which has no tangent rule yet (at <doctest ...>, line 6)
        >>> covers(nn.Sequential(nn.Linear(3, 4), nn.ReLU())) is None
        True
    """
    why = uncovered(model)
    if why is None or not example or not _ops.DISPATCH:
        return why
    twin = copy.deepcopy(model)
    cap = OpCapture(twin, errors=False)
    with torch.enable_grad():
        twin(*example)
    cap.remove()
    return cap.uncovered


def capture_for(model: nn.Module, *, exact: bool, follow: Follow | None = None) -> Capture | OpCapture | None:
    """Return the capture for ``model``: module rules where they cover it and every module runs its textbook forward
    (no hooks, parametrizations or pruning; or ``follow="modules"``), else recorded operations (``None`` in a torch
    without the dispatch mode that records them: the probe then measures on the generic path)."""
    if follow == "modules" or follow is None and uncovered(model) is None and _trained.not_textbook(model) is None:
        return Capture(model, errors=exact)
    return OpCapture(model, errors=exact) if _ops.DISPATCH else None


def measure(
    model: nn.Module,
    cap: Capture | OpCapture,
    loss_fn: LossFn,
    targets: Tensor,
    params: Sequence[Tensor],
    delta: Sequence[Tensor],
    *,
    exact: bool,
    scale: float = 1.0,
) -> tuple[float, float, float]:
    r"""Return loss, :math:`\Delta^\top g` and :math:`\Delta^\top H\Delta` (GGN unless ``exact``) at θ_t.

    ``params`` hold :math:`\theta_{t+1}` and ``delta`` their steps; ``scale`` is the :math:`c` of the :math:`c\,\ell`
    the training step backpropagated. Raises :class:`NoRule` (or ``KeyError``, for a module that left not what its
    rule needs) when the captured step cannot be followed.
    """
    deltas = {id(p): d for p, d in zip(params, delta, strict=True)}
    if isinstance(cap, OpCapture):
        return op_pass(cap, loss_fn, targets, deltas, params, exact=exact, scale=scale)
    return module_pass(model, cap, loss_fn, targets, deltas, exact=exact, scale=scale)


__all__ = [
    # which models it follows
    "covers",
    "register",
    "LAYERS",
    # writing a module rule
    "Sweep",
    "plus",
    "inner",
    # the probe's entry points
    "capture_for",
    "measure",
    "Capture",
    "OpCapture",
    "NoRule",
]
