r"""The fast path over the operations the training step ran, for models the module rules do not cover.

Where :func:`alphalib.tangent.covers` finds a module without a rule (a residual block, a functional call, a
module used twice), the probe records instead what the model's training forward executed, one ATen operation at
a time (a :class:`~torch.utils._python_dispatch.TorchDispatchMode` entered for the model's own forward pass
only), and keeps the error :math:`\delta_y = \partial L/\partial y` at the output of every operation whose
second derivative is not zero. After the optimizer step the tangent pass runs over that list: each operation
maps the tangents of its inputs along :math:`\Delta` to that of its output and adds its own second-order term,

.. math::

    \Delta^\top H \Delta = \dot f^\top \nabla^2_f \ell\, \dot f + \sum_{\mathrm{ops}\ y = \phi(x_1, \dots)}
    \langle \delta_y, \ddot y \rangle ,

where :math:`\ddot y` collects the op's second derivatives along the input tangents (for a bilinear op
:math:`y = a b`, :math:`\ddot y = 2\dot a \dot b`; for an elementwise :math:`y = \sigma(x)`,
:math:`\ddot y = \sigma''(x)\dot x^2`). Module reuse, residual connections, functional calls and dropout (its
mask is one of the recorded tensors) are then ordinary. An operation without a rule, or an input changed in
place after an operation read it, sends the step to the generic path with the op named in ``fallback``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from ._function import LossFn
from ._proof import Hook
from .tangent import _output_terms, inner, normalization_terms, plus, standardize

aten = torch.ops.aten


class NoRule(Exception):
    """The recorded step holds an operation the tangent pass cannot follow (the message says which)."""


@dataclass(eq=False)
class Op:
    """One recorded operation: what ran, on what, and the version of each tensor when it ran."""

    func: Any
    args: tuple
    kwargs: dict
    out: Any
    ins: list[Tensor]  #: the tensor arguments
    versions: dict[int, int]  #: ``id(tensor) -> tensor._version`` for the tensor arguments and outputs
    rule: Rule | None  #: ``None`` for the operations in :data:`FREE`


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _written(func: Any, args: tuple) -> list[Tensor]:
    """Return the arguments ``func`` writes in place (from its schema)."""
    schema = func._schema.arguments
    return [a for a, spec in zip(args, schema)
            if isinstance(a, Tensor) and spec.alias_info is not None and spec.alias_info.is_write]


class _Recorder(TorchDispatchMode):
    def __init__(self, cap: OpCapture):
        super().__init__()
        self.cap = cap

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        cap, ins = self.cap, _tensors(args) + _tensors(kwargs)
        if cap.uncovered is None and any(t.requires_grad for t in ins):  # else its output has no tangent
            cap.watch(ins)
            rule = RULES.get(func, RULES.get(func.overloadpacket))
            if rule is not None or func in FREE:
                versions = {id(t): t._version for t in ins + _tensors(out)}
                for t in _written(func, args):  # autograd bumps their version once the op has returned
                    versions[id(t)] += 1
                op = Op(func, args, kwargs, out, ins, versions, rule)
                cap.ops.append(op)
                if cap.errors and rule in CURVED:
                    cap.expect(op)
            else:  # keep no more tensors: this step goes generic
                cap.uncovered = f"the forward pass ran {func}, which has no tangent rule yet"
                cap.ops.clear()
        return out


class OpCapture:
    """Record the operations of ``model``'s grad-enabled forward passes on its own parameters, and their errors.

    The same interface as :class:`alphalib.tangent.Capture` for the probe (``active``, ``own``, ``output``,
    ``reused``, ``clear``, ``remove``); ``uncovered`` says why the last forward cannot take this path.
    """

    def __init__(self, model: nn.Module, *, errors: bool):
        self.active, self.errors = True, errors
        self.own: Callable[[nn.Module], bool] | None = None
        self.reused = False  # module reuse is ordinary here
        self.ops: list[Op] = []
        self.kept: dict[Op, Tensor] = {}  #: op -> the error at its (first) output, from the training backward
        self._pending: dict[int, tuple[Op, Tensor, int]] = {}  #: outputs whose autograd node is not hooked yet
        self.output: Tensor | None = None
        self.uncovered: str | None = None
        self._mode: _Recorder | None = None
        self._handles = [model.register_forward_pre_hook(Hook(self, "_start")),
                         model.register_forward_hook(Hook(self, "_stop"), always_call=True)]

    def _start(self, module: nn.Module, args: tuple) -> None:
        if self._mode is not None or not (self.active and torch.is_grad_enabled()):
            return
        if self.own is not None and not self.own(module):  # functional_call: not the training step
            return
        self.clear()
        self._mode = _Recorder(self)
        self._mode.__enter__()

    def _stop(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._mode is None:
            return
        mode, self._mode = self._mode, None
        mode.__exit__(None, None, None)
        if not isinstance(output, Tensor):
            self.uncovered = "the model's output is not a tensor"
        self.output = output if isinstance(output, Tensor) else None
        self.watch([y for _, y, _ in self._pending.values()])
        self._pending.clear()

    def expect(self, op: Op) -> None:
        """Keep the error at ``op``'s first output: hook the autograd node that made it, once autograd has set it."""
        y = _tensors(op.out)[0]
        self._pending[id(y)] = (op, y, y._version)

    def watch(self, tensors: Sequence[Tensor]) -> None:
        """Hook the nodes of pending outputs among ``tensors`` while they still hold the version their op made.

        An operation's output gets its autograd node only after the op returns; the next op that reads it (or the
        end of the forward pass) finds it there. A node's pre-hook sees the error at the op's output even when an
        in-place op (``relu_``, ``+=``) changes the tensor later.
        """
        for y in tensors:
            found = self._pending.get(id(y))
            if found is not None and found[1] is y:
                op, _, version = self._pending.pop(id(y))
                if y._version == version and y.grad_fn is not None:
                    y.grad_fn.register_prehook(functools.partial(self._keep_error, op))

    def _keep_error(self, op: Op, grads: tuple[Tensor, ...]) -> None:
        self.kept[op] = grads[0]

    def clear(self) -> None:
        """Drop the references to the last step's tensors."""
        self.ops, self.kept, self.output, self.uncovered, self._pending = [], {}, None, None, {}

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()


