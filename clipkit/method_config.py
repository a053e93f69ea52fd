"""The `method` section of a run config: the method's `name`, settings every method shares, and
the chosen method's own settings (a dataclass its module declares, `Method.settings_class`).

In YAML, flags and saved configs the section stays one flat mapping
(`method: {name: aclip, keep_ratio: 0.5}`). Which settings class a name has is known to the method
registry (`clipkit.methods`, a layer above this one); importing it installs it here
(`install_registry`), so this module asks it without importing it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from clipkit.config_types import ConfigError, converted, field_types

CONTRASTIVE_LOSSES = ("clip", "siglip")  # --loss: clipkit.methods.base.Method.contrastive
FLAGS_SOURCE = "the command-line flags"  # merge's `source` for flags: errors then name the flag


class SettingsRegistry(Protocol):
    def settings_classes(self) -> dict[str, type | None]:
        """Every registered method name -> its settings class (None: no settings)."""

    def check_name(self, name: str) -> None:
        """ConfigError unless `name` is a registered method."""


_registry: SettingsRegistry | None = None


def install_registry(registry: SettingsRegistry) -> None:
    global _registry
    _registry = registry


def _methods() -> SettingsRegistry:
    if _registry is None:
        raise RuntimeError("import clipkit.methods first: it knows which settings each method has")
    return _registry


def setting(default: Any, help: str, *, flag: str | None = None, cli: bool = True) -> Any:
    """A field of a method's settings dataclass: its default, a one-line help (the flag's help,
    after the names of the methods it applies to), and its flag: `--name-with-dashes` unless
    `flag` spells it (a bool's `--on/--off` pair); `cli=False`: YAML only."""
    return field(default=default, metadata={"help": help, "flag": flag, "cli": cli})


def flag_of(f: dataclasses.Field) -> str:
    """The flag a settings field is given with (a bool: `--x/--no-x` unless spelled otherwise)."""
    dashed = "--" + f.name.replace("_", "-")
    default = f"{dashed}/--no-{dashed[2:]}" if f.type in (bool, "bool") else dashed
    return f.metadata.get("flag") or default


def methods_with_setting(key: str) -> list[str]:
    """The registered methods whose settings have `key`, sorted."""
    classes = _methods().settings_classes()
    return sorted(n for n, c in classes.items() if c is not None and key in _names(c))


def _names(settings_class: type | None) -> set[str]:
    return {f.name for f in fields(settings_class)} if settings_class is not None else set()


@dataclass
class MethodConfig:
    """`settings` is the method's own settings object, None for a method without any. A setting
    every method shares (whatever the method) is a plain field here, beside `name`: it is read,
    converted, saved and checked on resume like any other section's field."""

    name: str = "clip"  # a registered method: clipkit.methods.list_methods()
    loss: str = "clip"  # the contrastive loss: clip (InfoNCE) | siglip (pairwise sigmoid)
    distill_from: str | None = None  # a frozen teacher: checkpoint, run dir or local-dir:DIR
    distill_weight: float = 1.0  # weight of the distillation term beside the contrastive loss
    settings: Any = None

    def __post_init__(self) -> None:
        # Settings the user gave (YAML, flags), re-applied when a later layer changes the method;
        # those that do not apply to the final method are refused by `check`.
        self._given: dict[str, tuple[Any, str | None]] = {}
        if self.settings is None and _registry is not None:
            cls = _registry.settings_classes().get(self.name)
            self.settings = cls() if cls is not None else None

    @classmethod
    def of(cls, name: str, **settings: Any) -> MethodConfig:
        """The config of method `name` with some settings changed (ConfigError for one that the
        method does not have)."""
        cfg = cls(name=name)
        cfg.update(settings)
        cfg.coerce()
        cfg.check()
        return cfg

    def common_fields(self) -> list[str]:
        return [f.name for f in fields(self) if f.name != "settings"]

    def to_dict(self) -> dict:
        """The flat section: common fields, then the method's settings."""
        flat = {key: getattr(self, key) for key in self.common_fields()}
        if self.settings is not None:
            flat.update(dataclasses.asdict(self.settings))
        return flat

    def update(self, values: dict, source: str | None = None, saved: bool = False) -> None:
        """Apply one layer's values. A user's (`saved` False) setting is kept until the method is
        final; a saved config's setting of another method (old configs hold every method's keys)
        is dropped."""
        origin = f" (in {source})" if source else ""
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        if "name" in values:
            self.name = converted("method.name", values.pop("name"), str, origin)
        common = set(self.common_fields())
        known = common | {k for c in _methods().settings_classes().values() for k in _names(c)}
        saved_values = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"unknown option 'method.{key}'{origin} (known: {sorted(known)})")
            if key in common:
                hint = field_types(type(self))[key]
                setattr(self, key, converted(f"method.{key}", value, hint, origin))
            elif saved:
                saved_values[key] = (value, source)
            else:
                self._given[key] = (value, source)
        self._rebase(saved_values)

    def _settings_class(self) -> type | None:
        return _methods().settings_classes().get(self.name)  # None too for an unknown name

    def _rebase(self, saved_values: dict) -> None:
        """Settings of the current method: kept if the class is the same, else its defaults;
        then the saved values and the user's that apply, converted to the fields' types."""
        cls = self._settings_class()
        if type(self.settings) is not cls:
            self.settings = cls() if cls is not None else None
        applies = _names(cls)
        for key, (value, source) in [*saved_values.items(), *self._given.items()]:
            if key in applies:
                origin = f" (in {source})" if source else ""
                hint = field_types(cls)[key]
                setattr(self.settings, key, converted(f"method.{key}", value, hint, origin))

    def coerce(self) -> None:
        """Check the name and convert every value to its field's type (for configs built
        directly); the settings object must be the method's own class."""
        _methods().check_name(self.name)
        cls = self._settings_class()
        if self.settings is None and cls is not None:
            self.settings = cls()
        if type(self.settings) is not (cls or type(None)):
            wanted = cls.__name__ if cls is not None else "no settings"
            raise ConfigError(
                f"method '{self.name}' takes {wanted}, not {type(self.settings).__name__}"
            )
        for key in self.common_fields():
            hint = field_types(type(self))[key]
            setattr(self, key, converted(f"method.{key}", getattr(self, key), hint))
        for f in fields(cls) if cls is not None else ():
            value = getattr(self.settings, f.name)
            setattr(
                self.settings,
                f.name,
                converted(f"method.{f.name}", value, field_types(cls)[f.name]),
            )

    def check(self) -> None:
        """Refuse a given setting the method does not have, then run the settings' own checks."""
        if self.loss not in CONTRASTIVE_LOSSES:
            raise ConfigError(f"--loss must be one of {', '.join(CONTRASTIVE_LOSSES)}")
        if not self.distill_weight > 0:
            raise ConfigError("--distill-weight must be > 0")
        applies = _names(self._settings_class())
        for key, (_, source) in self._given.items():
            if key not in applies:
                raise ConfigError(self._not_applying(key, source))
        check = getattr(self.settings, "check", None)
        if check is not None:
            check()

    def _not_applying(self, key: str, source: str | None) -> str:
        owners = methods_with_setting(key)
        where = f"it is a setting of: {', '.join(owners)}"
        if source == FLAGS_SOURCE:
            owner_class = _methods().settings_classes()[owners[0]]
            flag = flag_of(next(f for f in fields(owner_class) if f.name == key))
            return f"{flag.split('/')[0]} does not apply to --method {self.name} ({where})"
        origin = f" (in {source})" if source else ""
        return f"method.{key}{origin} does not apply to method {self.name} ({where})"
