"""The asset: one partition of `files_s3_attrs` is the backfill of the apps whose id starts with its key."""

import dataclasses
import os
from collections.abc import Callable

import dagster as dg
from pydantic import Field

from s3_attrs_pipeline.backfill import (
    BackfillSettings,
    FileProblem,
    PartitionFailed,
    PartitionReport,
    backfill_partition,
)
from s3_attrs_pipeline.defs.metadata import numbers, table
from s3_attrs_pipeline.defs.partitions import app_id_prefix_partitions
from s3_attrs_pipeline.defs.resources import FileBucketResource, InstantDatabaseResource
from s3_attrs_pipeline.instant.catalog import CatalogMismatch
from s3_attrs_pipeline.instant.live_updates import (
    DEFAULT_LIVE_UPDATES,
    LIVE_UPDATES_ENV,
    LOG_TO_TABLE_ENV,
    live_updates_level,
    log_to_table,
)
from s3_attrs_pipeline.s3.store import S3AccessError
from s3_attrs_pipeline.settings import setting_help

STEP_RETRIES_ENV = "S3_ATTRS_STEP_RETRIES"
DEFAULT_STEP_RETRIES = 2


class BackfillConfig(dg.Config):
    batch_size: int = Field(BackfillSettings.batch_size, description=setting_help(BackfillSettings, "batch_size"))
    list_threshold: int = Field(
        BackfillSettings.list_threshold, description=setting_help(BackfillSettings, "list_threshold")
    )
    live_updates: str | None = Field(
        None,
        description=setting_help(BackfillSettings, "live_updates")
        + f" Unset: {LIVE_UPDATES_ENV}, else {DEFAULT_LIVE_UPDATES}.",
    )
    wal_msg_log_to_table: bool | None = Field(
        None,
        description=setting_help(BackfillSettings, "wal_msg_log_to_table") + f" Unset: {LOG_TO_TABLE_ENV}, else false.",
    )

    def backfill_settings(self, partition_count: int) -> BackfillSettings:
        return BackfillSettings(
            batch_size=self.batch_size,
            list_threshold=self.list_threshold,
            live_updates=live_updates_level(self.live_updates),
            wal_msg_log_to_table=log_to_table(self.wal_msg_log_to_table),
            partition_count=partition_count,
        )


def _step_retry_policy() -> dg.RetryPolicy | None:
    # A partition's step is retried in the same run after whole-step failures (database restarts, a
    # throttling storm outlasting the per-request retries); an unreadable bucket or a wrong catalog
    # is not (see allow_retries).
    max_retries = int(os.environ.get(STEP_RETRIES_ENV, str(DEFAULT_STEP_RETRIES)))
    if max_retries <= 0:
        return None
    return dg.RetryPolicy(
        max_retries=max_retries,
        delay=30,
        backoff=dg.Backoff.EXPONENTIAL,
        jitter=dg.Jitter.PLUS_MINUS,
    )


def report_metadata(report: PartitionReport) -> dict[str, dg.MetadataValue]:
    metadata = numbers(
        **dataclasses.asdict(report.counts),
        duration_seconds=float(report.duration_s),
        files_per_second=float(report.files_per_second),
    )
    if report.concurrent_run:
        metadata["skipped"] = dg.MetadataValue.text("another run was backfilling this partition at the same time")
    if report.problems:
        metadata["problem_files"] = table(FileProblem, report.problems)
    return metadata


@dg.asset(
    partitions_def=app_id_prefix_partitions,
    group_name="instant_files",
    kinds={"postgres", "s3"},
    pool="instant_s3_attrs",
    retry_policy=_step_retry_policy(),
    description=(
        "`hash` (S3 ETag) and `lastModified` (epoch ms) triples of every InstantDB `$files` entity whose app id "
        "starts with the partition key. Materializing a partition HEADs each object that still lacks them and "
        "writes both triples per file, batch by batch; rerunning it skips files already done. Missing objects "
        "are counted, not written; files that fail after retries fail the partition so it can be rerun alone."
    ),
)
def files_s3_attrs(
    context: dg.AssetExecutionContext,
    config: BackfillConfig,
    instant_db: InstantDatabaseResource,
    file_bucket: FileBucketResource,
) -> dg.MaterializeResult:
    return run_on_partition(context, config, instant_db, file_bucket, backfill_partition, PartitionFailed, report_metadata)


def run_on_partition(
    context: dg.AssetExecutionContext,
    config: BackfillConfig,
    instant_db: InstantDatabaseResource,
    file_bucket: FileBucketResource,
    work: Callable,
    partly_failed: type[Exception],
    metadata_of: Callable,
) -> dg.MaterializeResult:
    """`work(conn, store, partition key, settings, log)` on the asset's partition, its report as the
    materialization's metadata. `partly_failed` (which carries the report) fails the partition for a
    rerun; a wrong setting, an unreadable bucket or a wrong catalog fail it with no retry."""
    try:
        settings = config.backfill_settings(len(app_id_prefix_partitions.get_partition_keys()))
    except ValueError as error:
        raise dg.Failure(description=str(error), allow_retries=False) from None
    with instant_db.connect() as conn, file_bucket.open_store() as store:
        try:
            report = work(conn, store, context.partition_key, settings, context.log)
        except partly_failed as failed:
            raise dg.Failure(description=str(failed), metadata=metadata_of(failed.report)) from None
        except (S3AccessError, CatalogMismatch) as error:
            raise dg.Failure(description=str(error), allow_retries=False) from None
    return dg.MaterializeResult(metadata=metadata_of(report))
