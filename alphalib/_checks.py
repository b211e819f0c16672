"""Input checks shared by the public functions: each failure names what is wrong and what to do."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def check_counts(**counts: object) -> None:
    """Raise a ``ValueError`` naming the first of ``counts`` that is not a positive integer (``None`` passes)."""
    for name, k in counts.items():
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"{name} must be a positive integer, got {k!r}.")


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


def check_loss(loss: object, what: str = "loss_fn") -> Tensor:
    """Return ``loss`` if it is a real scalar tensor, else raise a ``ValueError`` explaining the fix."""
    if not isinstance(loss, Tensor):
        raise ValueError(f"{what} must return a torch.Tensor, got {type(loss).__name__}.")
    if loss.numel() != 1:
        raise ValueError(
            f"{what} must return a scalar loss, got a tensor of shape {tuple(loss.shape)}. "
            "Use a mean-reduced loss, e.g. torch.nn.MSELoss(reduction='mean')."
        )
    if not loss.is_floating_point():
        raise ValueError(f"{what} must return a floating-point loss, got dtype {loss.dtype}.")
    return loss.reshape(())


class ParamVector(tuple):
    """A tuple of tensors that knows the parameters it is aligned with (``.params``, same length).

    :func:`alphalib.direction` returns one in the optimizer's order; :func:`alphalib.hvp` and
    :func:`alphalib.alpha_star` re-order it by parameter identity, so the orders can never be confused.

    Args:
        values: The tensors, one per parameter.
        params: The parameters they belong to, in the same order.

    Attributes:
        params: The parameters, as a tuple aligned with the tensors.

    Raises:
        ValueError: If ``values`` and ``params`` differ in length.
    """

    params: tuple[Tensor, ...]

    def __new__(cls, values: Iterable[Tensor], params: Iterable[Tensor]) -> ParamVector:
        self = super().__new__(cls, values)
        self.params = tuple(params)
        if len(self.params) != len(self):
            raise ValueError(f"a ParamVector needs one parameter per tensor, got {len(self.params)} for {len(self)}.")
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (tuple(self), self.params)


#: What :func:`alphalib.hvp` and :func:`alphalib.alpha_star` accept as a vector over the model's parameters.
Vector = Sequence[Tensor] | Mapping[str, Tensor]


def _by_identity(v: ParamVector, model: nn.Module, named: Mapping[str, Tensor], name: str) -> list[Tensor]:
    """Re-order ``v`` to ``named``'s order; a trainable parameter it lacks gets zeros (the step leaves it in place)."""
    where = {id(p): i for i, p in enumerate(named.values())}
    frozen = {id(p): n for n, p in model.named_parameters() if not p.requires_grad}
    out: list[Tensor | None] = [None] * len(named)
    for j, (vj, p) in enumerate(zip(v, v.params, strict=True)):
        i = where.get(id(p))
        if i is not None:
            if out[i] is not None:
                raise ValueError(f"{name} holds the parameter {list(named)[i]!r} twice.")
            out[i] = vj
        elif id(p) not in frozen:
            raise ValueError(
                f"{name}[{j}] belongs to a parameter of shape {tuple(p.shape)} that is not in the model; pass a "
                "vector over this model's parameters, e.g. direction() of an optimizer built from them."
            )
        elif not isinstance(vj, Tensor) or vj.any():
            raise ValueError(
                f"{name}[{j}] moves the frozen parameter {frozen[id(p)]!r}; set requires_grad=True on it "
                "or leave it out of the vector."
            )
        # else: a zero step of a frozen parameter (an optimizer holding it gets no gradient) changes nothing
    return [torch.zeros_like(p) if vi is None else vi for vi, p in zip(out, named.values(), strict=True)]


def _by_name(v: Mapping[str, Tensor], named: Mapping[str, Tensor], name: str) -> list[Tensor]:
    """Return ``v``'s tensors in ``named``'s order, or raise a ``ValueError`` listing unknown and missing names."""
    unknown = ", ".join(repr(k) for k in v if k not in named)
    missing = ", ".join(repr(k) for k in named if k not in v)
    problems = ([f"unknown names {unknown}"] if unknown else []) + ([f"no tensor for {missing}"] if missing else [])
    if problems:
        raise ValueError(
            f"{name} has {' and '.join(problems)}; key it by every name in "
            "[n for n, p in model.named_parameters() if p.requires_grad] (zeros for a parameter that does not move)."
        )
    return [v[k] for k in named]


def check_vector(v: Vector, model: nn.Module, name: str = "v") -> ParamVector:
    """Return ``v`` aligned with the model's trainable parameters, or raise a ``ValueError`` naming the mismatch.

    ``v`` may be a :class:`ParamVector` (matched by parameter identity; a trainable parameter it lacks gets zeros),
    a dict keyed by the names in ``model.named_parameters()`` (exactly the trainable ones), or a plain tuple or
    list aligned with ``[p for p in model.parameters() if p.requires_grad]``.
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = trainable(model)
    if isinstance(v, ParamVector):
        v = _by_identity(v, model, named, name)
    elif isinstance(v, Mapping):
        v = _by_name(v, named, name)
    elif isinstance(v, Tensor) or not isinstance(v, (tuple, list)):
        raise ValueError(
            f"{name} must be a tuple of tensors aligned with "
            "[p for p in model.parameters() if p.requires_grad] or a dict keyed by parameter name, "
            f"got {type(v).__name__}. Split a flat vector with torch.split and reshape each piece."
        )
    if len(v) != len(params):
        raise ValueError(f"{name} has {len(v)} tensors but the model has {len(params)} trainable parameters.")
    for i, (vi, (n, p)) in enumerate(zip(v, named.items(), strict=True)):
        if not isinstance(vi, Tensor) or vi.shape != p.shape:
            got = tuple(vi.shape) if isinstance(vi, Tensor) else type(vi).__name__
            raise ValueError(f"{name}[{i}] has shape {got}, expected {tuple(p.shape)} (parameter {i}, {n!r}).")
    return ParamVector((vi.to(device=p.device, dtype=p.dtype) for vi, p in zip(v, params, strict=True)), params)


def trainable(model: torch.nn.Module, params: Iterable[Tensor] | None = None) -> list[Tensor]:
    """Return the parameters that vectors are aligned with: those that require a gradient (of ``params``)."""
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True; there is nothing to probe.")
    return params