class _Sweep:
    """Tangents (and, for parameters, values at θ_t) of the recorded tensors, by ``id``."""

    def __init__(self, cap: OpCapture, deltas: dict[int, Tensor], params: Sequence[Tensor], exact: bool):
        self.cap, self.exact = cap, exact
        self.tangents: dict[int, Tensor] = dict(deltas)
        self.values: dict[int, Tensor] = {id(p): p.detach() - deltas[id(p)] for p in params if id(p) in deltas}
        self.terms: list[Tensor] = []

    def tangent(self, x: Any) -> Tensor | None:
        return self.tangents.get(id(x)) if isinstance(x, Tensor) else None

    def value(self, x: Any, op: Op) -> Any:
        """Return ``x`` as the op read it (parameters and their views at θ_t); refuse one changed in place since."""
        if not isinstance(x, Tensor):
            return x
        if id(x) in self.values:
            return self.values[id(x)]
        if x._version != op.versions[id(x)]:
            raise NoRule(f"a tensor read by {op.func} was changed in place afterwards")
        return x

    def error(self, op: Op) -> Tensor:
        """Return the error at ``op``'s first output, from the training backward."""
        try:
            return self.cap.kept[op]
        except KeyError:
            raise NoRule(f"the error at the output of {op.func} was not seen in the backward pass") from None

    def add(self, op: Op, second: Tensor) -> None:
        """Add :math:`\\langle \\delta_y, \\ddot y\\rangle` for ``op``'s first output :math:`y`."""
        err = self.error(op)
        self.terms.append(inner(err, second.expand(err.shape)))


class _Values:
    """The op's arguments as it read them, checked one by one when a rule asks (see :meth:`_Sweep.value`)."""

    def __init__(self, sw: _Sweep, op: Op):
        self.sw, self.op = sw, op

    def __len__(self) -> int:
        return len(self.op.args)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self.sw.value(a, self.op) for a in self.op.args[i]]
        return self.sw.value(self.op.args[i], self.op)


