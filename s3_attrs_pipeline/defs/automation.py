"""What runs by itself: verification after every backfill, and a daily re-verification that heals gaps."""

import datetime
from collections import defaultdict

import dagster as dg
from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus
from dagster._core.storage.tags import BACKFILL_ID_TAG

from s3_attrs_pipeline.defs.assets import files_s3_attrs
from s3_attrs_pipeline.defs.partitions import PARTITION_WIDTH
from s3_attrs_pipeline.defs.resources import InstantDatabaseResource
from s3_attrs_pipeline.defs.verification import s3_attrs_verification
from s3_attrs_pipeline.verification import database_report

HEAL_TAG = "s3-attrs/heal"  # on the runs one daily re-verification requested, valued by its tick
TRIGGER_TAG = "s3-attrs/verifies"  # on a verification run: the backfill or heal batch it follows
LOOKBACK = datetime.timedelta(days=3)  # finished groups older than this are not verified any more
_FINISHED_BACKFILL = [
    BulkActionStatus.COMPLETED,
    BulkActionStatus.COMPLETED_SUCCESS,
    BulkActionStatus.COMPLETED_FAILED,
    BulkActionStatus.FAILED,
    BulkActionStatus.CANCELED,
]

verification_job = dg.define_asset_job(
    "s3_attrs_verification_job",
    selection=[s3_attrs_verification],
    description="Verify files_s3_attrs: coverage, gaps by partition, and an S3 sample.",
)


def _ended(runs: list[dg.DagsterRun]) -> bool:
    return bool(runs) and all(run.is_finished for run in runs)


def finished_run_groups(instance: dg.DagsterInstance, now: datetime.datetime) -> list[str]:
    """Backfills of files_s3_attrs, and heal batches, whose runs have all ended, as group ids:
    `backfill:<id>` and `heal:<tick>`."""
    cutoff = now - LOOKBACK
    groups = []
    backfills = instance.get_backfills(filters=BulkActionsFilter(statuses=_FINISHED_BACKFILL, created_after=cutoff))
    for backfill in backfills:
        if files_s3_attrs.key not in (backfill.asset_selection or []):
            continue
        runs = instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill.backfill_id}))
        # A backfill cancelled before launching anything has no runs, and nothing to verify.
        if _ended(runs):
            groups.append(f"backfill:{backfill.backfill_id}")
    heal_batches: dict[str, list[dg.DagsterRun]] = defaultdict(list)
    for run in instance.get_runs(filters=dg.RunsFilter(created_after=cutoff)):
        if HEAL_TAG in run.tags:
            heal_batches[run.tags[HEAL_TAG]].append(run)
    groups += [f"heal:{tick}" for tick, runs in sorted(heal_batches.items()) if _ended(runs)]
    return groups


@dg.sensor(
    job=verification_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="When every run of a files_s3_attrs backfill (or of a daily heal) has ended, successful or not, "
    "request one verification run for it.",
)
def verify_after_backfill(context: dg.SensorEvaluationContext):
    now = datetime.datetime.now(datetime.timezone.utc)
    for group in finished_run_groups(context.instance, now):
        # The run key makes Dagster request each group's verification once, however often it is seen.
        yield dg.RunRequest(run_key=group, tags={TRIGGER_TAG: group})


@dg.schedule(
    cron_schedule="0 4 * * *",
    execution_timezone="UTC",
    target=dg.AssetSelection.assets(files_s3_attrs, s3_attrs_verification),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily: files uploaded since the backfill lack hash. Request runs of exactly the partitions with "
    "gaps (the sensor verifies once they end), or a verification run when there are none.",
)
def daily_reverification(context: dg.ScheduleEvaluationContext, instant_db: InstantDatabaseResource):
    tick = context.scheduled_execution_time.isoformat()
    with instant_db.connect() as conn:
        gaps = database_report(conn, PARTITION_WIDTH).gap_partition_keys
    if not gaps:
        return [dg.RunRequest(run_key=f"verify:{tick}", asset_selection=[s3_attrs_verification.key])]
    context.log.info(f"{len(gaps)} partitions have files lacking hash: {' '.join(gaps)}")
    return [
        dg.RunRequest(
            run_key=f"heal:{tick}:{key}", partition_key=key, asset_selection=[files_s3_attrs.key], tags={HEAL_TAG: tick}
        )
        for key in gaps
    ]
