r"""What the probe saw of the training step, and what it can prove from it before trusting the fast path.

The fast path reuses the training step's tensors; that is only right if they belong to *this* step: one
forward pass of the model on the batch handed to ``probe.step``, one backward pass through its output of a
loss that is :math:`c\,\ell(f, y)` for the probe's ``loss_fn`` :math:`\ell` and a constant :math:`c` (a loss
weight, the :math:`1/k` of gradient accumulation), and parameters that have not moved since the forward pass.
:class:`Witness` records the cheap facts that expose each of these, with hooks that keep references and
counters (no extra passes):

* every grad-enabled forward of the model on its own parameters (not inside ``functional_call``): its input,
  the parameters' ``_version`` counters (any in-place change bumps them, even one undone later, as in SAM),
  the RNG state it drew from, autocast;
* every backward through the model's output: the error :math:`\delta = \partial(\text{loss})/\partial f`, to be
  compared with :math:`\partial\ell/\partial f` for the targets handed over (it gives :math:`c`, or a mismatch);
* what each parameter receives *through the output* in that backward (post-hooks on the graph nodes that feed
  its ``.grad``): :math:`c\,\nabla\ell`, whatever clipping or a penalty on the parameters does to ``.grad``;
* every accumulation into ``.grad`` (post-accumulate-grad hooks fire for ``backward()``, not for
  ``torch.autograd.grad``) and whether ``.grad`` was fresh (``None`` or zero) before it: how many backward
  passes built ``.grad``, to be compared with the number of batches handed over.

:meth:`Witness.judge` turns them into a :class:`Verdict`: whether the fast path is proven, why not (the record's
``fallback``), whether what was handed to the probe is not what training backpropagated (flag ``mismatch``),
the loss scale :math:`c`, the gradient, the weights of micro-batches and the RNG states to replay.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import _trained
from ._function import replay_rng, rng_state


class Hook:
    """A hook that calls ``owner.<name>`` through a weak reference and pickles as a no-op.

    Modules keep their hooks in their ``__dict__``; a plain bound method would drag the probe into
    ``copy.deepcopy(model)`` and ``torch.save(model)``. A copy of the model gets a hook that does nothing.
    """

    def __init__(self, owner: object, name: str):
        self._owner, self._name = weakref.ref(owner), name

    def __call__(self, *args: Any) -> Any:
        owner = self._owner()
        return None if owner is None else getattr(owner, self._name)(*args)

    def __reduce__(self) -> tuple:
        return Noop, ()


class Noop:
    """What a probe's hook becomes in a copy of the model: a hook that does nothing."""

    def __call__(self, *args: Any) -> None:
        return None


@dataclass(eq=False)
class Forward:
    """One grad-enabled forward pass of the model."""

    inputs: Any  #: the first positional argument of the call
    input_version: int | None
    versions: dict[int, int]  #: ``id(parameter) -> parameter._version`` at the call
    rng: Tensor  #: the RNG state the forward drew from
    autocast: torch.dtype | None  #: the autocast dtype, when the forward ran under autocast
    modes: tuple[bool, ...] = ()  #: each module's ``training`` flag during the forward
    buffers: dict[str, Tensor] | None = None  #: the buffers' values at its start (what it read)
    rng_after: Tensor | None = None  #: the RNG state at its end (what a ``loss_fn`` that draws starts from)
    output: Tensor | None = None  #: the (detached) output, when it is a tensor
    error: Tensor | None = None  #: the error at the output from the last backward through it
    backwards: int = 0  #: backward passes through the output


@dataclass
class Verdict:
    """What :meth:`Witness.judge` concluded for one step."""

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


