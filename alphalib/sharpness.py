r"""Sharpness: the Hessian's extreme eigenvalues, Adam's preconditioned sharpness, the trace, the stability edge.

The Hessian :math:`H` of the mean loss over ``data`` (one batch, or the full data one batch at a time:
:math:`H = \sum_b \frac{n_b}{N} H_b` for mean-reduced batch losses of :math:`n_b` samples) is reached only through
Hessian-vector products. Its extreme eigenvalues :math:`\lambda_{\max}` and :math:`\lambda_{\min}` come from
implicitly restarted Lanczos (scipy's ARPACK ``eigsh`` on a float64 ``LinearOperator``), its trace from
Hutchinson's estimator :math:`\operatorname{tr} H \approx \frac1m \sum_{i=1}^m z_i^\top H z_i` with Rademacher
:math:`z_i`.

**Adam's preconditioned sharpness** (Cohen et al. 2022) is :math:`\lambda_1(P_t^{-1} H)` with the diagonal
preconditioner of Adam's last step :math:`t`,

.. math::

    P_t = (1 - \beta_1^t)\,\Bigl[\operatorname{diag}\Bigl(\sqrt{v_t / (1 - \beta_2^t)}\Bigr) + \epsilon I\Bigr],
    \qquad \theta_{t+1} = \theta_t - \eta\, P_t^{-1} m_t,

where :math:`v_t` is the optimizer's ``exp_avg_sq`` (``max_exp_avg_sq`` with AMSGrad) and :math:`m_t` its
``exp_avg``: the bias correction of :math:`m_t` sits in :math:`P_t`, so that the update is Adam's. The eigenvalues
of :math:`P^{-1}H` are those of the symmetric :math:`P^{-1/2} H P^{-1/2}`, which Lanczos takes.

**The edge of stability.** On a quadratic with curvature :math:`\lambda` along an eigenvector, gradient descent at
step size :math:`\eta` is stable while :math:`\lambda < 2/\eta`, heavy-ball momentum :math:`\beta` while
:math:`\lambda < (2 + 2\beta)/\eta`, and Adam with frozen preconditioner while :math:`\lambda_1(P^{-1}H) < (2 +
2\beta_1)/((1 - \beta_1)\eta)`, :math:`38/\eta` at :math:`\beta_1 = 0.9` (Cohen et al. 2021, 2022); full-batch
training drives the (preconditioned) sharpness up to that threshold and holds it there.
:func:`stability_threshold` returns it for an optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from ._checks import trainable
from ._function import BatchLoss, LossFn, Objective
from .spectrum import as_batches, batch_size

__all__ = ["Sharpness", "top_eigenvalue", "hessian_trace", "preconditioner", "stability_threshold"]


@dataclass(frozen=True)
class Sharpness:
    """The extreme eigenvalues of the Hessian (or of Adam's preconditioned Hessian) and what finding them cost.

    Attributes:
        lambda_max: The largest eigenvalue.
        lambda_min: The smallest eigenvalue (NaN when only the largest was asked for).
        preconditioned: Whether these are eigenvalues of :math:`P^{-1} H`.
        matvecs: The Hessian-vector products the Lanczos iteration took.
    """

    lambda_max: float
    lambda_min: float
    preconditioned: bool
    matvecs: int


def _as_batches(data: object) -> list[object]:
    """Return ``data`` as a list of batches (:func:`alphalib.spectrum.as_batches`), refusing an empty one."""
    batches = list(as_batches(data))
    if not batches:
        raise ValueError("data is empty: give a batch, or batches (e.g. a DataLoader over the training set).")
    return batches


def preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[Tensor]:
    r"""Return Adam's diagonal preconditioner :math:`P_t` of its last step, one tensor per parameter in ``params``.

    See the module for the formula.

    Args:
        optimizer: A ``torch.optim.Adam`` or ``AdamW`` that has taken at least one step.
        params: The parameters whose preconditioner is returned, all in ``optimizer``'s param groups.

    Returns:
        :math:`P_t` for each parameter, shaped like it.

    Raises:
        TypeError: If ``optimizer`` is neither ``Adam`` nor ``AdamW``.
        ValueError: If a parameter is not in the optimizer, or the optimizer has not stepped yet.
    """
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        raise TypeError(
            f"the preconditioned sharpness needs Adam's preconditioner: give torch.optim.Adam or AdamW, "
            f"got {type(optimizer).__qualname__} (or leave optimizer=None for the plain Hessian)."
        )
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for p in params:
        if id(p) not in group_of:
            raise ValueError(
                f"a parameter of shape {tuple(p.shape)} is not in the optimizer: build the optimizer "
                "from the model's parameters."
            )
        group, state = group_of[id(p)], optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            raise ValueError("the optimizer has not stepped yet, so it has no preconditioner: take a step first.")
        beta1, beta2 = (float(b) for b in group["betas"])
        t = float(state["step"])
        v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
        out.append((v / (1 - beta2**t)).sqrt().add(group["eps"]).mul(1 - beta1**t).detach())
    return out


class _Operator:
    r"""The (preconditioned) Hessian of the mean loss over ``batches`` at ``theta`` as a float64 matrix-free operator.

    One batch keeps its gradient's graph between products (a double backward each); several are recomputed batch by
    batch for every product (memory of one batch).
    """

    def __init__(self, parts: list[tuple[float, BatchLoss]], theta: Sequence[Tensor], scale: Sequence[Tensor] | None):
        self.theta = [t.detach() for t in theta]
        self.shapes, self.sizes = [t.shape for t in self.theta], [t.numel() for t in self.theta]
        self.n = sum(self.sizes)
        self.dtype = self.theta[0].dtype
        self.scale = None if scale is None else torch.cat([s.reshape(-1) for s in scale]).rsqrt()  # P^{-1/2}
        self.parts = parts  # (weight, the loss of one batch): H = sum of weight * H_b
        self.count = 0
        self._kept = self._graph(self.parts[0][1]) if len(self.parts) == 1 else None

    def _graph(self, fn: BatchLoss) -> tuple[list[Tensor], tuple[Tensor, ...]]:
        leaves = [t.clone().requires_grad_(True) for t in self.theta]
        with torch.enable_grad():
            grads = torch.autograd.grad(
                fn(leaves), leaves, create_graph=True, allow_unused=True, materialize_grads=True
            )
        return leaves, grads

    def _hv(self, v: list[Tensor]) -> Tensor:
        total = None
        for weight, fn in self.parts:
            leaves, grads = self._kept if self._kept is not None else self._graph(fn)
            hv: Sequence[Tensor]
            if not any(g.requires_grad for g in grads):  # the loss is linear in θ: H = 0
                hv = [torch.zeros_like(t) for t in leaves]
            else:
                hv = torch.autograd.grad(
                    grads,
                    leaves,
                    grad_outputs=v,
                    retain_graph=self._kept is not None,
                    allow_unused=True,
                    materialize_grads=True,
                )
            flat = torch.cat([h.reshape(-1) for h in hv]) * weight
            total = flat if total is None else total + flat
        assert total is not None  # (parts is never empty: _operator refuses empty data)
        return total

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Return :math:`P^{-1/2} H P^{-1/2} x` (or :math:`H x`) for a float64 vector ``x``."""
        self.count += 1
        vec = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.dtype, device=self.theta[0].device)
        if self.scale is not None:
            vec = vec * self.scale
        out = self._hv([t.view(s) for t, s in zip(vec.split(self.sizes), self.shapes, strict=True)])
        if self.scale is not None:
            out = out * self.scale
        return out.detach().double().cpu().numpy()


