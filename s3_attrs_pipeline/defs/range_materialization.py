"""The body both partitioned assets share: a run over a range of partitions (one partition, or all of
a UI backfill: the assets' backfill policy is a single run), planned and worked by range_run.

Each partition that ends well gets its own materialization, as it ends; partitions with nothing to do
get theirs from the plan, in whichever attempt of the step plans them. A run with failed partitions
then fails, and Dagster marks failed exactly the partitions of the run that were not materialized:
each failed partition shows failed alone and reruns alone. A partition another run is working on is
left to that run: neither materialized nor failed by this one, unless this run fails for others.

While the step hands materializations to Dagster its workers commit nothing (run_control says why):
so when the run is terminated, nothing is written once Dagster shows it ended. An interrupt that
reaches the step stops the workers within a batch and waits for them before the run ends.
"""

import dataclasses
import time
from collections.abc import Iterator

import dagster as dg

from s3_attrs_pipeline import environment
from s3_attrs_pipeline.defs.metadata import nothing_to_do, numbers, partition_metadata
from s3_attrs_pipeline.defs.resources import FileBucketResource, InstantDatabaseResource
from s3_attrs_pipeline.runs import range_run
from s3_attrs_pipeline.runs.range_run import Ended, PartitionOutcome
from s3_attrs_pipeline.tasks.task import PartitionTask, Plan

FAILED_PARTITIONS_SHOWN = 20  # in the failure's description; the metadata names them all
# Materializations handed over at once, the workers' commits paused meanwhile (~12 ms each).
HANDED_OVER_AT_ONCE = 32
RUN_STATUS_POLL_S = 2.0  # how often the run looks whether it was marked canceled without being told
_ENDED_RUN_STATUSES = (dg.DagsterRunStatus.CANCELING, dg.DagsterRunStatus.CANCELED)


def materialize_partitions(
    context: dg.AssetExecutionContext,
    config,
    instant_db: InstantDatabaseResource,
    file_bucket: FileBucketResource,
    listener: range_run.Listener,
    task: PartitionTask,
) -> Iterator[dg.AssetMaterialization]:
    """The body of an asset whose runs `task` works: plan the run's partitions, work those with work,
    and materialize each as it ends (see the module's doc)."""
    try:
        partition_count = len(context.assets_def.partitions_def.get_partition_keys())
        settings, range_settings = config.settings(environment.read(), partition_count)
    except ValueError as error:
        raise dg.Failure(description=str(error), allow_retries=False) from None
    keys = list(context.partition_keys)
    with instant_db.connect() as conn:
        plan = task.plan(conn, keys)
    if range_settings.every_partition:
        plan = plan.every_partition()
    context.log.info(
        f"The {task.name} of {len(keys)} partitions ({keys[0]}..{keys[-1]}): {len(plan.with_work)} have work "
        f"({plan.files_to_do} files), {len(plan.without_work)} nothing to do"
    )
    listener.planned(plan)
    empty = _not_materialized_by_this_run(context, plan.without_work)

    def materialization(key: str, metadata: dict) -> dg.AssetMaterialization:
        return dg.AssetMaterialization(asset_key=context.asset_key, partition=key, metadata=metadata)

    ended: list[PartitionOutcome] = []
    handed_over: set[str] = set()
    with (
        file_bucket.open_store() as store,
        range_run.RangeWorkers(
            plan.with_work,
            task=task,
            connect=instant_db.connect,
            store=store,
            settings=settings,
            log=context.log,
            listener=listener,
            range_settings=range_settings,
        ) as work,
    ):
        control = work.control
        try:
            polled = time.monotonic()
            while not work.finished or empty:
                outcomes = work.wait(timeout=0 if empty else RUN_STATUS_POLL_S)
                ended += outcomes
                if time.monotonic() - polled >= RUN_STATUS_POLL_S:
                    polled = time.monotonic()
                    if _marked_ended(context):
                        control.stop("the run was marked canceled")
                handed = [
                    materialization(o.partition_key, partition_metadata(o.report)) for o in outcomes if o.succeeded
                ]
                handed += [materialization(key, nothing_to_do(task)) for key in empty[:HANDED_OVER_AT_ONCE]]
                del empty[:HANDED_OVER_AT_ONCE]
                if handed:
                    with control.commits_paused():
                        for event in handed:
                            yield event
                            handed_over.add(event.partition)
        except GeneratorExit:
            raise  # Dagster ended the step while it held the thread: the workers' commits stay paused
        except BaseException:
            # Terminate, Ctrl-C, SIGTERM: every partition stops within a batch and records where it got to
            # before the run is reported ended; those that finished meanwhile are materialized.
            control.stop("the run was interrupted")
            context.log.warning("the run was interrupted: its partitions stop within a batch")
            work.join()
            while not work.finished:
                ended += work.wait(timeout=0)
            for outcome in ended:
                if outcome.succeeded and outcome.partition_key not in handed_over:
                    yield materialization(outcome.partition_key, partition_metadata(outcome.report))
            cut_short = sorted(o.partition_key for o in ended if o.ended is Ended.STOPPED)
            context.log.warning(
                f"the run was interrupted; {len(cut_short)} partitions stopped before they were finished, their "
                f"progress recorded as 'stopped' (the next run works them again): {' '.join(cut_short)}"
            )
            raise
    _say_how_it_ended(context, task, ended, control)
    unfinished = [o for o in ended if o.ended in (Ended.FAILED, Ended.STOPPED)]
    if unfinished:
        # A run that stopped (refused, past its failure threshold, canceled) is not retried.
        retry = not control.stopping and all(o.retryable for o in unfinished)
        raise _failure(unfinished, [o for o in ended if o.ended is Ended.LEFT], plan, task, allow_retries=retry)


