r"""Op rules: the fast path over the ATen operations the training forward ran, whatever the model's modules.

:class:`alphalib.fast.capture.OpCapture` records what the model's training forward executed, one ATen operation
at a time, with the error :math:`\delta_y = \partial L/\partial y` at the output of every operation whose second
derivative is not zero. After the optimizer step the sweep (:class:`alphalib.fast.sweep.OpSweep`) runs each
operation's rule: it maps the tangents of the op's inputs along :math:`\Delta` to that of its output and adds
the op's second-order term :math:`\langle \delta_y, \ddot y \rangle`, where :math:`\ddot y` collects the op's
second derivatives along the input tangents (for a bilinear op :math:`y = a b`, :math:`\ddot y = 2\dot a \dot b`;
for an elementwise :math:`y = \sigma(x)`, :math:`\ddot y = \sigma''(x)\dot x^2`). Module reuse, residual
connections, functional calls and dropout (its mask is one of the recorded tensors) are then ordinary.

A product with a parameter, :math:`y = a\,W` (``mm``, ``addmm``, ``convolution``), takes the module rules' two-product
form: with :math:`W` the *new* weights and :math:`\delta_a` the error at :math:`a` through this op (kept from the
same autograd node), :math:`U = \dot a W`, :math:`\dot y = U + (a - \dot a)\Delta_W` and
:math:`\langle\delta_y, \ddot y\rangle = 2(\langle\delta_y, U\rangle - \langle\delta_a, \dot a\rangle)`.

A rule is ``fn(sweep, op, vals, tans)``: ``vals`` are the op's arguments as it read them (parameters at
:math:`\theta_t`; an argument changed in place since is refused), ``tans`` their tangents (``None``: zero); it
returns the output's tangent (a list for ops with several outputs) and adds its term with
:meth:`OpSweep.add <alphalib.fast.sweep.OpSweep.add>`. An operation without a rule sends the step to the generic
path, and the record's ``fallback`` names the op and the line of the model's source that ran it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

import torch
from torch import Tensor

from .. import _ops
from .calculus import activation, attention, by_autograd, inner, normalization_terms, plus, standardize

if TYPE_CHECKING:
    from .capture import OpCapture

aten = torch.ops.aten


class NoRule(Exception):
    """The training step ran something the sweep cannot follow (the message says what, and where)."""


@dataclass(eq=False)
class Op:
    """One recorded operation: what ran, on what, and the version of each tensor when it ran."""

    func: Any
    args: tuple
    kwargs: dict
    outs: list[Tensor]  #: the tensor outputs
    ins: list[Tensor]  #: the tensor arguments
    versions: dict[int, float]  #: ``id(tensor) ->`` its version counter, for the tensor arguments and outputs
    rule: Rule | None  #: ``None`` for the operations in :data:`alphalib.fast.ops.FREE`
    view: bool  #: a view (or copy) of its first argument: recomputed at θ_t when that is a parameter
    other: int | None = None  #: for a product with a parameter: the index of its other operand (its error is kept)
    before: Tensor | None = None  #: the first argument before an op in :data:`COPIED` overwrote it
    hooked: bool = False  #: its autograd node is hooked to keep the error at its output

    @property
    def out(self) -> Any:
        """The first output."""
        return self.outs[0]


class OpSweep:
    """The sweep over recorded operations: tangents (and, for parameters, values at θ_t) of tensors, by ``id``.

    ``cap`` is the step's :class:`~alphalib.fast.capture.OpCapture`; ``params`` hold θ_{t+1}, ``deltas`` their steps.
    """

    def __init__(self, cap: OpCapture, deltas: dict[int, Tensor], params: Sequence[Tensor], *, exact: bool):
        self.cap, self.exact = cap, exact
        self.tangents: dict[int, Tensor] = dict(deltas)
        self.new: dict[int, Tensor] = {id(p): p.detach() for p in params if id(p) in deltas}  #: at θ_{t+1}
        self.values: dict[int, Tensor] = _AtTheta(self.new, deltas)  #: at θ_t
        self.terms: list[Tensor] = []

    def tangent(self, x: Any) -> Tensor | None:
        """Return the tangent of a recorded tensor (``None``: zero, or not a tensor)."""
        return self.tangents.get(id(x)) if isinstance(x, Tensor) else None

    def value(self, x: Any, op: Op) -> Any:
        """Return ``x`` as ``op`` read it (parameters and their views at θ_t); refuse one changed in place since."""
        if not isinstance(x, Tensor):
            return x
        if id(x) in self.new:  # (the keys of values at θ_t: parameters and their views)
            return self.values[id(x)]
        if _ops.version(x) != op.versions[id(x)]:
            raise NoRule(f"a tensor read by {op.func} was changed in place afterwards")
        return x

    def error(self, op: Op) -> Tensor | None:
        """Return the error at ``op``'s output from the training backward; ``None`` if it is zero.

        An op whose autograd node was hooked but never ran in the backward does not reach the loss (a value the
        model computes and drops): its error is zero. One whose node could not be hooked cannot be followed.
        """
        kept = self.cap.kept.get(op)
        if kept is not None:
            return kept[0]
        if op.hooked:
            return None
        raise NoRule(f"the error at {op.func} was not seen in the backward pass")

    def add(self, op: Op, second: Tensor) -> None:
        r"""Add :math:`\langle \delta_y, \ddot y\rangle` for ``op``'s first output :math:`y`."""
        err = self.error(op)
        if err is not None:
            self.terms.append(inner(err, second.expand(err.shape)))

    def run(self, op: Op) -> None:
        """Run ``op``'s rule if it reads a tangent or a parameter: store its outputs' tangents (and values at θ_t)."""
        moved = any(id(x) in self.new for x in op.ins)  # it reads parameters (or views of them) at θ_t
        if not (moved or any(id(x) in self.tangents for x in op.ins)):
            return
        if moved and op.view:  # a view of a parameter: recompute it at θ_t and θ_{t+1}
            for values in (self.values, self.new):
                value = op.func(*[values.get(id(a), a) for a in op.args], **op.kwargs)
                for x, v in zip(op.outs, value if isinstance(value, (tuple, list)) else [value], strict=False):
                    values[id(x)] = v
        if op.rule is None:  # no tangent
            return
        out = op.rule(self, op, _Values(self, op), [self.tangent(a) for a in op.args])
        for y, t in zip(
            op.outs, out if isinstance(out, (tuple, list)) else [out], strict=False
        ):  # a rule may give only the first outputs
            if t is not None:
                self.tangents[id(y)] = t


