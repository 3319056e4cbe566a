"""The operator's live control of running backfills and refreshes: a row in `config` that `s3-attrs
pause`, `resume`, `throttle` and the UI's `operator_control` job set, and that every run reads every
few seconds. Through the real parts: a run of the asset in this process, S3 through the fault proxy
(which counts every request it receives), the triples and sessions of the database."""

import io
import re
import threading
import time

import dagster as dg
import pytest

from s3_attrs_pipeline import cli, environment
from s3_attrs_pipeline.cli import dagster_runs
from s3_attrs_pipeline.defs.config import RunConfig
from s3_attrs_pipeline.defs.jobs import operator_control_job
from s3_attrs_pipeline.defs.resources import InstantDatabaseResource
from s3_attrs_pipeline.instant import operator_control, partition_locks, progress_rows
from s3_attrs_pipeline.instant.operator_control import OperatorControl, read_control, set_control
from s3_attrs_pipeline.runs.range_run import NoListener
from s3_attrs_pipeline.tasks.operator_gate import CONTROL_POLL_S
from s3_attrs_pipeline_tests.helpers import assert_every_file_right, new_attr_triples, wait_for


def test_the_control_row_is_set_read_and_kept_by_a_reset(conn):
    assert read_control(conn) == OperatorControl()
    assert read_control(conn).describe() == "running, no limit"
    paused = set_control(conn, set_by="alice", reason="deploy until 14:00", paused=True)
    assert read_control(conn) == paused
    assert paused.describe().startswith("paused by alice at 20") and paused.describe().endswith(": deploy until 14:00")
    throttled = set_control(
        conn, set_by="bob", **operator_control.changes(paused=False, max_rps=40, partitions_at_once=2)
    )
    assert (throttled.paused, throttled.max_rps, throttled.partitions_at_once) == (False, 40, 2)
    assert throttled.describe().startswith("running, at most 40 S3 requests/s per run, at most 2 partitions at once")
    lifted = set_control(conn, set_by="bob", **operator_control.changes(max_rps=0))
    assert (lifted.max_rps, lifted.partitions_at_once) == (None, 2)
    progress_rows.reset_progress(conn)  # clears the progress, not the operator's levers
    assert read_control(conn) == lifted
    for bad in ({"max_rps": -1}, {"partitions_at_once": -2}):
        with pytest.raises(ValueError, match="give"):
            set_control(conn, set_by="x", **bad)
    assert read_control(conn) == lifted


class _Heard(NoListener):
    """What the run said it waits for, with when."""

    def __init__(self):
        self.lock = threading.Lock()
        self.texts: list[tuple[float, str | None]] = []

    def paused(self, text: str | None) -> None:
        with self.lock:
            self.texts.append((time.monotonic(), text))

    def first(self, fragment: str) -> tuple[float, str] | None:
        with self.lock:
            return next(((at, t) for at, t in self.texts if t and fragment in t), None)


def _busy_sessions(conn) -> list[tuple]:
    """The database's sessions doing something or holding a transaction, this one aside."""
    return conn.execute(
        "SELECT pid, state, query FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND state IS DISTINCT FROM 'idle'"
    ).fetchall()


def test_a_ceiling_paces_a_run_a_pause_holds_it_and_resume_lets_it_finish(
    conn, s3_client, bucket, seeded_files, fault_proxy, dagster_home, capsys
):
    rps = 40
    assert cli.main(["throttle", "--rps", str(rps), "--by", "test"]) == 0
    heard, outcome = _Heard(), []
    keys = dagster_runs.all_partition_keys()
    environ = environment.read()
    run = threading.Thread(
        target=lambda: outcome.append(
            dagster_runs.materialize_range(
                dagster_runs.dagster_instance(environ), keys, environ, config=RunConfig(), listener=heard
            )
        )
    )
    run.start()
    try:
        wait_for(lambda: len(new_attr_triples(conn)) >= 20, "the run's first writes", timeout_s=120)
        # The store paces its requests: one every 1/rps seconds, whatever S3 allows.
        times = fault_proxy.request_times()
        window = [t for t in times if t >= times[-1] - 2.0]
        assert len(window) <= rps * 2.0 + 1, f"{len(window)} requests in 2 s under a ceiling of {rps}/s"

        assert cli.main(["pause", "--reason", "deploy", "--by", "alice"]) == 0
        held_at, text = wait_for(lambda: heard.first("paused by alice"), "the run to hold", timeout_s=60)
        assert text.endswith(": deploy; every partition holds until `s3-attrs resume`")
        # Held: the store sends nothing once its requests on the wire (sent before the hold, received by
        # the proxy within milliseconds) are answered; no partition writes or holds a transaction.
        time.sleep(0.5)
        requests, written = len(fault_proxy.request_times()), len(new_attr_triples(conn))
        deadline = time.monotonic() + 3 * CONTROL_POLL_S
        while time.monotonic() < deadline:
            assert _busy_sessions(conn) == []
            time.sleep(0.2)
        assert len(fault_proxy.request_times()) == requests
        assert len(new_attr_triples(conn)) == written
        assert run.is_alive()

        capsys.readouterr()
        assert cli.main(["control"]) == 0
        assert "paused by alice at " in capsys.readouterr().out
        assert cli.main(["resume", "--by", "alice"]) == 0
        assert cli.main(["throttle", "--rps", "0", "--by", "alice"]) == 0
        run.join(timeout=300)
        assert not run.is_alive()
    finally:
        if run.is_alive():
            set_control(conn, set_by="test teardown", paused=False)
            run.join(timeout=300)
    (result,) = outcome
    assert result.success, result.error
    resumed_at, _ = wait_for(lambda: next(((at, t) for at, t in heard.texts[1:] if t is None), None), "resume", 1)
    assert resumed_at > held_at
    assert_every_file_right(conn, s3_client, bucket, seeded_files)


