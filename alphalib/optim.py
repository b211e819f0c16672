r"""How far a step went: the step size an optimizer used, and the two modes of Schedule-Free.

**An optimizer's own step size.** The learning-rate-free optimizers pick the length of their step:
:func:`step_size` reads the one a step used, so that a record can set it against :math:`\alpha^*` (records give
:math:`\alpha^*` in units of it):

* Prodigy and D-Adaptation: :math:`d_t\,\mathrm{lr}` (times Adam's bias correction where it is on), with the
  distance estimate :math:`d_t` the step starts from (the step updates it for the next one);
* DoG: :math:`\eta_t = \mathrm{lr}\,\bar r_t/\sqrt{\sum_{i\le t}\|g_i\|^2}`, which the step computes first
  (with multiple param groups, the first group's);
* Schedule-Free: its scheduled lr (the lr, after warm-up) of the :math:`z` step;
* every other optimizer: the first param group's ``lr``.

**Schedule-Free's two points.** It keeps a gradient point :math:`y_t` (train mode: what the parameters hold
while stepping), the fast iterate :math:`z_t` and their average :math:`x_t` (eval mode: the point it returns).
The probe measures at :math:`\theta_t = y_t`, where the gradient is computed, along :math:`\Delta = y_{t+1}-y_t`:
that is the step the loss sees. :func:`train_mode` and :func:`eval_mode` switch optimizers that have the two
modes and leave the others alone; :func:`alphalib.train` steps in train mode, validates in eval mode and ends in
eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, TypeGuard

import torch

__all__ = ["step_size", "train_mode", "eval_mode", "in_eval_mode"]


def step_size(optimizer: torch.optim.Optimizer) -> Callable[[], float]:
    r"""Return a function that, called after ``optimizer.step()``, gives the step size that step used.

    Call it before ``optimizer.step()``. See the module for what each optimizer's step size is. For Prodigy, whose
    distance estimate :math:`d` is updated inside the step, the step size is read before it; for DoG, whose
    :math:`\eta` the step computes first, after it.

    Args:
        optimizer: The optimizer about to step, or a wrapper that holds it as ``.optimizer`` (accelerate's, ...).

    Returns:
        A function of no arguments that returns the step size as a float: :math:`d_t\,\mathrm{lr}` for Prodigy
        and D-Adaptation, the :math:`\eta_t` the step set for DoG (the first group's; NaN where it set none),
        Schedule-Free's scheduled lr, else the first param group's ``lr``.
    """
    while isinstance(inner := getattr(optimizer, "optimizer", None), torch.optim.Optimizer):  # accelerate's wrapper
        optimizer = inner
    group = optimizer.param_groups[0]
    kind = type(optimizer).__name__
    if kind in ("Prodigy", "DAdaptAdam") and "d" in group:
        lr = max(g["lr"] for g in optimizer.param_groups)
        size = group["d"] * lr
        if group.get("use_bias_correction"):
            k, (beta1, beta2) = group["k"], group["betas"]
            size *= (1 - beta2 ** (k + 1)) ** 0.5 / (1 - beta1 ** (k + 1))
        return lambda: float(size)
    if kind == "DAdaptSGD" and "d" in group:
        size = group["d"] * group["lr"]
        return lambda: float(size)
    if "eta" in group or kind in ("DoG", "LDoG"):  # DoG: eta is set inside the step (LDoG: one per tensor)
        return lambda: float(group["eta"][0]) if "eta" in group else math.nan
    if "scheduled_lr" in group:  # Schedule-Free: the warmed-up lr of this step, set inside the step
        return lambda: float(group["scheduled_lr"])
    lr = float(group["lr"])
    return lambda: lr


class _TwoModes(Protocol):
    """An optimizer with a train and an eval point (Schedule-Free): what :func:`_modes` checks for."""

    param_groups: list[dict[str, Any]]

    def train(self) -> object: ...

    def eval(self) -> object: ...


def _modes(optimizer: object) -> TypeGuard[_TwoModes]:
    """Whether ``optimizer`` keeps a train and an eval point (Schedule-Free)."""
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        return False
    return "train_mode" in groups[0] and callable(getattr(optimizer, "eval", None))


def train_mode(optimizer: object) -> None:
    """Put an optimizer that has train and eval points (Schedule-Free) in train mode; leave others alone.

    Args:
        optimizer: Any optimizer.
    """
    if _modes(optimizer):
        optimizer.train()


def eval_mode(optimizer: object) -> None:
    """Put an optimizer that has train and eval points (Schedule-Free) in eval mode; leave others alone.

    Args:
        optimizer: Any optimizer.
    """
    if _modes(optimizer):
        optimizer.eval()


def in_eval_mode(optimizer: object) -> bool:
    """Return whether ``optimizer`` has train and eval points and is in eval mode (it cannot step then).

    Args:
        optimizer: Any optimizer.
    """
    return _modes(optimizer) and not optimizer.param_groups[0]["train_mode"]
