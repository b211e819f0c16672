r"""The facade: :class:`AlphaProbe`, which takes the optimizer's step and records :math:`\alpha^*` along it.

One probed step, in order: the :mod:`~alphalib.probe.recorder`'s facts → the :mod:`~alphalib.probe.evidence`'s
verdict → the :mod:`~alphalib.probe.router`'s path (everything that may raise happens before the optimizer steps)
→ ``optimizer.step()`` → :math:`\Delta` → the tangent sweep (:mod:`alphalib.fast`) or a backend of
:mod:`alphalib.curvature` on the loss as it trained (:class:`alphalib._function.BatchLoss`) → a ``Record`` for
the listeners. What the probe promises is in :mod:`alphalib.probe`.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from .. import _ops, _trained, distributed
from .._checks import check_batch, trainable
from .._function import BatchLoss, LossFn, Objective, replay_rng, rng_state
from ..curvature import Backend, Directional, check_backend
from ..fast import Capture, NoRule, OpCapture, capture_for
from ..fast.output import output_grad
from ..optim import in_eval_mode, step_size
from ..records import Record, make_record, tell, to_frame
from ..spectrum import as_batches
from . import measure
from .evidence import Verdict, judge
from .recorder import Recorder
from .router import WIDENED, Route, Trials, cancelled, faint, route, unresolved

Path = Literal["auto", "fast", "generic"]

if TYPE_CHECKING:
    import pandas as pd


class AlphaProbe:
    r"""Step ``optimizer`` and record :math:`\alpha^*` along the realized step on every ``every``-th call.

    ``loss`` is the ``loss_fn(outputs, targets)`` training minimises on ``model(inputs)``, or an
    :func:`alphalib.objective` ``fn(model, batch) -> scalar`` for anything else (penalties, models that return
    their loss, dict batches). Use it as a context manager, or call :meth:`remove`, to detach its hooks.
    ``full_data``/``held_out``: also record α* of those along the same step on probed steps whose index is a
    multiple of ``full_every``; ``sharpness_every=k``: also record the batch Hessian's largest eigenvalue at
    :math:`\theta_t` (and, for Adam, its preconditioned sharpness) on those whose index is a multiple of ``k``
    (:func:`alphalib.top_eigenvalue`, by Lanczos: a few tens of Hessian-vector products each; the smallest
    eigenvalue, which takes ten times as many, is left to a direct call).
    ``model`` may be a ``DistributedDataParallel``: records are then of the global batch, the same on every rank
    (:mod:`alphalib.distributed`; ``full_data``, ``held_out`` and ``sharpness_every`` are refused there).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> with AlphaProbe(model, torch.nn.functional.mse_loss, opt) as probe:
        ...     for _ in range(3):
        ...         opt.zero_grad()
        ...         torch.nn.functional.mse_loss(model(x), y).backward()
        ...         rec = probe.step((x, y))
        >>> len(probe.to_frame()), rec.path
        (3, 'fast')
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn | Objective,
        optimizer: torch.optim.Optimizer,
        *,
        curvature: Backend = "hessian",
        every: int = 1,
        path: Path = "auto",
        tags: Mapping[str, Any] | None = None,
        full_data: Iterable[object] | None = None,
        held_out: object | None = None,
        full_every: int = 1,
        sharpness_every: int | None = None,
    ):
        counts = (("every", every), ("full_every", full_every), ("sharpness_every", sharpness_every))
        for name, k in counts[:2] if sharpness_every is None else counts:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"{name} must be a positive integer (every k-th step), got {k!r}.")
        if path not in ("auto", "fast", "generic"):
            raise ValueError(f"path must be 'auto', 'fast' or 'generic', got {path!r}.")
        if not callable(loss):
            raise TypeError(
                f"loss must be a loss_fn(outputs, targets) or an alphalib.objective, got {type(loss).__name__}."
            )
        # DistributedDataParallel: keep its process group to average each record over the ranks, and probe the
        # module it wraps, so that the probe's hooks and its own passes never run DDP's forward (which would
        # prepare a gradient reduction); an objective is handed that module too
        self._ranks = distributed.for_probe(
            model, scopes=full_data is not None or held_out is not None, sharpness=sharpness_every is not None
        )
        model = distributed.unwrap(model)
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.curvature = check_backend(curvature)
        self.objective = isinstance(loss, Objective)
        if self.objective and self.curvature == "ggn":
            raise ValueError(
                "curvature='ggn' needs loss_fn(model(inputs), targets): an objective has no model output "
                "to split the loss at. Use curvature='hessian', or pass the loss_fn."
            )
        if self.objective and path == "fast":
            raise ValueError(
                "path='fast' needs loss_fn(model(inputs), targets); with an objective use path='auto' "
                "or 'generic' (it is measured on the generic path)."
            )
        trainable(model)
        self._check_optimizer()
        self.every, self.tags = every, dict(tags or {})
        self.scopes = {
            name: data for name, data in (("full", full_data), ("heldout", as_batches(held_out))) if data is not None
        }
        self.full_every, self.sharpness_every = full_every, sharpness_every
        self.records: list[Record] = []
        #: called with each new record, after it is appended (the live view, :func:`alphalib.lab.live.watch`, is one);
        #: one that raises is dropped with a warning, so it can never stop training
        self.listeners: list[Callable[[Record], None]] = []
        self.steps = 0
        #: seconds spent in :meth:`step` apart from the optimizer's own step: what observing costs (the hooks'
        #: small share of the forward and backward passes is not in it)
        self.seconds = 0.0
        self._warned, self._validated = False, set()  # the batch signatures validated so far
        self._capture: Capture | OpCapture | None = None
        self._why = "path='generic' was asked for" if path == "generic" else ""
        if path != "generic" and not self.objective and self.curvature in ("hessian", "ggn"):
            self._capture = capture_for(model, exact=self.curvature == "hessian")
        elif self.objective:
            self._why = "the probe measures an objective(model, batch), not loss_fn(model(x), y)"
        self._recorder = Recorder(model)
        self._recorder.tap = not self._why  # the fast path takes g_t from what reached .grad through the output
        if self._capture is not None:
            self._capture.own = self._recorder.own
        self.path = "generic" if self._why else "fast"
        #: with path="auto" on recorded operations: (path, seconds) of the trial steps that choose the faster path;
        #: not under DDP, where each rank's clock could choose differently (path="generic" is there to ask for it)
        self._trials = (
            Trials() if path == "auto" and isinstance(self._capture, OpCapture) and self._ranks is None else None
        )
        self._clock, self._last = time.perf_counter, None

    # ---- hooks and housekeeping ---------------------------------------------------------------------------

    def __enter__(self) -> AlphaProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Detach the probe's hooks from the model (records stay)."""
        self._recorder.remove()
        if self._capture is not None:
            self._capture.remove()

    def _arm(self, step: int) -> None:
        """Forget the last step; keep what the next training step leaves if ``step`` will be probed."""
        probed = step % self.every == 0
        self._recorder.reset(armed=probed)
        if self._capture is not None:
            self._capture.clear()
            self._capture.active = probed and not (self._trials is not None and self._trials.generic_next())

    def _time_trial(self, path: str) -> None:
        """Time the iteration this probed step ends (see :class:`~alphalib.probe.router.Trials`); after five, keep
        the faster path for good."""
        if self._trials is None:
            return
        best = self._trials.add(path, None if self._last is None else self._clock() - self._last)
        if best is None:
            return
        self._trials = None
        if best["generic"] < best["fast"]:
            self._capture.remove()
            self._capture, self.path = None, "generic"
            self._recorder.tap = False
            self._why = (
                f"path='auto' measured the generic path faster than the recorded operations on this model "
                f"({1e3 * best['generic']:.3g} against {1e3 * best['fast']:.3g} ms a training iteration)"
            )

    def _check_optimizer(self, everything: list[Tensor] | None = None) -> None:
        owned = {id(p) for p in (self.model.parameters() if everything is None else everything)}
        held = [p for group in self.optimizer.param_groups for p in group["params"]]
        stray = [p for p in held if id(p) not in owned]
        if len(stray) == len(held):
            raise ValueError(
                "the optimizer holds none of the model's parameters, so the probe would record zero "
                "steps; build it from model.parameters()."
            )
        if stray:
            shapes = ", ".join(str(tuple(p.shape)) for p in stray[:3])
            raise ValueError(
                f"the optimizer also updates {len(stray)} tensors that are not parameters of the model "
                f"(shapes {shapes}), so the probe would measure only part of the step; make them "
                "parameters of a module that holds the model too."
            )

    def _split(self, batch: object) -> list[object]:
        """Return the batches that built ``.grad``: ``batch``, or the micro-batches of a list of batches."""
        if isinstance(batch, list) and batch and all(isinstance(b, (tuple, list, Mapping)) for b in batch):
            batches = batch
        else:
            batches = [batch]
        if not self.objective:
            for b in batches:
                check_batch(b)
        return batches

    # ---- one step -----------------------------------------------------------------------------------------

    def step(
        self,
        batch: object,
        *,
        epoch: int | None = None,
        closure: Callable[[], Tensor] | None = None,
    ) -> Record | None:
        """Take the optimizer step; on probed steps return its record, else ``None``.

        Call after ``loss.backward()`` in place of ``optimizer.step()``. ``batch`` is what the loss was computed on:
        the ``(inputs, targets)`` pair for a ``loss_fn``, the objective's batch, or a *list* of the micro-batches
        whose backward passes accumulated into ``.grad`` (their union's loss is measured, weighted as training
        weighted them). For optimizers that take a closure (LBFGS) pass it as ``closure``. What cannot be measured
        raises a ``ValueError`` *before* the optimizer steps; after it, failures become records flagged ``error``.
        """
        start = self._clock()
        batches = self._split(batch)
        if in_eval_mode(self.optimizer):
            raise ValueError(
                f"{type(self.optimizer).__name__} is in eval mode, where it cannot step: call "
                "optimizer.train() before the training steps (and optimizer.eval() before evaluating)."
            )
        t = self.steps
        if t % self.every:
            stepped = self._take(closure)
            self._arm(t + 1)
            self._done(start, stepped)
            return None
        params, verdict, plan, fn = self._prepare(batches, closure)  # everything that may raise, before stepping
        theta = [p.detach().clone() for p in params]
        lr, size = float(self.optimizer.param_groups[0]["lr"]), step_size(self.optimizer)
        stepped = self._take(closure)
        size = size()
        with torch.no_grad():
            current = [p.detach() for p in params]
            delta = _ops.rsub_(theta, current) if plan.sweep else _ops.sub(current, theta)  # the sweep needs no θ_t
            theta = None if plan.sweep else theta
            steps = _ops.norms(delta).tolist()  # (one synchronisation for both uses)
        blurred = unresolved(current, steps, self._capture) if plan.sweep else None
        if blurred:  # the sweep would lose the step to rounding: generic
            plan.generic(blurred)
        res, grad, error = self._measured(plan, fn, params, batches, verdict, current, delta, theta)
        path, mismatch = plan.path, bool(verdict.mismatch)
        if self._ranks is not None:  # DDP: the global batch's numbers; the same two all-reduces on every rank
            res, path, error, mismatch = self._ranks.reduce(
                res,
                grad,
                params,
                batches,
                error=error,
                mismatch=mismatch,
                fast=path == "fast" and not error,
                fallback=plan.reasons,
            )
        scopes = (
            measure.scopes(self.model, self.loss, self.scopes, self.curvature, current, delta, plan.reasons)
            if self.scopes and t % self.full_every == 0
            else {}
        )
        sharp = (
            measure.sharpness(self.model, self.loss, self.optimizer, fn, current, delta, plan.reasons)
            if self.sharpness_every and t % self.sharpness_every == 0
            else {}
        )
        rec = make_record(
            step=t,
            epoch=epoch,
            loss=res.loss,
            lr=lr,
            step_size=size,
            step_slope=res.slope,
            step_curvature=res.curvature,
            grad_norm=res.grad_norm,
            step_norm=math.hypot(*steps),
            backend=self.curvature,
            path=path,
            error=error,
            mismatch=mismatch,
            fallback="; ".join(plan.reasons),
            scopes=scopes,
            sharpness=sharp,
        )
        self.records.append(rec)
        tell(self.listeners, rec)
        self._done(start, stepped)
        return rec

    def _prepare(self, batches: list[object], closure: object) -> tuple[list[Tensor], Verdict, Route, BatchLoss]:
        """Judge what the training step left, check the loss can be measured, choose the path; raise if it cannot."""
        everything = list(self.model.parameters())  # read at every step: layers may be frozen or unfrozen
        params = trainable(self.model, everything)
        self._check_optimizer(everything)
        self._recorder.watch(everything)
        verdict = self._judge(params, batches, closure)
        self._validate(batches, params)
        plan = route(self.model, verdict, self._capture, self._why, self._trials)
        if plan.recapture:  # module rules no longer stand for the forward: record operations from the next step on
            self._capture.remove()
            self._capture = capture_for(self.model, exact=self.curvature == "hessian", follow="ops")
            if self._capture is not None:
                self._capture.own = self._recorder.own
        fn = BatchLoss(
            self.model,
            self.loss,
            None,
            batches=batches,
            weights=verdict.weights,
            rngs=verdict.rngs if closure is None else [rng_state(params[0].device)],
            rngs_after=verdict.rngs_after if closure is None else None,
            buffers=verdict.buffers if closure is None else None,
            modes=verdict.modes,
        )
        self._recorder.armed = False  # what runs from here on (a closure, the probe's passes) is not training's
        if self._capture is not None:
            self._capture.active = False
        return params, verdict, plan, fn

    def _measured(
        self,
        plan: Route,
        fn: BatchLoss,
        params: list[Tensor],
        batches: list[object],
        verdict: Verdict,
        current: list[Tensor],
        delta: list[Tensor],
        theta: list[Tensor] | None,
    ) -> tuple[Directional, list[Tensor] | None, bool]:
        """Measure the step on the path ``plan`` chose (``plan.path`` then says which gave it); return the result,
        under DDP this rank's gradient at θ_t, and whether it failed (``plan.reasons`` says why). Never raises: the
        optimizer has stepped."""
        attempted, error, grad = plan.sweep, False, None
        theta_t = (lambda: _ops.sub(current, delta)) if theta is None else (lambda: theta)  # the sweep consumed θ_t
        precise = self.curvature in WIDENED
        try:
            with torch.autocast(params[0].device.type, enabled=False):
                if plan.sweep:
                    try:
                        with (
                            _trained.as_trained(self.model, verdict.modes),
                            replay_rng(verdict.rngs_after[0], params[0].device),
                        ):
                            res = measure.sweep(
                                self.model,
                                self._capture,
                                self.loss,
                                batches[0][1],
                                params,
                                delta,
                                verdict,
                                exact=self.curvature == "hessian",
                            )
                    except (KeyError, _ops.Unverified, NoRule) as exc:  # the step left not what a rule needs
                        plan.reasons.append(
                            "the forward pass did not leave what a tangent rule needs"
                            if isinstance(exc, KeyError)
                            else str(exc)
                        )
                        plan.sweep = False
                if not plan.sweep:
                    res = self._measure(
                        fn,
                        theta_t(),
                        delta,
                        verdict,
                        batches[0],
                        endpoint=current if plan.reuse else None,
                        precise=precise,
                    )
                dtype = params[0].dtype
                imprecise = (
                    None
                    if precise
                    else faint(res.loss, dtype) or (cancelled(res, dtype) if self.curvature == "secant" else None)
                )
                if imprecise:  # measured again where the arithmetic resolves it
                    plan.generic(imprecise)
                    res = self._measure(fn, theta_t(), delta, verdict, batches[0], precise=True)
                if self._ranks is not None:  # DDP: the gradient of this rank's loss; else one more backward pass
                    grad = (
                        _ops.div(verdict.grad, verdict.scale)
                        if plan.tapped
                        else distributed.local_gradient(fn, theta_t())
                    )
        except Exception as exc:  # never raise after the optimizer has stepped: record it
            self._warn(exc)
            res, error = Directional(math.nan, math.nan, math.nan), True
            plan.reasons.append(f"error: {type(exc).__name__}: {exc}")
        finally:
            if plan.trial and error:  # the generic path cannot measure this model (checkpointing): keep the fast one
                self._trials = None
                plan.reasons.append("the generic path failed here, so path='auto' keeps the recorded operations")
            elif plan.trial or attempted and plan.sweep:  # a timed iteration of either path
                self._time_trial("generic" if plan.trial else "fast")
            elif attempted:  # the recorded operations could not be followed: nothing to choose between
                self._trials = None
            self._arm(self.steps)
        return res, grad, error

    def _take(self, closure: Callable[[], Tensor] | None) -> float:
        """Step the optimizer exactly as training would; return the seconds it took."""
        stepping = self._clock()
        try:
            if closure is None:
                self.optimizer.step()
            else:
                self.optimizer.step(closure)
        finally:
            self.steps += 1
        return self._clock() - stepping

    def _done(self, start: float, stepped: float) -> None:
        """Count the time this call spent apart from the optimizer's own step."""
        self._last = self._clock()
        self.seconds += self._last - start - stepped

    def _judge(self, params: list[Tensor], batches: list[object], closure: object) -> Verdict:
        """Judge what the fast path may reuse; errors in ``loss_fn`` surface here, before stepping."""
        loss_fn = None if self.objective else self.loss
        try:
            return judge(
                self._recorder.facts(params),
                params,
                batches,
                loss_fn=loss_fn,
                output_grad=self._output_grad,
                closure=closure is not None,
            )
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(
                f"loss_fn(outputs, targets) failed on the model's output for this batch ({exc}); "
                "pass the batch the loss was computed on, or an alphalib.objective."
            ) from exc

    def _output_grad(self, out: Tensor, targets: Tensor) -> Tensor:
        return output_grad(self.loss, out, targets)

    def _validate(self, batches: list[object], params: list[Tensor]) -> None:
        """Evaluate the loss before stepping, on the first probed step and whenever the batches' shapes or dtypes
        change, so that a loss that cannot be measured raises now, not after the optimizer stepped."""
        kind = _signature(batches)
        if kind in self._validated:
            return
        fn = BatchLoss(self.model, self.loss, None, batches=batches)
        try:
            with torch.no_grad():
                fn([p.detach() for p in params])
        except _ops.Unverified as exc:
            raise ValueError(
                f"the probe cannot measure on torch {torch.__version__}: {exc}. Nothing was stepped."
            ) from exc
        except Exception as exc:
            what = "objective(model, batch)" if self.objective else "loss_fn(model(inputs), targets)"
            hint = (
                ""
                if self.objective
                else (
                    " If the model does not return the tensor loss_fn expects (a tuple, "
                    "a dict), wrap the whole loss in alphalib.objective(fn)."
                )
            )
            raise ValueError(
                f"the probe cannot evaluate {what} on this batch: {exc}.{hint} Nothing was stepped."
            ) from exc
        self._validated.add(kind)

    def _measure(
        self,
        fn: BatchLoss,
        theta: list[Tensor],
        delta: list[Tensor],
        verdict: Verdict,
        batch: Any,
        *,
        endpoint: list[Tensor] | None = None,
        precise: bool = False,
    ) -> Directional:
        return measure.backend(
            fn,
            self.curvature,
            theta,
            delta,
            verdict=verdict,
            loss=self.loss,
            batch=batch,
            endpoint=endpoint,
            precise=precise,
        )

    def _warn(self, exc: Exception) -> None:
        if not self._warned:
            warnings.warn(
                f"AlphaProbe: measuring with the {self.curvature!r} backend failed ({type(exc).__name__}: {exc}); "
                "such steps are recorded with flag='error' and the reason in 'fallback'. If an operation lacks a "
                "double backward, curvature='secant' needs none.",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned = True

    @property
    def frame_tags(self) -> dict[str, Any]:
        """The constant columns :meth:`to_frame` adds: the probe's ``tags``."""
        return dict(self.tags)

    def to_frame(self) -> pd.DataFrame:
        """Return the records as a DataFrame, one row per probed step, with the probe's ``tags`` as columns."""
        return to_frame(self.records, self.frame_tags)

    def state_dict(self) -> dict[str, Any]:
        """Return what resuming needs, in plain Python values: the step count and the records so far.

        Save it with the model's and the optimizer's (``torch.save``); a new probe on the resumed run continues
        from it by :meth:`load_state_dict`.
        """
        return {"steps": self.steps, "records": [dataclasses.asdict(r) for r in self.records]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the step count (``every`` keeps its phase) and the earlier records."""
        steps, records = state["steps"], [Record(**r) for r in state["records"]]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"state['steps'] must be a step count, got {steps!r}.")
        self.records[:], self.steps = records, steps
        self._arm(steps)


def _signature(value: object) -> object:
    """Return the shapes and dtypes of the tensors in a batch (nested tuples, lists, dicts), to tell batches apart."""
    if isinstance(value, Tensor):
        return tuple(value.shape), value.dtype
    if isinstance(value, Mapping):
        return tuple((k, _signature(v)) for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    return type(value).__name__
