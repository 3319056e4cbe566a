"""Faults, bad data and hostile conditions (issue 5), each through the real parts: embedded
PostgreSQL, moto's S3 server, and the fault-injecting proxy between them and the pipeline."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import dagster as dg
import psycopg
import pytest

from s3_attrs_pipeline.instant import connection, progress_rows, writes
from s3_attrs_pipeline.instant.file_attrs import LOCATION_ID, value_md5
from s3_attrs_pipeline.local import seed
from s3_attrs_pipeline.s3.store import ObjectStore, S3AccessError, S3Settings
from s3_attrs_pipeline.tasks import backfill
from s3_attrs_pipeline.tasks.task import PartitionFailed, TaskSettings
from s3_attrs_pipeline_tests.conftest import REPO_ROOT
from s3_attrs_pipeline_tests.fault_proxy import FaultProxy, FaultRule
from s3_attrs_pipeline_tests.helpers import (
    head_values,
    location_triples,
    new_attr_triples,
    partition_of,
    partitions_of,
    swept_locations,
    wait_for,
)

LOG = dg.get_dagster_logger()


def _biggest_partition(files) -> tuple[str, list]:
    key = max({partition_of(f) for f in files}, key=lambda k: sum(partition_of(f) == k for f in files))
    return key, [f for f in files if partition_of(f) == key]


def _run(conn, endpoint, bucket, key, **s3_options):
    with ObjectStore(S3Settings(bucket, endpoint_url=endpoint, **s3_options)) as store:
        return backfill.backfill_partition(conn, store, key, TaskSettings(), LOG), store


def _assert_partition_right(conn, s3_client, bucket, files):
    """Every file with an object has exactly its HEAD's values; no file is half written."""
    written = new_attr_triples(conn)
    for file in files:
        attrs = written.get((file.app_id, file.entity_id), {})
        if not file.in_s3:
            assert attrs == {}
            continue
        assert len(attrs) == 2, f"file {file.entity_id} has {len(attrs)} of its 2 triples"
        etag, last_modified = head_values(s3_client, bucket, file.key)
        assert [values[0] for values in attrs.values()] in ([etag, last_modified], [last_modified, etag])


def _assert_totals_match_triples(conn, files):
    """The totals' total-successful is exactly the triples the pipeline wrote."""
    written = len(new_attr_triples(conn)) - sum(f.prepopulated for f in files)
    assert progress_rows.read_progress(conn)["total-successful"] == written
    _assert_totals_row_agrees(conn)


def test_a_503_storm_slows_the_requests_and_the_run_completes(conn, s3_endpoint, s3_client, bucket, seeded_files):
    key, files = _biggest_partition(seeded_files)
    with FaultProxy(s3_endpoint, seed=1) as proxy:
        proxy.add_rule(FaultRule("slowdown", rate=0.3, method="HEAD", duration_s=4))
        started = time.monotonic()
        report, store = _run(conn, proxy.url, bucket, key, max_retries=8)
        storm_requests = [t for t in proxy.request_times() if t - started < 4]
    assert report.counts.failed == 0 and report.counts.s3_throttled > 0
    assert store.rate_limiter.lowest_rate is not None
    # Unthrottled, moto answers hundreds of HEADs a second; while throttled the store paced itself.
    assert len(storm_requests) / 4 < 100, f"{len(storm_requests)} requests in the 4 s storm"
    _assert_partition_right(conn, s3_client, bucket, files)
    _assert_totals_match_triples(conn, seeded_files)


def test_5xx_resets_and_stalls_are_retried_and_never_hang(conn, s3_endpoint, s3_client, bucket, seeded_files):
    key, files = _biggest_partition(seeded_files)
    with FaultProxy(s3_endpoint, seed=2) as proxy:
        proxy.add_rule(FaultRule("internal_error", rate=0.15, method="HEAD"))
        proxy.add_rule(FaultRule("reset", rate=0.1, method="HEAD"))
        proxy.add_rule(FaultRule("stall", rate=0.05, method="HEAD", stall_s=5))
        started = time.monotonic()
        report, _ = _run(conn, proxy.url, bucket, key, max_retries=6, read_timeout_s=1)
        stats = proxy.stats()
    assert min(stats["internal_error"], stats["reset"], stats["stall"]) > 0, stats
    assert report.counts.failed == 0 and report.counts.s3_retries >= stats["internal_error"] + stats["reset"]
    assert time.monotonic() - started < 60
    _assert_partition_right(conn, s3_client, bucket, files)


