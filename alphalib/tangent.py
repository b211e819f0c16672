r"""The fast path: exact :math:`\Delta^\top H \Delta` from the training step's own activations and errors.

The probe keeps, from the training step, what each module's derivatives need (its input or output, and for
``"hessian"`` the backpropagated errors :math:`\delta = \partial L/\partial(\cdot)` at its output and input):
references to tensors the step computed anyway, no recompute. After ``optimizer.step()``, with
:math:`\Delta` the realized step, one forward-mode sweep along :math:`\Delta` at :math:`\theta_t` maps each
module's input tangent to its output tangent and adds the module's own second-order term, its second
directional derivative contracted with the error at its output. Summed over modules this is the whole
second directional derivative (the errors carry every downstream term back), so for the loss
:math:`\ell` at the model's output :math:`f`,

.. math::

    \Delta^\top H \Delta = \sum_{\text{modules}} \langle \delta_{\text{out}}, \ddot{\text{out}}\rangle
    + \dot f^\top \nabla^2_f \ell\, \dot f, \qquad \Delta^\top g = \nabla_f \ell^\top \dot f,

and the generalised Gauss-Newton keeps only the last term. For an affine layer
:math:`z = \mathrm{op}(a, W_{\mathrm{old}}) + b` (linear or convolution), with :math:`W` the *new* weights,

.. math::

    U = \mathrm{op}(\dot a, W), \qquad
    \dot z = U + \mathrm{op}(a - \dot a, \Delta_W) + \Delta_b, \qquad
    \langle \delta_z, \ddot z\rangle = 2\,\big(\langle \delta_z, U\rangle - \langle \delta_a, \dot a\rangle\big),

where :math:`\delta_a` is the error at the layer's input through this layer alone (the layer gets a view of
its input to keep it apart from other consumers, such as a residual connection); the last form equals
:math:`2\langle\delta_z, \mathrm{op}(\dot a, \Delta_W)\rangle` and needs two products per layer and no copy of
the old weights. An activation
:math:`a = \sigma(z)` adds :math:`\langle \delta_a, \sigma''(z)\dot z^2\rangle`; dropout reuses the step's mask;
pooling and flattening act linearly; normalization layers and attention have the closed forms in their rules.
Exact in exact arithmetic; in float32 the two-product form cancels (relative error around 1e-5 measured).

Rules exist for the modules in :data:`LAYERS` and for nested plain ``nn.Sequential`` chains;
:func:`register` adds one for a module class of your own (see :mod:`alphalib.models` for a transformer).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import _ops
from ._checks import check_loss
from ._function import LossFn, replay_rng, rng_state
from ._proof import Hook

Keep = frozenset[str]  # what the training step leaves: "input", "output", "error_out", "error_in", "rng", ...
TangentFn = Callable[["Sweep", nn.Module, "Tensor | None"], "Tensor | None"]


@dataclass(frozen=True)
class Rule:
    """How the sweep maps a module's input tangent to its output tangent, and what it needs to keep."""

    tangent: TangentFn
    keep: Keep = frozenset()
    children: dict[str, Keep] = field(default_factory=dict)  # what to keep of named submodules as well
    check: Callable[[nn.Module], str | None] = lambda m: None  # why a module of this class is not covered


RULES: dict[type, Rule] = {}