def _operator(
    model: nn.Module,
    loss: LossFn | Objective,
    data: object,
    optimizer: torch.optim.Optimizer | None,
    theta: Sequence[Tensor] | None,
) -> _Operator:
    """The operator over ``data``'s batches weighted by their sizes, or over the one function ``data`` is already (the
    probe hands over the loss it measures: the training step's micro-batches, weights and random draws)."""
    params = trainable(model)
    scale = None if optimizer is None else preconditioner(optimizer, params)
    at = [p.detach() for p in params] if theta is None else list(theta)
    if isinstance(data, BatchLoss):
        return _Operator([(1.0, data)], at, scale)
    batches = _as_batches(data)
    total = sum(batch_size(b) for b in batches)
    return _Operator([(batch_size(b) / total, BatchLoss(model, loss, b)) for b in batches], at, scale)


def top_eigenvalue(
    model: nn.Module,
    loss: LossFn | Objective,
    data: object,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    which: Literal["both", "max"] = "both",
    tol: float = 1e-6,
    seed: int = 0,
    theta: Sequence[Tensor] | None = None,
) -> Sharpness:
    r"""Return :math:`\lambda_{\max}` (and :math:`\lambda_{\min}`) of the Hessian of the mean loss over ``data``.

    The eigenvalues come from ARPACK's Lanczos iteration on Hessian-vector products (the Hessian of two parameters
    or fewer is formed whole). The model, its ``.grad`` and buffers are left as they were; it is evaluated in its
    current mode (dropout: one fixed mask).

    Args:
        model: The network whose loss's Hessian is taken, with respect to its trainable parameters.
        loss: The mean-reduced ``loss_fn(model(inputs), targets)``, or an :class:`~alphalib.Objective` of the
            model and a batch.
        data: One batch (a tuple) or batches (a list, a ``DataLoader``), weighted by their sizes.
        optimizer: An Adam or AdamW optimizer of the model: the eigenvalues are then those of :math:`P_t^{-1} H`
            (see the module); ``None``: of :math:`H`.
        which: ``"both"`` for :math:`\lambda_{\max}` and :math:`\lambda_{\min}`, ``"max"`` for
            :math:`\lambda_{\max}` alone.
        tol: ARPACK's relative accuracy.
        seed: Fixes ARPACK's starting vector.
        theta: Where :math:`H` is taken, aligned with the model's trainable parameters (default: at them).

    Returns:
        The eigenvalues, whether they are preconditioned, and the Hessian-vector products they took.

    Raises:
        ValueError: If ``which`` is neither ``"both"`` nor ``"max"``, ``data`` is empty, or ``optimizer`` has not
            stepped yet.
        TypeError: If ``optimizer`` is neither Adam nor AdamW.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> res = top_eigenvalue(model, torch.nn.functional.mse_loss, (x, torch.zeros(2, 1, dtype=torch.float64)))
        >>> round(res.lambda_max, 10), round(res.lambda_min, 10)  # H = 2 X'X / 2 = diag(1, 4)
        (4.0, 1.0)
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    if which not in ("both", "max"):
        raise ValueError(f"which must be 'both' or 'max', got {which!r}.")
    op = _operator(model, loss, data, optimizer, theta)
    v0 = np.random.default_rng(seed).standard_normal(op.n)
    if op.n <= 2:  # ARPACK needs k < n: a matrix this small is formed whole
        dense = np.column_stack([op(e) for e in np.eye(op.n)])
        values = np.linalg.eigvalsh((dense + dense.T) / 2)
    else:
        lin = LinearOperator((op.n, op.n), matvec=op, dtype=np.float64)
        values = np.sort(
            eigsh(
                lin,
                k=2 if which == "both" else 1,
                which="BE" if which == "both" else "LA",
                tol=tol,
                v0=v0,
                return_eigenvectors=False,
            )
        )
    low = float(values[0]) if which == "both" else math.nan
    return Sharpness(float(values[-1]), low, optimizer is not None, op.count)


def hessian_trace(
    model: nn.Module,
    loss: LossFn | Objective,
    data: object,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    samples: int = 100,
    seed: int = 0,
    theta: Sequence[Tensor] | None = None,
) -> float:
    r"""Return Hutchinson's estimate of :math:`\operatorname{tr} H` (or :math:`\operatorname{tr} P^{-1}H`) on ``data``.

    The mean of :math:`z^\top H z` over :math:`m` Rademacher vectors :math:`z`; its standard error is
    :math:`\sqrt{2(\|H\|_F^2 - \sum_i H_{ii}^2)/m}`.

    Args:
        model: The network whose loss's Hessian is taken, with respect to its trainable parameters.
        loss: The mean-reduced ``loss_fn(model(inputs), targets)``, or an :class:`~alphalib.Objective` of the
            model and a batch.
        data: One batch (a tuple) or batches (a list, a ``DataLoader``), weighted by their sizes.
        optimizer: An Adam or AdamW optimizer of the model, for the trace of :math:`P_t^{-1} H` (see the module);
            ``None``: of :math:`H`.
        samples: The number :math:`m` of Rademacher vectors.
        seed: Seeds the generator the vectors are drawn from.
        theta: Where :math:`H` is taken, aligned with the model's trainable parameters (default: at them).

    Returns:
        The estimate of the trace.

    Raises:
        ValueError: If ``samples`` is not a positive integer, ``data`` is empty, or ``optimizer`` has not stepped
            yet.
        TypeError: If ``optimizer`` is neither Adam nor AdamW.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}.")
    op = _operator(model, loss, data, optimizer, theta)
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(samples):
        z = rng.choice([-1.0, 1.0], size=op.n)
        total += float(z @ op(z))
    return total / samples


