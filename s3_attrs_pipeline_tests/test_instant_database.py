"""The SQL layer against embedded PostgreSQL with InstantDB's tables."""

import threading
import time
import uuid

import dagster as dg
import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Json

from s3_attrs_pipeline.counts import FileCounts
from s3_attrs_pipeline.instant import catalog, connection, progress_rows, reads, writes
from s3_attrs_pipeline.instant.app_id_ranges import AppIdRange, partition_keys
from s3_attrs_pipeline.instant.file_attrs import (
    HASH,
    LAST_MODIFIED,
    LOCATION_ID,
    SYSTEM_CATALOG_APP_ID,
    json_text,
    value_md5,
)
from s3_attrs_pipeline.tasks import backfill
from s3_attrs_pipeline.tasks.task import TaskSettings
from s3_attrs_pipeline_tests.conftest import BOTH_SCHEMAS
from s3_attrs_pipeline_tests.helpers import partition_of

LOG = dg.get_dagster_logger()


@pytest.mark.parametrize(
    "value",
    [
        "abc",
        "",
        'quote " backslash \\ slash /',
        "tab\tnewline\ncontrol\x01\x1f del\x7f",
        "日本語 🎉 é",
        0,
        1704067200000,
    ],
)
def test_value_md5_matches_postgres(conn, value):
    pg_md5 = conn.execute("SELECT md5((%s::jsonb)::text)", (json_text(value),)).fetchone()[0]
    assert value_md5(value) == pg_md5


def _catalog_rows(conn):
    attrs = conn.execute(
        """SELECT id, value_type, cardinality, is_unique, is_indexed, checked_data_type::text, forward_ident
           FROM attrs WHERE app_id = %s AND label IN ('hash', 'lastModified') ORDER BY label""",
        (SYSTEM_CATALOG_APP_ID,),
    ).fetchall()
    idents = conn.execute(
        "SELECT id, attr_id, etype, label FROM idents WHERE app_id = %s AND label IN ('hash', 'lastModified') "
        "ORDER BY label",
        (SYSTEM_CATALOG_APP_ID,),
    ).fetchall()
    return attrs, idents


@BOTH_SCHEMAS
def test_new_attrs_are_created_once_with_their_system_ids(conn):
    catalog.ensure_file_attrs(conn)
    catalog.ensure_file_attrs(conn)
    attrs, idents = _catalog_rows(conn)
    assert attrs == [
        (HASH.attr_id, "blob", "one", False, True, "string", HASH.ident_id),
        (LAST_MODIFIED.attr_id, "blob", "one", False, True, "number", LAST_MODIFIED.ident_id),
    ]
    assert idents == [
        (HASH.ident_id, HASH.attr_id, "$files", "hash"),
        (LAST_MODIFIED.ident_id, LAST_MODIFIED.attr_id, "$files", "lastModified"),
    ]


@BOTH_SCHEMAS
def test_concurrent_attr_creation_is_safe(instant_db_url):
    errors = []
    barrier = threading.Barrier(4)

    def create():
        try:
            with connection.connect(instant_db_url) as session:
                barrier.wait()
                catalog.ensure_file_attrs(session)
        except Exception as error:  # collected for the assertion below
            errors.append(error)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with psycopg.connect(instant_db_url) as session:
        attrs, idents = _catalog_rows(session)
    assert len(attrs) == 2 and len(idents) == 2


@BOTH_SCHEMAS
def test_an_attr_with_unexpected_flags_is_a_clear_error(conn):
    catalog.ensure_file_attrs(conn)
    conn.execute("UPDATE attrs SET is_indexed = false WHERE id = %s", (HASH.attr_id,))
    with pytest.raises(catalog.CatalogMismatch, match=r"\$files.hash .* is_indexed is False, expected True"):
        catalog.ensure_file_attrs(conn)


@BOTH_SCHEMAS
def test_a_hash_attr_under_another_id_is_a_clear_error(conn):
    other_id = uuid.uuid4()
    conn.execute(
        """INSERT INTO attrs (id, app_id, value_type, cardinality, is_unique, is_indexed, forward_ident, etype, label)
           VALUES (%s, %s, 'blob', 'one', false, true, %s, '$files', 'hash')""",
        (other_id, SYSTEM_CATALOG_APP_ID, uuid.uuid4()),
    )
    with pytest.raises(catalog.CatalogMismatch, match=f"id is UUID\\('{other_id}'\\)"):
        catalog.ensure_file_attrs(conn)
    assert conn.execute("SELECT count(*) FROM idents WHERE label = 'hash'").fetchone()[0] == 0


@BOTH_SCHEMAS
def test_a_missing_location_id_attr_is_a_clear_error(conn):
    conn.execute("DELETE FROM attrs WHERE label = 'location-id'")
    with pytest.raises(catalog.CatalogMismatch, match=r"\$files.location-id .* does not exist"):
        catalog.ensure_file_attrs(conn)