def register(
    cls: type,
    *,
    keep: Iterable[str] = (),
    children: dict[str, Iterable[str]] | None = None,
    check: Callable[[nn.Module], str | None] | None = None,
) -> Callable[[TangentFn], TangentFn]:
    """Register ``fn(sweep, module, t) -> t_out`` as the fast-path rule for modules of class ``cls``.

    ``t`` is the tangent of the module's input along :math:`\\Delta` (``None`` for zero); the rule returns
    the output's tangent and adds the module's own second-order term with :meth:`Sweep.add`. A composite
    rule calls ``sweep(child, t)`` for its submodules, mirroring ``forward``. ``keep`` names what the module
    must keep from the training step, found by the rule in ``sweep.cap``: ``"input"`` and ``"output"``
    (``cap.inputs``/``cap.outputs``), ``"error_out"`` and ``"error_in"`` (the backpropagated
    :math:`\\partial L/\\partial` output and input, ``cap.errors_out``/``cap.errors_in``, kept for
    ``"hessian"`` only; the input's error is the part that flows through this module);
    ``children`` the same for submodules by attribute name; ``check`` returns why a module is not covered.

    Example:
        >>> class Residual(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
        ...     def forward(self, x):
        ...         return x + self.body(x)
        >>> covers(Residual()) is None
        False
        >>> @register(Residual)
        ... def _residual(sweep, m, t):
        ...     return plus(t, sweep(m.body, t))
        >>> covers(Residual()) is None
        True
    """

    def deco(fn: TangentFn) -> TangentFn:
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


def covers(model: nn.Module) -> str | None:
    """Return ``None`` if the fast path covers ``model``, else a sentence saying what it does not cover."""
    for name, m in model.named_modules():
        rule = rule_for(m)
        if rule is None:
            what = "overrides forward" if "forward" in vars(m) or isinstance(m, nn.Sequential) else "is not supported"
            return f"{type(m).__name__}{f' ({name})' if name else ''} {what} by the fast path{_source(m)}"
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


class Capture:
    """Hooks that keep, from the training step, what the rules of ``model``'s modules need.

    With ``sweep=False`` only the model's output is kept (what the backends that reuse the training loss need).
    """

    def __init__(self, model: nn.Module, *, sweep: bool = True, errors: bool = False):
        self.active = True
        self.foreign = False  # the current forward does not run on the model's own parameters
        self.own: Callable[[nn.Module], bool] | None = None  #: tells such forwards apart (set by the probe)
        self.rules: dict[nn.Module, Rule] = {m: rule_for(m) for m in model.modules()} if sweep else {}
        self.inputs: dict[nn.Module, Tensor] = {}
        self.outputs: dict[nn.Module, Tensor] = {}
        self.errors_out: dict[nn.Module, Tensor] = {}
        self.errors_in: dict[nn.Module, Tensor] = {}
        self.rng: dict[nn.Module, tuple[Tensor, torch.Size]] = {}
        self.output: Tensor | None = None  # the model's output
        self.reused = False  # a module ran twice in one forward: its tensors are ambiguous
        self.uncovered: str | None = None  # (the module rules cover the model, or the probe does not use them)
        needs: dict[nn.Module, set[str]] = {m: set(r.keep) for m, r in self.rules.items()}
        for m, r in self.rules.items():
            for name, keep in r.children.items():
                needs[getattr(m, name)] |= keep
        if not errors:
            needs = {m: {k for k in n if not k.startswith("error")} for m, n in needs.items()}
        self.needs = needs
        self._handles = [model.register_forward_pre_hook(Hook(self, "_start")),
                         model.register_forward_hook(Hook(self, "_keep_output"))]
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

    def _keep_rng(self, module: nn.Module, args: tuple) -> None:
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


class Sweep:
    """One forward-mode sweep along :math:`\\Delta` over the captured step; ``sweep(module, t)`` runs a rule."""

    def __init__(self, cap: Capture, deltas: dict[int, Tensor], *, exact: bool):
        self.cap, self.deltas, self.exact = cap, deltas, exact
        self.terms: list[Tensor] = []

    def __call__(self, module: nn.Module, t: Tensor | None) -> Tensor | None:
        return self.cap.rules[module].tangent(self, module, t)

    def delta(self, param: Tensor | None) -> Tensor | None:
        """Return the step :math:`\\Delta` of ``param`` (``None`` if it is frozen or absent)."""
        return None if param is None else self.deltas.get(id(param))

    def add(self, term: Tensor) -> None:
        """Add a module's second-order term :math:`\\langle\\delta_{\\mathrm{out}}, \\ddot{\\mathrm{out}}\\rangle`."""
        self.terms.append(term)

    def second(self) -> Tensor:
        """Return the sum of the second-order terms, accumulated in float64."""
        return torch.stack(self.terms).double().sum() if self.terms else torch.zeros((), dtype=torch.float64)


