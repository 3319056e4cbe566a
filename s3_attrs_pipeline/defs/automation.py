"""What runs by itself: the checks after every backfill, and a daily re-verification that heals gaps."""

import dagster as dg

from s3_attrs_pipeline.defs.assets import files_s3_attrs
from s3_attrs_pipeline.defs.checks import CHECK_SPECS
from s3_attrs_pipeline.defs.partitions import PARTITION_WIDTH, range_tags
from s3_attrs_pipeline.defs.resources import InstantDatabaseResource
from s3_attrs_pipeline.verification import database_report

HEAL_TAG = "s3-attrs/heal"  # on the runs one daily re-verification requested, valued by its tick
CHECK_KEYS = [spec.key for spec in CHECK_SPECS]

verify_after_backfill = dg.AutomationConditionSensorDefinition(
    "verify_after_backfill",
    target=dg.AssetSelection.checks(*CHECK_KEYS),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Runs the checks of files_s3_attrs once a backfill (or a daily heal) of it has ended, successful "
    "or not (their automation condition).",
)


@dg.schedule(
    cron_schedule="0 4 * * *",
    execution_timezone="UTC",
    target=dg.AssetSelection.assets(files_s3_attrs) | dg.AssetSelection.checks(*CHECK_KEYS),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily: files uploaded since the backfill lack hash. Request one run over the partitions from the "
    "first with gaps to the last (its plan works only those with gaps; the checks run once it ends), or a run of "
    "the checks when there are none.",
)
def daily_reverification(context: dg.ScheduleEvaluationContext, instant_db: InstantDatabaseResource):
    tick = context.scheduled_execution_time.isoformat()
    with instant_db.connect() as conn:
        gaps = database_report(conn, PARTITION_WIDTH).partitions_to_heal
    if not gaps:
        return [dg.RunRequest(run_key=f"verify:{tick}", asset_selection=[], asset_check_keys=CHECK_KEYS)]
    context.log.info(
        f"{len(gaps)} partitions have files lacking hash, or values left on deleted files: {' '.join(gaps)}"
    )
    return [
        dg.RunRequest(
            run_key=f"heal:{tick}",
            asset_selection=[files_s3_attrs.key],
            asset_check_keys=[],
            tags={HEAL_TAG: tick} | range_tags(gaps),
        )
    ]