@pytest.mark.parametrize("url", [None, "", "   ", "postgresql://u:secret@host:notaport/db?bad", "not a url = ="])
def test_bad_database_urls_are_clear_errors_without_the_password(url):
    with pytest.raises(connection.DatabaseUrlError, match="INSTANT_DATABASE_URL") as raised:
        connection.validate_database_url(url)
    assert "secret" not in str(raised.value)


@BOTH_SCHEMAS
def test_sessions_carry_timeouts(instant_db_url):
    limits = connection.SessionLimits(statement_timeout_ms=1234, lock_timeout_ms=567)
    with connection.connect(instant_db_url, limits) as session:
        assert session.execute("SHOW statement_timeout").fetchone()[0] == "1234ms"
        assert session.execute("SHOW lock_timeout").fetchone()[0] == "567ms"
        assert session.execute("SHOW plan_cache_mode").fetchone()[0] == "force_custom_plan"


@BOTH_SCHEMAS
def test_progress_is_kept_per_partition_and_the_totals_row_summed_from_it(conn):
    def config_rows() -> dict:
        return dict(conn.execute("SELECT k, v::text FROM config WHERE k LIKE 's3-attrs-%'").fetchall())

    progress_rows.record_progress(
        conn, "0a", "running", FileCounts(processed=5), added=FileCounts(processed=5, missing=1)
    )
    progress_rows.record_progress(conn, "0b", "completed", FileCounts(processed=2), added=FileCounts(processed=2))
    before = config_rows()
    assert progress_rows.PROGRESS_CONFIG_KEY not in before  # no batch writes the totals row
    progress_rows.record_progress(
        conn, "0a", "completed", FileCounts(processed=8), added=FileCounts(processed=3, missing=0)
    )
    progress_rows.record_totals(conn, partition_count=2)
    after = config_rows()

    assert (
        after[progress_rows.PARTITION_PROGRESS_KEY_PREFIX + "0b"]
        == before[progress_rows.PARTITION_PROGRESS_KEY_PREFIX + "0b"]
    )
    state = progress_rows.read_progress(conn)
    assert state["total-processed"] == 10 and state["total-missing"] == 1
    assert {key: (s["status"], s["processed"], s["total-processed"]) for key, s in state["partitions"].items()} == {
        "0a": ("completed", 8, 8),
        "0b": ("completed", 2, 2),
    }
    assert state["completed"] is True
    stored = progress_rows.read_totals_row(conn)
    assert "partitions" not in stored
    assert {key: stored[key] for key in progress_rows.TOTAL_KEYS} == {
        key: state[key] for key in progress_rows.TOTAL_KEYS
    }
    # A rerun of a partition: its row holds the latest run's counts, and the totals of every run.
    progress_rows.record_progress(conn, "0b", "completed", FileCounts(processed=1), added=FileCounts(processed=1))
    state = progress_rows.read_progress(conn)
    assert state["partitions"]["0b"]["processed"] == 1 and state["total-processed"] == 11

    progress_rows.reset_progress(conn)
    assert config_rows() == {} and progress_rows.read_progress(conn) == {}


@BOTH_SCHEMAS
def test_totals_kept_by_the_earlier_version_in_the_totals_row_are_carried_over(conn):
    """A backfill started by a version that added each batch to the totals row, finished by this one:
    the earlier runs' totals are not in any partition row, and are kept."""
    earlier = {"total-processed": 700, "total-successful": 690, "total-failed": 4, "total-missing": 6}
    conn.execute(
        "INSERT INTO config (k, v) VALUES (%s, %s)",
        (progress_rows.PROGRESS_CONFIG_KEY, Json(earlier | {"completed": False})),
    )
    conn.execute(
        "INSERT INTO config (k, v) VALUES (%s, %s)",
        (progress_rows.PARTITION_PROGRESS_KEY_PREFIX + "0a", Json({"status": "completed", "processed": 700})),
    )
    assert progress_rows.read_progress(conn)["total-processed"] == 700
    progress_rows.record_progress(
        conn, "0b", "completed", FileCounts(processed=10, successful=10), added=FileCounts(processed=10, successful=10)
    )
    assert progress_rows.read_progress(conn)["total-processed"] == 710
    for _ in range(2):  # carried over once, however often summed
        progress_rows.record_totals(conn, partition_count=2)
        stored = progress_rows.read_totals_row(conn)
        assert stored["total-processed"] == 710 and stored["total-successful"] == 700
        assert stored["total-failed"] == 4 and stored["completed"] is True
        assert progress_rows.read_progress(conn)["total-processed"] == 710


