r"""What the training step leaves for the sweep: activations, backward errors and dropout draws, kept by reference.

Two captures, one interface for the probe (``active``, ``own``, ``output``, ``reused``, ``uncovered``, ``clear``,
``remove``):

* :class:`Capture` hooks the modules that have a rule (:mod:`alphalib.fast.layers`) and keeps what each rule
  names: its input or output, the error at its output and, through a view of the input that is the module's own,
  the error at its input.
* :class:`OpCapture` records, with a dispatch mode (:data:`alphalib._ops.DispatchMode`) entered for the
  model's own forward pass only, every ATen operation that forward ran on tensors with autograd history, and
  hooks the autograd node of each operation with a second derivative (:data:`alphalib.fast.ops.CURVED`) to keep
  the error at its output and, for a product with a parameter, the error at its other operand.

Both keep references to tensors the step computed anyway: nothing is recomputed or copied during training.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from .. import _ops
from .._function import rng_state
from .._hooks import Hook
from . import ops as _oprules
from .layers import Rule, rule_for
from .ops import Op


class Capture:
    """Hooks that keep, from the training step, what the rules of ``model``'s modules need.

    With ``sweep=False`` only the model's output is kept (what the backends that reuse the training loss need).
    """

    def __init__(self, model: nn.Module, *, sweep: bool = True, errors: bool = False):
        self.active = True
        self.foreign = False  # the current forward does not run on the model's own parameters
        self.own: Callable[[nn.Module], bool] | None = None  #: tells such forwards apart (set by the probe)
        # (built for models the module rules cover, see alphalib.fast.capture_for: every module has a rule)
        self.rules: dict[nn.Module, Rule] = {m: cast(Rule, rule_for(m)) for m in model.modules()} if sweep else {}
        self.inputs: dict[nn.Module, Tensor] = {}
        self.outputs: dict[nn.Module, Tensor] = {}
        self.errors_out: dict[nn.Module, Tensor] = {}
        self.errors_in: dict[nn.Module, Tensor] = {}
        self.rng: dict[nn.Module, tuple[Tensor, torch.Size, tuple[int, ...]]] = {}  #: RNG state, input shape, strides
        self.output: Tensor | None = None  # the model's output
        self.reused = False  # a module ran twice in one forward: its tensors are ambiguous
        self.uncovered: str | None = None  # (the module rules cover the model)
        needs: dict[nn.Module, set[str]] = {m: set(r.keep) for m, r in self.rules.items()}
        for m, r in self.rules.items():
            for name, keep in r.children.items():
                needs[getattr(m, name)] |= keep
        if not errors:
            needs = {m: {k for k in n if not k.startswith("error")} for m, n in needs.items()}
        self.needs = needs
        self._handles = [
            model.register_forward_pre_hook(Hook(self, "_start")),
            model.register_forward_hook(Hook(self, "_keep_output")),
        ]
        for m, need in needs.items():
            if need - {"rng", "error_in"}:
                self._handles.append(m.register_forward_hook(Hook(self, "_keep")))
            if "rng" in need:
                self._handles.append(m.register_forward_pre_hook(Hook(self, "_keep_rng")))
            if "error_in" in need:
                self._handles.append(m.register_forward_pre_hook(Hook(self, "_own_input")))

    def _on(self) -> bool:
        return self.active and not self.foreign and torch.is_grad_enabled()

    def _start(self, module: nn.Module, args: tuple) -> None:
        self.foreign = self.own is not None and not self.own(module)  # functional_call: not the training step
        if self._on():  # a new forward pass of the whole model: keep only its tensors
            self.clear()

    def _keep_output(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self._on():
            self.output = output
        self.foreign = False

    def _keep_rng(self, module: nn.Dropout, args: tuple) -> None:
        if self._on() and args and module.training and module.p > 0:  # dropout: the state its mask is drawn from
            self.reused |= module in self.rng
            x = args[0]
            self.rng[module] = rng_state(x.device), x.shape, x.stride()  # the mask follows the input's layout

    def _own_input(self, module: nn.Module, args: tuple) -> tuple | None:
        """Hand the module a view of its input, so that the error kept there flows through this module alone.

        The input may feed other consumers too (a residual connection); the view is this module's own.
        """
        if not (self._on() and args and isinstance(args[0], Tensor) and args[0].requires_grad):
            return None
        self.reused |= module in self.errors_in
        x = args[0].view_as(args[0])
        x.register_hook(lambda grad: self.errors_in.__setitem__(module, grad))
        return (x, *args[1:])

    def _keep(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not (self._on() and args and isinstance(output, Tensor)):  # else keep nothing: the step goes generic
            return
        need = self.needs[module]
        if module in self.inputs or module in self.outputs:
            self.reused = True
        x = args[0]
        if "input" in need:
            self.inputs[module] = x
        if "output" in need:
            self.outputs[module] = output
        if "sign" in need:  # (leaky) ReLU: one byte per entry instead of the output
            self.outputs[module] = output > 0
        if "pool" in need:  # max pooling: the argmax autograd saved for the backward, else the input
            idx = _ops.pool_indices(output)
            self.outputs[module] = x if idx is None else idx
        if "error_out" in need and output.requires_grad:
            output.register_hook(lambda grad: self.errors_out.__setitem__(module, grad))

    def clear(self) -> None:
        """Drop the references to the last step's tensors."""
        for kept in (self.inputs, self.outputs, self.errors_out, self.errors_in, self.rng):
            kept.clear()
        self.output, self.reused = None, False

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()


