"""Typed settings from YAML-like values: the one reader behind TrainConfig and every method's settings dataclass.

A leaf module. Values come from YAML files, ``--set key=value`` and saved configs, so they arrive as YAML
types; each is checked against the field's annotation (``float | None``, ``int``, ``list[str]``, ...) and
converted (``1e-3`` read by YAML 1.1 as a string is still a number). Anything else is a ``FixNormError``
that names the setting.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeVar

from .errors import FixNormError

T = TypeVar("T")


def _alternatives(kind: str) -> list[str]:
    """``"float | str | None"`` -> ``["float", "str", "None"]`` (top-level union members only)."""
    parts, depth, current = [], 0, ""
    for char in kind:
        depth += char == "["
        depth -= char == "]"
        if char == "|" and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return parts


def _one(name: str, kind: str, value: Any) -> Any:
    """``value`` as a ``kind`` (one union member); raises FixNormError when it is not one."""
    if kind in ("Any", "object"):
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise FixNormError(f"{name} must be true or false, got {value!r}")
        return value
    if kind in ("float", "int"):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise FixNormError(f"{name} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FixNormError(f"{name} must be a number, got {value!r}")
        if kind == "int" and float(value) != int(value):
            raise FixNormError(f"{name} must be an integer, got {value!r}")
        return int(value) if kind == "int" else float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise FixNormError(f"{name} must be a string, got {value!r}")
        return value
    if kind.startswith("tuple"):
        if not isinstance(value, (list, tuple)):
            raise FixNormError(f"{name} must be a list, got {value!r}")
        return tuple(_one(name, "float", v) for v in value)
    if kind.startswith("list"):
        if not isinstance(value, (list, tuple)):
            raise FixNormError(f"{name} must be a list, got {value!r}")
        item = kind[kind.index("[") + 1:-1] if "[" in kind else "Any"
        return [coerce(f"{name}[{i}]", item, v) for i, v in enumerate(value)]
    if kind.startswith("dict"):
        if not isinstance(value, Mapping):
            raise FixNormError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    return value


def coerce(name: str, kind: str, value: Any) -> Any:
    """``value`` checked and converted to the annotation ``kind`` (a string, as dataclass fields hold them)."""
    options = _alternatives(kind)
    if value is None:
        if "None" not in options:
            raise FixNormError(f"{name} cannot be null")
        return None
    options = [o for o in options if o != "None"]
    # a string is tried last: "reference" may be a str, but 0.5 given for "str | float" is the number
    options.sort(key=lambda o: o == "str")
    errors = {}
    for option in options:
        try:
            return _one(name, option, value)
        except FixNormError as exc:
            errors[option] = str(exc)
    # the member of the value's own shape says best what is wrong inside it (a list with a number in it)
    same_shape = options if len(options) == 1 else [
        o for o in options if isinstance(value, (list, tuple)) == o.startswith(("list", "tuple"))]
    if len(same_shape) == 1:
        raise FixNormError(errors[same_shape[0]])
    raise FixNormError(f"{name}: {value!r} is none of {' | '.join(options)}")


def read_settings(cls: type[T], given: Mapping[str, Any] | None, where: str) -> T:
    """An instance of the settings dataclass ``cls`` from ``given`` over its defaults; unknown keys are errors.

    ``where`` names the settings in messages (``method_kwargs.lawn``).
    """
    given = {} if given is None else given
    if not isinstance(given, Mapping):
        raise FixNormError(f"{where} must be a mapping of settings, got {given!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise FixNormError(f"unknown setting(s) {unknown} for {where}; known: {sorted(fields)}")
    values = {key: coerce(f"{where}.{key}", str(fields[key].type), value) for key, value in given.items()}
    return cls(**values)
