r"""Optimizers by name: ``torch.optim``'s, the learning-rate-free ones, and the α*-scaled wrapper.

:func:`make_optimizer` is the one place a name becomes an optimizer; :func:`alphalib.run`, the notebooks and
sweep grids go through it, so a grid can name any of these:

==========================  ====================================================================================
name                        optimizer
==========================  ====================================================================================
``"adam"``, ``"sgd"``, …    the ``torch.optim`` class of that name, any case (``"Adam"``, ``"adamw"``, …)
``"prodigy"``               ``prodigyopt.Prodigy`` (Mishchenko & Defazio 2024)
``"dadapt_adam"``           ``dadaptation.DAdaptAdam`` (Defazio & Mishchenko 2023); ``"dadapt_sgd"`` too
``"dog"``                   ``dog.DoG`` from ``dog-optimizer`` (Ivgi et al. 2023); ``"ldog"``: layer-wise
``"schedulefree_adamw"``    ``schedulefree.AdamWScheduleFree`` (Defazio et al. 2024); ``"schedulefree_sgd"`` too
``"alpha_scaled"``          :class:`alphalib.AlphaScaled` around the ``base`` optimizer (``"adam"`` by default)
==========================  ====================================================================================

The learning-rate-free packages are the ones on the package index, an optional extra: ``pip install
"alphalib[lrfree]"`` (with torch held at its pin: ``-c constraints.txt``).

**Their own step size.** Each of these picks the length of its step: :func:`step_size` reads the one a step used,
so that a record can set it against :math:`\alpha^*` (records give :math:`\alpha^*` in units of it):

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

import importlib
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ._function import LossFn

__all__ = ["OPTIMIZERS", "make_optimizer", "step_size", "train_mode", "eval_mode"]

#: the names :func:`make_optimizer` builds beside ``torch.optim``'s classes: (module, class, pip package)
LR_FREE: dict[str, tuple[str, str, str]] = {
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "dadapt_adam": ("dadaptation", "DAdaptAdam", "dadaptation"),
    "dadapt_sgd": ("dadaptation", "DAdaptSGD", "dadaptation"),
    "dog": ("dog", "DoG", "dog-optimizer"),
    "ldog": ("dog", "LDoG", "dog-optimizer"),
    "schedulefree_adamw": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "schedulefree_sgd": ("schedulefree", "SGDScheduleFree", "schedulefree"),
}
_TORCH = {
    name.lower(): cls
    for name, cls in vars(torch.optim).items()
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
}
#: every name :func:`make_optimizer` knows
OPTIMIZERS: tuple[str, ...] = (*sorted(_TORCH), *LR_FREE, "alpha_scaled")


def _class(name: str) -> type[torch.optim.Optimizer]:
    """Return the optimizer class a name stands for; a clear error for unknown names and missing packages."""
    key = name.lower()
    if key in _TORCH:
        return _TORCH[key]
    if key not in LR_FREE:
        raise ValueError(
            f"unknown optimizer {name!r}: give one of {', '.join(OPTIMIZERS)} (torch.optim's names in any case)."
        )
    module, cls, package = LR_FREE[key]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise ImportError(
            f"optimizer {name!r} needs the package {package!r}: install the extra with "
            f'pip install -c constraints.txt "alphalib[lrfree]"  (or: pip install {package} with '
            "torch held at its pin)."
        ) from exc


def make_optimizer(
    name: str,
    params: Iterable,
    *,
    lr: float | None = None,
    model: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    **kwargs: Any,
) -> Any:
    """Build the optimizer ``name`` over ``params`` with ``lr`` (``None``: the optimizer's own default) and ``kwargs``.

    ``"alpha_scaled"`` returns :class:`alphalib.AlphaScaled` around ``base`` (a name, ``"adam"`` by default) built
    with ``lr`` and the keywords :class:`~alphalib.AlphaScaled` does not take; it needs ``model`` and ``loss_fn``.

        >>> import torch
        >>> net = torch.nn.Linear(3, 1)
        >>> type(make_optimizer("adamw", net.parameters(), lr=1e-3, weight_decay=0.1)).__name__
        'AdamW'
        >>> scaled = make_optimizer("alpha_scaled", net.parameters(), model=net,
        ...                         loss_fn=torch.nn.functional.mse_loss, base="sgd", momentum=0.9, kappa=0.5)
        >>> type(scaled.optimizer).__name__, scaled.kappa
        ('SGD', 0.5)
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, one of {', '.join(OPTIMIZERS)}; got {type(name).__name__}.")
    if name.lower() == "alpha_scaled":
        from .scaled import AlphaScaled

        if model is None or loss_fn is None:
            raise ValueError("'alpha_scaled' measures alpha* on the model's loss: pass model= and loss_fn=.")
        own = set(inspect.signature(AlphaScaled).parameters) - {"optimizer", "model", "loss_fn"}
        base = kwargs.pop("base", "adam")
        if base.lower() == "alpha_scaled":
            raise ValueError("base must be an optimizer alphalib.direction knows, e.g. 'adam'; not 'alpha_scaled'.")
        wrapped = {k: kwargs.pop(k) for k in list(kwargs) if k in own}
        return AlphaScaled(make_optimizer(base, params, lr=lr, **kwargs), model, loss_fn, **wrapped)
    cls = _class(name)
    return cls(params, **({} if lr is None else {"lr": lr}), **kwargs)


def step_size(optimizer: torch.optim.Optimizer) -> Callable[[], float]:
    """Call before ``optimizer.step()``; return a function that, called after it, gives the step size it used.

    See the module for what each optimizer's step size is. For Prodigy, whose distance estimate :math:`d` is
    updated inside the step, the step size is read before it; for DoG, whose :math:`\\eta` the step computes
    first, after it.
    """
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):  # accelerate's wrapper, ...
        optimizer = optimizer.optimizer
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


def _modes(optimizer: object) -> bool:
    """Whether ``optimizer`` keeps a train and an eval point (Schedule-Free)."""
    groups = getattr(optimizer, "param_groups", None)
    return bool(groups) and "train_mode" in groups[0] and callable(getattr(optimizer, "eval", None))


def train_mode(optimizer: object) -> None:
    """Put an optimizer that has train and eval points (Schedule-Free) in train mode; leave others alone."""
    if _modes(optimizer):
        optimizer.train()


def eval_mode(optimizer: object) -> None:
    """Put an optimizer that has train and eval points (Schedule-Free) in eval mode; leave others alone."""
    if _modes(optimizer):
        optimizer.eval()


def in_eval_mode(optimizer: object) -> bool:
    """Whether ``optimizer`` has train and eval points and is in eval mode (it cannot step then)."""
    return _modes(optimizer) and not optimizer.param_groups[0]["train_mode"]
