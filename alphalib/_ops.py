r"""The private torch ops the fast path uses, each checked once against autograd before its first use.

The fast path (:mod:`alphalib.fast`) calls a few private
torch ops because they are the cheapest exact form of what it needs: ``aten.gelu_backward`` and
``aten.silu_backward`` (:math:`\sigma'(z)\,t`), ``native_layer_norm`` and its backward (:math:`\hat x` and its
Jacobian), ``aten._softmax_backward_data`` (the softmax Jacobian :math:`J_P`), the argmax that max pooling's
``grad_fn`` saves, and ``Conv._conv_forward`` (a convolution with other weights). Private ops carry no promise:
a torch upgrade may remove them or change their arguments or meaning silently. So each wrapper here, the first
time it is called in a process, compares its op on a tiny fixed float64 case with plain autograd (or the public
op it stands for) and from then on either calls the op or raises :class:`Unverified`, whose message names the
op and what went wrong; the probe then measures the step on the generic path. :func:`pool_indices` returns
``None`` instead: the max-pool rule recomputes the indices from the input, exactly. The checks draw no random
numbers and leave the caller's grad mode as it was.

Example:
    >>> verify_all()["gelu_backward"] is None
    True
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

TOLERANCE = 1e-12  #: largest relative disagreement with the reference accepted, in float64

_CHECKS: dict[str, tuple[str, str, str, Callable[[], float]]] = {}  # op -> (its call, reference, what is off, check)
_verdicts: dict[str, str | None] = {}  # op -> None (verified) or why not; each op is checked once per process


class Unverified(Exception):
    """A private torch op the fast path needs is missing, fails or disagrees with autograd in this torch."""


def _check(name: str, call: str, reference: str, off: str) -> Callable[[Callable[[], float]], Callable[[], float]]:
    """Register ``fn() -> relative error against reference`` as the check of op ``name``."""

    def deco(fn: Callable[[], float]) -> Callable[[], float]:
        _CHECKS[name] = (call, reference, off, fn)
        return fn

    return deco


def _verdict(name: str) -> str | None:
    """Return ``None`` if op ``name`` agrees with its reference, else a sentence saying why not (checked once)."""
    if name not in _verdicts:
        call, reference, off, fn = _CHECKS[name]
        where = f"in torch {torch.__version__}; {off}"
        try:
            with torch.inference_mode(False), torch.enable_grad():
                err = fn()
        except Exception as exc:  # AttributeError: the op is gone
            what = "is missing" if isinstance(exc, AttributeError) else "fails"
            detail = (str(exc).strip().splitlines() or [""])[0][:160].rstrip(":")
            _verdicts[name] = f"{call} {what} ({type(exc).__name__}: {detail}) {where}"
        else:
            _verdicts[name] = (
                None if err <= TOLERANCE else f"{call} disagrees with {reference} (relative error {err:.1e}) {where}"
            )
    return _verdicts[name]


def _require(name: str) -> None:
    if _verdicts.get(name, "") is None:  # verified (the common case, on hot paths)
        return
    reason = _verdict(name)
    if reason is not None:
        raise Unverified(reason)


def verify_all() -> dict[str, str | None]:
    """Check every op not checked yet; return op name -> ``None`` if verified, else why not."""
    return {name: _verdict(name) for name in _CHECKS}


def _fixed(*shape: int, phase: float = 0.0) -> Tensor:
    """Return fixed, distinct float64 values in [-3, 3] of ``shape`` (no random numbers drawn)."""
    return torch.arange(math.prod(shape), dtype=torch.float64).add_(1 + phase).mul_(2.3).sin_().mul_(3).view(shape)


def _rel(a: object, b: Tensor) -> float:
    r"""Return :math:`\|a - b\| / \|b\|`, infinite if ``a`` is no tensor of ``b``'s shape or the error is NaN."""
    if not isinstance(a, Tensor) or a.shape != b.shape:
        return math.inf
    err = ((a - b).norm() / b.norm()).item()
    return math.inf if math.isnan(err) else err


# ---- each op: its private call `_<name>_impl` (looked up when called: a test can swap it), check and wrapper ----


def _gelu_backward_impl(grad: Tensor, z: Tensor) -> Tensor:
    return torch.ops.aten.gelu_backward(grad, z)


def _silu_backward_impl(grad: Tensor, z: Tensor) -> Tensor:
    return torch.ops.aten.silu_backward(grad, z)


