r"""The router: which path measures this step, and why not the fast one.

Given the evidence's :class:`~alphalib.probe.evidence.Verdict`, :func:`route` chooses between

* the **sweep**: one tangent sweep along :math:`\Delta` over the training step's captured forward (module
  rules or recorded operations, :mod:`alphalib.fast`), for ``"hessian"`` and ``"ggn"``;
* **reuse**: the training loss and gradient at :math:`\theta_t` for the backends that take differences;
* the **generic** path: the loss evaluated afresh at :math:`\theta_t` under the training forward's state.

Every reason a faster path was not taken goes into the record's ``fallback``. After the step, the precision
rules may still send it to the generic path: :func:`unresolved` (a weight's step below the sweep's resolution), and
in float64 :func:`faint` (a loss near zero) and :func:`cancelled` (a secant near rounding); and with
``path="auto"`` on recorded operations :class:`Trials` times the user's own training iteration on both paths for
five probed steps and keeps the faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import _ops, _trained
from ..curvature import Directional
from ..fast import Capture, OpCapture
from ..fast.ops import VECTOR_PRODUCTS
from .evidence import Verdict

#: the backends that difference gradients: below float64 they are evaluated in float64 (in float32 their step
#: ε is large enough for ReLU kinks to dominate: measured median errors 0.24-2.3 of α*/lr)
WIDENED = ("fd", "fd_onesided")


@dataclass
class Route:
    """How one probed step is measured."""

    sweep: bool  #: a tangent sweep over the captured training step
    reuse: bool  #: the training loss and gradient at θ_t (the difference backends)
    tapped: bool  #: the verdict's gradient is what the training backward sent (c ∇ℓ)
    trial: bool = False  #: a timed trial of the generic path (path="auto")
    recapture: bool = False  #: module rules no longer hold: record operations from the next step on
    reasons: list[str] = field(default_factory=list)  #: why a faster path was not taken

    @property
    def path(self) -> str:
        return "fast" if self.sweep or self.reuse else "generic"

    def generic(self, why: str) -> None:
        """Measure on the generic path after all, for the reason ``why``."""
        self.reasons.append(why)
        self.sweep = self.reuse = self.tapped = False


def route(
    model: nn.Module, verdict: Verdict, capture: Capture | OpCapture | None, why: str, trials: Trials | None
) -> Route:
    """Choose the path for a step, from the verdict, the capture and the probe's standing reason ``why``."""
    fast = verdict.fast and not why
    r = Route(sweep=False, reuse=False, tapped=False, reasons=([why] if why else verdict.reasons) + verdict.mismatch)
    if fast:  # checked every step: hooks can be added, and modes switched, at any time
        modifier = _trained.gradient_modifiers(model)
        custom = None if modifier or not isinstance(capture, Capture) else _trained.not_textbook(model)
        if modifier:
            r.reasons.append(f"{modifier}: measured on the generic path, without it")
        elif custom:
            r.reasons.append(f"{custom}, which module rules do not follow: recorded operations from the next step on")
        fast, r.recapture = not (modifier or custom), bool(custom)
    r.tapped = fast
    r.reuse = fast and capture is None
    if fast and capture is not None:
        if trials is not None and trials.generic_next():
            r.trial = True
            r.reasons.append("path='auto' is timing the generic path against the recorded operations (5 probed steps)")
        elif capture.output is None or capture.reused or capture.uncovered:
            r.reasons.append(
                "a module ran twice in the forward pass"
                if capture.reused
                else capture.uncovered or "the capture is empty"
            )
        else:
            r.sweep = True
    return r


class Trials:
    """``path="auto"`` on recorded operations: time the training iteration on both paths, keep the faster.

    An iteration runs from the start of the training forward pass (the first, under accumulation) to the end of
    ``probe.step``: the forward and backward passes (recorded or not) and the probe's measurement, in the user's
    own loop; what the loop does between steps (evaluation, logging, loading data) is not counted. The first probed
    step warms up and is not counted; then generic, recorded, generic, recorded.
    """

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    def generic_next(self) -> bool:
        """Whether the next probed step is a trial of the generic path (the 2nd and 4th of the first five)."""
        return len(self.times) in (1, 3)

    def add(self, path: str, seconds: float | None) -> dict[str, float] | None:
        """Count one timed iteration (``None``: the warm-up); after five, return the best seconds of each path."""
        self.times.append(("warm-up", 0.0) if seconds is None else (path, seconds))
        if len(self.times) < 5:
            return None
        return {k: min(s for p, s in self.times[1:] if p == k) for k in ("fast", "generic")}


def unresolved(current: list[Tensor], steps: list[float], capture: Capture | OpCapture | None) -> str | None:
    r"""Say why the step (``steps``: the norm of Δ per tensor) is too small for the sweep at the parameters'
    precision, or ``None``.

    The sweep recovers the second-order term of a product with a weight from products at :math:`\theta_{t+1}` and
    :math:`\theta_t` (:mod:`alphalib.fast.layers`); their difference loses about :math:`u\,\|W\|/\|\Delta_W\|` of
    it (unit roundoff :math:`u`; measured: 0.15 times it on an MLP). Below float64 that must stay under 1e-3 for
    every weight the step moved, which keeps the sweep within the 1e-3 it states for float32 (a ResNet at Adam's lr
    1e-3: 1.2e-4; lr 1e-5: 4e-3-8e-3). Only factors of products are concerned: a parameter that enters elementwise
    (a bias, a normalization's scale) enters through its step alone, which is exact (the difference of two floats
    within a factor two). Matrices and kernels are checked, and vectors where the recorded operations multiply one
    (:data:`alphalib.fast.ops.VECTOR_PRODUCTS`). The generic path has no such difference: it measures at
    :math:`\theta_t` in the parameters' precision.
    """
    dtype = current[0].dtype
    if dtype == torch.float64:
        return None
    eps = torch.finfo(dtype).eps
    vectors = isinstance(capture, OpCapture) and any(
        op.other is not None and op.func.overloadpacket in VECTOR_PRODUCTS for op in capture.ops
    )
    sizes = _ops.norms(current).tolist()
    if any(
        step > 0 and (vectors or p.dim() > 1) and eps * size > 1e-3 * step
        for p, size, step in zip(current, sizes, steps, strict=True)
    ):
        return (
            f"the step is below {str(dtype).removeprefix('torch.')} resolution of a weight for the fast path "
            "(|delta| < 1e3 u |W|): measured on the generic path"
        )
    return None


def faint(loss: float, dtype: torch.dtype) -> str | None:
    r"""Say why a loss this close to zero leaves its slope and curvature to rounding below float64, or ``None``.

    Near a fitted batch the loss's derivatives come from differences of nearly equal numbers (cross-entropy's
    :math:`1 - p_y`, MSE's residuals against the targets): their relative rounding error grows like :math:`u/L`
    (measured on a ReLU MLP at a float32 loss of 3e-7: 15% on the generic path, 0.5% on the fast one).
    """
    if dtype == torch.float64 or not math.isfinite(loss):
        return None
    eps = torch.finfo(dtype).eps
    if abs(loss) < 1e3 * eps:
        return (
            f"the loss ({loss:.2g}) is within 1e3 u of zero, where {str(dtype).removeprefix('torch.')} leaves its "
            "slope and curvature to rounding: measured on the generic path in float64"
        )
    return None


def cancelled(res: Directional, dtype: torch.dtype) -> str | None:
    r"""Say why a ``secant`` curvature measured below float64 may be off by more than 1e-3, or ``None``.

    ``secant`` takes :math:`d^\top H d \approx 2\,[L(\theta+\Delta) - L(\theta) - \Delta^\top g]`: each term
    carries a rounding error of about :math:`u` times its size, so the curvature's relative error is about

    .. math::

        \rho = u\,\frac{2|L| + |\Delta^\top g|}{|\Delta^\top H \Delta| / 2}.

    Measured against float64 on the MLP, CNN and transformer of ``benchmarks/precision.py`` at Adam lr 1e-3 to
    1e-5, the error of α*/lr stayed below :math:`0.97\rho`; the rule keeps the float32 value where
    :math:`4\rho \le 10^{-3}` and measures again in float64 otherwise.
    """
    if dtype == torch.float64:
        return None
    u = torch.finfo(dtype).eps
    rho = u * (2 * abs(res.loss) + abs(res.slope)) / abs(res.curvature / 2) if res.curvature else math.inf
    if not 4 * rho <= 1e-3:  # NaN included
        return (
            f"the secant's difference of losses is within {rho:.1g} of rounding in "
            f"{str(dtype).removeprefix('torch.')} (over 2.5e-4): measured again in float64"
        )
    return None