def test_the_cli_sets_and_shows_the_control_and_refuses_bad_values(conn, capsys):
    assert cli.main(["pause", "--by", "alice"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("paused by alice at ") and "hold within" in out
    assert cli.main(["throttle", "--rps", "25", "--parallel", "3", "--reason", "peak hours", "--by", "bob"]) == 0
    assert cli.main(["control", "--json"]) == 0
    shown = capsys.readouterr().out.splitlines()[-1]
    assert '"paused": true' in shown and '"max-rps": 25.0' in shown and '"partitions-at-once": 3' in shown
    assert cli.main(["resume", "--by", "alice"]) == 0
    assert read_control(conn).paused is False and read_control(conn).max_rps == 25.0
    capsys.readouterr()
    assert cli.main(["throttle", "--by", "x"]) == 2
    assert "throttle needs --rps or --parallel" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        cli.main(["throttle", "--rps", "fast"])
    assert usage.value.code == 2 and "argument --rps: not a number: 'fast'" in capsys.readouterr().err
    assert cli.main(["throttle", "--parallel", "-1"]) == 2
    assert "give 1 or more" in capsys.readouterr().err
    assert read_control(conn).partitions_at_once == 3


def test_the_ui_job_sets_the_same_row(conn, instant_db_url):
    resources = {"instant_db": InstantDatabaseResource(url=instant_db_url)}
    config = {"ops": {"set_operator_control": {"config": {"action": "pause", "reason": "incident", "set_by": "carol"}}}}
    assert operator_control_job.execute_in_process(run_config=config, resources=resources).success
    control = read_control(conn)
    assert control.paused and control.set_by == "carol" and control.reason == "incident"
    throttle = {"action": "throttle", "max_rps": 10.0}
    result = operator_control_job.execute_in_process(
        run_config={"ops": {"set_operator_control": {"config": throttle}}}, resources=resources
    )
    assert result.success and read_control(conn).max_rps == 10.0 and read_control(conn).paused
    with pytest.raises(dg.Failure, match="throttle needs max_rps or partitions_at_once"):
        operator_control_job.execute_in_process(
            run_config={"ops": {"set_operator_control": {"config": {"action": "throttle"}}}}, resources=resources
        )


def test_fewer_partitions_at_once_hold_the_other_workers(conn, s3_client, bucket, seeded_files, dagster_home):
    assert cli.main(["throttle", "--parallel", "1", "--by", "test"]) == 0
    # The partitions being worked: the advisory lock each worker holds on its partition.
    held = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database()) AND classid = %s"
    )
    namespace = partition_locks._LOCK_NAMESPACE & 0xFFFFFFFF
    exit_status: list[int] = []
    run = threading.Thread(target=lambda: exit_status.append(cli.main(["run", "--quiet", "--parallel", "4"])))
    run.start()
    samples = []
    while run.is_alive():
        samples.append(conn.execute(held, (namespace,)).fetchone()[0])
        time.sleep(0.02)
    run.join()
    assert exit_status == [0]
    # A run of 4 partitions at once works one at a time; the lock was seen held, so the samples saw work.
    assert max(samples) == 1, samples
    assert_every_file_right(conn, s3_client, bucket, seeded_files)


def test_a_run_launched_while_paused_holds_before_its_first_request(
    conn, s3_client, bucket, seeded_files, fault_proxy, dagster_home
):
    set_control(conn, set_by="alice", reason="incident", paused=True)
    heard, outcome = _Heard(), []
    environ = environment.read()
    run = threading.Thread(
        target=lambda: outcome.append(
            dagster_runs.materialize_range(
                dagster_runs.dagster_instance(environ),
                dagster_runs.all_partition_keys(),
                environ,
                config=RunConfig(),
                listener=heard,
            )
        )
    )
    written = len(new_attr_triples(conn))
    run.start()
    try:
        wait_for(lambda: heard.first("paused by alice"), "the run to hold", timeout_s=60)
        time.sleep(CONTROL_POLL_S)
        assert fault_proxy.request_times() == []  # not even the bucket's check
        assert len(new_attr_triples(conn)) == written
    finally:
        set_control(conn, set_by="alice", paused=False)
        run.join(timeout=300)
    assert not run.is_alive() and outcome[0].success
    assert_every_file_right(conn, s3_client, bucket, seeded_files)


def test_the_cli_display_shows_a_pause_apart_from_replication_waits():
    from s3_attrs_pipeline.cli.commands import SUMMARY_COUNTS
    from s3_attrs_pipeline.cli.display import ProgressDisplay
    from s3_attrs_pipeline.counts import FileCounts
    from s3_attrs_pipeline.runs.range_run import RangeSettings

    out = io.StringIO()
    display = ProgressDisplay(out, FileCounts, SUMMARY_COUNTS, live=False, quiet=False, verbose=False)
    display.paused("paused by alice at 2026-12-06T13:02:11+00:00: deploy; every partition holds")
    assert display.status().endswith(
        "· paused by alice at 2026-12-06T13:02:11+00:00: deploy; every partition holds (0s)"
    )
    display.paused(None)
    summary = display.finish([], RangeSettings())
    assert re.search(r"^paused +\d+\.\ds$", summary, re.M) and re.search(r"^replication wait +0\.0s$", summary, re.M)
    lines = out.getvalue().splitlines()
    assert lines[0] == "paused by alice at 2026-12-06T13:02:11+00:00: deploy; every partition holds"
    assert "resumed" in lines[1:]
