import dagster as dg

from s3_attrs_pipeline.defs.assets import files_s3_attrs
from s3_attrs_pipeline.defs.automation import daily_reverification, verification_job, verify_after_backfill
from s3_attrs_pipeline.defs.resources import resources_from_env
from s3_attrs_pipeline.defs.verification import s3_attrs_verification

defs = dg.Definitions(
    assets=[files_s3_attrs, s3_attrs_verification],
    jobs=[verification_job],
    sensors=[verify_after_backfill],
    schedules=[daily_reverification],
    resources=resources_from_env(),
    # Every run holds one step: a step process of its own would only add seconds to each partition.
    executor=dg.in_process_executor,
)
