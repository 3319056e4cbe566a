"""The body both partitioned assets share: a run over a range of partitions (one partition, or all of
a UI backfill: the assets' backfill policy is a single run), planned and worked by partition_range.

Each partition that ends well gets its own materialization, as it ends; partitions with nothing to do
get theirs from the plan. A run with failed partitions then fails, and Dagster marks failed exactly
the partitions of the run that were not materialized: each failed partition shows failed alone and
reruns alone."""

import dataclasses
from collections.abc import Callable, Iterator

import dagster as dg

from s3_attrs_pipeline import partition_range
from s3_attrs_pipeline.defs.metadata import numbers
from s3_attrs_pipeline.defs.partitions import PARTITION_WIDTH, app_id_prefix_partitions
from s3_attrs_pipeline.defs.resources import FileBucketResource, InstantDatabaseResource

FAILED_PARTITIONS_SHOWN = 20  # in the failure's description; the metadata names them all


def nothing_to_do(job: partition_range.Job) -> dict[str, dg.MetadataValue]:
    return numbers(**dataclasses.asdict(job.counts_type())) | {
        "nothing_to_do": dg.MetadataValue.text(f"the run's plan found nothing for the {job.name} to do here")
    }


def materialize_range(
    context: dg.AssetExecutionContext,
    config,
    instant_db: InstantDatabaseResource,
    file_bucket: FileBucketResource,
    listener: partition_range.Listener,
    job: partition_range.Job,
    metadata_of: Callable,
) -> Iterator[dg.AssetMaterialization]:
    try:
        settings = config.backfill_settings(len(app_id_prefix_partitions.get_partition_keys()))
        range_settings = config.range_settings()
    except ValueError as error:
        raise dg.Failure(description=str(error), allow_retries=False) from None
    keys = list(context.partition_keys)
    with instant_db.connect() as conn:
        plan = job.plan(conn, keys, PARTITION_WIDTH)
    if range_settings.every_partition:
        plan = partition_range.every_partition(plan)
    context.log.info(
        f"The {job.name} of {len(keys)} partitions ({keys[0]}..{keys[-1]}): {len(plan.with_work)} have work "
        f"({plan.files_to_do} files), {len(plan.without_work)} nothing to do"
    )
    listener.planned(plan)
    failed: list[partition_range.PartitionOutcome] = []
    with file_bucket.open_store() as store, partition_range.PartitionWork(
        plan.with_work,
        job=job,
        connect=instant_db.connect,
        store=store,
        settings=settings,
        log=context.log,
        listener=listener,
        range_settings=range_settings,
    ) as work:
        # Recorded while the partitions with work are worked. A retry's plan finds the partitions done
        # in the attempts before it without work: they already have their materialization.
        if context.retry_number == 0:
            for key in plan.without_work:
                yield dg.AssetMaterialization(asset_key=context.asset_key, partition=key, metadata=nothing_to_do(job))
        for outcome in work.outcomes():
            if outcome.succeeded:
                yield dg.AssetMaterialization(
                    asset_key=context.asset_key, partition=outcome.partition_key, metadata=metadata_of(outcome.report)
                )
            else:
                failed.append(outcome)
                context.log.error(f"partition {outcome.partition_key} failed: {outcome.error}")
    if failed:
        raise _failure(failed, plan, job)


def _failure(failed: list[partition_range.PartitionOutcome], plan: partition_range.Plan, job) -> dg.Failure:
    shown = "; ".join(f"{o.partition_key}: {o.error}" for o in failed[:FAILED_PARTITIONS_SHOWN])
    more = f"; and {len(failed) - FAILED_PARTITIONS_SHOWN} more" if len(failed) > FAILED_PARTITIONS_SHOWN else ""
    counts = job.counts_type()
    for outcome in failed:
        if outcome.report is not None:
            counts += outcome.report.counts
    return dg.Failure(
        description=f"{len(failed)} of {plan.partition_count} partitions failed (each can be rerun alone): "
        + shown + more,
        metadata=numbers(**dataclasses.asdict(counts))
        | {"failed_partitions": dg.MetadataValue.text(" ".join(o.partition_key for o in failed))},
        allow_retries=all(o.retryable for o in failed),
    )
