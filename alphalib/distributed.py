r"""α* of the global batch under ``torch.distributed`` ``DistributedDataParallel`` (DDP), and the helpers it needs.

Under DDP each of the :math:`R` ranks of the model's process group backpropagates the loss :math:`L_r` of its own
shard of the global batch, and DDP *averages* the gradients, so every rank steps along
:math:`\bar g = \frac1R \sum_r \nabla L_r`, the gradient of the global batch's loss

.. math::

    L = \frac1R \sum_r L_r, \qquad \Delta^\top \nabla L = \frac1R \sum_r \Delta^\top \nabla L_r, \qquad
    \Delta^\top \nabla^2 L\, \Delta = \frac1R \sum_r \Delta^\top \nabla^2 L_r\, \Delta .

With a mean-reduced ``loss_fn`` and shards of equal size :math:`n`, :math:`L` is the mean over the concatenated
batch of :math:`Rn` samples, so :math:`\alpha^*` is a single process's on that batch.

:class:`alphalib.AlphaProbe` given the DDP model (not its ``.module``) measures on each rank, on the module DDP
wraps, the loss, slope and curvature of :math:`L_r` along the realized step :math:`\Delta` (the same on every
rank: DDP keeps the parameters in step), then :meth:`Ranks.reduce` averages them over the ranks in *one*
all-reduce of a few float64 numbers and the shard sizes (:func:`all_reduce_sum`), and ``grad_norm``
:math:`= \|\bar g\|` (a norm of the mean, not a mean of the ranks' norms) in one all-reduce of the gradient
(:func:`norm_of_mean`). That is the same two collectives on every rank on every probed step, after the measuring
and whichever path each rank measured on (both paths measure locally, with no collective inside), so ranks that take
different paths cannot deadlock; with ``path="auto"`` on recorded operations the paths are not timed against each
other (each rank's clock could choose differently). Every rank gets the same numbers and flags; ``path`` is
``"fast"`` only where every rank took the fast path; ``fallback`` also says what this rank saw, and counts the ranks
that took the generic path, failed, or were handed a batch that training did not backpropagate.

The probe's recorder (:mod:`alphalib.probe.recorder`) is not disturbed by DDP: DDP runs the wrapped module through its
``__call__`` (its hooks fire), and its reducer's hooks on the parameters' gradient accumulators only copy the
averaged gradient into ``.grad`` after the backward pass, which is no accumulation; what the recorder taps on the graph
is this rank's own :math:`c\,\nabla L_r`, before the averaging.

**Unequal shards.** With shard sizes :math:`n_r` that differ, the record is still of :math:`L = \frac1R\sum_r L_r`,
the loss whose gradient DDP averaged (each sample of rank :math:`r` weighs :math:`1/(R\,n_r)`), not of the
concatenated batch's mean :math:`\sum_r n_r L_r / \sum_r n_r`, whose gradient did not make the step; the record's
``fallback`` names the sizes. (A loss that each rank scales by its own constant, e.g. :math:`R\,n_r/\sum_s n_s`
to make DDP follow the concatenated mean, is not followed: the ranks' ``loss_fn`` values are averaged as they are.)

**Cost.** On the fast path the rank's gradient is the one the training backward sent through the model's output
(before DDP averaged it and before any clipping of ``.grad``), so ``grad_norm`` costs one gradient-sized all-reduce
per probed step; where the fast path's proof does not hold or is not used (an objective, micro-batches, a closure,
``path="generic"``) the rank also evaluates :math:`\nabla L_r` at :math:`\theta_t` once more (a forward and a
backward pass).

**Failures.** One that happens while measuring, after the optimizer stepped, becomes NaN on its rank, which still
joins both all-reduces: every rank records ``flag="error"`` and carries on. A ``ValueError`` raised *before* the
optimizer steps (what cannot be measured) is raised on the rank that finds it before any of the probe's
collectives; the checks depend on the model, optimizer and batch structure, the same on every rank, but if only one
rank raises, the others wait in their next collective (the probe's, or DDP's next gradient all-reduce) until the
process group's timeout, or until ``torchrun`` ends them when the failed worker exits. An exception from the
optimizer's own step propagates, as it would without the probe. A probe whose process group is gone records
``flag="error"`` rather than pass off one rank's numbers as the global batch's.

**Records on one rank.** Every rank holds the same records; write them once::

    if alphalib.distributed.is_main_process():
        alphalib.write_records(probe.to_frame(), "records.csv")

Not distributed (refused at construction for a DDP model, as they would measure each rank's own data): the
probe's ``full_data``/``held_out`` scopes and ``sharpness_every``; nor models whose forward runs collectives
(``SyncBatchNorm``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, TypeGuard

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._function import BatchLoss
from .curvature import Directional
from .spectrum import batch_size


def is_ddp(model: nn.Module) -> TypeGuard[nn.parallel.DistributedDataParallel]:
    """Whether ``model`` is a ``torch.nn.parallel.DistributedDataParallel`` wrapper."""
    return isinstance(model, nn.parallel.DistributedDataParallel)


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module a ``DistributedDataParallel`` wraps (its ``.module``), or ``model`` itself.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> unwrap(net) is net
        True
    """
    return model.module if is_ddp(model) else model


