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
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.utils import prune as _prune  # noqa: F401  (torch.nn.utils.prune is a submodule)

import alphalib

STEPS = 4
PATHS = ("auto", "fast", "generic")
#: Flags that say a record's values are not to be trusted, and why.
UNTRUSTED = ("mismatch", "error", "nonfinite", "imprecise")
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
    snapshot: nn.Module | None = None  # the model just before the training forward (state references)


class Loop:
    """What a pattern's ``loop`` sees: the model, the optimizer, and ``step`` in place of ``optimizer.step``.

    ``probe`` is ``None`` for the unprobed run, where ``step`` calls ``optimizer.step()`` itself.
    """

    def __init__(self, pattern: Pattern, model: nn.Module, opt: torch.optim.Optimizer, probe):
        self.pattern, self.model, self.opt, self.probe = pattern, model, opt, probe
        self.rng: Tensor | None = None
        self.snapshot: nn.Module | None = None  # the model just before the training forward (state references)
        self.kept: dict = {}  # what a loop keeps from one step to the next
        self.steps: list[Step] = []

    def loss(self, batch) -> Tensor:
        """The training loss of one batch, as the pattern writes it."""
        if self.pattern.objective is not None:
            return self.pattern.objective(self.model, batch)
        x, y = batch
        return self.pattern.loss_fn(self.model(x), y)

    def forward_backward(self, batch, scale: float | None = None) -> Tensor:
        """The usual training forward and backward; remembers the RNG state the forward pass started from."""
        if self.pattern.state_reference:
            self.snapshot = _copy(self.model)
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
        self.steps.append(Step(rec, trained, self.rng, before, _params(self.model), trainable, lr, self.snapshot))


def _copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also where a module holds a tensor its last forward computed (pruning's weight)."""
    memo = {
        id(v): v.detach().clone()
        for m in model.modules()
        for v in vars(m).values()
        if isinstance(v, Tensor) and v.grad_fn is not None
    }
    return copy.deepcopy(model, memo)


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
        for p, e in zip(params, eps, strict=True):
            p.add_(e)
    run.opt.zero_grad()
    run.forward_backward(pairs[0])  # the gradient at the perturbed point is the one the step uses
    with torch.no_grad():
        for p, e in zip(params, eps, strict=True):
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
# The function that trained: code where "the loss at theta_t" is not the modules' textbook function, or where a
# fresh call of the model at probe.step would evaluate another one. Their reference is taken on a copy of the model
# made just before the training forward (its hooks, parametrizations, buffers, modes), with that forward's random
# draws replayed, by forward-mode AD only (see ``state_reference``).


def eval_between(run: Loop, t: int, pairs: list) -> None:
    """A validation metric (or a callback) switches the model to eval mode between backward and the step."""
    run.opt.zero_grad()
    run.forward_backward(pairs[0])
    run.model.eval()
    with torch.no_grad():
        x_val, y_val = pairs[1]
        F.mse_loss(run.model(x_val), y_val).item()
    run.step(pairs[0])
    run.model.train()


def noisy_mse(out: Tensor, y: Tensor) -> Tensor:
    """MSE against labels with fresh noise: a loss_fn that draws from the global RNG."""
    return F.mse_loss(out, y + 0.1 * torch.randn_like(y))


def pruned() -> nn.Module:
    model = mlp()
    _prune.l1_unstructured(model[0], "weight", amount=0.4)  # weight = weight_orig * weight_mask
    return model


def old_weight_norm() -> nn.Module:
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(model[0])  # a pre-hook recomputes weight from weight_g, weight_v
    return model


def param_weight_norm() -> nn.Module:
    model = mlp()
    torch.nn.utils.parametrizations.weight_norm(model[0])
    return model


def spectral_norm_old() -> nn.Module:
    model = mlp()
    torch.nn.utils.spectral_norm(model[0])  # a pre-hook: weight = weight_orig / sigma, u and v updated in place
    return model


def spectral_norm_parametrized() -> nn.Module:
    model = mlp()
    torch.nn.utils.parametrizations.spectral_norm(model[2])
    return model


def _affine(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
    return out * 0.5 + 0.1


def _square_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0] ** 2,)


