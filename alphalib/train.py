"""The one training loop that notebooks, sweeps and benchmarks share, and ``run``: one seeded, probed run."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ._function import LossFn
from .curvature import Backend
from .data import loader
from .probe import AlphaProbe

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class History:
    """What a training run produced, as tidy frames that concatenate across runs."""

    steps: pd.DataFrame  #: one row per step: ``epoch``, ``step``, ``loss`` (mini-batch loss before the step)
    epochs: pd.DataFrame  #: one row per epoch: ``train_loss`` (mean), ``val_loss``, ``val_accuracy`` if given
    records: pd.DataFrame  #: the probe's records (empty without a probe)


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: LossFn, batches: Iterable) -> dict[str, float]:
    """Return the mean loss over ``batches`` in eval mode, and the accuracy when targets are class indices."""
    was_training = model.training
    model.eval()
    n = loss = correct = 0.0
    classes = False
    for x, y in batches:
        out = model(x)
        loss += loss_fn(out, y).item() * len(y)
        classes = not y.is_floating_point()
        if classes:
            correct += (out.argmax(-1) == y).double().mean().item() * len(y)
        n += len(y)
    model.train(was_training)
    metrics = {"val_loss": loss / n}
    if classes:
        metrics["val_accuracy"] = correct / n
    return metrics


def train(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    batches: Iterable,
    *,
    epochs: int,
    probe: AlphaProbe | None = None,
    val: Iterable | None = None,
    progress: bool = True,
) -> History:
    """Train for ``epochs`` passes over ``batches``, letting ``probe`` take the steps.

    ``batches`` (and ``val``) yield ``(inputs, targets)`` pairs and are iterated once per epoch (a
    ``DataLoader``). Validation runs after every epoch, in eval mode.
    """
    import pandas as pd

    steps, per_epoch = [], []
    model.train()
    bar = tqdm(range(epochs), desc="epochs", disable=not progress)
    for epoch in bar:
        first = len(steps)
        for x, y in batches:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            if probe is None:
                optimizer.step()
            else:
                probe.step((x, y), epoch=epoch)
            steps.append((epoch, len(steps), loss.item()))
        row = {"epoch": epoch, "train_loss": sum(s[2] for s in steps[first:]) / max(len(steps) - first, 1)}
        if val is not None:
            row |= evaluate(model, loss_fn, val)
        per_epoch.append(row)
        bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k != "epoch"})
    records = probe.to_frame() if probe is not None else pd.DataFrame()
    return History(pd.DataFrame(steps, columns=["epoch", "step", "loss"]), pd.DataFrame(per_epoch), records)


def make_optimizer(name: str, params: Iterable, *, lr: float, **kwargs: Any) -> torch.optim.Optimizer:
    """Return ``torch.optim.<name>(params, lr=lr, **kwargs)``, with a clear error for unknown names."""
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"unknown optimizer {name!r}: give a class name from torch.optim, e.g. 'Adam' or 'SGD'.")
    return cls(params, lr=lr, **kwargs)


def run(
    model: Callable[[], nn.Module],
    loss_fn: LossFn,
    train_set: Dataset,
    *,
    optimizer: str = "Adam",
    lr: float = 1e-3,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    epochs: int = 10,
    batch_size: int = 32,
    seed: int = 0,
    curvature: Backend = "hessian",
    every: int = 1,
    shuffle: bool = True,
    val_set: Dataset | None = None,
    tags: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> History:
    """Seed, build ``model()`` and the optimizer, train with a probe; tag every row with the run's settings.

    Every frame of the result carries ``optimizer``, ``seed`` and ``lr0`` (the initial learning rate) plus
    ``tags`` as columns, so runs concatenate into one tidy DataFrame.
    """
    torch.manual_seed(seed)
    net = model()
    opt = make_optimizer(optimizer, net.parameters(), lr=lr, **dict(optimizer_kwargs or {}))
    labels = {"optimizer": optimizer, "seed": seed, "lr0": lr, **dict(tags or {})}
    probe = AlphaProbe(net, loss_fn, opt, curvature=curvature, every=every, tags=labels)
    batches = loader(train_set, batch_size, shuffle=shuffle, seed=seed)
    val = loader(val_set, 512) if val_set is not None else None
    history = train(net, loss_fn, opt, batches, epochs=epochs, probe=probe, val=val, progress=progress)
    probe.remove()
    for frame in (history.steps, history.epochs):
        for key, value in labels.items():
            frame[key] = value
    return history
