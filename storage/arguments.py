"""Type checks at the edge of the Python API: a wrong type is named with its argument.

The command line parses its options into the right types; a Python caller can pass anything,
and ``ingest(val_frac="0.2")`` would otherwise fail deep inside (``'<=' not supported between
float and str``) without naming what was wrong. Each public entry point checks its arguments
here first, against the dataclass field or annotation it ends up in.

Numbers are checked, not converted: ``epochs="2"`` is refused rather than read as 2, so that a
value read from a config file as a string is noticed where it goes in. ``bool`` is not a number
here (``lr=True`` is a mistake) and an integer is a valid float.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np

from .errors import UsageError

T = TypeVar("T")


def check_argument(name: str, value: Any, hint: Any, *, where: str = "") -> None:
    """Raise ``UsageError`` naming ``name`` unless ``value`` fits the type ``hint``.

    ``hint``: ``int``, ``float``, ``str``, ``bool``, ``os.PathLike``, ``None``, a union of these
    (``X | None``), ``tuple[...]``/``list[...]`` (any sequence of the element type), ``dict``,
    ``Any`` or a class (``isinstance``).
    """
    if not _fits(value, hint):
        at = f"{where}: " if where else ""
        raise UsageError(f"{at}{name} must be {_describe(hint)}, got {value!r} "
                         f"({type(value).__name__})")


def check_fields(cls: type, values: Mapping[str, Any], *, where: str = "") -> None:
    """Check each of ``values`` against the annotation of the same field of dataclass ``cls``
    (names that are not fields are left to the caller, which names them as unknown)."""
    hints = _hints(cls)
    for name, value in values.items():
        if name in hints and value is not None:
            check_argument(name, value, hints[name], where=where)


def as_settings(cls: type[T], value: T | Mapping[str, Any] | None, *, name: str) -> T | None:
    """A settings dataclass from an instance (as is), a dict of its fields, or None.

    ``finetune={"epochs": 2}`` reads as ``InnerLoopSettings(epochs=2)``; an unknown key or a
    wrongly typed value is refused by name.
    """
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise UsageError(f"{name} must be a {cls.__name__} or a dict of its fields, got "
                         f"{value!r} ({type(value).__name__})")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise UsageError(f"{name}: unknown field(s) {', '.join(map(str, unknown))}; "
                         f"{cls.__name__} has {', '.join(sorted(known))}")
    check_fields(cls, value, where=name)
    return cls(**value)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any or hint is typing.Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is typing.Union or isinstance(hint, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return all(_fits(v, args[0]) for v in value) if args else True
    if origin is not None:  # dict[...], Mapping[...]: the container only
        return isinstance(value, origin)
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is os.PathLike:
        return isinstance(value, (str, os.PathLike))
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if hint is None or hint is type(None):
        return "None"
    origin = typing.get_origin(hint)
    if origin is typing.Union or isinstance(hint, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        return f"a list of {plural.get(args[0], _describe(args[0]))}" if args else "a list"
    if origin is not None:
        return f"a {origin.__name__}"
    return {bool: "True or False", int: "an integer", float: "a number", str: "a string",
            os.PathLike: "a path"}.get(hint, f"a {getattr(hint, '__name__', hint)}")


def check_call(fn: Any, values: Mapping[str, Any], *, skip: tuple[str, ...] = ()) -> None:
    """Check a call's arguments against ``fn``'s annotations: ``check_call(f, locals())`` as
    the first line of ``f`` (``locals()`` then holds exactly the arguments)."""
    hints = _hints(fn)
    for name, value in values.items():
        if name in hints and name != "return" and name not in skip:
            check_argument(name, value, hints[name], where=fn.__name__)
