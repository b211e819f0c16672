r"""The evidence: from what the recorder saw, decide what the fast path may reuse for this step.

The fast path reuses the training step's tensors; that is only right if they belong to *this* step: one
forward pass of the model on the batch handed to ``probe.step``, one backward pass through its output of a
loss that is :math:`c\,\ell(f, y)` for the probe's ``loss_fn`` :math:`\ell` and a constant :math:`c` (a loss
weight, the :math:`1/k` of gradient accumulation), and parameters that have not moved since the forward pass.

:func:`judge` is a function of the recorder's :class:`~alphalib.probe.recorder.Facts` and the step's batches
alone. It checks the facts against two tables, :data:`STEP` (the step as a whole) and :data:`PASS` (its one
forward and backward pass); each row gives the record's ``fallback`` when a condition fails. Separately it
flags ``mismatch`` where what was handed to the probe is not what training backpropagated. It also reads off
the loss scale :math:`c` (the error at the output against :math:`\partial\ell/\partial f`), the gradient
:math:`\nabla\ell` that reached the parameters through the output, the micro-batches' weights and the state of
the training forward that the probe's evaluations restore (RNG states, buffers, modes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import _ops
from .._function import replay_rng
from .recorder import Facts, Forward


@dataclass
class Verdict:
    """What :func:`judge` concluded for one step."""

    fast: bool  #: the fast path may reuse the captured step
    reasons: list[str] = field(default_factory=list)  #: why not fast (the record's ``fallback``)
    mismatch: list[str] = field(default_factory=list)  #: what was handed to the probe is not what was trained
    scale: float = 1.0  #: the constant :math:`c` of the backpropagated loss :math:`c\,\ell`
    weights: list[float] | None = None  #: relative weights of the micro-batches, as training weighted them
    rngs: list[Tensor | None] = field(default_factory=list)  #: RNG state of each batch's forward
    rngs_after: list[Tensor | None] = field(default_factory=list)  #: ... and at its end (for the loss_fn's draws)
    buffers: list[dict[str, Tensor] | None] = field(default_factory=list)  #: each batch's forward's buffers
    modes: tuple[bool, ...] | None = None  #: the modules' modes in the training forward
    grad: list[Tensor] | None = None  #: :math:`c\,\nabla \ell`: what reached each ``.grad`` through the output
    grad_norm: float | None = None  #: :math:`\|\nabla \ell\|`, when ``fast``
    output: Tensor | None = None  #: the training forward's output, when the fast path is proven


class Step(NamedTuple):
    """A step as the tables see it."""

    facts: Facts
    params: Sequence[Tensor]
    batches: Sequence[Any]
    matched: list[Forward | None]  #: the forward pass whose input each batch is, if any
    scales: list[float | None]  #: the loss scale found for each batch
    objective: bool  #: measured as an objective(model, batch), not loss_fn(model(x), y)
    closure: bool  #: the optimizer takes a closure


def _either(why: str, bad: Callable[[Step], object]) -> Callable[[Step], str | None]:
    """Return a row that gives ``why`` where ``bad(step)`` is true (truthy), else ``None``."""
    return lambda s: why if bad(s) else None


#: what the fast path needs of the step as a whole (checked first; the record's ``fallback`` when it fails)
STEP: tuple[Callable[[Step], str | None], ...] = (
    _either("the optimizer takes a closure, which runs its own forward and backward passes", lambda s: s.closure),
    _either("no forward pass of the model was seen since the last step", lambda s: not s.facts.forwards),
    _either("the probe measures an objective(model, batch), not loss_fn(model(x), y)", lambda s: s.objective),
    lambda s: f"{len(s.batches)} micro-batches" if len(s.batches) > 1 else None,
    lambda s: (
        f"{len(s.facts.forwards)} forward passes of the model since the last step"
        if len(s.facts.forwards) > 1
        else None
    ),
)


def _changed_in_place(s: Step) -> bool:
    fwd = s.facts.forwards[0]
    return any(fwd.versions.get(id(p)) != _ops.version(p) for p in s.params)


def _input_changed(s: Step) -> bool:
    x = s.facts.forwards[0].inputs
    return isinstance(x, Tensor) and _ops.version(x) != s.facts.forwards[0].input_version


#: what the fast path needs of that step's one forward and backward pass (checked when STEP passes)
PASS: tuple[Callable[[Step], str | None], ...] = (
    lambda s: (
        None
        if s.facts.forwards[0].backwards == 1
        else f"{s.facts.forwards[0].backwards} backward passes through the model's output"
    ),
    _either("no backward pass accumulated into .grad", lambda s: s.facts.built == 0),
    _either("a parameter's .grad was not written by the backward pass", lambda s: s.facts.built and s.facts.unwritten),
    _either(
        "a parameter's gradient did not come through the autograd graph of the model's output (a backward pass "
        "of its own, as reentrant checkpointing runs)",
        lambda s: s.facts.built and not s.facts.unwritten and s.facts.bypassed,
    ),
    _either("the error at the model's output was not seen", lambda s: s.scales[0] is None),
    lambda s: (
        None
        if s.facts.forwards[0].autocast is None
        else "the forward pass ran under autocast "
        f"({str(s.facts.forwards[0].autocast).removeprefix('torch.')}); measured in the parameters' precision"
    ),
    _either("parameters changed in place after the forward pass", _changed_in_place),
    _either("the inputs changed in place after the forward pass", _input_changed),
)


def judge(
    facts: Facts,
    params: Sequence[Tensor],
    batches: Sequence[Any],
    *,
    loss_fn: Callable | None,
    output_grad: Callable[[Tensor, Any], Tensor] | None,
    closure: bool,
) -> Verdict:
    """Decide what the fast path may reuse for a step on ``batches`` (``loss_fn=None``: an objective)."""
    forwards, k = facts.forwards, len(batches)
    matched = [_match(forwards, b[0]) if loss_fn is not None else None for b in batches]
    chosen = [f if f is not None else (forwards[-1] if forwards else None) for f in matched]
    v = Verdict(
        fast=False,
        rngs=[None if f is None else f.rng for f in chosen],  # the state to restore
        rngs_after=[None if f is None else f.rng_after for f in chosen],
        buffers=[None if f is None else f.buffers for f in chosen],
        modes=None if chosen[-1] is None else chosen[-1].modes,
    )
    if not closure:
        v.mismatch += _accumulation_mismatch(facts, k)
    scales: list[float | None] = [None] * k
    if loss_fn is not None and forwards:
        scales = _scales(facts, batches, matched, output_grad, v)
    known = [s for s in scales if s is not None]
    if len(known) == k and all(s > 0 for s in known):
        v.weights = [s / sum(known) for s in known]
    step = Step(facts, params, batches, matched, scales, loss_fn is None, closure)
    v.reasons += [why for row in STEP if (why := row(step))]
    if v.reasons or v.mismatch:
        return v
    v.reasons += [why for row in PASS if (why := row(step))]
    if v.reasons:
        return v
    scale = scales[0]
    assert scale is not None  # PASS refuses a step whose scale was not found
    v.fast, v.scale, v.output = True, scale, forwards[0].output
    parts = facts.parts or {}
    v.grad = [_sum(parts[p]) if p in parts else torch.zeros_like(p) for p in params]
    v.grad_norm = _ops.norm(v.grad) / abs(v.scale)
    return v


def _accumulation_mismatch(facts: Facts, k: int) -> list[str]:
    """Say where the backward passes that built ``.grad`` do not fit the ``k`` batches handed over."""
    out = []
    if facts.built and facts.built != k:
        out.append(
            f".grad was built by {facts.built} backward passes but probe.step got {k} batch"
            f"{'es' if k > 1 else ''}: pass the list of micro-batches"
        )
    if facts.built and not facts.forwards:  # .grad comes from a forward the probe never saw: batch and draws unknown
        out.append(
            "a backward pass built .grad, but the model given to the probe ran no forward pass since the last "
            "step: training called another module (a submodule, or the model a wrapper holds?); give the probe "
            "the module training calls"
        )
    return out


def _scales(
    facts: Facts,
    batches: Sequence[Any],
    matched: list[Forward | None],
    output_grad: Callable[[Tensor, Any], Tensor] | None,
    v: Verdict,
) -> list[float | None]:
    """Return the loss scale :math:`c` of each batch; add to ``v`` what does not fit a multiple of the loss."""
    k, scales = len(batches), []
    for i, (f, b) in enumerate(zip(matched, batches, strict=True)):
        which, c = f" of micro-batch {i}" if k > 1 else "", None
        if f is None:
            v.mismatch.append(
                f"the inputs{which} passed to probe.step were not the input of any forward pass since the last step"
            )
        elif f.error is not None and f.output is not None and output_grad is not None:
            with replay_rng(f.rng_after, facts.device):  # a loss_fn that draws draws as it did
                c = _scale(f.error, output_grad(f.output, b[1]))
            if c is not None and not math.isfinite(c):
                v.reasons.append(f"the error at the model's output{which} is not finite")
                c = None
            elif c is None:
                v.mismatch.append(
                    f"the loss backpropagated through the model's output{which} is not a multiple of "
                    "loss_fn(output, targets) for the targets passed"
                )
        elif facts.built and f.backwards == 0:
            v.mismatch.append(f"no backward pass went through the output of the forward pass{which}")
        scales.append(c)
    return scales


def _sum(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)


def _match(forwards: Sequence[Forward], inputs: Any) -> Forward | None:
    """Return the last forward pass whose input is ``inputs`` (the same tensor, or equal values)."""
    for f in reversed(forwards):
        if f.inputs is inputs and (not isinstance(inputs, Tensor) or _ops.version(inputs) == f.input_version):
            return f
    for f in reversed(forwards):
        x = f.inputs
        if (
            isinstance(x, Tensor)
            and isinstance(inputs, Tensor)
            and x.shape == inputs.shape
            and x.dtype == inputs.dtype
            and torch.equal(x, inputs.to(x.device))
        ):
            return f
    return None


def _scale(error: Tensor, grad: Tensor) -> float | None:
    r"""Return :math:`c` if ``error`` :math:`= c\cdot` ``grad`` to a relative :math:`\sqrt{u}`, else ``None``."""
    e, g = error.detach().double().reshape(-1), grad.detach().to(error.device).double().reshape(-1)
    gg = torch.dot(g, g)
    c = torch.dot(e, g) / gg
    gg, c, rest, norm = torch.stack([gg, c, torch.linalg.vector_norm(e - c * g), torch.linalg.vector_norm(e)]).tolist()
    if not all(math.isfinite(x) for x in (gg, norm)):
        return math.nan
    if gg == 0:  # a perfect fit: no error to compare, any scale will do
        return 1.0 if norm == 0 else None
    tol = math.sqrt(torch.finfo(error.dtype).eps)
    return c if rest <= tol * norm and c != 0 else None