def _triple_grad_input(module: nn.Module, grad_input: tuple, grad_output: tuple) -> tuple:
    return (grad_input[0] * 3,)


def hooked(index: int, register: str, hook: Callable) -> Callable[[], nn.Module]:
    """An MLP whose module ``index`` gets ``hook`` through ``module.<register>(hook)``."""

    def build() -> nn.Module:
        model = mlp()
        getattr(model[index], register)(hook)
        return model

    return build


class _Bag(nn.Module):
    """Token ids -> embeddings with gradients scaled by frequency -> a Linear head."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Linear(9, 2)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(ids)).flatten(1))


def batch_norm_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))


class _RunningShift(nn.Module):
    """Subtracts a running mean of its input that it updates in place after reading it (as running normalisers do)."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("shift", torch.full((width,), 0.5))

    def forward(self, x: Tensor) -> Tensor:
        out = x - self.shift
        if self.training:
            with torch.no_grad():
                self.shift.mul_(0.5).add_(0.5 * x.mean(0))
        return out


def running_shift() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), _RunningShift(6), nn.Tanh(), nn.Linear(6, 2))


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.fc1, self.block, self.fc2 = nn.Linear(4, 6), nn.Sequential(nn.Linear(6, 6), nn.Tanh()), nn.Linear(6, 2)
        self.reentrant, self.checkpointing = reentrant, True

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc1(x))
        if not self.checkpointing:  # (the reference's copy: the same function, without recomputation)
            return self.fc2(self.block(h))
        return self.fc2(torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.reentrant))


def checkpointed() -> nn.Module:
    return _Checkpointed(reentrant=False)


def checkpointed_reentrant() -> nn.Module:
    return _Checkpointed(reentrant=True)


def fitted(run: Loop, t: int, pairs: list) -> None:
    """Fit the batch unprobed at lr 0.1 (the loss falls to 2e-6, near float32's resolution), then go on at 1e-3."""
    if t == 0:
        run.kept["batch"] = pairs[0]  # every step trains on it
        for _ in range(400):
            run.opt.zero_grad()
            run.loss(pairs[0]).backward()
            run.opt.step()
        for group in run.opt.param_groups:
            group["lr"] = 1e-3
    plain(run, t, [run.kept["batch"]])


def classifier() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