class Witness:
    """Hooks on ``model`` and its parameters that record what happened since the last ``reset``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.armed = True  #: record only before probed steps
        self.forwards: list[Forward] = []
        self.events: dict[Tensor, list[Any]] = {}  #: parameter -> freshness of .grad before each accumulation
        self.written: set[Tensor] = set()  #: parameters whose .grad a backward pass wrote
        self.pending: dict[Tensor, Any] = {}
        self.parts: dict[Tensor, list[Tensor]] = {}  #: parameter -> gradients received through the output
        self.tap = False  #: keep ``parts`` (set when the fast path may run)
        self._handles = [
            model.register_forward_pre_hook(Hook(self, "_pre")),
            model.register_forward_hook(Hook(self, "_post")),
        ]
        self._hooked: set[int] = set()
        self.watch(list(model.parameters()))

    def watch(self, params: Sequence[Tensor]) -> None:
        """Know the model's parameters (all of them, in order); hook the trainable ones not yet hooked."""
        self._params = list(params)
        named = next(iter(self.model.named_parameters()), None)  # where functional_call would swap the first one
        self._first = None if named is None else (self.model.get_submodule(named[0].rpartition(".")[0]),
                                                  named[0].rpartition(".")[2], named[1])
        self._device = self._params[0].device if self._params else torch.device("cpu")
        self._hook_trainable()

    def _hook_trainable(self) -> None:
        for p in self._params:
            if p.requires_grad and id(p) not in self._hooked:  # new, or unfrozen since
                self._hooked.add(id(p))
                self._handles.append(p.register_hook(_ParamHook(self, p, before=True)))
                self._handles.append(p.register_post_accumulate_grad_hook(_ParamHook(self, p, before=False)))

    def _on(self) -> bool:
        return self.armed and torch.is_grad_enabled()

    def own(self, module: nn.Module) -> bool:
        """Whether the model runs on its own parameters (not inside ``functional_call``, which swaps them)."""
        return self._first is None or self._first[0]._parameters.get(self._first[1]) is self._first[2]

    def _pre(self, module: nn.Module, args: tuple) -> None:
        if not (self._on() and self.own(module)):  # a functional_call (a reference, say) cannot touch .grad
            return
        self._hook_trainable()
        x, device = args[0] if args else None, self._device
        cast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        self.forwards.append(Forward(
            inputs=x, input_version=x._version if isinstance(x, Tensor) else None,
            versions={id(p): p._version for p in self._params}, rng=rng_state(device), autocast=cast,
            modes=_trained.modes(self.model), buffers=_trained.buffers(self.model),
        ))

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not (self._on() and self.forwards and isinstance(output, Tensor) and self.own(module)):
            return
        fwd = self.forwards[-1]
        fwd.output, fwd.rng_after = output.detach(), rng_state(self._device)
        if output.requires_grad:
            ref = weakref.ref(fwd)
            output.register_hook(lambda grad: _seen(ref(), grad))
            if self.tap:
                self._tap(output.grad_fn)

    def _tap(self, root: Any) -> None:
        """Keep what each parameter receives through the model's output, from the nodes that feed its ``.grad``.

        ``.grad`` may hold more than that: a penalty on the parameters added to the loss reaches them directly.
        """
        ids = {id(p) for p in self._params if p.requires_grad}
        seen, stack = set(), [root]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            feeds = []
            for j, (nxt, _) in enumerate(node.next_functions):
                var = getattr(nxt, "variable", None)  # an AccumulateGrad node: a leaf
                if var is not None and id(var) in ids:
                    feeds.append((j, var))
                elif var is None and nxt is not None:
                    stack.append(nxt)
            if feeds:
                node.register_hook(_Tap(self, feeds))

    def reset(self, armed: bool) -> None:
        """Forget everything seen; record again only if ``armed``."""
        self.forwards, self.events, self.written, self.pending, self.parts, self.armed = [], {}, set(), {}, {}, armed

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._hooked = [], set()

    # ---- the verdict ---------------------------------------------------------------------------------------

    def accumulations(self, params: Sequence[Tensor]) -> int:
        """Return how many backward passes built ``.grad`` (counted since it was last fresh), the most over params."""
        most = 0
        for p in params:
            events = self.events.get(p, [])
            fresh = [bool(e) if isinstance(e, bool) else bool(e.item()) for e in events]
            since = len(fresh) - max((i for i, f in enumerate(fresh) if f), default=0)
            most = max(most, since if events else 0)
        return most

    def judge(
        self, params: Sequence[Tensor], batches: Sequence[Any], *, loss_fn: Callable | None,
        output_grad: Callable[[Tensor, Any], Tensor] | None, closure: bool,
    ) -> Verdict:
        """Decide what the fast path may reuse for a step on ``batches`` (``loss_fn=None``: an objective)."""
        v = Verdict(fast=False)
        k, built = len(batches), self.accumulations(params)
        if closure:
            v.reasons.append("the optimizer takes a closure, which runs its own forward and backward passes")
        if built and built != k and not closure:
            v.mismatch.append(f".grad was built by {built} backward passes but probe.step got {k} batch"
                              f"{'es' if k > 1 else ''}: pass the list of micro-batches")
        forwards = self.forwards
        if not forwards:
            v.reasons.append("no forward pass of the model was seen since the last step")
            if built and not closure:  # .grad comes from a forward the probe never saw: batch and draws unknown
                v.mismatch.append("a backward pass built .grad, but the model given to the probe ran no forward pass "
                                  "since the last step: training called another module (a submodule, or the model "
                                  "a wrapper holds?); give the probe the module training calls")
        matched = [_match(forwards, b[0]) if loss_fn is not None else None for b in batches]
        chosen = [f if f is not None else (forwards[-1] if forwards else None) for f in matched]
        v.rngs = [None if f is None else f.rng for f in chosen]
        v.rngs_after = [None if f is None else f.rng_after for f in chosen]
        v.buffers = [None if f is None else f.buffers for f in chosen]
        v.modes = chosen[-1].modes if chosen and chosen[-1] is not None else None
        scales: list[float | None] = [None] * k
        if loss_fn is not None and forwards:
            for i, (f, b) in enumerate(zip(matched, batches)):
                which = f" of micro-batch {i}" if k > 1 else ""
                if f is None:
                    v.mismatch.append(f"the inputs{which} passed to probe.step were not the input of any forward "
                                      "pass since the last step")
                elif f.error is not None and f.output is not None and output_grad is not None:
                    with replay_rng(f.rng_after, self._device):  # a loss_fn that draws draws as it did
                        scales[i] = _scale(f.error, output_grad(f.output, b[1]))
                    if scales[i] is not None and not math.isfinite(scales[i]):
                        v.reasons.append(f"the error at the model's output{which} is not finite")
                        scales[i] = None
                    elif scales[i] is None:
                        v.mismatch.append(f"the loss backpropagated through the model's output{which} is not a "
                                          "multiple of loss_fn(output, targets) for the targets passed")
                elif built and f.backwards == 0:
                    v.mismatch.append(f"no backward pass went through the output of the forward pass{which}")
        known = [s for s in scales if s is not None]
        if len(known) == k and all(s > 0 for s in known):
            v.weights = [s / sum(known) for s in known]
        if loss_fn is None:
            v.reasons.append("the probe measures an objective(model, batch), not loss_fn(model(x), y)")
        if k > 1:
            v.reasons.append(f"{k} micro-batches")
        if len(forwards) > 1:
            v.reasons.append(f"{len(forwards)} forward passes of the model since the last step")
        if v.reasons or v.mismatch:
            return v
        fwd, scale = forwards[0], scales[0]
        if fwd.backwards != 1:
            v.reasons.append(f"{fwd.backwards} backward passes through the model's output")
        if built == 0:
            v.reasons.append("no backward pass accumulated into .grad")
        elif any(p.grad is not None and p not in self.written for p in params):
            v.reasons.append("a parameter's .grad was not written by the backward pass")
        elif self.tap and any(p in self.written and p not in self.parts for p in params):
            v.reasons.append("a parameter's gradient did not come through the autograd graph of the model's output "
                             "(a backward pass of its own, as reentrant checkpointing runs)")
        if scale is None:
            v.reasons.append("the error at the model's output was not seen")
        if fwd.autocast is not None:
            v.reasons.append(f"the forward pass ran under autocast ({str(fwd.autocast).removeprefix('torch.')}); "
                             "measured in the parameters' precision")
        if any(fwd.versions.get(id(p)) != p._version for p in params):
            v.reasons.append("parameters changed in place after the forward pass")
        if fwd.inputs is not None and isinstance(fwd.inputs, Tensor) and fwd.inputs._version != fwd.input_version:
            v.reasons.append("the inputs changed in place after the forward pass")
        if v.reasons:
            return v
        v.fast, v.scale, v.output = True, scale, fwd.output
        v.grad = [_sum(self.parts[p]) if p in self.parts else torch.zeros_like(p) for p in params]
        v.grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(v.grad))).item() / abs(scale)
        return v


