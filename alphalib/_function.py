"""The mini-batch loss as a pure function of the parameters.

Every curvature backend differentiates :math:`L_B(\\theta) = \\ell(f(\\theta, x), y)` through this one
object, so slope and curvature always come from the same function: the same batch, the same buffers and
the same random draws. It evaluates the model with :func:`torch.func.functional_call`, hands it clones of
the buffers (BatchNorm's running statistics are updated on the clones, never on the model) and replays one
fixed RNG state inside :func:`torch.random.fork_rng` on every call, so a model with dropout sees one and the
same mask each time while the global RNG stream stays untouched. Attention runs on PyTorch's math kernel
here (the fused CPU kernels have no double backward); training itself keeps whichever kernel it chose.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._checks import check_batch, check_loss

LossFn = Callable[[Tensor, Tensor], Tensor]


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Return :math:`\\sum_i \\langle a_i, b_i \\rangle` over two parameter-shaped tuples."""
    return torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)]).sum()


def rng_state(device: torch.device) -> Tensor:
    """Return the state of the generator that random ops on ``device`` draw from."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


@contextlib.contextmanager
def replay_rng(state: Tensor, device: torch.device) -> Iterator[None]:
    """Run the body from RNG ``state`` and leave the global RNG as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield


class BatchLoss:
    """:math:`\\theta \\mapsto L_B(\\theta)` for one model and one batch, with the model left untouched."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: object, rng: Tensor | None = None):
        self.model, self.loss_fn = model, loss_fn
        self.inputs, self.targets = check_batch(batch)
        named = list(model.named_parameters())
        self.names = [n for n, p in named if p.requires_grad]
        self.frozen = {n: p.detach() for n, p in named if not p.requires_grad}
        self.device = named[0][1].device if named else torch.device("cpu")
        self.rng = rng_state(self.device) if rng is None else rng

    def outputs(self, params: Sequence[Tensor]) -> Tensor:
        """Return the model's output :math:`f(\\theta, x)` at ``params`` (trainable ones, in order)."""
        state = {n: b.clone() for n, b in self.model.named_buffers()}
        state.update(self.frozen)
        state.update(zip(self.names, params))
        with replay_rng(self.rng, self.device), sdpa_kernel(SDPBackend.MATH):
            return functional_call(self.model, state, (self.inputs,))

    def loss_of(self, outputs: Tensor) -> Tensor:
        """Return the scalar loss :math:`\\ell(f, y)` of given outputs."""
        return check_loss(self.loss_fn(outputs, self.targets))

    def __call__(self, params: Sequence[Tensor]) -> Tensor:
        """Return :math:`L_B` at ``params``."""
        return self.loss_of(self.outputs(params))
