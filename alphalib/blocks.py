r""":math:`\alpha^*` per group of parameters: how far the step is from its quadratic model, block by block.

The realized step :math:`d = (\theta_{t+1} - \theta_t)/\mathrm{lr}` splits into the groups :math:`l` of a partition
of (some of) the parameters: embeddings, each block's attention, each block's MLP, the head. Restricted to group
:math:`l`, with :math:`d_l` and :math:`g_l` the step's and the gradient's entries there and :math:`H_{ll}` the
diagonal block of the Hessian, the quadratic model of the loss along :math:`d_l` alone (all other parameters held at
:math:`\theta_t`) is minimised at

.. math::

    \alpha^*_l = -\frac{d_l^\top g_l}{d_l^\top H_{ll}\, d_l},

in learning-rate units as the whole step's :math:`\alpha^*` is: :math:`\alpha^*_l/\mathrm{lr} < 1` means the step
overshoots the minimum of its model in group :math:`l`, :math:`> 1` that it stops short. The slopes add up over a
partition (:math:`\sum_l d_l^\top g_l = d^\top g`); the curvatures do not: :math:`d^\top H d = \sum_l d_l^\top
H_{ll} d_l + \sum_{l \ne m} d_l^\top H_{lm} d_m`, and the cross terms are what one group's step does to another's
slope. One group that holds every parameter gives the whole step's :math:`\alpha^*` (:func:`alphalib.alpha_star`).

The loss is the batch **mean** (``loss_fn`` reduced with ``reduction="mean"``, torch's default), as everywhere in
alphalib: slopes and curvatures are those of :math:`L_B = \frac{1}{|B|}\sum_{i \in B} \ell_i`; a sum-reduced loss
scales both by :math:`|B|` and leaves :math:`\alpha^*_l` unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._checks import Vector, check_vector, trainable
from ._function import BatchLoss, LossFn, Objective, dot
from .curvature import _grad, _leaves
from .records import _inverse, alpha, classify

__all__ = ["BlockAlpha", "block_alpha", "resolve_groups"]


@dataclass(frozen=True)
class BlockAlpha:
    r"""What :func:`block_alpha` measured for one group :math:`l` of parameters, in units of the direction ``d``."""

    slope: float  #: :math:`d_l^\top g_l`
    curvature: float  #: :math:`d_l^\top H_{ll} d_l`
    alpha_star: float  #: :math:`-d_l^\top g_l / d_l^\top H_{ll} d_l`; NaN when the curvature is zero or not finite
    #: :math:`\alpha^*_l/\mathrm{lr}` (NaN without ``lr``)
    ratio: float
    #: :math:`\mathrm{lr}/\alpha^*_l = -\mathrm{lr}\, d_l^\top H_{ll} d_l / d_l^\top g_l`, defined through a change of
    #: the curvature's sign (NaN when the slope is 0 or without ``lr``), as the records' ``lr_over_alpha``
    lr_over_alpha: float
    #: ``"ok"`` or the ``"|"``-joined reasons :math:`\alpha^*_l` is no step size (:data:`alphalib.FLAGS`:
    #: ``negative_curvature``, ``zero_curvature``, ``ascent``, ``zero_step``, ``nonfinite``)
    flag: str
    step_norm: float  #: :math:`\|d_l\|`
    size: int  #: the number of scalar parameters in the group
    names: tuple[str, ...]  #: the group's trainable parameters, as ``model.named_parameters()`` names them


def block_alpha(
    model: nn.Module,
    loss_fn: LossFn | Objective,
    batch: object,
    groups: Mapping[str, Sequence[str]],
    *,
    theta: Vector | None = None,
    d: Vector | None = None,
    lr: float | None = None,
) -> dict[str, BlockAlpha]:
    r"""Return, per group :math:`l` of parameters, :math:`d_l^\top g_l`, :math:`d_l^\top H_{ll} d_l` and
    :math:`\alpha^*_l` at :math:`\theta_t`.

    .. math::

        \alpha^*_l = -\frac{d_l^\top g_l}{d_l^\top H_{ll}\, d_l}, \qquad
        g = \nabla L_B(\theta_t), \quad H = \nabla^2 L_B(\theta_t),

    with :math:`L_B` the **mean** loss over ``batch``, :math:`d_l, g_l` the direction and the gradient restricted to
    group :math:`l` and :math:`H_{ll}` the Hessian's diagonal block of that group (exact: one backward pass that
    keeps its graph for the gradient, then one Hessian-vector product per group, in the parameters' precision). Call
    it right after ``optimizer.step()`` with ``theta`` the parameters before the step and ``lr`` the step's learning
    rate: then :math:`d = (\theta_{t+1} - \theta_t)/\mathrm{lr}` is the realized step, the model's parameters being
    :math:`\theta_{t+1}`. Or give the direction ``d`` (and ``theta``, else the model's parameters are
    :math:`\theta_t`). The model's parameters, ``.grad`` fields, buffers and the global RNG are left as they were
    (dropout draws one mask from the current RNG state, in the model's current mode). Odd curvature never raises: a
    group with :math:`d_l^\top H_{ll} d_l \le 0` or non-finite values gets a negative or NaN ``alpha_star`` and a
    ``flag`` that says why.

    Args:
        model: The network; ``g`` and ``H`` are taken with respect to its trainable parameters.
        loss_fn: The mean-reduced ``loss_fn(model(inputs), targets)``, or an :func:`alphalib.objective`.
        batch: The ``(inputs, targets)`` pair the step was taken on (or the objective's batch).
        groups: Group name -> the parameters in it: each entry a parameter's name in ``model.named_parameters()``
            (``"blocks.0.attn.qkv.weight"``) or a module's in ``model.named_modules()`` (``"blocks.0.attn"``: every
            parameter under it; ``""`` is the whole model). Frozen parameters are left out. Groups must not share a
            parameter; parameters in no group are not measured (they still shape ``g`` and ``H``).
        theta: :math:`\theta_t`, the parameters before the step, as :func:`alphalib.alpha_star` takes ``d``: a
            tuple aligned with the trainable parameters, a dict keyed by their names, or a
            :class:`~alphalib.ParamVector`. ``None``: the model's current parameters (then ``d`` is needed).
        d: The direction. ``None``: :math:`(\theta_{\text{model}} - \theta_t)/\mathrm{lr}`, the step just taken.
        lr: The step's learning rate: with ``d=None`` it turns the step into ``d``; whenever given, ``ratio`` and
            ``lr_over_alpha`` are in its units.

    Returns:
        A :class:`BlockAlpha` per group, in the order of ``groups``.

    Raises:
        ValueError: If a group is empty, names a parameter or module the model lacks, or holds only frozen
            parameters; if two groups share a parameter; if neither ``d`` nor ``theta`` and ``lr`` are given, ``lr``
            is not positive, or ``theta`` or ``d`` do not match the model's trainable parameters.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1).double()
        >>> x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
        >>> before = [p.detach().clone() for p in model.parameters()]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> opt.step()
        >>> res = block_alpha(model, torch.nn.functional.mse_loss, (x, y), {"w": ["weight"], "b": ["bias"]},
        ...                   theta=before, lr=0.1)
        >>> res["b"].flag, round(res["b"].ratio, 6)  # the loss is quadratic in the bias: curvature 2 along it
        ('ok', 5.0)
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = trainable(model)
    members = resolve_groups(model, groups)
    if lr is not None and not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0):
        raise ValueError(f"lr must be a positive number (the step's learning rate), got {lr!r}.")
    if d is None and (theta is None or lr is None):
        raise ValueError(
            "block_alpha needs the step: pass d=<the direction>, or theta=<the parameters before the step> and "
            "lr=<its learning rate> after optimizer.step() (d is then (the model's parameters - theta) / lr)."
        )
    theta_t = (
        [p.detach() for p in params] if theta is None else [t.detach() for t in check_vector(theta, model, "theta")]
    )
    if d is None:
        assert lr is not None  # (checked above)
        with torch.no_grad():
            direction = [(p.detach() - t) / lr for p, t in zip(params, theta_t, strict=True)]
    else:
        direction = [v.detach() for v in check_vector(d, model, "d")]
    index = {n: i for i, n in enumerate(named)}
    fn = BatchLoss(model, loss_fn, batch)
    leaves = _leaves(theta_t)
    with torch.enable_grad():
        g = _grad(fn(leaves), leaves, create_graph=True)
        out: dict[str, BlockAlpha] = {}
        for k, (group, names) in enumerate(members.items()):
            idx = [index[n] for n in names]
            d_l = [direction[i] for i in idx]
            slope = dot([g[i] for i in idx], d_l)
            if slope.requires_grad:
                last = k == len(members) - 1
                hv = _grad(slope, [leaves[i] for i in idx], retain_graph=not last)
                curvature = dot(hv, d_l)
            else:  # the loss is linear in the group (or does not depend on it)
                curvature = torch.zeros((), dtype=slope.dtype, device=slope.device)
            out[group] = _result(slope, curvature, d_l, names, [params[i] for i in idx], lr)
    return out


