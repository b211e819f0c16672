r"""``AlphaCallback``: probe a ``LightningModule``'s training with :class:`alphalib.AlphaProbe`, leaving it unchanged.

**How the step reaches the probe.** In automatic optimization Lightning runs ``training_step`` and the backward
pass inside a closure and calls the torch optimizer's ``step(closure)`` itself (from
``LightningModule.optimizer_step``, through the precision plugin). Overriding ``optimizer_step`` would mean
editing the user's module, so the callback instead routes that one call through ``probe.step`` from
``on_train_start`` to the end of ``fit`` (:class:`alphalib.integrations.StepRoute`: an instance attribute on the
optimizer, removed afterwards), and hands the probe the batches seen by ``on_train_batch_start`` since the last
``zero_grad``. The closure is handled as ``closure`` says:

* ``"first"``: call the closure (``training_step``, ``zero_grad``, backward, ``on_before_optimizer_step``,
  gradient clipping), then let ``probe.step(batches)`` step without it. An optimizer whose closure is optional
  calls it once, before its update (torch's convention), so nothing changes; the probe sees a plain training step,
  and its fast path and its checks of the batch apply.
* ``"optimizer"``: hand the closure over, ``probe.step(batch, closure=closure)``, for optimizers that evaluate it
  more than once (LBFGS, SAM); measured on the generic path. Gradient accumulation is refused with it: the last
  micro-batch's forward pass would run inside the step, after the probe has judged the step.
* ``"auto"`` (default): ``"optimizer"`` if the optimizer's ``step`` requires its closure (LBFGS), else ``"first"``.

With ``accumulate_grad_batches=k`` the probe measures the union of the ``k`` micro-batches (Lightning divides each
one's loss by ``k``, so they weigh the same). Under mixed precision Lightning calls the closure itself and its
gradient scaler calls ``step()`` without one; a step the scaler skips is not probed. Manual optimization is
refused: call ``probe.step`` in your ``training_step`` in place of ``optimizer.step()``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised by tests/test_integrations.py with lightning hidden
    raise ImportError(
        'alphalib.integrations.lightning needs Lightning: pip install -c constraints.txt "alphalib[lightning]"'
    ) from exc

from .._function import LossFn, Objective
from ..curvature import Backend
from ..probe import AlphaProbe
from ..records import Record, to_frame
from . import StepRoute, logged, micro_batches, probe_keywords

if TYPE_CHECKING:
    import pandas as pd

Closure = Literal["auto", "first", "optimizer"]


class AlphaCallback(pl.Callback):
    r"""Probe every ``every``-th optimizer step of ``Trainer.fit`` with an :class:`alphalib.AlphaProbe`.

    A new probe starts with each ``fit``; ``probe`` is the last one, and its records carry Lightning's
    ``current_epoch``.

    Args:
        loss: What ``training_step`` minimises: a ``loss_fn(outputs, targets)`` on ``module(inputs)`` for
            ``(inputs, targets)`` batches, or an :func:`alphalib.objective` ``fn(module, batch) -> scalar`` for
            anything else.
        every: Probe every ``every``-th optimizer step.
        curvature: The probe's curvature backend (one of :data:`alphalib.BACKENDS`).
        tags: Constant columns of the probe's records.
        module: The name of the submodule that ``training_step`` calls and ``loss`` runs (``"net"`` for
            ``self.net(x)``); ``None``: the ``LightningModule`` itself (``self(x)``).
        closure: How Lightning's closure is handled: ``"first"``, ``"optimizer"`` or ``"auto"`` (see the module).
        probe_options: More keywords for :class:`~alphalib.AlphaProbe` (``path``, ``full_data``, ``held_out``,
            ``sharpness_every``, ...).

    Raises:
        ValueError: If ``closure`` is not one of the three, ``every`` is not a positive integer or ``curvature``
            names no backend.
        TypeError: If ``probe_options`` holds a keyword :class:`~alphalib.AlphaProbe` does not take.

    Example:
        >>> import torch, lightning as L
        >>> from torch.nn import functional as F
        >>> class Regressor(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(3, 1)
        ...     def forward(self, x):
        ...         return self.net(x)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return F.mse_loss(self(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.Adam(self.parameters(), lr=1e-2)
        >>> data = torch.utils.data.TensorDataset(torch.randn(32, 3), torch.randn(32, 1))
        >>> callback = AlphaCallback(F.mse_loss, every=2)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[callback], logger=False, enable_progress_bar=False,
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(Regressor(), torch.utils.data.DataLoader(data, batch_size=8))
        >>> callback.to_frame()[["step", "epoch", "flag"]].values.tolist()
        [[0, 0, 'ok'], [2, 0, 'ok']]
    """

    def __init__(
        self,
        loss: LossFn | Objective,
        *,
        every: int = 1,
        curvature: Backend = "hessian",
        tags: Mapping[str, Any] | None = None,
        module: str | None = None,
        closure: Closure = "auto",
        probe_options: Mapping[str, Any] | None = None,
    ):
        if closure not in ("auto", "first", "optimizer"):
            raise ValueError(f"closure must be 'auto', 'first' or 'optimizer', got {closure!r}.")
        self.loss, self.module, self.closure = loss, module, closure
        self._keywords = probe_keywords(every, curvature, tags, probe_options)
        #: the probe of the last ``fit`` (``None`` before the first)
        self.probe: AlphaProbe | None = None
        self._route: StepRoute | None = None
        self._batches: list[Any] = []
        self._hand_over = False
        self._trainer: pl.Trainer | None = None
        self._logged = 0  # the probe's records already logged
        self._resume: Mapping[str, Any] | None = None  # the probe's state from a checkpoint, for the next fit

    @property
    def records(self) -> list[Record]:
        """The records of the last ``fit`` (empty before the first)."""
        return [] if self.probe is None else self.probe.records

    def to_frame(self) -> pd.DataFrame:
        """Return the records of the last ``fit`` as a DataFrame, one row per probed step, ``tags`` as columns."""
        return to_frame(self.records, self._keywords["tags"])

    # ---- Lightning hooks ----------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the probe on the module and the optimizer, and route the optimizer's step through it.

        Raises:
            ValueError: If the module optimizes manually, configures more than one optimizer, or accumulates
                gradients while the optimizer is handed Lightning's closure.
        """
        if not pl_module.automatic_optimization:
            raise ValueError(
                "AlphaCallback probes automatic optimization; with manual optimization call "
                "alphalib.AlphaProbe's probe.step(batch) in training_step in place of optimizer.step()."
            )
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"AlphaCallback probes one optimizer; configure_optimizers gave {len(trainer.optimizers)}."
            )
        optimizer = trainer.optimizers[0]
        self._hand_over = self.closure == "optimizer" or self.closure == "auto" and _needs_closure(optimizer)
        if self._hand_over and trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"{type(optimizer).__name__} is handed Lightning's closure (closure={self.closure!r}), "
                "which cannot be probed with accumulate_grad_batches > 1: the last micro-batch's forward "
                "pass would run inside the step. Train without accumulation, or pass closure='first' if "
                "the optimizer calls its closure once."
            )
        model = pl_module if self.module is None else pl_module.get_submodule(self.module)
        self.probe = AlphaProbe(model, self.loss, optimizer, **self._keywords)
        if self._resume is not None:  # resumed from a checkpoint: go on counting steps, keep the records
            self.probe.load_state_dict(self._resume)
            self._resume = None
        self._trainer, self._batches, self._logged = trainer, [], len(self.probe.records)
        self._route = StepRoute(optimizer, self._take)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Keep the batch (after its transfer to the device) that ``training_step`` gets."""
        self._batches.append(batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Send a new record's α*, α*/lr, curvature and flag (``alpha/`` keys) to the trainer's loggers, at its step.

        Straight to the loggers: values logged through ``pl_module.log`` are written again at every later step
        until the next log, as if the steps between had been probed.
        """
        if self.probe is None:
            return
        for rec in self.probe.records[self._logged :]:
            for logger in trainer.loggers:
                logger.log_metrics(logged([rec], "alpha/"), step=rec.step)
        self._logged = len(self.probe.records)

    def state_dict(self) -> dict[str, Any]:
        """The probe's step count and records, saved in Lightning's checkpoints."""
        return self.probe.state_dict() if self.probe is not None else dict(self._resume or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's probe state: the next ``fit`` goes on from it."""
        self._resume = state_dict or None

    def on_before_zero_grad(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Forget batches whose gradients are about to be zeroed: keep the one whose backward pass comes next."""
        self._batches = self._batches[-1:]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give the optimizer its step back and detach the probe's hooks (the records stay)."""
        self._detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Detach as at the end of training."""
        self._detach()

    # ---- the routed step ----------------------------------------------------------------------------------

    def _take(self, closure: Callable[[], Any] | None) -> Any:
        """Take Lightning's ``optimizer.step(closure)`` through the probe."""
        probe, trainer = self.probe, self._trainer
        assert probe is not None and trainer is not None  # on_train_start set both before routing the step here
        epoch = trainer.current_epoch
        if closure is not None and self._hand_over:
            batches, self._batches = self._batches[-1:], []
            probe.step(micro_batches(batches), epoch=epoch, closure=closure)
            return None
        loss = None if closure is None else closure()
        batches, self._batches = self._batches, []
        probe.step(micro_batches(batches), epoch=epoch)
        return loss

    def _detach(self) -> None:
        if self._route is not None:
            self._route.restore()
            self._route = None
        if self.probe is not None:
            self.probe.remove()
        self._batches, self._trainer = [], None


def _needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's ``step`` has a ``closure`` parameter without a default (LBFGS's)."""
    try:
        param = inspect.signature(type(optimizer).step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty
