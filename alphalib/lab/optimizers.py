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

What step size each of them takes, and what it is measured in: :mod:`alphalib.optim`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .._function import LossFn

__all__ = ["OPTIMIZERS", "LR_FREE", "make_optimizer"]

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
    """Build the optimizer ``name`` over ``params`` with ``lr`` and ``kwargs``.

    ``"alpha_scaled"`` returns :class:`alphalib.AlphaScaled` around ``base`` (a name, ``"adam"`` by default) built
    with ``lr`` and the keywords :class:`~alphalib.AlphaScaled` does not take.

    Args:
        name: One of :data:`OPTIMIZERS`: a ``torch.optim`` class's name in any case, a learning-rate-free
            optimizer's or ``"alpha_scaled"`` (see the module).
        params: The parameters (or parameter groups) to optimize.
        lr: The learning rate; ``None``: the optimizer's own default.
        model: The model whose loss ``"alpha_scaled"`` measures α* on (needed for it, unused otherwise).
        loss_fn: The loss ``"alpha_scaled"`` measures α* on (needed for it, unused otherwise).
        **kwargs: More keywords for the optimizer's class; for ``"alpha_scaled"``, ``base`` and the keywords of
            :class:`~alphalib.AlphaScaled` and of the base optimizer.

    Returns:
        The optimizer, or the :class:`~alphalib.AlphaScaled` around its base optimizer.

    Raises:
        TypeError: If ``name`` is not a string.
        ValueError: If ``name`` is unknown, ``"alpha_scaled"`` lacks ``model`` or ``loss_fn``, or its ``base`` is
            ``"alpha_scaled"``.
        ImportError: If a learning-rate-free optimizer's package is not installed.

    Example:
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
        from ..scaled import AlphaScaled

        if model is None or loss_fn is None:
            raise ValueError("'alpha_scaled' measures alpha* on the model's loss: pass model= and loss_fn=.")
        own = set(inspect.signature(AlphaScaled).parameters) - {"optimizer", "model", "loss_fn"}
        base = kwargs.pop("base", "adam")
        if base.lower() == "alpha_scaled":
            raise ValueError("base must be an optimizer alphalib.direction knows, e.g. 'adam'; not 'alpha_scaled'.")
        wrapped = {k: kwargs.pop(k) for k in list(kwargs) if k in own}
        return AlphaScaled(make_optimizer(base, params, lr=lr, **kwargs), model, loss_fn, **wrapped)
    cls: Callable[..., torch.optim.Optimizer] = _class(name)  # its own keywords, not Optimizer's (params, defaults)
    return cls(params, **({} if lr is None else {"lr": lr}), **kwargs)
