"""The LIST strategy: apps read with ListObjectsV2 instead of a HEAD per file, against moto over HTTP."""

import datetime
import itertools
import os
import uuid

import dagster as dg
import psycopg
import pytest

from s3_attrs_pipeline import backfill
from s3_attrs_pipeline.defs.assets import BackfillConfig, files_s3_attrs
from s3_attrs_pipeline.defs.resources import resources_from_env
from s3_attrs_pipeline.instant import database as db
from s3_attrs_pipeline.instant.object_keys import location_bin, location_id_of_key, object_key
from s3_attrs_pipeline.instant.file_attrs import HASH, LAST_MODIFIED
from s3_attrs_pipeline.instant.partitions import AppIdRange
from s3_attrs_pipeline.local import postgres, seed
from s3_attrs_pipeline.s3 import listing
from s3_attrs_pipeline.s3.object_metadata import MalformedObjectMetadata, ObjectStore, S3AccessError, S3Settings
from s3_attrs_pipeline_tests import conftest
from s3_attrs_pipeline_tests.fault_proxy import FaultProxy, FaultRule
from s3_attrs_pipeline_tests.helpers import head_values, new_attr_triples

LOG = dg.get_dagster_logger()
LIST_EVERY_APP = backfill.BackfillSettings(batch_size=10, list_threshold=1)
HEAD_EVERY_FILE = backfill.BackfillSettings(batch_size=10, list_threshold=0)
_twins = itertools.count()


def _partitions_of(files) -> list[str]:
    return sorted({f.app_id.hex[:2] for f in files})


def _backfill_all(conn, store, files, settings) -> dict[str, backfill.PartitionReport]:
    return {key: backfill.backfill_partition(conn, store, key, settings, LOG) for key in _partitions_of(files)}


def _totals(reports) -> dict[str, int]:
    names = ("processed", "successful", "missing", "failed", "invalid", "malformed", "already_populated")
    return {name: sum(getattr(r, name) for r in reports.values()) for name in names}


@pytest.fixture
def twin_conn(pg_server_url, s3_client, bucket, seeded_files):
    """A second database seeded with the same files as `conn`, over the same bucket."""
    name = f"instant_twin_{os.getpid()}_{next(_twins)}"
    url = postgres.create_database(pg_server_url, name, template=conftest._TEMPLATE_DB)
    with psycopg.connect(url, autocommit=True) as connection:
        seed.insert_files(connection, s3_client, bucket, seeded_files)
        yield connection
    postgres.drop_database(pg_server_url, name)


def test_listing_writes_exactly_what_heads_write(conn, twin_conn, s3_endpoint, s3_client, bucket, seeded_files,
                                                  monkeypatch):
    # Pages of 7 keys: every app's listing takes several requests and the prefetching thread runs ahead.
    monkeypatch.setattr(listing, "LIST_PAGE_SIZE", 7)
    with FaultProxy(s3_endpoint) as proxy, ObjectStore(S3Settings(bucket, endpoint_url=proxy.url)) as store:
        listed_reports = _backfill_all(conn, store, seeded_files, LIST_EVERY_APP)
        listed_requests = proxy.stats()["requests"]
    with ObjectStore(S3Settings(bucket, endpoint_url=s3_endpoint)) as store:
        headed_reports = _backfill_all(twin_conn, store, seeded_files, HEAD_EVERY_FILE)

    listed, headed = new_attr_triples(conn), new_attr_triples(twin_conn)
    assert listed == headed
    assert _totals(listed_reports) == _totals(headed_reports)
    assert _totals(listed_reports)["missing"] == sum(not f.in_s3 for f in seeded_files)
    for file in seeded_files:
        if file.in_s3:
            triples = listed[(file.app_id, file.entity_id)]
            assert (triples[HASH.attr_id][0], triples[LAST_MODIFIED.attr_id][0]) == head_values(
                s3_client, bucket, file.key
            )
    # One request per 7 objects of each app and one more for its last page; a HEAD bucket per partition.
    apps = {f.app_id for f in seeded_files}
    partitions = len(_partitions_of(seeded_files))
    assert listed_requests <= sum(f.in_s3 for f in seeded_files) / 7 + len(apps) + partitions
    assert listed_requests < len(seeded_files) / 3


def _largest_partition(files) -> str:
    return max(_partitions_of(files), key=lambda k: sum(f.app_id.hex[:2] == k for f in files))


def test_an_object_under_another_bin_is_not_the_files_object(conn, s3_endpoint, s3_client, bucket, seeded_files):
    missing = next(f for f in seeded_files if not f.in_s3)
    wrong_bin = (location_bin(missing.location_id) + 1) % 10
    s3_client.put_object(Bucket=bucket, Key=f"{missing.app_id}/{wrong_bin}/{missing.location_id}", Body=b"x")
    s3_client.put_object(Bucket=bucket, Key=f"{missing.app_id}/{missing.key.split('/')[1]}/nested/x", Body=b"x")
    with ObjectStore(S3Settings(bucket, endpoint_url=s3_endpoint)) as store:
        report = backfill.backfill_partition(conn, store, missing.app_id.hex[:2], LIST_EVERY_APP, LOG)
    assert report.apps_listed >= 1
    assert (missing.app_id, missing.entity_id) not in new_attr_triples(conn)
    assert any(p.entity_id == str(missing.entity_id) and "not in the listing" in p.reason for p in report.problems)


