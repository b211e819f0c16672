r"""Module rules: the fast path for models built from layers it knows, one rule per module class.

A rule maps a module's input tangent along :math:`\Delta` to its output tangent, mirroring ``forward``, and adds
the module's second-order term :math:`\langle\delta_{\mathrm{out}}, \ddot{\mathrm{out}}\rangle` with
:meth:`Sweep.add <alphalib.fast.sweep.Sweep.add>`. It names what the training step must leave for it
(``keep``), and :class:`alphalib.fast.capture.Capture` keeps exactly that. For an affine layer
:math:`z = \mathrm{op}(a, W_{\mathrm{old}}) + b` (linear or convolution), with :math:`W` the *new* weights,

.. math::

    U = \mathrm{op}(\dot a, W), \qquad
    \dot z = U + \mathrm{op}(a - \dot a, \Delta_W) + \Delta_b, \qquad
    \langle \delta_z, \ddot z\rangle = 2\,\big(\langle \delta_z, U\rangle - \langle \delta_a, \dot a\rangle\big),

where :math:`\delta_a` is the error at the layer's input through this layer alone (the layer gets a view of
its input to keep it apart from other consumers, such as a residual connection); the last form equals
:math:`2\langle\delta_z, \mathrm{op}(\dot a, \Delta_W)\rangle` and needs two products per layer and no copy of
the old weights. An activation :math:`a = \sigma(z)` adds :math:`\langle \delta_a, \sigma''(z)\dot z^2\rangle`;
dropout reuses the step's mask; pooling and flattening act linearly; normalization layers and attention have the
closed forms of :mod:`alphalib.fast.calculus`. Exact in exact arithmetic; in float32 the two-product form cancels
(relative error around 1e-5 measured).

Rules exist for the modules in :data:`LAYERS` and nested plain ``nn.Sequential`` chains; :func:`register` adds one
for a module class of your own (:mod:`alphalib.lab.models` registers its transformer's). Module rules are
faster than following the recorded operations (:mod:`alphalib.fast.ops`): two products per affine layer, a few
Python calls per layer rather than per operation, and nothing recorded during training.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import _ops
from .._function import replay_rng
from .calculus import (
    activation,
    by_autograd,
    inner,
    normalization_term,
    normalization_terms,
    plus,
    standardize,
)

if TYPE_CHECKING:
    from .capture import Capture

Keep = frozenset[str]  # what the training step leaves: "input", "output", "error_out", "error_in", "rng", ...
#: a rule ``fn(sweep, module, t) -> t_out``; its module is an instance of the class it is registered for, a type the
#: table of all rules cannot name (hence ``Any``)
TangentFn = Callable[["Sweep", Any, "Tensor | None"], "Tensor | None"]
_M = TypeVar("_M", bound=nn.Module)
_Fn = TypeVar("_Fn", bound=TangentFn)


class Sweep:
    r"""The sweep over module rules: ``sweep(module, t)`` runs ``module``'s rule on its input tangent ``t``.

    Rules find what the step left in ``sweep.cap`` and whether to add second-order terms in ``sweep.exact``.

    Args:
        cap: The step's :class:`~alphalib.fast.capture.Capture`.
        deltas: ``id(parameter)`` to the parameter's step :math:`\Delta`.
        exact: Whether rules add their second-order terms (the Hessian); else only the output's curvature counts
            (the generalised Gauss-Newton).
    """

    def __init__(self, cap: Capture, deltas: dict[int, Tensor], *, exact: bool):
        self.cap, self.deltas, self.exact = cap, deltas, exact
        self.terms: list[Tensor] = []

    def __call__(self, module: nn.Module, t: Tensor | None) -> Tensor | None:
        return self.cap.rules[module].tangent(self, module, t)

    def delta(self, param: Tensor | None) -> Tensor | None:
        r"""Return the step :math:`\Delta` of ``param`` (``None`` if it is frozen or absent)."""
        return None if param is None else self.deltas.get(id(param))

    def at_theta(self, param: Tensor) -> Tensor:
        """Return ``param`` at θ_t (the optimizer has already stepped it by its Δ)."""
        step = self.delta(param)
        return param.detach() if step is None else param.detach() - step

    def add(self, term: Tensor) -> None:
        r"""Add a module's second-order term :math:`\langle\delta_{\mathrm{out}}, \ddot{\mathrm{out}}\rangle`."""
        self.terms.append(term)