@torch.no_grad()
def op_tangent_pass(
    cap: OpCapture, loss_fn: LossFn, targets: Tensor, deltas: dict[int, Tensor], params: Sequence[Tensor], *,
    exact: bool, scale: float = 1.0,
) -> tuple[float, float, float]:
    """Return loss, :math:`\\Delta^\\top g` and :math:`\\Delta^\\top H\\Delta` (GGN unless ``exact``) at θ_t.

    Like :func:`alphalib.tangent.tangent_pass`, over the recorded operations; ``params`` hold θ_{t+1}.
    """
    if cap.uncovered is not None:
        raise NoRule(cap.uncovered)
    sw = _Sweep(cap, deltas, params, exact)
    for op in cap.ops:
        moved = any(id(x) in sw.values for x in op.ins)  # it reads parameters (or views of them) at θ_t
        if moved or any(id(x) in sw.tangents for x in op.ins):
            _apply(sw, op, moved)
    out = cap.output.detach()
    loss, slope, curvature = _output_terms(loss_fn, sw.values.get(id(cap.output), out), targets,
                                           sw.tangent(cap.output))
    if exact and sw.terms:
        curvature = curvature + torch.stack(sw.terms).double().sum() / scale
    values = torch.stack([loss.double(), slope.double(), curvature.double()]).tolist()
    return values[0], values[1], values[2]


def _apply(sw: _Sweep, op: Op, moved: bool) -> None:
    """Run the op's rule: store its output's tangent (and its value at θ_t if it reads a parameter's)."""
    if moved and op.func.overloadpacket in VIEWS:  # a view of a parameter: recompute it at θ_t
        value = op.func(*[sw.value(a, op) for a in op.args], **op.kwargs)
        for x, v in zip(_tensors(op.out), _tensors(value)):
            sw.values[id(x)] = v
    if op.rule is None:  # FREE: no tangent
        return
    out = op.rule(sw, op, _Values(sw, op), [sw.tangent(a) for a in op.args])
    for y, t in zip(_tensors(op.out), out if isinstance(out, (tuple, list)) else [out]):
        if t is not None:
            sw.tangents[id(y)] = t


# ---- rules -------------------------------------------------------------------------------------------------
# A rule gets the sweep, the op, its arguments' values as the op read them and their tangents (None: zero), and
# returns the output's tangent (a list for ops with several outputs); it adds its second-order term itself.

Rule = Callable[[_Sweep, Op, list, list], Any]
RULES: dict[Any, Rule] = {}
#: operations whose output has no tangent whatever their inputs (a detached copy, a fresh tensor shaped like one)
FREE = {aten.detach.default, aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default}
#: rules of operations with a second derivative along their inputs: their output errors are kept
CURVED: set[Rule] = set()


def rule(*funcs: Any, curved: bool = False) -> Callable[[Rule], Rule]:
    """Register a rule for ATen operations (overload packets or single overloads)."""

    def deco(fn: Rule) -> Rule:
        RULES.update(dict.fromkeys(funcs, fn))
        if curved:
            CURVED.add(fn)
        return fn

    return deco


#: operations linear in their first tensor argument, the others being fixed (views, reductions, copies)
VIEWS = {aten.t, aten.view, aten._unsafe_view, aten.reshape, aten.transpose, aten.permute, aten.unsqueeze,
         aten.squeeze, aten.expand, aten.slice, aten.select, aten.alias, aten.clone, aten.split,
         aten.split_with_sizes, aten.unbind, aten.flatten}
LINEAR = VIEWS | {aten.sum, aten.mean, aten.neg, aten.embedding, aten.avg_pool1d, aten.avg_pool2d,
                  aten._adaptive_avg_pool2d, aten.adaptive_avg_pool1d}


@rule(*LINEAR)
def _linear(sw: _Sweep, op: Op, vals: list, tans: list) -> Any:
    if tans[0] is None:
        return None
    if any(t is not None for t in tans[1:]):
        raise NoRule(f"{op.func} is linear in its first argument only")
    if op.func.overloadpacket in (aten.view, aten._unsafe_view):  # the tangent's strides may differ from x's
        return tans[0].reshape(vals[1])
    return op.func(tans[0], *vals[1:], **op.kwargs)


@rule(aten.add.Tensor, aten.sub.Tensor)
def _add(sw: _Sweep, op: Op, vals: list, tans: list) -> Tensor | None:
    a, b = tans[0], tans[1] if len(tans) > 1 else None
    alpha = op.kwargs.get("alpha", 1)
    if b is not None:
        b = b * (alpha if op.func is aten.add.Tensor else -alpha)
    out = plus(a, b)
    return None if out is None else out.expand(op.out.shape) if out.shape != op.out.shape else out


