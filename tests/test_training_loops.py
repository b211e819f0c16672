"""Acceptance table for "never silently wrong": the training loops researchers write x backend x path.

Each cell trains a small seeded model for a few steps twice, once calling ``optimizer.step()`` and once
``probe.step(...)``, and checks the probed run:

* the probe is a pure observer: parameters, ``.grad``, ``requires_grad``, optimizer state, buffers and the
  global RNG state end bit-identical to the unprobed run;
* every record matches an independent float64 reference at theta_t along the realized step Delta (loss,
  slope, curvature, ratio, gradient norm, step norm), or its ``flag`` says why it cannot ("mismatch",
  "error", "nonfinite"). Where the pattern allows it, the probe may instead raise a ``ValueError``
  before stepping, with parameters and optimizer state unchanged. A wrong value flagged ok is never allowed;
* where the pattern is one the probe must handle, every record matches the reference;
* ``rec.path`` is "generic" under ``path="generic"``, and ``rec.fallback`` is "" exactly when the fast path
  ran.

The references never call alphalib. They take the loss as the probe is given it (``loss_fn`` or the
objective) on what training really trained on, ``(1/k) * sum_i loss_fn(model(x_i), y_i)`` over the k batches
whose backward passes went into ``.grad``, as a function of one flat float64 vector through
:func:`torch.func.functional_call`. It is taken at the parameters just before the step, and the RNG state
saved just before the training forward pass is replayed inside ``fork_rng``, so dropout draws the training
step's masks. Delta' H Delta comes from ``torch.autograd.functional.hvp``. For the GGN, J Delta comes from
``jvp`` and the Hessian of the loss in the output from ``hessian``; the secant comes from two loss values.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

import alphalib

STEPS = 4
PATHS = ("auto", "fast", "generic")
#: Flags that say a record's values are not to be trusted, and why.
UNTRUSTED = ("mismatch", "error", "nonfinite")
#: Relative tolerance of curvature and ratio per backend (float64); loss, slope and norms are exact.
TOL = {"hessian": 1e-8, "ggn": 1e-8, "secant": 1e-8, "fd": 1e-6, "fd_onesided": 1e-4}
EXACT = 1e-8


class Refused(Exception):
    """The probe raised ``ValueError`` before stepping (parameters and optimizer state checked unchanged)."""


# --------------------------------------------------------------------------------------------------------------
# One run of a training loop


@dataclass
class Step:
    """One probed step: its record and what the reference needs."""

    record: object
    trained: list  # the (inputs, targets) pairs whose losses training averaged on this step
    rng: Tensor | None  # global RNG state just before the training forward pass
    before: list[Tensor]  # parameters just before the step (theta_t)
    after: list[Tensor]  # parameters just after it (theta_{t+1})
    trainable: list[bool]  # requires_grad of each parameter at the step
    lr: float  # first param group's lr


class Loop:
    """What a pattern's ``loop`` sees: the model, the optimizer, and ``step`` in place of ``optimizer.step``.

    ``probe`` is ``None`` for the unprobed run, where ``step`` calls ``optimizer.step()`` itself.
    """

    def __init__(self, pattern: Pattern, model: nn.Module, opt: torch.optim.Optimizer, probe):
        self.pattern, self.model, self.opt, self.probe = pattern, model, opt, probe
        self.rng: Tensor | None = None
        self.steps: list[Step] = []

    def loss(self, batch) -> Tensor:
        """The training loss of one batch, as the pattern writes it."""
        if self.pattern.objective is not None:
            return self.pattern.objective(self.model, batch)
        x, y = batch
        return self.pattern.loss_fn(self.model(x), y)

    def forward_backward(self, batch, scale: float | None = None) -> Tensor:
        """The usual training forward and backward; remembers the RNG state the forward pass started from."""
        self.rng = torch.get_rng_state()
        loss = self.loss(batch)
        (loss if scale is None else scale * loss).backward()
        return loss

    def step(self, batch, *, trained: list | None = None, closure: Callable | None = None) -> None:
        """``optimizer.step()`` unprobed, else ``probe.step(batch)``. ``trained``: the pairs training used."""
        if self.probe is None:
            self.opt.step() if closure is None else self.opt.step(closure)
            return
        before = _params(self.model)
        opt_state = copy.deepcopy(self.opt.state_dict())
        try:
            rec = self.probe.step(batch) if closure is None else self.probe.step(batch, closure=closure)
        except ValueError as exc:
            assert all(map(torch.equal, before, _params(self.model))), f"ValueError after stepping: {exc}"
            assert _same(opt_state, self.opt.state_dict()), f"ValueError after the optimizer state changed: {exc}"
            raise Refused(str(exc)) from exc
        lr = float(self.opt.param_groups[0]["lr"])
        trainable = [p.requires_grad for p in self.model.parameters()]
        trained = [batch] if trained is None else trained
        self.steps.append(Step(rec, trained, self.rng, before, _params(self.model), trainable, lr))


def _params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------------------------------------------
# The loops (one training step each; ``pairs`` are this step's batches)


def plain(run: Loop, t: int, pairs: list) -> None:
    run.opt.zero_grad()
    run.forward_backward(pairs[0])
    run.step(pairs[0])


def extra_forward(run: Loop, t: int, pairs: list) -> None:
    run.opt.zero_grad()
    run.forward_backward(pairs[0])
    x_val, y_val = pairs[1]
    F.mse_loss(run.model(x_val), y_val).item()  # a metric, with grad enabled, never backpropagated
    run.step(pairs[0])


def extra_backward(run: Loop, t: int, pairs: list) -> None:
    run.opt.zero_grad()
    run.forward_backward(pairs[0])
    x2, y2 = pairs[1]  # e.g. a gradient-similarity diagnostic on another batch; .grad is untouched
    torch.autograd.grad(run.pattern.loss_fn(run.model(x2), y2), list(run.model.parameters()))
    run.step(pairs[0])


def sam(run: Loop, t: int, pairs: list, rho: float = 0.05) -> None:
    params = list(run.model.parameters())
    run.opt.zero_grad()
    run.forward_backward(pairs[0])
    with torch.no_grad():
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        eps = [rho * p.grad / norm for p in params]
        for p, e in zip(params, eps):
            p.add_(e)
    run.opt.zero_grad()
    run.forward_backward(pairs[0])  # the gradient at the perturbed point is the one the step uses
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.sub_(e)
    run.step(pairs[0])


def scaled(run: Loop, t: int, pairs: list) -> None:
    run.opt.zero_grad()
    run.forward_backward(pairs[0], scale=4.0)  # (4 * loss).backward(); the probe has the unscaled loss_fn
    run.step(pairs[0])


def accumulate(run: Loop, t: int, pairs: list, last_only: bool = False) -> None:
    run.opt.zero_grad()
    for batch in pairs:
        (run.loss(batch) / len(pairs)).backward()
    run.step(pairs[-1] if last_only else list(pairs), trained=list(pairs))


def accumulate_last_only(run: Loop, t: int, pairs: list) -> None:
    accumulate(run, t, pairs, last_only=True)


def clip(run: Loop, t: int, pairs: list) -> None:
    run.opt.zero_grad()
    run.forward_backward(pairs[0])
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1e-3)
    run.step(pairs[0])


def penalized(run: Loop, t: int, pairs: list) -> None:
    """A weight penalty added to the loss but not to the probe's loss_fn: the probe measures loss_fn."""
    run.opt.zero_grad()
    run.rng = torch.get_rng_state()
    x, y = pairs[0]
    penalty = sum(p.square().sum() for p in run.model.parameters() if p.requires_grad)
    (run.pattern.loss_fn(run.model(x), y) + 1e-2 * penalty).backward()
    run.step(pairs[0])


