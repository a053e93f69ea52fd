"""Registry of training methods. `build(cfg.method, model)` returns a `Method`; an unknown name
fails with the list of known ones.

A method registers itself with `@register(name)` on its `Method` subclass (built as
`cls(cfg, model)`) or on a factory function `(cfg, model) -> Method`; a factory says which class
it builds (`method_class=`) so its capabilities can be read without building it. Any module may
register one (see docs/extending.md).

A method's own settings are a dataclass named by its class (`Method.settings_class`); the
registry tells the config layer which class each name has (`clipkit.method_config`), so YAML,
flags and saved configs are read with it.

This module imports no torch: clipkit's own methods are named in `_BUILTIN` with the module that
registers each, imported on first use, and their settings classes in `_BUILTIN_SETTINGS` (torch-
free modules), so `clipkit pretrain --help` lists the names and builds the flags at once.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from clipkit import method_config
from clipkit.config import ConfigError, MethodConfig

if TYPE_CHECKING:
    from clipkit.methods.base import Method

_METHODS: dict[str, Callable[..., Method]] = {}
_CLASSES: dict[str, type[Method]] = {}
# clipkit's own methods: name -> the module whose import registers it (tests check they agree).
_BUILTIN = {
    "clip": "clipkit.methods.clip",
    "flip": "clipkit.methods.flip",
    "aclip": "clipkit.methods.aclip",
    "aclip-eff": "clipkit.methods.aclip",
    "attmask-high": "clipkit.methods.aclip",
}
# Their settings classes ("module:class", None: no settings); the classes' `settings_class` agree.
_ACLIP_SETTINGS = "clipkit.methods.aclip_settings:ACLIPSettings"
_BUILTIN_SETTINGS = {
    "clip": None,
    "flip": "clipkit.methods.aclip_settings:FLIPSettings",
    "aclip": _ACLIP_SETTINGS,
    "aclip-eff": _ACLIP_SETTINGS,
    "attmask-high": _ACLIP_SETTINGS,
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


def settings_class(name: str) -> type | None:
    """The settings dataclass of method `name` (None: it has none), without importing torch for
    clipkit's own methods."""
    check_name(name)
    if name in _CLASSES:
        return _CLASSES[name].settings_class
    spec = _BUILTIN_SETTINGS[name]
    if spec is None:
        return None
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def settings_classes() -> dict[str, type | None]:
    """Every registered method name -> its settings class."""
    return {name: settings_class(name) for name in list_methods()}


def build(cfg: MethodConfig, model) -> Method:
    """The method `cfg.name`; its factory reads `cfg.settings` (the method's settings object)."""
    cfg.coerce()  # the name is known and the settings are the method's own class (or defaults)
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


method_config.install_registry(sys.modules[__name__])

__all__ = [
    "Method",
    "ViewSpec",
    "build",
    "check_name",
    "list_methods",
    "method_class",
    "register",
    "settings_class",
    "settings_classes",
]