@rule(aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar)
def _scalar(sw: _Sweep, op: Op, vals: list, tans: list) -> Tensor | None:
    if tans[0] is None:
        return None
    return tans[0] * vals[1] if op.func is aten.mul.Scalar else tans[0] / vals[1] \
        if op.func is aten.div.Scalar else tans[0]


@rule(aten.mul.Tensor, curved=True)
def _mul(sw: _Sweep, op: Op, vals: list, tans: list) -> Tensor | None:
    (a, b), (ta, tb) = vals, tans
    if ta is not None and tb is not None and sw.exact:
        sw.add(op, 2 * ta * tb)
    return plus(None if ta is None else ta * b, None if tb is None else a * tb)


@rule(aten.div.Tensor)
def _div(sw: _Sweep, op: Op, vals: list, tans: list) -> Tensor | None:
    if tans[1] is not None:
        raise NoRule(f"{op.func} by a tensor that changes along the step")
    return None if tans[0] is None else tans[0] / vals[1]


def _product(sw: _Sweep, op: Op, a: Tensor, b: Tensor, ta: Tensor | None, tb: Tensor | None,
             mm: Callable[[Tensor, Tensor], Tensor]) -> Tensor | None:
    if ta is not None and tb is not None and sw.exact:
        sw.add(op, 2 * mm(ta, tb))
    return plus(None if ta is None else mm(ta, b), None if tb is None else mm(a, tb))


@rule(aten.mm, aten.bmm, curved=True)
def _mm(sw: _Sweep, op: Op, vals: list, tans: list) -> Tensor | None:
    return _product(sw, op, vals[0], vals[1], tans[0], tans[1], op.func)


@rule(aten.addmm, curved=True)
def _addmm(sw: _Sweep, op: Op, vals: list, tans: list) -> Tensor | None:
    beta, alpha = op.kwargs.get("beta", 1), op.kwargs.get("alpha", 1)
    if (beta, alpha) != (1, 1):
        raise NoRule(f"{op.func} with beta or alpha")
    product = _product(sw, op, vals[1], vals[2], tans[1], tans[2], torch.mm)
    return plus(None if tans[0] is None else tans[0].expand(op.out.shape), product)


@rule(aten.relu)
def _relu(sw: _Sweep, op: Op, vals: list, tans: list) -> Tensor | None:
    return None if tans[0] is None else tans[0] * (op.out > 0)


#: elementwise functions of one tensor; their first and second derivatives come from autograd on the input
ELEMENTWISE = {aten.tanh: torch.tanh, aten.sigmoid: torch.sigmoid, aten.exp: torch.exp, aten.log: torch.log,
               aten.silu: torch.nn.functional.silu, aten.softplus: torch.nn.functional.softplus}


@rule(*ELEMENTWISE, aten.gelu, curved=True)
def _elementwise(sw: _Sweep, op: Op, vals: list, tans: list) -> Tensor | None:
    if tans[0] is None:
        return None
    if op.func.overloadpacket is aten.gelu:
        approximate = op.kwargs.get("approximate", "none")
        fn = lambda x: torch.nn.functional.gelu(x, approximate=approximate)  # noqa: E731
    else:
        base = ELEMENTWISE[op.func.overloadpacket]
        fn = (lambda x: base(x, *vals[1:])) if len(vals) > 1 else base
    with torch.enable_grad():
        x = vals[0].detach().requires_grad_(True)
        (d1,) = torch.autograd.grad(fn(x).sum(), x, create_graph=sw.exact)
        d2 = torch.autograd.grad(d1.sum(), x)[0] if sw.exact else None
    if sw.exact:
        sw.add(op, d2 * tans[0].square())
    return d1.detach() * tans[0]


@rule(aten.cat)
def _cat(sw: _Sweep, op: Op, vals: list, tans: list) -> Tensor:
    parts = [sw.tangent(x) for x in op.args[0]]
    dim = vals[1] if len(vals) > 1 else op.kwargs.get("dim", 0)
    return torch.cat([torch.zeros_like(x) if t is None else t for x, t in zip(op.args[0], parts)], dim)


@rule(aten.relu_)
def _relu_(sw: _Sweep, op: Op, vals: _Values, tans: list) -> Tensor | None:
    return None if tans[0] is None else tans[0] * (vals[0] > 0)  # the tensor as relu_ left it