class _Encoder(nn.Module):
    """torch's own nn.TransformerEncoder (attention and feed-forward dropout, GELU: smooth, so that the reference's
    central differences do not straddle ReLU's kinks) between two Linear layers."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, batch_first=True, activation="gelu")
        self.inp, self.enc, self.out = nn.Linear(4, 8), nn.TransformerEncoder(layer, 2), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.enc(self.inp(x).unsqueeze(1).expand(-1, 3, -1)).mean(1))


def encoder_hooked() -> nn.Module:
    model = _Encoder()
    model.enc.layers[0].register_forward_hook(_scale_output)
    return model


def _scale_output(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
    return out * 0.9


def orthogonal() -> nn.Module:
    model = square_mlp()
    torch.nn.utils.parametrizations.orthogonal(model[2])
    return model


def sgd(lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda model: torch.optim.SGD(model.parameters(), lr=lr)


def adam_at(lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda model: torch.optim.Adam(model.parameters(), lr=lr)


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
    ids: int = 0  # > 0: the inputs are token ids below this
    classes: int = 0  # > 0: the targets are class indices below this
    #: the reference is taken on a copy of the model made just before the training forward, by forward-mode AD
    state_reference: bool = False

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
    # the function that trained
    "prune": Pattern(pruned, plain, state_reference=True),
    "spectral-norm-old": Pattern(spectral_norm_old, plain, state_reference=True),
    "spectral-norm-parametrized": Pattern(spectral_norm_parametrized, plain, state_reference=True),
    "weight-norm-old": Pattern(old_weight_norm, plain, state_reference=True),
    "weight-norm-parametrized": Pattern(param_weight_norm, plain, state_reference=True),
    "orthogonal-parametrization": Pattern(orthogonal, plain, y_shape=(8, 4), state_reference=True),
    "forward-hook": Pattern(hooked(1, "register_forward_hook", _affine), plain, state_reference=True),
    "forward-pre-hook": Pattern(hooked(2, "register_forward_pre_hook", _square_input), plain, state_reference=True),
    # (on the last Linear: it scales the error passed back to the layers below)
    "backward-hook-linear": Pattern(
        hooked(2, "register_full_backward_hook", _triple_grad_input), plain, state_reference=True
    ),
    "backward-hook-activation": Pattern(
        hooked(1, "register_full_backward_hook", _triple_grad_input), plain, state_reference=True
    ),
    "embedding-scale-grad-by-freq": Pattern(_Bag, plain, x_shape=(8, 3), ids=5, state_reference=True),
    "eval-between-batchnorm": Pattern(batch_norm_mlp, eval_between, per_step=2, state_reference=True),
    "eval-between-dropout": Pattern(dropout_mlp, eval_between, per_step=2, state_reference=True),
    "encoder-eval-between": Pattern(_Encoder, eval_between, per_step=2, state_reference=True),
    "encoder-hooked": Pattern(encoder_hooked, plain, state_reference=True),
    "buffer-read-then-updated": Pattern(running_shift, plain, state_reference=True),
    # the generic path cannot evaluate a checkpointed model at other parameters: it flags "error", and says why
    "checkpoint": Pattern(checkpointed, plain, state_reference=True, expect="flag"),
    "checkpoint-reentrant": Pattern(checkpointed_reentrant, plain, state_reference=True, expect="flag"),
    "random-loss_fn": Pattern(mlp, plain, loss_fn=noisy_mse, state_reference=True),
    "random-loss_fn-dropout": Pattern(dropout_mlp, plain, loss_fn=noisy_mse, state_reference=True),
    "float32-lr-1e-7": Pattern(
        mlp, plain, optimizer=adam_at(1e-7), dtype=torch.float32, state_reference=True, expect="value_or_flag", tol=1e-3
    ),
    "float32-lr-1e-2": Pattern(
        mlp, plain, optimizer=adam_at(1e-2), dtype=torch.float32, state_reference=True, expect="value_or_flag", tol=1e-3
    ),
    "float32-lr-1e-5": Pattern(
        mlp, plain, optimizer=adam_at(1e-5), dtype=torch.float32, state_reference=True, expect="value_or_flag", tol=1e-3
    ),
    "float32-fitted-batch": Pattern(
        classifier,
        fitted,
        loss_fn=F.cross_entropy,
        optimizer=adam_at(0.1),
        dtype=torch.float32,
        y_shape=(8,),
        classes=3,
        state_reference=True,
        expect="value_or_flag",
        tol=1e-3,
    ),
    "lr-1e160": Pattern(mlp, plain, optimizer=sgd(1e160), state_reference=True, expect="value_or_flag"),
    "lr-1e300": Pattern(mlp, plain, optimizer=sgd(1e300), state_reference=True, expect="value_or_flag"),
}


# --------------------------------------------------------------------------------------------------------------
# Running a pattern


@dataclass
class Run:
    loop: Loop
    refused: str | None  # the ValueError's message, if the probe refused a step


def _data(pattern: Pattern) -> list[list[tuple[Tensor, Tensor]]]:
    gen = torch.Generator().manual_seed(1)

    def draw(shape, ids: int = 0):
        if ids:
            return torch.randint(ids, shape, generator=gen)
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(pattern.dtype)

    steps = []
    for _ in range(STEPS):
        pairs = []
        for _ in range(pattern.per_step):
            x, y = draw(pattern.x_shape, pattern.ids), draw(pattern.y_shape, pattern.classes)
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
        return (
            isinstance(b, Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and (torch.equal(a, b) or a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
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


def _flat(model64: nn.Module, step: Step) -> tuple[list, list, list, Tensor, Tensor, list]:
    """The parameters' names, shapes and sizes, θ_t and θ_{t+1} as flat float64 vectors; the trained pairs in
    float64."""
    named = list(model64.named_parameters())
    names, shapes, sizes = [n for n, _ in named], [p.shape for _, p in named], [p.numel() for _, p in named]
    theta0 = torch.cat([p.reshape(-1) for p in step.before]).double()
    theta1 = torch.cat([p.reshape(-1) for p in step.after]).double()
    pairs = [tuple(t.double() if t.is_floating_point() else t for t in pair) for pair in step.trained]
    return names, shapes, sizes, theta0, theta1, pairs


def reference(pattern: Pattern, step: Step, backend: str) -> Reference:
    """The float64 reference of one step (see the module docstring)."""
    with torch.random.fork_rng(devices=[]):
        model64 = pattern.model().double()  # the same architecture without the probe's hooks; parameters come below
    names, shapes, sizes, theta0, theta1, pairs = _flat(model64, step)
    delta = theta1 - theta0

    def state(theta: Tensor, prefix: str = "") -> dict[str, Tensor]:
        return {prefix + n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes, strict=True)}

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
                jd = torch.autograd.functional.jvp(lambda th, x=x: output(th, x), theta0, delta)[1].reshape(-1)
                h_out = torch.autograd.functional.hessian(
                    lambda o, out=out, y=y: pattern.loss_fn(o.view_as(out), y), out.reshape(-1)
                )
                curvature = curvature + jd @ h_out @ jd / len(pairs)
        elif backend == "secant":
            end = loss(theta1.clone().requires_grad_(True))
            curvature = 2 * (end - value - slope)
        else:
            raise AssertionError(backend)
    trained = torch.cat([torch.full((n,), t) for n, t in zip(sizes, step.trainable, strict=True)])
    numbers = (value, slope, curvature, g[trained].norm(), delta.norm())
    return Reference(*(float(torch.as_tensor(v).detach()) for v in numbers))


def reference_by_state(pattern: Pattern, step: Step, backend: str) -> Reference:
    """The float64 reference on a copy of the model as it was just before the training forward.

    The copy holds what that forward ran with: hooks, parametrizations, pruning masks, buffers (before any update
    the forward made), each module's train/eval mode; the forward's random draws (and those of a loss_fn that draws
    after it) are replayed. Its backward hooks and ``scale_grad_by_freq`` are removed (they change what reaches
    ``.grad``, not the loss), and checkpointing is switched off (the same function, without recomputation). Only
    first-order autograd is used: the slope is the gradient along Delta, the curvature a central difference of
    that slope along Delta, Richardson-extrapolated; the GGN's J Delta is a difference of outputs likewise.
    """
    base = _copy(step.snapshot).double()
    for m in base.modules():
        m._backward_hooks.clear()
        m._backward_pre_hooks.clear()
        if isinstance(m, nn.Embedding):
            m.scale_grad_by_freq = False
        if hasattr(m, "checkpointing"):
            m.checkpointing = False
    names, shapes, sizes, theta0, theta1, pairs = _flat(base, step)
    delta = theta1 - theta0
    _hold_power_iterations(base, step.rng, pairs[0][0])

    def output(theta: Tensor, x: Tensor) -> Tensor:
        """The output on a fresh copy (buffers as before the forward); the caller replays the draws."""
        state = {n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes, strict=True)}
        return functional_call(_copy(base), state, (x,))

    def loss(theta: Tensor) -> Tensor:
        total = 0
        for x, y in pairs:
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(step.rng)  # the loss_fn draws after the forward, as in training
                total = total + pattern.loss_fn(output(theta, x), y)
        return total / len(pairs)

    def gradient(theta: Tensor) -> tuple[Tensor, Tensor]:
        theta = theta.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            value = loss(theta)
            return value.detach(), torch.autograd.grad(value, theta)[0]

    def richardson(f: Callable[[Tensor], Tensor], norm: Tensor) -> Tensor:
        """d/dh f(theta0 + h delta) at h = 0 by central differences, Richardson-extrapolated."""
        h = 1e-4 * (1 + theta0.norm()) / norm

        def central(h: Tensor) -> Tensor:
            return (f(theta0 + h * delta) - f(theta0 - h * delta)) / (2 * h)

        return (4 * central(h / 2) - central(h)) / 3

    value, g = gradient(theta0)
    slope0, norm = delta @ g, delta.norm()
    if not (torch.isfinite(norm) and norm > 0):
        curvature = torch.tensor(math.nan if not torch.isfinite(norm) else 0.0)
    elif backend == "secant":
        with torch.no_grad():
            curvature = 2 * (loss(theta1) - value - slope0)
    elif backend == "ggn":
        curvature = 0
        for x, y in pairs:

            def out_at(theta: Tensor) -> Tensor:
                with torch.random.fork_rng(devices=[]), torch.no_grad():
                    torch.set_rng_state(step.rng)
                    return output(theta, x)  # noqa: B023 (called in this iteration only)

            out, jd = out_at(theta0), richardson(out_at, norm)
            with torch.enable_grad():  # jd' (d^2 loss_fn / d out^2) jd: a loss_fn's noise shifts the targets only
                o = out.clone().requires_grad_(True)
                with torch.random.fork_rng(devices=[]):
                    (g_out,) = torch.autograd.grad(pattern.loss_fn(o, y), o, create_graph=True)
                (h_jd,) = torch.autograd.grad((g_out * jd).sum(), o)
            curvature = curvature + (h_jd * jd).sum() / len(pairs)
    else:
        curvature = richardson(lambda theta: delta @ gradient(theta)[1], norm)
    trained = torch.cat([torch.full((n,), t) for n, t in zip(sizes, step.trainable, strict=True)])
    numbers = (value, slope0, curvature, g[trained].norm(), norm)
    return Reference(*(float(torch.as_tensor(v).detach()) for v in numbers))


def _hold_power_iterations(base: nn.Module, rng: Tensor, x: Tensor) -> None:
    """spectral_norm updates u and v in place without gradient, then reads them: autograd held them at the values
    the training forward left. Replay that forward on a copy, give ``base`` its u and v, and stop the iteration."""
    units = [
        m
        for m in base.modules()
        if type(m).__name__ == "_SpectralNorm"
        or any(type(h).__name__ == "SpectralNorm" for h in m._forward_pre_hooks.values())
    ]
    if not units:
        return
    replay = _copy(base)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng)
        replay(x)
    after = dict(replay.named_buffers())
    with torch.no_grad():
        for name, b in base.named_buffers():
            if name.endswith(("_u", "_v")):
                b.copy_(after[name])
    for m in units:
        m.eval()  # uses u and v, runs no iteration


def _rel(got: float, want: float) -> float:
    if math.isnan(got) or math.isnan(want):
        return 0.0 if math.isnan(got) and math.isnan(want) else math.inf
    return abs(got - want) / max(abs(want), 1e-300)


def _check_values(rec, ref: Reference, lr: float, backend: str, tol: float | None, floor: float = 0.0) -> list[str]:
    """Return what in ``rec`` does not match ``ref``, one line per quantity."""
    want = {
        "loss": ref.loss,
        "slope": ref.slope / lr,
        "curvature": ref.curvature / lr**2,
        "ratio": -ref.slope / ref.curvature,
        "alpha_star": -ref.slope / ref.curvature * lr,
        "grad_norm": ref.grad_norm,
        "step_norm": ref.step_norm,
        "lr": lr,
    }
    wrong = []
    for key, value in want.items():
        bound = (
            tol
            if tol is not None
            else max(floor, TOL[backend] if key in ("curvature", "ratio", "alpha_star") else EXACT)
        )
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
        if (rec.fallback == "") != (rec.path == "fast") and "error" not in flags:  # (an error is named in fallback)
            problems.append(f"{where}: path={rec.path!r} with fallback={rec.fallback!r}")
        if untrusted and pattern.must_match(backend):
            problems.append(f"{where}: flag={rec.flag!r} on a loop the probe must measure (fallback={rec.fallback!r})")
        if "error" in flags and pattern.expect == "value_or_flag":
            problems.append(f"{where}: flag='error'")
        if not untrusted:
            ref = (reference_by_state if pattern.state_reference else reference)(pattern, step, backend)
            # (a central difference of the directional derivative is good to about 1e-8)
            wrong = _check_values(rec, ref, step.lr, backend, pattern.tol, 1e-6 if pattern.state_reference else 0)
            problems += [f"{where} (flag={rec.flag!r}, path={rec.path!r}): {w}" for w in wrong]
    assert not problems, "\n".join(problems)
