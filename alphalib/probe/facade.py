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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor, nn

from .. import _ops, _trained, distributed
from .._checks import check_batch, trainable
from .._function import BatchLoss, LossFn, Objective, replay_rng, rng_state
from .._hooks import Hook
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

    Call :meth:`step` after ``loss.backward()`` in place of ``optimizer.step()``. Use the probe as a context
    manager, or call :meth:`remove`, to detach its hooks. What it measures and promises: :mod:`alphalib.probe`.

    Args:
        model: The network training calls. It may be a ``DistributedDataParallel``: records are then of the global
            batch, the same on every rank (:mod:`alphalib.distributed`; ``full_data``, ``held_out`` and
            ``sharpness_every`` are refused there).
        loss: The ``loss_fn(outputs, targets)`` training minimises on ``model(inputs)``, or an
            :func:`alphalib.objective` ``fn(model, batch) -> scalar`` for anything else (penalties, models that
            return their loss, dict batches).
        optimizer: The optimizer that trains ``model``, built from its parameters; :meth:`step` steps it.
        curvature: The backend that measures the curvature along the step (:mod:`alphalib.curvature`):
            ``"hessian"``, ``"ggn"`` (a ``loss_fn`` only), ``"fd"``, ``"fd_onesided"`` or ``"secant"``.
        every: Probe every ``every``-th call of :meth:`step` (counted from 0); the others only step.
        path: ``"auto"`` takes the fast path where the evidence shows that what it reuses is this step's, and on
            recorded operations keeps whichever path the first five probed steps time faster; ``"fast"`` does
            the same without that timing (a ``loss_fn`` only); ``"generic"`` always evaluates the loss afresh.
        tags: Constant columns for :meth:`to_frame`.
        full_data: Batches (a list, a ``DataLoader``) whose mean loss is also measured along the same step, on
            probed steps whose index is a multiple of ``full_every`` (the ``full_*`` columns).
        held_out: Batches the step never sees (one batch, a list, a ``DataLoader``), measured likewise (the
            ``heldout_*`` columns).
        full_every: Measure ``full_data`` and ``held_out`` on probed steps whose index is a multiple of it.
        sharpness_every: Also record, on probed steps whose index is a multiple of it, the batch Hessian's largest
            eigenvalue at :math:`\theta_t` (and, for Adam, its preconditioned sharpness) by
            :func:`alphalib.top_eigenvalue` (Lanczos: a few tens of Hessian-vector products each; the smallest
            eigenvalue, which takes ten times as many, is left to a direct call).

    Raises:
        ValueError: If a count is not a positive integer, ``path`` or ``curvature`` is not one of those above, an
            objective is given with ``curvature="ggn"`` or ``path="fast"``, the model has no trainable parameter,
            the optimizer holds none of the model's parameters or also other tensors, or a DDP model comes with
            what is not measured across ranks (``full_data``, ``held_out``, ``sharpness_every``, ``SyncBatchNorm``).
        TypeError: If ``loss`` is not callable.

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
        #: the records so far, one per probed step
        self.records: list[Record] = []
        #: called with each new record, after it is appended (the live view, :func:`alphalib.lab.live.watch`, is one);
        #: one that raises is dropped with a warning, so it can never stop training
        self.listeners: list[Callable[[Record], None]] = []
        #: calls of :meth:`step` so far (probed or not): the index of the next step
        self.steps = 0
        #: seconds spent in :meth:`step` apart from the optimizer's own step: what observing costs (the hooks'
        #: small share of the forward and backward passes is not in it)
        self.seconds = 0.0
        self._warned = False
        self._validated: set[object] = set()  # the batch signatures validated so far
        self._capture: Capture | OpCapture | None = None
        self._stash: list[Tensor] = []  # with every=1, the buffers θ_t is copied into (see _snapshot)
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
        self._clock = time.perf_counter
        self._last: float | None = None  # when the last probe.step call ended
        self._began: float | None = None  # when the training forward of the step about to be probed began
        self._recorder.on_forward = Hook(self, "_forward_began")  # (weakly: the recorder must not keep the probe alive)

    # ---- hooks and housekeeping ---------------------------------------------------------------------------

    def __enter__(self) -> AlphaProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Detach the probe's hooks from the model (records stay); leaving the ``with`` block calls it."""
        self._recorder.remove()
        self._stash = []
        if self._capture is not None:
            self._capture.remove()

    def _forward_began(self) -> None:
        """Note when the training iteration of a probed step began (its first forward pass, under accumulation)."""
        if self._began is None:
            self._began = self._clock()

    def _arm(self, step: int) -> None:
        """Forget the last step; keep what the next training step leaves if ``step`` will be probed."""
        self._began = None
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
        start = self._last if self._began is None else self._began
        best = self._trials.add(path, None if start is None else self._clock() - start)
        if best is None:
            return
        self._trials = None
        if best["generic"] < best["fast"]:
            assert self._capture is not None  # trials time the recorded operations of a capture
            self._capture.remove()
            self._capture, self.path = None, "generic"
            self._recorder.tap = False
            self._why = (
                f"path='auto' measured the generic path faster than the recorded operations on this model "
                f"({1e3 * best['generic']:.3g} against {1e3 * best['fast']:.3g} ms a training iteration)"
            )

    def _check_optimizer(self, everything: Sequence[Tensor] | None = None) -> None:
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

        Call after ``loss.backward()`` in place of ``optimizer.step()``. What cannot be measured raises *before* the
        optimizer steps; after it, failures become records flagged ``error``.

        Args:
            batch: What the loss was computed on: the ``(inputs, targets)`` pair for a ``loss_fn``, the
                objective's batch, or a *list* of the micro-batches whose backward passes accumulated into
                ``.grad`` (their union's loss is measured, weighted as training weighted them).
            epoch: The epoch, for the record.
            closure: For optimizers that take a closure (LBFGS): the closure, passed on to ``optimizer.step``.

        Returns:
            The step's :class:`~alphalib.Record` on probed steps (every ``every``-th call), else ``None``.

        Raises:
            ValueError: Before the optimizer steps, if the step cannot be measured: a batch that is not an
                ``(inputs, targets)`` pair for a ``loss_fn``, an optimizer in eval mode (Schedule-Free), one that
                no longer holds the model's parameters, or a loss that cannot be evaluated on ``batch``.
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
        before = self._snapshot(params)
        lr, size_of = float(self.optimizer.param_groups[0]["lr"]), step_size(self.optimizer)
        stepped = self._take(closure)
        size = size_of()
        with torch.no_grad():
            current = [p.detach() for p in params]
            delta = _ops.rsub_(before, current) if plan.sweep else _ops.sub(current, before)  # the sweep needs no θ_t
            theta = None if plan.sweep else before  # (the sweep overwrote θ_t with Δ)
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
            assert self._capture is not None  # (the router asks for it only on module rules)
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
        batches: list[Any],
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
                    capture, loss_fn = self._capture, self.loss
                    # the router sweeps only a capture of loss_fn(model(x), y)'s training step
                    assert capture is not None and not isinstance(loss_fn, Objective)
                    try:
                        with (
                            _trained.as_trained(self.model, verdict.modes),
                            replay_rng(verdict.rngs_after[0], params[0].device),
                        ):
                            res = measure.sweep(
                                self.model,
                                capture,
                                loss_fn,
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
                    if plan.tapped:
                        assert verdict.grad is not None  # a tapped step's verdict is fast: it holds the gradient
                        grad = _ops.div(verdict.grad, verdict.scale)
                    else:
                        grad = distributed.local_gradient(fn, theta_t())
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

    def _snapshot(self, params: list[Tensor]) -> list[Tensor]:
        """Return a copy of θ_t. Probing every step, it is written into the buffers of the last probed step (which
        that step turned into Δ and no longer reads): a copy into them takes about a third of the time of fresh
        buffers (14 M floats: 6.4 against 21.8 ms), for one copy of the trainable parameters held between steps, the
        size every probed step allocates anyway. With ``every > 1`` nothing is kept between steps."""
        stash = self._stash
        same = len(stash) == len(params) and all(
            (s.shape, s.dtype, s.device) == (p.shape, p.dtype, p.device) for s, p in zip(stash, params, strict=True)
        )
        if self.every == 1 and same:
            _ops.copy_(stash, [p.detach() for p in params])
            return stash
        fresh = [p.detach().clone() for p in params]
        if self.every == 1:
            self._stash = fresh
        return fresh

    def _take(self, closure: Callable[[], Tensor] | None) -> float:
        """Step the optimizer exactly as training would; return the seconds it took."""
        stepping = self._clock()
        try:
            if closure is None:
                self.optimizer.step()
            else:
                # (torch's stub wants a closure returning float; LBFGS's, like any, may return the loss tensor)
                self.optimizer.step(cast(Callable[[], float], closure))
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
        if isinstance(self.loss, Objective):
            raise ValueError("an objective(model, batch) has no model output to differentiate the loss at.")
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
        """Return the records as a DataFrame.

        Returns:
            One row per probed step (the fields of :class:`~alphalib.Record`), with the probe's ``tags`` as
            constant columns.
        """
        return to_frame(self.records, self.frame_tags)

    def state_dict(self) -> dict[str, Any]:
        """Return what resuming needs, in plain Python values: the step count and the records so far.

        Save it with the model's and the optimizer's (``torch.save``); a new probe on the resumed run continues
        from it by :meth:`load_state_dict`.

        Returns:
            ``{"steps": <calls of step so far>, "records": <each record as a dict>}``.
        """
        return {"steps": self.steps, "records": [dataclasses.asdict(r) for r in self.records]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the step count (``every`` keeps its phase) and the earlier records.

        Args:
            state: What :meth:`state_dict` returned; it replaces this probe's step count and records.

        Raises:
            ValueError: If ``state["steps"]`` is not a non-negative integer.
        """
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
