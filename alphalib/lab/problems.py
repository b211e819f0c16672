"""The reference problems the notebooks set optimizers against: a model, its loss and three disjoint data sets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from .._function import LossFn
from . import data, models

#: the names :func:`problem` knows
PROBLEMS: tuple[str, ...] = ("seed problem", "digits MLP", "MNIST-1D MLP")


@dataclass(frozen=True)
class Problem:
    """A model factory and its loss with a training set, a set for measuring α* and a set that judges runs.

    ``alpha`` and ``val`` are disjoint from ``train`` and from each other: a method that measures α* on held-out
    data (:class:`alphalib.AlphaScaled`'s ``"heldout"`` source) takes it from ``alpha``, so ``val`` stays unseen.

    Attributes:
        name: The problem's name, one of :data:`PROBLEMS`.
        model: Builds a fresh network (call it after seeding).
        loss_fn: ``loss_fn(model(inputs), targets)``.
        train: The training set.
        alpha: The set for measuring α* on held-out data.
        val: The set that judges runs.
    """

    name: str
    model: Callable[[], nn.Module]
    loss_fn: LossFn
    train: TensorDataset
    alpha: TensorDataset
    val: TensorDataset


def problem(name: str, *, seed: int = 0) -> Problem:
    """Return the reference problem ``name`` with its data drawn from ``seed``.

    * ``"seed problem"``: the seed notebook's SimpleNet 10→5→1 on 1000 Gaussian samples (MSE; nothing to learn);
    * ``"digits MLP"``: a 64→64→10 ReLU MLP on scikit-learn's digits (cross-entropy);
    * ``"MNIST-1D MLP"``: a 40→128→128→10 ReLU MLP on 4000 MNIST-1D samples (cross-entropy).

    For the last two the held-out 20% is halved into ``alpha`` and ``val``.

    Args:
        name: One of :data:`PROBLEMS`.
        seed: Seeds the data: the samples drawn, or the split into training and held-out sets.

    Returns:
        The :class:`Problem`.

    Raises:
        ValueError: If ``name`` is not one of :data:`PROBLEMS`.

    Example:
        >>> p = problem("seed problem", seed=0)
        >>> len(p.train), len(p.alpha), len(p.val)
        (1000, 500, 1000)
    """
    if name == "seed problem":
        return Problem(
            name,
            models.SimpleNet,
            F.mse_loss,
            data.gaussian_regression(seed=seed),
            data.gaussian_regression(n=500, seed=seed + 2000),
            data.gaussian_regression(seed=seed + 1000),
        )
    if name == "digits MLP":
        split, model = data.digits(seed=seed), lambda: models.mlp([64, 64, 10])
    elif name == "MNIST-1D MLP":
        split, model = data.mnist1d(seed=seed), lambda: models.mlp([40, 128, 128, 10])
    else:
        raise ValueError(f"unknown problem {name!r}: give one of {', '.join(PROBLEMS)}.")
    k = len(split.val) // 2
    alpha, val = (TensorDataset(*(t[part] for t in split.val.tensors)) for part in (slice(None, k), slice(k, None)))
    return Problem(name, model, F.cross_entropy, split.train, alpha, val)