def swapped(run: Loop, t: int, pairs: list) -> None:
    run.opt.zero_grad()
    run.forward_backward(pairs[0])
    x, y = pairs[0]
    run.step((y, x), trained=[pairs[0]])


def inner_call(run: Loop, t: int, pairs: list) -> None:
    """Training calls the model a wrapper holds; the probe was given the wrapper (its dropout mask is unseen)."""
    run.opt.zero_grad()
    run.rng = torch.get_rng_state()
    x, y = pairs[0]
    run.pattern.loss_fn(run.model.inner(x), y).backward()
    run.step(pairs[0])


def freeze_unfreeze(run: Loop, t: int, pairs: list) -> None:
    if t == 1:  # after the first step
        run.model[0].requires_grad_(True)
    if t == 2:  # after the second step
        run.model[4].requires_grad_(False)
    plain(run, t, pairs)


def autocast(run: Loop, t: int, pairs: list) -> None:
    run.opt.zero_grad()
    run.rng = torch.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = run.loss(pairs[0])
    loss.backward()
    run.step(pairs[0])


def lbfgs(run: Loop, t: int, pairs: list) -> None:
    def closure():
        run.opt.zero_grad()
        loss = run.loss(pairs[0])
        loss.backward()
        return loss

    run.step(pairs[0], closure=closure)