@BOTH_SCHEMAS
def test_a_batch_meeting_triples_written_meanwhile_is_written_again_without_conflict(conn, seeded_files):
    lone_last_modified, populated_meanwhile, fresh = [f for f in seeded_files if not f.prepopulated][:3]
    every_app = AppIdRange("all", uuid.UUID(int=0), uuid.UUID(int=2**128 - 1))
    pending = {file.entity_id: file for page in reads.iter_pending_batches(conn, every_app, 10_000) for file in page}
    planted = {
        (lone_last_modified, LAST_MODIFIED): 1_600_000_000_000,
        (populated_meanwhile, HASH): "written-by-someone-else",
        (populated_meanwhile, LAST_MODIFIED): 1_600_000_000_000,
    }
    for (file, spec), value in planted.items():
        conn.execute(
            """INSERT INTO triples (app_id, entity_id, attr_id, value, value_md5, ea, eav, av, ave, vae,
                                   checked_data_type)
               VALUES (%s, %s, %s, %s::jsonb, %s, true, false, false, true, false, %s::checked_data_type)""",
            (file.app_id, file.entity_id, spec.attr_id, json_text(value), value_md5(value), spec.checked_data_type),
        )
    batch = [
        writes.FileObjectAttrs(pending[f.entity_id], "abc", 1_700_000_000_000)
        for f in (lone_last_modified, populated_meanwhile, fresh)
    ]

    def attempt(on_conflict: bool) -> writes.WriteOutcome:
        with conn.transaction():
            return writes.write_file_attrs(conn, batch, on_conflict=on_conflict)

    with pytest.raises(psycopg.errors.UniqueViolation):
        attempt(False)
    outcome = writes.retried_on_conflict(attempt)

    assert (outcome.written, outcome.already_populated, outcome.vanished) == (2, 1, 0)
    values = {
        (entity_id, attr_id): value
        for entity_id, attr_id, value in conn.execute(
            "SELECT entity_id, attr_id, value FROM triples WHERE attr_id = ANY(%s)",
            ([HASH.attr_id, LAST_MODIFIED.attr_id],),
        ).fetchall()
    }
    assert values[(lone_last_modified.entity_id, HASH.attr_id)] == "abc"
    assert values[(lone_last_modified.entity_id, LAST_MODIFIED.attr_id)] == 1_600_000_000_000  # left as it was
    assert values[(populated_meanwhile.entity_id, HASH.attr_id)] == "written-by-someone-else"
    assert values[(fresh.entity_id, HASH.attr_id)] == "abc"
    assert values[(fresh.entity_id, LAST_MODIFIED.attr_id)] == 1_700_000_000_000


@BOTH_SCHEMAS
def test_a_listed_page_writes_the_files_at_its_locations_that_lack_hash(conn, seeded_files):
    by_app = {}
    for file in seeded_files:
        by_app.setdefault(file.app_id, []).append(file)
    app_id, files = max(by_app.items(), key=lambda item: len(item[1]))
    lone_last_modified, populated_meanwhile, fresh = [f for f in files if not f.prepopulated][:3]
    already = next(f for f in files if f.prepopulated)
    for file, spec, value in [
        (lone_last_modified, LAST_MODIFIED, 1_600_000_000_000),
        (populated_meanwhile, HASH, "written-by-someone-else"),
    ]:
        conn.execute(
            """INSERT INTO triples (app_id, entity_id, attr_id, value, value_md5, ea, eav, av, ave, vae,
                                   checked_data_type)
               VALUES (%s, %s, %s, %s::jsonb, %s, true, false, false, true, false, %s::checked_data_type)""",
            (file.app_id, file.entity_id, spec.attr_id, json_text(value), value_md5(value), spec.checked_data_type),
        )
    before = _new_attr_values(conn)
    listed = writes.ListedAttrs.of(
        app_id,
        [(f.location_id, "abc", 1_700_000_000_000) for f in (lone_last_modified, populated_meanwhile, fresh, already)]
        + [("no-file-has-this-location", "abc", 1_700_000_000_000)],
    )
    updates = []

    def attempt(on_conflict: bool) -> writes.WriteOutcome:
        with conn.transaction():
            outcome = writes.write_listed_attrs(conn, listed, on_conflict=on_conflict)
            written = FileCounts(processed=outcome.written, successful=outcome.written)
            progress_rows.record_progress(conn, "xx", "running", written, added=written)
            updates.append(outcome)
        return outcome

    outcome = writes.retried_on_conflict(attempt)

    assert outcome.written == 2 and outcome.last_written in {lone_last_modified.entity_id, fresh.entity_id}
    assert updates == [outcome] and progress_rows.read_progress(conn)["total-successful"] == 2
    values = _new_attr_values(conn)
    assert values[(lone_last_modified.entity_id, HASH.attr_id)] == "abc"
    assert values[(lone_last_modified.entity_id, LAST_MODIFIED.attr_id)] == 1_600_000_000_000  # left as it was
    assert values[(fresh.entity_id, HASH.attr_id)] == "abc"
    assert values[(fresh.entity_id, LAST_MODIFIED.attr_id)] == 1_700_000_000_000
    written_to = {lone_last_modified.entity_id, fresh.entity_id}
    assert {k: v for k, v in values.items() if k[0] not in written_to} == {
        k: v for k, v in before.items() if k[0] not in written_to
    }


