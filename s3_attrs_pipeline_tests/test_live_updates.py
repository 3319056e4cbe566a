"""Live updates: the backfill's write transactions as InstantDB's server writes them, so that its
invalidator, sync subscriptions and webhooks hear of the new triples (or, at `off`, do not)."""

import collections
import json
import uuid

import dagster as dg
import pytest

from s3_attrs_pipeline import cli
from s3_attrs_pipeline.instant.app_id_ranges import partition_of_app
from s3_attrs_pipeline.instant.live_updates import LiveUpdates
from s3_attrs_pipeline.local import seed
from s3_attrs_pipeline.s3.store import ObjectStore, S3Settings
from s3_attrs_pipeline.tasks import backfill
from s3_attrs_pipeline.tasks.task import TaskSettings
from s3_attrs_pipeline_tests.conftest import BOTH_SCHEMAS
from s3_attrs_pipeline_tests.helpers import (
    NEW_ATTR_IDS,
    PARTITION_WIDTH,
    new_attr_triples,
    partition_of,
    partitions_of,
)

LOG = dg.get_dagster_logger()


def _backfill_all(conn, endpoint, bucket, files, **settings) -> None:
    with ObjectStore(S3Settings(bucket, endpoint_url=endpoint)) as store:
        for key in partitions_of(files):
            backfill.backfill_partition(conn, store, key, TaskSettings(batch_size=7, **settings), LOG)


def _with_neighbour_apps(conn, s3_client, bucket, seeded_files) -> list[seed.SeededFile]:
    """The seeded files and two more apps of 5 files in the first one's partition, so that pages
    and batches span apps."""
    key = partition_of(seeded_files[0])
    neighbours = [
        seed.SeededFile(
            uuid.UUID(f"{key}00000{n}-0000-4000-8000-000000000000"),
            uuid.uuid4(),
            str(uuid.uuid4()),
            f"neighbour/{n}/{i}.txt",
            True,
            False,
            False,
        )
        for n in (1, 2)
        for i in range(5)
    ]
    seed.upload_objects(s3_client, bucket, neighbours)
    seed.insert_files(conn, s3_client, bucket, neighbours)
    return [*seeded_files, *neighbours]


def _transactions_by_xid(conn) -> dict[str, list]:
    rows = conn.execute("SELECT xmin::text, app_id FROM transactions").fetchall()
    by_xid = collections.defaultdict(list)
    for xid, app_id in rows:
        by_xid[xid].append(app_id)
    return by_xid


@BOTH_SCHEMAS
@pytest.mark.parametrize("list_threshold", [0, 1], ids=["HEAD", "LIST"])
def test_at_queries_each_write_transaction_holds_one_transactions_row_of_its_one_app(
    conn, s3_endpoint, s3_client, bucket, seeded_files, list_threshold
):
    seeded_files = _with_neighbour_apps(conn, s3_client, bucket, seeded_files)
    _backfill_all(conn, s3_endpoint, bucket, seeded_files, list_threshold=list_threshold)
    seeded_before = {f.entity_id for f in seeded_files if f.prepopulated}
    triples = [
        (xid, app_id)
        for xid, app_id, entity_id in conn.execute(
            "SELECT xmin::text, app_id, entity_id FROM triples WHERE attr_id = ANY(%s)", (list(NEW_ATTR_IDS),)
        ).fetchall()
        if entity_id not in seeded_before
    ]
    assert len(triples) == 2 * sum(f.in_s3 and not f.prepopulated for f in seeded_files)
    by_xid = _transactions_by_xid(conn)
    for xid, app_id in triples:
        assert by_xid.get(xid) == [app_id], f"transaction {xid} wrote {app_id}'s triples with {by_xid.get(xid)}"
    # And no transactions row for a transaction that wrote no triple.
    assert set(by_xid) == {xid for xid, _ in triples}


@BOTH_SCHEMAS
def test_at_off_the_writes_are_raw_inserts(conn, s3_endpoint, bucket, seeded_files):
    _backfill_all(conn, s3_endpoint, bucket, seeded_files, live_updates=LiveUpdates.OFF)
    assert len(new_attr_triples(conn)) == sum(f.in_s3 for f in seeded_files)
    assert conn.execute("SELECT count(*) FROM transactions").fetchone()[0] == 0


def test_at_entities_the_triggers_emit_every_written_file_as_an_entity_message(conn, s3_endpoint, bucket, seeded_files):
    _backfill_all(conn, s3_endpoint, bucket, seeded_files, live_updates=LiveUpdates.ENTITIES, wal_msg_log_to_table=True)
    written = {entity_id for (_, entity_id) in new_attr_triples(conn)} - {
        f.entity_id for f in seeded_files if f.prepopulated
    }
    messages = conn.execute("SELECT prefix, content FROM wal_logs").fetchall()
    assert messages and {prefix for prefix, _ in messages} == {"update_ents"}
    emitted = {}
    for _, content in messages:
        for etype, entity_id, attrs in json.loads(content):
            assert etype == "$files"
            emitted[entity_id] = attrs
    assert {str(entity_id) for entity_id in written} <= set(emitted)
    file = next(f for f in seeded_files if f.in_s3 and not f.prepopulated)
    attrs = emitted[str(file.entity_id)]
    assert attrs[str(NEW_ATTR_IDS[0])] and attrs[str(NEW_ATTR_IDS[1])], "the message lacks hash or lastModified"
    # The settings are the transaction's own: nothing leaks into the session.
    assert conn.execute("SELECT current_setting('instant.wal_msg_app_id', true)").fetchone()[0] in (None, "")


def test_the_cli_takes_the_level_and_refuses_a_bad_one(conn, bucket, seeded_files, dagster_home, monkeypatch, capsys):
    monkeypatch.setenv("S3_ATTRS_LIVE_UPDATES", "loud")
    assert cli.main(["run", "--quiet"]) == cli.EXIT_USAGE
    assert "S3_ATTRS_LIVE_UPDATES='loud' is not one of off, queries, entities" in capsys.readouterr().err
    key = partition_of(seeded_files[0])
    assert cli.main(["run", "--quiet", "--partition", key, "--live-updates", "off"]) == 0
    assert conn.execute("SELECT count(*) FROM transactions").fetchone()[0] == 0
    assert any(partition_of_app(app_id, PARTITION_WIDTH) == key for app_id, _ in new_attr_triples(conn))


def test_settings_refuse_an_unknown_level():
    with pytest.raises(ValueError, match="live_updates must be one of off, queries, entities, not 'loud'"):
        TaskSettings(live_updates="loud")
