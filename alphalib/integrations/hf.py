r"""``AlphaTrainer``: a Hugging Face ``Trainer`` whose optimizer steps go through :class:`alphalib.AlphaProbe`.

**Why a ``Trainer`` subclass, not a ``TrainerCallback``.** In transformers 5.x ``Trainer._run_epoch`` calls
``self.optimizer.step()`` itself, between the ``on_pre_optimizer_step`` and ``on_optimizer_step`` events: a
callback can look before and after the step but can neither skip nor replace it, and no event is given the
inputs (callbacks get ``args``, ``state``, ``control``, the model, optimizer, scheduler and dataloaders). A
callback would have to capture batches with hooks on the model's keyword arguments, which ``compute_loss`` edits
(it pops ``labels`` for label smoothing and ``compute_loss_func`` and adds ``num_items_in_batch``), and patch the
optimizer behind the Trainer's back. ``training_step(model, inputs, num_items_in_batch)`` is the Trainer's
documented override point and sees each micro-batch and the loss normalization, so the subclass keeps them there
and routes the Trainer's one ``self.optimizer.step()`` through ``probe.step`` (an instance attribute on the
optimizer the Trainer holds, accelerate's wrapper included, so gradient scaling and skipped steps behave as
without the probe; :class:`alphalib.integrations.StepRoute`), from the first training step to the end of
``train()``.

**What is measured.** By default the Trainer's own loss: ``compute_loss`` on each micro-batch with the
``num_items_in_batch`` of its step, normalized as ``training_step`` normalizes it before the backward pass, so
that the probe measures exactly the function whose gradient stepped (with ``gradient_accumulation_steps=k`` the
sum of the ``k`` micro-batch losses as backpropagated, token-weighted where the model normalizes by
``num_items_in_batch``). The records' ``loss`` is thus the training loss as the Trainer logs it, quirks included:
a model that takes ``num_items_in_batch`` but returns a mean (a BERT classifier) is backpropagated undivided, as
the sum of the micro-batch means. An ``objective`` ``fn(model, inputs) -> scalar`` replaces it (for instance if a
subclass's ``compute_loss`` records metrics); micro-batches then weigh the same.

**Limits.** Measured on the generic path, since the loss is not ``loss_fn(model(x), y)``; with dropout and
gradient accumulation every micro-batch is measured with the random state of the last one's forward pass (the
probe's rule for objectives). ``step_size`` looks through accelerate's wrapper to the optimizer it holds, so
Prodigy's and D-Adaptation's own step sizes are recorded. One process only:
the probe measures the model the Trainer holds, on the batches this process trained on.

A class that derives from both (``class MyTrainer(AlphaTrainer, SFTTrainer)``) probes another Trainer
subclass: every method here defers to ``super()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from torch import Tensor, nn

try:
    import accelerate  # noqa: F401  (the Trainer needs it)
    import transformers
except ImportError as exc:  # pragma: no cover - exercised by tests/test_integrations.py with transformers hidden
    raise ImportError(
        'alphalib.integrations.hf needs transformers and accelerate: pip install -c constraints.txt "alphalib[hf]"'
    ) from exc

from .._function import Objective
from .._function import objective as as_objective
from ..curvature import Backend
from ..probe import AlphaProbe
from ..records import Record, to_frame
from . import StepRoute, logged, micro_batches, probe_keywords

if TYPE_CHECKING:
    import pandas as pd


class AlphaTrainer(transformers.Trainer):
    r"""A ``transformers.Trainer`` that probes every ``every``-th optimizer step with an :class:`alphalib.AlphaProbe`.

    A new probe starts with each ``train()``; ``probe`` is the last one, and its records carry the epoch index.

    Args:
        *args: The Trainer's positional arguments.
        every: Probe every ``every``-th optimizer step.
        curvature: The probe's curvature backend (one of :data:`alphalib.BACKENDS`).
        tags: Constant columns of the probe's records.
        objective: ``fn(model, inputs) -> scalar`` to measure in place of the Trainer's own loss (see the module);
            ``None``: the Trainer's loss.
        probe_options: More keywords for :class:`~alphalib.AlphaProbe` (``full_data``, ``held_out``, ...).
        **kwargs: The Trainer's keyword arguments (``model``, ``args``, ``train_dataset``, ...).

    Raises:
        ValueError: If ``every`` is not a positive integer or ``curvature`` names no backend.
        TypeError: If ``probe_options`` holds a keyword :class:`~alphalib.AlphaProbe` does not take.

    Example:
        >>> import tempfile, torch, transformers
        >>> _ = torch.manual_seed(0)
        >>> config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8)
        >>> data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 16, (16, 8))]
        >>> args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True,
        ...                                       per_device_train_batch_size=4, num_train_epochs=1, disable_tqdm=True)
        >>> trainer = AlphaTrainer(model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=data, every=2)
        >>> trainer.remove_callback(transformers.PrinterCallback)  # it prints the run's metrics
        >>> _ = trainer.train()
        >>> trainer.to_frame()[["step", "epoch", "path"]].values.tolist()
        [[0, 0, 'generic'], [2, 0, 'generic']]
    """

    def __init__(
        self,
        *args: Any,
        every: int = 1,
        curvature: Backend = "hessian",
        tags: Mapping[str, Any] | None = None,
        objective: Objective | Callable[[nn.Module, Any], Tensor] | None = None,
        probe_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        keywords = probe_keywords(every, curvature, tags, probe_options)
        super().__init__(*args, **kwargs)
        # private names with a prefix: Trainer and its subclasses keep much state on self (Trainer.objective, say)
        self._alpha_objective = as_objective(objective if objective is not None else self._alpha_loss)
        self._alpha_options = keywords
        #: the probe of the last ``train()`` (``None`` before the first)
        self.probe: AlphaProbe | None = None
        self._alpha_route: StepRoute | None = None
        self._alpha_batches: list[Any] = []
        self._alpha_items: Tensor | int | None = None
        self._alpha_logged = 0  # the probe's records already in a log

    @property
    def records(self) -> list[Record]:
        """The records of the last ``train()`` (empty before the first)."""
        return [] if self.probe is None else self.probe.records

    def to_frame(self) -> pd.DataFrame:
        """Return the records of the last ``train()`` as a DataFrame, one row per probed step, ``tags`` as columns."""
        return to_frame(self.records, self._alpha_options["tags"])

    # ---- the Trainer's override points ----------------------------------------------------------------------

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Train as ``Trainer.train``; then give the optimizer its step back and detach the probe's hooks."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self._alpha_detach()

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """Keep the micro-batch and its normalization for the probe, then run ``Trainer.training_step``."""
        if self._alpha_route is None or self._alpha_route.optimizer is not self.optimizer:
            self._alpha_attach()
        self._alpha_batches.append(self._prepare_inputs(inputs))  # a copy on the device: compute_loss pops from inputs
        self._alpha_items = num_items_in_batch
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Log as ``Trainer.log``, adding to a training log the records since the last one.

        A training log (one with ``loss``) gets ``alpha_star``, ``alpha_star_over_lr`` and ``curvature`` (medians)
        and ``flagged`` (a count) of the records since the last one, with the prefix ``alpha/``. They reach
        ``state.log_history`` and every ``report_to`` integration.
        """
        if "loss" in logs and self.probe is not None:
            logs = {**logs, **logged(self.probe.records[self._alpha_logged :], "alpha/")}
            self._alpha_logged = len(self.probe.records)
        super().log(logs, *args, **kwargs)

    # ---- the probe ------------------------------------------------------------------------------------------

    def _alpha_attach(self) -> None:
        """Build the probe on the model and the optimizer the Trainer holds now, and route the step through it."""
        self._alpha_detach()
        model, optimizer = self.model, self.optimizer
        assert model is not None and optimizer is not None  # train() has made both before its first training_step
        self.probe = AlphaProbe(model, self._alpha_objective, optimizer, **self._alpha_options)
        self._alpha_logged = 0
        self._alpha_route = StepRoute(optimizer, self._alpha_take)

    def _alpha_take(self, closure: Callable[[], Any] | None) -> None:
        """Take the Trainer's ``self.optimizer.step()`` through the probe, on the micro-batches since the last."""
        assert self.probe is not None  # the step is routed here only once the probe is built
        batches, self._alpha_batches = self._alpha_batches, []
        epoch = math.floor(self.state.epoch or 0)  # the Trainer's epoch is fractional and advances after the step
        self.probe.step(micro_batches(batches), epoch=epoch, closure=closure)

    def _alpha_detach(self) -> None:
        if self._alpha_route is not None:
            self._alpha_route.restore()
            self._alpha_route = None
        if self.probe is not None:
            self.probe.remove()
        self._alpha_batches = []

    def _alpha_loss(self, model: nn.Module, inputs: Mapping[str, Any]) -> Tensor:
        """The loss ``training_step`` backpropagates for one micro-batch, times their number (the probe averages).

        Mirrors ``Trainer.training_step`` of transformers 5.x between ``compute_loss`` and the backward pass.
        """
        n = self._alpha_items
        loss = cast(Tensor, self.compute_loss(model, dict(inputs), num_items_in_batch=n))  # no outputs: the loss
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and n is not None) or self.compute_loss_func is not None
        return loss * self.current_gradient_accumulation_steps if scaled else loss