def _new_attr_values(conn) -> dict:
    return {
        (entity_id, attr_id): value
        for entity_id, attr_id, value in conn.execute(
            "SELECT entity_id, attr_id, value FROM triples WHERE attr_id = ANY(%s)",
            ([HASH.attr_id, LAST_MODIFIED.attr_id],),
        ).fetchall()
    }


@BOTH_SCHEMAS
def test_pages_of_one_file_skip_populated_files_and_find_every_pending_one(conn, seeded_files):
    every_app = AppIdRange("all", uuid.UUID(int=0), uuid.UUID(int=2**128 - 1))
    found = [file.entity_id for page in reads.iter_pending_batches(conn, every_app, 1) for file in page]
    assert sorted(found) == sorted(f.entity_id for f in seeded_files if not f.prepopulated)
    assert any(f.prepopulated for f in seeded_files)  # so some pages of one scanned file had nothing to do


def _plan(conn, query, params) -> str:
    # Small test tables make any plan cheap: with sequential and bitmap scans priced out, the planner
    # shows which index serves the query's shape, which is what differs between the schemas.
    return "\n".join(reads.explain_preferring_indexes(conn, query, params))


def _big_app_of(partition_key: str) -> uuid.UUID:
    return uuid.UUID(partition_key + "ffffff-0000-4000-8000-000000000001"[len(partition_key) - 2 :])


def _add_a_big_app(conn, partition_key: str, files: int) -> None:
    """An app of `files` location-ids in the partition: it is then big enough for the planner to
    weigh an index range against a scan and a sort, as it does in production."""
    big_app = _big_app_of(partition_key)
    conn.execute("INSERT INTO apps (id, creator_id, title) SELECT %s, creator_id, 'big' FROM apps LIMIT 1", (big_app,))
    conn.execute(
        """INSERT INTO triples (app_id, entity_id, attr_id, value, value_md5, ea, eav, av, ave, vae, checked_data_type)
           SELECT %(app)s, e, %(attr)s, to_jsonb(e::text), md5(to_jsonb(e::text)::text), true, false, true, true, false,
                  'string'
           FROM (SELECT gen_random_uuid() AS e FROM generate_series(1, %(files)s)) files""",
        {"app": big_app, "attr": LOCATION_ID.attr_id, "files": files},
    )
    conn.execute("ANALYZE triples")


@BOTH_SCHEMAS
def test_the_streaming_queries_are_index_probes(conn, seeded_files, instant_schema):
    partition = AppIdRange.for_partition(partition_of(seeded_files[0]))
    _add_a_big_app(conn, partition.key, 20_000)
    ave_index = {"72": "ave_index", "current": "ave_with_e_index"}[instant_schema]
    page = {
        "location_attr": LOCATION_ID.attr_id,
        "hash_attr": HASH.attr_id,
        "first_app": partition.first,
        "last_app": partition.last,
        "limit": 50,
    }
    first = seeded_files[0]
    listed = writes.ListedAttrs.of(first.app_id, [(f.location_id, "abc", 1) for f in seeded_files[:20]])
    plans = {
        "first page": _plan(conn, reads._FIRST_PAGE, page),
        "next page": _plan(
            conn,
            reads._NEXT_PAGE,
            page
            | {
                "after_app": first.app_id,
                "after_value": json_text(first.location_id),
            },
        ),
        "file counts per app": _plan(conn, reads._APP_FILE_COUNTS, page),
        "a listed page's join": _plan(conn, writes.LISTED_LOCATED, listed.params),
    }
    for name, plan in plans.items():
        assert "Seq Scan on triples" not in plan, f"{name} scans triples:\n{plan}"
    # The count reads the partition's range of an index (which one depends on the data's shape).
    assert "(app_id >= " in plans["file counts per app"] and "app_id <= " in plans["file counts per app"]
    for name in ("first page", "next page", "a listed page's join"):
        assert ave_index in plans[name], f"{name} does not read location-ids through {ave_index}:\n{plans[name]}"
    for name in ("first page", "next page"):
        assert "Sort" not in plans[name].split("Limit")[1], f"{name} sorts instead of reading in index order"


