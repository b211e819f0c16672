r"""Step by the quadratic model's own step size: :class:`AlphaScaled` wraps an optimizer and sets its learning rate.

At each step the wrapped optimizer's direction :math:`d` (its step at unit learning rate, from
:func:`alphalib.direction`, before it steps) is measured along a chosen *source* of curvature, and the optimizer
steps with

.. math::

    \mathrm{lr}_t = \operatorname{clip}\bigl(\kappa\, \alpha^*_{\text{source}},\ \mathrm{lr}_{\min},
    \mathrm{lr}_{\max}\bigr), \qquad \alpha^* = -\frac{d^\top g}{d^\top H d},

where :math:`g, H` are the gradient and Hessian (or GGN, or a secant estimate) of the source's mean loss at
:math:`\theta_t`. Sources:

* ``"batch"``: the mini-batch the gradient came from (greedy, one step);
* ``"smoothed"``: the batch's :math:`\alpha^*` averaged across steps in log space, :math:`\log s_t = \beta \log
  s_{t-1} + (1-\beta) \log \alpha^*_t` with bias correction :math:`s_t / (1 - \beta^{n})` over the :math:`n`
  usable steps so far (a geometric mean that forgets);
* ``"heldout"``: the next batch of ``held_out`` (cycled), which the step never saw, along the same :math:`d`;
* ``"full"``: the mean loss over ``full_data`` along :math:`d`, measured every ``full_every`` steps and held
  in between.

**Fallback.** Where the source has no step size (curvature :math:`\le 0`, an ascent direction :math:`d^\top g
\ge 0`, a non-finite value, or a :math:`\kappa\alpha^*` beyond :math:`\sqrt{\max}` of the parameters' dtype,
1.8e19 in float32, where the optimizer's own arithmetic would overflow), the step takes the last learning rate
used (the optimizer's own lr before the first usable one) and the record's ``fallback`` says why. **The
optimizer is untouched otherwise**: its state advances exactly as it would at any learning rate (for the families
:func:`alphalib.direction` supports, the state does not depend on the lr), the step is :math:`\mathrm{lr}_t\,
d`, and every param group's ``lr`` is restored after the step, so schedulers keep working on the nominal lr.

The batch's :math:`\alpha^*` is that of the loss the gradient came from: a forward pre-hook keeps the RNG state
of the last forward pass with gradients enabled (the training one; evaluation under ``torch.no_grad`` is passed
over), and the measurement replays it, so a model with dropout is measured with the training step's own mask
(call :meth:`remove` to detach the hook).

Each step leaves a :class:`~alphalib.records.Record` like the probe's, along the step taken on the training
batch: ``lr`` is :math:`\mathrm{lr}_t`, ``alpha_star`` the batch's own, so ``ratio`` :math:`= \alpha^*_{batch} /
\mathrm{lr}_t` (:math:`1/\kappa` for ``"batch"`` inside the bounds).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ._checks import trainable
from ._function import LossFn, rng_state
from .curvature import Backend, alpha_star, check_backend
from .direction import _FAMILIES as FAMILIES
from .direction import direction
from .records import Record, make_record, tell, to_frame
from .spectrum import alpha_over

if TYPE_CHECKING:
    import pandas as pd

Source = Literal["batch", "smoothed", "heldout", "full"]
SOURCES: tuple[str, ...] = ("batch", "smoothed", "heldout", "full")


class AlphaScaled:
    r"""Step ``optimizer`` with learning rate :math:`\kappa\,\alpha^*` of the chosen ``source`` (see the module).

    Call :meth:`step` after ``loss.backward()`` in place of ``optimizer.step()``, with the batch the loss was
    computed on; :meth:`remove` detaches its forward pre-hook.

    Args:
        optimizer: The optimizer to step; one of the classes :func:`alphalib.direction` supports, with one lr
            shared by every param group.
        model: The network it trains.
        loss_fn: The mean-reduced loss ``loss_fn(model(inputs), targets)``.
        kappa: The multiple :math:`\kappa` of :math:`\alpha^*` to step by (positive).
        source: Where :math:`\alpha^*` is measured: ``"batch"``, ``"smoothed"``, ``"heldout"`` or ``"full"``
            (see the module).
        curvature: The backend that measures the curvature: ``"hessian"``, ``"ggn"`` or ``"secant"``.
        smoothing: The weight :math:`\beta` of the past in ``"smoothed"``'s log-space average, in :math:`[0, 1)`.
        bounds: ``(lr_min, lr_max)``, with :math:`0 \le \mathrm{lr}_{\min} < \mathrm{lr}_{\max}`, that
            :math:`\kappa\,\alpha^*` is clipped to.
        held_out: Batches the step never sees (a ``DataLoader``), cycled; needed by ``source="heldout"``.
        full_data: The training set's batches (a ``DataLoader``); needed by ``source="full"``.
        full_every: Measure ``"full"``'s :math:`\alpha^*` every ``full_every`` steps and hold it in between.
        tags: Constant columns for :meth:`to_frame`.

    Raises:
        ValueError: If a number is out of its range, ``source`` or ``curvature`` is not one of those above, the
            data its ``source`` needs is missing, or the param groups' lrs differ.
        TypeError: If :func:`alphalib.direction` does not support the optimizer's class.

    Example:
        On a quadratic, ``"batch"`` with :math:`\kappa = 1` is exact line search:

        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.eye(2, dtype=torch.float64)
        >>> y = torch.ones(2, 1, dtype=torch.float64)
        >>> opt = AlphaScaled(torch.optim.SGD(model.parameters(), lr=0.1), model, torch.nn.functional.mse_loss)
        >>> opt.zero_grad()
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> rec = opt.step((x, y))
        >>> round(rec.ratio, 12), [round(w, 12) for w in model.weight[0].tolist()]  # H = I: one step, the minimum
        (1.0, [1.0, 1.0])
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        kappa: float = 1.0,
        source: Source = "batch",
        curvature: Backend = "hessian",
        smoothing: float = 0.9,
        bounds: tuple[float, float] = (0.0, math.inf),
        held_out: Iterable[object] | None = None,
        full_data: Iterable[object] | None = None,
        full_every: int = 10,
        tags: Mapping[str, Any] | None = None,
    ):
        if not (isinstance(kappa, int | float) and kappa > 0 and math.isfinite(kappa)):
            raise ValueError(f"kappa scales alpha*: give a positive number, got {kappa!r}.")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {source!r}.")
        if check_backend(curvature) not in ("hessian", "ggn", "secant"):
            raise ValueError(f"curvature must be 'hessian', 'ggn' or 'secant' here; got {curvature!r}.")
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing is the weight of the past in [0, 1); got {smoothing!r}.")
        lo, hi = bounds
        if not 0 <= lo < hi:
            raise ValueError(f"bounds must be (low, high) with 0 <= low < high; got {bounds!r}.")
        if source == "heldout" and held_out is None:
            raise ValueError("source='heldout' needs held_out=<batches the step never sees> (a DataLoader).")
        if source == "full" and full_data is None:
            raise ValueError("source='full' needs full_data=<the training set's batches> (a DataLoader).")
        if isinstance(full_every, bool) or not isinstance(full_every, int) or full_every < 1:
            raise ValueError(f"full_every must be a positive integer (every k-th step), got {full_every!r}.")
        lrs = {float(g["lr"]) for g in optimizer.param_groups}
        if len(lrs) != 1:
            raise ValueError(
                f"every param group must share one lr (got {sorted(lrs)}): the wrapper sets one "
                "step length for the whole direction."
            )
        if type(optimizer) not in FAMILIES:
            raise TypeError(
                f"AlphaScaled needs the step direction before the step, which alphalib.direction gives "
                f"for {', '.join(c.__name__ for c in FAMILIES)}; got {type(optimizer).__qualname__}."
            )
        self.optimizer, self.model, self.loss_fn = optimizer, model, loss_fn
        self.kappa, self.source, self.curvature, self.smoothing = float(kappa), source, curvature, smoothing
        self.bounds = (float(lo), float(hi))
        self.full_data, self.full_every = full_data, full_every
        self._held_out = itertools.cycle(held_out) if held_out is not None else None
        self.tags = dict(tags or {})
        self.records: list[Record] = []
        #: called with each new record (the live view is one), as :attr:`alphalib.AlphaProbe.listeners`
        self.listeners: list[Callable[[Record], None]] = []
        self.steps = 0
        self.lr = lrs.pop()  #: the learning rate of the last step (the optimizer's own before the first)
        self._log_mean, self._usable = 0.0, 0  # the smoothed source's running log-mean and its count
        self._full: float | None = None  # the full-data alpha*, held between measurements
        device = trainable(model)[0].device
        self._rng: torch.Tensor | None = None  # the RNG state of the last forward with gradients enabled

        def keep_rng(module: nn.Module, args: object) -> None:
            if torch.is_grad_enabled():
                self._rng = rng_state(device)

        self._hook = model.register_forward_pre_hook(keep_rng)

    def remove(self) -> None:
        """Detach the forward pre-hook that keeps the training forward's RNG state (records stay)."""
        self._hook.remove()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the wrapped optimizer's gradients.

        Args:
            set_to_none: Set ``.grad`` to ``None`` rather than to zeros (as ``torch.optim.Optimizer.zero_grad``).
        """
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, batch: object, *, epoch: int | None = None) -> Record:
        r"""Take the wrapped optimizer's step with :math:`\mathrm{lr}_t = \kappa\,\alpha^*`; return its record.

        Where the source has no usable step size the step takes the last lr, and the record's ``fallback`` says why.

        Args:
            batch: The ``(inputs, targets)`` the loss whose gradient is in ``.grad`` was computed on.
            epoch: The epoch, for the record.

        Returns:
            The step's record, along the step taken on ``batch``: ``lr`` is :math:`\mathrm{lr}_t`, ``alpha_star``
            the batch's own.
        """
        d, params = direction(self.optimizer), trainable(self.model)
        own = alpha_star(self.model, self.loss_fn, batch, d, rng=self._rng, **self._kw())
        found, why = self._source(own, d)
        if found is None:
            lr = self.lr
        else:
            lr = min(max(self.kappa * found, self.bounds[0]), self.bounds[1])
            dtype = params[0].dtype
            if lr <= 0:  # a lower bound of 0 that clipping reached: no step is no step size
                lr, why = self.lr, "kappa * alpha* clipped to 0; the last lr was used"
            elif lr > math.sqrt(torch.finfo(dtype).max):  # the optimizer's arithmetic would overflow
                lr, why = self.lr, f"kappa * alpha* = {lr:.3g} would overflow {dtype}; the last lr was used"
        nominal = [g["lr"] for g in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        try:
            self.optimizer.step()
        finally:
            for group, value in zip(self.optimizer.param_groups, nominal, strict=True):
                group["lr"] = value
        self.lr = lr
        norm = math.sqrt(sum(float(di.square().sum()) for di in d))
        grads = [p.grad for p in params if p.grad is not None]
        rec = make_record(
            step=self.steps,
            epoch=epoch,
            loss=own.loss,
            lr=lr,
            step_slope=lr * own.slope,
            step_curvature=lr * lr * own.curvature,
            step_norm=lr * norm,
            grad_norm=math.sqrt(sum(float(g.square().sum()) for g in grads)),
            backend=self.curvature,
            fallback=why,
        )
        self.records.append(rec)
        tell(self.listeners, rec)
        self.steps += 1
        return rec

    def _kw(self) -> dict[str, Any]:
        """The curvature backend, and for ``"secant"`` the lr whose step it measures over."""
        return {"curvature": self.curvature, "lr": self.lr if self.curvature == "secant" else None}

    def _source(self, own: Any, d: Any) -> tuple[float | None, str]:
        """Return the source's α* (None where it has no step size) and, if None, why."""
        if self.source == "batch":
            return _usable(own, "the batch")
        if self.source == "smoothed":
            found, why = _usable(own, "the batch")
            if found is not None:
                self._usable += 1
                self._log_mean = self.smoothing * self._log_mean + (1 - self.smoothing) * math.log(found)
            if not self._usable:
                return None, why
            return math.exp(self._log_mean / (1 - self.smoothing**self._usable)), why
        if self.source == "heldout":
            assert self._held_out is not None  # source="heldout" is refused without held_out
            res = alpha_star(self.model, self.loss_fn, next(self._held_out), d, **self._kw())
            return _usable(res, "the held-out batch")
        if self.steps % self.full_every == 0:
            assert self.full_data is not None  # source="full" is refused without full_data
            scope = alpha_over(self.model, self.loss_fn, self.full_data, d, curvature=self.curvature)
            self._full, why = _usable(scope, "the full data")
            return self._full, why
        return self._full, "" if self._full is not None else "no usable full-data alpha* measured yet"

    @property
    def frame_tags(self) -> dict[str, Any]:
        """The constant columns :meth:`to_frame` adds: ``source``, ``kappa`` and the tags."""
        return {"source": self.source, "kappa": self.kappa, **self.tags}

    def to_frame(self) -> pd.DataFrame:
        """Return the records as a DataFrame.

        Returns:
            One row per step, with :attr:`frame_tags` (``source``, ``kappa`` and the tags) as constant columns.
        """
        return to_frame(self.records, self.frame_tags)


def _usable(res: Any, what: str) -> tuple[float | None, str]:
    """Return ``res.alpha_star`` (from :func:`alphalib.records.alpha`) if it is a step size, else None and why not."""
    slope, curvature = res.slope, res.curvature
    if not (math.isfinite(slope) and math.isfinite(curvature)):
        return None, f"{what}: slope or curvature not finite; the last lr was used"
    if curvature <= 0:
        return None, f"{what}: curvature {curvature:.3g} <= 0 along d; the last lr was used"
    if slope >= 0:
        return None, f"{what}: d goes uphill (slope {slope:.3g} >= 0); the last lr was used"
    return res.alpha_star, ""