# --------------------------------------------------------------------------------------------------------------
# Models, objectives, optimizers


def mlp(d_in: int = 4, d_out: int = 2) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, 6), nn.Tanh(), nn.Linear(6, d_out))


def square_mlp() -> nn.Module:
    return mlp(4, 4)


def dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 2))


def reused_dropout() -> nn.Module:
    drop = nn.Dropout(0.3)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), drop, nn.Linear(6, 6), nn.Tanh(), drop, nn.Linear(6, 2))


def conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 2, 2), nn.Tanh(), nn.Dropout(0.2), nn.Flatten(), nn.Linear(8, 2))


class _Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = dropout_mlp()

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


class _Functional(nn.Module):
    """Functional calls, a module used twice and functional dropout: the fast path follows its recorded ops."""

    def __init__(self, p: float = 0.2):
        super().__init__()
        self.fc1, self.fc2, self.act, self.p = nn.Linear(4, 6), nn.Linear(6, 2), nn.Tanh(), p

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.fc1(x))
        return self.fc2(h + F.dropout(self.act(h), self.p, self.training))


def functional_without_dropout() -> nn.Module:  # the reference replays one RNG state per step, not per micro-batch
    return _Functional(p=0.0)


def deep_mlp_first_frozen() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    model[0].requires_grad_(False)
    return model


def grad_norm_penalty(model: nn.Module, batch, lam: float = 0.1) -> Tensor:
    x, y = batch
    loss = F.mse_loss(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    return loss + lam * sum(g.square().sum() for g in grads)


def weight_penalty(model: nn.Module, batch) -> Tensor:
    x, y = batch
    return F.mse_loss(model(x), y) + 1e-2 * sum(p.square().sum() for p in model.parameters())


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def lbfgs_opt(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)


def reversed_groups(model: nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())[::-1]
    return torch.optim.Adam([{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-3}])


# --------------------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Pattern:
    """One way of writing a training step, and what the probe must make of it.

    ``expect``: "value": on the backends in ``exact`` every record matches the reference (elsewhere the probe
    may also flag or raise); "reject": the probe raises ValueError before stepping or flags "mismatch";
    "value_or_flag": no ValueError and no "error" flag, and each record matches or names its reason.
    """

    model: Callable[[], nn.Module]
    loop: Callable[[Loop, int, list], None]
    loss_fn: Callable | None = F.mse_loss
    objective: Callable | None = None  # fn(model, batch) -> scalar; the probe gets alphalib.objective(fn)
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] = adam
    x_shape: tuple[int, ...] = (8, 4)
    y_shape: tuple[int, ...] = (8, 2)
    per_step: int = 1  # batches drawn for each step (training batch first)
    dtype: torch.dtype = torch.float64
    channels_last: bool = False
    expect: str = "value"
    exact: tuple[str, ...] = alphalib.BACKENDS
    auto_path: str | None = None  # the path path="auto" must take, where the table fixes it
    fast_path: str | None = None  # the path path="fast" must take, where the table fixes it
    tol: float | None = None  # one tolerance for every quantity (the float32 case)

    def must_match(self, backend: str) -> bool:
        return self.expect == "value" and backend in self.exact

    def may_raise(self, backend: str) -> bool:
        return self.expect == "reject" or (self.expect == "value" and backend not in self.exact)


