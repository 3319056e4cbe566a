"""How a setting is declared: once, as a field of a settings dataclass (tasks.task.TaskSettings,
runs.range_run.RangeSettings, instant.replication.ReplicationLimits, s3.store.S3Settings,
instant.connection.SessionLimits), with its default, what it means, and where else it may be given:
an environment variable, a command-line option, the run's Dagster config.

Nothing else restates a setting: the Dagster config (defs/config.py), the resources, the CLI's options
(cli/commands.py) and the reading of the environment are made from these declarations, and `resolve`
turns what a run was given into its settings, each one not given from its environment variable, else
its default. Adding a setting is adding one field.
"""

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from typing import Any

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no", "")


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,  # noqa: A002 -- the word argparse and pydantic use
    env: str | None = None,
    cli: str | None = None,
    config: str | None = "",
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A settings dataclass's field: its `default` (or `default_factory`), what it means (`help`),
    the environment variable (`env`) and command-line option (`cli`, e.g. "--batch-size") that may
    give it, and its name in a run's Dagster config (`config`: the field's own name by default,
    None when a run's config cannot set it)."""
    metadata = {"help": help, "env": env, "cli": cli, "config": config}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Declared:
    """One declared setting, as the Dagster config, the CLI and the environment see it."""

    name: str  # the field's
    type: Any  # int, float, bool, str, an enum, tuple[str, ...]
    optional: bool  # None is a value (unset)
    default: Any
    help: str
    env: str | None
    cli: str | None
    config: str | None  # its name in a run's Dagster config, if it has one

    @property
    def given_as(self) -> str:
        """Its name where it is given: in the config, else on the command line."""
        return self.config or (self.cli or self.name).lstrip("-").replace("-", "_")

    def default_text(self) -> str:
        default = self.default
        if default is None:
            return "unset"
        if isinstance(default, enum.Enum):
            return str(default.value)
        if isinstance(default, tuple):
            return ",".join(default) or "none"
        if isinstance(default, bool):
            return str(default).lower()
        if isinstance(default, float):
            return f"{default:g}"
        return str(default)

    def describe(self) -> str:
        """Its help, with where its value comes from when it is not given."""
        unset = f"Unset: {self.env}, else {self.default_text()}." if self.env else f"Default {self.default_text()}."
        return f"{self.help} {unset}"

    def parse(self, text: str, source: str) -> Any:
        """`text` (an environment variable's, an option's) as this setting's value; a ValueError that
        names `source` when it is not one."""
        raw = text.strip()
        if self.optional and not raw:
            return None
        if self.type is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError(f"{source}={text!r} is not true or false")
        if self.type is int:
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{source}={text!r} is not a whole number") from None
        if self.type is float:
            try:
                return float(raw)
            except ValueError:
                raise ValueError(f"{source}={text!r} is not a number") from None
        if self.type == tuple[str, ...]:
            return tuple(name.strip() for name in raw.split(",") if name.strip())
        if isinstance(self.type, type) and issubclass(self.type, enum.Enum):
            try:
                return self.type(raw.lower())
            except ValueError:
                choices = ", ".join(str(member.value) for member in self.type)
                raise ValueError(f"{source}={text!r} is not one of {choices}") from None
        return raw

    def coerce(self, value: Any, source: str) -> Any:
        """A value given in the config or on the command line, as this setting's type."""
        if isinstance(value, str) and self.type is not str:
            return self.parse(value, source)
        if self.type == tuple[str, ...] and isinstance(value, list):
            return tuple(value)
        return value


def declared(settings_class: type) -> list[Declared]:
    """The settings `settings_class` declares (its fields made with `setting`), in their order."""
    hints = typing.get_type_hints(settings_class)
    found = []
    for field in dataclasses.fields(settings_class):
        if "help" not in field.metadata:
            continue
        kind, optional = _unwrapped(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else None
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        config = field.metadata["config"]
        found.append(
            Declared(
                field.name,
                kind,
                optional,
                default,
                field.metadata["help"],
                field.metadata["env"],
                field.metadata["cli"],
                field.name if config == "" else config,
            )
        )
    return found


def _unwrapped(hint: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of a field's type hint."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [member for member in typing.get_args(hint) if member is not type(None)]
        return members[0], True
    return hint, False


def setting_help(settings_class: type, name: str) -> str:
    """What `settings_class` says its setting `name` means."""
    return next(d.help for d in declared(settings_class) if d.name == name)


def resolve(settings_class: type, given: Mapping[str, Any], environ: Mapping[str, str], **fixed: Any) -> Any:
    """`settings_class`'s settings: each from `given` (keyed by config name: the run's Dagster config,
    the CLI's options) unless it is None there, else from its environment variable when that is set,
    else its default; `fixed` ones (not declared settings) as they are. ValueError naming what was
    wrong and where."""
    values = dict(fixed)
    for setting_ in declared(settings_class):
        value = given.get(setting_.given_as)
        if value is not None:
            values[setting_.name] = setting_.coerce(value, setting_.given_as)
        elif setting_.env and environ.get(setting_.env, "").strip():
            values[setting_.name] = setting_.parse(environ[setting_.env], setting_.env)
    return settings_class(**values)
