"""The refresh: values kept true after the backfill, when files are re-uploaded the way InstantDB's
server does it, objects are rewritten in place, or deleted; through embedded PostgreSQL and moto."""

import datetime
import time
import uuid

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from s3_attrs_pipeline import cli
from s3_attrs_pipeline.defs.assets import FILES_S3_ATTRS_REFRESH
from s3_attrs_pipeline.defs.resources import InstantDatabaseResource
from s3_attrs_pipeline.defs.schedules import weekly_refresh
from s3_attrs_pipeline.instant.file_attrs import LOCATION_ID, json_text, value_md5
from s3_attrs_pipeline.instant.object_keys import object_key
from s3_attrs_pipeline.s3.store import ObjectStore, S3Settings
from s3_attrs_pipeline.tasks import backfill, refresh
from s3_attrs_pipeline.tasks.task import TaskSettings
from s3_attrs_pipeline_tests.conftest import BOTH_SCHEMAS, REPO_ROOT
from s3_attrs_pipeline_tests.helpers import (
    NEW_ATTR_IDS,
    head_values,
    new_attr_triples,
    partition_of,
    partitions_of,
)

LOG = dg.get_dagster_logger()


def _backfill(conn, endpoint, bucket, files) -> None:
    with ObjectStore(S3Settings(bucket, endpoint_url=endpoint)) as store:
        for key in partitions_of(files):
            backfill.backfill_partition(conn, store, key, TaskSettings(), LOG)


def _refresh(conn, endpoint, bucket, files, list_threshold: int):
    settings = TaskSettings(batch_size=7, list_threshold=list_threshold)
    with ObjectStore(S3Settings(bucket, endpoint_url=endpoint)) as store:
        return [refresh.refresh_partition(conn, store, key, settings, LOG) for key in partitions_of(files)]


def _reupload(conn, s3_client, bucket, file) -> str:
    """As InstantDB's server re-uploads to an existing path: a new object under a new location-id,
    the entity's location-id triple rewritten in place, the old object deleted. The new key."""
    location_id = str(uuid.uuid4())
    key = object_key(file.app_id, location_id)
    s3_client.put_object(Bucket=bucket, Key=key, Body=f"new contents of {file.path}".encode())
    conn.execute(
        """INSERT INTO triples (app_id, entity_id, attr_id, value, value_md5, ea, eav, av, ave, vae, checked_data_type)
           VALUES (%s, %s, %s, %s::jsonb, %s, true, false, true, true, false, 'string')
           ON CONFLICT (app_id, entity_id, attr_id) WHERE ea
           DO UPDATE SET value = excluded.value, value_md5 = excluded.value_md5
           WHERE triples.value_md5 IS DISTINCT FROM excluded.value_md5""",
        (file.app_id, file.entity_id, LOCATION_ID.attr_id, json_text(location_id), value_md5(location_id)),
    )
    s3_client.delete_object(Bucket=bucket, Key=file.key)
    return key


def _new_attr_rows(conn) -> dict:
    """{(app_id, entity_id, attr_id): (xmin, ctid, value)} of every hash and lastModified triple."""
    rows = conn.execute(
        "SELECT app_id, entity_id, attr_id, xmin::text, ctid::text, value FROM triples WHERE attr_id = ANY(%s)",
        (list(NEW_ATTR_IDS),),
    ).fetchall()
    return {(a, e, attr): (xmin, ctid, value) for a, e, attr, xmin, ctid, value in rows}


def _other_triples(conn) -> set:
    return set(
        conn.execute(
            "SELECT app_id, entity_id, attr_id, value::text, value_md5, xmin::text FROM triples "
            "WHERE NOT attr_id = ANY(%s)",
            (list(NEW_ATTR_IDS),),
        ).fetchall()
    )


