"""Reference models."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SimpleNet(nn.Module):
    """The seed experiment's network: ``Linear(d_in, hidden) → ReLU → Linear(hidden, d_out)``."""

    def __init__(self, d_in: int = 10, hidden: int = 5, d_out: int = 1):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))
