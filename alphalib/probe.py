r"""``AlphaProbe``: take the optimizer's step and measure how far it is from the quadratic model's best step.

On a probed step the probe keeps a copy of :math:`\theta_t`, calls ``optimizer.step()`` exactly as training
would, forms the realized step :math:`\Delta = \theta_{t+1} - \theta_t` and evaluates, at :math:`\theta_t` on
the same batch, the slope :math:`\Delta^\top g_t` and the curvature :math:`\Delta^\top H_t \Delta` with the
chosen backend (see :mod:`alphalib.curvature`). Because it uses the realized step it works for any
optimizer, and with several param groups at different learning rates the ``ratio``
:math:`-\Delta^\top g_t / \Delta^\top H_t \Delta` (the multiple of the whole step that reaches the model's
minimum) stays defined; ``alpha_star`` is then ``ratio`` times the *first* group's learning rate.

**The function that is probed.** Slope and curvature come from one function: the training loss on the
same batch, evaluated in the model's current mode with the random draws of the model's last forward pass
(the probe remembers the RNG state at each forward call and replays it), so a model with dropout is probed
with the training step's own mask; BatchNorm in train mode uses the batch statistics, as in training.

**A pure observer.** Parameters, ``.grad``, optimizer state, buffers (BatchNorm running statistics) and the
global RNG stream end up bit-for-bit as they would without the probe. Odd curvature never raises: it is
recorded and named in ``flag`` (see :data:`alphalib.records.FLAGS`); a backend that fails (for example an
operation without a double backward) records ``flag="error"`` and warns once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._checks import check_batch, trainable
from ._function import BatchLoss, LossFn, dot, rng_state
from .curvature import Backend, check_backend, directional
from .records import Record, make_record, to_frame

if TYPE_CHECKING:
    import pandas as pd


class AlphaProbe:
    """Step ``optimizer`` and record :math:`\\alpha^*` along the realized step on every ``every``-th call.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        >>> probe = AlphaProbe(model, torch.nn.functional.mse_loss, opt)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        ...     rec = probe.step((x, y))
        >>> len(probe.to_frame())
        3
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        *,
        curvature: Backend = "hessian",
        every: int = 1,
        tags: Mapping[str, Any] | None = None,
    ):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer (probe every k-th step), got {every!r}.")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.curvature = check_backend(curvature)
        self.every = every
        self.tags = dict(tags or {})
        self.records: list[Record] = []
        self.steps = 0
        self._params = trainable(model)
        self._rng: Tensor | None = None
        self._warned = False
        self._hook = model.register_forward_pre_hook(self._remember_rng)

    def _remember_rng(self, module: nn.Module, args: Any) -> None:
        self._rng = rng_state(self._params[0].device)

    def step(self, batch: object, *, epoch: int | None = None) -> Record | None:
        """Take the optimizer step; on probed steps return its record, else ``None``.

        Call after ``loss.backward()`` in place of ``optimizer.step()``; ``batch`` is the ``(inputs, targets)``
        pair the loss was computed on.
        """
        check_batch(batch)
        t, self.steps = self.steps, self.steps + 1
        if t % self.every:
            self.optimizer.step()
            return None
        theta = [p.detach().clone() for p in self._params]
        grads = [p.grad for p in self._params if p.grad is not None]
        grad_norm = math.sqrt(dot(grads, grads).item()) if grads else 0.0
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        with torch.no_grad():
            delta = [p.detach() - p0 for p, p0 in zip(self._params, theta)]
            step_norm = math.sqrt(dot(delta, delta).item())
        fn = BatchLoss(self.model, self.loss_fn, batch, rng=self._rng)
        try:
            res = directional(fn, theta, delta, self.curvature)
            loss, slope, curvature, error = res.loss, res.slope, res.curvature, False
        except RuntimeError as exc:
            self._warn(exc)
            loss = slope = curvature = math.nan
            error = True
        rec = make_record(
            step=t, epoch=epoch, loss=loss, lr=lr, step_slope=slope, step_curvature=curvature,
            grad_norm=grad_norm, step_norm=step_norm, backend=self.curvature, error=error,
        )
        self.records.append(rec)
        return rec

    def _warn(self, exc: Exception) -> None:
        if not self._warned:
            warnings.warn(
                f"AlphaProbe: the {self.curvature!r} backend failed ({exc}); such steps are recorded with "
                "flag='error'. Try curvature='secant', which needs no double backward.",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned = True

    def to_frame(self) -> pd.DataFrame:
        """Return the records as a DataFrame, one row per probed step, with the probe's ``tags`` as columns."""
        return to_frame(self.records, self.tags)

    def remove(self) -> None:
        """Detach the probe's forward hook from the model."""
        self._hook.remove()