@BOTH_SCHEMAS
@pytest.mark.parametrize("list_threshold", [0, 1], ids=["HEAD", "LIST"])
def test_refresh_rewrites_exactly_the_values_whose_object_changed(
    conn, s3_endpoint, s3_client, bucket, seeded_files, list_threshold
):
    _backfill(conn, s3_endpoint, bucket, seeded_files)
    populated = [f for f in seeded_files if f.in_s3]
    reuploaded, rewritten, deleted = populated[:3], populated[3:5], populated[5:7]
    current_key = {f.entity_id: _reupload(conn, s3_client, bucket, f) for f in reuploaded}
    time.sleep(1.1)  # Last-Modified has whole seconds: a rewrite must land in another one
    for f in rewritten:
        s3_client.put_object(Bucket=bucket, Key=f.key, Body=b"rewritten in place")
        current_key[f.entity_id] = f.key
    for f in deleted:
        s3_client.delete_object(Bucket=bucket, Key=f.key)
    before, others_before = _new_attr_rows(conn), _other_triples(conn)

    reports = _refresh(conn, s3_endpoint, bucket, seeded_files, list_threshold)

    counts = sum((r.counts for r in reports), refresh.RefreshCounts())
    assert (counts.checked, counts.refreshed, counts.missing, counts.failed) == (len(populated), 5, 2, 0)
    assert counts.unchanged == len(populated) - 7
    if list_threshold == 0:  # HEADed files whose object is gone are named; a listing only counts them
        named = {p.entity_id for r in reports for p in r.problems if p.reason.startswith("missing")}
        assert named == {str(f.entity_id) for f in deleted}
    after = _new_attr_rows(conn)
    values = new_attr_triples(conn)
    changed = {f.entity_id for f in reuploaded + rewritten}
    for f in reuploaded + rewritten:
        stored = values[(f.app_id, f.entity_id)]
        assert (stored[NEW_ATTR_IDS[0]][0], stored[NEW_ATTR_IDS[1]][0]) == head_values(
            s3_client, bucket, current_key[f.entity_id]
        )
        assert stored[NEW_ATTR_IDS[0]][1] == stored[NEW_ATTR_IDS[0]][2]  # value_md5 is md5(value::text)
    # Every other hash and lastModified triple has its row version: not written at all.
    assert {k: v for k, v in after.items() if k[1] not in changed} == {
        k: v for k, v in before.items() if k[1] not in changed
    }
    assert all(after[k][2] == before[k][2] for k in before if k[1] in {f.entity_id for f in deleted})
    assert _other_triples(conn) == others_before  # nothing else in triples changed
    # Each rewrite is a transaction InstantDB hears of (live_updates queries): one transactions row, its app's.
    apps_by_xid = {}
    for xid, app_id in conn.execute("SELECT xmin::text, app_id FROM transactions").fetchall():
        apps_by_xid.setdefault(xid, []).append(app_id)
    for (app_id, entity_id, _), (xid, _, _) in after.items():
        if entity_id in changed:
            assert apps_by_xid.get(xid) == [app_id]

    again = _refresh(conn, s3_endpoint, bucket, seeded_files, list_threshold)
    assert sum(r.counts.refreshed for r in again) == 0 and _new_attr_rows(conn) == after


def test_refresh_runs_from_the_cli_with_only_the_refresh_grants(
    conn, instant_db_url, s3_endpoint, s3_client, bucket, seeded_files, dagster_home, monkeypatch, capsys
):
    _backfill(conn, s3_endpoint, bucket, seeded_files)
    reuploaded = next(f for f in seeded_files if f.in_s3)
    _reupload(conn, s3_client, bucket, reuploaded)
    role = f"s3refresh_{conn.info.dbname}"[:60]
    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    for name in ("postgres-grants-refresh.sql", "postgres-grants-current.sql", "postgres-grants-refresh-current.sql"):
        conn.execute((REPO_ROOT / "docs" / name).read_text().replace(":role", role))
    restricted = instant_db_url.replace("postgresql://postgres", f"postgresql://{role}", 1)
    with psycopg.connect(restricted) as session, pytest.raises(psycopg.errors.InsufficientPrivilege):
        session.execute("UPDATE triples SET created_at = 0")  # only value and value_md5 may be rewritten
    monkeypatch.setenv("INSTANT_DATABASE_URL", restricted)
    capsys.readouterr()

    assert cli.main(["refresh", "--quiet", "--parallel", "1"]) == 0
    out = capsys.readouterr().out
    summary = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert f"{len(partitions_of(seeded_files))} of 256 partitions have work" in out
    assert summary["refreshed"] == ["1"] and summary["failed"] == ["0"]


def test_the_weekly_schedule_refreshes_every_partition_with_values(
    conn, instant_db_url, s3_endpoint, bucket, seeded_files
):
    context = dg.build_schedule_context(
        resources={"instant_db": InstantDatabaseResource(url=instant_db_url)},
        scheduled_execution_time=datetime.datetime(2026, 11, 29, 5, tzinfo=datetime.UTC),
    )
    # One run over the range from the first partition with values to the last; its plan works only those.
    with_values = sorted({partition_of(f) for f in seeded_files if f.prepopulated})
    request = weekly_refresh(context)
    assert request.partition_key_range == dg.PartitionKeyRange(with_values[0], with_values[-1])
    _backfill(conn, s3_endpoint, bucket, seeded_files)
    request = weekly_refresh(context)
    partitions = partitions_of(seeded_files)
    assert request.partition_key_range == dg.PartitionKeyRange(partitions[0], partitions[-1])
    assert request.asset_selection == [FILES_S3_ATTRS_REFRESH]