def _sum(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)


class _Tap:
    """A node's post-hook: hand what it sends to parameters' ``.grad`` to the witness."""

    def __init__(self, witness: Witness, feeds: list[tuple[int, Tensor]]):
        self._witness, self.feeds = weakref.ref(witness), feeds

    def __call__(self, grad_inputs: tuple, grad_outputs: tuple) -> None:
        w = self._witness()
        if w is not None and w.armed:
            for j, p in self.feeds:
                if grad_inputs[j] is not None:
                    w.parts.setdefault(p, []).append(grad_inputs[j])


class _ParamHook:
    """A parameter's hook before (is ``.grad`` fresh?) or after an accumulation (count it)."""

    def __init__(self, witness: Witness, param: Tensor, *, before: bool):
        self._witness, self._param, self.before = weakref.ref(witness), weakref.ref(param), before

    def __call__(self, arg: Tensor) -> None:
        w, p = self._witness(), self._param()
        if w is None or p is None or not w.armed:
            return None
        if self.before:  # also fires for torch.autograd.grad, which accumulates nothing: only noted here
            w.pending[p] = p.grad is None or ~p.grad.any()
        else:  # fires for backward() only, once .grad holds the sum
            w.events.setdefault(p, []).append(w.pending.pop(p, True))
            w.written.add(p)
        return None

    def __reduce__(self) -> tuple:
        return Noop, ()


def _seen(fwd: Forward | None, grad: Tensor) -> None:
    if fwd is not None:
        fwd.error, fwd.backwards = grad, fwd.backwards + 1


def _match(forwards: Sequence[Forward], inputs: Any) -> Forward | None:
    """Return the last forward pass whose input is ``inputs`` (the same tensor, or equal values)."""
    for f in reversed(forwards):
        if f.inputs is inputs and (not isinstance(inputs, Tensor) or inputs._version == f.input_version):
            return f
    for f in reversed(forwards):
        x = f.inputs
        if isinstance(x, Tensor) and isinstance(inputs, Tensor) and x.shape == inputs.shape \
                and x.dtype == inputs.dtype and torch.equal(x, inputs.to(x.device)):
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
