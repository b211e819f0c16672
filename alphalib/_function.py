"""The training loss as a pure function of the parameters.

Every curvature backend differentiates :math:`L_B(\\theta) = \\ell(f(\\theta, x), y)`, or an
:func:`objective` ``fn(model, batch)``, through this one object, so slope and curvature always come from the
same function: the same batch (or micro-batches, weighted as training weighted them), the same buffers and the
same random draws. It evaluates the model with :func:`torch.func.functional_call`, hands it clones of the
buffers (BatchNorm's running statistics are updated on the clones, never on the model) and replays a fixed
RNG state inside :func:`torch.random.fork_rng` on every call, so a model with dropout sees one and the same
mask each time while the global RNG stream stays untouched. Attention runs on PyTorch's math kernel here (the
fused CPU kernels have no double backward); training itself keeps whichever kernel it chose.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import _ops, _trained
from ._checks import check_batch, check_loss

LossFn = Callable[[Tensor, Tensor], Tensor]


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Return :math:`\\sum_i \\langle a_i, b_i \\rangle` over two parameter-shaped tuples."""
    return torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b, strict=True)]).sum()


def rng_state(device: torch.device) -> Tensor:
    """Return the state of the generator that random ops on ``device`` draw from."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


@contextlib.contextmanager
def replay_rng(state: Tensor | None, device: torch.device) -> Iterator[None]:
    """Run the body from RNG ``state`` (``None``: the current one) and leave the global RNG as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if state is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        elif state is not None:
            torch.set_rng_state(state)
        yield


@dataclass(frozen=True)
class Objective:
    """A training objective ``fn(model, batch) -> scalar`` (see :func:`objective`, which builds one).

    Args:
        fn: The function that returns the scalar training loss of ``model`` on ``batch``.
    """

    fn: Callable[[nn.Module, Any], Tensor]

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        """Return ``fn(model, batch)``, the loss."""
        return self.fn(model, batch)


def objective(fn: Callable[[nn.Module, Any], Tensor]) -> Objective:
    """Mark ``fn(model, batch) -> scalar`` as the training objective to probe, in place of a ``loss_fn``.

    Use it when the loss is not ``loss_fn(model(inputs), targets)``: penalties on the parameters, models that
    return their loss or a tuple, dict batches. It works as a decorator.

    Args:
        fn: The function ``fn(model, batch)`` that returns the scalar training loss. It may read
            ``model.parameters()``; the probe evaluates it with the parameters it differentiates.

    Returns:
        ``fn`` wrapped as an :class:`Objective`, callable as ``fn`` is (``fn`` itself if it is one already).

    Raises:
        TypeError: If ``fn`` is not callable.

    Example:
        >>> import torch
        >>> @objective
        ... def ridge(model, batch):
        ...     x, y = batch
        ...     penalty = sum(p.square().sum() for p in model.parameters())
        ...     return torch.nn.functional.mse_loss(model(x), y) + 1e-3 * penalty
        >>> model = torch.nn.Linear(3, 1)
        >>> ridge(model, (torch.randn(4, 3), torch.randn(4, 1))).shape
        torch.Size([])
    """
    if isinstance(fn, Objective):
        return fn
    if not callable(fn):
        raise TypeError(f"objective(fn) needs a callable fn(model, batch) -> scalar, got {type(fn).__name__}.")
    return Objective(fn)


class _Call(nn.Module):
    """``objective(model, batch)`` as a module, so that :func:`torch.func.functional_call` can swap parameters."""

    def __init__(self, model: nn.Module, fn: Objective):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch: Any) -> Tensor:
        return self.fn(self.model, batch)