class _AtTheta(dict):
    """Values at θ_t by ``id``, for the keys of ``new`` (values at θ_{t+1}: parameters, and their views as the sweep
    recomputes them): a parameter's is computed as θ_{t+1} − Δ when a rule first reads it (the products with a
    weight read only θ_{t+1} and Δ, so most weights never need theirs); a view's is stored with its new one. Ask
    ``new`` what is held: membership stays a dict lookup on the sweep's hot path."""

    def __init__(self, new: dict[int, Tensor], deltas: dict[int, Tensor]):
        super().__init__()
        self.new, self.deltas = new, deltas

    def __missing__(self, i: int) -> Tensor:
        value = self[i] = self.new[i] - self.deltas[i]  # (KeyError: not a parameter, nor a view of one)
        return value

    def get(self, i: int, default: Any = None) -> Any:
        return self[i] if i in self.new else default


class Values(Protocol):
    """What a rule gets as ``vals``: the op's arguments as it read them, by position (a slice gives a list)."""

    def __len__(self) -> int: ...

    @overload
    def __getitem__(self, i: int) -> Any: ...

    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...


class _Values:
    """The op's arguments as it read them, checked one by one when a rule asks (see :meth:`OpSweep.value`)."""

    def __init__(self, sw: OpSweep, op: Op):
        self.sw, self.op = sw, op

    def __len__(self) -> int:
        return len(self.op.args)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self.sw.value(a, self.op) for a in self.op.args[i]]
        return self.sw.value(self.op.args[i], self.op)


# ---- rules -------------------------------------------------------------------------------------------------
# A rule gets the sweep, the op, its arguments' values as the op read them and their tangents (None: zero), and
# returns the output's tangent (a list for ops with several outputs); it adds its second-order term itself.

