"""What runs by itself once something happened: the checks of files_s3_attrs after a backfill of it."""

import dagster as dg

from s3_attrs_pipeline.defs.checks import CHECK_KEYS

verify_after_backfill = dg.AutomationConditionSensorDefinition(
    "verify_after_backfill",
    target=dg.AssetSelection.checks(*CHECK_KEYS),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Runs the checks of files_s3_attrs once a backfill (or a daily heal) of it has ended, successful "
    "or not (their automation condition).",
)