def test_access_denied_to_the_bucket_stops_the_partition_at_once_and_writes_nothing(
    conn, s3_endpoint, bucket, seeded_files
):
    key, _ = _biggest_partition(seeded_files)
    before = new_attr_triples(conn)
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(FaultRule("access_denied", key_pattern=f"^/{bucket}/?$"))
        started = time.monotonic()
        with pytest.raises(S3AccessError, match="403"):
            _run(conn, proxy.url, bucket, key)
        assert proxy.stats()["access_denied"] == 1  # HEAD bucket, refused: no object is asked for
    assert time.monotonic() - started < 10
    assert new_attr_triples(conn) == before


def test_access_denied_to_one_apps_objects_fails_those_files_and_names_the_code(
    conn, s3_endpoint, s3_client, bucket, seeded_files
):
    """A bucket policy may refuse one app's objects (a condition, another account's objects) while the
    bucket answers: those files fail, each named with S3's answer; the partition's other apps are done."""
    key, files = _biggest_partition(seeded_files)
    refused_app = max({f.app_id for f in files}, key=lambda app: sum(f.app_id == app for f in files))
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(FaultRule("access_denied", method="HEAD", key_pattern=f"^/{bucket}/{refused_app}/"))
        with pytest.raises(PartitionFailed) as failed:
            _run(conn, proxy.url, bucket, key)
    refused = [f for f in files if f.app_id == refused_app and not f.prepopulated]
    assert failed.value.report.counts.failed == len(refused)
    assert all(
        "S3 refused the HEAD with 403" in p.reason
        for p in failed.value.report.problems
        if p.reason.startswith("failed")
    )
    written = new_attr_triples(conn)
    assert not [f for f in refused if (f.app_id, f.entity_id) in written]
    _assert_partition_right(conn, s3_client, bucket, [f for f in files if f.app_id != refused_app])


def test_malformed_object_metadata_is_counted_not_written(conn, s3_endpoint, s3_client, bucket, seeded_files):
    key, files = _biggest_partition(seeded_files)
    bad = [f for f in files if f.in_s3 and not f.prepopulated][:2]
    with FaultProxy(s3_endpoint) as proxy:
        for file in bad:
            proxy.add_rule(FaultRule("malformed_headers", key_pattern=re.escape(file.key)))
        report, _ = _run(conn, proxy.url, bucket, key)
    assert report.counts.malformed_object_metadata == 2 and report.counts.failed == 0
    assert {p.entity_id for p in report.problems if p.reason.startswith("malformed")} == {str(f.entity_id) for f in bad}
    written = new_attr_triples(conn)
    assert all((f.app_id, f.entity_id) not in written for f in bad)
    _assert_partition_right(conn, s3_client, bucket, [f for f in files if f not in bad])
    assert progress_rows.read_progress(conn)["partitions"][key]["malformed-object-metadata"] == 2


BAD_LOCATION_VALUES = {
    "number": 42,
    "null": None,
    "empty": "",
    "dot segment": "a/./b",
    "dotdot": "..",
    "control": "bad\nname",
    "too long": "x" * 1000,  # fits the triple's 1 KB check, but not S3's 1024-byte key
}


def _insert_file(conn, app_id, location_value) -> uuid.UUID:
    entity_id = uuid.uuid4()
    conn.execute(
        """INSERT INTO triples (app_id, entity_id, attr_id, value, value_md5, ea, eav, av, ave, vae, checked_data_type)
           VALUES (%s, %s, %s, %s::jsonb, %s, true, false, true, true, false, NULL)""",
        (
            app_id,
            entity_id,
            LOCATION_ID.attr_id,
            json.dumps(location_value),
            value_md5(location_value) if isinstance(location_value, (str, int)) else "37a6259cc0c1dae299a7866489dff0bd",
        ),
    )
    return entity_id