def _add_a_populated_app(conn, app: uuid.UUID, files: int) -> None:
    """An app of `files` files with hash and lastModified."""
    catalog.ensure_file_attrs(conn)
    conn.execute("INSERT INTO apps (id, creator_id, title) SELECT %s, creator_id, 'big' FROM apps LIMIT 1", (app,))
    for spec, value in ((HASH, "to_jsonb(md5(n::text))"), (LAST_MODIFIED, "to_jsonb(1700000000000 + n * 1000)")):
        conn.execute(
            sql.SQL("""INSERT INTO triples (app_id, entity_id, attr_id, value, value_md5, ea, eav, av, ave, vae,
                                         checked_data_type)
                       SELECT %(app)s, uuid_in(md5(%(app)s::text || n)::cstring), %(attr)s, v, md5(v::text),
                              true, false, false, true, false, %(type)s::checked_data_type
                       FROM generate_series(1, %(files)s) n, LATERAL (SELECT {value} AS v) value""").format(
                value=sql.SQL(value)
            ),
            {"app": app, "attr": spec.attr_id, "type": spec.checked_data_type, "files": files},
        )


@BOTH_SCHEMAS
def test_the_queries_the_new_attrs_exist_for_read_an_index_for_one_app(conn, seeded_files, instant_schema):
    # Populated apps as in production: one app is a small share of every attr's triples.
    app = uuid.UUID("0bbbbbbb-0000-4000-8000-000000000001")
    _add_a_populated_app(conn, app, 3_000)
    _add_a_populated_app(conn, uuid.UUID("0ccccccc-0000-4000-8000-000000000001"), 30_000)
    conn.execute("ANALYZE triples")
    plans = {plan.query: plan for plan in reads.app_query_plans(conn, app)}
    assert set(plans) == set(reads.APP_QUERIES)
    assert {plan.app_id for plan in plans.values()} == {str(app)}
    ave_index, number_index = {
        "72": ("ave_index", "ave_index_number"),
        "current": ("ave_with_e_index", "triples_number_type_idx"),
    }[instant_schema]
    assert plans["files by hash"].index == ave_index, plans["files by hash"].plan
    for name in ("files ordered by lastModified desc", "files with lastModified > T"):
        assert plans[name].index == number_index, plans[name].plan

    conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(number_index)))  # a missing index is named
    plans = {plan.query: plan for plan in reads.app_query_plans(conn, app)}
    assert plans["files with lastModified > T"].index != number_index

    conn.execute("DELETE FROM triples WHERE attr_id = ANY(%s)", ([HASH.attr_id, LAST_MODIFIED.attr_id],))
    assert reads.app_query_plans(conn) == []  # nothing populated: nothing to ask
    assert reads.app_query_plans(conn, app) == []


# --- a file deleted while its values are written (issue 18) -----------------------------------------


def _delete_file(url: str, file) -> None:
    """As InstantDB deletes a `$files` entity: every triple of it, in one statement."""
    with psycopg.connect(url, autocommit=True) as deleter:
        deleter.execute("DELETE FROM triples WHERE app_id = %s AND entity_id = %s", (file.app_id, file.entity_id))


def _waiting_on_a_lock(conn, statement_start: str) -> bool:
    return conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s)",
        (statement_start + "%",),
    ).fetchone()[0]


def _wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"waited 30s for {what}"
        time.sleep(0.02)


def _pending(conn, file) -> writes.FileObjectAttrs:
    """What a batch writes for `file`: its values, for the location-id it was read with."""
    [page] = list(reads.iter_pending_batches(conn, AppIdRange("app", file.app_id, file.app_id), 10_000))
    [pending] = [f for f in page if f.entity_id == file.entity_id]
    return writes.FileObjectAttrs(pending, "0123456789abcdef0123456789abcdef", 1_700_000_000_000)


@BOTH_SCHEMAS
def test_a_delete_that_reaches_the_file_first_leaves_the_write_to_try_again_and_write_nothing(
    conn, instant_db_url, seeded_files
):
    """The write does not wait on a row a delete holds (see the test of several files below): it rolls
    back at once, and written again once the delete is done, it finds the file gone."""
    file = next(f for f in seeded_files if not f.prepopulated)
    values = _pending(conn, file)
    tries, outcomes = [], []
    with psycopg.connect(instant_db_url) as deleter:  # its transaction open until it commits
        deleter.execute("DELETE FROM triples WHERE app_id = %s AND entity_id = %s", (file.app_id, file.entity_id))

        def write() -> None:
            def attempt():
                tries.append(time.monotonic())
                with connection.connect(instant_db_url) as writer, writer.transaction():
                    return writes.write_file_attrs(writer, [values])

            outcomes.append(writes.retried_when_busy(attempt, time.sleep))

        writing = threading.Thread(target=write)
        writing.start()
        _wait_until(lambda: len(tries) >= 2, "the write to try again")  # the first met the delete's lock
        deleter.commit()
        writing.join(30)
    assert outcomes == [writes.WriteOutcome(written=0, already_populated=0, vanished=1)]
    assert reads.entity_counts_by_partition(conn, 2).orphaned_values == {}