def initialized() -> bool:
    """Whether ``torch.distributed`` is available and its default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: Any = None) -> int:
    """Return the number of ranks in ``group`` (the default group), 1 where ``torch.distributed`` is not initialized."""
    return dist.get_world_size(group) if initialized() else 1


def rank(group: Any = None) -> int:
    """Return this process's rank in ``group`` (the default group), 0 where ``torch.distributed`` is not initialized."""
    return dist.get_rank(group) if initialized() else 0


def is_main_process() -> bool:
    """Return whether this process is rank 0 of the default group (or the only process): the one that writes files.

    Returns:
        ``True`` on rank 0, or where ``torch.distributed`` is not initialized; ``False`` on every other rank.

    Example:
        >>> is_main_process()  # no process group here: the only process
        True
    """
    return rank() == 0


def all_reduce_sum(
    values: Sequence[float],
    *,
    group: Any = None,
    device: torch.device | str = "cpu",
) -> list[float]:
    r"""Return :math:`\sum_r v_r` over the ranks of ``group``, elementwise, for a short list of floats.

    One collective: the values travel as one float64 tensor on ``device`` (``"cpu"`` for gloo, the rank's GPU for
    NCCL). Without an initialized process group the values come back as they are (a world of one).

    Example:
        >>> all_reduce_sum([1.5, 2.0])  # no process group here
        [1.5, 2.0]
    """
    values = [float(v) for v in values]
    if not initialized():
        return values
    buffer = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return buffer.tolist()


def all_reduce_mean(
    values: Sequence[float],
    *,
    group: Any = None,
    device: torch.device | str = "cpu",
) -> list[float]:
    r"""Return :math:`\frac1R \sum_r v_r` over the :math:`R` ranks of ``group``, elementwise, in one collective."""
    size = world_size(group)
    return [v / size for v in all_reduce_sum(values, group=group, device=device)]


def norm_of_mean(tensors: Sequence[Tensor], *, group: Any = None) -> float:
    r"""Return :math:`\|\frac1R \sum_r v_r\|` for a vector :math:`v_r` held as tensors on each rank of ``group``.

    The norm of the ranks' mean (the global batch's gradient norm, from each rank's gradient), not the mean of their
    norms. One collective: the tensors travel flattened into one buffer of their dtype, on their device.

    Example:
        >>> norm_of_mean([torch.tensor([3.0]), torch.tensor([[4.0]])])  # no process group: the local norm
        5.0
    """
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])  # a new buffer: the caller's tensors stay as they are
    if initialized():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat /= world_size(group)
    return torch.linalg.vector_norm(flat).item()


def local_gradient(fn: BatchLoss, theta: Sequence[Tensor]) -> list[Tensor]:
    r"""Return :math:`\nabla L_r(\theta)` of this rank's measured function (one forward and one backward pass)."""
    leaves = [t.detach().requires_grad_(True) for t in theta]
    return list(torch.autograd.grad(fn(leaves), leaves, allow_unused=True, materialize_grads=True))


def _samples(batches: Sequence[object]) -> int:
    """Return the number of samples in this rank's batches (0 where a batch's size cannot be told)."""
    try:
        return sum(batch_size(b) for b in batches)
    except ValueError:
        return 0


def _sizes(sizes: list[int]) -> str:
    if len(sizes) <= 8:
        return ", ".join(map(str, sizes)) + " samples on the ranks"
    return f"{min(sizes)} to {max(sizes)} samples a rank"


