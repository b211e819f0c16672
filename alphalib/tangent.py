r"""The fast path: exact :math:`\Delta^\top H \Delta` from the training step's own activations and errors.

For a chain of layers (an ``nn.Sequential`` of the modules in :data:`SUPPORTED`) the probe keeps, from the
training step, each layer's input :math:`a_{l-1}`, output :math:`z_l` and backpropagated error
:math:`\delta_{z_l} = \partial L/\partial z_l` (references to what the step computed anyway, no recompute).
After ``optimizer.step()``, with :math:`\Delta` the realized step and :math:`W` the *new* weights, one
forward-mode sweep along :math:`\Delta` at :math:`\theta_t` gives, for an affine layer
:math:`z = \mathrm{op}(a, W_{\mathrm{old}}) + b` (linear or convolution),

.. math::

    U = \mathrm{op}(\dot a, W), \qquad
    \dot z = U + \mathrm{op}(a - \dot a, \Delta_W) + \Delta_b, \qquad
    c_l = 2\,\big(\langle \delta_z, U\rangle - \langle \delta_a, \dot a\rangle\big),

where :math:`\delta_a = \partial L/\partial a` is the error at the layer's input and :math:`c_l` equals
:math:`2\langle\delta_z, \mathrm{op}(\dot a, \Delta_W)\rangle`, the mixed weight-input term (two products per
layer, and no copy of the old weights). An elementwise activation :math:`a = \sigma(z)` maps
:math:`\dot a = \sigma'(z)\dot z` and adds :math:`\langle \delta_a, \sigma''(z)\dot z^2\rangle`; dropout multiplies
by the training step's own mask, pooling and flattening act linearly. At the output :math:`f`,

.. math::

    \Delta^\top H \Delta = \sum_l c_l + \sum_{\sigma} \langle \delta_a, \sigma''(z)\dot z^2\rangle
    + \dot f^\top \nabla^2_f \ell\, \dot f, \qquad
    \Delta^\top g = \nabla_f \ell^\top \dot f,

and the generalised Gauss-Newton keeps only the last term. Exact in exact arithmetic; in float32 the
two-product form cancels (relative error around 1e-5 measured in :math:`\Delta^\top H \Delta`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._checks import check_loss
from ._function import LossFn, replay_rng, rng_state

AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: elementwise activations with closed-form derivatives
CLOSED_FORM = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU)
#: elementwise activations whose derivatives come from autograd on the layer's input
ELEMENTWISE = (nn.Softplus, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Softsign, nn.Hardtanh, nn.LogSigmoid)
#: linear, parameter-free modules: the tangent goes through the module itself
LINEAR = (nn.Flatten, nn.Unflatten, nn.Identity, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
MAXPOOL = (nn.MaxPool1d, nn.MaxPool2d)
SUPPORTED = AFFINE + CLOSED_FORM + ELEMENTWISE + LINEAR + MAXPOOL + (nn.Dropout,)


def _plain_sequential(module: nn.Module) -> bool:
    return (isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
            and "forward" not in vars(module))


def _leaves(module: nn.Module) -> Iterator[nn.Module]:
    if isinstance(module, nn.Sequential):
        for child in module:
            yield from _leaves(child)
    else:
        yield module


def chain(model: nn.Module) -> list[nn.Module] | str:
    """Return the model's layers if the fast path covers it, else a sentence saying what it does not cover."""
    if not isinstance(model, nn.Sequential):
        return f"{type(model).__name__} is not an nn.Sequential (the fast path follows a chain of layers)"
    for m in model.modules():
        if isinstance(m, nn.Sequential) and not _plain_sequential(m):
            return f"{type(m).__name__} overrides Sequential.forward (the fast path follows the plain chain)"
    leaves = list(_leaves(model))
    for m in leaves:
        if not isinstance(m, SUPPORTED):
            return f"layer {type(m).__name__} is not supported by the fast path"
        if getattr(m, "inplace", False) and not isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.Dropout)):
            return f"in-place {type(m).__name__} overwrites the input its derivatives need"
        if isinstance(m, nn.LeakyReLU) and m.negative_slope < 0:
            return "LeakyReLU with a negative slope is not supported by the fast path"
        if isinstance(m, nn.GELU) and m.approximate not in ("none", "tanh"):
            return f"GELU(approximate={m.approximate!r}) is not supported by the fast path"
    return leaves


