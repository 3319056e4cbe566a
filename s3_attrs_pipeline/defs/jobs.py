"""What an operator launches by hand from the UI's launchpad: the live control of every running
backfill and refresh (the same row `s3-attrs pause`, `resume` and `throttle` set)."""

from typing import Literal

import dagster as dg
from pydantic import Field

from s3_attrs_pipeline.defs.resources import InstantDatabaseResource
from s3_attrs_pipeline.instant import operator_control


class OperatorControlConfig(dg.Config):
    action: Literal["pause", "resume", "throttle"] = Field(
        description="pause, resume, or throttle (with max_rps and/or partitions_at_once)"
    )
    reason: str | None = Field(None, description="Why: shown in the runs' logs and by `s3-attrs control`.")
    set_by: str = Field("the Dagster UI", description="Who: shown beside the reason.")
    max_rps: float | None = Field(
        None, description="throttle: S3 requests per second per run at most; 0 lifts the ceiling."
    )
    partitions_at_once: int | None = Field(
        None, description="throttle: partitions per run at most (takes effect as partitions end); 0 lifts it."
    )


@dg.op(description="Set the control row every running backfill and refresh reads every few seconds.")
def set_operator_control(
    context: dg.OpExecutionContext, config: OperatorControlConfig, instant_db: InstantDatabaseResource
) -> None:
    changes = operator_control.changes(
        paused={"pause": True, "resume": False}.get(config.action),
        max_rps=config.max_rps if config.action == "throttle" else None,
        partitions_at_once=config.partitions_at_once if config.action == "throttle" else None,
    )
    if config.action == "throttle" and not changes:
        raise dg.Failure("throttle needs max_rps or partitions_at_once", allow_retries=False)
    try:
        with instant_db.connect() as conn:
            control = operator_control.set_control(conn, set_by=config.set_by, reason=config.reason, **changes)
    except ValueError as error:
        raise dg.Failure(str(error), allow_retries=False) from None
    context.log.info(f"operator control: {control.describe()}")


@dg.job(
    name="operator_control",
    description="Pause, resume or throttle every running backfill and refresh (as `s3-attrs pause`, `resume`, "
    "`throttle`): launch it from the launchpad with its config. Runs hold or change within a few seconds.",
)
def operator_control_job():
    set_operator_control()


@dg.definitions
def jobs() -> dg.Definitions:
    return dg.Definitions(jobs=[operator_control_job])
