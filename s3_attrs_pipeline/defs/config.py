"""A run's config (the launchpad's `ops: files_s3_attrs: config:`), made from the settings' declarations
(settings.py): one optional field per setting a run may be given, described by its help. A field
left unset takes the setting's environment variable, if set, else its default, when the run starts."""

import enum
from collections.abc import Mapping
from typing import Any

import dagster as dg
import pydantic

from s3_attrs_pipeline.instant.replication import ReplicationLimits
from s3_attrs_pipeline.runs.range_run import RangeSettings
from s3_attrs_pipeline.settings import Declared, declared, resolve
from s3_attrs_pipeline.tasks.task import TaskSettings

# The settings a run's config may give, in the order the launchpad shows them.
RUN_SETTINGS = (TaskSettings, RangeSettings, ReplicationLimits)


def _config_type(setting: Declared) -> Any:
    if isinstance(setting.type, type) and issubclass(setting.type, enum.Enum):
        return str  # the launchpad takes the level's name; the description lists them
    if setting.type == tuple[str, ...]:
        return list[str]
    return setting.type


def _description(setting: Declared) -> str:
    if isinstance(setting.type, type) and issubclass(setting.type, enum.Enum):
        return f"{setting.describe()} One of: {', '.join(str(member.value) for member in setting.type)}."
    return setting.describe()


class _RunConfigBase(dg.Config):
    def given(self) -> dict[str, Any]:
        """What the run was given, by config name; None for what it was not."""
        return self.model_dump()

    def settings(self, environ: Mapping[str, str], partition_count: int) -> tuple[TaskSettings, RangeSettings]:
        """The run's settings: what it was given, else the environment, else the defaults. ValueError
        naming what is wrong."""
        given = self.given()
        replication = resolve(ReplicationLimits, given, environ)
        task = resolve(TaskSettings, given, environ, replication=replication, partition_count=partition_count)
        return task, resolve(RangeSettings, given, environ)


RunConfig = pydantic.create_model(
    "RunConfig",
    __base__=_RunConfigBase,
    __doc__="The settings of a backfill or refresh run; unset ones from the environment, else their defaults.",
    **{
        setting.config: (_config_type(setting) | None, pydantic.Field(None, description=_description(setting)))
        for settings_class in RUN_SETTINGS
        for setting in declared(settings_class)
        if setting.config
    },
)