class Ranks:
    """The ranks of a DDP model's process group, and the reduction of a probed step's numbers over them."""

    def __init__(self, model: nn.parallel.DistributedDataParallel):
        self.group = model.process_group
        self.size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self._warned = False

    def reduce(
        self,
        res: Directional,
        grad: Sequence[Tensor] | None,
        params: Sequence[Tensor],
        batches: Sequence[object],
        *,
        fast: bool,
        error: bool,
        mismatch: bool,
        fallback: list[str],
    ) -> tuple[Directional, str, bool, bool]:
        r"""Return the global batch's loss, slope, curvature and gradient norm, path, error and mismatch.

        ``res`` holds this rank's :math:`L_r`, :math:`\Delta^\top\nabla L_r`, :math:`\Delta^\top\nabla^2 L_r\Delta`
        and ``grad`` its :math:`\nabla L_r` (``None`` after a failure); the result holds their means over the ranks
        (``grad_norm``: the norm of the mean gradient). Two collectives, whatever the arguments; notes on what the
        other ranks saw are appended to ``fallback``. A collective that fails is recorded as an error.
        """
        size, sizes = self.size, [0.0] * self.size
        sizes[self.rank] = float(_samples(batches))
        local = [res.loss, res.slope, res.curvature, float(fast), float(error), float(mismatch), *sizes]
        device = params[0].device
        if grad is None:  # this rank failed: take part in the all-reduce all the same, with NaN
            grad = [torch.full_like(p, math.nan) for p in params]
        try:
            if not initialized():  # all_reduce_sum would hand back this rank's numbers as the global batch's
                raise RuntimeError("torch.distributed is not initialized (was the process group destroyed?)")
            total = all_reduce_sum(local, group=self.group, device=device)
            norm = norm_of_mean(grad, group=self.group)
        except Exception as exc:  # the step is taken: record, never raise
            why = f"the all-reduce over the ranks failed ({type(exc).__name__}: {exc})"
            if not self._warned:
                warnings.warn(
                    f"AlphaProbe: {why}; such steps are recorded with flag='error'.", RuntimeWarning, stacklevel=3
                )
                self._warned = True
            fallback.append(f"error: {why}")
            return Directional(math.nan, math.nan, math.nan, math.nan), "generic", True, mismatch
        loss, slope, curvature = (x / size for x in total[:3])
        n_fast, n_error, n_mismatch = (round(x) for x in total[3:6])
        counts = [round(x) for x in total[6:]]
        if 0 < n_fast < size:
            fallback.append(f"the generic path ran on {size - n_fast} of {size} ranks")
        if n_error:
            fallback.append(f"the measurement failed on {n_error} of {size} ranks")
        if n_mismatch and not mismatch:
            fallback.append(f"the batch handed over did not match training's on {n_mismatch} of {size} ranks")
        if all(counts) and len(set(counts)) > 1:
            fallback.append(
                f"shards of unequal sizes ({_sizes(counts)}): measured is the average of the ranks' "
                "mean losses, the loss whose gradient DDP averaged, not the concatenated batch's mean"
            )
        path = "fast" if n_fast == size else "generic"
        return Directional(loss, slope, curvature, norm), path, n_error > 0, n_mismatch > 0


def for_probe(model: nn.Module, *, scopes: bool, sharpness: bool) -> Ranks | None:
    """Return the :class:`Ranks` to reduce a DDP model's records over (``None`` for any other model); refuse, with a
    ``ValueError``, what the probe does not measure across ranks."""
    if not is_ddp(model):
        return None
    what = [name for name, asked in (("full_data/held_out", scopes), ("sharpness_every", sharpness)) if asked]
    if what:
        raise ValueError(
            f"AlphaProbe on a DistributedDataParallel model measures the global batch, but "
            f"{' and '.join(what)} would measure only each rank's own data (not distributed yet): "
            "leave them out, and measure those on one rank with alphalib.alpha_over or "
            "alphalib.top_eigenvalue on model.module."
        )
    synced = [name for name, m in model.module.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    if synced:
        raise ValueError(
            f"AlphaProbe cannot probe a model with SyncBatchNorm ({synced[0]!r}): its forward runs "
            "collectives that the probe's own passes would have to repeat in step on every rank, and it "
            "has no double backward. Probe a model with BatchNorm (per-rank statistics) instead."
        )
    return Ranks(model)
