"""Reading configuration values as their declared types (shared by every config section,
including the settings each training method declares), and the error a user mistake raises."""

from __future__ import annotations

import functools
import math
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A user mistake in the configuration; the CLI prints it on one line and exits 2."""


class NotConvertible(ValueError):
    """`value` cannot be read as the field's type; carries the wording of the expected type."""


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """A dataclass's field types, resolved (cached: read once per class)."""
    return typing.get_type_hints(cls)


def converted(label: str, value: Any, hint: Any, origin: str = "") -> Any:
    """`value` as type `hint`, or a ConfigError naming `label` (e.g. `optim.lr`) and `origin`."""
    try:
        return convert(value, hint)
    except NotConvertible as e:
        shown = "null" if value is None else repr(value)
        raise ConfigError(f"{label} = {shown}{origin} is not {e}") from None


def convert(value: Any, hint: Any) -> Any:
    """`value` as type `hint` (int, float, bool, str, dict, list[X], or X | None)."""
    if typing.get_origin(hint) is list:
        return _to_list(value, typing.get_args(hint)[0])
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        try:
            return convert(value, inner)
        except NotConvertible as e:
            raise NotConvertible(f"{e} or null") from None
    return _CONVERTERS[hint](value)


def _to_int(value: Any) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass  # maybe `1e4` or `6.0`, which YAML leaves as strings
    # bool is an int subclass in Python, but `batch_size: true` is a mistake, not 1.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        number = _to_float(value)
    except NotConvertible:
        number = math.nan
    # 6.0 means 6; 5.5 is refused rather than silently rounded.
    if math.isfinite(number) and number.is_integer():
        return int(number)
    raise NotConvertible("an integer")


def _to_float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise NotConvertible("a number")


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True}
_BOOL_WORDS |= {"false": False, "no": False, "off": False, "0": False}


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, str)) and str(value).strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[str(value).strip().lower()]
    raise NotConvertible("true or false")


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    # A number where a name is expected (`name: 1e3`, `text_key: 0`) would lose its spelling.
    raise NotConvertible("a string (quote it in YAML)")


def _to_dict(value: Any) -> dict:
    if isinstance(value, dict):
        return value
    raise NotConvertible("a mapping")


def _to_list(value: Any, item: Any) -> list:
    """A list (a tuple of repeated flags too), each item converted; one bare item is a list of
    one (`eval: zero-shot:wds:DIR`)."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        return [convert(v, item) for v in items]
    except NotConvertible as e:
        raise NotConvertible(f"a list, each item {e}") from None


_CONVERTERS = {int: _to_int, float: _to_float, bool: _to_bool, str: _to_str, dict: _to_dict}