@dataclass(frozen=True)
class Rule:
    """How the sweep maps a module's input tangent to its output tangent, and what it needs to keep."""

    tangent: TangentFn
    keep: Keep = frozenset()
    children: dict[str, Keep] = field(default_factory=dict)  # what to keep of named submodules as well
    check: Callable[[Any], str | None] = lambda m: None  # why a module of this class is not covered


RULES: dict[type[nn.Module], Rule] = {}


def register(
    cls: type[_M],
    *,
    keep: Iterable[str] = (),
    children: dict[str, Iterable[str]] | None = None,
    check: Callable[[_M], str | None] | None = None,
) -> Callable[[_Fn], _Fn]:
    r"""Register ``fn(sweep, module, t) -> t_out`` as the fast-path rule for modules of class ``cls``.

    ``t`` is the tangent of the module's input along :math:`\Delta` (``None`` for zero); the rule returns
    the output's tangent and adds the module's own second-order term with :meth:`Sweep.add`. A composite
    rule calls ``sweep(child, t)`` for its submodules, mirroring ``forward``. The rule also serves subclasses of
    ``cls`` that keep its ``forward``; registering a class again replaces its rule.

    Args:
        cls: The module class the rule is for.
        keep: What the module must keep from the training step, found by the rule in ``sweep.cap``: ``"input"``
            and ``"output"`` (``cap.inputs``/``cap.outputs``), ``"error_out"`` and ``"error_in"`` (the
            backpropagated :math:`\partial L/\partial` output and input, ``cap.errors_out``/``cap.errors_in``,
            kept for ``"hessian"`` only; the input's error is the part that flows through this module).
        children: The same as ``keep`` for submodules, by attribute name.
        check: Returns why a module of this class is not covered (a sentence), or ``None`` if it is.

    Returns:
        A decorator that registers ``fn`` and returns it unchanged.

    Example:
        >>> class Residual(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
        ...     def forward(self, x):
        ...         return x + self.body(x)
        >>> uncovered(Residual()) is None
        False
        >>> @register(Residual)
        ... def _residual(sweep, m, t):
        ...     return plus(t, sweep(m.body, t))
        >>> uncovered(Residual()) is None
        True
    """

    def deco(fn: _Fn) -> _Fn:
        kids = {k: frozenset(v) for k, v in (children or {}).items()}
        RULES[cls] = Rule(fn, frozenset(keep), kids, check or (lambda m: None))
        return fn

    return deco


def rule_for(module: nn.Module) -> Rule | None:
    """Return the rule for ``module``: that of its class, or of a base class whose ``forward`` it keeps."""
    if "forward" in vars(module):
        return None
    for cls in type(module).__mro__:
        if cls in RULES and type(module).forward is cls.forward:
            return RULES[cls]
    return None


def uncovered(model: nn.Module) -> str | None:
    """Return ``None`` if module rules cover ``model``, else a sentence naming the first module they miss."""
    for name, m in model.named_modules():
        rule = rule_for(m)
        if rule is None:
            what = "overrides forward" if "forward" in vars(m) or isinstance(m, nn.Sequential) else "has no rule"
            return f"{type(m).__name__}{f' ({name})' if name else ''} {what}{_source(m)}"
        reason = rule.check(m)
        if reason:
            return reason
    return None


def _source(m: nn.Module) -> str:
    """Say where ``m``'s forward is written (file and line), or nothing if Python cannot tell."""
    fn = vars(m).get("forward", type(m).forward)
    try:
        return f" (its forward: {inspect.getsourcefile(fn)}, line {inspect.getsourcelines(fn)[1]})"
    except (OSError, TypeError):
        return ""


# ---- layers ------------------------------------------------------------------------------------------------

AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d)
_Affine = nn.Linear | nn.Conv1d | nn.Conv2d