#: a rule ``fn(sweep, op, vals, tans) -> tangent`` (a list of tangents for ops with several outputs)
Rule = Callable[[OpSweep, Op, Values, list[Tensor | None]], Any]
_R = TypeVar("_R", bound=Rule)
RULES: dict[Any, Rule] = {}
#: operations whose output has no tangent whatever their inputs (a detached copy, a fresh tensor shaped like one)
FREE = {aten.detach.default, aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default}
#: rules of operations with a second derivative along their inputs: their output errors are kept
CURVED: set[Rule] = set()
#: in-place operations whose rule needs the value they overwrite: the recorder copies it first
COPIED = {aten.mul_.Tensor}


def rule(*funcs: Any, curved: bool = False) -> Callable[[_R], _R]:
    """Register a rule ``fn(sweep, op, vals, tans)`` for ATen operations (overload packets or single overloads).

    The rule gets the op's arguments as it read them (``vals``) and their tangents (``tans``, ``None`` for zero),
    returns its output's tangent (a list for several outputs) and adds its second-order term with
    :meth:`OpSweep.add` (see the module).

    Args:
        *funcs: The operations, e.g. ``torch.ops.aten.tanh`` (every overload) or ``torch.ops.aten.add.Tensor``.
        curved: Whether the operations have a second derivative along their inputs: the training step then keeps
            the error at their output for the rule.

    Returns:
        A decorator that registers ``fn`` and returns it unchanged.
    """

    def deco(fn: _R) -> _R:
        RULES.update(dict.fromkeys(funcs, fn))
        if curved:
            CURVED.add(fn)
        return fn

    return deco


#: operations linear in their first tensor argument, the others being fixed (views, reductions, copies)
VIEWS = {
    aten.t,
    aten.view,
    aten._unsafe_view,
    aten.reshape,
    aten.transpose,
    aten.permute,
    aten.unsqueeze,
    aten.squeeze,
    aten.expand,
    aten.slice,
    aten.select,
    aten.alias,
    aten.clone,
    aten.split,
    aten.split_with_sizes,
    aten.unbind,
    aten.flatten,
}
LINEAR = VIEWS | {
    aten.sum,
    aten.mean,
    aten.neg,
    aten.embedding,
    aten.avg_pool1d,
    aten.avg_pool2d,
    aten._adaptive_avg_pool2d,
    aten.adaptive_avg_pool1d,
    aten.unsafe_split,
    aten.unsafe_chunk,
    aten._to_copy,
    aten.nll_loss_forward,
}
#: views that change their input in place, and the out-of-place view their tangent takes
IN_PLACE_VIEWS = {
    aten.transpose_: aten.transpose.int,
    aten.t_: aten.t.default,
    aten.squeeze_: aten.squeeze.dim,
    aten.unsqueeze_: aten.unsqueeze.default,
}


@rule(*LINEAR, *IN_PLACE_VIEWS)
def _linear(sw: OpSweep, op: Op, vals: Values, tans: list) -> Any:
    if tans[0] is None:
        return None
    if any(t is not None for t in tans[1:]):
        raise NoRule(f"{op.func} is linear in its first argument only")
    packet = op.func.overloadpacket
    if packet in (aten.view, aten._unsafe_view):  # the tangent's strides may differ from x's
        return tans[0].reshape(vals[1])
    if packet in (aten.clone, aten.alias):  # tangents are never written in place: no copy needed
        return tans[0]
    if packet in IN_PLACE_VIEWS:
        return IN_PLACE_VIEWS[packet](tans[0], *op.args[1:])
    if packet is aten.nll_loss_forward:  # (loss, total weight): the weight is constant
        return [op.func(tans[0], *vals[1:], **op.kwargs)[0], None]
    return op.func(tans[0], *vals[1:], **op.kwargs)


@rule(aten.add.Tensor, aten.sub.Tensor)
def _add(sw: OpSweep, op: Op, vals: Values, tans: list) -> Tensor | None:
    a, b = tans[0], tans[1] if len(tans) > 1 else None
    alpha = op.kwargs.get("alpha", 1)
    if b is not None:
        b = b * (alpha if op.func is aten.add.Tensor else -alpha)
    out = plus(a, b)
    return None if out is None else out.expand(op.out.shape) if out.shape != op.out.shape else out