def test_bad_location_ids_are_logged_counted_and_skipped(conn, s3_endpoint, s3_client, bucket, seeded_files):
    key, files = _biggest_partition(seeded_files)
    app_id = files[0].app_id
    bad = {name: _insert_file(conn, app_id, value) for name, value in BAD_LOCATION_VALUES.items()}
    unicode_file = seed.SeededFile(app_id, uuid.uuid4(), "日本語 ファイル.txt", "x", True, False, False)
    seed.upload_objects(s3_client, bucket, [unicode_file])
    seed.insert_files(conn, s3_client, bucket, [unicode_file])

    report, _ = _run(conn, s3_endpoint, bucket, key)
    assert report.counts.invalid_location_id == len(BAD_LOCATION_VALUES) and report.counts.failed == 0
    reasons = " | ".join(p.reason for p in report.problems)
    for expected in (
        "JSON int",
        "JSON NoneType",
        "empty string",
        "'.' or '..' segment",
        "control characters",
        "S3 allows 1024",
    ):
        assert expected in reasons
    written = new_attr_triples(conn)
    assert all((app_id, entity_id) not in written for entity_id in bad.values())
    _assert_partition_right(conn, s3_client, bucket, [*files, unicode_file])


def test_a_file_deleted_with_its_app_mid_run_gets_nothing(conn, instant_db_url, s3_endpoint, bucket, seeded_files):
    key, files = _biggest_partition(seeded_files)
    doomed_app = files[0].app_id
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(FaultRule("latency", latency_s=0.3, key_pattern=str(doomed_app)))
        deleter = threading.Timer(
            0.5,
            lambda: psycopg.connect(instant_db_url, autocommit=True).execute(
                "DELETE FROM apps WHERE id = %s", (doomed_app,)
            ),
        )
        deleter.start()
        report, _ = _run(conn, proxy.url, bucket, key)
        deleter.join()
    assert report.counts.failed == 0
    leftovers = conn.execute("SELECT count(*) FROM triples WHERE app_id = %s", (doomed_app,)).fetchone()[0]
    assert leftovers == 0, "triples written for an app that no longer exists"


def _backend_pids(conn) -> list[int]:
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND pid <> pg_backend_pid()",
        (connection.APPLICATION_NAME,),
    ).fetchall()
    return [pid for (pid,) in rows]


def test_a_dropped_database_connection_fails_cleanly_and_a_rerun_finishes(
    conn, instant_db_url, s3_endpoint, s3_client, bucket, seeded_files
):
    key, files = _biggest_partition(seeded_files)
    errors = []
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(FaultRule("latency", latency_s=0.05, method="HEAD"))

        def run():
            try:
                # Two HEADs of 50 ms at a time: the partition takes seconds, not a fraction of one.
                with (
                    connection.connect(instant_db_url) as pipeline_conn,
                    ObjectStore(S3Settings(bucket, endpoint_url=proxy.url, max_in_flight=2)) as store,
                ):
                    backfill.backfill_partition(pipeline_conn, store, key, TaskSettings(batch_size=10), LOG)
            except psycopg.OperationalError as error:
                errors.append(error)

        prepopulated = len(new_attr_triples(conn))
        worker = threading.Thread(target=run)
        worker.start()
        wait_for(lambda: len(new_attr_triples(conn)) > prepopulated, "a first batch written", timeout_s=30)
        pids = _backend_pids(conn)
        assert pids, "the pipeline's session was not found"
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        worker.join(60)
    assert len(errors) == 1, "the run did not fail on losing its connection"
    partial = new_attr_triples(conn)
    assert all(len(attrs) == 2 for attrs in partial.values())
    before = _assert_no_count_without_its_triples(conn, seeded_files)

    report, _ = _run(conn, s3_endpoint, bucket, key)
    _assert_partition_right(conn, s3_client, bucket, files)
    _assert_rerun_counted_its_own(conn, seeded_files, before, report)


