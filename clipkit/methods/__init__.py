"""Registry of training methods. `build(cfg.method, model)` returns a `Method`; an unknown name
fails with the list of known ones."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from clipkit.config import ConfigError, MethodConfig
from clipkit.data.views import ViewSpec
from clipkit.methods.base import Method

_METHODS: dict[str, Callable[..., Method]] = {}
# Modules that register methods when imported (kept lazy so `clipkit --help` stays instant).
_MODULES = ("clipkit.methods.clip", "clipkit.methods.aclip")


def register(name: str):
    def wrap(factory):
        _METHODS[name] = factory
        return factory

    return wrap


def _load_all() -> None:
    for mod in _MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a method module not written yet
            if e.name != mod:
                raise


def list_methods() -> list[str]:
    _load_all()
    return sorted(_METHODS)


def build(cfg: MethodConfig, model) -> Method:
    _load_all()
    if cfg.name not in _METHODS:
        raise ConfigError(f"unknown method '{cfg.name}' (known: {', '.join(sorted(_METHODS))})")
    return _METHODS[cfg.name](cfg, model)


__all__ = ["Method", "ViewSpec", "build", "list_methods", "register"]
