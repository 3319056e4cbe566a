"""The refresh of `files_s3_attrs`: a partitioned asset that rewrites the values whose object has
changed since (refresh.py), and the weekly schedule that runs it where there are values."""

import dataclasses

import dagster as dg

from s3_attrs_pipeline.backfill import FileProblem
from s3_attrs_pipeline.defs.assets import BackfillConfig, files_s3_attrs, run_on_partition
from s3_attrs_pipeline.defs.metadata import numbers, table
from s3_attrs_pipeline.defs.partitions import PARTITION_WIDTH, app_id_prefix_partitions
from s3_attrs_pipeline.defs.resources import FileBucketResource, InstantDatabaseResource
from s3_attrs_pipeline.instant import reads
from s3_attrs_pipeline.refresh import RefreshFailed, RefreshReport, refresh_partition


def refresh_metadata(report: RefreshReport) -> dict[str, dg.MetadataValue]:
    metadata = numbers(**dataclasses.asdict(report.counts), duration_seconds=float(report.duration_s))
    if report.concurrent_run:
        metadata["skipped"] = dg.MetadataValue.text("another run was working on this partition at the same time")
    if report.problems:
        metadata["problem_files"] = table(FileProblem, report.problems)
    return metadata


@dg.asset(
    partitions_def=app_id_prefix_partitions,
    deps=[files_s3_attrs],
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
) -> dg.MaterializeResult:
    return run_on_partition(context, config, instant_db, file_bucket, refresh_partition, RefreshFailed, refresh_metadata)


def partitions_with_values(coverage: dict[str, reads.PartitionCoverage]) -> list[str]:
    return sorted(key for key, part in coverage.items() if part.with_hash)


@dg.schedule(
    cron_schedule="0 5 * * 0",
    execution_timezone="UTC",
    target=dg.AssetSelection.assets(files_s3_attrs_refresh),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Weekly (Sunday 05:00 UTC): refresh every partition that has files with values.",
)
def weekly_refresh(context: dg.ScheduleEvaluationContext, instant_db: InstantDatabaseResource):
    tick = context.scheduled_execution_time.isoformat()
    with instant_db.connect() as conn:
        keys = partitions_with_values(reads.coverage_by_partition(conn, PARTITION_WIDTH))
    return [
        dg.RunRequest(run_key=f"refresh:{tick}:{key}", partition_key=key, asset_selection=[files_s3_attrs_refresh.key])
        for key in keys
    ]
