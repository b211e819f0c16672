"""Offline datasets, deterministic given a seed, and the loader that batches them."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset


def gaussian_regression(n: int = 1000, d_in: int = 10, d_out: int = 1, *, seed: int = 0) -> TensorDataset:
    """Return the seed experiment's data: inputs and targets drawn i.i.d. from :math:`\\mathcal N(0, 1)`."""
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d_in, generator=gen), torch.randn(n, d_out, generator=gen))


def loader(dataset: TensorDataset, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Return a loader over ``dataset``; with ``shuffle`` the order is reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen)