def plus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """Add two tangents, ``None`` standing for zero."""
    return b if a is None else a if b is None else a + b


def inner(a: Tensor, b: Tensor) -> Tensor:
    """Return the inner product :math:`\\langle a, b\\rangle` of two same-shaped tensors."""
    return torch.vdot(a.reshape(-1), b.reshape(-1))


# ---- layers ------------------------------------------------------------------------------------------------

AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _affine(m: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias) if isinstance(m, nn.Linear) else _ops.conv(m, x, weight, bias)


def _affine_tangent(sw: Sweep, m: nn.Module, t: Tensor | None) -> Tensor | None:
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


for _cls in AFFINE:
    register(_cls, keep={"input", "error_out", "error_in"})(_affine_tangent)


@register(nn.Embedding, keep={"input"}, check=lambda m: "Embedding with max_norm renormalizes its weights in "
          "place, which the fast path does not follow" if m.max_norm is not None else None)
def _embedding(sw: Sweep, m: nn.Embedding, t: Tensor | None) -> Tensor | None:
    dw, ids = sw.delta(m.weight), sw.cap.inputs.pop(m)
    return None if dw is None else F.embedding(ids, dw)


def _derivatives(
    m: nn.Module, z: Tensor | None, a: Tensor | None, t: Tensor, err: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    r"""Return :math:`\sigma'(z)\,t` and, given the error, :math:`\langle \delta_a, \sigma''(z)\,t^2\rangle`."""
    if isinstance(m, nn.ReLU):  # a: where the output was positive (works for in-place ReLU too)
        return t * a.view(torch.uint8), None  # as bytes: several times faster than a boolean mask on CPU
    if isinstance(m, nn.LeakyReLU):
        return t * (a.to(t.dtype) * (1 - m.negative_slope) + m.negative_slope), None
    if isinstance(m, nn.Tanh):
        t1 = (1 - a * a) * t
        return t1, None if err is None else -2 * inner(err * a, t1 * t)
    if isinstance(m, nn.Sigmoid):
        d1 = a * (1 - a)
        t1 = d1 * t
        return t1, None if err is None else inner(err * (1 - 2 * a), t1 * t)
    if isinstance(m, nn.GELU) and m.approximate == "none":  # gelu'' = φ(z)(2 - z²)
        t1 = _ops.gelu_backward(t, z)
        if err is None:
            return t1, None
        z2 = z.square()
        curv = (z2 * -0.5).exp_().mul_(2 - z2)
        return t1, inner(err * t, curv.mul_(t)) / math.sqrt(2 * math.pi)
    if isinstance(m, nn.SiLU):
        t1 = _ops.silu_backward(t, z)
        if err is None:
            return t1, None
        s = torch.sigmoid(z)
        return t1, inner(err * t * t, s * (1 - s) * (2 + z * (1 - 2 * s)))
    with torch.enable_grad():  # elementwise: the gradient of the sum is the derivative at each entry
        x = z.detach().requires_grad_(True)
        (d1,) = torch.autograd.grad(m(x).sum(), x, create_graph=err is not None)
        d2 = None if err is None else torch.autograd.grad(d1.sum(), x)[0]
    return d1.detach() * t, None if err is None else inner(err, d2 * t * t)


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
    return f"in-place {type(m).__name__} overwrites the input its derivatives need" if getattr(m, "inplace", False) \
        else None


register(nn.ReLU, keep={"sign"})(_activation_tangent)
register(nn.LeakyReLU, keep={"sign"}, check=lambda m: "LeakyReLU with a negative slope is not supported by the "
         "fast path" if m.negative_slope < 0 else None)(_activation_tangent)
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
def _maxpool(sw: Sweep, m: nn.Module, t: Tensor | None) -> Tensor | None:
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
    sw: Sweep, m: nn.Module, x_hat: Tensor, r: Tensor, t_hat: Tensor | None, u: Tensor | None,
    dims: tuple[int, ...], shape: Sequence[int],
) -> Tensor | None:
    r"""Finish a normalization layer :math:`y = \gamma \odot \hat x + \beta` (``shape``: how γ and β broadcast).

    :math:`\dot y = \gamma \dot{\hat x} + \Delta_\gamma \hat x + \Delta_\beta` with γ at :math:`\theta_t`; the layer
    adds :math:`2\langle\delta_y, \Delta_\gamma \dot{\hat x}\rangle` and, where its statistics depend on the input
    (``u``, the input's tangent centred over ``dims``, given), :math:`\langle\delta_y \gamma, \ddot{\hat x}\rangle`.
    """
    dgamma, dbeta = sw.delta(m.weight), sw.delta(m.bias)
    gamma = None if m.weight is None else _at_theta(sw, m.weight)
    gamma, dgamma, dbeta = (None if v is None else v.view(shape) for v in (gamma, dgamma, dbeta))
    if t_hat is not None and sw.exact:
        for term in normalization_terms(sw.cap.errors_out.pop(m), gamma, dgamma, x_hat, r, t_hat, u, dims):
            sw.add(term)
    if t_hat is not None and gamma is not None:
        t_hat = t_hat.mul_(gamma)  # the rules' own tensor
    return plus(plus(t_hat, None if dgamma is None else dgamma * x_hat), dbeta)


