"""A backfill spread over several runs, as on a cluster: the repository's dagster.yaml (PostgreSQL
storage, the run queue, run monitoring and run retries) and a process per run, with
S3_ATTRS_PARTITIONS_PER_RUN=64. "Materialize → All" becomes four runs that work at the same time;
one run's process is killed mid-way; the run is marked failed (by run monitoring, or first by the
code server that started it), the run retry finishes its partitions, and every file is right."""

import os
import signal

import dagster as dg
import pytest
import yaml
from dagster._core.execution.backfill import BULK_ACTION_TERMINAL_STATUSES
from dagster._core.storage.tags import BACKFILL_ID_TAG, PARENT_RUN_ID_TAG
from dagster_graphql.test.utils import define_out_of_process_context

from s3_attrs_pipeline.defs.partitions import RANGE_END_TAG, RANGE_START_TAG, app_id_prefix_partitions
from s3_attrs_pipeline_tests.conftest import REPO_ROOT
from s3_attrs_pipeline_tests.fault_proxy import FaultRule
from s3_attrs_pipeline_tests.helpers import (
    assert_every_file_right,
    launch_backfill,
    partitions_of,
    start_fast_daemon,
    stop_process,
    wait_for,
)
from s3_attrs_pipeline_tests.process_run_launcher import run_worker_pid

pytestmark = pytest.mark.daemon

FILES = dg.AssetKey("files_s3_attrs")
PARTITIONS_PER_RUN = 64


@pytest.fixture
def multi_run_daemon(dagster_home, fault_proxy, instant_db_url, monkeypatch):
    """The daemon on the repository's dagster.yaml, backfills split into runs of 64 partitions, with a
    run launcher that, like Kubernetes' or ECS's, tells run monitoring when a run's process is gone;
    run monitoring polls every second instead of every minute, so the test waits less."""
    monkeypatch.setenv("S3_ATTRS_PARTITIONS_PER_RUN", str(PARTITIONS_PER_RUN))
    config = yaml.safe_load((dagster_home / "dagster.yaml").read_text())
    assert config["run_monitoring"]["enabled"] and config["run_retries"]["enabled"]
    config["run_monitoring"]["poll_interval_seconds"] = 1
    config["run_launcher"] = {
        "module": "s3_attrs_pipeline_tests.process_run_launcher",
        "class": "ProcessRunLauncher",
    }
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(config))
    process = start_fast_daemon(REPO_ROOT / "workspace.yaml", dagster_home / "daemon.log")
    yield process
    stop_process(process)


def _run_of_quarter(key: str) -> int:
    return int(key, 16) // PARTITIONS_PER_RUN


def _quarters_in_progress(held_paths: list[str], bucket: str) -> set[int]:
    """The runs (by their quarter of the partitions) whose HEADs the proxy holds right now."""
    return {_run_of_quarter(path.removeprefix(f"/{bucket}/")[:2]) for path in held_paths}


def test_a_backfill_in_four_runs_works_them_at_once_and_finishes_a_lost_one(
    conn, s3_client, bucket, seeded_files, fault_proxy, multi_run_daemon
):
    every = app_id_prefix_partitions(2).get_partition_keys()
    assert len({_run_of_quarter(key) for key in partitions_of(seeded_files)}) >= 2, "files in two runs' ranges"
    # Every object request waits at the proxy until released: the requests held at once show which
    # runs are in progress at once, however slowly this machine starts them.
    fault_proxy.add_rule(FaultRule("hold", key_pattern=f"^/{bucket}/[0-9a-f]"))

    with (
        dg.DagsterInstance.get() as instance,
        define_out_of_process_context(str(REPO_ROOT / "workspace.yaml"), None, instance) as context,
    ):
        backfill_id = launch_backfill(context, every)

        def two_runs_in_progress() -> set[int] | None:
            quarters = _quarters_in_progress(fault_proxy.held_paths(), bucket)
            return quarters if len(quarters) >= 2 else None

        at_once = wait_for(two_runs_in_progress, "two runs' S3 requests in progress at once", timeout_s=240)
        runs = instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
        by_quarter = {_run_of_quarter(run.tags[RANGE_START_TAG]): run for run in runs}
        lost = by_quarter[min(at_once)]
        pid = run_worker_pid(instance, lost.run_id)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # mid-way: its requests are held, its batch not written
        fault_proxy.release_held()

        def ended_backfill():
            backfill = instance.get_backfill(backfill_id)
            return backfill if backfill.status in BULK_ACTION_TERMINAL_STATUSES else None

        backfill = wait_for(ended_backfill, "the backfill to end", timeout_s=300)
        runs = instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
        first_runs = sorted(
            (run.tags[RANGE_START_TAG], run.tags[RANGE_END_TAG]) for run in runs if PARENT_RUN_ID_TAG not in run.tags
        )
        # ⌈256 / 64⌉ runs, each a contiguous quarter
        assert first_runs == [(every[i], every[i + PARTITIONS_PER_RUN - 1]) for i in range(0, 256, PARTITIONS_PER_RUN)]
        assert instance.get_run_by_id(lost.run_id).status == dg.DagsterRunStatus.FAILURE
        # Whichever sees the lost process first marks the run failed: run monitoring, through the
        # launcher ("the run's process N is gone"), or, on one machine, the code server that started it
        # ("Run execution process for … was terminated by signal 9"); either way the run is retried.
        messages = [event.message or "" for event in instance.all_logs(lost.run_id)]
        lost_seen = (f"the run's process {pid} is gone", "was terminated by signal 9 (SIGKILL)")
        assert any(seen in message for message in messages for seen in lost_seen), messages
        retries = [run for run in runs if run.tags.get(PARENT_RUN_ID_TAG) == lost.run_id]
        assert [run.status for run in retries] == [dg.DagsterRunStatus.SUCCESS], [run.status for run in retries]
        assert backfill.status.value == "COMPLETED_SUCCESS", backfill.status
        assert instance.get_materialized_partitions(FILES) == set(every)
    assert_every_file_right(conn, s3_client, bucket, seeded_files)