@rule(aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar)
def _scalar(sw: OpSweep, op: Op, vals: Values, tans: list) -> Tensor | None:
    if tans[0] is None:
        return None
    return (
        tans[0] * vals[1]
        if op.func is aten.mul.Scalar
        else tans[0] / vals[1]
        if op.func is aten.div.Scalar
        else tans[0]
    )


@rule(aten.mul.Tensor, curved=True)
def _mul(sw: OpSweep, op: Op, vals: Values, tans: list) -> Tensor | None:
    a, b, ta, tb = vals[0], vals[1], tans[0], tans[1]
    if ta is not None and tb is not None and sw.exact:
        sw.add(op, 2 * ta * tb)
    return plus(None if ta is None else ta * b, None if tb is None else a * tb)


@rule(aten.mul_.Tensor, curved=True)
def _mul_(sw: OpSweep, op: Op, vals: Values, tans: list) -> Tensor | None:
    r"""``a *= b``: as :func:`_mul`, with the old ``a`` the recorder copied before the op overwrote it."""
    (ta, tb), a, b = tans, op.before, vals[1]
    if ta is not None and tb is not None and sw.exact:
        sw.add(op, 2 * ta * tb)
    return plus(None if ta is None else ta * b, None if tb is None else a * tb)


@rule(aten.div.Tensor)
def _div(sw: OpSweep, op: Op, vals: Values, tans: list) -> Tensor | None:
    if tans[1] is not None:
        raise NoRule(f"{op.func} by a tensor that changes along the step")
    return None if tans[0] is None else tans[0] / vals[1]


#: bilinear operations and the positions of their two factors: their term needs both to move with the step
FACTORS = {
    aten.mul: (0, 1),
    aten.mul_: (0, 1),
    aten.mm: (0, 1),
    aten.bmm: (0, 1),
    aten.mv: (0, 1),
    aten.dot: (0, 1),
    aten.vdot: (0, 1),
    aten.addmm: (1, 2),
    aten.convolution: (0, 1),
}


def needs_error(func: Any, args: tuple) -> bool:
    """Whether ``func``'s second-order term can be non-zero: for a product, only if both factors require grad
    (multiplying by a constant, such as a dropout mask, is linear)."""
    factors = FACTORS.get(func.overloadpacket)
    return factors is None or all(isinstance(args[i], Tensor) and args[i].requires_grad for i in factors)


def other_operand(func: Any, args: tuple, params: set[int]) -> int | None:
    """For a product of an activation and a parameter (or a view of one, ids in ``params``), the activation's index."""
    packet = func.overloadpacket
    if packet not in (aten.mm, aten.addmm, aten.convolution):
        return None
    i, j = FACTORS[packet]
    if id(args[j]) in params and id(args[i]) not in params:
        return i
    if id(args[i]) in params and id(args[j]) not in params and packet is not aten.convolution:
        return j
    return None


def _product(
    sw: OpSweep, op: Op, vals: Values, tans: list, first: int, mm: Callable[[Tensor, Tensor], Tensor]
) -> Tensor | None:
    r"""The tangent of a bilinear :math:`y = \mathrm{mm}(a, b)` (arguments ``first`` and ``first + 1``), adding
    :math:`2\langle\delta_y, \mathrm{mm}(\dot a, \dot b)\rangle`: in two products when one factor is a parameter
    whose new value is known and the error at the other was kept, else in three."""
    ta, tb = tans[first], tans[first + 1]
    if ta is None or tb is None:  # (a factor is read only where it is needed: a weight's θ_t is computed on demand)
        return plus(None if ta is None else mm(ta, vals[first + 1]), None if tb is None else mm(vals[first], tb))
    a = vals[first]
    i = op.other
    if sw.exact and i is not None:
        kept = sw.cap.kept.get(op)
        if kept is not None and len(kept) == 2 and id(op.args[2 * first + 1 - i]) in sw.new:
            w_new = sw.new[id(op.args[2 * first + 1 - i])]  # the parameter's factor at θ_{t+1}
            if i == first:  # y = mm(a, W): U = mm(ȧ, W_new), ẏ = U + mm(a - ȧ, ΔW)
                u = mm(ta, w_new)
                sw.terms.append(2 * (inner(kept[0], u) - inner(kept[1], ta)))
                return _accumulate(u, mm, a - ta, tb)
            u = mm(w_new, tb)  # y = mm(W, b)
            sw.terms.append(2 * (inner(kept[0], u) - inner(kept[1], tb)))
            return _accumulate(u, mm, ta, vals[first + 1] - tb)
    if sw.exact:
        sw.add(op, 2 * mm(ta, tb))
    return _accumulate(mm(ta, vals[first + 1]), mm, a, tb)