def _result(
    slope_t: Tensor,
    curvature_t: Tensor,
    d_l: Sequence[Tensor],
    names: Sequence[str],
    ps: Sequence[Tensor],
    lr: float | None,
) -> BlockAlpha:
    """Return one group's :class:`BlockAlpha` from its slope and curvature (one synchronisation)."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v.double()) for v in d_l]))
    slope, curvature, step_norm = torch.stack([t.detach().double() for t in (slope_t, curvature_t, norm)]).tolist()
    a = alpha(slope, curvature)
    flag = classify(slope, curvature, step_norm=step_norm)
    ratio, lr_over_alpha = (math.nan, math.nan) if lr is None else (a / lr, lr * _inverse(slope, curvature))
    return BlockAlpha(
        slope=slope,
        curvature=curvature,
        alpha_star=a,
        ratio=ratio,
        lr_over_alpha=lr_over_alpha,
        flag=flag,
        step_norm=step_norm,
        size=sum(p.numel() for p in ps),
        names=tuple(names),
    )


def resolve_groups(model: nn.Module, groups: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Return each group's trainable parameters, by name in the model's order, as :func:`block_alpha` reads them.

    Args:
        model: The network.
        groups: Group name -> parameter or module names (see :func:`block_alpha`).

    Returns:
        Group name -> the names, in ``model.named_parameters()``, of the trainable parameters it holds.

    Raises:
        ValueError: If ``groups`` is empty or not a dict, a group is empty, a string, names a parameter or module
            the model lacks or holds only frozen parameters, or two groups share a parameter.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> resolve_groups(model, {"first": ["0"], "last": ["2.weight", "2.bias"]})
        {'first': ['0.weight', '0.bias'], 'last': ['2.weight', '2.bias']}
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError(
            "groups must be a non-empty dict: group name -> parameter or module names, e.g. "
            "{'attention': ['blocks.0.attn'], 'head': ['head']}."
        )
    everything = [n for n, _ in model.named_parameters()]
    modules = {n for n, _ in model.named_modules()}
    owner: dict[str, str] = {}
    out: dict[str, list[str]] = {}
    for group, entries in groups.items():
        if isinstance(entries, str):
            raise ValueError(
                f"group {group!r} is the string {entries!r}; give a list of names, e.g. {{{group!r}: [{entries!r}]}}."
            )
        if not entries:
            raise ValueError(f"group {group!r} is empty; give it at least one parameter or module name, or drop it.")
        picked: set[str] = set()
        for entry in entries:
            if entry in named or entry in everything:
                found = [entry]
            elif entry in modules:
                found = [n for n in everything if entry == "" or n.startswith(entry + ".")]
            else:
                raise ValueError(
                    f"group {group!r} names {entry!r}, which is neither a parameter nor a module of the model; use "
                    f"the names of model.named_parameters() or model.named_modules(), e.g. {everything[:3]}."
                )
            picked.update(found)
        for n in picked & set(named):
            if n in owner and owner[n] != group:
                raise ValueError(
                    f"groups {owner[n]!r} and {group!r} both hold the parameter {n!r}; the groups must not "
                    "overlap: give each parameter to one group."
                )
            owner[n] = group
        out[group] = [n for n in named if n in picked]
        if not out[group]:
            raise ValueError(
                f"group {group!r} holds no trainable parameter (only frozen ones, or modules without parameters); "
                "give it a parameter with requires_grad=True, or drop it."
            )
    return out