@rule(aten.add_.Tensor)
def _add_(sw: _Sweep, op: Op, vals: _Values, tans: list) -> Tensor | None:
    b = tans[1]
    return plus(tans[0], None if b is None else b * op.kwargs.get("alpha", 1))


@rule(aten.convolution, curved=True)
def _convolution(sw: _Sweep, op: Op, vals: _Values, tans: list) -> Tensor | None:
    r"""Bilinear in input and weight: :math:`\dot y = \dot x \star W + x \star \dot W + \dot b`,
    :math:`\ddot y = 2\dot x \star \dot W`."""
    rest = op.args[3:]
    conv = lambda x, w: aten.convolution(x, w, None, *rest)  # noqa: E731
    out = _product(sw, op, vals[0], vals[1], tans[0], tans[1], conv)
    db = tans[2] if len(tans) > 2 else None
    if db is not None:
        out = plus(out, db.view(1, -1, *([1] * (op.out.dim() - 2))).expand(op.out.shape))
    return out


@rule(aten.max_pool2d_with_indices, aten.max_pool1d_with_indices)
def _max_pool(sw: _Sweep, op: Op, vals: _Values, tans: list) -> list:
    t, idx = tans[0], op.out[1]
    if t is None:
        return [None, None]
    dims = idx.dim() - 2
    return [t.flatten(-dims).gather(-1, idx.flatten(-dims)).view(idx.shape), None]


def _normalize(sw: _Sweep, op: Op, x: Tensor, t: Tensor | None, weight: Any, tw: Tensor | None, tb: Tensor | None,
               dims: tuple[int, ...], shape: tuple[int, ...], eps: float,
               stats: tuple[Tensor, Tensor] | None = None) -> Tensor | None:
    r"""Finish :math:`y = \gamma \hat x + \beta` (:func:`alphalib.tangent.standardize` over ``dims``), γ and β
    broadcast as ``shape``, and add its second-order terms (:func:`alphalib.tangent.normalization_terms`)."""
    x_hat, r, t_hat, u = standardize(x, t, dims, eps, stats)
    gamma = None if weight is None else weight.view(shape)
    dgamma, dbeta = (None if v is None else v.view(shape) for v in (tw, tb))
    if sw.exact and t_hat is not None and (dgamma is not None or u is not None):
        err = sw.error(op).reshape(x.shape)  # (GroupNorm's is grouped like x)
        sw.terms.extend(normalization_terms(err, gamma, dgamma, x_hat, r, t_hat, u, dims))
    out = None if t_hat is None else t_hat if gamma is None else t_hat * gamma
    return plus(plus(out, None if dgamma is None else dgamma * x_hat), None if dbeta is None else dbeta.expand_as(x))


@rule(aten.native_batch_norm, curved=True)
def _native_batch_norm(sw: _Sweep, op: Op, vals: _Values, tans: list) -> list:
    x, training, eps = vals[0], op.args[5], op.args[7]
    dims, shape = (0, *range(2, x.dim())), (1, -1) + (1,) * (x.dim() - 2)
    stats = None if training else (vals[3].view(shape), torch.rsqrt(vals[4].view(shape) + eps))
    return [_normalize(sw, op, x, tans[0], vals[1], tans[1], tans[2], dims, shape, eps, stats), None, None]


@rule(aten.native_layer_norm, curved=True)
def _native_layer_norm(sw: _Sweep, op: Op, vals: _Values, tans: list) -> list:
    x, normalized, eps = vals[0], tuple(op.args[1]), op.args[4]
    dims = tuple(range(-len(normalized), 0))
    return [_normalize(sw, op, x, tans[0], vals[2], tans[2], tans[3], dims, normalized, eps), None, None]


@rule(aten._softmax, aten._safe_softmax, curved=True)
def _softmax(sw: _Sweep, op: Op, vals: _Values, tans: list) -> Tensor | None:
    r""":math:`\dot y = y(\dot x - s)`, :math:`\ddot y = y\big((\dot x - s)^2 - \langle y, (\dot x - s)^2\rangle\big)`,
    :math:`s = \langle y, \dot x\rangle` along ``dim``."""
    t, dim = tans[0], op.args[1]
    if t is None:
        return None
    y = sw.value(op.out, op)
    v = t - (y * t).sum(dim, keepdim=True)
    if sw.exact:
        v2 = v.square()
        sw.add(op, y * (v2 - (y * v2).sum(dim, keepdim=True)))
    return y * v


