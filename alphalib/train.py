"""The one training loop that notebooks, sweeps and benchmarks share."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from ._function import LossFn
from .probe import AlphaProbe

if TYPE_CHECKING:
    import pandas as pd


def train(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    batches: Iterable,
    *,
    epochs: int,
    probe: AlphaProbe | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Train for ``epochs`` passes over ``batches``, letting ``probe`` take the steps; return the loss per step.

    ``batches`` yields ``(inputs, targets)`` pairs and is iterated once per epoch (a ``DataLoader``). The
    returned frame has columns ``epoch``, ``step`` and ``loss`` (the training loss before the step); the
    probe's records are in ``probe.to_frame()``.
    """
    import pandas as pd

    rows = []
    model.train()
    for epoch in tqdm(range(epochs), desc="epochs", disable=not progress):
        for x, y in batches:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            if probe is None:
                optimizer.step()
            else:
                probe.step((x, y), epoch=epoch)
            rows.append((epoch, len(rows), loss.item()))
    return pd.DataFrame(rows, columns=["epoch", "step", "loss"])