# ---- recorded operations -----------------------------------------------------------------------------------


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


class _Spec(NamedTuple):
    """What the recorder needs to know of one ATen overload, looked up once per process."""

    rule: _oprules.Rule | None
    known: bool  #: it has a rule, or is in FREE
    view: bool
    curved: bool
    written: tuple[int, ...]  #: the positions of the arguments it writes in place (from its schema)
    nested: bool  #: it takes a list of tensors


_SPECS: dict[Any, _Spec] = {}


def _spec(func: Any) -> _Spec:
    spec = _SPECS.get(func)
    if spec is None or not spec.known:  # (an op without a rule is looked up again: one may have been added)
        rule = _oprules.RULES.get(func, _oprules.RULES.get(func.overloadpacket))
        schema = _ops.schema_arguments(func)
        written = tuple(i for i, a in enumerate(schema) if a.alias_info is not None and a.alias_info.is_write)
        nested = any(isinstance(a.type, torch.ListType) for a in schema)
        spec = _SPECS[func] = _Spec(
            rule,
            rule is not None or func in _oprules.FREE,
            func.overloadpacket in _oprules.VIEWS,
            rule in _oprules.CURVED,
            written,
            nested,
        )
    return spec


_INSIDE = (os.path.dirname(torch.__file__), os.path.dirname(__file__))  # torch's files and the fast path's


