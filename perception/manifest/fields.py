"""Checks every manifest field runs on construction: declared types held strictly, the way JSON
carries them, and the ranges and shapes of the values the server sizes buffers and loops by."""

from __future__ import annotations

import dataclasses
import os
import re
import reprlib
import types
import typing
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any

from perception.errors import ManifestError


def to_enum(cls: type[Enum], value: Any, what: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise ManifestError(f"{what} must be one of {[m.value for m in cls]}, got {value!r}") from None


def conforms(value: Any, tp: Any) -> bool:
    """Whether ``value`` has the declared type ``tp``, strictly: a bool is not an int, a float
    is not an int (an int is a float), a list is not a tuple (the loader turns the JSON lists
    of tuple fields into tuples)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args, strict=True))
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items())
    return isinstance(value, tp)  # str, bool, Path, an enum, a nested spec


@cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def type_name(tp: Any) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return re.sub(r"\b(?:typing|[a-z_]+(?:\.[a-z_]+)+)\.", "", str(tp))


def check_types(obj: Any, what: str) -> None:
    """Every field of ``obj`` (a manifest dataclass) holds its declared type."""
    hints = field_types(obj.__class__)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not conforms(value, hints[f.name]):
            raise ManifestError(f"{what}: {f.name} must be {type_name(hints[f.name])}, got {reprlib.repr(value)}")


def check_range(value: int, lo: int, hi: int, what: str) -> None:
    if not lo <= value <= hi:
        raise ManifestError(f"{what} must be in {lo}..{hi}, got {value}")


def check_relative(path: str, what: str) -> None:
    """A path the manifest names must stay inside the artifact directory."""
    if not path or os.path.isabs(path) or ".." in Path(path).parts or "\0" in path:
        raise ManifestError(f"{what}: file must be a relative path inside the artifact dir, got {path!r}")


def check_sha(sha: str, what: str) -> None:
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ManifestError(f"{what}: sha256 must be 64 lowercase hex digits, got {sha!r}")


def tuple_fields(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``d`` with the JSON lists of its tuple-typed ``keys`` as tuples (the types are strict)."""
    return {k: (tuple(v) if k in keys and isinstance(v, list) else v) for k, v in d.items()}
