"""Settings are dataclasses whose fields carry their default and a `help` text in one place; the
Dagster config, resources and CLI options read both from there rather than restating them."""

import dataclasses


def setting_help(settings_class: type, name: str) -> str:
    """The description `settings_class` gives its field `name`."""
    return next(field.metadata["help"] for field in dataclasses.fields(settings_class) if field.name == name)