def _derivative_error(fn: Callable[[Tensor], Tensor], impl: Callable[[Tensor, Tensor], Tensor]) -> float:
    z, g = _fixed(2, 5).requires_grad_(True), _fixed(2, 5, phase=10)
    (d,) = torch.autograd.grad(fn(z).sum(), z)  # elementwise: the gradient of the sum is the derivative
    return _rel(impl(g, z.detach()), d * g)


@_check("gelu_backward", "torch.ops.aten.gelu_backward", "autograd", "the fast path is off for GELU")
def _check_gelu_backward() -> float:
    return _derivative_error(F.gelu, _gelu_backward_impl)


@_check("silu_backward", "torch.ops.aten.silu_backward", "autograd", "the fast path is off for SiLU")
def _check_silu_backward() -> float:
    return _derivative_error(F.silu, _silu_backward_impl)


def gelu_backward(grad: Tensor, z: Tensor) -> Tensor:
    r"""Return :math:`\mathrm{gelu}'(z)\,\mathrm{grad}` for the exact (erf) GELU."""
    _require("gelu_backward")
    return _gelu_backward_impl(grad, z)


def silu_backward(grad: Tensor, z: Tensor) -> Tensor:
    r"""Return :math:`\mathrm{silu}'(z)\,\mathrm{grad}`."""
    _require("silu_backward")
    return _silu_backward_impl(grad, z)


