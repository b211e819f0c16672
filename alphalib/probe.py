r"""``AlphaProbe``: take the optimizer's step and measure how far it is from the quadratic model's best step.

On a probed step the probe keeps a copy of :math:`\theta_t`, calls ``optimizer.step()`` exactly as training
would, forms the realized step :math:`\Delta = \theta_{t+1} - \theta_t` and evaluates, at :math:`\theta_t` on
the same batch, the slope :math:`\Delta^\top g_t` and the curvature :math:`\Delta^\top H_t \Delta` with the
chosen backend (see :mod:`alphalib.curvature`). Because it uses the realized step it works for any
optimizer, and with several param groups at different learning rates the ``ratio``
:math:`-\Delta^\top g_t / \Delta^\top H_t \Delta` (the multiple of the whole step that reaches the model's
minimum) stays defined; ``alpha_star`` is then ``ratio`` times the *first* group's learning rate.

**Two paths.** The *fast* path reuses what the training step computed: for ``"hessian"`` and ``"ggn"`` a
sweep along the step over its saved activations and errors (:mod:`alphalib.fast`: by module rules where
every module of the model has one, else over the operations its training forward ran); for ``"fd"``, ``"fd_onesided"`` and ``"secant"`` the training loss and
gradient. The *generic* path recomputes everything at :math:`\theta_t` from a fresh forward pass and works for
any model and loss. ``path="auto"`` (default) takes the fast path only where :mod:`alphalib._proof` shows that
what it would reuse is this step's: one forward pass on the batch handed over, one backward pass of a multiple
of the probe's loss through the model's output, parameters unchanged since; :math:`g_t` is what reached the
parameters through the output (so clipping or penalties on ``.grad`` do not leak in). Otherwise the generic
path runs and the record's ``fallback`` says why; a batch that is not what training backpropagated is flagged
``mismatch``. On a model followed by recorded operations, where the fast path is not always the cheaper (many
small operations cost Python time each), ``path="auto"`` times the training iteration in the user's own loop on
both paths during its first five probed steps (the 2nd and 4th generic) and keeps the faster; ``fallback`` says so.

**The function that is probed.** Slope and curvature come from one function: ``loss_fn(model(x), y)`` (or
the :func:`alphalib.objective`) on the same batch, or on the union of the micro-batches that built ``.grad``,
evaluated in the model's current mode and the parameters' precision, with the random draws of the training
forward pass replayed, so a model with dropout is probed with the training step's own mask; BatchNorm in
train mode uses the batch statistics, as in training.

**Step size.** The record gives :math:`\alpha^*` in units of the step size the optimizer chose,
``step_size`` (:func:`alphalib.optim.step_size`: the lr, or a learning-rate-free optimizer's own, such as
Prodigy's :math:`d\,\mathrm{lr}` or DoG's :math:`\eta`), so ``ratio`` is the multiple of the realized step for
every optimizer. Schedule-Free is measured at its gradient point :math:`y_t`, the parameters in its train mode;
an optimizer left in eval mode is refused before it steps.

**A pure observer.** Parameters, ``.grad``, optimizer state, buffers (BatchNorm running statistics) and the
global RNG stream end up bit-for-bit as they would without the probe. What cannot be measured raises a
``ValueError`` before the optimizer steps; after it nothing raises: odd curvature is recorded and named in
``flag`` (see :data:`alphalib.records.FLAGS`), and a backend that fails (for example an operation without a
double backward) records ``flag="error"``, its reason in ``fallback``, and warns once.

**DistributedDataParallel.** Given a DDP model, the probe follows the module it wraps and records the *global*
batch's :math:`\alpha^*`: each rank measures its own shard, then loss, slope, curvature (averaged) and the norm of the
averaged gradient are all-reduced over DDP's process group, the same collectives on every rank whatever path it
took, so every rank holds the same records (write them on one: :func:`alphalib.distributed.is_main_process`). With
a mean-reduced loss and equal shards this is a single process's :math:`\alpha^*` on the concatenated batch; unequal
shards, costs and failures: see :mod:`alphalib.distributed`.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from . import _ops, _trained, distributed
from ._checks import check_batch, check_loss, trainable
from ._function import BatchLoss, LossFn, Objective, replay_rng, rng_state
from ._proof import Verdict, Witness
from .curvature import Backend, Directional, Known, check_backend, directional
from .fast import Capture, NoRule, OpCapture
from .fast import capture_for, measure
from .fast.output import output_grad
from .optim import in_eval_mode, step_size
from .records import Record, make_record, tell, to_frame
from .sharpness import preconditioner, top_eigenvalue
from .spectrum import along, as_batches

Path = Literal["auto", "fast", "generic"]
#: the backends that difference losses or gradients: below float64 they are evaluated in float64
DIFFERENCES = ("fd", "fd_onesided", "secant")

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
            raise TypeError("loss must be a loss_fn(outputs, targets) or an alphalib.objective, "
                            f"got {type(loss).__name__}.")
        # DistributedDataParallel: keep its process group to average each record over the ranks, and probe the
        # module it wraps, so that the probe's hooks and its own passes never run DDP's forward (which would
        # prepare a gradient reduction); an objective is handed that module too
        self._ranks = distributed.for_probe(model, scopes=full_data is not None or held_out is not None,
                                            sharpness=sharpness_every is not None)
        model = distributed.unwrap(model)
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.curvature = check_backend(curvature)
        self.objective = isinstance(loss, Objective)
        if self.objective and self.curvature == "ggn":
            raise ValueError("curvature='ggn' needs loss_fn(model(inputs), targets): an objective has no model output "
                             "to split the loss at. Use curvature='hessian', or pass the loss_fn.")
        if self.objective and path == "fast":
            raise ValueError("path='fast' needs loss_fn(model(inputs), targets); with an objective use path='auto' "
                             "or 'generic' (it is measured on the generic path).")
        trainable(model)
        self._check_optimizer()
        self.every, self.tags = every, dict(tags or {})
        self.scopes = {name: data for name, data in (("full", full_data), ("heldout", as_batches(held_out)))
                       if data is not None}
        self.full_every, self.sharpness_every = full_every, sharpness_every
        self.records: list[Record] = []
        #: called with each new record, after it is appended (the live view, :func:`alphalib.live.watch`, is one);
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
        self._witness = Witness(model)
        self._witness.tap = not self._why  # the fast path takes g_t from what reached .grad through the output
        if self._capture is not None:
            self._capture.own = self._witness.own
        self.path = "generic" if self._why else "fast"
        #: with path="auto" on recorded operations: (path, seconds) of the trial steps that choose the faster path;
        #: not under DDP, where each rank's clock could choose differently (path="generic" is there to ask for it)
        self._trials: list[tuple[str, float]] | None = [] if path == "auto" and isinstance(self._capture, OpCapture) \
            and self._ranks is None else None
        self._clock, self._last = time.perf_counter, None

    # ---- hooks and housekeeping ---------------------------------------------------------------------------

    def __enter__(self) -> AlphaProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Detach the probe's hooks from the model (records stay)."""
        self._witness.remove()
        if self._capture is not None:
            self._capture.remove()

    def _arm(self, step: int) -> None:
        """Forget the last step; keep what the next training step leaves if ``step`` will be probed."""
        probed = step % self.every == 0
        self._witness.reset(armed=probed)
        if self._capture is not None:
            self._capture.clear()
            self._capture.active = probed and not self._trying_generic()

    # ---- path="auto" on recorded operations: time both paths in the user's own loop, keep the faster ---------

    def _trying_generic(self) -> bool:
        """Whether the next probed step is a trial of the generic path (the 2nd and 4th of the first five)."""
        return self._trials is not None and len(self._trials) in (1, 3)

    def _time_trial(self, path: str) -> None:
        """Time the training iteration this probed step ends; after five, keep the faster path for good.

        An iteration runs from the end of the previous ``probe.step`` call to the end of this one: the forward and
        backward passes (recorded or not) and the probe's measurement, in the user's own loop. The first probed
        step warms up and is not counted; then generic, recorded, generic, recorded.
        """
        if self._trials is None:
            return
        self._trials.append(("warm-up", 0.0) if self._last is None else (path, self._clock() - self._last))
        if len(self._trials) < 5:
            return
        best = {k: min(s for p, s in self._trials[1:] if p == k) for k in ("fast", "generic")}
        self._trials = None
        if best["generic"] < best["fast"]:
            self._capture.remove()
            self._capture, self.path = None, "generic"
            self._witness.tap = False
            self._why = (f"path='auto' measured the generic path faster than the recorded operations on this model "
                         f"({1e3 * best['generic']:.3g} against {1e3 * best['fast']:.3g} ms a training iteration)")

    def _check_optimizer(self, everything: list[Tensor] | None = None) -> None:
        owned = {id(p) for p in (self.model.parameters() if everything is None else everything)}
        held = [p for group in self.optimizer.param_groups for p in group["params"]]
        stray = [p for p in held if id(p) not in owned]
        if len(stray) == len(held):
            raise ValueError("the optimizer holds none of the model's parameters, so the probe would record zero "
                             "steps; build it from model.parameters().")
        if stray:
            shapes = ", ".join(str(tuple(p.shape)) for p in stray[:3])
            raise ValueError(f"the optimizer also updates {len(stray)} tensors that are not parameters of the model "
                             f"(shapes {shapes}), so the probe would measure only part of the step; make them "
                             "parameters of a module that holds the model too.")

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
        self, batch: object, *, epoch: int | None = None, closure: Callable[[], Tensor] | None = None,
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
            raise ValueError(f"{type(self.optimizer).__name__} is in eval mode, where it cannot step: call "
                             "optimizer.train() before the training steps (and optimizer.eval() before evaluating).")
        t = self.steps
        if t % self.every:
            stepping = self._clock()
            self._take(closure)
            stepped = self._clock() - stepping
            self.steps = t + 1
            self._arm(t + 1)
            self._last = self._clock()
            self.seconds += self._last - start - stepped
            return None
        everything = list(self.model.parameters())  # read at every step: layers may be frozen or unfrozen
        params = trainable(self.model, everything)
        self._check_optimizer(everything)
        self._witness.watch(everything)
        verdict = self._judge(params, batches, closure)
        self._validate(batches, params)
        cap = self._capture
        fallback = ([self._why] if self._why else verdict.reasons) + verdict.mismatch
        unproven = self._unproven(verdict) if verdict.fast and not self._why else None
        if unproven:
            fallback.append(unproven)
            verdict.fast = False
        sweep = verdict.fast and cap is not None and not self._why
        trial = sweep and self._trials is not None and self._trying_generic()
        if trial:
            fallback.append("path='auto' is timing the generic path against the recorded operations (5 probed steps)")
            sweep = False
        elif sweep and (cap.output is None or cap.reused or cap.uncovered):
            fallback.append("a module ran twice in the forward pass" if cap.reused else cap.uncovered or
                            "the capture is empty")
            sweep = False
        reuse = verdict.fast and not self._why and cap is None
        tapped = verdict.fast and not self._why  # verdict.grad holds c ∇L, as the training backward sent it (DDP)
        fn = BatchLoss(self.model, self.loss, None, batches=batches, weights=verdict.weights,
                       rngs=verdict.rngs if closure is None else [rng_state(params[0].device)],
                       rngs_after=verdict.rngs_after if closure is None else None,
                       buffers=verdict.buffers if closure is None else None, modes=verdict.modes)
        grad = None  # (DDP) this rank's ∇L at θ_t, for the global batch's grad_norm
        theta = [p.detach().clone() for p in params]
        lr = float(self.optimizer.param_groups[0]["lr"])
        self._witness.armed = False  # what runs from here on (a closure, the probe's passes) is not training's
        if cap is not None:
            cap.active = False
        size = step_size(self.optimizer)
        stepping = self._clock()
        try:
            self._take(closure)
        finally:
            self.steps = t + 1
        stepped, size = self._clock() - stepping, size()
        with torch.no_grad():
            current = [p.detach() for p in params]
            if sweep:  # θ_t is not needed again: turn its copy into Δ in place
                torch._foreach_sub_(theta, current)
                torch._foreach_neg_(theta)
                delta, theta = theta, []
            else:
                delta = torch._foreach_sub(current, theta)
            norms = torch.stack(torch._foreach_norm(delta))
            step_norm = torch.linalg.vector_norm(norms).item()
        blurred = _unresolved(current, norms)
        if blurred:  # the fast path, or float32 arithmetic, would lose the step to rounding: generic, in float64
            fallback.append(blurred)
            if sweep:
                theta = torch._foreach_sub(current, delta)
            sweep = reuse = tapped = False
        path, error, attempted = ("fast" if sweep or reuse else "generic"), False, sweep
        try:
            with torch.autocast(params[0].device.type, enabled=False):
                if sweep:
                    try:
                        with _trained.as_trained(self.model, verdict.modes), \
                                replay_rng(verdict.rngs_after[0], params[0].device):
                            res = self._sweep(params, delta, verdict, batches[0])
                    except (KeyError, _ops.Unverified, NoRule) as exc:  # the step left not what a rule needs
                        fallback.append("the forward pass did not leave what a tangent rule needs"
                                        if isinstance(exc, KeyError) else str(exc))
                        theta = torch._foreach_sub(current, delta)
                        sweep = False
                if not sweep:
                    path = "fast" if reuse else "generic"
                    res = self._measure(fn, batches, theta, delta, verdict, current if reuse else None,
                                        precise=bool(blurred) or self.curvature in DIFFERENCES)
                faint = None if blurred or self.curvature in DIFFERENCES else _faint(res.loss, params[0].dtype)
                if faint:  # measured again where the arithmetic resolves it
                    fallback.append(faint)
                    theta = torch._foreach_sub(current, delta) if sweep else theta
                    sweep, path = False, "generic"
                    res = self._measure(fn, batches, theta, delta, verdict, None, precise=True)
                if self._ranks is not None:  # DDP: the gradient of this rank's loss; else one more backward pass
                    grad = torch._foreach_div(verdict.grad, verdict.scale) if tapped else \
                        distributed.local_gradient(fn, theta)
        except Exception as exc:  # never raise after the optimizer has stepped: record it
            self._warn(exc)
            res, error = Directional(math.nan, math.nan, math.nan), True
            fallback.append(f"error: {type(exc).__name__}: {exc}")
        finally:
            if trial and error:  # the generic path cannot measure this model (checkpointing): keep the fast path
                self._trials = None
                fallback.append("the generic path failed here, so path='auto' keeps the recorded operations")
            elif trial or attempted and sweep:  # a timed iteration of either path
                self._time_trial("generic" if trial else "fast")
            elif attempted:  # the recorded operations could not be followed: nothing to choose between
                self._trials = None
            self._arm(t + 1)
        mismatch = bool(verdict.mismatch)
        if self._ranks is not None:  # DDP: the global batch's numbers; the same two all-reduces on every rank
            fast = path == "fast" and not error
            res, path, error, mismatch = self._ranks.reduce(res, grad, params, batches, fast=fast, error=error,
                                                            mismatch=mismatch, fallback=fallback)
        scopes = self._scopes(current, delta, fallback) if self.scopes and t % self.full_every == 0 else {}
        sharp = self._sharpness(current, delta, fn, fallback) \
            if self.sharpness_every and t % self.sharpness_every == 0 else {}
        rec = make_record(
            step=t, epoch=epoch, loss=res.loss, lr=lr, step_size=size, step_slope=res.slope,
            step_curvature=res.curvature,
            grad_norm=res.grad_norm, step_norm=step_norm, backend=self.curvature, path=path, error=error,
            mismatch=mismatch, fallback="; ".join(fallback), scopes=scopes, sharpness=sharp,
        )
        self.records.append(rec)
        tell(self.listeners, rec)
        self._last = self._clock()
        self.seconds += self._last - start - stepped
        return rec

    def _scopes(self, current: list[Tensor], delta: list[Tensor], fallback: list[str]) -> dict[str, Directional]:
        """Slope and curvature along the same step of the full-data and held-out losses (generic path, at θ_t)."""
        theta, out = torch._foreach_sub(current, delta), {}
        for name, data in self.scopes.items():
            try:
                with torch.autocast(current[0].device.type, enabled=False):
                    out[name] = along(self.model, self.loss, data, delta, curvature=self.curvature, theta=theta)
            except Exception as exc:  # the step is taken: record, never raise
                fallback.append(f"{name}: {type(exc).__name__}: {exc}")
        return out

    def _sharpness(self, current: list[Tensor], delta: list[Tensor], fn: BatchLoss,
                   fallback: list[str]) -> dict[str, float]:
        """The largest eigenvalue at θ_t of the Hessian of ``fn`` (the measured loss: the step's batches, their weights
        and random draws), and Adam's preconditioned sharpness (after its step)."""
        theta, out = torch._foreach_sub(current, delta), {}
        try:
            with torch.autocast(current[0].device.type, enabled=False):
                out["lambda_max"] = top_eigenvalue(self.model, self.loss, fn, theta=theta, which="max").lambda_max
                if type(self.optimizer) in (torch.optim.Adam, torch.optim.AdamW):
                    preconditioner(self.optimizer, trainable(self.model))  # raises before Lanczos if it cannot
                    out["precond_lambda_max"] = top_eigenvalue(self.model, self.loss, fn, theta=theta,
                                                               optimizer=self.optimizer, which="max").lambda_max
        except Exception as exc:  # the step is taken: record, never raise
            fallback.append(f"sharpness: {type(exc).__name__}: {exc}")
        return out

    def _take(self, closure: Callable[[], Tensor] | None) -> None:
        if closure is None:
            self.optimizer.step()
        else:
            self.optimizer.step(closure)

    def _judge(self, params: list[Tensor], batches: list[object], closure: object) -> Verdict:
        """Ask the witness what the fast path may reuse; errors in ``loss_fn`` surface here, before stepping."""
        loss_fn = None if self.objective else self.loss
        try:
            return self._witness.judge(params, batches, loss_fn=loss_fn, output_grad=self._output_grad,
                                       closure=closure is not None)
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(f"loss_fn(outputs, targets) failed on the model's output for this batch ({exc}); "
                             "pass the batch the loss was computed on, or an alphalib.objective.") from exc

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
        except Exception as exc:
            what = "objective(model, batch)" if self.objective else "loss_fn(model(inputs), targets)"
            hint = "" if self.objective else (" If the model does not return the tensor loss_fn expects (a tuple, "
                                              "a dict), wrap the whole loss in alphalib.objective(fn).")
            raise ValueError(f"the probe cannot evaluate {what} on this batch: {exc}.{hint} Nothing was stepped.") \
                from exc
        self._validated.add(kind)

    def _sweep(self, params: list[Tensor], delta: list[Tensor], verdict: Verdict, batch: Any) -> Directional:
        """Exact (or GGN) slope and curvature from the captured training step, by the tangent pass."""
        loss, slope, curvature = measure(self.model, self._capture, self.loss, batch[1], params, delta,
                                            exact=self.curvature == "hessian", scale=verdict.scale)
        return Directional(loss, slope, curvature, math.nan if verdict.grad_norm is None else verdict.grad_norm)

    def _measure(
        self, fn: BatchLoss, batches: list[object], theta: list[Tensor], delta: list[Tensor], verdict: Verdict,
        endpoint: list[Tensor] | None, *, precise: bool = False,
    ) -> Directional:
        """Return loss, slope and curvature of ``fn`` along the realized step from a backend.

        ``endpoint`` (θ_{t+1}), given when the loss and gradient at θ_t may be taken from the training step (the
        fast path of ``fd``, ``secant``). ``precise``: parameters below float64 are measured in float64 (for the
        backends that take differences, which are mostly rounding there, and for a step below their resolution).
        """
        if precise and theta[0].dtype != torch.float64:
            precise = copy.copy(fn)
            precise.dtype = torch.float64
            return directional(precise, [t.double() for t in theta], [d.double() for d in delta], self.curvature)
        if endpoint is None:
            return directional(fn, theta, delta, self.curvature)
        with replay_rng(verdict.rngs_after[0], theta[0].device):
            loss = check_loss(self.loss(verdict.output, batches[0][1])).item()
        known = Known(loss, verdict.grad, endpoint=endpoint, scale=verdict.scale,
                      grad_norm=math.nan if verdict.grad_norm is None else verdict.grad_norm)
        return directional(fn, theta, delta, self.curvature, known=known)

    def _unproven(self, verdict: Verdict) -> str | None:
        """Say why this step's backward or its module rules do not stand for the loss that trained, or ``None``.

        Checked on every probed step: hooks can be added, and modes switched, at any time. Module rules that no
        longer hold give way to recorded operations from the next step on.
        """
        modifier = _trained.gradient_modifiers(self.model)
        if modifier:
            return f"{modifier}: measured on the generic path, without it"
        if isinstance(self._capture, Capture):
            why = _trained.not_textbook(self.model)
            if why:
                self._capture.remove()
                self._capture = OpCapture(self.model, errors=self.curvature == "hessian")
                self._capture.own = self._witness.own
                return f"{why}, which module rules do not follow: recorded operations from the next step on"
        return None

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