def _affine(m: _Affine, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias) if isinstance(m, nn.Linear) else _ops.conv(m, x, weight, bias)


def _affine_tangent(sw: Sweep, m: _Affine, t: Tensor | None) -> Tensor | None:
    dw, db = sw.delta(m.weight), sw.delta(m.bias)
    if t is None and dw is None and db is None:  # frozen layer before any trained one
        return None
    a = sw.cap.inputs.pop(m).detach()
    dw = torch.zeros_like(m.weight) if dw is None else dw
    if t is None:
        return _affine(m, a, dw, db)
    u = _affine(m, t, m.weight.detach(), None)
    if sw.exact:  # the errors are released here, before the second product
        sw.add(2 * (inner(sw.cap.errors_out.pop(m), u) - inner(sw.cap.errors_in.pop(m), t)))
    u += _affine(m, a - t, dw, db)
    return u


_cls: type[nn.Module]
for _cls in AFFINE:
    register(_cls, keep={"input", "error_out", "error_in"})(_affine_tangent)


@register(
    nn.Embedding,
    keep={"input"},
    check=lambda m: (
        "Embedding with max_norm renormalizes its weights in place, which the fast path does not follow"
        if m.max_norm is not None
        else None
    ),
)
def _embedding(sw: Sweep, m: nn.Embedding, t: Tensor | None) -> Tensor | None:
    dw, ids = sw.delta(m.weight), sw.cap.inputs.pop(m)
    return None if dw is None else F.embedding(ids, dw)


