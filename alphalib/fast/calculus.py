r"""Closed forms both fast paths share: tangents, normalization and attention along a step.

A *tangent* :math:`\dot y` is the derivative of a tensor along the step :math:`\Delta`; ``None`` stands for zero.
A layer's *second-order term* is :math:`\langle \delta_y, \ddot y\rangle`, its second directional derivative
contracted with the error :math:`\delta_y = \partial L/\partial y` the training backward left at its output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, overload

import torch
from torch import Tensor

from .. import _ops


def plus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """Add two tangents, ``None`` standing for zero."""
    return b if a is None else a if b is None else a + b


def inner(a: Tensor, b: Tensor) -> Tensor:
    r"""Return the inner product :math:`\langle a, b\rangle` of two same-shaped tensors."""
    return torch.vdot(a.reshape(-1), b.reshape(-1))


# ---- elementwise activations ---------------------------------------------------------------------------


def activation(
    kind: str,
    t: Tensor,
    err: Tensor | None,
    *,
    x: Tensor | None = None,
    y: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    r"""Return :math:`\sigma'(x)\,t` and, given the error, :math:`\langle \delta_y, \sigma''(x)\,t^2\rangle`.

    ``kind`` is ``"tanh"`` or ``"sigmoid"`` (from the output ``y``: :math:`\tanh' = 1 - y^2`,
    :math:`\tanh'' = -2y(1 - y^2)`; :math:`\sigma' = y(1-y)`, :math:`\sigma'' = \sigma'(1 - 2y)`), or ``"gelu"``
    (exact, :math:`\mathrm{gelu}'' = \varphi(x)(2 - x^2)`) or ``"silu"`` (from the input ``x``).
    """
    if kind == "tanh":
        assert y is not None  # (the callers' contract: the activations that need their output get it)
        t1 = (1 - y * y) * t
        return t1, None if err is None else -2 * inner(err * y, t1 * t)
    if kind == "sigmoid":
        assert y is not None
        t1 = y * (1 - y) * t
        return t1, None if err is None else inner(err * (1 - 2 * y), t1 * t)
    if kind == "gelu":
        assert x is not None  # (... and those that need their input, their input)
        t1 = _ops.gelu_backward(t, x)
        if err is None:
            return t1, None
        x2 = x.square()
        curv = (x2 * -0.5).exp_().mul_(2 - x2)
        return t1, inner(err * t, curv.mul_(t)) / math.sqrt(2 * math.pi)
    if kind == "silu":
        assert x is not None
        t1 = _ops.silu_backward(t, x)
        if err is None:
            return t1, None
        s = torch.sigmoid(x)
        return t1, inner(err * t * t, s * (1 - s) * (2 + x * (1 - 2 * s)))
    raise ValueError(f"no closed form for the activation {kind!r}")


def by_autograd(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    t: Tensor,
    err: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`activation` for any elementwise ``fn``: its derivatives from autograd on ``x``."""
    with torch.enable_grad():  # elementwise: the gradient of the sum is the derivative at each entry
        z = x.detach().requires_grad_(True)
        (d1,) = torch.autograd.grad(fn(z).sum(), z, create_graph=err is not None)
        d2 = None if err is None else torch.autograd.grad(d1.sum(), z)[0]
    return d1.detach() * t, None if err is None or d2 is None else inner(err, d2 * t * t)


# ---- normalization -----------------------------------------------------------------------------------------


