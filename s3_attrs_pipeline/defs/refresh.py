"""The refresh of `files_s3_attrs`: a partitioned asset that rewrites the values whose object has
changed since (refresh.py), and the weekly schedule that runs it where there are values."""

import dataclasses

import dagster as dg

from s3_attrs_pipeline.backfill import FileProblem
from s3_attrs_pipeline.defs.assets import BackfillConfig, files_s3_attrs
from s3_attrs_pipeline.defs.metadata import numbers, table
from s3_attrs_pipeline.defs.partition_runs import materialize_range
from s3_attrs_pipeline.defs.partitions import PARTITION_WIDTH, app_id_prefix_partitions, range_tags
from s3_attrs_pipeline.defs.resources import FileBucketResource, InstantDatabaseResource
from s3_attrs_pipeline.instant import reads
from s3_attrs_pipeline.partition_range import REFRESH, Listener
from s3_attrs_pipeline.refresh import RefreshReport


def refresh_metadata(report: RefreshReport) -> dict[str, dg.MetadataValue]:
    metadata = numbers(
        **dataclasses.asdict(report.counts),
        duration_seconds=float(report.duration_s),
        replication_wait_seconds=float(report.replication_wait_s),
    )
    if report.problems:
        metadata["problem_files"] = table(FileProblem, report.problems)
    return metadata


@dg.asset(
    partitions_def=app_id_prefix_partitions,
    deps=[files_s3_attrs],
    backfill_policy=dg.BackfillPolicy.single_run(),
    output_required=False,
    group_name="instant_files",
    kinds={"postgres", "s3"},
    pool="instant_s3_attrs",
    description=(
        "The refresh of files_s3_attrs: re-reads the S3 metadata of the partition's files that have `hash` "
        "(a listing for dense apps, HEADs for the others) and rewrites `hash` and `lastModified` where they no "
        "longer describe the object the file's current location-id names (a re-upload, an object rewritten). "
        "Unchanged files are not written; a file whose object is gone keeps its values and is counted missing."
    ),
)
def files_s3_attrs_refresh(
    context: dg.AssetExecutionContext,
    config: BackfillConfig,
    instant_db: InstantDatabaseResource,
    file_bucket: FileBucketResource,
    run_progress: dg.ResourceParam[Listener],
):
    yield from materialize_range(context, config, instant_db, file_bucket, run_progress, REFRESH, refresh_metadata)


def partitions_with_values(coverage: dict[str, reads.PartitionCoverage]) -> list[str]:
    return sorted(key for key, part in coverage.items() if part.with_hash)


@dg.schedule(
    cron_schedule="0 5 * * 0",
    execution_timezone="UTC",
    target=dg.AssetSelection.assets(files_s3_attrs_refresh),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Weekly (Sunday 05:00 UTC): one run refreshing the partitions that have files with values.",
)
def weekly_refresh(context: dg.ScheduleEvaluationContext, instant_db: InstantDatabaseResource):
    tick = context.scheduled_execution_time.isoformat()
    with instant_db.connect() as conn:
        keys = partitions_with_values(reads.coverage_by_partition(conn, PARTITION_WIDTH))
    if not keys:
        return dg.SkipReason("no file has values to refresh")
    return dg.RunRequest(run_key=f"refresh:{tick}", asset_selection=[files_s3_attrs_refresh.key], tags=range_tags(keys))