def _layer_norm_impl(x: Tensor, shape: Sequence[int], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return torch.native_layer_norm(x, shape, None, None, eps)


def _layer_norm_backward_impl(grad: Tensor, x: Tensor, shape: Sequence[int], mean: Tensor, rstd: Tensor) -> Tensor:
    return torch.ops.aten.native_layer_norm_backward(grad, x, shape, mean, rstd, None, None, [True, False, False])[0]


def _moments(x: Tensor, shape: Sequence[int], eps: float) -> tuple[Tensor, Tensor]:
    dims = tuple(range(-len(shape), 0))
    return x.mean(dims, keepdim=True), (x.var(dims, unbiased=False, keepdim=True) + eps).rsqrt()


@_check("layer_norm", "torch.native_layer_norm", "F.layer_norm", "the fast path is off for LayerNorm")
def _check_layer_norm() -> float:
    x, shape, eps = _fixed(2, 3, 4), (3, 4), 1e-5
    out, mean, rstd = _layer_norm_impl(x, shape, eps)
    ref_mean, ref_rstd = _moments(x, shape, eps)
    return max(_rel(out, F.layer_norm(x, shape, eps=eps)), _rel(mean, ref_mean), _rel(rstd, ref_rstd))


@_check(
    "layer_norm_backward", "torch.ops.aten.native_layer_norm_backward", "autograd", "the fast path is off for LayerNorm"
)
def _check_layer_norm_backward() -> float:
    x, g, shape, eps = _fixed(2, 3, 4).requires_grad_(True), _fixed(2, 3, 4, phase=30), (3, 4), 1e-5
    (ref,) = torch.autograd.grad(F.layer_norm(x, shape, eps=eps), x, g)
    x = x.detach()
    return _rel(_layer_norm_backward_impl(g, x, shape, *_moments(x, shape, eps)), ref)


def layer_norm(x: Tensor, shape: Sequence[int], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""Return :math:`\hat x = (x - \mu) r`, :math:`\mu` and :math:`r = 1/\sigma` over the last dims ``shape``.

    :math:`\mu` and :math:`r` keep the normalized dims with size 1, as :func:`layer_norm_backward` takes them.
    """
    _require("layer_norm")
    return _layer_norm_impl(x, shape, eps)


def layer_norm_backward(grad: Tensor, x: Tensor, shape: Sequence[int], mean: Tensor, rstd: Tensor) -> Tensor:
    r"""Return the vector-Jacobian product of :math:`x \mapsto \hat x` (LayerNorm without affine) with ``grad``."""
    _require("layer_norm_backward")
    return _layer_norm_backward_impl(grad, x, shape, mean, rstd)


def _softmax_backward_impl(grad: Tensor, p: Tensor, dim: int) -> Tensor:
    return torch.ops.aten._softmax_backward_data(grad, p, dim, p.dtype)


@_check("softmax_backward", "torch.ops.aten._softmax_backward_data", "autograd", "the fast path is off for attention")
def _check_softmax_backward() -> float:
    s, g = _fixed(2, 4, 4), _fixed(2, 4, 4, phase=40)
    causal = torch.full((4, 4), -math.inf, dtype=torch.float64).triu(1)  # masked rows, as in causal attention
    err = 0.0
    for z, dim in ((s + causal, -1), (s, 1)):
        z.requires_grad_(True)
        p = torch.softmax(z, dim)
        (ref,) = torch.autograd.grad(p, z, g)
        err = max(err, _rel(_softmax_backward_impl(g, p.detach(), dim), ref))
    return err


def softmax_backward(grad: Tensor, p: Tensor, dim: int) -> Tensor:
    r"""Return :math:`J_P\,\mathrm{grad} = P \odot (\mathrm{grad} - \langle P, \mathrm{grad}\rangle_{dim})`."""
    _require("softmax_backward")
    return _softmax_backward_impl(grad, p, dim)


def _pool_indices_impl(output: Tensor) -> object:
    node: Any = output.grad_fn  # (torch's stubs do not declare the saved tensors of autograd nodes)
    return node._saved_result1


@_check(
    "pool_indices",
    "the max-pool grad_fn's _saved_result1",
    "F.max_pool2d's indices",
    "max pooling recomputes its indices from the input",
)
def _check_pool_indices() -> float:
    x = _fixed(1, 2, 4, 6).requires_grad_(True)
    out, ref = F.max_pool2d(x, 2), F.max_pool2d(x.detach(), 2, return_indices=True)[1]
    idx = _pool_indices_impl(out)
    if not (isinstance(idx, Tensor) and idx.shape == ref.shape and torch.equal(idx, ref)):
        return math.inf
    return _rel(x.detach().flatten(-2).gather(-1, idx.flatten(-2)).view_as(out), out.detach())


def pool_indices(output: Tensor) -> Tensor | None:
    """Return the argmax autograd saved for a max pool's ``output``, or ``None`` (unverified, or none saved).

    ``None`` also for a pool whose ``grad_fn`` keeps no such indices (``max_pool1d``'s), or keeps them no more.
    """
    if output.grad_fn is None or _verdict("pool_indices") is not None:
        return None
    try:
        idx = _pool_indices_impl(output)
    except (AttributeError, RuntimeError):
        return None
    return idx if isinstance(idx, Tensor) and idx.shape == output.shape and idx.dtype == torch.int64 else None


def _conv_impl(m: nn.Conv1d | nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return m._conv_forward(x, weight, bias)


@_check("conv", "Conv._conv_forward", "the module's forward", "the fast path is off for convolutions")
def _check_conv() -> float:
    err = 0.0
    for cls, mode in itertools.product((nn.Conv1d, nn.Conv2d), ("zeros", "circular")):
        m = nn.utils.skip_init(cls, 2, 3, 3, padding=1, padding_mode=mode, dtype=torch.float64)  # no RNG drawn
        with torch.no_grad():
            m.weight.copy_(_fixed(*m.weight.shape))
            m.bias.copy_(_fixed(3, phase=50))
        x = _fixed(1, 2, *(5,) * (m.weight.dim() - 2), phase=60)
        ref, w, b = m(x), m.weight, m.bias
        bias = b.view(-1, *(1,) * (x.dim() - 2))
        err = max(err, _rel(_conv_impl(m, x, 2 * w, 2 * b), 2 * ref), _rel(_conv_impl(m, x, w, None), ref - bias))
    return err


def conv(m: nn.Conv1d | nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Return convolution module ``m`` applied to ``x`` with ``weight`` and ``bias`` in place of its own."""
    _require("conv")
    return _conv_impl(m, x, weight, bias)


# ---- second derivatives torch gets wrong: evaluate the function in a form whose double backward is right ------


def _weight_norm_composite(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    r""":math:`w = g\, v / \|v\|` (norm over all dims but ``dim``), from public ops with correct second derivatives."""
    return v * (g / torch.norm_except_dim(v, 2, dim))


def _weight_norm_double_backward_error() -> float:
    """Return the relative error of torch._weight_norm's second derivative against its composite form."""
    v, g, x = _fixed(3, 4), _fixed(3, 1, phase=70).abs() + 0.5, _fixed(5, 4, phase=80)
    dv, dg = _fixed(3, 4, phase=90), _fixed(3, 1, phase=100)

    def curvature(norm: Callable[[Tensor, Tensor, int], Tensor]) -> Tensor:
        vv, gg = v.clone().requires_grad_(True), g.clone().requires_grad_(True)
        loss = torch.tanh(x @ norm(vv, gg, 0).T).square().sum()
        gv, gg_ = torch.autograd.grad(loss, (vv, gg), create_graph=True)
        hv = torch.autograd.grad((gv * dv).sum() + (gg_ * dg).sum(), (vv, gg))
        return torch.cat([h.reshape(-1) for h in hv])

    return _rel(curvature(torch._weight_norm), curvature(_weight_norm_composite))


class _SecondOrder(torch.overrides.TorchFunctionMode):
    """Replace, above autograd, the functions whose double backward was found wrong by their composite forms."""

    def __init__(self, replace: dict[Callable, Callable]):
        super().__init__()
        self.replace = replace

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        return self.replace.get(func, func)(*args, **(kwargs or {}))


def second_order() -> contextlib.AbstractContextManager:
    """Return a context in which the functions torch differentiates twice wrongly run in a form it gets right.

    Torch 2.13's double backward of ``torch._weight_norm`` (``weight_norm``'s kernel, old and parametrized) is off
    by a few percent (the check above measures it); where the check passes, nothing is replaced.
    """
    global _replaced
    if _replaced is None:
        with torch.inference_mode(False), torch.enable_grad():
            wrong = not _weight_norm_double_backward_error() <= TOLERANCE
        _replaced = {torch._weight_norm: _weight_norm_composite} if wrong else {}
    return _SecondOrder(_replaced) if _replaced else contextlib.nullcontext()


_replaced: dict[Callable, Callable] | None = None  #: what :func:`second_order` replaces (found once per process)


# ---- torch internals the probe reads: version counters, hook tables, parameter slots, dispatch, foreach ----------
#
# Where one of these is missing or changed, the probe loses a proof, never a value: the fallbacks below make it
# conclude "changed", "hooked" or "not measurable here", so it measures on the generic path or flags the record.


def _version_impl(t: Tensor) -> int:
    return t._version


@_check("version", "Tensor._version", "an in-place write", "the probe treats every tensor as changed in place")
def _check_version() -> float:
    t = torch.zeros(3, dtype=torch.float64)
    before = _version_impl(t)
    t.add_(1)
    t[:1].mul_(2)  # through a view: the base's counter moves too
    return 0.0 if isinstance(before, int) and _version_impl(t) >= before + 2 else math.inf


def version(t: Tensor) -> float:
    """Return ``t``'s version counter (every in-place write bumps it); NaN, equal to nothing, where unverified.

    The probe compares counters to prove a tensor unchanged since the training forward read it; NaN makes every
    such proof fail, so an unverified counter sends steps to the generic path.
    """
    if _verdicts.get("version", "") is None or _verdict("version") is None:
        return t._version  # (what _version_impl reads; inlined on the recorder's hot path)
    return math.nan


def _hook_tables_impl(m: nn.Module | None) -> tuple[dict, dict, dict, dict]:
    """Forward, forward-pre, backward and backward-pre hooks of module ``m``, or the global ones (``None``)."""
    if m is None:
        from torch.nn.modules import module as mod

        return (
            mod._global_forward_hooks,
            mod._global_forward_pre_hooks,
            mod._global_backward_hooks,
            mod._global_backward_pre_hooks,
        )
    return m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks


@_check(
    "hooks",
    "nn.Module's hook tables (_forward_hooks, ...)",
    "the register_*_hook functions",
    "the probe assumes every module is hooked",
)
def _check_hooks() -> float:
    from torch.nn.modules import module as mod

    m, before = nn.Identity(), [len(d) for d in _hook_tables_impl(None)]
    handles = [
        m.register_forward_hook(_noop),
        m.register_forward_pre_hook(_noop),
        m.register_full_backward_hook(_noop),
        m.register_full_backward_pre_hook(_noop),
        mod.register_module_forward_hook(_noop),
        mod.register_module_forward_pre_hook(_noop),
        mod.register_module_full_backward_hook(_noop),
        mod.register_module_full_backward_pre_hook(_noop),
    ]
    try:
        seen = [len(d) for d in _hook_tables_impl(m)] + [
            len(d) - n for d, n in zip(_hook_tables_impl(None), before, strict=True)
        ]
    finally:
        for h in handles:
            h.remove()
    return 0.0 if seen == [1] * 8 else math.inf


def _noop(*args: object) -> None:
    return None


def forward_hooks(m: nn.Module | None) -> list:
    """Return the forward hooks and pre-hooks of module ``m`` (``None``: the global ones); raise :class:`Unverified`
    where torch keeps them elsewhere."""
    _require("hooks")
    if m is None:
        return [h for d in _hook_tables_impl(None)[:2] for h in d.values()]
    return [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]  # (_hook_tables_impl's, on a hot path)


def backward_hooks(m: nn.Module | None) -> list:
    """Return the backward hooks and pre-hooks of module ``m`` (``None``: the global ones), as
    :func:`forward_hooks` does."""
    _require("hooks")
    if m is None:
        return [h for d in _hook_tables_impl(None)[2:] for h in d.values()]
    return [*m._backward_hooks.values(), *m._backward_pre_hooks.values()]


@contextlib.contextmanager
def backward_hooks_off(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Run the body with the backward hooks of ``modules`` and the global ones removed; put them back after."""
    _require("hooks")
    tables = [d for m in (None, *modules) for d in _hook_tables_impl(m)[2:] if d]
    kept = [d.copy() for d in tables]
    try:
        for d in tables:
            d.clear()
        yield
    finally:
        for d, hooks in zip(tables, kept, strict=True):
            d.clear()
            d.update(hooks)


def _slot_impl(m: nn.Module, name: str) -> object:
    return m._parameters.get(name)


@_check(
    "parameter_slot",
    "nn.Module._parameters",
    "functional_call's swap",
    "every forward is taken for one on the model's own parameters",
)
def _check_parameter_slot() -> float:
    m = nn.utils.skip_init(nn.Linear, 2, 2, dtype=torch.float64)
    other = {"weight": _fixed(2, 2), "bias": _fixed(2)}
    seen: list[object] = []
    m.register_forward_pre_hook(lambda mod, args: seen.append(_slot_impl(mod, "weight")))
    torch.func.functional_call(m, other, (_fixed(1, 2),))
    own = _slot_impl(m, "weight") is m.weight
    return 0.0 if own and seen and seen[0] is not m.weight else math.inf


def parameter_slot(m: nn.Module, name: str) -> object:
    """Return the tensor module ``m`` holds as parameter ``name`` now (``functional_call`` swaps it), without
    computing a parametrization; ``None`` where unverified."""
    return _slot_impl(m, name) if _verdict("parameter_slot") is None else None


#: the module torch's ``parametrizations.spectral_norm`` inserts (a class that matches nothing where it is gone)
SpectralNormParametrization: type = getattr(torch.nn.utils.parametrizations, "_SpectralNorm", type("_Absent", (), {}))


def schema_arguments(func: torch._ops.OpOverload) -> list[torch._C.Argument]:
    """Return the arguments of an ATen operator's schema (their types, and whether each is written in place)."""
    return func._schema.arguments


try:  # the mode that sees every ATen operation a forward pass runs (what recorded operations are made with)
    from torch.utils._python_dispatch import TorchDispatchMode as DispatchMode

    DISPATCH = True
except ImportError:  # pragma: no cover - a torch without it: no recorded operations (capture_for gives none)
    DispatchMode, DISPATCH = object, False  # type: ignore[assignment,misc]


# foreach kernels: one call for a list of tensors (torch's optimizers use them); a plain loop where they are gone


def _foreach(name: str) -> Callable | None:
    return getattr(torch, f"_foreach_{name}", None)


def norms(ts: Sequence[Tensor]) -> Tensor:
    """Return the 2-norm of each tensor, stacked."""
    kernel = _foreach("norm")
    return torch.stack(kernel(list(ts)) if kernel else [torch.linalg.vector_norm(t) for t in ts])


def norm(ts: Sequence[Tensor]) -> float:
    """Return the 2-norm of the tensors taken together, as a float."""
    return torch.linalg.vector_norm(norms(ts)).item() if ts else 0.0


def sub(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
    """Return ``[x - y for x, y in zip(a, b)]``."""
    kernel = _foreach("sub")
    return list(kernel(list(a), list(b))) if kernel else [x - y for x, y in zip(a, b, strict=True)]


def copy_(a: list[Tensor], b: Sequence[Tensor]) -> None:
    """Copy each ``y`` in ``b`` into the ``x`` of ``a`` at its place."""
    kernel = _foreach("copy_")
    if kernel:
        kernel(a, list(b))
    else:
        for x, y in zip(a, b, strict=True):
            x.copy_(y)


def div(a: Sequence[Tensor], c: float) -> list[Tensor]:
    """Return ``[x / c for x in a]``."""
    kernel = _foreach("div")
    return list(kernel(list(a), c)) if kernel else [x / c for x in a]


def rsub_(a: list[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
    """Overwrite each ``x`` in ``a`` with ``y - x`` (``y`` from ``b``) and return ``a``."""
    sub_, neg_ = _foreach("sub_"), _foreach("neg_")
    if sub_ and neg_:
        sub_(a, list(b))
        neg_(a)
    else:
        for x, y in zip(a, b, strict=True):
            x.sub_(y).neg_()
    return a
