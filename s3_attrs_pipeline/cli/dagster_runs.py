"""The CLI's Dagster runs, made in its own process: one run of `files_s3_attrs` (or of its refresh) over a
range of partitions, as a backfill from the UI runs it, recorded in the instance of DAGSTER_HOME; and
a run of the checks."""

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import dagster as dg

from s3_attrs_pipeline import deployment, environment
from s3_attrs_pipeline.defs.assets import partitioned_assets
from s3_attrs_pipeline.defs.checks import CHECK_SPECS, verify_files_s3_attrs
from s3_attrs_pipeline.defs.config import RunConfig
from s3_attrs_pipeline.defs.partitions import range_tags
from s3_attrs_pipeline.defs.resources import resources_from_env
from s3_attrs_pipeline.runs.range_run import Listener, NoListener


@dataclasses.dataclass(frozen=True)
class RangeRun:
    run_id: str
    success: bool
    error: str | None  # the failed step's own message; its partitions' outcomes reach the listener
    interrupted: bool = False  # by Ctrl-C or SIGTERM (Dagster turns SIGTERM into an interrupt during a run)


def dagster_instance(environ: Mapping[str, str] | None = None) -> dg.DagsterInstance:
    """The instance of DAGSTER_HOME, so runs show in the UI; an ephemeral one without it."""
    environ = environment.read() if environ is None else environ
    return _instance(environ.get(environment.DAGSTER_HOME) or None)


@functools.cache
def _instance(dagster_home: str | None) -> dg.DagsterInstance:
    if dagster_home:
        return dg.DagsterInstance.get()  # Dagster reads DAGSTER_HOME itself
    return dg.DagsterInstance.ephemeral()


# What Dagster raises in a step that an interrupt reached; the step's failure names its class.
_INTERRUPTS = ("DagsterExecutionInterruptedError", "KeyboardInterrupt")


def _interrupted(result: dg.ExecuteInProcessResult) -> bool:
    for event in result.all_events:
        error = event.step_failure_data.error if event.is_step_failure else None
        while error is not None:
            if error.cls_name in _INTERRUPTS:
                return True
            error = error.cause
    return result.dagster_run.status is dg.DagsterRunStatus.CANCELED


def _failure(result: dg.ExecuteInProcessResult) -> str:
    """The failed step's own message, beneath Dagster's retry wrapper."""
    for event in result.all_events:
        if event.is_step_failure:
            user_failure = event.step_failure_data.user_failure_data
            if user_failure and user_failure.description:
                return user_failure.description
            error, messages = event.step_failure_data.error, []
            while error is not None:
                messages.append(error.message.strip())
                error = error.cause
            return messages[-1] if messages else "unknown error"
    return "the run failed before its step started"


def materialize_range(
    instance: dg.DagsterInstance,
    partition_keys: Sequence[str],
    environ: Mapping[str, str],
    *,
    config: RunConfig,
    asset_name: str = "files_s3_attrs",
    listener: Listener = NoListener(),
    log_level: str = "CRITICAL",
    tags: dict[str, str] | None = None,
) -> RangeRun:
    """One run of `asset_name` over the partitions from the first of `partition_keys` to the last, as a
    backfill launched from the UI runs them, in this process."""
    result = dg.materialize(
        [_assets(environ)[asset_name]],
        instance=instance,
        resources=resources_from_env() | {"run_progress": dg.ResourceDefinition.hardcoded_resource(listener)},
        run_config=dg.RunConfig(
            ops={asset_name: config},
            loggers={"console": {"config": {"log_level": log_level}}},
        ),
        tags=(tags or {}) | range_tags(list(partition_keys)),
        raise_on_error=False,
    )
    if result.success:
        return RangeRun(result.run_id, True, None)
    return RangeRun(result.run_id, False, _failure(result), interrupted=_interrupted(result))


def _assets(environ: Mapping[str, str]) -> dict[str, dg.AssetsDefinition]:
    return {asset.key.to_user_string(): asset for asset in partitioned_assets(deployment.current(environ))}


def shown_materialized(
    instance: dg.DagsterInstance, partition_keys: Sequence[str], environ: Mapping[str, str], *, asset_name: str
) -> bool:
    """Whether each of `partition_keys` shows `asset_name` materialized (not failed since, nor in progress)."""
    asset = _assets(environ)[asset_name]
    status = instance.get_status_by_partition(asset.key, list(partition_keys), asset.partitions_def) or {}
    return all(status.get(key) is dg.AssetPartitionStatus.MATERIALIZED for key in partition_keys)


def all_partition_keys(environ: Mapping[str, str] | None = None) -> list[str]:
    return deployment.current(environment.read() if environ is None else environ).partition_keys


def contiguous_ranges(partition_keys: Sequence[str]) -> list[list[str]]:
    """`partition_keys` as runs of neighbouring keys: a run spans a range, and must not touch the
    partitions between two that were asked for."""
    ranges: list[list[str]] = []
    for key in sorted(set(partition_keys)):
        if ranges and int(ranges[-1][-1], 16) + 1 == int(key, 16):
            ranges[-1].append(key)
        else:
            ranges.append([key])
    return ranges


def verify(instance: dg.DagsterInstance, environ: Mapping[str, str] | None = None) -> dict[str, bool]:
    """Run the checks of files_s3_attrs in this process, as their automation does after a backfill;
    whether each passed, by name."""
    files_s3_attrs, _ = partitioned_assets(deployment.current(environment.read() if environ is None else environ))
    result = dg.materialize(
        [files_s3_attrs, verify_files_s3_attrs],
        selection=dg.AssetSelection.checks(*(spec.key for spec in CHECK_SPECS)),
        instance=instance,
        resources=resources_from_env(),
        run_config=dg.RunConfig(loggers={"console": {"config": {"log_level": "CRITICAL"}}}),
        raise_on_error=False,
    )
    return {evaluation.check_name: evaluation.passed for evaluation in result.get_asset_check_evaluations()}