def caller() -> str:
    """Say where the model's own code called the current operation: the innermost frame outside torch."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame = frame.f_back
    return "" if frame is None else f" (at {frame.f_code.co_filename}, line {frame.f_lineno})"


class _Recorder(_ops.DispatchMode):
    def __init__(self, cap: OpCapture):
        super().__init__()
        self.cap = cap

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if self.cap.uncovered is not None:
            return func(*args, **kwargs) if kwargs else func(*args)
        spec = _spec(func)
        ins = _tensors(args) + _tensors(kwargs) if spec.nested or kwargs else [a for a in args if isinstance(a, Tensor)]
        follow = any(t.requires_grad for t in ins)  # else its output has no tangent
        before = args[0].clone() if follow and func in _oprules.COPIED else None
        out = func(*args, **kwargs) if kwargs else func(*args)
        op = self.cap.record(func, spec, args, kwargs or {}, out, ins) if follow else None
        if op is not None:
            op.before = before
        return out


class OpCapture:
    """Record the operations of ``model``'s grad-enabled forward passes on its own parameters, and their errors."""

    def __init__(self, model: nn.Module, *, errors: bool):
        self.active, self.errors = True, errors
        self.own: Callable[[nn.Module], bool] | None = None
        self.reused = False  # module reuse is ordinary here
        self.ops: list[Op] = []
        self.kept: dict[Op, tuple[Tensor, ...]] = {}  #: op -> its output's error (and its other operand's)
        self._pending: dict[int, tuple[Op, Tensor, float]] = {}  #: outputs whose autograd node is not hooked yet
        self._params = {id(p) for p in model.parameters()}
        self._derived: set[int] = set()  #: parameters and the views of them recorded in this forward
        self.output: Tensor | None = None
        self.uncovered: str | None = None
        self.refused: str | None = None  #: why an earlier forward could not be followed: recording stops for good
        self._mode: _Recorder | None = None
        self._handles = [
            model.register_forward_pre_hook(Hook(self, "_start")),
            model.register_forward_hook(Hook(self, "_stop"), always_call=True),
        ]

    def _start(self, module: nn.Module, args: tuple) -> None:
        if self._mode is not None or not (self.active and torch.is_grad_enabled()):
            return
        if self.own is not None and not self.own(module):  # functional_call: not the training step
            return
        self.clear()
        if self.refused:
            self.uncovered = self.refused
            return
        self._derived = set(self._params)
        self._mode = _Recorder(self)
        self._mode.__enter__()

    def _stop(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._mode is None:
            return
        mode, self._mode = self._mode, None
        mode.__exit__(None, None, None)
        if not isinstance(output, Tensor) and self.uncovered is None:  # (a structural fact: recording stops too)
            self.uncovered = self.refused = (
                f"the model returns a {type(output).__name__}, not a tensor; give the "
                "probe a model that returns the tensor loss_fn takes"
            )
        self.output = output if isinstance(output, Tensor) else None
        self.watch([y for _, y, _ in self._pending.values()])
        self._pending.clear()

    def record(self, func: Any, spec: _Spec, args: tuple, kwargs: dict, out: Any, ins: list[Tensor]) -> Op | None:
        """Keep one operation the training forward ran (or, without a rule, say where it ran and keep nothing)."""
        if self._pending:
            self.watch(ins)
        if not spec.known:  # keep no more tensors: this step goes generic, and so will the next ones
            self.uncovered = self.refused = f"the forward pass ran {func}, which has no tangent rule yet{caller()}"
            self.ops.clear()
            return None
        outs = [out] if isinstance(out, Tensor) else _tensors(out)
        versions = {id(t): _ops.version(t) for t in ins}
        for t in outs:
            versions[id(t)] = _ops.version(t)
        for i in spec.written:  # autograd bumps their version once the op has returned
            versions[id(args[i])] += 1
        if spec.view and id(ins[0]) in self._derived:
            self._derived.update(id(y) for y in outs)
        op = Op(func, args, kwargs, outs, ins, versions, spec.rule, spec.view)
        self.ops.append(op)
        if self.errors and spec.curved and _oprules.needs_error(func, args):
            op.other = _oprules.other_operand(func, args, self._derived)
            self._pending[id(outs[0])] = (op, outs[0], versions[id(outs[0])])
        return op

    def watch(self, tensors: Sequence[Tensor]) -> None:
        """Hook the nodes of pending outputs among ``tensors`` while they still hold the version their op made.

        An operation's output gets its autograd node only after the op returns; the next op that reads it (or the
        end of the forward pass) finds it there. The node's hook sees the error at the op's output (and at its
        inputs) even when an in-place op (``relu_``, ``+=``) changes the tensor later.
        """
        for y in tensors:
            found = self._pending.get(id(y))
            if found is not None and found[1] is y:
                op, _, version = self._pending.pop(id(y))
                if _ops.version(y) == version and y.grad_fn is not None:
                    y.grad_fn.register_hook(functools.partial(self._keep_error, op))
                    op.hooked = True

    def _keep_error(self, op: Op, grad_inputs: tuple, grad_outputs: tuple) -> None:
        if grad_outputs[0] is None:  # the op's first output does not reach the loss: its error is zero
            return
        i = op.other
        self.kept[op] = (grad_outputs[0],) if i is None or grad_inputs[i] is None else (grad_outputs[0], grad_inputs[i])

    def clear(self) -> None:
        """Drop the references to the last step's tensors."""
        self.ops, self.kept, self.output, self.uncovered, self._pending = [], {}, None, None, {}

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
