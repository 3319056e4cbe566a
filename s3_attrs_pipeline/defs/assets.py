import os

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
from s3_attrs_pipeline.instant.database import CatalogMismatch
from s3_attrs_pipeline.s3.object_metadata import S3AccessError

RUN_RETRIES_ENV = "S3_ATTRS_RUN_RETRIES"


class BackfillConfig(dg.Config):
    batch_size: int = Field(50, description="Files written per transaction (and read per page).")
    list_threshold: int = Field(
        1000,
        description=(
            "An app is read with ListObjectsV2 (1,000 objects a request) instead of one HEAD per file when at "
            "least this many of its files lack the attrs and they are at least a tenth of its files; 0 never lists."
        ),
    )


def _run_retry_policy() -> dg.RetryPolicy | None:
    # Whole-run failures (database restarts, a throttling storm outlasting the per-request retries)
    # deserve a later try; an unreadable bucket or a wrong catalog does not (see allow_retries).
    max_retries = int(os.environ.get(RUN_RETRIES_ENV, "2"))
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
        processed=report.processed,
        successful=report.successful,
        missing=report.missing,
        failed=report.failed,
        invalid_location_id=report.invalid,
        malformed_object_metadata=report.malformed,
        already_populated=report.already_populated,
        apps_listed=report.apps_listed,
        vanished_during_run=report.vanished,
        s3_retries=report.s3_retries,
        s3_throttled=report.s3_throttled,
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
    retry_policy=_run_retry_policy(),
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
    settings = BackfillSettings(
        batch_size=config.batch_size,
        list_threshold=config.list_threshold,
        partition_count=len(app_id_prefix_partitions.get_partition_keys()),
    )
    with instant_db.connect() as conn, file_bucket.open_store() as store:
        try:
            report = backfill_partition(conn, store, context.partition_key, settings, context.log)
        except PartitionFailed as failed:
            raise dg.Failure(description=str(failed), metadata=report_metadata(failed.report)) from None
        except (S3AccessError, CatalogMismatch) as error:
            raise dg.Failure(description=str(error), allow_retries=False) from None
    return dg.MaterializeResult(metadata=report_metadata(report))