class BatchLoss:
    r""":math:`\theta \mapsto L(\theta)` for one model and one batch (or weighted micro-batches), model untouched.

    ``L`` is ``loss_fn(model(x), y)`` or ``objective(model, batch)``; over micro-batches
    :math:`B_1, \dots, B_k` with weights :math:`w_i` (summing to 1) it is :math:`\sum_i w_i L_{B_i}`, the
    loss of their union as gradient accumulation weights it. ``rngs`` holds the RNG state to replay for each
    batch (``None``: the current one).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn | Objective,
        batch: object,
        rng: Tensor | None = None,
        *,
        batches: Sequence[object] | None = None,
        weights: Sequence[float] | None = None,
        rngs: Sequence[Tensor | None] | None = None,
        rngs_after: Sequence[Tensor | None] | None = None,
        buffers: Sequence[dict[str, Tensor] | None] | None = None,
        modes: Sequence[bool] | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.model, self.loss = model, loss
        #: each batch as given: a pair ``(inputs, targets)`` for a ``loss_fn``, anything an objective takes
        self.batches: list[Any] = list(batches) if batches is not None else [batch]
        if not isinstance(loss, Objective):
            for b in self.batches:
                check_batch(b)
        k = len(self.batches)
        self.weights = [1.0 / k] * k if weights is None else list(weights)
        named = list(model.named_parameters())
        self.names = [n for n, p in named if p.requires_grad]
        self.frozen = {n: p.detach() for n, p in named if not p.requires_grad}
        self.device = named[0][1].device if named else torch.device("cpu")
        given = list(rngs) if rngs is not None else [rng] * k
        self.rngs = [rng_state(self.device) if r is None else r for r in given]
        #: where each batch's loss_fn starts drawing: the end of its training forward, else of the replayed one
        self.rngs_after: list[Tensor | None] = list(rngs_after) if rngs_after is not None else [None] * k
        self.buffers = list(buffers) if buffers is not None else [None] * k
        self.modes, self.dtype = modes, dtype

    @property
    def has_outputs(self) -> bool:
        """Whether the loss is ``loss_fn(model(x), y)``, so that outputs (and the GGN) are defined."""
        return not isinstance(self.loss, Objective)

    def _cast(self, t: Any) -> Any:
        return t.to(self.dtype) if self.dtype is not None and isinstance(t, Tensor) and t.is_floating_point() else t

    def _state(self, params: Sequence[Tensor], i: int = 0) -> dict[str, Tensor]:
        kept = self.buffers[i]
        state = {
            n: self._cast(b.clone()) for n, b in (kept.items() if kept is not None else self.model.named_buffers())
        }
        state.update((n, self._cast(p)) for n, p in self.frozen.items())
        state.update(zip(self.names, map(self._cast, params), strict=True))
        return state

    @contextlib.contextmanager
    def _as_trained(self, i: int) -> Iterator[None]:
        """The modes, random draws and kernels of batch ``i``'s training forward; gradient-only modifiers off."""
        with (
            _trained.as_trained(self.model, self.modes),
            replay_rng(self.rngs[i], self.device),
            sdpa_kernel(SDPBackend.MATH),
            _ops.second_order(),
        ):
            yield
            if self.rngs_after[i] is None:
                self.rngs_after[i] = rng_state(self.device)

    def outputs(self, params: Sequence[Tensor]) -> list[Tensor]:
        r"""Return the model's outputs :math:`f(\theta, x_i)` at ``params`` (trainable ones, in order)."""
        outs = []
        for i, b in enumerate(self.batches):
            with self._as_trained(i):
                outs.append(functional_call(self.model, self._state(params, i), (self._cast(b[0]),)))
        return outs

    def loss_of(self, outputs: Sequence[Tensor]) -> Tensor:
        r"""Return the weighted loss :math:`\sum_i w_i \ell(f_i, y_i)` of given outputs."""
        loss_fn = self.loss
        if isinstance(loss_fn, Objective):
            raise ValueError("an objective(model, batch) has no model outputs to take the loss of.")
        losses = []
        for out, b, after in zip(outputs, self.batches, self.rngs_after, strict=True):
            with replay_rng(after, self.device):  # a loss_fn that draws (label noise) draws as in training
                losses.append(check_loss(loss_fn(out, self._cast(b[1]))))
        return _weighted(losses, self.weights)

    def __call__(self, params: Sequence[Tensor]) -> Tensor:
        """Return :math:`L` at ``params``."""
        objective = self.loss
        if not isinstance(objective, Objective):  # (has_outputs)
            return self.loss_of(self.outputs(params))
        free = not (torch.is_grad_enabled() and all(p.requires_grad for p in params))
        if free:  # the objective may differentiate itself (a gradient penalty): give it leaves to do so
            params = [p.detach().requires_grad_(True) for p in params]
        call, losses = _Call(self.model, objective), []
        with torch.enable_grad():
            for i, b in enumerate(self.batches):
                state = {f"model.{n}": t for n, t in self._state(params, i).items()}
                with self._as_trained(i):
                    losses.append(check_loss(functional_call(call, state, (b,)), what="the objective"))
        loss = _weighted(losses, self.weights)
        return loss.detach() if free else loss


def _weighted(losses: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    if len(losses) == 1 and weights[0] == 1.0:
        return losses[0]
    return cast(Tensor, sum(w * loss for w, loss in zip(weights, losses, strict=True)))  # (losses is not empty)