@rule(aten._log_softmax, curved=True)
def _log_softmax(sw: _Sweep, op: Op, vals: _Values, tans: list) -> Tensor | None:
    r""":math:`\dot y = \dot x - s`, :math:`\ddot y = -\langle p, (\dot x - s)^2\rangle` with :math:`p = e^y`
    along ``dim``."""
    t, dim = tans[0], op.args[1]
    if t is None:
        return None
    p = sw.value(op.out, op).exp()
    v = t - (p * t).sum(dim, keepdim=True)
    if sw.exact:
        sw.add(op, -(p * v.square()).sum(dim, keepdim=True))
    return v


@rule(aten.native_group_norm, curved=True)
def _native_group_norm(sw: _Sweep, op: Op, vals: _Values, tans: list) -> list:
    """GroupNorm: the normalization over each sample's group of channels and the spatial axes, γ and β per channel."""
    x, groups = vals[0], op.args[6]
    grouped = (x.shape[0], groups, -1)
    t = None if tans[0] is None else tans[0].reshape(grouped)
    channel = (1, -1) + (1,) * (x.dim() - 2)
    dgamma, dbeta = (None if v is None else v.view(channel).expand_as(x).reshape(grouped) for v in tans[1:3])
    gamma = None if vals[1] is None else vals[1].view(channel).expand_as(x).reshape(grouped)
    y = _normalize(sw, op, x.reshape(grouped), t, gamma, dgamma, dbeta, (2,), grouped, op.args[7])
    return [None if y is None else y.reshape(x.shape), None, None]



@rule(aten._scaled_dot_product_flash_attention_for_cpu, curved=True)
def _attention(sw: _Sweep, op: Op, vals: _Values, tans: list) -> list:
    r"""Attention :math:`O = PV`, :math:`P = \operatorname{softmax}(S)`, :math:`S = c\,QK^\top` (+ mask), recomputed.

    :math:`\dot S = c(\dot Q K^\top + Q \dot K^\top)`, :math:`\dot P = P(\dot S - s)`, :math:`\dot O = \dot P V +
    P\dot V`; :math:`\ddot O = \ddot P V + 2\dot P \dot V` with :math:`\ddot P = P\big((\dot S - s)^2 -
    \langle P, (\dot S - s)^2\rangle\big) + P(\ddot S - \langle P, \ddot S\rangle)`, :math:`\ddot S =
    2c\,\dot Q \dot K^\top` (row sums :math:`s = \langle P, \dot S\rangle` over the keys).
    """
    q, k, v = vals[0], vals[1], vals[2]
    tq, tk, tv = tans[0], tans[1], tans[2]
    dropout = op.args[3] if len(op.args) > 3 else op.kwargs.get("dropout_p", 0.0)
    causal = op.args[4] if len(op.args) > 4 else op.kwargs.get("is_causal", False)
    mask, scale = op.kwargs.get("attn_mask"), op.kwargs.get("scale")
    if dropout:
        raise NoRule("attention dropout inside the fused kernel: its mask cannot be replayed")
    if mask is not None and sw.tangent(mask) is not None:
        raise NoRule("an attention mask that changes along the step")
    c = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-2, -1) * c  # (recomputed: the fused kernel keeps only the log-sum-exp)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    p = torch.softmax(s, -1)
    kt = k.transpose(-2, -1)
    ds = plus(None if tq is None else tq @ kt * c, None if tk is None else q @ tk.transpose(-2, -1) * c)
    centred = None if ds is None else ds - (p * ds).sum(-1, keepdim=True)
    dp = None if ds is None else p * centred
    out = plus(None if dp is None else dp @ v, None if tv is None else p @ tv)
    if sw.exact and ds is not None:
        c2 = centred.square()
        ddp = p * (c2 - (p * c2).sum(-1, keepdim=True))
        if tq is not None and tk is not None:
            dds = 2 * c * (tq @ tk.transpose(-2, -1))
            ddp = ddp + p * (dds - (p * dds).sum(-1, keepdim=True))
        sw.add(op, ddp @ v if tv is None else ddp @ v + 2 * (dp @ tv))
    return [out, None]
