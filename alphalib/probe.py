r"""``AlphaProbe``: take the optimizer's step and measure how far it is from the quadratic model's best step.

On a probed step the probe keeps a copy of :math:`\theta_t`, calls ``optimizer.step()`` exactly as training
would, forms the realized step :math:`\Delta = \theta_{t+1} - \theta_t` and evaluates, at :math:`\theta_t` on
the same batch, the slope :math:`\Delta^\top g_t` and the curvature :math:`\Delta^\top H_t \Delta` with the
chosen backend (see :mod:`alphalib.curvature`). Because it uses the realized step it works for any
optimizer, and with several param groups at different learning rates the ``ratio``
:math:`-\Delta^\top g_t / \Delta^\top H_t \Delta` (the multiple of the whole step that reaches the model's
minimum) stays defined; ``alpha_star`` is then ``ratio`` times the *first* group's learning rate.

**Two paths.** The *fast* path reuses what the training step computed: for ``"hessian"`` and ``"ggn"`` a
tangent pass over the step's saved activations and errors (:mod:`alphalib.tangent`, for models whose
modules all have a tangent rule); for ``"fd"``, ``"fd_onesided"`` and ``"secant"`` the training loss and the
gradient in ``.grad``. The *generic* path recomputes everything at :math:`\theta_t` from a fresh forward pass
and works for any model. ``path="auto"`` (default) takes the fast path where it applies; every record says
which ran. The fast path reads :math:`g_t` from ``.grad``, so with gradient clipping, accumulation or
penalties written into ``.grad`` use ``path="generic"``.

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
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from ._checks import check_batch, check_loss, trainable
from ._function import BatchLoss, LossFn, rng_state
from .curvature import Backend, Directional, Known, check_backend, directional
from .records import Record, make_record, to_frame
from .tangent import Capture, covers, tangent_pass

Path = Literal["auto", "fast", "generic"]

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
        path: Path = "auto",
        tags: Mapping[str, Any] | None = None,
    ):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer (probe every k-th step), got {every!r}.")
        if path not in ("auto", "fast", "generic"):
            raise ValueError(f"path must be 'auto', 'fast' or 'generic', got {path!r}.")
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
        self._capture: Capture | None = None
        if path != "generic":
            sweep = self.curvature in ("hessian", "ggn")
            reason = covers(model) if sweep else None
            if reason is None:
                self._capture = Capture(model, sweep=sweep, errors=self.curvature == "hessian")
            elif path == "fast":
                self._hook.remove()
                raise ValueError(f"path='fast' is not available: {reason}. Use path='auto' (it falls back to the "
                                 "generic path) or path='generic'.")
        self.path = "generic" if self._capture is None else "fast"

    def _remember_rng(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():  # the training forward, not an evaluation under no_grad
            self._rng = rng_state(self._params[0].device)

    def _arm(self, step: int) -> None:
        """Forget the last step's tensors; keep the next training step's if ``step`` will be probed."""
        if self._capture is not None:
            self._capture.clear()
            self._capture.active = step % self.every == 0

    def step(self, batch: object, *, epoch: int | None = None) -> Record | None:
        """Take the optimizer step; on probed steps return its record, else ``None``.

        Call after ``loss.backward()`` in place of ``optimizer.step()``; ``batch`` is the ``(inputs, targets)``
        pair the loss was computed on.
        """
        _, targets = check_batch(batch)
        t, self.steps = self.steps, self.steps + 1
        if t % self.every:
            self.optimizer.step()
            self._arm(t + 1)
            return None
        cap = self._capture
        captured = cap is not None and cap.output is not None and not cap.reused  # the training step, unambiguous
        sweep = captured and self.curvature in ("hessian", "ggn")
        params = [p.detach() for p in self._params]
        theta = [p.clone() for p in params]
        grads = [p.grad for p in self._params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        with torch.no_grad():
            if sweep:  # θ_t is not needed again: turn its copy into Δ in place
                torch._foreach_sub_(theta, params)
                torch._foreach_neg_(theta)
                delta, theta = theta, []
            else:
                delta = torch._foreach_sub(params, theta)
            step_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(delta)))
            grad_norm, step_norm = torch.stack([grad_norm.double().cpu(), step_norm.double().cpu()]).tolist()
        if cap is not None:
            cap.active = False  # the probe's own forward passes are not the training step's
        path, error = self.path, False
        try:
            if sweep:
                deltas = {id(p): d for p, d in zip(self._params, delta)}
                exact = self.curvature == "hessian"
                try:
                    res = Directional(*tangent_pass(self.model, cap, self.loss_fn, targets, deltas, exact=exact))
                except KeyError:  # the step did not leave what a rule needs (say, a layer called by keyword)
                    theta = torch._foreach_sub(params, delta)
                    res, path = self._measure(batch, targets, theta, delta, captured=False)
            else:
                res, path = self._measure(batch, targets, theta, delta, captured)
        except RuntimeError as exc:
            self._warn(exc)
            res, error = Directional(math.nan, math.nan, math.nan), True
        finally:
            self._arm(t + 1)
        rec = make_record(
            step=t, epoch=epoch, loss=res.loss, lr=lr, step_slope=res.slope, step_curvature=res.curvature,
            grad_norm=grad_norm, step_norm=step_norm, backend=self.curvature, path=path, error=error,
        )
        self.records.append(rec)
        return rec

    def _measure(
        self, batch: object, targets: Tensor, theta: list[Tensor], delta: list[Tensor], captured: bool
    ) -> tuple[Directional, str]:
        """Return loss, slope and curvature along the realized step from a backend, and the path that ran."""
        fn = BatchLoss(self.model, self.loss_fn, batch, rng=self._rng)
        if not captured:
            return directional(fn, theta, delta, self.curvature), "generic"
        loss = check_loss(self.loss_fn(self._capture.output.detach(), targets)).item()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self._params]
        known = Known(loss, grads, endpoint=[p.detach() for p in self._params])
        return directional(fn, theta, delta, self.curvature, known=known), "fast"

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
        """Detach the probe's hooks from the model."""
        self._hook.remove()
        if self._capture is not None:
            self._capture.remove()