def _accumulate(u: Tensor, mm: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor) -> Tensor:
    """Return ``u + mm(a, b)``, written into ``u`` (by ``addmm_`` for a matrix product: no second buffer)."""
    return u.addmm_(a, b) if mm is torch.mm or mm is aten.mm.default else u.add_(mm(a, b))


#: products whose parameter factor may be a vector (the others multiply matrices)
VECTOR_PRODUCTS = (aten.mv, aten.dot, aten.vdot)


@rule(aten.mm, aten.bmm, aten.mv, aten.dot, aten.vdot, curved=True)
def _mm(sw: OpSweep, op: Op, vals: Values, tans: list) -> Tensor | None:
    return _product(sw, op, vals, tans, 0, op.func)


@rule(aten.addmm, curved=True)
def _addmm(sw: OpSweep, op: Op, vals: Values, tans: list) -> Tensor | None:
    beta, alpha = op.kwargs.get("beta", 1), op.kwargs.get("alpha", 1)
    if (beta, alpha) != (1, 1):
        raise NoRule(f"{op.func} with beta or alpha")
    product, tb = _product(sw, op, vals, tans, 1, torch.mm), tans[0]
    if product is None or tb is None:
        return product if tb is None else tb.expand(op.out.shape)
    return product.add_(tb)  # (the product's tangent is this rule's own tensor: the bias's is added in place)


@rule(aten.relu)
def _relu(sw: OpSweep, op: Op, vals: Values, tans: list) -> Tensor | None:
    return None if tans[0] is None else tans[0] * (op.out > 0)


def _closed(packet: Any, x: Tensor, y: Tensor, args: Sequence) -> tuple[Tensor, Tensor] | None:
    """First and second derivatives of ``exp``, ``log`` and ``pow`` (see :func:`alphalib.fast.calculus.activation`
    for the activations)."""
    if packet is aten.exp:
        return y, y
    if packet is aten.log:
        r = x.reciprocal()
        return r, -r * r
    if packet is aten.pow:  # x ** p, p a number
        p = args[1]
        return p * x.pow(p - 1), p * (p - 1) * x.pow(p - 2)
    return None


#: activations with closed-form derivatives (:func:`alphalib.fast.calculus.activation`)
ACTIVATIONS = {
    aten.tanh: "tanh",
    aten.tanh_: "tanh",
    aten.sigmoid: "sigmoid",
    aten.sigmoid_: "sigmoid",
    aten.gelu: "gelu",
    aten.silu: "silu",
}
#: elementwise functions of one tensor whose derivatives come from autograd on the input
ELEMENTWISE = {aten.softplus: torch.nn.functional.softplus}
#: ... and those that overwrite their input: their derivatives come from the output
IN_PLACE = {aten.tanh_, aten.sigmoid_}


