r"""The sweep: one forward-mode pass along :math:`\Delta` over what the training step left.

After ``optimizer.step()``, with :math:`\Delta` the realized step, the sweep maps each layer's (or operation's)
input tangents to its output tangent at :math:`\theta_t` and adds the layer's second-order term
:math:`\langle\delta_y, \ddot y\rangle`. Summed over the layers this is the whole second directional derivative
(the errors carry every downstream term back), so for the loss :math:`\ell` at the model's output :math:`f`,

.. math::

    \Delta^\top H \Delta = \dot f^\top \nabla^2_f \ell\, \dot f
        + \sum_{\text{layers}\ y} \langle \delta_y, \ddot y\rangle,
    \qquad \Delta^\top g = \nabla_f \ell^\top \dot f,

and the generalised Gauss-Newton keeps only the first term. The errors are those of :math:`c\,\ell` when the
training step backpropagated a multiple of the loss (the proof of capture finds :math:`c`), so the layers' sum is
divided by :math:`c`. :func:`module_pass` runs the module rules (:mod:`alphalib.fast.layers`), :func:`op_pass`
the rules of the recorded operations (:mod:`alphalib.fast.ops`); both end in
:func:`alphalib.fast.output.output_terms`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._function import LossFn
from .capture import Capture, OpCapture
from .layers import Sweep
from .ops import NoRule, OpSweep
from .output import output_terms


def _finish(
    sweep: Sweep | OpSweep,
    loss_fn: LossFn,
    out: Tensor,
    targets: Tensor,
    t: Tensor | None,
    scale: float,
) -> tuple[float, float, float]:
    loss, slope, curvature = output_terms(loss_fn, out, targets, t)
    if sweep.exact and sweep.terms:
        curvature = curvature + torch.stack(sweep.terms).double().sum() / scale
    values = torch.stack([loss.double(), slope.double(), curvature.double()]).tolist()
    return values[0], values[1], values[2]


@torch.no_grad()
def module_pass(
    model: nn.Module,
    cap: Capture,
    loss_fn: LossFn,
    targets: Tensor,
    deltas: dict[int, Tensor],
    *,
    exact: bool,
    scale: float = 1.0,
) -> tuple[float, float, float]:
    r"""Return loss, :math:`\Delta^\top g` and :math:`\Delta^\top H\Delta` (GGN unless ``exact``) at θ_t.

    ``deltas`` maps ``id(parameter)`` to the parameter's step :math:`\Delta`; the parameters themselves
    already hold :math:`\theta_{t+1}`. ``scale`` is the constant :math:`c` the training step backpropagated
    :math:`c\,\ell` with. Each module's kept tensors are released as the sweep passes it.
    """
    assert cap.output is not None  # (the probe sweeps only a step whose forward left its output)
    sweep = Sweep(cap, deltas, exact=exact)
    t = sweep(model, None)  # KeyError: a module did not leave what its rule needs (it ran otherwise than expected)
    return _finish(sweep, loss_fn, cap.output.detach(), targets, t, scale)


@torch.no_grad()
def op_pass(
    cap: OpCapture,
    loss_fn: LossFn,
    targets: Tensor,
    deltas: dict[int, Tensor],
    params: Sequence[Tensor],
    *,
    exact: bool,
    scale: float = 1.0,
) -> tuple[float, float, float]:
    """Like :func:`module_pass`, over the recorded operations; ``params`` hold θ_{t+1}."""
    if cap.uncovered is not None:
        raise NoRule(cap.uncovered)
    assert cap.output is not None  # (the probe sweeps only a step whose forward left its output)
    sweep = OpSweep(cap, deltas, params, exact=exact)
    for op in cap.ops:
        sweep.run(op)
    out = sweep.values.get(id(cap.output), cap.output.detach())
    return _finish(sweep, loss_fn, out, targets, sweep.tangent(cap.output), scale)