PATTERNS: dict[str, Pattern] = {
    "plain": Pattern(mlp, plain, auto_path="fast", fast_path="fast"),
    "extra-forward": Pattern(mlp, extra_forward, per_step=2, auto_path="generic"),
    "extra-forward-dropout": Pattern(dropout_mlp, extra_forward, per_step=2),
    "extra-backward": Pattern(mlp, extra_backward, per_step=2),
    "grad-penalty": Pattern(mlp, plain, loss_fn=None, objective=grad_norm_penalty, exact=("hessian", "fd")),
    "sam": Pattern(mlp, sam),
    "scaled-loss": Pattern(mlp, scaled),
    "accumulate": Pattern(mlp, accumulate, per_step=3),
    "accumulate-last-only": Pattern(mlp, accumulate_last_only, per_step=3, expect="reject"),
    "clip": Pattern(mlp, clip),
    "weight-penalty": Pattern(mlp, plain, loss_fn=None, objective=weight_penalty),
    "penalty-outside-loss_fn": Pattern(mlp, penalized),
    "swapped-batch": Pattern(square_mlp, swapped, y_shape=(8, 4), expect="reject"),
    "reused-dropout": Pattern(reused_dropout, plain),
    "channels-last": Pattern(conv, plain, x_shape=(6, 2, 3, 3), y_shape=(6, 2), channels_last=True),
    "inner-model-called": Pattern(_Wrapper, inner_call, expect="reject"),
    "ops-plain": Pattern(_Functional, plain, fast_path="fast"),
    "ops-scaled-loss": Pattern(_Functional, scaled, fast_path="fast"),
    "ops-clip": Pattern(_Functional, clip, fast_path="fast"),
    "ops-extra-backward": Pattern(_Functional, extra_backward, per_step=2, fast_path="generic"),
    "ops-sam": Pattern(_Functional, sam),
    "ops-accumulate": Pattern(functional_without_dropout, accumulate, per_step=3),
    "ops-autocast": Pattern(_Functional, autocast, dtype=torch.float32, expect="value_or_flag", tol=1e-3),
    "freeze-unfreeze": Pattern(deep_mlp_first_frozen, freeze_unfreeze),
    "autocast": Pattern(mlp, autocast, dtype=torch.float32, expect="value_or_flag", tol=1e-3),
    "lbfgs": Pattern(mlp, lbfgs, optimizer=lbfgs_opt),
    "group-order": Pattern(mlp, plain, optimizer=reversed_groups),
}


# --------------------------------------------------------------------------------------------------------------
# Running a pattern


@dataclass
class Run:
    loop: Loop
    refused: str | None  # the ValueError's message, if the probe refused a step


