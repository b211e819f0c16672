"""Probe training loops that step the optimizer themselves: Lightning's ``Trainer`` and Hugging Face's ``Trainer``.

:class:`alphalib.integrations.lightning.AlphaCallback` (extra ``lightning``) and
:class:`alphalib.integrations.hf.AlphaTrainer` (extra ``hf``) take the framework's optimizer step through
:class:`alphalib.AlphaProbe`. Import the submodule you need: this package imports neither framework.
"""

from __future__ import annotations

import inspect
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..curvature import check_backend
from ..probe import AlphaProbe
from ..records import Record


def probe_keywords(
    every: int, curvature: str, tags: Mapping[str, Any] | None, options: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Return the keywords for :class:`~alphalib.AlphaProbe`, checked now rather than at the first training step."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer (every k-th step), got {every!r}.")
    others = [
        name
        for name, p in inspect.signature(AlphaProbe).parameters.items()
        if p.kind is p.KEYWORD_ONLY and name not in ("every", "curvature", "tags")
    ]
    options = dict(options or {})
    unknown = sorted(set(options) - set(others))
    if unknown:
        raise TypeError(f"probe_options {unknown} are not among AlphaProbe's other keywords: {', '.join(others)}.")
    return {"every": every, "curvature": check_backend(curvature), "tags": dict(tags or {}), **options}


class StepRoute:
    """Send ``optimizer.step(closure)`` to ``take(closure)`` until :meth:`restore`.

    The optimizer's own step runs for calls made while ``take`` runs (the probe taking the step).

    The route is an instance attribute that shadows the class's ``step``, as torch's LR schedulers and accelerate
    shadow it: the optimizer's state, its ``state_dict`` and its step hooks are untouched, and a wrapper already
    there (an LR scheduler's) still runs when the step is taken.

    Args:
        optimizer: The optimizer whose ``step`` is routed.
        take: Called with the step's closure (or ``None``) in place of ``optimizer.step``; what it returns is the
            step's result.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, take: Callable[[Callable[[], Any] | None], Any]):
        self.optimizer, self._take = optimizer, take
        self._own = optimizer.__dict__.get("step")  # an instance wrapper already there, restored at the end
        self._step = optimizer.step  # the step training would take
        self._inside = False

        def routed(closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
            if self._inside:  # the probe taking the step
                return self._step(**kwargs) if closure is None else self._step(closure, **kwargs)
            if kwargs:
                raise TypeError(
                    f"optimizer.step got keyword arguments {sorted(kwargs)}, which the probe cannot pass "
                    "on; step without them, or train without the alphalib probe."
                )
            self._inside = True
            try:
                return self._take(closure)
            finally:
                self._inside = False

        if getattr(self._step, "_wrapped_by_lr_sched", False):  # an LR scheduler's wrapper still runs: say so
            setattr(routed, "_wrapped_by_lr_sched", True)  # noqa: B010 (a function's attribute, set as torch sets it)
        self._routed = routed
        setattr(optimizer, "step", routed)  # noqa: B010 (an instance attribute over the method, deliberately)

    def restore(self) -> None:
        """Give the optimizer its ``step`` back (if nothing replaced the route since)."""
        if self.optimizer.__dict__.get("step") is self._routed:
            if self._own is None:
                del self.optimizer.step
            else:
                setattr(self.optimizer, "step", self._own)  # noqa: B010 (the instance attribute it replaced)


def logged(records: Sequence[Record], prefix: str = "") -> dict[str, float]:
    """Return the scalars a framework's logger gets for the records since its last log (empty if none).

    The medians of α*, α*/step size and the curvature over the records' defined values (NaN if none), and how
    many of the records are flagged (not ``"ok"``).
    """
    if not records:
        return {}

    def median(name: str) -> float:
        values = [v for r in records if math.isfinite(v := getattr(r, name))]
        return statistics.median(values) if values else math.nan

    return {
        prefix + "alpha_star": median("alpha_star"),
        prefix + "alpha_star_over_lr": median("ratio"),
        prefix + "curvature": median("curvature"),
        prefix + "flagged": float(sum(r.flag != "ok" for r in records)),
    }


def micro_batches(batches: list[Any]) -> Any:
    """Return what ``probe.step`` takes for the batches whose backward passes built ``.grad`` since the last step."""
    if not batches:
        raise ValueError(
            "the optimizer stepped before the probe saw any training batch; attach the alphalib "
            "integration before training starts."
        )
    if all(isinstance(b, (tuple, list, Mapping)) for b in batches):
        return list(batches)  # a list of batches, even of one: never mistaken for a batch that is a list
    if len(batches) == 1:
        return batches[0]
    raise ValueError(
        f"gradient accumulation over {len(batches)} batches of type {type(batches[0]).__name__}: the "
        "probe takes micro-batches as a list of tuples, lists or dicts. Make the dataloader yield "
        "such batches, or train without gradient accumulation."
    )