def standardize(
    x: Tensor, t: Tensor | None, dims: tuple[int, ...], eps: float, stats: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    r"""Return :math:`\hat x = (x - \mu) r` over ``dims``, :math:`r`, and along ``t``: :math:`\dot{\hat x}`, :math:`u`.

    With batch statistics :math:`u = t - \bar t` and :math:`\dot{\hat x} = r (u - \overline{\hat x u}\,\hat x)`;
    with fixed ``stats`` :math:`(\mu, r)` (running statistics) :math:`\dot{\hat x} = r t` and ``u`` is ``None``.
    """
    mean, r = stats if stats is not None else (x.mean(dims, keepdim=True),
                                                torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps))
    x_hat = (x - mean) * r
    if t is None:
        return x_hat, r, None, None
    if stats is not None:
        return x_hat, r, r * t, None
    u = t - t.mean(dims, keepdim=True)
    return x_hat, r, r * (u - (x_hat * u).mean(dims, keepdim=True) * x_hat), u


def normalization_terms(
    err: Tensor, gamma: Tensor | None, dgamma: Tensor | None, x_hat: Tensor, r: Tensor, t_hat: Tensor,
    u: Tensor | None, dims: tuple[int, ...],
) -> list[Tensor]:
    r"""Return the second-order terms of :math:`y = \gamma \hat x + \beta` along the step, with error ``err``.

    :math:`2\langle\delta_y, \Delta_\gamma \dot{\hat x}\rangle` (if γ moves) and, with batch statistics (``u``
    given), :math:`\langle\delta_y \gamma, \ddot{\hat x}\rangle`.
    """
    terms = [] if dgamma is None else [2 * inner(err * dgamma, t_hat)]
    if u is not None:
        terms.append(_normalization_term(err if gamma is None else err * gamma, x_hat, r, u, dims))
    return terms