def _data(pattern: Pattern) -> list[list[tuple[Tensor, Tensor]]]:
    gen = torch.Generator().manual_seed(1)

    def draw(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(pattern.dtype)

    steps = []
    for _ in range(STEPS):
        pairs = []
        for _ in range(pattern.per_step):
            x, y = draw(pattern.x_shape), draw(pattern.y_shape)
            pairs.append((x.to(memory_format=torch.channels_last) if pattern.channels_last else x, y))
        steps.append(pairs)
    return steps


def _setup(pattern: Pattern) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = pattern.model().to(pattern.dtype).train()
    if pattern.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, pattern.optimizer(model)


def _probe_target(pattern: Pattern):
    return pattern.loss_fn if pattern.objective is None else alphalib.objective(pattern.objective)


def _train(pattern: Pattern, **probe_kw) -> Run:
    """Run the pattern's loop for ``STEPS`` steps; with ``probe_kw`` through an ``AlphaProbe``."""
    model, opt = _setup(pattern)
    probe = alphalib.AlphaProbe(model, _probe_target(pattern), opt, **probe_kw) if probe_kw else None
    run = Loop(pattern, model, opt, probe)
    try:
        for t, pairs in enumerate(_data(pattern)):
            pattern.loop(run, t, pairs)
    except Refused as exc:
        return Run(run, str(exc))
    return Run(run, None)


def _final_state(run: Loop) -> dict:
    return {
        "parameters and buffers": {k: v.clone() for k, v in run.model.state_dict().items()},
        ".grad": [None if p.grad is None else p.grad.clone() for p in run.model.parameters()],
        "requires_grad": [p.requires_grad for p in run.model.parameters()],
        "optimizer state": copy.deepcopy(run.opt.state_dict()),
        "global RNG state": torch.get_rng_state(),
    }


_UNPROBED: dict[str, dict] = {}


def _unprobed(name: str) -> dict:
    if name not in _UNPROBED:
        _UNPROBED[name] = _final_state(_train(PATTERNS[name]).loop)
    return _UNPROBED[name]


def _same(a, b) -> bool:
    """Bit-identical, recursively through dicts, lists and tuples (optimizer state_dicts)."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


# --------------------------------------------------------------------------------------------------------------
# The reference


@dataclass(frozen=True)
class Reference:
    loss: float  # L_B(theta_t)
    slope: float  # Delta' g
    curvature: float  # Delta' H Delta by the backend's definition
    grad_norm: float  # ||g|| over the parameters that require grad at the step
    step_norm: float  # ||Delta||


class _Objective(nn.Module):
    """``objective(model, batch)`` as a module, so that functional_call swaps the parameters it sees."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.m, self.fn = model, fn

    def forward(self, batch):
        return self.fn(self.m, batch)


def reference(pattern: Pattern, step: Step, backend: str) -> Reference:
    """The float64 reference of one step (see the module docstring)."""
    with torch.random.fork_rng(devices=[]):
        model64 = pattern.model().double()  # the same architecture without the probe's hooks; parameters come below
    named = list(model64.named_parameters())
    names, shapes, sizes = [n for n, _ in named], [p.shape for _, p in named], [p.numel() for _, p in named]
    theta0 = torch.cat([p.reshape(-1) for p in step.before]).double()
    theta1 = torch.cat([p.reshape(-1) for p in step.after]).double()
    delta = theta1 - theta0
    pairs = [tuple(t.double() if t.is_floating_point() else t for t in pair) for pair in step.trained]

    def state(theta: Tensor, prefix: str = "") -> dict[str, Tensor]:
        return {prefix + n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes)}

    @contextlib.contextmanager
    def replay():
        with torch.random.fork_rng(devices=[]):
            if step.rng is not None:
                torch.set_rng_state(step.rng)
            yield

    def output(theta: Tensor, x: Tensor) -> Tensor:
        with replay():
            return functional_call(model64, state(theta), (x,))

    def loss(theta: Tensor) -> Tensor:
        total = 0
        for pair in pairs:
            if pattern.objective is None:
                total = total + pattern.loss_fn(output(theta, pair[0]), pair[1])
            else:
                with replay():
                    total = total + functional_call(_Objective(model64, pattern.objective), state(theta, "m."), (pair,))
        return total / len(pairs)

    with torch.enable_grad():
        theta = theta0.clone().requires_grad_(True)  # also where nothing is differentiated: objectives call autograd
        value = loss(theta)
        (g,) = torch.autograd.grad(value, theta)
        slope = delta @ g
        if backend in ("hessian", "fd", "fd_onesided"):
            curvature = delta @ torch.autograd.functional.hvp(loss, theta0, delta)[1]
        elif backend == "ggn":
            curvature = 0
            for x, y in pairs:
                out = output(theta0, x).detach()
                jd = torch.autograd.functional.jvp(lambda th: output(th, x), theta0, delta)[1].reshape(-1)
                h_out = torch.autograd.functional.hessian(lambda o: pattern.loss_fn(o.view_as(out), y), out.reshape(-1))
                curvature = curvature + jd @ h_out @ jd / len(pairs)
        elif backend == "secant":
            end = loss(theta1.clone().requires_grad_(True))
            curvature = 2 * (end - value - slope)
        else:
            raise AssertionError(backend)
    trained = torch.cat([torch.full((n,), t) for n, t in zip(sizes, step.trainable)])
    numbers = (value, slope, curvature, g[trained].norm(), delta.norm())
    return Reference(*(float(torch.as_tensor(v).detach()) for v in numbers))


