"""What runs by itself once something happened: the checks of files_s3_attrs after a backfill of it,
and an alert when a run fails."""

import dagster as dg

from s3_attrs_pipeline import alerts, environment
from s3_attrs_pipeline.defs.checks import CHECK_KEYS
from s3_attrs_pipeline.defs.partitions import RANGE_END_TAG, RANGE_START_TAG

verify_after_backfill = dg.AutomationConditionSensorDefinition(
    "verify_after_backfill",
    target=dg.AssetSelection.checks(*CHECK_KEYS),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Runs the checks of files_s3_attrs once a backfill (or a daily heal) of it has ended, successful "
    "or not (their automation condition).",
)


@dg.run_failure_sensor(
    name="alert_on_failed_run",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=15,
    description="Posts every failed run of this code location (backfills, daily heals, refreshes, the operator's "
    "control) to the webhook of S3_ATTRS_ALERT_WEBHOOK_URL; does nothing while it is unset.",
)
def alert_on_failed_run(context: dg.RunFailureSensorContext) -> None:
    webhook = alerts.webhook_url(environment.read())
    if not webhook:
        return
    run = context.dagster_run
    tags = run.tags
    if RANGE_START_TAG in tags:
        what = f"partitions {tags[RANGE_START_TAG]}..{tags[RANGE_END_TAG]}"
    else:
        what = f"partition {tags['dagster/partition']}" if "dagster/partition" in tags else run.job_name
    alerts.post(webhook, f"s3-attrs: run {run.run_id} ({what}) failed: {context.failure_event.message}")
