"""Input checks shared by the public functions: each failure names what is wrong and what to do."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_batch(batch: object) -> tuple[object, object]:
    """Return ``batch`` as ``(inputs, targets)`` or raise a ``ValueError`` saying what a batch must be."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        kind = type(batch).__name__
        size = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise ValueError(
            f"batch must be a pair (inputs, targets) such that loss_fn(model(inputs), targets) is the "
            f"loss; got a {kind}{size}. Pass e.g. probe.step((x, y))."
        )
    return batch[0], batch[1]


def check_loss(loss: object) -> Tensor:
    """Return ``loss`` if it is a real scalar tensor, else raise a ``ValueError`` explaining the fix."""
    if not isinstance(loss, Tensor):
        raise ValueError(f"loss_fn must return a torch.Tensor, got {type(loss).__name__}.")
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar loss, got a tensor of shape {tuple(loss.shape)}. "
            "Use a mean-reduced loss, e.g. torch.nn.MSELoss(reduction='mean')."
        )
    if not loss.is_floating_point():
        raise ValueError(f"loss_fn must return a floating-point loss, got dtype {loss.dtype}.")
    return loss.reshape(())


def check_vector(v: Sequence[Tensor], params: Sequence[Tensor], name: str = "v") -> tuple[Tensor, ...]:
    """Return ``v`` as a tuple if it is shaped like ``params``, else raise a ``ValueError`` naming the mismatch."""
    if isinstance(v, Tensor) or not isinstance(v, (tuple, list)):
        raise ValueError(
            f"{name} must be a tuple of tensors aligned with "
            "[p for p in model.parameters() if p.requires_grad], "
            f"got {type(v).__name__}. Split a flat vector with torch.split and reshape each piece."
        )
    if len(v) != len(params):
        raise ValueError(f"{name} has {len(v)} tensors but the model has {len(params)} trainable parameters.")
    for i, (vi, p) in enumerate(zip(v, params)):
        if not isinstance(vi, Tensor) or vi.shape != p.shape:
            got = tuple(vi.shape) if isinstance(vi, Tensor) else type(vi).__name__
            raise ValueError(f"{name}[{i}] has shape {got}, expected {tuple(p.shape)} (parameter {i}).")
    return tuple(vi.to(device=p.device, dtype=p.dtype) for vi, p in zip(v, params))


def trainable(model: torch.nn.Module) -> list[Tensor]:
    """Return the parameters that vectors are aligned with: those that require a gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True; there is nothing to probe.")
    return params