def _rel(got: float, want: float) -> float:
    if math.isnan(got) or math.isnan(want):
        return 0.0 if math.isnan(got) and math.isnan(want) else math.inf
    return abs(got - want) / max(abs(want), 1e-300)


def _check_values(rec, ref: Reference, lr: float, backend: str, tol: float | None) -> list[str]:
    """Return what in ``rec`` does not match ``ref``, one line per quantity."""
    want = {
        "loss": ref.loss, "slope": ref.slope / lr, "curvature": ref.curvature / lr**2,
        "ratio": -ref.slope / ref.curvature, "alpha_star": -ref.slope / ref.curvature * lr,
        "grad_norm": ref.grad_norm, "step_norm": ref.step_norm, "lr": lr,
    }
    wrong = []
    for key, value in want.items():
        bound = tol if tol is not None else (TOL[backend] if key in ("curvature", "ratio", "alpha_star") else EXACT)
        err = _rel(getattr(rec, key), value)
        if not err <= bound:
            wrong.append(f"{key}={getattr(rec, key)!r} vs reference {value!r} (rel err {err:.1e} > {bound:g})")
    return wrong


# --------------------------------------------------------------------------------------------------------------
# The test


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", alphalib.BACKENDS)
@pytest.mark.parametrize("name", list(PATTERNS))
def test_training_loop(name, backend, path):
    pattern = PATTERNS[name]
    if pattern.objective is not None and (backend == "ggn" or path == "fast"):  # both need loss_fn(model(x), y)
        model, opt = _setup(pattern)
        with pytest.raises(ValueError):
            alphalib.AlphaProbe(model, _probe_target(pattern), opt, curvature=backend, path=path)
        return

    run = _train(pattern, curvature=backend, path=path)
    if run.refused is not None:
        assert pattern.may_raise(backend), f"the probe refused a step this loop must measure: {run.refused}"
    else:
        assert len(run.loop.steps) == STEPS
        want, got = _unprobed(name), _final_state(run.loop)
        changed = [key for key in want if not _same(want[key], got[key])]
        assert not changed, f"the probe changed training: {changed} differ from the unprobed run"
    if pattern.expect == "reject":  # every step it measured (if any, before refusing) says "mismatch"
        assert all("mismatch" in s.record.flag for s in run.loop.steps), (
            f"the probe measured a batch training did not use without flagging 'mismatch': "
            f"{[s.record.flag for s in run.loop.steps]}"
        )

    problems = []
    for step in run.loop.steps:
        rec, where = step.record, f"step {step.record.step}"
        flags = rec.flag.split("|")
        untrusted = [f for f in UNTRUSTED if f in flags]
        if path == "generic" and rec.path != "generic":
            problems.append(f"{where}: path={rec.path!r} under path='generic'")
        expected = {"auto": pattern.auto_path, "fast": pattern.fast_path}.get(path)
        if expected is not None and rec.path != expected:
            problems.append(f"{where}: path={rec.path!r}, expected {expected!r} under path={path!r}")
        if (rec.fallback == "") != (rec.path == "fast"):
            problems.append(f"{where}: path={rec.path!r} with fallback={rec.fallback!r}")
        if untrusted and pattern.must_match(backend):
            problems.append(f"{where}: flag={rec.flag!r} on a loop the probe must measure (fallback={rec.fallback!r})")
        if "error" in flags and pattern.expect == "value_or_flag":
            problems.append(f"{where}: flag='error'")
        if not untrusted:
            wrong = _check_values(rec, reference(pattern, step, backend), step.lr, backend, pattern.tol)
            problems += [f"{where} (flag={rec.flag!r}, path={rec.path!r}): {w}" for w in wrong]
    assert not problems, "\n".join(problems)
