"""Registry of training methods. `build(cfg.method, model)` returns a `Method`; an unknown name
fails with the list of known ones.

A method registers itself with `@register(name)` on its `Method` subclass (built as
`cls(cfg, model)`) or on a factory function `(cfg, model) -> Method`; a factory says which class
it builds (`method_class=`) so its capabilities can be read without building it. Any module may
register one (see docs/extending.md).

This module imports no torch: clipkit's own methods are named in `_BUILTIN` with the module that
registers each, imported on first use, so `clipkit pretrain --help` can list the names at once.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from clipkit.config import ConfigError, MethodConfig

if TYPE_CHECKING:
    from clipkit.methods.base import Method

_METHODS: dict[str, Callable[..., Method]] = {}
_CLASSES: dict[str, type[Method]] = {}
# clipkit's own methods: name -> the module whose import registers it (tests check they agree).
_BUILTIN = {
    "clip": "clipkit.methods.clip",
    "flip": "clipkit.methods.aclip",
    "aclip": "clipkit.methods.aclip",
    "aclip-eff": "clipkit.methods.aclip",
    "attmask-high": "clipkit.methods.aclip",
}


def register(name: str, method_class: type[Method] | None = None):
    """Decorator: make a `Method` subclass, or a factory of one, trainable as `--method name`."""
    from clipkit.methods.base import Method  # torch; whoever registers has imported it already

    def wrap(factory):
        built = factory if isinstance(factory, type) else method_class
        if built is None or not issubclass(built, Method):
            raise TypeError(f"method '{name}': register a Method subclass or pass method_class=")
        _METHODS[name] = factory
        _CLASSES[name] = built
        return factory

    return wrap


def _load(names) -> None:
    for module in sorted({_BUILTIN[n] for n in names if n in _BUILTIN and n not in _METHODS}):
        importlib.import_module(module)


def list_methods(capability: str | None = None) -> list[str]:
    """Registered method names, sorted; with `capability` (e.g. "has_ema"), only the methods
    whose class declares it true (this imports the method modules)."""
    names = set(_BUILTIN) | set(_METHODS)
    if capability is None:
        return sorted(names)
    _load(names)
    return sorted(n for n in names if getattr(_CLASSES[n], capability))


def check_name(name: str) -> None:
    """ConfigError unless `name` is a registered method (checked before a run writes anything)."""
    if name not in _BUILTIN and name not in _METHODS:
        raise ConfigError(f"unknown method '{name}' (known: {', '.join(list_methods())})")


def method_class(name: str) -> type[Method]:
    """The class `name` builds (its declared capabilities); ConfigError for an unknown name."""
    check_name(name)
    _load([name])
    return _CLASSES[name]


def build(cfg: MethodConfig, model) -> Method:
    check_name(cfg.name)
    _load([cfg.name])
    return _METHODS[cfg.name](cfg, model)


def __getattr__(attr: str):  # `Method` / `ViewSpec` from here without importing torch up front
    if attr == "Method":
        from clipkit.methods.base import Method

        return Method
    if attr == "ViewSpec":
        from clipkit.data.views import ViewSpec

        return ViewSpec
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["Method", "ViewSpec", "build", "check_name", "list_methods", "method_class", "register"]
