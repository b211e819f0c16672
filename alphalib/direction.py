r"""Analytic direction of the step a ``torch.optim`` optimizer is about to take.

Called after ``loss.backward()`` and before ``optimizer.step()``, :func:`direction`
returns, for every parameter, the unit-learning-rate step

.. math::

    d := \frac{\theta_{t+1} - \theta_t}{\mathrm{lr}},

computed from the current gradients and optimizer state without taking the step
and without touching the state. For Adam, for instance,

.. math::

    d = -\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon},
    \qquad \hat m_t = \frac{m_t}{1 - \beta_1^t},
    \qquad \hat v_t = \frac{v_t}{1 - \beta_2^t},

where the moments :math:`m_t, v_t` already include the current gradient
:math:`g_t` and :math:`t` is the step count the update is about to use. The
formulas follow torch 2.13's single-tensor implementations, which the foreach and
fused ones match to rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._checks import ParamVector

__all__ = ["direction"]

State = dict[str, Any]
Group = dict[str, Any]
Family = Callable[[Tensor, State, Group, Group], Tensor]


def _step(state: State) -> float:
    """Step count the coming update uses (torch increments before using it)."""
    return float(state.get("step", 0.0)) + 1.0


def _get(state: State, key: str, like: Tensor) -> Tensor:
    """State buffer ``key``, or the zeros torch would initialise it with."""
    return state[key] if key in state else torch.zeros_like(like)


def _sgd(g: Tensor, state: State, group: Group, defaults: Group) -> Tensor:
    """SGD with optional momentum, dampening and Nesterov."""
    mu = group["momentum"]
    if mu == 0:
        return -g
    buf = state.get("momentum_buffer")
    buf = g if buf is None else buf.mul(mu).add_(g, alpha=1 - group["dampening"])
    return -(g.add(buf, alpha=mu) if group["nesterov"] else buf)


def _adam(g: Tensor, state: State, group: Group, defaults: Group) -> Tensor:
    """Adam and AdamW, optionally AMSGrad."""
    beta1, beta2 = (float(b) for b in group["betas"])
    t = _step(state)
    m = _get(state, "exp_avg", g).lerp(g, 1 - beta1)
    v = _get(state, "exp_avg_sq", g).mul(beta2).addcmul_(g, g, value=1 - beta2)
    if group["amsgrad"]:
        v = torch.maximum(_get(state, "max_exp_avg_sq", g), v)
    denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(group["eps"])
    return m.div(denom).mul_(-1 / (1 - beta1**t))


def _nadam(g: Tensor, state: State, group: Group, defaults: Group) -> Tensor:
    """NAdam with the momentum-decay schedule of ``mu_product``."""
    beta1, beta2 = group["betas"]
    t, psi = _step(state), group["momentum_decay"]
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    mu_product = float(state.get("mu_product", torch.tensor(1.0, dtype=scalar)) * mu)
    m = _get(state, "exp_avg", g).lerp(g, 1 - beta1)
    v = _get(state, "exp_avg_sq", g).mul(beta2).addcmul_(g, g, value=1 - beta2)
    denom = v.div(1 - beta2**t).sqrt_().add_(group["eps"])
    c_grad = -(1.0 - mu) / (1.0 - mu_product)
    c_avg = -mu_next / (1.0 - mu_product * mu_next)
    return g.div(denom).mul_(c_grad).add_(m.div(denom), alpha=c_avg)


def _radam(g: Tensor, state: State, group: Group, defaults: Group) -> Tensor:
    """RAdam: rectified adaptive step once ``rho_t > 5``, plain momentum before."""
    beta1, beta2 = group["betas"]
    t = _step(state)
    m_hat = _get(state, "exp_avg", g).lerp(g, 1 - beta1).div_(1 - beta1**t)
    bc2 = 1 - beta2**t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2**t / bc2
    if rho_t <= 5.0:
        return -m_hat
    rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
    v = _get(state, "exp_avg_sq", g).mul(beta2).addcmul_(g, g, value=1 - beta2)
    return m_hat.div_(v.sqrt_().add_(group["eps"])).mul_(-(bc2**0.5) * rect)


def _rmsprop(g: Tensor, state: State, group: Group, defaults: Group) -> Tensor:
    """RMSprop, optionally centered and with momentum."""
    alpha = group["alpha"]
    v = _get(state, "square_avg", g).mul(alpha).addcmul_(g, g, value=1 - alpha)
    if group["centered"]:
        g_avg = _get(state, "grad_avg", g).lerp(g, 1 - alpha)
        v = v.addcmul_(g_avg, g_avg, value=-1)
    avg = v.sqrt_().add_(group["eps"])
    if group["momentum"] > 0:
        return -_get(state, "momentum_buffer", g).mul(group["momentum"]).addcdiv_(g, avg)
    return -g / avg


def _adagrad(g: Tensor, state: State, group: Group, defaults: Group) -> Tensor:
    """Adagrad with learning-rate decay."""
    t = _step(state)
    if "sum" in state:
        acc = state["sum"]
    else:
        acc = torch.full_like(g, defaults["initial_accumulator_value"])
    std = acc.addcmul(g, g).sqrt_().add_(group["eps"])
    return g.div(std).mul_(-1 / (1 + (t - 1) * group["lr_decay"]))


def _adamax(g: Tensor, state: State, group: Group, defaults: Group) -> Tensor:
    """Adamax (infinity-norm Adam)."""
    beta1, beta2 = group["betas"]
    t = _step(state)
    m = _get(state, "exp_avg", g).lerp(g, 1 - beta1)
    u = torch.maximum(_get(state, "exp_inf", g).mul(beta2), g.abs().add_(group["eps"]))
    return m.div_(u).mul_(-1 / (1 - beta1**t))


_FAMILIES: dict[type[torch.optim.Optimizer], Family] = {
    torch.optim.SGD: _sgd,
    torch.optim.Adam: _adam,
    torch.optim.AdamW: _adam,
    torch.optim.NAdam: _nadam,
    torch.optim.RAdam: _radam,
    torch.optim.RMSprop: _rmsprop,
    torch.optim.Adagrad: _adagrad,
    torch.optim.Adamax: _adamax,
}


def _check(p: Tensor, grad: Tensor) -> None:
    """Reject parameters (with their gradient ``grad``) whose update this module cannot replicate."""
    if grad.is_sparse:
        raise ValueError(
            "direction() does not support sparse gradients; use dense gradients "
            "(e.g. nn.Embedding(sparse=False)) or AlphaProbe.step, which uses the realized step."
        )
    if torch.is_complex(p):
        raise ValueError(
            f"direction() does not support complex parameters (got dtype {p.dtype}); "
            "use AlphaProbe.step, which uses the realized step."
        )


@torch.no_grad()
def direction(optimizer: torch.optim.Optimizer) -> ParamVector:
    """Return the unit-learning-rate direction of the step ``optimizer.step()`` is about to take.

    Call it after ``loss.backward()`` and before ``optimizer.step()``. The optimizer state is left untouched.

    Args:
        optimizer: The optimizer about to step; its class must be one of ``torch.optim``'s ``SGD``, ``Adam``,
            ``AdamW``, ``NAdam``, ``RAdam``, ``RMSprop``, ``Adagrad`` or ``Adamax`` (exactly, not a subclass).

    Returns:
        The direction :math:`d` as a :class:`~alphalib.ParamVector`: a tuple aligned with
        ``[p for g in optimizer.param_groups for p in g["params"]]``, which it carries as ``d.params``, so
        :func:`alphalib.hvp` and :func:`alphalib.alpha_star` match it to the model's parameters whatever the
        groups' order. It satisfies ``(theta_new - theta_old) / group["lr"] == d`` to rounding; parameters
        without a gradient get zeros.

    Raises:
        TypeError: If the optimizer's class is not one of those above.
        ValueError: If a param group's lr is 0, a gradient is sparse or a parameter is complex.
    """
    family = _FAMILIES.get(type(optimizer))
    if family is None:
        supported = ", ".join(cls.__name__ for cls in _FAMILIES)
        raise TypeError(
            f"direction() does not support {type(optimizer).__qualname__}; supported "
            f"optimizers (exact classes): {supported}. AlphaProbe.step works for any "
            "optimizer because it uses the realized step."
        )
    out = []
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        if lr == 0:
            raise ValueError(
                "direction() needs a nonzero learning rate (d = step / lr); got lr=0 "
                "in a param group. Set a positive lr for every group."
            )
        wd = float(group["weight_decay"])
        # AdamW decays decoupled; on older torch (2.5) its groups have no such key, nor has Adam the option
        decoupled = group.get("decoupled_weight_decay", type(optimizer) is torch.optim.AdamW)
        for p in group["params"]:
            if p.grad is None:
                out.append(torch.zeros_like(p))
                continue
            _check(p, p.grad)
            g = p.grad.neg() if group["maximize"] else p.grad
            if wd != 0 and not decoupled:
                g = g.add(p, alpha=wd)
            d = family(g, optimizer.state.get(p, {}), group, optimizer.defaults)
            out.append(d.sub_(p, alpha=wd) if wd != 0 and decoupled else d)
    return ParamVector(out, (p for group in optimizer.param_groups for p in group["params"]))
