r"""Check a notebook's papermill parameters before anything runs.

papermill injects its parameters as plain assignments after the cell tagged ``parameters``: a misspelt name
(``-p epochz 1``) becomes a new variable nobody reads, and ``-r lr 1e-3`` passes the text ``"1e-3"``, so the run
goes on with its defaults or fails deep inside torch. The notebooks annotate their parameters
(``epochs: int = 20``, which papermill also reads) and call :func:`check_parameters` first thing after it:

    >>> namespace = {"__annotations__": {"epochs": int, "lr": float}, "epochs": 20, "lr": 1e-3, "epochz": 1}
    >>> check_parameters(namespace)
    Traceback (most recent call last):
    ...
    ValueError: unknown parameter 'epochz' (did you mean 'epochs'?); this notebook's parameters are epochs, lr.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any

#: names IPython puts in a kernel's namespace that are not parameters
_KERNEL = frozenset({"In", "Out", "get_ipython", "exit", "quit", "open"})


def check_parameters(namespace: Mapping[str, Any]) -> None:
    """Raise if the notebook's namespace holds a parameter it does not declare, or one of the wrong type.

    Call it as ``alphalib.check_parameters(globals())`` in the first cell after the parameters cell, before
    anything else runs. The declared parameters are the names that cell annotates; any other plain value (not a
    module, class or function, not IPython's own) can only have been injected by papermill. Annotations may be
    text with ``Optional`` and ``Union`` (papermill's parser takes no ``|``). An ``int`` passes for a ``float``;
    nothing else is converted.

    Args:
        namespace: The notebook's ``globals()``, its ``__annotations__`` included.

    Raises:
        ValueError: If the parameters cell annotates nothing, or the namespace holds a value under a name it does not
            declare.
        TypeError: If a declared parameter's value is not of its annotated type.

    Example:
        A learning rate passed as text (papermill's ``-r``); the module's example shows a misspelt name:

        >>> check_parameters({"__annotations__": {"lr": float}, "lr": "1e-3"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: parameter 'lr' must be float, got str '1e-3' (papermill's -r passes text: ...).
    """
    declared = {k: _resolve(v) for k, v in namespace.get("__annotations__", {}).items()}
    if not declared:
        raise ValueError("the parameters cell declares no parameters: annotate each one (epochs: int = 20).")
    unknown = [k for k, v in namespace.items() if k not in declared and _injectable(k, v)]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, declared, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown parameter {name!r}{hint}; this notebook's parameters are {', '.join(declared)}.")
    for name, kind in declared.items():
        value = namespace.get(name)
        if name in namespace and not _matches(value, kind):
            hint = (
                " (papermill's -r passes text: pass numbers with -p, lists and dicts with -y)"
                if isinstance(value, str)
                else ""
            )
            raise TypeError(f"parameter {name!r} must be {_name(kind)}, got {type(value).__name__} {value!r}{hint}.")


def _resolve(kind: Any) -> Any:
    """The type an annotation names: papermill reads only names and brackets, so unions are written as text
    (``workers: "Optional[int]" = 2``)."""
    while isinstance(kind, str):  # (under `from __future__ import annotations` each annotation is text too)
        kind = eval(kind, {"Optional": typing.Optional, "Union": typing.Union, "Any": Any})
    return kind


def _injectable(name: str, value: object) -> bool:
    """Whether ``value`` under ``name`` looks like a parameter (what papermill can inject)."""
    return not (name.startswith("_") or name in _KERNEL or callable(value) or isinstance(value, types.ModuleType))


def _matches(value: object, kind: Any) -> bool:
    """Whether ``value`` is of the annotated type ``kind`` (unions, ``list[X]``, ``dict[K, V]``, plain classes)."""
    if kind is Any:
        return True
    if kind is None or kind is type(None):
        return value is None
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict) and (
            not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
        )
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _name(kind: Any) -> str:
    return kind.__name__ if isinstance(kind, type) and not typing.get_args(kind) else str(kind)