class Capture:
    """Hooks that keep what the training step computed: each layer's input, output and output error."""

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module], *, errors: bool):
        self.active = True
        self.layers = list(layers)
        self.inputs: dict[int, Tensor] = {}
        self.outputs: dict[int, Tensor] = {}
        self.errors: dict[int, Tensor] = {}
        self.rng: dict[int, Tensor] = {}
        self.indices: dict[int, Tensor] = {}  # max-pooling argmax, as autograd saved it for the backward
        self.output: Tensor | None = None
        self._need_error = set()
        if errors:  # hessian: errors at affine outputs, at their inputs, and at activation outputs
            for i, m in enumerate(self.layers):
                if isinstance(m, AFFINE):
                    self._need_error |= {i, i - 1}
                elif isinstance(m, CLOSED_FORM + ELEMENTWISE):
                    self._need_error.add(i)
        self._handles = [model.register_forward_hook(self._keep_output)]
        for i, m in enumerate(self.layers):
            self._handles.append(m.register_forward_hook(self._keep(i)))
            if isinstance(m, nn.Dropout):
                self._handles.append(m.register_forward_pre_hook(self._keep_rng(i)))

    def _on(self) -> bool:
        return self.active and torch.is_grad_enabled()

    def _keep_output(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self._on():
            self.output = output

    def _keep_rng(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if self._on():
                self.rng[i] = rng_state(args[0].device)

        return hook

    def _keep(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not self._on():
                return
            self.inputs[i], self.outputs[i] = args[0], output
            if isinstance(module, MAXPOOL) and output.grad_fn is not None:
                idx = getattr(output.grad_fn, "_saved_result1", None)  # max_pool*_with_indices' indices
                if isinstance(idx, Tensor) and idx.shape == output.shape:
                    self.indices[i] = idx
            if i in self._need_error and output.requires_grad:
                output.register_hook(lambda grad: self.errors.__setitem__(i, grad))

        return hook

    def clear(self) -> None:
        """Drop the references to the last step's tensors."""
        for kept in (self.inputs, self.outputs, self.errors, self.rng, self.indices):
            kept.clear()
        self.output = None

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()


def _affine(m: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias) if isinstance(m, nn.Linear) else m._conv_forward(x, weight, bias)


def _activation(m: nn.Module, z: Tensor, a: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
    """Return :math:`\\sigma'(z)\\,t` and :math:`\\sigma''(z)\\,t^2` (``None`` where :math:`\\sigma'' = 0`)."""
    if isinstance(m, nn.ReLU):  # the output decides the sign: works for in-place ReLU too
        return t * (a > 0), None
    if isinstance(m, nn.LeakyReLU):
        return torch.where(a > 0, t, m.negative_slope * t), None
    if isinstance(m, nn.Tanh):
        d1 = 1 - a * a
        return d1 * t, -2 * a * d1 * t * t
    if isinstance(m, nn.Sigmoid):
        d1 = a * (1 - a)
        return d1 * t, d1 * (1 - 2 * a) * t * t
    if isinstance(m, nn.GELU) and m.approximate == "none":
        phi = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
        return (cdf + z * phi) * t, phi * (2 - z * z) * t * t
    if isinstance(m, nn.SiLU):
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s)) * t, s * (1 - s) * (2 + z * (1 - 2 * s)) * t * t
    with torch.enable_grad():  # elementwise: the gradient of the sum is the derivative at each entry
        x = z.detach().requires_grad_(True)
        (d1,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), x)
    return d1.detach() * t, d2 * t * t


def _maxpool(m: nn.Module, a: Tensor, out: Tensor, t: Tensor, idx: Tensor | None) -> Tensor:
    """Return the tangent at the maxima (``idx``: the training step's argmax, recomputed when missing)."""
    pool, dims = (F.max_pool1d, 1) if isinstance(m, nn.MaxPool1d) else (F.max_pool2d, 2)
    if idx is None:
        idx = pool(a, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode, return_indices=True)[1]
    return t.flatten(-dims).gather(-1, idx.flatten(-dims)).view_as(out)


def _dropout_mask(m: nn.Dropout, a: Tensor, state: Tensor) -> Tensor:
    with replay_rng(state, a.device):
        return F.dropout(torch.ones_like(a), m.p, training=True)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.vdot(a.reshape(-1), b.reshape(-1))


def _closed_form(loss_fn: LossFn, out: Tensor, targets: Tensor) -> str | None:
    """Name the mean-reduced loss whose output derivatives are known in closed form, if ``loss_fn`` is one."""
    if loss_fn is F.mse_loss or (type(loss_fn) is nn.MSELoss and loss_fn.reduction == "mean"):
        return "mse" if out.shape == targets.shape else None
    plain_ce = type(loss_fn) is nn.CrossEntropyLoss and loss_fn.reduction == "mean" and loss_fn.weight is None \
        and loss_fn.label_smoothing == 0.0 and loss_fn.ignore_index == -100
    if (loss_fn is F.cross_entropy or plain_ce) and out.dim() == 2 and targets.dim() == 1 \
            and not targets.is_floating_point():
        return "cross_entropy"
    return None


def _output_terms(loss_fn: LossFn, out: Tensor, targets: Tensor, t: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Return the loss :math:`\\ell(f)`, the slope and the curvature at the output along :math:`\\dot f`.

    Slope :math:`\\nabla_f\\ell^\\top \\dot f`, curvature :math:`\\dot f^\\top \\nabla^2_f \\ell\\, \\dot f`.

    Closed forms for mean-reduced MSE, :math:`\\frac{2}{n}\\langle f - y, \\dot f\\rangle` and
    :math:`\\frac{2}{n}\\|\\dot f\\|^2`, and cross-entropy with probabilities :math:`p`,
    :math:`\\frac{1}{B}\\langle p - e_y, \\dot f\\rangle` and
    :math:`\\frac{1}{B}\\sum_i [\\sum_k p_{ik}\\dot f_{ik}^2 - (\\sum_k p_{ik}\\dot f_{ik})^2]`; autograd otherwise.
    """
    zero = torch.zeros((), dtype=out.dtype, device=out.device)
    kind = _closed_form(loss_fn, out, targets) if t is not None else None
    if kind == "mse":
        r = out - targets
        n = r.numel()
        return r.square().mean(), 2 / n * _dot(r, t), 2 / n * _dot(t, t)
    if kind == "cross_entropy":
        b = out.shape[0]
        log_p = torch.log_softmax(out, dim=1)
        p = log_p.exp()
        pt = p * t
        slope = (_dot(p, t) - t.gather(1, targets[:, None]).sum()) / b
        return -log_p.gather(1, targets[:, None]).mean(), slope, (_dot(pt, t) - pt.sum(1).square().sum()) / b
    with torch.enable_grad():
        out = out.requires_grad_(True)
        loss = check_loss(loss_fn(out, targets))
        if t is None:
            return loss.detach(), zero, zero
        (g_out,) = torch.autograd.grad(loss, out, create_graph=True)
        slope = _dot(g_out, t)
        h_t = torch.autograd.grad(slope, out)[0] if slope.requires_grad else torch.zeros_like(out)
    return loss.detach(), slope.detach(), _dot(t, h_t)


@torch.no_grad()
def tangent_pass(
    cap: Capture, loss_fn: LossFn, targets: Tensor, deltas: dict[int, Tensor], *, exact: bool
) -> tuple[float, float, float]:
    """Return loss, :math:`\\Delta^\\top g` and :math:`\\Delta^\\top H\\Delta` (GGN unless ``exact``) at θ_t.

    ``deltas`` maps ``id(parameter)`` to the parameter's step :math:`\\Delta`; the parameters themselves
    already hold :math:`\\theta_{t+1}`.
    """
    t: Tensor | None = None  # tangent of the current activation; None stands for zero
    second = torch.zeros((), dtype=torch.float64)
    for i, m in enumerate(cap.layers):
        a = cap.inputs[i].detach()
        if isinstance(m, AFFINE):
            dw, db = deltas.get(id(m.weight)), deltas.get(id(m.bias)) if m.bias is not None else None
            if t is None and dw is None and db is None:  # frozen layer before any trained one
                continue
            dw = torch.zeros_like(m.weight) if dw is None else dw
            step = _affine(m, a if t is None else a - t, dw, db)
            if t is not None:
                u = _affine(m, t, m.weight.detach(), None)
                if exact:
                    second += 2 * (_dot(cap.errors[i], u) - _dot(cap.errors[i - 1], t))
                step = step + u
            t = step
        elif t is None:
            continue
        elif isinstance(m, CLOSED_FORM + ELEMENTWISE):
            t, curv = _activation(m, a, cap.outputs[i].detach(), t)
            if exact and curv is not None:
                second += _dot(cap.errors[i], curv)
        elif isinstance(m, nn.Dropout):
            if m.training and m.p > 0:
                t = t * _dropout_mask(m, a, cap.rng[i])
        elif isinstance(m, MAXPOOL):
            t = _maxpool(m, a, cap.outputs[i], t, cap.indices.get(i))
        else:
            t = m(t)
    loss, slope, curvature = _output_terms(loss_fn, cap.output.detach(), targets, t)
    if exact:
        curvature = curvature + second
    return loss.item(), float(slope), float(curvature)

