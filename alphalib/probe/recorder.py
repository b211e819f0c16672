r"""The recorder: what the training step left, kept by hooks that hold references and counters (no extra passes).

The fast path reuses the training step's tensors; :mod:`alphalib.probe.evidence` decides from the facts kept
here whether they belong to *this* step. :class:`Recorder` keeps, since the last probed step:

* every grad-enabled forward of the model on its own parameters (not inside ``functional_call``): its input,
  the parameters' version counters (any in-place change bumps them, even one undone later, as in SAM), the RNG
  state it drew from and the one it ended in, autocast, each module's mode and the buffers it read
  (:mod:`alphalib._trained`);
* every backward through the model's output: the error :math:`\delta = \partial(\text{loss})/\partial f`;
* what each parameter receives *through the output* in that backward (post-hooks on the graph nodes that feed
  its ``.grad``): :math:`c\,\nabla\ell`, whatever clipping or a penalty on the parameters does to ``.grad``;
* every accumulation into ``.grad`` (post-accumulate-grad hooks fire for ``backward()``, not for
  ``torch.autograd.grad``) and whether ``.grad`` was fresh (``None`` or zero) before it.

:meth:`Recorder.facts` hands them over as one :class:`Facts`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import _ops, _trained
from .._function import rng_state
from .._hooks import Hook, Noop


@dataclass(eq=False)
class Forward:
    """One grad-enabled forward pass of the model."""

    inputs: Any  #: the first positional argument of the call
    input_version: float | None
    versions: dict[int, float]  #: ``id(parameter) ->`` its version counter at the call
    rng: Tensor  #: the RNG state the forward drew from
    autocast: torch.dtype | None  #: the autocast dtype, when the forward ran under autocast
    modes: tuple[bool, ...] = ()  #: each module's ``training`` flag during the forward
    buffers: dict[str, Tensor] | None = None  #: the buffers' values at its start (what it read)
    rng_after: Tensor | None = None  #: the RNG state at its end (what a ``loss_fn`` that draws starts from)
    output: Tensor | None = None  #: the (detached) output, when it is a tensor
    error: Tensor | None = None  #: the error at the output from the last backward through it
    backwards: int = 0  #: backward passes through the output


class Recorder:
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
        self.on_forward: Callable[[], None] | None = None  #: called as each recorded forward pass begins
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
        self._first = (
            None
            if named is None
            else (self.model.get_submodule(named[0].rpartition(".")[0]), named[0].rpartition(".")[2], named[1])
        )
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
        return self._first is None or _ops.parameter_slot(self._first[0], self._first[1]) is self._first[2]

    def _pre(self, module: nn.Module, args: tuple) -> None:
        if not (self._on() and self.own(module)):  # a functional_call (a reference, say) cannot touch .grad
            return
        if self.on_forward is not None:
            self.on_forward()
        self._hook_trainable()
        x, device = args[0] if args else None, self._device
        cast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        self.forwards.append(
            Forward(
                inputs=x,
                input_version=_ops.version(x) if isinstance(x, Tensor) else None,
                versions={id(p): _ops.version(p) for p in self._params},
                rng=rng_state(device),
                autocast=cast,
                modes=_trained.modes(self.model),
                buffers=_trained.buffers(self.model),
            )
        )

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not (self._on() and self.forwards and isinstance(output, Tensor) and self.own(module)):
            return
        fwd = self.forwards[-1]
        fwd.output, fwd.rng_after = output.detach(), rng_state(self._device)
        if fwd.buffers is not None:  # a buffer the forward updated and then read: the value it read
            fwd.buffers.update(_trained.read_after_update(self.model))
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

    def facts(self, params: Sequence[Tensor]) -> Facts:
        """Return what was recorded since the last reset, for the trainable ``params`` of this step."""
        return Facts(
            forwards=list(self.forwards),
            built=self._accumulations(params),
            device=self._device,
            unwritten=any(p.grad is not None and p not in self.written for p in params),
            bypassed=self.tap and any(p in self.written and p not in self.parts for p in params),
            parts=dict(self.parts) if self.tap else None,
        )

    def _accumulations(self, params: Sequence[Tensor]) -> int:
        """Return how many backward passes built ``.grad`` (counted since it was last fresh), the most over params."""
        most = 0
        for p in params:
            events = self.events.get(p, [])
            fresh = [bool(e) if isinstance(e, bool) else bool(e.item()) for e in events]
            since = len(fresh) - max((i for i, f in enumerate(fresh) if f), default=0)
            most = max(most, since if events else 0)
        return most


@dataclass
class Facts:
    """What the recorder saw between two probed steps: the input of :func:`alphalib.probe.evidence.judge`."""

    forwards: list[Forward]  #: the grad-enabled forward passes of the model on its own parameters
    built: int  #: backward passes that accumulated into ``.grad`` since it was last fresh (the most over params)
    device: torch.device  #: where the parameters live (whose RNG the forwards drew from)
    unwritten: bool = False  #: some parameter has a ``.grad`` that no backward pass wrote
    bypassed: bool = False  #: some parameter's ``.grad`` was written, but nothing reached it through the output
    #: parameter -> what reached it through the output (summing to :math:`c\,\nabla\ell`), when tapped
    parts: dict[Tensor, list[Tensor]] | None = None


class _Tap:
    """A node's post-hook: hand what it sends to parameters' ``.grad`` to the recorder."""

    def __init__(self, recorder: Recorder, feeds: list[tuple[int, Tensor]]):
        self._recorder, self.feeds = weakref.ref(recorder), feeds

    def __call__(self, grad_inputs: tuple, grad_outputs: tuple) -> None:
        w = self._recorder()
        if w is not None and w.armed:
            for j, p in self.feeds:
                if grad_inputs[j] is not None:
                    w.parts.setdefault(p, []).append(grad_inputs[j])


class _ParamHook:
    """A parameter's hook before (is ``.grad`` fresh?) or after an accumulation (count it)."""

    def __init__(self, recorder: Recorder, param: Tensor, *, before: bool):
        self._recorder, self._param, self.before = weakref.ref(recorder), weakref.ref(param), before

    def __call__(self, arg: Tensor) -> None:
        w, p = self._recorder(), self._param()
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
