"""A real backfill of every partition, launched with the GraphQL mutation the UI sends and run by the
Dagster daemon on a PostgreSQL-backed instance, on a database whose files sit in a few partitions, with
S3 faults that fail some of them: one run works only the partitions with files, every other partition
is materialized, the failing ones alone fail; then the UI's "re-execute failed" reruns only those, and
the checks of files_s3_attrs run by their automation condition once after each backfill."""

import dagster as dg
from dagster._core.execution.backfill import BULK_ACTION_TERMINAL_STATUSES, BulkActionStatus
from dagster._core.storage.tags import BACKFILL_ID_TAG
from dagster_graphql.test.utils import define_out_of_process_context

from s3_attrs_pipeline.defs.checks import CHECK_KEYS
from s3_attrs_pipeline.defs.partitions import RANGE_END_TAG, RANGE_START_TAG, app_id_prefix_partitions
from s3_attrs_pipeline_tests.conftest import REPO_ROOT
from s3_attrs_pipeline_tests.fault_proxy import FaultRule
from s3_attrs_pipeline_tests.helpers import launch, launch_backfill, partition_of, partitions_of, wait_for

FILES = dg.AssetKey("files_s3_attrs")
REEXECUTE_BACKFILL = """
mutation($params: ReexecutionParams) {
  reexecutePartitionBackfill(reexecutionParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
  }
}"""


def _wait(condition, what: str):
    return wait_for(condition, what, timeout_s=240)


def _finished_backfill(instance, backfill_id):
    backfill = instance.get_backfill(backfill_id)
    return backfill if backfill.status in BULK_ACTION_TERMINAL_STATUSES else None


def _runs_of(instance, backfill_id) -> list[tuple[tuple[str, str], dg.DagsterRunStatus]]:
    """The backfill's runs: the first and last partition each spans, and its status."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
    spans = []
    for run in runs:
        if RANGE_START_TAG in run.tags:
            spans.append(((run.tags[RANGE_START_TAG], run.tags[RANGE_END_TAG]), run.status))
        else:
            spans.append(((run.tags["dagster/partition"],) * 2, run.status))
    return sorted(spans)


def _worked(instance) -> set[str]:
    """The partitions whose latest materialization did some work (not the plan's "nothing to do")."""
    records = instance.fetch_materializations(FILES, limit=1000).records
    latest = {}
    for record in sorted(records, key=lambda r: r.storage_id):
        latest[record.partition_key] = record.asset_materialization.metadata
    return {key for key, metadata in latest.items() if "nothing_to_do" not in metadata}


def _checks_run(instance, runs_so_far: int) -> dict:
    """The numbers and outcomes of the checks' `runs_so_far`-th run, once all three checks ended in it; {}
    before. Each backfill must be followed by exactly one run of the checks, not one per partition."""
    # Dagster plans the checks into the backfill's runs too, where they return at once: not counted.
    backfill_runs = {run.run_id for run in instance.get_runs() if BACKFILL_ID_TAG in run.tags}
    histories = {
        key: [
            record
            for record in instance.event_log_storage.get_asset_check_execution_history(key, limit=10)
            if record.run_id not in backfill_runs
        ]
        for key in CHECK_KEYS
    }
    if any(len(history) < runs_so_far for history in histories.values()):
        return {}
    assert all(len(history) == runs_so_far for history in histories.values()), "the checks ran more than once"
    latest = {key.name: history[0] for key, history in histories.items()}
    if any(record.event is None or record.status.value == "PLANNED" for record in latest.values()):
        return {}
    results = {"checks": {name: record.status.value for name, record in latest.items()}}
    for record in latest.values():
        metadata = record.event.asset_check_evaluation.metadata
        results |= {k: v.value for k, v in metadata.items() if isinstance(v.value, int)}
    return results


def test_ui_backfill_of_every_partition_works_only_where_there_is_work(conn, bucket, seeded_files, fault_proxy, daemon):
    partitions_def = app_id_prefix_partitions(2)
    every = partitions_def.get_partition_keys()
    partitions = partitions_of(seeded_files)
    assert len(partitions) < len(every) / 10
    failing = [partitions[0], partitions[-1]]
    # Every object request of the failing partitions' apps answers 500, through all retries.
    apps = "|".join(sorted({str(f.app_id) for f in seeded_files if partition_of(f) in failing}))
    fault_proxy.add_rule(FaultRule("internal_error", key_pattern=f"/{bucket}/({apps})/"))

    with (
        dg.DagsterInstance.get() as instance,
        define_out_of_process_context(str(REPO_ROOT / "workspace.yaml"), None, instance) as context,
    ):
        first = launch_backfill(context, every)
        assert _wait(lambda: _finished_backfill(instance, first), "the first backfill").status == (
            BulkActionStatus.COMPLETED_FAILED
        )
        # One run for the 256 partitions, not one each; it worked only the partitions with files.
        assert _runs_of(instance, first) == [((every[0], every[-1]), dg.DagsterRunStatus.FAILURE)]
        assert _worked(instance) == set(partitions) - set(failing)
        status = instance.get_status_by_partition(FILES, every, partitions_def)
        assert {k for k, s in status.items() if s == dg.AssetPartitionStatus.FAILED} == set(failing)
        assert {k for k, s in status.items() if s == dg.AssetPartitionStatus.MATERIALIZED} == set(every) - set(failing)

        after_first = _wait(lambda: _checks_run(instance, 1), "the checks after the first backfill")
        # Their missing objects answered 500 too, so they are not known to be missing yet.
        unreached = [f for f in seeded_files if partition_of(f) in failing and not f.prepopulated]
        assert after_first["remaining"] == len(unreached)
        assert after_first["partitions_with_gaps"] == len(failing)
        assert after_first["checks"]["completeness"] == "FAILED"

        fault_proxy.clear_rules()
        second = launch(
            context,
            REEXECUTE_BACKFILL,
            {"params": {"parentRunId": first, "strategy": "FROM_FAILURE"}},
            "reexecutePartitionBackfill",
        )
        assert _wait(lambda: _finished_backfill(instance, second), "the rerun").status == (
            BulkActionStatus.COMPLETED_SUCCESS
        )
        # The failed partitions, each alone (they are not neighbours), and nothing else.
        assert _runs_of(instance, second) == [((key, key), dg.DagsterRunStatus.SUCCESS) for key in failing]
        assert _worked(instance) == set(partitions)
        assert instance.get_materialized_partitions(FILES) == set(every)

        after_rerun = _wait(lambda: _checks_run(instance, 2), "the checks after the rerun")
        assert after_rerun["remaining"] == 0
        assert after_rerun["with_both"] == sum(f.in_s3 for f in seeded_files)
        assert after_rerun["known_missing"] == sum(not f.in_s3 for f in seeded_files)
        assert after_rerun["checks"] == {
            "completeness": "SUCCEEDED",
            "consistency": "SUCCEEDED",
            "well_formed": "SUCCEEDED",
            "app_queries_use_indexes": "SUCCEEDED",
        }