@BOTH_SCHEMAS
def test_a_delete_that_meets_the_write_waits_for_it_and_what_it_misses_is_healed(
    conn, instant_db_url, s3_endpoint, bucket, seeded_files
):
    from s3_attrs_pipeline import verification
    from s3_attrs_pipeline.s3.store import ObjectStore, S3Settings
    from s3_attrs_pipeline.tasks import backfill
    from s3_attrs_pipeline_tests.helpers import new_attr_triples

    file = next(f for f in seeded_files if not f.prepopulated and f.in_s3)
    key = partition_of(file)
    values = _pending(conn, file)
    with connection.connect(instant_db_url) as writer:
        with writer.transaction():
            assert writes.write_file_attrs(writer, [values]).written == 1
            deleting = threading.Thread(target=_delete_file, args=(instant_db_url, file))
            deleting.start()
            # The location-id row the write read is locked until it commits: the delete waits.
            _wait_until(lambda: _waiting_on_a_lock(conn, "DELETE FROM triples"), "the delete to wait for the write")
        deleting.join(30)
    assert not deleting.is_alive()
    # The delete's snapshot predates the new triples: they outlive the file. The checks see them.
    assert (file.app_id, file.entity_id) in new_attr_triples(conn)
    assert reads.entity_counts_by_partition(conn, 2).orphaned_values == {key: 1}
    report = verification.database_report(conn, 2)
    assert report.orphaned_values == 1 and not report.consistent and key in report.partitions_to_heal

    # The next backfill of the partition (the daily heal runs one) removes them, as InstantDB hears of
    # any write: one transaction with a `transactions` row of the app.
    transactions = conn.execute("SELECT count(*) FROM transactions WHERE app_id = %s", (file.app_id,)).fetchone()[0]
    with ObjectStore(S3Settings(bucket, endpoint_url=s3_endpoint)) as store:
        report = backfill.backfill_partition(conn, store, key, TaskSettings(), LOG)
    assert report.counts.orphaned_values_removed == 1
    assert progress_rows.read_progress(conn)["partitions"][key]["orphaned-values-removed"] == 1
    assert (file.app_id, file.entity_id) not in new_attr_triples(conn)
    assert reads.entity_counts_by_partition(conn, 2).orphaned_values == {}
    assert verification.database_report(conn, 2).orphaned_values == 0
    after = conn.execute("SELECT count(*) FROM transactions WHERE app_id = %s", (file.app_id,)).fetchone()[0]
    assert after > transactions


def test_values_left_on_a_deleted_file_are_kept_and_warned_of_when_the_role_may_not_delete(
    conn, instant_db_url, s3_endpoint, bucket, seeded_files, caplog
):
    from s3_attrs_pipeline.s3.store import ObjectStore, S3Settings
    from s3_attrs_pipeline.tasks import backfill
    from s3_attrs_pipeline_tests.conftest import REPO_ROOT

    file = next(f for f in seeded_files if f.prepopulated)
    key = partition_of(file)
    conn.execute(
        "DELETE FROM triples WHERE app_id = %s AND entity_id = %s AND attr_id <> ALL(%s)",
        (file.app_id, file.entity_id, [HASH.attr_id, LAST_MODIFIED.attr_id]),
    )
    role = f"s3attrs_{conn.info.dbname}"[:60]
    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    for name in ("postgres-grants.sql", "postgres-grants-current.sql"):
        conn.execute((REPO_ROOT / "docs" / name).read_text().replace(":role", role))
    restricted = instant_db_url.replace("postgresql://postgres", f"postgresql://{role}", 1)
    with connection.connect(restricted) as pipeline, ObjectStore(S3Settings(bucket, endpoint_url=s3_endpoint)) as store:
        backfill.backfill_partition(pipeline, store, key, TaskSettings(), LOG)
    assert reads.entity_counts_by_partition(conn, 2).orphaned_values == {key: 1}
    assert "the role may not delete triples, so they stay" in caplog.text
    assert "docs/postgres-grants-heal.sql" in caplog.text