@rule(
    aten.tanh,
    aten.sigmoid,
    aten.exp,
    aten.log,
    aten.silu,
    aten.pow.Tensor_Scalar,
    *ELEMENTWISE,
    *IN_PLACE,
    aten.gelu,
    curved=True,
)
def _elementwise(sw: OpSweep, op: Op, vals: Values, tans: list) -> Tensor | None:
    r""":math:`\dot y = \sigma'(x)\dot x`, :math:`\ddot y = \sigma''(x)\dot x^2`."""
    t = tans[0]
    if t is None:
        return None
    packet = op.func.overloadpacket
    derivs = _closed(packet, vals[0], op.out, op.args)
    if derivs is not None:
        d1, d2 = derivs
        if sw.exact:
            sw.add(op, d2 * t.square())
        return d1 * t
    err = sw.error(op) if sw.exact else None
    kind = None if op.kwargs.get("approximate", "none") != "none" else ACTIVATIONS.get(packet)
    if kind in ("tanh", "sigmoid"):  # from the output (the in-place forms have overwritten their input)
        t1, term = activation(kind, t, err, y=vals[0] if packet in IN_PLACE else op.out)
    elif kind is not None:
        t1, term = activation(kind, t, err, x=vals[0])
    else:  # gelu(approximate="tanh"), softplus: autograd on the input
        fn = (
            (lambda z: torch.nn.functional.gelu(z, approximate=op.kwargs["approximate"]))
            if packet is aten.gelu
            else (lambda z: ELEMENTWISE[packet](z, *vals[1:]))
        )
        t1, term = by_autograd(fn, vals[0], t, err)
    if term is not None:
        sw.terms.append(term)
    return t1


@rule(aten.cat, aten.stack)
def _cat(sw: OpSweep, op: Op, vals: Values, tans: list) -> Tensor:
    parts = [sw.tangent(x) for x in op.args[0]]
    dim = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim", 0)
    return op.func([torch.zeros_like(x) if t is None else t for x, t in zip(op.args[0], parts, strict=True)], dim)


@rule(aten.relu_)
def _relu_(sw: OpSweep, op: Op, vals: Values, tans: list) -> Tensor | None:
    return None if tans[0] is None else tans[0] * (vals[0] > 0)  # the tensor as relu_ left it


@rule(aten.add_.Tensor)
def _add_(sw: OpSweep, op: Op, vals: Values, tans: list) -> Tensor | None:
    b = tans[1]
    return plus(tans[0], None if b is None else b * op.kwargs.get("alpha", 1))


@rule(aten.convolution, curved=True)
def _convolution(sw: OpSweep, op: Op, vals: Values, tans: list) -> Tensor | None:
    r"""Bilinear in input and weight: :math:`\dot y = \dot x \star W + x \star \dot W + \dot b`,
    :math:`\ddot y = 2\dot x \star \dot W`."""
    rest = op.args[3:]
    out = _product(sw, op, vals, tans, 0, lambda x, w: aten.convolution(x, w, None, *rest))
    db = tans[2] if len(tans) > 2 else None
    if db is not None:
        out = plus(out, db.view(1, -1, *([1] * (op.out.dim() - 2))).expand(op.out.shape))
    return out


@rule(aten.max_pool2d_with_indices, aten.max_pool1d_with_indices)
def _max_pool(sw: OpSweep, op: Op, vals: Values, tans: list) -> list:
    t, idx = tans[0], op.outs[1]
    if t is None:
        return [None, None]
    dims = idx.dim() - 2
    return [t.flatten(-dims).gather(-1, idx.flatten(-dims)).view(idx.shape), None]


def _normalize(
    sw: OpSweep,
    op: Op,
    x_hat: Tensor,
    r: Tensor,
    t_hat: Tensor | None,
    u: Tensor | None,
    weight: Any,
    tw: Tensor | None,
    tb: Tensor | None,
    dims: tuple[int, ...],
    shape: tuple[int, ...],
) -> Tensor | None:
    r"""Finish :math:`y = \gamma \hat x + \beta` (see :func:`alphalib.fast.calculus.standardize`), γ and β broadcast
    as ``shape``, and add its second-order terms (:func:`alphalib.fast.calculus.normalization_terms`)."""
    gamma = None if weight is None else weight.view(shape)
    dgamma, dbeta = (None if v is None else v.view(shape) for v in (tw, tb))
    if sw.exact and t_hat is not None and (dgamma is not None or u is not None):
        err = sw.error(op)
        if err is not None:
            sw.terms.extend(normalization_terms(err.reshape(x_hat.shape), gamma, dgamma, x_hat, r, t_hat, u, dims))
    out = None if t_hat is None else t_hat if gamma is None else t_hat.mul_(gamma)  # (t_hat is this rule's own)
    return plus(
        plus(out, None if dgamma is None else dgamma * x_hat), None if dbeta is None else dbeta.expand_as(x_hat)
    )


