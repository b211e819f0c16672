"""The one training loop that notebooks, sweeps and benchmarks share, and ``run``: one seeded, probed run."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset
from tqdm.auto import tqdm

from .._checks import check_counts, trainable
from .._function import LossFn
from ..blocks import BlockAlpha, block_alpha, resolve_groups
from ..curvature import Backend
from ..optim import eval_mode, train_mode
from ..probe import AlphaProbe
from ..records import Record, Stream, TensorBoard
from ..scaled import AlphaScaled
from ..spectrum import next_step_profiles
from .data import loader
from .optimizers import make_optimizer

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class History:
    """What a training run produced, as tidy frames that concatenate across runs.

    Attributes:
        steps: One row per step: ``epoch``, ``step``, ``loss`` (the mini-batch loss before the step), ``lr`` (the
            first param group's learning rate the step was taken with).
        epochs: One row per epoch: ``epoch``, ``train_loss`` (the mean over the epoch's samples: each batch's loss
            weighted by its size, the number of its targets), ``seconds`` (training time so far, the probe's
            included, validation not), ``probe_seconds`` (the probe's share of ``seconds``: what observing cost; 0
            without a probe and for the α*-scaled steps, whose measurement is part of the method), and with
            validation ``val_loss`` and, for class targets, ``val_accuracy``.
        records: The probe's records (empty without a probe), or the α*-scaled steps' records.
        profiles: Line profiles along the next step (``run(looks=...)``): ``alpha`` (a learning rate:
            ``alpha == lr`` is the step taken), ``loss``, ``quadratic``, ``scope``, ``epoch`` (epochs done), ``lr``,
            ``alpha_star``, ``trust``; ``None`` without looks.
        blocks: α* per group of parameters on the probed steps (``run(blocks=...)``): one row per step and group,
            ``step``, ``epoch``, ``group``, ``lr`` and the fields of :class:`alphalib.BlockAlpha` (``slope``,
            ``curvature``, ``alpha_star``, ``ratio``, ``lr_over_alpha``, ``flag``, ``step_norm``, ``size``);
            ``None`` without blocks.
    """

    steps: pd.DataFrame
    epochs: pd.DataFrame
    records: pd.DataFrame
    profiles: pd.DataFrame | None = field(default=None)
    blocks: pd.DataFrame | None = field(default=None)


@dataclass(frozen=True)
class Step:
    """One optimizer step :func:`train` took, as its ``after_step`` sees it: after the step, before the scheduler's.

    Attributes:
        index: The step's index, counted from 0 over the run (the probe's ``step``).
        epoch: The epoch it belongs to, counted from 0.
        batch: The ``(inputs, targets)`` pair it was taken on.
        lr: The first param group's learning rate it was taken with.
        before: :math:`\\theta_t`, copies of the model's trainable parameters before the step, in the order of
            ``[p for p in model.parameters() if p.requires_grad]`` (the model holds :math:`\\theta_{t+1}`).
        record: The probe's record of the step on probed steps, else ``None``.
    """

    index: int
    epoch: int
    batch: Any
    lr: float
    before: list[torch.Tensor]
    record: Record | None


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: LossFn, batches: Iterable) -> dict[str, float]:
    """Return the mean loss over ``batches`` in eval mode, and the accuracy when targets are class indices.

    Args:
        model: The network to evaluate; it is put in eval mode, then back in the mode it was in.
        loss_fn: ``loss_fn(model(inputs), targets)``, a mean over the batch.
        batches: ``(inputs, targets)`` pairs (a ``DataLoader``).

    Returns:
        ``val_loss``, the loss averaged over all samples, and ``val_accuracy``, the share of samples whose largest
        output is the target, when the targets are not floating point.
    """
    was_training = model.training
    model.eval()
    n = loss = correct = 0.0
    classes = False
    for x, y in batches:
        out = model(x)
        loss += loss_fn(out, y).item() * len(y)
        classes = not y.is_floating_point()
        if classes:
            correct += (out.argmax(-1) == y).double().mean().item() * len(y)
        n += len(y)
    model.train(was_training)
    metrics = {"val_loss": loss / n}
    if classes:
        metrics["val_accuracy"] = correct / n
    return metrics


def train(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    batches: Iterable,
    *,
    epochs: int,
    probe: AlphaProbe | AlphaScaled | None = None,
    val: Iterable | None = None,
    progress: bool = True,
    after_epoch: Callable[[int], None] | None = None,
    live: bool = False,
    records_to: str | Path | None = None,
    tensorboard: str | Path | None = None,
    scheduler: Callable[[torch.optim.Optimizer], LRScheduler] | None = None,
    after_step: Callable[[Step], None] | None = None,
) -> History:
    """Train for ``epochs`` passes over ``batches``, letting ``probe`` take the steps.

    After every optimizer step: ``after_step`` (with the parameters before the step), then the learning-rate
    scheduler's step. Validation runs after every epoch, in eval mode; then ``after_epoch(epochs_done)``. An optimizer
    with train and eval points (Schedule-Free) steps in train mode, is validated in eval mode and is left in eval mode,
    so that the model ends on the point it returns (see :mod:`alphalib.optim`). Listeners attached here are detached
    when training ends or fails.

    Args:
        model: The network to train, put in train mode.
        loss_fn: ``loss_fn(model(inputs), targets)``, the scalar loss that is backpropagated.
        optimizer: The optimizer that steps ``model`` (with a ``probe``, the one the probe steps).
        batches: ``(inputs, targets)`` pairs, iterated once per epoch (a ``DataLoader``).
        epochs: How many passes over ``batches``.
        probe: What takes each step, ``probe.step((inputs, targets), epoch=epoch)``, in place of
            ``optimizer.step()``: an :class:`~alphalib.AlphaProbe` or :class:`~alphalib.AlphaScaled`; ``None``
            steps the optimizer.
        val: ``(inputs, targets)`` pairs to validate on after every epoch (:func:`evaluate`), iterated once per
            epoch; ``None`` for no validation.
        progress: Show a progress bar over the epochs.
        after_epoch: Called with the number of epochs done, after each epoch's validation.
        live: Draw the probe's records below the running cell where a notebook frontend shows them
            (:func:`alphalib.lab.live.watch`: nothing under papermill, nbval or in a script).
        records_to: Stream the probe's records to a ``.csv`` file or a folder of Parquet parts after every epoch
            (:class:`alphalib.records.Stream`: a crash loses at most the epoch under way).
        tensorboard: A log folder for TensorBoard scalars of the probe's records
            (:class:`alphalib.records.TensorBoard`).
        scheduler: Builds the learning-rate schedule from the optimizer (called once, before the first step), e.g.
            ``lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1, (t + 1) / 100))``; it is stepped
            after every optimizer step, so step ``t`` is taken at the schedule's ``t``-th learning rate (each step's
            is in ``History.steps``, and in the probe's records).
        after_step: Called after every optimizer step with its :class:`Step` (the batch, the learning rate,
            :math:`\\theta_t`, the probe's record), before the scheduler steps; e.g. to measure more along the step
            taken (what ``run(blocks=...)`` does). It must leave the parameters as they are.

    Returns:
        The :class:`History` of the run: its steps, its epochs and the probe's records (``profiles`` and ``blocks``
        are ``None``).

    Raises:
        ValueError: If ``epochs`` is not a positive integer, or ``live``, ``records_to`` or ``tensorboard`` is given
            without a ``probe``.
    """
    import pandas as pd

    check_counts(epochs=epochs)
    sinks: list[Stream | TensorBoard] = []
    watching = None
    if probe is None:
        if live or records_to is not None or tensorboard is not None:
            raise ValueError(
                "live, records_to and tensorboard follow the probe's records: pass a probe, or leave them off."
            )
    else:
        if records_to is not None:
            sinks.append(Stream(records_to, tags=probe.frame_tags))
        if tensorboard is not None:
            sinks.append(TensorBoard(tensorboard))
        if live:
            from .live import watch

            lr = optimizer.param_groups[0]["lr"]
            watching = watch(probe, title=f"{type(optimizer).__name__} (lr {lr:g}): α* as training runs")
        if sinks:
            probe.listeners.extend(sinks)
    steps: list[tuple[int, int, float, float]] = []  # (epoch, step, loss, lr)
    per_epoch: list[dict[str, float]] = []
    model.train()
    train_mode(optimizer)
    schedule = scheduler(optimizer) if scheduler is not None else None
    bar = tqdm(range(epochs), desc="epochs", disable=not progress)
    seconds = 0.0  # training time so far: the steps (the probe's included), not validation
    try:
        for epoch in bar:
            start = time.perf_counter()
            total, samples = 0.0, 0  # the epoch's loss summed over its samples, and their number
            for x, y in batches:
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                lr = float(optimizer.param_groups[0]["lr"])
                before = [p.detach().clone() for p in trainable(model)] if after_step is not None else []
                rec = None
                if probe is None:
                    optimizer.step()
                else:
                    rec = probe.step((x, y), epoch=epoch)
                steps.append((epoch, len(steps), loss.item(), lr))
                total, samples = total + steps[-1][2] * len(y), samples + len(y)
                if after_step is not None:
                    after_step(Step(len(steps) - 1, epoch, (x, y), lr, before, rec))
                if schedule is not None:
                    schedule.step()
            seconds += time.perf_counter() - start
            for sink in sinks:
                sink.flush()
            row = {
                "epoch": epoch,
                "train_loss": total / samples if samples else math.nan,
                "seconds": seconds,
                "probe_seconds": getattr(probe, "seconds", 0.0),
            }
            if val is not None:
                eval_mode(optimizer)
                row |= evaluate(model, loss_fn, val)
                train_mode(optimizer)
            per_epoch.append(row)
            if after_epoch is not None:
                after_epoch(epoch + 1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k not in ("epoch", "seconds", "probe_seconds")})
    finally:
        eval_mode(optimizer)
        if watching is not None:
            watching.close()
        for sink in sinks:  # (there are sinks only with a probe)
            if probe is not None and sink in probe.listeners:
                probe.listeners.remove(sink)
            sink.close()
    records = probe.to_frame() if probe is not None else pd.DataFrame()
    return History(pd.DataFrame(steps, columns=["epoch", "step", "loss", "lr"]), pd.DataFrame(per_epoch), records)


def run(
    model: Callable[[], nn.Module],
    loss_fn: LossFn,
    train_set: Dataset,
    *,
    optimizer: str = "Adam",
    lr: float | None = None,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    epochs: int = 10,
    batch_size: int = 32,
    seed: int = 0,
    curvature: Backend = "hessian",
    every: int = 1,
    shuffle: bool = True,
    val_set: Dataset | None = None,
    full_every: int | None = None,
    sharpness_every: int | None = None,
    looks: Collection[int] = (),
    alpha_set: Dataset | None = None,
    tags: Mapping[str, Any] | None = None,
    progress: bool = True,
    live: bool = False,
    records_to: str | Path | None = None,
    tensorboard: str | Path | None = None,
    scheduler: Callable[[torch.optim.Optimizer], LRScheduler] | None = None,
    held_out_set: Dataset | None = None,
    blocks: Mapping[str, Sequence[str]] | None = None,
) -> History:
    r"""Run one seeded, probed training run: build ``model()`` and the optimizer, train, tag every row.

    Seeds torch's global generator with ``seed``, then builds the model, the optimizer and an
    :class:`~alphalib.AlphaProbe` that measures every ``every``-th step, and trains with :func:`train`.

    ``optimizer="alpha_scaled"`` steps the ``base`` optimizer of ``optimizer_kwargs`` (``"adam"`` by default) by
    :math:`\kappa\,\alpha^*` instead of probing it (the other keywords of :class:`alphalib.AlphaScaled`:
    ``kappa``, ``source``, ``smoothing``, ``bounds``, ``full_every``); its ``"heldout"`` source measures on batches
    of ``alpha_set`` (keep it apart from ``val_set``, which judges the run), its ``"full"`` source on the training
    set.

    Args:
        model: Builds the network, called once after seeding.
        loss_fn: ``loss_fn(model(inputs), targets)``, the scalar training loss.
        train_set: The training set, a map-style dataset of ``(inputs, targets)`` pairs (a ``TensorDataset`` when
            ``looks`` are asked for).
        optimizer: Any name :func:`alphalib.make_optimizer` knows.
        lr: The initial learning rate; ``None``: the optimizer's own default (e.g. 1e-3 for Adam, 1 for Prodigy).
        optimizer_kwargs: More keywords for the optimizer (for ``"alpha_scaled"``: ``base``, the keywords of
            :class:`~alphalib.AlphaScaled` and the base optimizer's).
        epochs: How many passes over ``train_set``.
        batch_size: The training batches' size.
        seed: Seeds torch's global generator before ``model()`` is built, the batches' order (with ``shuffle``),
            the looks' batches and ``alpha_set``'s.
        curvature: The probe's curvature backend (:data:`alphalib.BACKENDS`).
        every: Probe every ``every``-th step.
        shuffle: Draw the training batches in a new order every epoch (reproducible from ``seed``).
        val_set: Held-out data, evaluated after every epoch (``val_loss``, ``val_accuracy``); with ``full_every``
            also the probe's held-out scope.
        full_every: Every ``full_every``-th step the probe also records α* of the full training set and of
            ``val_set`` along the same step (``full_*`` and ``heldout_*`` columns).
        sharpness_every: Every ``sharpness_every``-th step the probe also records the batch Hessian's largest
            eigenvalue (and Adam's preconditioned sharpness): ``lambda_max``, ``precond_lambda_max``.
        looks: After each of these epochs (counted from 1), profile the loss along the step the optimizer would
            take next on a fresh random batch, on that batch and on the training set
            (:func:`alphalib.next_step_profiles`, training untouched), into ``History.profiles``.
        alpha_set: The data ``"alpha_scaled"``'s ``"heldout"`` source measures α* on.
        tags: More columns for every frame of the result.
        progress: Show a progress bar over the epochs.
        live: Watch the records as they come, in JupyterLab (see :func:`train`).
        records_to: Stream the records to a ``.csv`` file or a folder of Parquet parts as training runs (see
            :func:`train`).
        tensorboard: A log folder for TensorBoard scalars of the records (see :func:`train`).
        scheduler: Builds the learning-rate schedule from the optimizer; stepped after every step (see
            :func:`train`). ``lr0`` stays the learning rate the optimizer was built with.
        held_out_set: Data the run never trains on, for the probe's held-out scope: on the probed steps whose index
            is a multiple of ``full_every`` (every probed step without ``full_every``) the probe also measures α*
            along the same step on a fresh random batch of ``batch_size`` drawn from it (the ``heldout_*``
            columns; drawn from its own generator, seeded by ``seed``), in place of the whole ``val_set``. The
            full-data scope still comes with ``full_every`` only.
        blocks: Groups of parameters (group name -> parameter or module names, as :func:`alphalib.block_alpha`
            takes them): on every probed step, α* of each group along the step, at :math:`\theta_t` on the step's
            batch, into ``History.blocks`` (one Hessian-vector product per group, on top of the probe's, counted in
            the epochs' ``seconds``, not in ``probe_seconds``; in the model's train mode: with dropout, a mask of its
            own).

    Returns:
        The run's :class:`History`. Every frame carries ``optimizer``, ``seed`` and ``lr0`` (the initial learning
        rate) plus ``tags`` as columns, so runs concatenate into one tidy DataFrame.

    Raises:
        ValueError: If a count (``epochs``, ``batch_size``, ``every``, ``full_every``, ``sharpness_every``) is not a
            positive integer, the ``"heldout"`` source of ``"alpha_scaled"`` is asked for without ``alpha_set``, or
            ``blocks`` do not name the model's parameters in groups that do not overlap (before training).
    """
    import pandas as pd

    check_counts(
        epochs=epochs, batch_size=batch_size, every=every, full_every=full_every, sharpness_every=sharpness_every
    )
    torch.manual_seed(seed)
    net = model()
    if blocks is not None:
        resolve_groups(net, blocks)  # bad groups raise before training
    full = loader(train_set, 1024) if full_every is not None or looks else None
    val = loader(val_set, 512) if val_set is not None else None
    kwargs = dict(optimizer_kwargs or {})
    if isinstance(optimizer, str) and optimizer.lower() == "alpha_scaled":
        if kwargs.get("source") == "heldout" and alpha_set is None:
            raise ValueError(
                "the 'heldout' source measures alpha* on data the run never trains on: pass alpha_set= "
                "(apart from val_set, which judges the run)."
            )
        kwargs = (
            dict(
                curvature=curvature,
                full_data=full if full is not None else loader(train_set, 1024),
                held_out=loader(alpha_set, batch_size, shuffle=True, seed=seed + 2) if alpha_set else None,
            )
            | kwargs
        )
    built = make_optimizer(optimizer, net.parameters(), lr=lr, model=net, loss_fn=loss_fn, **kwargs)
    opt = built.optimizer if isinstance(built, AlphaScaled) else built
    labels = {"optimizer": optimizer, "seed": seed, "lr0": opt.param_groups[0]["lr"], **dict(tags or {})}
    probe: AlphaProbe | AlphaScaled
    if isinstance(built, AlphaScaled):
        probe, built.tags = built, {**built.tags, **labels}
    else:
        scopes: dict[str, Any] = (
            dict(full_data=full, held_out=val, full_every=full_every) if full_every is not None else {}
        )
        if held_out_set is not None:
            scopes |= dict(held_out=_fresh_batches(held_out_set, batch_size, seed + 3), full_every=full_every or every)
        probe = AlphaProbe(
            net, loss_fn, opt, curvature=curvature, every=every, tags=labels, sharpness_every=sharpness_every, **scopes
        )
    batches = loader(train_set, batch_size, shuffle=shuffle, seed=seed)
    draw = torch.Generator().manual_seed(seed + 1)  # the looks' batches, apart from training's own stream
    profiles = []

    def look(done: int) -> None:
        if done in looks:
            tensors = cast(TensorDataset, train_set)  # a look indexes the set with a tensor of indices
            pick = torch.randperm(len(tensors), generator=draw)[:batch_size]
            found = next_step_profiles(net, loss_fn, opt, tuple(tensors[pick]), full_data=full, curvature=curvature)
            for scope, prof in found.items():
                profiles.append(
                    prof.to_frame().assign(
                        scope=scope,
                        epoch=done,
                        lr=opt.param_groups[0]["lr"],
                        alpha_star=prof.alpha_star,
                        trust=prof.trust,
                    )
                )

    rows: list[dict[str, Any]] = []  # per group of parameters, on the probed steps

    def measure_blocks(step: Step) -> None:
        if blocks is not None and step.record is not None:
            found = block_alpha(net, loss_fn, step.batch, blocks, theta=step.before, lr=step.lr)
            rows.extend(
                {"step": step.index, "epoch": step.epoch, "group": name, "lr": step.lr}
                | {f: getattr(res, f) for f in BLOCK_COLUMNS}
                for name, res in found.items()
            )

    history = train(
        net,
        loss_fn,
        opt,
        batches,
        epochs=epochs,
        probe=probe,
        val=val,
        progress=progress,
        after_epoch=look,
        live=live,
        records_to=records_to,
        tensorboard=tensorboard,
        scheduler=scheduler,
        after_step=measure_blocks if blocks is not None else None,
    )
    probe.remove()
    looked = pd.concat(profiles, ignore_index=True) if profiles else None
    per_group = (
        pd.DataFrame(rows, columns=["step", "epoch", "group", "lr", *BLOCK_COLUMNS]) if blocks is not None else None
    )
    for frame in (
        history.steps,
        history.epochs,
        *([looked] if profiles else []),
        *([per_group] if per_group is not None else []),
    ):
        for key, value in labels.items():
            frame[key] = value
    return History(history.steps, history.epochs, history.records, profiles=looked, blocks=per_group)


#: the fields of :class:`alphalib.BlockAlpha` that ``History.blocks`` holds (all but the parameters' names)
BLOCK_COLUMNS = tuple(f for f in BlockAlpha.__dataclass_fields__ if f != "names")


def _fresh_batches(data: Dataset, batch_size: int, seed: int) -> DataLoader:
    """Return a loader that yields one fresh random batch of ``data`` each time it is iterated (its own generator:
    the global RNG is not drawn from)."""
    gen = torch.Generator().manual_seed(seed)
    pick = RandomSampler(cast(Sized, data), num_samples=min(batch_size, len(cast(Sized, data))), generator=gen)
    return DataLoader(data, batch_size=batch_size, sampler=pick, generator=gen)