@overload
def standardize(
    x: Tensor,
    t: Tensor,
    dims: tuple[int, ...],
    eps: float,
    stats: tuple[Tensor, Tensor] | None = None,
    *,
    fixed: Literal[False] = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...


@overload
def standardize(
    x: Tensor,
    t: Tensor | None,
    dims: tuple[int, ...],
    eps: float,
    stats: tuple[Tensor, Tensor] | None = None,
    *,
    fixed: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]: ...


def standardize(
    x: Tensor,
    t: Tensor | None,
    dims: tuple[int, ...],
    eps: float,
    stats: tuple[Tensor, Tensor] | None = None,
    *,
    fixed: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    r"""Return :math:`\hat x = (x - \mu) r` over ``dims``, :math:`r`, and along ``t``: :math:`\dot{\hat x}`, :math:`u`.

    With batch statistics :math:`u = t - \bar t` and :math:`\dot{\hat x} = r (u - \overline{\hat x u}\,\hat x)`;
    ``stats`` :math:`(\mu, r)` are the batch's when given (a kernel's saved statistics), else computed. With
    ``fixed`` statistics (running statistics, independent of :math:`x`) :math:`\dot{\hat x} = r t` and ``u`` is
    ``None``.
    """
    mean, r = (
        stats
        if stats is not None
        else (x.mean(dims, keepdim=True), torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps))
    )
    x_hat = (x - mean) * r
    if t is None:
        return x_hat, r, None, None
    if fixed:
        return x_hat, r, r * t, None
    u = t - t.mean(dims, keepdim=True)
    return x_hat, r, r * (u - (x_hat * u).mean(dims, keepdim=True) * x_hat), u


def normalization_terms(
    err: Tensor,
    gamma: Tensor | None,
    dgamma: Tensor | None,
    x_hat: Tensor,
    r: Tensor,
    t_hat: Tensor,
    u: Tensor | None,
    dims: tuple[int, ...],
) -> list[Tensor]:
    r"""Return the second-order terms of :math:`y = \gamma \hat x + \beta` along the step, with error ``err``.

    :math:`2\langle\delta_y, \Delta_\gamma \dot{\hat x}\rangle` (if γ moves) and, with batch statistics (``u``
    given), :math:`\langle\delta_y \gamma, \ddot{\hat x}\rangle` (see :func:`normalization_term`).
    """
    terms = [] if dgamma is None else [2 * inner(err * dgamma, t_hat)]
    if u is not None:
        terms.append(normalization_term(err if gamma is None else err * gamma, x_hat, r, u, dims))
    return terms


def normalization_term(err: Tensor, x_hat: Tensor, r: Tensor, u: Tensor, dims: tuple[int, ...]) -> Tensor:
    r"""Return :math:`\langle \delta, \ddot{\hat x}\rangle` for :math:`\hat x = (x - \mu) r` normalized over ``dims``.

    With the centred tangent :math:`u = t - \bar t`, :math:`c = \overline{\hat x u}` and :math:`n` entries per
    group, :math:`\ddot{\hat x} = r^2 \big(\hat x (3c^2 - \overline{u^2}) - 2 c u\big)`, so the term is
    :math:`\sum_{\mathrm{groups}} r^2 \big((3c^2 - \overline{u^2}) \langle\delta, \hat x\rangle
    - 2c \langle\delta, u\rangle\big)`.
    """
    n = x_hat.numel() // r.numel()
    c = (x_hat * u).sum(dims, keepdim=True) / n
    u2 = (u * u).sum(dims, keepdim=True) / n
    along_x, along_u = (err * x_hat).sum(dims, keepdim=True), (err * u).sum(dims, keepdim=True)
    return (r * r * ((3 * c * c - u2) * along_x - 2 * c * along_u)).sum()


# ---- attention ---------------------------------------------------------------------------------------------


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tq: Tensor | None,
    tk: Tensor | None,
    tv: Tensor | None,
    err: Tensor | None,
    *,
    scale: float | None = None,
    causal: bool = False,
    mask: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    r"""Return the tangent of :math:`O = PV`, :math:`P = \mathrm{softmax}(S)`, :math:`S = c\,QK^\top` (+ mask), and,
    given the error :math:`\delta_O`, its second-order term.

    With the softmax Jacobian :math:`J_P x = P \odot (x - \langle P, x\rangle_{\mathrm{row}})`:
    :math:`\dot S = c(\dot Q K^\top + Q \dot K^\top)`, :math:`\dot P = J_P \dot S`,
    :math:`\dot O = \dot P V + P \dot V`. With :math:`\delta_P = \delta_O V^\top` and
    :math:`\delta_S = J_P \delta_P` the term :math:`\langle \delta_O, \ddot O\rangle` is

    .. math::

        2\langle \delta_O \dot V^\top, \dot P\rangle + 2c\langle \delta_S \dot K, \dot Q\rangle
        + \langle \delta_S \odot \dot S, \dot S\rangle - 2 \sum_{\mathrm{rows}}
        \langle P, \dot S\rangle \langle \delta_S, \dot S\rangle,

    the last two being :math:`\langle \delta_P, \ddot P\rangle` for the softmax's own second derivative.
    :math:`P` is recomputed from :math:`Q, K` (fused kernels keep no copy); ``mask`` is boolean (``True``: attend)
    or added to :math:`S`, as in :func:`torch.nn.functional.scaled_dot_product_attention`.
    """
    c = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.mT).mul_(c)
    n, m = s.shape[-2:]
    if causal:
        s = s.add_(torch.full((n, m), -math.inf, dtype=s.dtype, device=s.device).triu(1))
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
    p = torch.softmax(s, dim=-1)
    ts = plus(None if tq is None else (tq @ k.mT).mul_(c), None if tk is None else (q @ tk.mT).mul_(c))
    tp = None if ts is None else _ops.softmax_backward(ts, p, -1)
    out = plus(None if tp is None else tp @ v, None if tv is None else p @ tv)
    if err is None or out is None:
        return out, None
    term = torch.zeros((), dtype=q.dtype, device=q.device)
    if tp is not None and tv is not None:
        term = term + 2 * inner(err @ tv.mT, tp)
    if ts is not None:
        err_s = _ops.softmax_backward(err @ v.mT, p, -1)
        along = err_s * ts
        term = term + inner(along, ts) - 2 * inner((p * ts).sum(-1), along.sum(-1))
        if tq is not None and tk is not None:
            term = term + 2 * c * inner(err_s @ tk, tq)
    return out, term