@BOTH_SCHEMAS
def test_an_app_deleted_while_its_files_are_written_waits_for_the_write_and_takes_its_triples(
    conn, instant_db_url, seeded_files
):
    """A delete of the app cascades to its triples from the app's row: the write, which took that row
    first (its `transactions` row), holds the delete off until it commits, and the cascade then takes
    the new triples too. Locked the other way round, the two would deadlock, and Postgres would end
    one of them: the app's delete, as like as not."""
    from s3_attrs_pipeline.instant import live_updates
    from s3_attrs_pipeline.instant.live_updates import LiveUpdates

    file = next(f for f in seeded_files if not f.prepopulated and f.in_s3)
    values = _pending(conn, file)
    errors = []

    def delete_app() -> None:
        try:
            with psycopg.connect(instant_db_url, autocommit=True) as deleter:
                deleter.execute("DELETE FROM apps WHERE id = %s", (file.app_id,))
        except psycopg.Error as error:  # a deadlock would end up here
            errors.append(error)

    with connection.connect(instant_db_url) as writer:
        with writer.transaction():
            live_updates.before_writing(writer, file.app_id, LiveUpdates.QUERIES, to_table=False)
            assert writes.write_file_attrs(writer, [values]).written == 1
            deleting = threading.Thread(target=delete_app)
            deleting.start()
            _wait_until(lambda: _waiting_on_a_lock(conn, "DELETE FROM apps"), "the app's delete to wait for the write")
        deleting.join(30)
    assert not deleting.is_alive() and errors == []
    left = conn.execute("SELECT count(*) FROM triples WHERE app_id = %s", (file.app_id,)).fetchone()[0]
    assert left == 0


@BOTH_SCHEMAS
def test_a_write_meeting_a_delete_of_several_files_in_progress_waits_for_nothing_and_writes_again(
    conn, instant_db_url, seeded_files
):
    """A delete of several files locks their rows in its own order. A write that waited on one of those
    rows while holding another could deadlock with it; it waits on none (NOWAIT), rolls back and is
    written again a moment later, when the delete is done."""
    first, second = [f for f in seeded_files if not f.prepopulated and f.in_s3 and f.app_id == seeded_files[0].app_id][
        :2
    ]
    values = [_pending(conn, first), _pending(conn, second)]
    outcomes, errors = [], []
    with psycopg.connect(instant_db_url) as deleter:  # deletes the second file now, the first later
        deleter.execute("DELETE FROM triples WHERE app_id = %s AND entity_id = %s", (second.app_id, second.entity_id))

        def write() -> None:
            def attempt():
                with connection.connect(instant_db_url) as writer, writer.transaction():
                    return writes.write_file_attrs(writer, values)

            try:
                outcomes.append(writes.retried_when_busy(attempt, time.sleep))
            except psycopg.Error as error:
                errors.append(error)

        writing = threading.Thread(target=write)
        writing.start()
        time.sleep(0.1)  # the write's first attempt meets the second file's row, locked by the delete
        deleter.execute("DELETE FROM triples WHERE app_id = %s AND entity_id = %s", (first.app_id, first.entity_id))
        deleter.commit()
        writing.join(30)
    assert errors == [] and outcomes == [writes.WriteOutcome(written=0, already_populated=0, vanished=2)]
    assert reads.entity_counts_by_partition(conn, 2).orphaned_values == {}


def _statistics_from_before_the_backfill(conn, partition_key: str) -> uuid.UUID:
    """A world whose statistics were taken before the backfill, as within a run: thousands of small
    apps (the planner then expects few triples of any one app) and a big app of 20,000 files without
    `hash` when ANALYZE ran; half of the big app's files have gained `hash` since. The big app's id."""
    conn.execute("ALTER TABLE triples SET (autovacuum_enabled = false)")
    conn.execute(
        "INSERT INTO apps (id, creator_id, title) SELECT gen_random_uuid(), creator_id, 'small' "
        "FROM (SELECT creator_id FROM apps LIMIT 1) a, generate_series(1, 5000)"
    )
    conn.execute(
        """INSERT INTO triples (app_id, entity_id, attr_id, value, value_md5, ea, eav, av, ave, vae, checked_data_type)
           SELECT a.id, e, %(attr)s, to_jsonb(e::text), md5(to_jsonb(e::text)::text), true, false, true, true, false,
                  'string'
           FROM apps a, LATERAL (SELECT gen_random_uuid() AS e FROM generate_series(1, 3)) f WHERE a.title = 'small'""",
        {"attr": LOCATION_ID.attr_id},
    )
    _add_a_big_app(conn, partition_key, 20_000)  # and ANALYZE
    catalog.ensure_file_attrs(conn)
    conn.execute(
        """INSERT INTO triples (app_id, entity_id, attr_id, value, value_md5, ea, eav, av, ave, vae, checked_data_type)
           SELECT app_id, entity_id, %(hash)s, v, md5(v::text), true, false, false, true, false, 'string'
           FROM triples, LATERAL (SELECT to_jsonb(md5(entity_id::text)) AS v) hash
           WHERE app_id = %(app)s AND attr_id = %(location)s AND entity_id::text < '8'""",
        {"hash": HASH.attr_id, "location": LOCATION_ID.attr_id, "app": _big_app_of(partition_key)},
    )
    return _big_app_of(partition_key)