def stability_threshold(optimizer: torch.optim.Optimizer) -> float:
    r"""Return the sharpness at which full-batch training with ``optimizer`` stops being stable (see the module).

    :math:`2/\eta` for SGD, :math:`(2 + 2\beta)/\eta` with heavy-ball momentum :math:`\beta` (torch's SGD without
    dampening), :math:`(2 + 2\beta)/((1 + 2\beta)\eta)` with Nesterov, :math:`(2 + 2\beta_1)/((1 - \beta_1)\eta)`
    for Adam and AdamW (a bound on the preconditioned sharpness).

    Args:
        optimizer: A ``torch.optim.SGD``, ``Adam`` or ``AdamW``; its first param group's learning rate
            :math:`\eta` and momentum (:math:`\beta`, or Adam's :math:`\beta_1`) set the threshold.

    Returns:
        The threshold, in the units of the (preconditioned) sharpness.

    Raises:
        ValueError: If ``optimizer`` is SGD with momentum and dampening.
        TypeError: If ``optimizer`` is not SGD, Adam or AdamW.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> round(stability_threshold(torch.optim.Adam(net.parameters(), lr=1e-3)))
        38000
    """
    group = optimizer.param_groups[0]
    lr = float(group["lr"])
    if type(optimizer) is torch.optim.SGD:
        beta = float(group["momentum"])
        if beta and group["dampening"]:
            raise ValueError("the threshold of SGD with dampening is not implemented: use dampening=0.")
        return (2 + 2 * beta) / ((1 + 2 * beta) * lr) if group["nesterov"] else (2 + 2 * beta) / lr
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        beta1 = float(group["betas"][0])
        return (2 + 2 * beta1) / ((1 - beta1) * lr)
    raise TypeError(f"no stability threshold for {type(optimizer).__qualname__}: SGD, Adam and AdamW have one.")
