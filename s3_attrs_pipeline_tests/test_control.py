"""A run told to stop stops within a batch and shows what it did (issue 18): the UI's Terminate of a
daemon-launched backfill in the middle of a partition, and Ctrl-C or SIGTERM of `s3-attrs run`.
Nothing is written once the run shows it ended; the partition cut short is neither materialized nor
recorded completed, and the next run finishes it with every count kept. Through the Dagster daemon on
the repository's dagster.yaml, embedded PostgreSQL, moto's S3 server and the fault proxy."""

import os
import re
import signal
import subprocess
import sys
import time

import dagster as dg
import pytest
from dagster._core.storage.tags import BACKFILL_ID_TAG
from dagster_graphql.test.utils import define_out_of_process_context

from s3_attrs_pipeline import cli
from s3_attrs_pipeline.cli import dagster_runs
from s3_attrs_pipeline.instant import progress_rows
from s3_attrs_pipeline.local import seed
from s3_attrs_pipeline_tests.conftest import REPO_ROOT
from s3_attrs_pipeline_tests.fault_proxy import FaultRule
from s3_attrs_pipeline_tests.helpers import (
    assert_every_file_right,
    launch_backfill,
    new_attr_triples,
    partition_of,
    terminate,
    wait_for,
)

pytestmark = pytest.mark.daemon

FILES = dg.AssetKey("files_s3_attrs")
# One app below the listing threshold: one partition, HEADed file by file, 18 batches of 50.
ONE_APP = seed.DatasetSpec(apps=1, files=900, missing_ratio=0.02, multipart_ratio=0.0, prepopulated_ratio=0.0, seed=11)
# Each HEAD waits this long at the proxy: with 64 in flight the partition takes ~7 s, so a stop lands
# in its middle.
HEAD_LATENCY_S = 0.5
# After the run shows it ended, this long without a write is taken as "nothing is written after it":
# a batch in flight takes well under a second, and the workers would go on for many.
QUIET_AFTER_END_S = 5.0


@pytest.fixture
def one_app(conn, s3_client, bucket) -> tuple[str, list[seed.SeededFile]]:
    files = seed.plan_dataset(ONE_APP)
    seed.upload_objects(s3_client, bucket, files)
    seed.insert_files(conn, s3_client, bucket, files)
    return partition_of(files[0]), files


def _written(conn) -> int:
    return len(new_attr_triples(conn))


def _assert_counts_kept(conn, key: str, files) -> None:
    """The progress rows count exactly the files written and found missing, over every run."""
    state = progress_rows.read_progress(conn)
    assert state["total-successful"] == _written(conn)
    assert state["partitions"][key]["status"] == "completed"


def _assert_quiet_after(conn, written: int) -> None:
    time.sleep(QUIET_AFTER_END_S)
    assert _written(conn) == written, "a write landed after the run showed it ended"


def test_terminate_mid_partition_writes_nothing_once_the_run_shows_canceled(
    conn, s3_client, bucket, one_app, fault_proxy, daemon, capsys
):
    key, files = one_app
    fault_proxy.add_rule(FaultRule("latency", method="HEAD", latency_s=HEAD_LATENCY_S))
    with (
        dg.DagsterInstance.get() as instance,
        define_out_of_process_context(str(REPO_ROOT / "workspace.yaml"), None, instance) as context,
    ):
        backfill_id = launch_backfill(context, [key])
        wait_for(lambda: _written(conn) >= 100, "the run's first batches", timeout_s=240)
        [run] = instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
        asked = time.monotonic()
        terminate(context, run.run_id)
        while instance.get_run_by_id(run.run_id).status is not dg.DagsterRunStatus.CANCELED:
            assert time.monotonic() - asked < 60, "the run did not end within a minute of Terminate"
            time.sleep(0.05)
        written = _written(conn)
        _assert_quiet_after(conn, written)
        assert written < sum(f.in_s3 for f in files), "the partition ended before it was terminated"

        # Cut short: not materialized, not recorded completed; its row counts what was written.
        assert key not in instance.get_materialized_partitions(FILES)
        state = progress_rows.read_progress(conn)
        assert state["partitions"][key]["status"] == "stopped"
        assert state["total-successful"] == written == state["partitions"][key]["successful"]
        said = [entry.user_message for entry in instance.all_logs(run.run_id)]
        assert any("partitions stopped before they were finished" in line and key in line for line in said)

    fault_proxy.clear_rules()
    assert cli.main(["run", "--quiet", "--partition", key]) == 0
    assert_every_file_right(conn, s3_client, bucket, files)
    _assert_counts_kept(conn, key, files)
    assert key in dagster_runs.dagster_instance().get_materialized_partitions(FILES)


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_ctrl_c_or_sigterm_of_the_cli_stops_within_a_batch_and_says_so(
    conn, s3_client, bucket, one_app, fault_proxy, dagster_home, sent
):
    key, files = one_app
    fault_proxy.add_rule(FaultRule("latency", method="HEAD", latency_s=HEAD_LATENCY_S))
    process = subprocess.Popen(
        [sys.executable, "-m", "s3_attrs_pipeline.cli", "run", "--partition", key],
        cwd=REPO_ROOT,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: _written(conn) >= 100, "the run's first batches", timeout_s=120)
        asked = time.monotonic()
        process.send_signal(sent)
        out, _ = process.communicate(timeout=60)
        took = time.monotonic() - asked
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    written = _written(conn)
    _assert_quiet_after(conn, written)
    assert process.returncode == cli.EXIT_INTERRUPTED, out
    # A batch in flight, the partition's end recorded, the run's end recorded in Dagster, the process's exit.
    assert took < 20, f"the run took {took:.1f}s to stop"
    assert written < sum(f.in_s3 for f in files)
    assert "was interrupted" in out and f"failed partitions (rerun with --partition): {key}" in out
    summary = dict(re.findall(r"^(successful|processed)\s+([\d,]+)$", out, re.MULTILINE))
    state = progress_rows.read_progress(conn)
    assert state["partitions"][key]["status"] == "stopped"
    assert int(summary["successful"].replace(",", "")) == state["total-successful"] == written

    instance = dagster_runs.dagster_instance()
    [run] = instance.get_runs()
    assert run.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
    assert key not in instance.get_materialized_partitions(FILES)

    fault_proxy.clear_rules()
    assert cli.main(["run", "--quiet", "--partition", key]) == 0
    assert_every_file_right(conn, s3_client, bucket, files)
    _assert_counts_kept(conn, key, files)