def _derivatives(
    m: nn.Module, z: Tensor | None, a: Tensor | None, t: Tensor, err: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    r"""Return :math:`\sigma'(z)\,t` and, given the error, :math:`\langle \delta_a, \sigma''(z)\,t^2\rangle`."""
    if isinstance(m, nn.ReLU):  # a: where the output was positive (works for in-place ReLU too)
        assert a is not None  # (kept: the rule's keep names "sign")
        return t * a.view(torch.uint8), None  # as bytes: several times faster than a boolean mask on CPU
    if isinstance(m, nn.LeakyReLU):
        assert a is not None
        return t * (a.to(t.dtype) * (1 - m.negative_slope) + m.negative_slope), None
    if isinstance(m, (nn.Tanh, nn.Sigmoid)):
        return activation("tanh" if isinstance(m, nn.Tanh) else "sigmoid", t, err, y=a)
    if isinstance(m, nn.GELU) and m.approximate == "none" or isinstance(m, nn.SiLU):
        return activation("gelu" if isinstance(m, nn.GELU) else "silu", t, err, x=z)
    assert z is not None  # (kept: the rules of the other activations keep their input)
    return by_autograd(m, z, t, err)


def _activation_tangent(sw: Sweep, m: nn.Module, t: Tensor | None) -> Tensor | None:
    z, a = sw.cap.inputs.pop(m, None), sw.cap.outputs.pop(m, None)
    err = sw.cap.errors_out.pop(m, None) if sw.exact else None
    if t is None:
        return None
    t, term = _derivatives(m, z, a, t, err)
    if term is not None:
        sw.add(term)
    return t


def _no_inplace(m: nn.Module) -> str | None:
    return (
        f"in-place {type(m).__name__} overwrites the input its derivatives need"
        if getattr(m, "inplace", False)
        else None
    )


register(nn.ReLU, keep={"sign"})(_activation_tangent)
register(
    nn.LeakyReLU,
    keep={"sign"},
    check=lambda m: (
        "LeakyReLU with a negative slope is not supported by the fast path" if m.negative_slope < 0 else None
    ),
)(_activation_tangent)
for _cls in (nn.Tanh, nn.Sigmoid):
    register(_cls, keep={"output", "error_out"})(_activation_tangent)
register(nn.GELU, keep={"input", "error_out"})(_activation_tangent)
register(nn.SiLU, keep={"input", "error_out"}, check=_no_inplace)(_activation_tangent)
#: elementwise activations whose derivatives come from autograd on the layer's input
ELEMENTWISE = (nn.Softplus, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Softsign, nn.Hardtanh, nn.LogSigmoid)
for _cls in ELEMENTWISE:
    register(_cls, keep={"input", "error_out"}, check=_no_inplace)(_activation_tangent)


@register(nn.Dropout, keep={"rng"})
def _dropout(sw: Sweep, m: nn.Dropout, t: Tensor | None) -> Tensor | None:
    kept = sw.cap.rng.pop(m, None)
    if t is None or kept is None:
        return t
    state, shape, stride = kept
    ones = torch.empty_strided(shape, stride, dtype=t.dtype, device=t.device).fill_(1)
    with replay_rng(state, t.device):  # the training step's own mask, drawn in the input's memory layout
        return t * F.dropout(ones, m.p, training=True)


#: linear, parameter-free modules: the tangent goes through the module itself
LINEAR = (nn.Flatten, nn.Unflatten, nn.Identity, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
for _cls in LINEAR:
    register(_cls)(lambda sw, m, t: None if t is None else m(t))


@register(nn.MaxPool1d, keep={"pool"})
@register(nn.MaxPool2d, keep={"pool"})
def _maxpool(sw: Sweep, m: nn.MaxPool1d | nn.MaxPool2d, t: Tensor | None) -> Tensor | None:
    """Take the tangent at the maxima (the training step's argmax; recomputed from the input when missing)."""
    idx = sw.cap.outputs.pop(m)
    if t is None:
        return None
    pool, dims = (F.max_pool1d, 1) if isinstance(m, nn.MaxPool1d) else (F.max_pool2d, 2)
    if idx.is_floating_point():
        idx = pool(idx, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode, return_indices=True)[1]
    return t.flatten(-dims).gather(-1, idx.flatten(-dims)).view(idx.shape)


@register(nn.LayerNorm, keep={"input", "error_out"})
def _layer_norm(sw: Sweep, m: nn.LayerNorm, t: Tensor | None) -> Tensor | None:
    r"""LayerNorm :math:`y = \gamma \odot \hat x + \beta` with :math:`\hat x = (x - \mu) r`, :math:`r = 1/\sigma`.

    Along :math:`\dot x` with :math:`u = \dot x - \overline{\dot x}` and :math:`c = \overline{\hat x u}` (means
    over the :math:`n` normalized entries of a row): :math:`\dot{\hat x} = r (u - c \hat x)` (LayerNorm's own
    backward, its Jacobian being symmetric) and
    :math:`\ddot{\hat x} = r^2 \big(\hat x (3c^2 - \overline{u^2}) - 2 c u\big)`, so
    :math:`\dot y = \gamma\dot{\hat x} + \Delta_\gamma \hat x + \Delta_\beta` and the module adds
    :math:`\langle \delta_y, 2 \Delta_\gamma \dot{\hat x} + \gamma \ddot{\hat x}\rangle`, summed row by row
    from :math:`\langle \delta_y\gamma, \hat x\rangle` and :math:`\langle \delta_y\gamma, u\rangle`. (Nested
    forward mode through ``F.layer_norm`` returns a wrong second derivative in torch 2.13, pytorch/pytorch#196700;
    this closed form is tested against the dense Hessian.)
    """
    x, shape = sw.cap.inputs.pop(m).detach(), m.normalized_shape
    x_hat, mean, r = _ops.layer_norm(x, shape, m.eps)
    if t is None:
        return _scaled(sw, m, x_hat, r, None, None, (), shape)
    t_hat = _ops.layer_norm_backward(t, x, shape, mean, r)
    rows = tuple(range(-len(shape), 0))
    return _scaled(sw, m, x_hat, r, t_hat, t - t.mean(rows, keepdim=True) if sw.exact else None, rows, shape)


def _scaled(
    sw: Sweep,
    m: nn.LayerNorm | nn.BatchNorm1d | nn.BatchNorm2d | nn.GroupNorm,
    x_hat: Tensor,
    r: Tensor,
    t_hat: Tensor | None,
    u: Tensor | None,
    dims: tuple[int, ...],
    shape: Sequence[int],
) -> Tensor | None:
    r"""Finish a normalization layer :math:`y = \gamma \odot \hat x + \beta` (``shape``: how γ and β broadcast).

    :math:`\dot y = \gamma \dot{\hat x} + \Delta_\gamma \hat x + \Delta_\beta` with γ at :math:`\theta_t`; the layer
    adds :math:`2\langle\delta_y, \Delta_\gamma \dot{\hat x}\rangle` and, where its statistics depend on the input
    (``u``, the input's tangent centred over ``dims``, given), :math:`\langle\delta_y \gamma, \ddot{\hat x}\rangle`.
    """
    dgamma, dbeta = sw.delta(m.weight), sw.delta(m.bias)
    gamma: Tensor | None = None if m.weight is None else sw.at_theta(m.weight)
    gamma, dgamma, dbeta = (None if v is None else v.view(shape) for v in (gamma, dgamma, dbeta))
    if t_hat is not None and sw.exact:
        for term in normalization_terms(sw.cap.errors_out.pop(m), gamma, dgamma, x_hat, r, t_hat, u, dims):
            sw.add(term)
    if t_hat is not None and gamma is not None:
        t_hat = t_hat.mul_(gamma)  # the rules' own tensor
    return plus(plus(t_hat, None if dgamma is None else dgamma * x_hat), dbeta)


@register(nn.BatchNorm1d, keep={"input", "error_out"})
@register(nn.BatchNorm2d, keep={"input", "error_out"})
def _batch_norm(sw: Sweep, m: nn.BatchNorm1d | nn.BatchNorm2d, t: Tensor | None) -> Tensor | None:
    r"""BatchNorm per channel: with batch statistics (training) as LayerNorm over the batch and spatial axes.

    With running statistics (evaluation) it is affine in its input: :math:`\dot{\hat x} = r \dot x`, and only
    :math:`2\langle \delta_y, \Delta_\gamma r \dot x\rangle` is added.
    """
    x = sw.cap.inputs.pop(m).detach()
    dims = (0, *range(2, x.dim()))  # every axis but the channels
    channel = (1, -1) + (1,) * (x.dim() - 2)
    stats = None  # batch statistics (training, or no running statistics kept)
    if not m.training:
        mean, var = m.running_mean, m.running_var  # (both None, or both kept)
        if mean is not None and var is not None:
            stats = mean.view(channel), torch.rsqrt(var.view(channel) + m.eps)
    x_hat, r, t_hat, u = standardize(x, t, dims, m.eps, stats, fixed=stats is not None)
    return _scaled(sw, m, x_hat, r, t_hat, u, dims, channel)


@register(nn.GroupNorm, keep={"input", "error_out"})
def _group_norm(sw: Sweep, m: nn.GroupNorm, t: Tensor | None) -> Tensor | None:
    r"""GroupNorm: LayerNorm's algebra over each sample's group of :math:`C/G` channels and the spatial axes.

    Statistics and the second-order term are taken on the grouped view :math:`(N, G, C/G \cdot \ldots)`; γ and β
    act per channel, as in BatchNorm.
    """
    x = sw.cap.inputs.pop(m).detach()
    grouped, dims = (x.shape[0], m.num_groups, -1), (2,)
    channel = (1, -1) + (1,) * (x.dim() - 2)
    if t is None:
        x_hat, r, _, _ = standardize(x.reshape(grouped), None, dims, m.eps)
        return _scaled(sw, m, x_hat.view_as(x), r, None, None, (), channel)
    x_hat, r, t_hat, u = standardize(x.reshape(grouped), t.reshape(grouped), dims, m.eps)
    if sw.exact:  # the statistics' second-order term, on the grouped view (γ per channel)
        err = sw.cap.errors_out[m]
        err = err if m.weight is None else err * sw.at_theta(m.weight).view(channel)
        sw.add(normalization_term(err.reshape(grouped), x_hat, r, u, dims))
    return _scaled(sw, m, x_hat.view_as(x), r, t_hat.view_as(x), None, (), channel)


def _sequential(sw: Sweep, m: nn.Sequential, t: Tensor | None) -> Tensor | None:
    for child in m:
        t = sw(child, t)
    return t


register(nn.Sequential)(_sequential)

LAYERS = tuple(RULES)  #: the torch.nn modules the fast path covers
