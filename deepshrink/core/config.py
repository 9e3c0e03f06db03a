"""Typed, validated method configs and layer scopes.

A config is a frozen dataclass: a Python call, a recipe step and a CLI flag all
resolve to the same object. ``from_dict`` accepts only the dataclass's own
fields, so a typo in a recipe is an error naming the key path, not a silently
ignored setting.
"""

import dataclasses
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

from torch import nn

from deepshrink.core.errors import InputError

LAYER_TYPES: dict[str, type[nn.Module]] = {"Conv2d": nn.Conv2d, "Linear": nn.Linear}


@dataclass(frozen=True)
class Scope:
    """Which layers a method touches: by type, then include/exclude name regexes."""

    types: tuple[str, ...] = ("Conv2d", "Linear")
    include: str | None = None
    exclude: str | None = None

    def __post_init__(self) -> None:
        unknown = [t for t in self.types if t not in LAYER_TYPES]
        if unknown:
            raise InputError(f"types: unknown layer type(s) {unknown}; known: {sorted(LAYER_TYPES)}")
        for key in ("include", "exclude"):
            pattern = getattr(self, key)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise InputError(f"{key}: invalid regex {pattern!r} ({exc})") from None

    def matches(self, name: str, module: nn.Module) -> bool:
        if not isinstance(module, tuple(LAYER_TYPES[t] for t in self.types)):
            return False
        if self.include is not None and not re.search(self.include, name):
            return False
        return self.exclude is None or not re.search(self.exclude, name)

    def layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """The (name, module) pairs in scope, in model order."""
        for name, module in model.named_modules():
            if self.matches(name, module):
                yield name, module


@dataclass(frozen=True)
class Config:
    """Base for method configs: ``from_dict`` validates keys and types recursively."""

    version: ClassVar[int] = 1

    @classmethod
    def from_dict(cls, values: dict[str, Any], path: str = "") -> "Config":
        return _build(cls, values, path or cls.__name__)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, values: Any, path: str) -> Any:
    if not isinstance(values, dict):
        raise InputError(f"{path}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{path}.{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise InputError(f"{path}: {exc}") from None
    except InputError as exc:  # a field's own validation: prefix the key path
        raise InputError(f"{path}.{exc}") from None


def _coerce(hint: Any, value: Any, path: str) -> Any:
    """Check ``value`` against a type hint, converting lists to tuples and dicts to nested configs."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:  # X | None: X's own error keeps the inner key path (finetune.lr, ...)
            return _coerce(options[0], value, path)
        for option in options:
            try:
                return _coerce(option, value, path)
            except InputError:
                continue
        raise InputError(f"{path}: {value!r} is not a valid {_name(hint)}")
    if origin is Literal:
        if value not in args:
            raise InputError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if hint is type(None):
        if value is not None:
            raise InputError(f"{path}: expected null")
        return None
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else _build(hint, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{path}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"{path}: expected a mapping, got {value!r}")
        return {k: _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise InputError(f"{path}: expected {hint.__name__}, got {value!r}")
    return value


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_range(path: str, value: float, low: float, high: float, high_inclusive: bool = False) -> None:
    """Raise InputError unless low <= value < high (or <= high)."""
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise InputError(f"{path} must be in [{low}, {high}{bracket}, got {value}")