def _normalization_term(err: Tensor, x_hat: Tensor, r: Tensor, u: Tensor, dims: tuple[int, ...]) -> Tensor:
    r"""Return :math:`\langle \delta, \ddot{\hat x}\rangle` for :math:`\hat x = (x - \mu) r` normalized over ``dims``.

    With the centred tangent :math:`u = t - \bar t`, :math:`c = \overline{\hat x u}` and :math:`n` entries per
    group: :math:`\sum_{\mathrm{groups}} r^2 \big((3c^2 - \overline{u^2}) \langle\delta, \hat x\rangle
    - 2c \langle\delta, u\rangle\big)`.
    """
    n = x_hat.numel() // r.numel()
    c = (x_hat * u).sum(dims, keepdim=True) / n
    u2 = (u * u).sum(dims, keepdim=True) / n
    along_x, along_u = (err * x_hat).sum(dims, keepdim=True), (err * u).sum(dims, keepdim=True)
    return (r * r * ((3 * c * c - u2) * along_x - 2 * c * along_u)).sum()


def _batch_stats(m: nn.Module) -> bool:
    return m.training or m.running_mean is None


@register(nn.BatchNorm1d, keep={"input", "error_out"})
@register(nn.BatchNorm2d, keep={"input", "error_out"})
def _batch_norm(sw: Sweep, m: nn.Module, t: Tensor | None) -> Tensor | None:
    r"""BatchNorm per channel: with batch statistics (training) as LayerNorm over the batch and spatial axes.

    With running statistics (evaluation) it is affine in its input: :math:`\dot{\hat x} = r \dot x`, and only
    :math:`2\langle \delta_y, \Delta_\gamma r \dot x\rangle` is added.
    """
    x = sw.cap.inputs.pop(m).detach()
    dims = (0, *range(2, x.dim()))  # every axis but the channels
    channel = (1, -1) + (1,) * (x.dim() - 2)
    stats = None if _batch_stats(m) else (m.running_mean.view(channel),
                                          torch.rsqrt(m.running_var.view(channel) + m.eps))
    x_hat, r, t_hat, u = standardize(x, t, dims, m.eps, stats)
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
    x_hat, r, t_hat, u = standardize(x.reshape(grouped), None if t is None else t.reshape(grouped), dims, m.eps)
    if t is None:
        return _scaled(sw, m, x_hat.view_as(x), r, None, None, (), channel)
    if sw.exact:  # the statistics' second-order term, on the grouped view (γ per channel)
        err = sw.cap.errors_out[m]
        err = err if m.weight is None else err * _at_theta(sw, m.weight).view(channel)
        sw.add(_normalization_term(err.reshape(grouped), x_hat, r, u, dims))
    return _scaled(sw, m, x_hat.view_as(x), r, t_hat.view_as(x), None, (), channel)


def _at_theta(sw: Sweep, param: Tensor) -> Tensor:
    """Return ``param`` at θ_t (the optimizer has already stepped it by its Δ)."""
    step = sw.delta(param)
    return param.detach() if step is None else param.detach() - step


def _sequential(sw: Sweep, m: nn.Sequential, t: Tensor | None) -> Tensor | None:
    for child in m:
        t = sw(child, t)
    return t


register(nn.Sequential)(_sequential)

LAYERS = tuple(RULES)  #: the torch.nn modules the fast path covers


# ---- the loss at the output --------------------------------------------------------------------------------

def closed_form(loss_fn: LossFn, out: Tensor, targets: Tensor) -> str | None:
    """Name the mean-reduced loss whose output derivatives are known in closed form, if ``loss_fn`` is one."""
    if loss_fn is F.mse_loss or (type(loss_fn) is nn.MSELoss and loss_fn.reduction == "mean"):
        return "mse" if out.shape == targets.shape else None
    plain_ce = type(loss_fn) is nn.CrossEntropyLoss and loss_fn.reduction == "mean" and loss_fn.weight is None \
        and loss_fn.label_smoothing == 0.0 and loss_fn.ignore_index == -100
    if (loss_fn is F.cross_entropy or plain_ce) and out.dim() == 2 and targets.dim() == 1 \
            and not targets.is_floating_point():
        return "cross_entropy"
    return None