def _analyzed(conn, query: sql.Composable, params: dict) -> dict:
    return conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + query, params, prepare=False).fetchone()[
        0
    ][0]["Plan"]


def _buffers(node: dict) -> int:
    return node["Shared Hit Blocks"] + node["Shared Read Blocks"]


def _plan_nodes(node: dict) -> list[dict]:
    return [node, *(found for child in node.get("Plans", []) for found in _plan_nodes(child))]


@BOTH_SCHEMAS
def test_a_page_probes_each_file_for_hash_through_its_own_entries(conn, seeded_files, instant_schema):
    # Each probe for `hash` reads one file's entries, not the app's every `hash` triple.
    partition = AppIdRange.for_partition(partition_of(seeded_files[0]))
    big_app = _statistics_from_before_the_backfill(conn, partition.key)
    page = {
        "location_attr": LOCATION_ID.attr_id,
        "hash_attr": HASH.attr_id,
        "first_app": big_app,
        "last_app": partition.last,
        "limit": 50,
    }
    plan = _analyzed(conn, reads._FIRST_PAGE, page)
    assert plan["Actual Rows"] == 50
    probes = [node for node in _plan_nodes(plan) if node.get("Subplan Name")]
    assert len(probes) == 1 and probes[0]["Actual Loops"] == 50, probes
    assert _buffers(probes[0]) <= 12 * 50, f"the probes for `hash` read {_buffers(probes[0])} buffers for 50 files"


@BOTH_SCHEMAS
def test_a_listed_page_probes_each_listed_key_alone(conn, seeded_files, instant_schema):
    # A page of 1,000 listed keys finds each key's file with a probe of its own, not by comparing
    # every key with every file of the app.
    partition = AppIdRange.for_partition(partition_of(seeded_files[0]))
    big_app = _statistics_from_before_the_backfill(conn, partition.key)
    locations = [
        row[0]
        for row in conn.execute(
            "SELECT value #>> '{}' FROM triples WHERE app_id = %s AND attr_id = %s AND ea ORDER BY value LIMIT 1000",
            (big_app, LOCATION_ID.attr_id),
        )
    ]
    listed = writes.ListedAttrs.of(big_app, [(location, "abc", 1) for location in locations])
    plan = _analyzed(conn, writes.LISTED_LOCATED, listed.params)
    assert _buffers(plan) <= 12 * len(locations) + 64, f"{_buffers(plan)} buffers for {len(locations)} listed keys"


@BOTH_SCHEMAS
def test_a_plan_reads_its_partitions_files_once(conn, seeded_files, instant_schema):
    # A run counts only the apps of its partitions (a one-partition rerun does not count every file),
    # in one pass over their entries: never comparing each file with every value of its app, and
    # finding the orphaned values in the same pass as the coverage.
    big_app = _statistics_from_before_the_backfill(conn, partition_of(seeded_files[0]))
    coverage = reads.coverage_by_partition(conn, 2)
    small_partition = next(key for key in sorted(coverage) if key != big_app.hex[:2])
    orphaned_file = next(f for f in seeded_files if f.prepopulated)
    conn.execute(  # values left on a deleted file, for the plan to find
        "DELETE FROM triples WHERE app_id = %s AND entity_id = %s AND attr_id = %s",
        (orphaned_file.app_id, orphaned_file.entity_id, LOCATION_ID.attr_id),
    )
    conn.execute("ANALYZE triples")

    def plan_buffers(keys: list[str]) -> int:
        params = reads.entity_count_params(2, AppIdRange.spanning(keys))
        return _buffers(_analyzed(conn, sql.SQL(reads._ENTITY_COUNTS_BY_PARTITION), params))

    every, one = plan_buffers(partition_keys(2)), plan_buffers([small_partition])
    # One pass over the table or over `ea_index`, not a probe per file.
    table_pages, index_pages = conn.execute(
        "SELECT pg_relation_size('triples') / 8192, pg_relation_size('ea_index') / 8192"
    ).fetchone()
    one_pass = table_pages + index_pages
    assert every <= one_pass + 64, f"every partition's plan read {every} buffers, a pass {one_pass}"
    small_files = coverage[small_partition].files
    assert one <= 6 * small_files + 64, f"one partition's plan read {one} buffers for its {small_files} files"
    # and sees the work of its partitions as the all-partition plan sees it
    everything = backfill.plan(conn, partition_keys(2))
    orphaned_partition = partition_of(orphaned_file)
    assert orphaned_partition in everything.with_work
    for key in (small_partition, orphaned_partition):
        alone = backfill.plan(conn, [key])
        assert alone.with_work == [key] and alone.files_to_do == reads.coverage_by_partition(conn, 2)[key].lacking_hash
