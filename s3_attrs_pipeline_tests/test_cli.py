"""`s3-attrs` against the real parts, with a Dagster instance stored in PostgreSQL as dagster.yaml says."""

import json
import re

import psycopg
import pytest

from s3_attrs_pipeline import cli
from s3_attrs_pipeline.cli import dagster_runs
from s3_attrs_pipeline.instant import partition_locks, progress_rows, reads
from s3_attrs_pipeline.runs import range_run
from s3_attrs_pipeline_tests.helpers import (
    NEW_ATTR_IDS,
    all_triples,
    new_attr_triples,
    partition_of,
    partitions_of,
    swept_locations,
)


def test_run_then_stats_then_rollback(conn, bucket, seeded_files, dagster_home, capsys):
    before = all_triples(conn)
    prepopulated_triples = {t for t in before if t[2] in NEW_ATTR_IDS}
    args = ["run", "--parallel", "2"]
    for key in partitions_of(seeded_files):
        args += ["--partition", key]
    assert cli.main(args) == 0
    count = len(partitions_of(seeded_files))
    assert f"{count} of {count} done: {count} worked, 0 with nothing to do, 0 failed" in capsys.readouterr().out

    import dagster as dg

    from s3_attrs_pipeline.cli.dagster_runs import dagster_instance

    instance = dagster_instance()
    materialized = instance.get_materialized_partitions(dg.AssetKey("files_s3_attrs"))
    assert materialized == set(partitions_of(seeded_files))

    assert cli.main(["stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    in_s3 = sum(f.in_s3 for f in seeded_files)
    assert stats["total-files"] == len(seeded_files)
    assert stats["processed-files"] == in_s3
    assert stats["remaining-files"] == len(seeded_files) - in_s3
    assert stats["total-successful"] == in_s3 - sum(f.prepopulated for f in seeded_files)
    assert stats["total-failed"] == 0
    assert set(stats) >= {"completion-percentage", "total-processed", "completed"}

    assert cli.main(["rollback", "--yes"]) == 0
    after = all_triples(conn)
    assert after == before - prepopulated_triples
    assert new_attr_triples(conn) == {}
    assert progress_rows.read_progress(conn) == {}
    assert swept_locations(conn) == 0


def test_run_of_every_partition_is_one_run_that_works_only_those_with_files(
    conn, bucket, seeded_files, dagster_home, capsys
):
    import dagster as dg

    every, with_files = dagster_runs.all_partition_keys(), partitions_of(seeded_files)
    assert cli.main(["run"]) == 0
    out = capsys.readouterr().out
    assert f"{len(with_files)} of {len(every)} partitions have work" in out
    assert f"{len(every)} of {len(every)} done: {len(with_files)} worked" in out
    # Per-file problems (the seed has missing objects) are in the run's log, not on the terminal.
    assert "missing file" not in out

    instance = dagster_runs.dagster_instance()
    assert len(instance.get_runs()) == 1
    assert instance.get_materialized_partitions(dg.AssetKey("files_s3_attrs")) == set(every)
    assert progress_rows.read_progress(conn)["completed"] is True
    assert new_attr_triples(conn).keys() == {(f.app_id, f.entity_id) for f in seeded_files if f.in_s3}


def test_the_problem_files_of_each_second_are_one_entry_of_the_runs_log(conn, bucket, seeded_files, dagster_home):
    missing = [f for f in seeded_files if not f.in_s3 and not f.prepopulated]
    assert len(missing) >= 8
    assert cli.main(["run", "--quiet"]) == 0

    instance = dagster_runs.dagster_instance()
    (run,) = instance.get_runs()
    entries = [entry for entry in instance.all_logs(run.run_id) if "missing file" in entry.user_message]
    text = "\n".join(entry.user_message for entry in entries)
    assert all(f"missing file app={f.app_id} entity={f.entity_id}" in text for f in missing)
    # Lines are written at most once a LOG_LINES_INTERVAL_S, and once more as the workers end and as
    # the run leaves them: one entry for each (all of one level).
    span_s = entries[-1].timestamp - entries[0].timestamp
    assert len(entries) <= span_s / range_run.LOG_LINES_INTERVAL_S + 3, [entry.user_message for entry in entries]


def test_run_skips_partitions_with_nothing_new(conn, bucket, seeded_files, dagster_home, capsys):
    assert cli.main(["run", "--quiet"]) == 0
    before = all_triples(conn)
    state = progress_rows.read_progress(conn)
    capsys.readouterr()

    assert cli.main(["run", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"0 of {len(dagster_runs.all_partition_keys())} partitions have work" in out
    assert all_triples(conn) == before
    assert progress_rows.read_progress(conn)["total-processed"] == state["total-processed"]
    # Every partition shows materialized and none has work: no run, which would only materialize them again.
    assert "no run launched" in out
    assert len(dagster_runs.dagster_instance().get_runs()) == 1


def test_a_rerun_is_a_run_when_a_partition_has_work_again_or_every_partition_is_asked_for(
    conn, bucket, seeded_files, dagster_home, capsys
):
    assert cli.main(["run", "--quiet"]) == 0
    instance = dagster_runs.dagster_instance()
    done = next(f for f in seeded_files if f.in_s3)
    conn.execute(  # as if the file were uploaded anew without values
        "DELETE FROM triples WHERE app_id = %s AND entity_id = %s AND attr_id = ANY(%s)",
        (done.app_id, done.entity_id, list(NEW_ATTR_IDS)),
    )
    capsys.readouterr()

    assert cli.main(["run", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "no run launched" not in out and "1 of 256 partitions have work" in out
    assert len(instance.get_runs()) == 2
    assert (done.app_id, done.entity_id) in new_attr_triples(conn)

    assert cli.main(["run", "--quiet", "--all"]) == 0
    assert "no run launched" not in capsys.readouterr().out
    assert len(instance.get_runs()) == 3


def test_verbose_shows_the_problem_files(conn, bucket, seeded_files, dagster_home, capsys):
    missing = next(f for f in seeded_files if not f.in_s3 and not f.prepopulated)
    assert cli.main(["run", "--verbose", "--partition", partition_of(missing)]) == 0
    assert f"missing file app={missing.app_id}" in capsys.readouterr().err


def test_reset_clears_only_the_progress_row(conn, bucket, seeded_files, dagster_home):
    assert cli.main(["run", "--parallel", "1", "--partition", partitions_of(seeded_files)[0]]) == 0
    triples = all_triples(conn)
    assert progress_rows.read_progress(conn) != {}
    assert cli.main(["reset", "--yes"]) == 0
    assert progress_rows.read_progress(conn) == {}
    assert all_triples(conn) == triples


def test_destructive_commands_refuse_without_confirmation(conn, seeded_files, monkeypatch, capsys):
    before = all_triples(conn)
    with open("/dev/null") as no_terminal:
        monkeypatch.setattr("sys.stdin", no_terminal)
        assert cli.main(["rollback"]) == cli.EXIT_FAILED
    assert "pass --yes" in capsys.readouterr().err
    assert all_triples(conn) == before


def test_a_failed_partition_makes_run_exit_non_zero(conn, seeded_files, dagster_home, monkeypatch, capsys):
    monkeypatch.setenv("INSTANT_S3_BUCKET", "no-such-bucket-here")
    key = partitions_of(seeded_files)[0]
    assert cli.main(["run", "--parallel", "1", "--partition", key]) == cli.EXIT_FAILED
    out = capsys.readouterr().out
    assert f"partition {key} FAILED" in out and "does not exist" in out
    assert f"failed partitions (rerun with --partition): {key}" in out


@pytest.mark.parametrize(
    "env,message",
    [
        ({"INSTANT_DATABASE_URL": None}, "INSTANT_DATABASE_URL is not set"),
        ({"INSTANT_DATABASE_URL": "host=x port=notanumber ="}, "not a valid libpq connection string"),
        ({"INSTANT_S3_BUCKET": None}, "INSTANT_S3_BUCKET is not set"),
        ({"INSTANT_S3_BUCKET": "Bad_Bucket!"}, "not a valid S3 bucket name"),
    ],
)
def test_bad_settings_are_clear_errors_at_start(instant_db_url, bucket, monkeypatch, capsys, env, message):
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    assert cli.main(["run", "--partition", "00"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_unknown_partition_is_a_clear_error(instant_db_url, bucket, capsys):
    assert cli.main(["run", "--partition", "zz"]) == cli.EXIT_USAGE
    assert "unknown partition keys zz" in capsys.readouterr().err


def test_an_unreachable_database_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("INSTANT_DATABASE_URL", "postgresql://nobody:hunter2@127.0.0.1:1/none?connect_timeout=2")
    assert cli.main(["stats"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "cannot reach the InstantDB database" in err and "hunter2" not in err


def test_a_partition_another_session_holds_is_left_to_it_neither_materialized_nor_failed(
    conn, instant_db_url, bucket, seeded_files, dagster_home, capsys
):
    import dagster as dg

    keys = partitions_of(seeded_files)
    held = keys[0]
    args = ["run", "--parallel", "2"] + [arg for key in keys for arg in ("--partition", key)]
    with psycopg.connect(instant_db_url, autocommit=True) as other_run:
        assert partition_locks.try_lock_partition(other_run, held)
        assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert f"partition {held} left to the run working on it" in out
    assert f"left to the runs working on them: {held}" in out and "0 failed, 0 stopped, 1 left to other runs" in out
    instance = dagster_runs.dagster_instance()
    assert instance.get_materialized_partitions(dg.AssetKey("files_s3_attrs")) == set(keys) - {held}
    assert not {(f.app_id, f.entity_id) for f in seeded_files if partition_of(f) == held and not f.prepopulated} & (
        new_attr_triples(conn).keys()
    )
    # The lock holder gone, the next run works it (the checks and the daily heal find it by its gap).
    assert held in progress_rows.partitions_with_work(
        keys, reads.coverage_by_partition(conn, 2), progress_rows.read_progress(conn)
    )
    assert cli.main(["run", "--quiet", "--partition", held]) == 0
    assert held in instance.get_materialized_partitions(dg.AssetKey("files_s3_attrs"))


def test_sessions_let_the_server_notice_a_lost_machine_within_about_a_minute(instant_db_url):
    from s3_attrs_pipeline.instant import connection

    with connection.connect(instant_db_url) as session:
        params = session.info.get_parameters()
        assert session.execute("SELECT 1").fetchone() == (1,)  # the server took the options
    lost_after_s = int(params["keepalives_idle"]) + int(params["keepalives_interval"]) * int(params["keepalives_count"])
    assert params["keepalives"] == "1" and lost_after_s <= 90
    # The server's side, which ends the session (and frees its partition lock) when the client is gone:
    server = dict(re.findall(r"-c (tcp_\w+)=(\d+)", params["options"]))
    assert (
        int(server["tcp_keepalives_idle"])
        + int(server["tcp_keepalives_interval"]) * int(server["tcp_keepalives_count"])
        == lost_after_s
    )
    assert int(server["tcp_user_timeout"]) <= 90_000


def test_a_retried_step_materializes_the_partitions_without_work_too(
    conn, bucket, seeded_files, dagster_home, monkeypatch, capsys
):
    """The plan records the partitions without files as completed; a step that fails after that and is
    retried must still materialize them (and not twice)."""
    import dagster as dg

    from s3_attrs_pipeline.defs.resources import FileBucketResource

    opened = []
    open_store = FileBucketResource.open_store

    def fails_the_first_time(self):
        opened.append(self)
        if len(opened) == 1:
            raise dg.RetryRequested(max_retries=1, seconds_to_wait=0)
        return open_store(self)

    monkeypatch.setattr(FileBucketResource, "open_store", fails_the_first_time)
    assert cli.main(["run", "--quiet"]) == 0
    assert len(opened) == 2
    instance = dagster_runs.dagster_instance()
    every = dagster_runs.all_partition_keys()
    assert instance.get_materialized_partitions(dg.AssetKey("files_s3_attrs")) == set(every)
    records = instance.fetch_materializations(dg.AssetKey("files_s3_attrs"), limit=1000).records
    assert len(records) == len(every)
