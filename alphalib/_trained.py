r"""What the training forward ran with, and what a fresh evaluation must restore to evaluate the same function.

The probe measures the loss that training differentiated. A fresh call of the model at ``probe.step`` evaluates
that function only if it runs with what the training forward ran with; this module holds those facts and the
one context that restores them for the probe's own evaluations:

* **modes**: each module's ``training`` flag at the training forward (a callback may call ``model.eval()``
  between ``backward()`` and ``probe.step``: BatchNorm would then use running statistics, Dropout nothing);
* **buffers**: their values when the forward *read* them, copied at its start (a module may update a buffer in
  place after reading it, as running normalisers do), and at its end for those it updates *before* reading them
  (spectral norm's power iteration, whose :math:`u`, :math:`v` autograd holds constant: :func:`power_iterations`);
* **random draws**: the RNG state at the start of the forward, and at its end for a ``loss_fn`` that draws
  (label noise), both replayed inside :func:`torch.random.fork_rng`, so the global stream is never advanced;
* **gradient-only modifiers**: module backward hooks, global backward hooks, ``Embedding(scale_grad_by_freq=
  True)``: they change what reaches ``.grad`` and the backward's errors, not the loss. The probe's own
  evaluations run with them switched off (:func:`as_trained`), and the fast path, which reuses that backward,
  is not taken (:func:`gradient_modifiers` says why);
* **the forward as written**: forward hooks and pre-hooks, parametrizations and pruning change the function a
  module computes; module rules know only the module's textbook forward, so they serve only where
  :func:`not_textbook` finds none of these (checked on every probed step). Recorded operations and the generic
  path see them, because they run inside ``module.__call__``.

Activation checkpointing recomputes a segment's forward during the backward with the module's *own* parameters;
a generic evaluation at other parameters (``functional_call``) would mix the two, so it runs with saved-tensor
hooks disabled and such a model fails there with a clear error (the record is flagged ``error``; the fast path,
which reuses the training step, measures it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm

from . import _ops

#: the message of the error a generic evaluation raises on a model that recomputes activations in its backward
CHECKPOINTED = (
    "the model recomputes activations during the backward pass (activation checkpointing), which "
    "would run on its own parameters, not on those the probe evaluates; this step is measured only on "
    "the fast path (curvature='hessian' or 'ggn', path='auto')"
)


def _ours(hook: object) -> bool:
    """Whether a module hook is one of alphalib's own (a probe's, a capture's)."""
    return type(hook).__module__.startswith("alphalib.")


def modes(model: nn.Module) -> tuple[bool, ...]:
    """Return each module's ``training`` flag, in ``model.modules()`` order."""
    return tuple(m.training for m in model.modules())


def buffers(model: nn.Module) -> dict[str, Tensor]:
    """Return copies of the model's buffers as they are now (at the start of a forward: the values it reads)."""
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def power_iterations(model: nn.Module) -> list[tuple[nn.Module, tuple[str, str]]]:
    """Return each module whose train mode runs torch's spectral-norm power iteration, with its u and v buffers.

    ``spectral_norm`` (old and parametrized) updates :math:`u` and :math:`v` in place, without gradient, and then
    reads them: autograd holds them constant, so the function that trained holds them at the values the forward
    left. :func:`as_trained` runs these modules in eval mode, which reads :math:`u` and :math:`v` and skips the
    iteration; the recorder keeps their values at the end of the forward.
    """
    units = []  # (module, u's name, v's name) within the module
    for m in model.modules():
        if isinstance(m, _ops.SpectralNormParametrization):
            units.append((m, "_u", "_v"))
        try:
            hooks = _ops.forward_hooks(m)
        except _ops.Unverified:  # (the probe refuses such a torch before stepping)
            hooks = []
        units += [(m, f"{h.name}_u", f"{h.name}_v") for h in hooks if isinstance(h, SpectralNorm)]
    if not units:  # (the common case: one pass, no names built)
        return []
    where = {m: f"{name}." if name else "" for name, m in model.named_modules()}
    return [(m, (where[m] + u, where[m] + v)) for m, u, v in units]


def read_after_update(model: nn.Module) -> dict[str, Tensor]:
    """Return copies of the buffers a forward updates and then reads (spectral norm's u, v), as they are now."""
    names = {n for _, pair in power_iterations(model) for n in pair}
    return {n: b.detach().clone() for n, b in model.named_buffers() if n in names} if names else {}


def not_textbook(model: nn.Module) -> str | None:
    """Return why some module's forward is not its class's textbook function (hooks, parametrizations, pruning),
    or ``None``."""
    try:
        if any(not _ours(h) for h in _ops.forward_hooks(None)):
            return "a global module forward hook is registered (torch.nn.modules.module.register_module_forward_hook)"
        for name, m in model.named_modules():
            if parametrize.is_parametrized(m):
                return f"{_where(name, m)} is parametrized (torch.nn.utils.parametrize)"
            if any(not _ours(h) for h in _ops.forward_hooks(m)):
                return f"{_where(name, m)} has a forward hook or pre-hook (pruning, weight_norm, a user's hook)"
            for attr in ("weight", "bias"):
                value = vars(m).get(attr)  # set on the module by pruning or the old weight_norm (not a buffer)
                if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
                    return f"{_where(name, m)}.{attr} is computed from other tensors, not a parameter"
    except _ops.Unverified as exc:
        return str(exc)
    return None


def _where(name: str, m: nn.Module) -> str:
    return f"{type(m).__name__}{f' ({name})' if name else ''}"


def gradient_modifiers(model: nn.Module) -> str | None:
    """Return what makes ``.grad`` (and the backward's errors) differ from the loss's own gradient, or ``None``."""
    try:
        if _ops.backward_hooks(None):
            return "a global module backward hook is registered"
        for name, m in model.named_modules():
            if _ops.backward_hooks(m):
                return f"{_where(name, m)} has a backward hook, which changes the gradient but not the loss"
            if vars(m).get("scale_grad_by_freq", False):
                return (
                    f"{_where(name, m)} scales its gradient by token frequency (scale_grad_by_freq), not the "
                    "loss's gradient"
                )
    except _ops.Unverified as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def as_trained(model: nn.Module, flags: Sequence[bool] | None = None) -> Iterator[None]:
    """Run the body with the modules in the modes ``flags`` (the training forward's), gradient-only modifiers
    off and saved-tensor hooks disabled; leave everything as it was after.

    What it switches never changes a forward's value: the modes are those the training forward ran in, the
    backward hooks and ``scale_grad_by_freq`` act on gradients only.
    """
    mods = list(model.modules())
    kept_modes = [m.training for m in mods]
    # (Any: the stub of nn.Module.__setattr__ takes only tensors and modules, not the bool set below)
    scaled: list[Any] = [m for m in mods if vars(m).get("scale_grad_by_freq", False)]
    try:
        if flags is not None:
            for m, flag in zip(mods, flags, strict=True):
                if m.training != flag:  # (nn.Module's __setattr__ is slow: set only what changes)
                    m.training = flag
        for m, _ in power_iterations(model):  # u and v held as the training forward left them
            m.training = False
        for m in scaled:
            m.scale_grad_by_freq = False
        with _ops.backward_hooks_off(mods), torch.autograd.graph.disable_saved_tensors_hooks(CHECKPOINTED):
            yield
    finally:
        for m, flag in zip(mods, kept_modes, strict=True):
            if m.training != flag:
                m.training = flag
        for m in scaled:
            m.scale_grad_by_freq = True