def test_a_failing_listing_falls_back_to_heads(conn, s3_endpoint, s3_client, bucket, seeded_files):
    key = _largest_partition(seeded_files)
    files = [f for f in seeded_files if f.app_id.hex[:2] == key]
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(FaultRule("internal_error", method="GET"))  # every listing request; HEADs pass
        with ObjectStore(S3Settings(bucket, endpoint_url=proxy.url, max_retries=1)) as store:
            report = backfill.backfill_partition(conn, store, key, LIST_EVERY_APP, LOG)
        assert proxy.stats()["internal_error"] == 2 * len({f.app_id for f in files})  # a try and a retry each
    assert report.apps_listed == 0
    assert report.failed == 0 and report.missing == sum(not f.in_s3 for f in files)
    written = new_attr_triples(conn)
    assert {(f.app_id, f.entity_id) for f in files if f.in_s3} <= set(written)


def test_a_listing_denied_stops_the_partition_and_writes_nothing(conn, s3_endpoint, bucket, seeded_files):
    key = _largest_partition(seeded_files)
    before = new_attr_triples(conn)
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(FaultRule("access_denied", method="GET"))
        with ObjectStore(S3Settings(bucket, endpoint_url=proxy.url)) as store:
            with pytest.raises(S3AccessError, match="s3:ListBucket"):
                backfill.backfill_partition(conn, store, key, LIST_EVERY_APP, LOG)
    assert new_attr_triples(conn) == before


def test_the_launchpad_setting_chooses_the_listing(conn, seeded_files):
    key = _largest_partition(seeded_files)

    def materialize(list_threshold: int) -> dict:
        with dg.instance_for_test() as instance:
            result = dg.materialize(
                [files_s3_attrs], partition_key=key, instance=instance, resources=resources_from_env(),
                run_config=dg.RunConfig(ops={"files_s3_attrs": BackfillConfig(list_threshold=list_threshold)}),
            )
        event = result.asset_materializations_for_node("files_s3_attrs")[0]
        return {name: value.value for name, value in event.metadata.items()}

    assert materialize(list_threshold=1000)["apps_listed"] == 0  # the default: these apps are too small
    db.delete_new_attr_triples(conn)
    listed = materialize(list_threshold=1)
    assert listed["apps_listed"] == len({f.app_id for f in seeded_files if f.app_id.hex[:2] == key})
    assert listed["successful"] == sum(f.in_s3 for f in seeded_files if f.app_id.hex[:2] == key)


# --- pure parts ---


def test_a_key_names_a_location_id_only_under_its_app_and_bin():
    app = uuid.UUID("0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d")
    assert location_id_of_key(app, f"{app}/5/circle_red.jpg") == "circle_red.jpg"
    assert location_id_of_key(app, f"{app}/3/日本語.txt") == "日本語.txt"
    assert location_id_of_key(app, f"{app}/4/circle_red.jpg") is None  # wrong bin
    assert location_id_of_key(uuid.uuid4(), f"{app}/5/circle_red.jpg") is None  # another app
    assert location_id_of_key(app, f"{app}/5/x/circle_red.jpg") is None  # nested
    assert location_id_of_key(app, f"{app}/5/") is None
    assert object_key(app, "photo.png") == f"{app}/1/photo.png"


def test_listed_metadata_is_cut_to_the_second_a_head_gives():
    instant = datetime.datetime(2026, 11, 24, 9, 31, 16, 987000, tzinfo=datetime.timezone.utc)
    metadata = listing.metadata_of(listing.ListedObject("k", '"abc-2"', instant))
    assert metadata.hash == "abc-2"
    assert metadata.last_modified_ms == 1795512676000
    with pytest.raises(MalformedObjectMetadata, match="ETag"):
        listing.metadata_of(listing.ListedObject("k", 'garbage "etag', instant))
    with pytest.raises(MalformedObjectMetadata, match="LastModified"):
        listing.metadata_of(listing.ListedObject("k", '"abc"', None))
    with pytest.raises(MalformedObjectMetadata, match="1970"):
        listing.metadata_of(listing.ListedObject("k", '"abc"', datetime.datetime(1969, 1, 1, tzinfo=datetime.UTC)))


def test_an_app_is_listed_when_enough_of_it_is_to_do():
    def app(files, populated):
        return db.AppFileCount(uuid.uuid4(), files, populated)

    big_fresh, big_done, small, half = app(50_000, 0), app(50_000, 45_500), app(999, 0), app(2_000, 1_000)
    assert backfill.apps_to_list([big_fresh, big_done, small, half], 1000) == [big_fresh, half]
    assert backfill.apps_to_list([big_fresh], 0) == []


def test_the_ranges_between_listed_apps_cover_the_rest_of_the_partition():
    partition = AppIdRange.for_partition("3f")
    a, b = uuid.UUID("3f000000-0000-4000-8000-000000000001"), uuid.UUID("3f800000-0000-4000-8000-000000000000")
    ranges = backfill.ranges_between(partition, [a, b])
    assert [(r.first.int, r.last.int) for r in ranges] == [
        (partition.first.int, a.int - 1), (a.int + 1, b.int - 1), (b.int + 1, partition.last.int)
    ]
    assert backfill.ranges_between(partition, [partition.first, partition.last]) == [
        AppIdRange("3f", uuid.UUID(int=partition.first.int + 1), uuid.UUID(int=partition.last.int - 1))
    ]
    assert backfill.ranges_between(partition, []) == [partition]