@pytest.mark.daemon
def test_kill_9_mid_partition_then_rerun(conn, s3_endpoint, s3_client, bucket, seeded_files, dagster_home, monkeypatch):
    key, files = _biggest_partition(seeded_files)
    with FaultProxy(s3_endpoint) as proxy:
        # 32 HEADs of 0.5 s at a time: the partition takes seconds, so the kill lands mid-way.
        proxy.add_rule(FaultRule("latency", latency_s=0.5, method="HEAD"))
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "s3_attrs_pipeline.cli",
                "run",
                "--partition",
                key,
                "--parallel",
                "1",
                "--batch-size",
                "10",
            ],
            cwd=REPO_ROOT,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        prepopulated = sum(f.prepopulated for f in seeded_files)
        while len(new_attr_triples(conn)) <= prepopulated + 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    partial = new_attr_triples(conn)
    assert prepopulated < len(partial) < prepopulated + sum(f.in_s3 and not f.prepopulated for f in files)
    assert all(len(attrs) == 2 for attrs in partial.values())
    assert progress_rows.read_progress(conn)["partitions"][key]["status"] == "running"
    before = _assert_no_count_without_its_triples(conn, seeded_files)

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    report, _ = _run(conn, s3_endpoint, bucket, key)
    _assert_partition_right(conn, s3_client, bucket, files)
    _assert_rerun_counted_its_own(conn, seeded_files, before, report)


def _assert_no_count_without_its_triples(conn, files) -> tuple[int, int]:
    """After a run died: the partition's row is written at most once a second, so the batches of the
    run's last second are in the triples and not yet in the counts; no count is of a file not written.
    (files written, files counted) so far."""
    written = len(new_attr_triples(conn)) - sum(f.prepopulated for f in files)
    counted = progress_rows.read_progress(conn)["total-successful"]
    assert 0 < counted <= written
    return written, counted


def _assert_rerun_counted_its_own(conn, files, before: tuple[int, int], rerun):
    """The rerun of the partition (`rerun`, its report) wrote the rest and added exactly that to the
    totals; the files the dead run wrote uncounted it found done (already populated)."""
    written_before, counted_before = before
    written = len(new_attr_triples(conn)) - sum(f.prepopulated for f in files)
    assert written == written_before + rerun.counts.successful
    assert progress_rows.read_progress(conn)["total-successful"] == counted_before + rerun.counts.successful
    prepopulated = sum(f.prepopulated for f in files if partition_of(f) == rerun.partition_key)
    assert rerun.counts.already_populated == prepopulated + written_before
    _assert_totals_row_agrees(conn)


def _assert_totals_row_agrees(conn):
    """The totals row, as the REPL migration's stats read it, is the sum of the partition rows."""
    stored = progress_rows.read_totals_row(conn)
    summed = progress_rows.read_progress(conn)
    assert {key: stored[key] for key in progress_rows.TOTAL_KEYS} == {
        key: summed[key] for key in progress_rows.TOTAL_KEYS
    }


def test_the_same_partition_twice_at_once(conn, instant_db_url, s3_endpoint, s3_client, bucket, seeded_files):
    key, files = _biggest_partition(seeded_files)
    reports, errors = [], []
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(FaultRule("latency", latency_s=0.05, method="HEAD"))
        barrier = threading.Barrier(2)

        def run():
            try:
                with (
                    connection.connect(instant_db_url) as pipeline_conn,
                    ObjectStore(S3Settings(bucket, endpoint_url=proxy.url)) as store,
                ):
                    barrier.wait()
                    reports.append(backfill.backfill_partition(pipeline_conn, store, key, TaskSettings(), LOG))
            except Exception as error:  # collected for the assertion below
                errors.append(error)

        workers = [threading.Thread(target=run) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
    assert errors == []
    assert sorted(r.left_to_another_run for r in reports) == [False, True]
    _assert_partition_right(conn, s3_client, bucket, files)
    _assert_totals_match_triples(conn, seeded_files)
    state = progress_rows.read_progress(conn)
    assert state["total-processed"] == sum(not f.prepopulated for f in files)


def test_the_pipeline_never_touches_location_id_triples(conn, s3_endpoint, bucket, seeded_files):
    before = location_triples(conn)
    for key in partitions_of(seeded_files):
        _run(conn, s3_endpoint, bucket, key)
    writes.delete_new_attr_triples(conn)
    assert location_triples(conn) == before
    assert swept_locations(conn) == 0