@rule(aten.native_batch_norm, curved=True)
def _native_batch_norm(sw: OpSweep, op: Op, vals: Values, tans: list) -> list:
    """BatchNorm: batch statistics (the kernel's saved mean and inverse deviation) in training, else running ones."""
    x, training, eps = vals[0], op.args[5], op.args[7]
    dims, shape = (0, *range(2, x.dim())), (1, -1) + (1,) * (x.dim() - 2)
    if training:
        stats = op.outs[1].view(shape), op.outs[2].view(shape)
    else:
        stats = vals[3].view(shape), torch.rsqrt(vals[4].view(shape) + eps)
    x_hat, r, t_hat, u = standardize(x, tans[0], dims, eps, stats, fixed=not training)
    return [_normalize(sw, op, x_hat, r, t_hat, u, vals[1], tans[1], tans[2], dims, shape), None, None]


@rule(aten.native_layer_norm, curved=True)
def _native_layer_norm(sw: OpSweep, op: Op, vals: Values, tans: list) -> list:
    r"""LayerNorm from the kernel's saved statistics; :math:`\dot{\hat x}` by the kernel's own backward."""
    x, normalized, t = vals[0], tuple(op.args[1]), tans[0]
    dims = tuple(range(-len(normalized), 0))
    mean, r = op.outs[1], op.outs[2]
    x_hat = (x - mean).mul_(r)
    t_hat = u = None
    if t is not None:
        t_hat = _ops.layer_norm_backward(t, x, normalized, mean, r)
        u = t - t.mean(dims, keepdim=True) if sw.exact else None
    return [_normalize(sw, op, x_hat, r, t_hat, u, vals[2], tans[2], tans[3], dims, normalized), None, None]


@rule(aten._softmax, aten._safe_softmax, curved=True)
def _softmax(sw: OpSweep, op: Op, vals: Values, tans: list) -> Tensor | None:
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
def _log_softmax(sw: OpSweep, op: Op, vals: Values, tans: list) -> Tensor | None:
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
def _native_group_norm(sw: OpSweep, op: Op, vals: Values, tans: list) -> list:
    """GroupNorm: the normalization over each sample's group of channels and the spatial axes, γ and β per channel."""
    x, groups = vals[0], op.args[6]
    grouped = (x.shape[0], groups, -1)
    t = None if tans[0] is None else tans[0].reshape(grouped)
    channel = (1, -1) + (1,) * (x.dim() - 2)
    dgamma, dbeta = (None if v is None else v.view(channel).expand_as(x).reshape(grouped) for v in tans[1:3])
    gamma = None if vals[1] is None else vals[1].view(channel).expand_as(x).reshape(grouped)
    stats = op.outs[1].view(*grouped[:2], 1), op.outs[2].view(*grouped[:2], 1)
    x_hat, r, t_hat, u = standardize(x.reshape(grouped), t, (2,), op.args[7], stats)
    y = _normalize(sw, op, x_hat, r, t_hat, u, gamma, dgamma, dbeta, (2,), grouped)
    return [None if y is None else y.reshape(x.shape), None, None]


@rule(aten._scaled_dot_product_flash_attention_for_cpu, curved=True)
def _attention(sw: OpSweep, op: Op, vals: Values, tans: list) -> list:
    """Fused attention, recomputed from Q, K, V (:func:`alphalib.fast.calculus.attention`)."""
    dropout = op.args[3] if len(op.args) > 3 else op.kwargs.get("dropout_p", 0.0)
    causal = op.args[4] if len(op.args) > 4 else op.kwargs.get("is_causal", False)
    mask, scale = op.kwargs.get("attn_mask"), op.kwargs.get("scale")
    if dropout:
        raise NoRule("attention dropout inside the fused kernel: its mask cannot be replayed")
    if mask is not None and sw.tangent(mask) is not None:
        raise NoRule("an attention mask that changes along the step")
    err = sw.error(op) if sw.exact else None
    out, term = attention(
        vals[0],
        vals[1],
        vals[2],
        tans[0],
        tans[1],
        tans[2],
        err,
        scale=scale,
        causal=causal,
        mask=None if mask is None else sw.value(mask, op),
    )
    if term is not None:
        sw.terms.append(term)
    return [out, None]