#: losses that are mean cross-entropy over every position of ``(B, T, V)`` logits (:mod:`alphalib.models` adds its own)
SEQUENCE_CROSS_ENTROPY: set[Callable] = set()


def _output_terms(loss_fn: LossFn, out: Tensor, targets: Tensor, t: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Return the loss :math:`\\ell(f)`, the slope and the curvature at the output along :math:`\\dot f`.

    Slope :math:`\\nabla_f\\ell^\\top \\dot f`, curvature :math:`\\dot f^\\top \\nabla^2_f \\ell\\, \\dot f`.

    Closed forms for mean-reduced MSE, :math:`\\frac{2}{n}\\langle f - y, \\dot f\\rangle` and
    :math:`\\frac{2}{n}\\|\\dot f\\|^2`, and cross-entropy with probabilities :math:`p`,
    :math:`\\frac{1}{B}\\langle p - e_y, \\dot f\\rangle` and
    :math:`\\frac{1}{B}\\sum_i [\\sum_k p_{ik}\\dot f_{ik}^2 - (\\sum_k p_{ik}\\dot f_{ik})^2]`; autograd otherwise.
    """
    if loss_fn in SEQUENCE_CROSS_ENTROPY and out.dim() == 3:  # cross-entropy over all positions
        loss_fn, out, targets = F.cross_entropy, out.flatten(0, 1), targets.flatten()
        t = None if t is None else t.flatten(0, 1)
    kind = closed_form(loss_fn, out, targets) if t is not None else None
    if kind == "mse":
        r = out - targets
        n = r.numel()
        return r.square().mean(), 2 / n * inner(r, t), 2 / n * inner(t, t)
    if kind == "cross_entropy":
        b = out.shape[0]
        log_p = torch.log_softmax(out, dim=1)
        p = log_p.exp()
        pt = p * t
        slope = (inner(p, t) - t.gather(1, targets[:, None]).sum()) / b
        return -log_p.gather(1, targets[:, None]).mean(), slope, (inner(pt, t) - pt.sum(1).square().sum()) / b
    with torch.enable_grad():
        out = out.requires_grad_(True)
        loss = check_loss(loss_fn(out, targets))
        if t is None:
            zero = torch.zeros((), dtype=out.dtype, device=out.device)
            return loss.detach(), zero, zero
        (g_out,) = torch.autograd.grad(loss, out, create_graph=True)
        slope = inner(g_out, t)
        h_t = torch.autograd.grad(slope, out)[0] if slope.requires_grad else torch.zeros_like(out)
    return loss.detach(), slope.detach(), inner(t, h_t)


@torch.no_grad()
def tangent_pass(
    model: nn.Module, cap: Capture, loss_fn: LossFn, targets: Tensor, deltas: dict[int, Tensor], *, exact: bool,
    scale: float = 1.0,
) -> tuple[float, float, float]:
    """Return loss, :math:`\\Delta^\\top g` and :math:`\\Delta^\\top H\\Delta` (GGN unless ``exact``) at θ_t.

    ``deltas`` maps ``id(parameter)`` to the parameter's step :math:`\\Delta`; the parameters themselves
    already hold :math:`\\theta_{t+1}`. ``scale`` is the constant :math:`c` the training step backpropagated
    :math:`c\\,\\ell` with (the kept errors carry it; the output terms do not). Each module's kept tensors are
    released as the sweep passes it.
    """
    sweep = Sweep(cap, deltas, exact=exact)
    t = sweep(model, None)  # KeyError: a module did not leave what its rule needs (it ran otherwise than expected)
    loss, slope, curvature = _output_terms(loss_fn, cap.output.detach(), targets, t)
    if exact:
        curvature = curvature + sweep.second() / scale
    values = torch.stack([loss.double(), slope.double(), curvature.double()]).tolist()
    return values[0], values[1], values[2]
