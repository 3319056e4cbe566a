"""Materialize partitions of `files_s3_attrs` (or of its refresh) through Dagster, in this process, and
summarise them."""

import dataclasses
import functools
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor

import dagster as dg

from s3_attrs_pipeline.defs.assets import BackfillConfig, files_s3_attrs
from s3_attrs_pipeline.defs.partitions import app_id_prefix_partitions
from s3_attrs_pipeline.defs.refresh import files_s3_attrs_refresh
from s3_attrs_pipeline.defs.resources import resources_from_env


@dataclasses.dataclass(frozen=True)
class PartitionRun:
    partition_key: str
    run_id: str
    success: bool
    metadata: dict  # the materialization's (or the failure's) numbers
    error: str | None


@functools.cache
def dagster_instance() -> dg.DagsterInstance:
    """The instance of DAGSTER_HOME, so runs show in the UI; an ephemeral one without it."""
    if os.environ.get("DAGSTER_HOME"):
        return dg.DagsterInstance.get()
    return dg.DagsterInstance.ephemeral()


def _numbers(metadata: dict) -> dict:
    return {k: v.value for k, v in metadata.items() if isinstance(v, (dg.IntMetadataValue, dg.FloatMetadataValue))}


def _failure(result: dg.ExecuteInProcessResult) -> tuple[str, dict]:
    """The failed step's own message (beneath Dagster's retry wrapper) and its numbers."""
    for event in result.all_events:
        if event.is_step_failure:
            user_failure = event.step_failure_data.user_failure_data
            metadata = _numbers(user_failure.metadata) if user_failure else {}
            error, messages = event.step_failure_data.error, []
            while error is not None:
                messages.append(error.message.strip())
                error = error.cause
            description = user_failure.description if user_failure else None
            return description or (messages[-1] if messages else "unknown error"), metadata
    return "the run failed before its step started", {}


# By name: the worker processes receive the name, not the definition.
PARTITIONED_ASSETS = {asset.key.to_user_string(): asset for asset in (files_s3_attrs, files_s3_attrs_refresh)}


def materialize_partition(
    instance: dg.DagsterInstance,
    partition_key: str,
    *,
    config: BackfillConfig,
    asset_name: str = "files_s3_attrs",
    log_level: str = "INFO",
    tags: dict[str, str] | None = None,
) -> PartitionRun:
    result = dg.materialize(
        [PARTITIONED_ASSETS[asset_name]],
        partition_key=partition_key,
        instance=instance,
        resources=resources_from_env(),
        run_config=dg.RunConfig(
            ops={asset_name: config},
            loggers={"console": {"config": {"log_level": log_level}}},
        ),
        tags=tags,
        raise_on_error=False,
    )
    if result.success:
        materialization = result.asset_materializations_for_node(asset_name)[0]
        return PartitionRun(partition_key, result.run_id, True, _numbers(materialization.metadata), None)
    error, metadata = _failure(result)
    return PartitionRun(partition_key, result.run_id, False, metadata, error)


def all_partition_keys() -> list[str]:
    return app_id_prefix_partitions.get_partition_keys()


def materialize_partitions(
    partition_keys: Sequence[str], *, parallel: int, **run_options
) -> Iterator[PartitionRun]:
    """One Dagster run per partition, `parallel` at a time in worker processes (Dagster's in-process
    execution is not thread-safe); yields each run as it ends. `run_options` go to materialize_partition."""
    # Opening the instance here first creates its storage tables once, not in racing workers.
    instance = dagster_instance()
    if parallel <= 1:
        for key in partition_keys:
            yield materialize_partition(instance, key, **run_options)
        return
    with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_materialize_in_worker, key, run_options) for key in partition_keys]
        for future in futures:
            yield future.result()


def _materialize_in_worker(partition_key: str, run_options: dict) -> PartitionRun:
    return materialize_partition(dagster_instance(), partition_key, **run_options)
