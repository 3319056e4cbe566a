"""The asset: one partition of `files_s3_attrs` is the backfill of the apps whose id starts with its key."""

import dataclasses
import os
import warnings

import dagster as dg
from pydantic import Field

from s3_attrs_pipeline.backfill import BackfillSettings, FileProblem, PartitionReport
from s3_attrs_pipeline.defs.metadata import numbers, table
from s3_attrs_pipeline.defs.partition_runs import materialize_range
from s3_attrs_pipeline.defs.partitions import app_id_prefix_partitions
from s3_attrs_pipeline.defs.resources import FileBucketResource, InstantDatabaseResource
from s3_attrs_pipeline.instant.live_updates import (
    DEFAULT_LIVE_UPDATES,
    LIVE_UPDATES_ENV,
    LOG_TO_TABLE_ENV,
    live_updates_level,
    log_to_table,
)
from s3_attrs_pipeline.instant.replication import MAX_LAG_MB_ENV, ReplicationLimits
from s3_attrs_pipeline.partition_range import BACKFILL, Listener, RangeSettings
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

    partitions_at_once: int = Field(
        RangeSettings.partitions_at_once, description=setting_help(RangeSettings, "partitions_at_once")
    )
    every_partition: bool = Field(
        RangeSettings.every_partition, description=setting_help(RangeSettings, "every_partition")
    )
    max_failed_share: float = Field(
        RangeSettings.max_failed_share, description=setting_help(RangeSettings, "max_failed_share")
    )
    failure_threshold_files: int = Field(
        RangeSettings.failure_threshold_files, description=setting_help(RangeSettings, "failure_threshold_files")
    )
    max_replication_lag_mb: float | None = Field(
        None,
        description=setting_help(ReplicationLimits, "max_lag_mb")
        + f" Unset: {MAX_LAG_MB_ENV}, else {ReplicationLimits.max_lag_mb:g}.",
    )

    def range_settings(self) -> RangeSettings:
        return RangeSettings(
            partitions_at_once=self.partitions_at_once,
            every_partition=self.every_partition,
            max_failed_share=self.max_failed_share,
            failure_threshold_files=self.failure_threshold_files,
        )

    def backfill_settings(self, partition_count: int) -> BackfillSettings:
        return BackfillSettings(
            batch_size=self.batch_size,
            list_threshold=self.list_threshold,
            live_updates=live_updates_level(self.live_updates),
            wal_msg_log_to_table=log_to_table(self.wal_msg_log_to_table),
            partition_count=partition_count,
            replication=ReplicationLimits.from_env(
                **({} if self.max_replication_lag_mb is None else {"max_lag_mb": self.max_replication_lag_mb})
            ),
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
        replication_wait_seconds=float(report.replication_wait_s),
        files_per_second=float(report.files_per_second),
    )
    if report.problems:
        metadata["problem_files"] = table(FileProblem, report.problems)
    return metadata


# A single-run backfill policy is what makes a UI backfill one run; Dagster marks the parameter beta.
warnings.filterwarnings("ignore", category=dg.BetaWarning, message="Parameter `backfill_policy`")


@dg.asset(
    partitions_def=app_id_prefix_partitions,
    # A backfill of many partitions is one run: its plan skips the partitions with nothing to do, and
    # each partition is still materialized, or failed, on its own.
    backfill_policy=dg.BackfillPolicy.single_run(),
    output_required=False,
    group_name="instant_files",
    kinds={"postgres", "s3"},
    pool="instant_s3_attrs",
    retry_policy=_step_retry_policy(),
    description=(
        "`hash` (S3 ETag) and `lastModified` (epoch ms) triples of every InstantDB `$files` entity whose app id "
        "starts with the partition key. A run plans its partitions from one read of the database, then HEADs "
        "(or lists) the objects of the files that still lack them and writes both triples per file, batch by "
        "batch, several partitions at once; each partition is materialized as it ends. Missing objects are "
        "counted, not written; a partition whose files fail after retries fails alone and reruns alone."
    ),
)
def files_s3_attrs(
    context: dg.AssetExecutionContext,
    config: BackfillConfig,
    instant_db: InstantDatabaseResource,
    file_bucket: FileBucketResource,
    run_progress: dg.ResourceParam[Listener],
):
    yield from materialize_range(context, config, instant_db, file_bucket, run_progress, BACKFILL, report_metadata)
