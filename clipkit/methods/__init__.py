"""Registry of training methods. `build(cfg.method, model)` returns a `Method`; an unknown name
fails with the list of known ones.

A method registers itself with `@register(name)` on its `Method` subclass (built as
`cls(cfg, model)`) or on a factory function `(cfg, model) -> Method`; a factory says which class
it builds (`method_class=`) so its capabilities can be read without building it. Any module may
register one (see docs/extending.md); clipkit's own are imported on first use of the registry, which
keeps `clipkit --help` from importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from clipkit.config import ConfigError, MethodConfig
from clipkit.data.views import ViewSpec
from clipkit.methods.base import Method

_METHODS: dict[str, Callable[..., Method]] = {}
_CLASSES: dict[str, type[Method]] = {}
# Modules that register methods when imported (kept lazy so `clipkit --help` stays instant).
_MODULES = ("clipkit.methods.clip", "clipkit.methods.aclip")


def register(name: str, method_class: type[Method] | None = None):
    """Decorator: make a `Method` subclass, or a factory of one, trainable as `--method name`."""

    def wrap(factory):
        built = factory if isinstance(factory, type) else method_class
        if built is None or not issubclass(built, Method):
            raise TypeError(f"method '{name}': register a Method subclass or pass method_class=")
        _METHODS[name] = factory
        _CLASSES[name] = built
        return factory

    return wrap


def _load_all() -> None:
    for mod in _MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a method module not written yet
            if e.name != mod:
                raise


def list_methods(capability: str | None = None) -> list[str]:
    """Registered method names, sorted; with `capability` (e.g. "has_ema"), only the methods
    whose class declares it true."""
    _load_all()
    return sorted(
        n for n, cls in _CLASSES.items() if capability is None or getattr(cls, capability)
    )


def method_class(name: str) -> type[Method]:
    """The class `name` builds (its declared capabilities); ConfigError for an unknown name."""
    check_name(name)
    return _CLASSES[name]


def check_name(name: str) -> None:
    """ConfigError unless `name` is a registered method (checked before a run writes anything)."""
    _load_all()
    if name not in _METHODS:
        raise ConfigError(f"unknown method '{name}' (known: {', '.join(sorted(_METHODS))})")


def build(cfg: MethodConfig, model) -> Method:
    check_name(cfg.name)
    return _METHODS[cfg.name](cfg, model)


__all__ = ["Method", "ViewSpec", "build", "check_name", "list_methods", "method_class", "register"]
