"""What runs by the clock: a daily re-verification that heals the partitions with gaps (or values left
on deleted files), and a weekly refresh of the partitions that have values."""

import dagster as dg

from s3_attrs_pipeline import deployment, environment
from s3_attrs_pipeline.defs.assets import FILES_S3_ATTRS, FILES_S3_ATTRS_REFRESH
from s3_attrs_pipeline.defs.checks import CHECK_KEYS
from s3_attrs_pipeline.defs.partitions import range_tags
from s3_attrs_pipeline.defs.resources import InstantDatabaseResource
from s3_attrs_pipeline.instant import reads
from s3_attrs_pipeline.verification import database_report

HEAL_TAG = "s3-attrs/heal"  # on the runs one daily re-verification requested, valued by its tick


@dg.schedule(
    cron_schedule="0 4 * * *",
    execution_timezone="UTC",
    target=dg.AssetSelection.assets(FILES_S3_ATTRS) | dg.AssetSelection.checks(*CHECK_KEYS),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily: files uploaded since the backfill lack hash. Request one run over the partitions from the "
    "first with gaps to the last (its plan works only those with gaps, or with values left on deleted files; the "
    "checks run once it ends), or a run of the checks when there are none.",
)
def daily_reverification(context: dg.ScheduleEvaluationContext, instant_db: InstantDatabaseResource):
    tick = context.scheduled_execution_time.isoformat()
    width = deployment.current(environment.read()).partition_width
    with instant_db.connect() as conn:
        gaps = database_report(conn, width).partitions_to_heal
    if not gaps:
        return [dg.RunRequest(run_key=f"verify:{tick}", asset_selection=[], asset_check_keys=CHECK_KEYS)]
    context.log.info(
        f"{len(gaps)} partitions have files lacking hash, or values left on deleted files: {' '.join(gaps)}"
    )
    return [
        dg.RunRequest(
            run_key=f"heal:{tick}",
            asset_selection=[FILES_S3_ATTRS],
            asset_check_keys=[],
            tags={HEAL_TAG: tick} | range_tags(gaps),
        )
    ]


def partitions_with_values(coverage: dict[str, reads.PartitionCoverage]) -> list[str]:
    return sorted(key for key, part in coverage.items() if part.with_hash)


@dg.schedule(
    cron_schedule="0 5 * * 0",
    execution_timezone="UTC",
    target=dg.AssetSelection.assets(FILES_S3_ATTRS_REFRESH),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Weekly (Sunday 05:00 UTC): one run refreshing the partitions that have files with values.",
)
def weekly_refresh(context: dg.ScheduleEvaluationContext, instant_db: InstantDatabaseResource):
    tick = context.scheduled_execution_time.isoformat()
    width = deployment.current(environment.read()).partition_width
    with instant_db.connect() as conn:
        keys = partitions_with_values(reads.coverage_by_partition(conn, width))
    if not keys:
        return dg.SkipReason("no file has values to refresh")
    return dg.RunRequest(run_key=f"refresh:{tick}", asset_selection=[FILES_S3_ATTRS_REFRESH], tags=range_tags(keys))