def _signature(value: object) -> object:
    """Return the shapes and dtypes of the tensors in a batch (nested tuples, lists, dicts), to tell batches apart."""
    if isinstance(value, Tensor):
        return tuple(value.shape), value.dtype
    if isinstance(value, Mapping):
        return tuple((k, _signature(v)) for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    return type(value).__name__


def _unresolved(current: list[Tensor], steps: Tensor) -> str | None:
    """Say why the step (``steps``: the norm of Δ per tensor) is too small for the fast path at the parameters'
    precision, or ``None``.

    The fast path forms second-order terms from products at :math:`\theta_{t+1}` and :math:`\theta_t`; their
    difference loses about :math:`u\,\|\theta\|/\|\Delta\|` of the curvature (unit roundoff :math:`u`; measured: 0.15
    times it on an MLP). Below float64 it must stay under 1e-3 for every parameter tensor the step moved, which keeps
    the fast path within the 1e-3 it states for float32 (a ResNet at Adam's lr 1e-3: 1.2e-4; lr 1e-5: 4e-3-8e-3).
    """
    dtype = current[0].dtype
    if dtype == torch.float64:
        return None
    eps = torch.finfo(dtype).eps
    sizes, moved = torch.stack(torch._foreach_norm(current)), steps > 0
    if bool((eps * sizes[moved] > 1e-3 * steps[moved]).any()):
        return (f"the step is below {str(dtype).removeprefix('torch.')} resolution of the parameters for the fast "
                "path (|delta| < 1e3 u |theta| in some tensor): measured on the generic path in float64")
    return None


def _faint(loss: float, dtype: torch.dtype) -> str | None:
    """Say why a loss this close to zero leaves its slope and curvature to rounding below float64, or ``None``.

    Near a fitted batch the loss's derivatives come from differences of nearly equal numbers (cross-entropy's
    :math:`1 - p_y`, MSE's residuals against the targets): their relative rounding error grows like :math:`u/L`
    (measured on a ReLU MLP at a float32 loss of 3e-7: 15% on the generic path, 0.5% on the fast one).
    """
    if dtype == torch.float64 or not math.isfinite(loss):
        return None
    eps = torch.finfo(dtype).eps
    if abs(loss) < 1e3 * eps:
        return (f"the loss ({loss:.2g}) is within 1e3 u of zero, where {str(dtype).removeprefix('torch.')} leaves its "
                "slope and curvature to rounding: measured on the generic path in float64")
    return None
