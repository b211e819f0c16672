"""Hooks the probe leaves on a user's model: they reach their owner through a weak reference and copy as no-ops.

Modules keep their hooks in their ``__dict__``; a plain bound method would drag the probe into
``copy.deepcopy(model)`` and ``torch.save(model)``, and keep it alive after the user dropped it.
"""

from __future__ import annotations

import weakref
from typing import Any


class Hook:
    """A hook that calls ``owner.<name>`` through a weak reference and pickles as a :class:`Noop`."""

    def __init__(self, owner: object, name: str):
        self._owner, self._name = weakref.ref(owner), name

    def __call__(self, *args: Any) -> Any:
        owner = self._owner()
        return None if owner is None else getattr(owner, self._name)(*args)

    def __reduce__(self) -> tuple:
        return Noop, ()


class Noop:
    """What a probe's hook becomes in a copy of the model: a hook that does nothing."""

    def __call__(self, *args: Any) -> None:
        return None