def _not_materialized_by_this_run(context: dg.AssetExecutionContext, keys: list[str]) -> list[str]:
    """`keys` but those this run already materialized, in an earlier attempt of its step."""
    if context.retry_number == 0 or not keys:
        return list(keys)
    run = context.instance.get_run_record_by_id(context.run.run_id)
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=context.asset_key, asset_partitions=keys, after_timestamp=run.create_timestamp.timestamp()
        ),
        limit=len(keys) * 2 + 100,
    ).records
    done = {record.partition_key for record in records if record.run_id == context.run.run_id}
    return [key for key in keys if key not in done]


def _marked_ended(context: dg.AssetExecutionContext) -> bool:
    """Whether the run was marked canceling or canceled (a force termination tells the run nothing)."""
    run = context.instance.get_run_by_id(context.run.run_id)
    return run is not None and run.status in _ENDED_RUN_STATUSES


def _say_how_it_ended(context, task: PartitionTask, ended: list[PartitionOutcome], control) -> None:
    left = sorted(o.partition_key for o in ended if o.ended is Ended.LEFT)
    if left:
        context.log.warning(
            f"left {len(left)} partitions to the runs working on them (neither materialized nor failed by this "
            f"run; the checks and the daily heal look at them again): {' '.join(left)}"
        )
    if control.replication.waited_s:
        context.log.info(f"the {task.name} waited {control.replication.waited_s:.1f}s in all for replication")
    if control.operator.paused_s:
        context.log.info(f"the {task.name} was paused {control.operator.paused_s:.1f}s in all (s3-attrs pause)")


def _failure(
    failed: list[PartitionOutcome],
    left: list[PartitionOutcome],
    plan: Plan,
    task: PartitionTask,
    *,
    allow_retries: bool,
) -> dg.Failure:
    shown = "; ".join(f"{o.partition_key}: {o.error}" for o in failed[:FAILED_PARTITIONS_SHOWN])
    more = f"; and {len(failed) - FAILED_PARTITIONS_SHOWN} more" if len(failed) > FAILED_PARTITIONS_SHOWN else ""
    counts = task.counts_type()
    for outcome in failed:
        counts += outcome.report.counts
    metadata = numbers(**dataclasses.asdict(counts)) | {
        "failed_partitions": dg.MetadataValue.text(" ".join(o.partition_key for o in failed))
    }
    if left:
        metadata["left_to_another_run"] = dg.MetadataValue.text(" ".join(o.partition_key for o in left))
    return dg.Failure(
        description=f"{len(failed)} of {plan.partition_count} partitions failed (each can be rerun alone): "
        + shown
        + more,
        metadata=metadata,
        allow_retries=allow_retries,
    )
