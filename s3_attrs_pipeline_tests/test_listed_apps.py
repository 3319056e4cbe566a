"""The LIST strategy: apps read with ListObjectsV2 instead of a HEAD per file, against moto over HTTP."""

import dataclasses
import itertools
import os
import uuid

import dagster as dg
import psycopg
import pytest

from s3_attrs_pipeline.defs.config import RunConfig
from s3_attrs_pipeline.defs.resources import resources_from_env
from s3_attrs_pipeline.instant import reads, writes
from s3_attrs_pipeline.instant.app_id_ranges import AppIdRange
from s3_attrs_pipeline.instant.file_attrs import HASH, LAST_MODIFIED
from s3_attrs_pipeline.instant.object_keys import location_bin, location_id_of_key, object_key
from s3_attrs_pipeline.local import postgres, seed
from s3_attrs_pipeline.s3 import listing
from s3_attrs_pipeline.s3.listing import ListedObject, parse_list_objects_v2
from s3_attrs_pipeline.s3.object_metadata import MalformedObjectMetadata
from s3_attrs_pipeline.s3.store import ObjectStore, S3AccessError, S3Settings
from s3_attrs_pipeline.tasks import backfill, refresh
from s3_attrs_pipeline.tasks.task import TaskSettings
from s3_attrs_pipeline_tests import conftest
from s3_attrs_pipeline_tests.conftest import BOTH_SCHEMAS
from s3_attrs_pipeline_tests.fault_proxy import FaultProxy, FaultRule
from s3_attrs_pipeline_tests.helpers import (
    code_location_assets,
    head_values,
    new_attr_triples,
    partition_of,
    partitions_of,
)

LOG = dg.get_dagster_logger()
LIST_EVERY_APP = TaskSettings(batch_size=10, list_threshold=1)
HEAD_EVERY_FILE = TaskSettings(batch_size=10, list_threshold=0)
_twins = itertools.count()


def _backfill_all(conn, store, files, settings) -> dict[str, backfill.PartitionReport]:
    return {key: backfill.backfill_partition(conn, store, key, settings, LOG) for key in partitions_of(files)}


def _totals(reports) -> dict[str, int]:
    names = (
        "processed",
        "successful",
        "missing",
        "failed",
        "invalid_location_id",
        "malformed_object_metadata",
        "already_populated",
    )
    return {name: sum(getattr(r.counts, name) for r in reports.values()) for name in names}


@pytest.fixture
def twin_conn(pg_server_url, instant_schema, s3_client, bucket, seeded_files):
    """A second database seeded with the same files as `conn`, over the same bucket."""
    name = f"instant_twin_{os.getpid()}_{next(_twins)}"
    url = postgres.create_database(pg_server_url, name, template=conftest.template_of(instant_schema))
    with psycopg.connect(url, autocommit=True) as connection:
        seed.insert_files(connection, s3_client, bucket, seeded_files)
        yield connection
    postgres.drop_database(pg_server_url, name)


@BOTH_SCHEMAS
def test_listing_writes_exactly_what_heads_write(
    conn, twin_conn, s3_endpoint, s3_client, bucket, seeded_files, monkeypatch
):
    # Pages of 7 keys: every app's listing takes several requests and the prefetching thread runs ahead.
    monkeypatch.setattr(listing, "LIST_PAGE_SIZE", 7)
    with FaultProxy(s3_endpoint) as proxy, ObjectStore(S3Settings(bucket, endpoint_url=proxy.url)) as store:
        listed_reports = _backfill_all(conn, store, seeded_files, LIST_EVERY_APP)
        listed_requests = proxy.stats()["requests"]
    with ObjectStore(S3Settings(bucket, endpoint_url=s3_endpoint)) as store:
        headed_reports = _backfill_all(twin_conn, store, seeded_files, HEAD_EVERY_FILE)

    listed, headed = new_attr_triples(conn), new_attr_triples(twin_conn)
    assert listed == headed
    nested = [f for f in seeded_files if "/" in f.location_id and f.in_s3 and not f.prepopulated]
    assert nested and all((f.app_id, f.entity_id) in listed for f in nested), "nested location-ids were not filled"
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
    partitions = len(partitions_of(seeded_files))
    assert listed_requests <= sum(f.in_s3 for f in seeded_files) / 7 + len(apps) + partitions
    assert listed_requests < len(seeded_files) / 3


def _largest_partition(files) -> str:
    return max(partitions_of(files), key=lambda k: sum(partition_of(f) == k for f in files))


def test_an_object_under_another_bin_is_not_the_files_object(conn, s3_endpoint, s3_client, bucket, seeded_files):
    missing = next(f for f in seeded_files if not f.in_s3)
    wrong_bin = (location_bin(missing.location_id) + 1) % 10
    s3_client.put_object(Bucket=bucket, Key=f"{missing.app_id}/{wrong_bin}/{missing.location_id}", Body=b"x")
    s3_client.put_object(Bucket=bucket, Key=f"{missing.app_id}/{missing.key.split('/')[1]}/nested/x", Body=b"x")
    with ObjectStore(S3Settings(bucket, endpoint_url=s3_endpoint)) as store:
        report = backfill.backfill_partition(conn, store, partition_of(missing), LIST_EVERY_APP, LOG)
    assert report.counts.apps_listed >= 1
    assert (missing.app_id, missing.entity_id) not in new_attr_triples(conn)
    assert any(p.entity_id == str(missing.entity_id) and "not in the listing" in p.reason for p in report.problems)


def test_a_listed_object_with_malformed_metadata_is_its_files_problem_only(
    conn, s3_endpoint, bucket, seeded_files, monkeypatch
):
    key = _largest_partition(seeded_files)
    files = [f for f in seeded_files if partition_of(f) == key]
    pending_keys = {f.key for f in files if f.in_s3 and not f.prepopulated}
    spoiled = {}  # object key: what S3 (or a look-alike) would have sent wrong
    list_prefix = listing.list_prefix

    def spoiled_entry(entry: ListedObject) -> ListedObject:
        if entry.key not in pending_keys or len(spoiled) == 2:
            return entry
        if not spoiled:
            spoiled[entry.key] = "LastModified 'not a time'"
            return ListedObject(entry.key, entry.etag, "not a time")
        spoiled[entry.key] = "ETag"
        return ListedObject(entry.key, 'garbage "etag', entry.last_modified)

    def spoiling_list_prefix(store, prefix):
        for page in list_prefix(store, prefix):
            yield dataclasses.replace(page, objects=[spoiled_entry(entry) for entry in page.objects])

    monkeypatch.setattr(listing, "list_prefix", spoiling_list_prefix)
    with ObjectStore(S3Settings(bucket, endpoint_url=s3_endpoint)) as store:
        report = backfill.backfill_partition(conn, store, key, LIST_EVERY_APP, LOG)
    assert len(spoiled) == 2
    by_key = {f.key: f for f in files}
    spoiled_files = [by_key[object_key] for object_key in spoiled]
    assert report.counts.malformed_object_metadata == 2 and report.counts.failed == 0
    assert report.counts.missing == sum(not f.in_s3 for f in files)
    assert report.counts.successful == sum(f.in_s3 and not f.prepopulated for f in files) - 2
    written = new_attr_triples(conn)
    for file in spoiled_files:
        assert (file.app_id, file.entity_id) not in written
        problem = next(p for p in report.problems if p.entity_id == str(file.entity_id))
        assert problem.reason.startswith("malformed: ") and spoiled[file.key] in problem.reason


def test_a_failing_listing_falls_back_to_heads(conn, s3_endpoint, s3_client, bucket, seeded_files):
    key = _largest_partition(seeded_files)
    files = [f for f in seeded_files if partition_of(f) == key]
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(FaultRule("internal_error", method="GET"))  # every listing request; HEADs pass
        with ObjectStore(S3Settings(bucket, endpoint_url=proxy.url, max_retries=1)) as store:
            report = backfill.backfill_partition(conn, store, key, LIST_EVERY_APP, LOG)
        assert proxy.stats()["internal_error"] == 2 * len({f.app_id for f in files})  # a try and a retry each
    assert report.counts.apps_listed == 0
    assert report.counts.failed == 0 and report.counts.missing == sum(not f.in_s3 for f in files)
    written = new_attr_triples(conn)
    assert {(f.app_id, f.entity_id) for f in files if f.in_s3} <= set(written)


def test_a_listing_denied_stops_the_partition_and_writes_nothing(conn, s3_endpoint, bucket, seeded_files):
    key = _largest_partition(seeded_files)
    before = new_attr_triples(conn)
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(FaultRule("access_denied", method="GET"))
        with (
            ObjectStore(S3Settings(bucket, endpoint_url=proxy.url)) as store,
            pytest.raises(S3AccessError, match="s3:ListBucket"),
        ):
            backfill.backfill_partition(conn, store, key, LIST_EVERY_APP, LOG)
    assert new_attr_triples(conn) == before


def test_the_launchpad_setting_chooses_the_listing(conn, seeded_files):
    key = _largest_partition(seeded_files)

    def materialize(list_threshold: int) -> dict:
        with dg.instance_for_test() as instance:
            result = dg.materialize(
                [code_location_assets()[0]],
                partition_key=key,
                instance=instance,
                resources=resources_from_env(),
                run_config=dg.RunConfig(ops={"files_s3_attrs": RunConfig(list_threshold=list_threshold)}),
            )
        event = result.asset_materializations_for_node("files_s3_attrs")[0]
        return {name: value.value for name, value in event.metadata.items()}

    assert materialize(list_threshold=1000)["apps_listed"] == 0  # the default: these apps are too small
    writes.delete_new_attr_triples(conn)
    listed = materialize(list_threshold=1)
    assert listed["apps_listed"] == len({f.app_id for f in seeded_files if partition_of(f) == key})
    assert listed["successful"] == sum(f.in_s3 for f in seeded_files if partition_of(f) == key)


# --- pure parts ---


def test_a_key_names_a_location_id_only_under_its_app_and_bin():
    app = uuid.UUID("0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d")
    assert location_id_of_key(app, f"{app}/5/circle_red.jpg") == "circle_red.jpg"
    assert location_id_of_key(app, f"{app}/3/日本語.txt") == "日本語.txt"
    assert location_id_of_key(app, f"{app}/4/circle_red.jpg") is None  # wrong bin
    assert location_id_of_key(uuid.uuid4(), f"{app}/5/circle_red.jpg") is None  # another app
    nested = "imports/2024/circle_red.jpg"
    assert location_id_of_key(app, f"{app}/{location_bin(nested)}/{nested}") == nested
    assert location_id_of_key(app, f"{app}/{(location_bin(nested) + 1) % 10}/{nested}") is None  # wrong bin
    assert location_id_of_key(app, f"{app}/5/x/../circle_red.jpg") is None  # a '..' segment
    assert location_id_of_key(app, f"{app}/5/") is None
    assert object_key(app, "photo.png") == f"{app}/1/photo.png"


def test_listed_metadata_is_cut_to_the_second_a_head_gives():
    for text in ("2026-11-24T09:31:16.987Z", "2026-11-24T09:31:16Z", "2026-11-24T09:31:16.987000+00:00"):
        metadata = listing.metadata_of(ListedObject("k", '"abc-2"', text))
        assert (metadata.hash, metadata.last_modified_ms) == ("abc-2", 1795512676000), text
    in_paris = ListedObject("k", '"abc"', "2026-11-24T10:31:16+01:00")
    assert listing.metadata_of(in_paris).last_modified_ms == 1795512676000
    with pytest.raises(MalformedObjectMetadata, match="ETag"):
        listing.metadata_of(ListedObject("k", 'garbage "etag', "2026-11-24T09:31:16Z"))
    with pytest.raises(MalformedObjectMetadata, match="gives no LastModified"):
        listing.metadata_of(ListedObject("k", '"abc"', None))
    with pytest.raises(MalformedObjectMetadata, match="'yesterday' is not an ISO 8601 time"):
        listing.metadata_of(ListedObject("k", '"abc"', "yesterday"))
    with pytest.raises(MalformedObjectMetadata, match="no time zone"):
        listing.metadata_of(ListedObject("k", '"abc"', "2026-11-24T09:31:16"))
    with pytest.raises(MalformedObjectMetadata, match="1970"):
        listing.metadata_of(ListedObject("k", '"abc"', "1969-01-01T00:00:00Z"))


_PAGE = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>b</Name><Prefix>app%2F</Prefix><KeyCount>2</KeyCount><MaxKeys>2</MaxKeys>
  <EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>
  <NextContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=</NextContinuationToken>
  <Contents><Key>app/1/r%C3%A9sum%C3%A9+final.pdf</Key><LastModified>2024-05-01T12:00:00.123Z</LastModified>
    <ETag>&quot;9b2cf535f27731c974343645a3985328&quot;</ETag><Size>3</Size>
    <StorageClass>STANDARD</StorageClass></Contents>
  <Contents><Key>app/2/a%2Bb%25c</Key><LastModified>2024-05-01T12:00:01.000Z</LastModified>
    <ETag>&quot;d41d8cd98f00b204e9800998ecf8427e-2&quot;</ETag><Size>0</Size></Contents>
</ListBucketResult>"""


def test_a_listing_page_is_read_as_boto3_reads_it():
    page = parse_list_objects_v2(_PAGE)
    assert page.objects == [
        ListedObject("app/1/résumé final.pdf", '"9b2cf535f27731c974343645a3985328"', "2024-05-01T12:00:00.123Z"),
        ListedObject("app/2/a+b%c", '"d41d8cd98f00b204e9800998ecf8427e-2"', "2024-05-01T12:00:01.000Z"),
    ]
    assert page.continuation == "1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM="
    last = parse_list_objects_v2(_PAGE.replace(b"<IsTruncated>true", b"<IsTruncated>false").replace(b"%2B", b"+"))
    assert last.continuation is None
    unencoded = parse_list_objects_v2(_PAGE.replace(b"<EncodingType>url</EncodingType>", b""))
    assert unencoded.objects[1].key == "app/2/a%2Bb%25c"  # a server that ignored encoding-type sent keys as they are


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"<html>busy</html>", "not a ListBucketResult"),
        (b"<ListBucketResult><Contents><Key>a", "not XML"),
        (b"<ListBucketResult><Contents><ETag>x</ETag></Contents></ListBucketResult>", "without a Key"),
        (b"<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>", "no NextContinuationToken"),
    ],
)
def test_an_answer_that_is_no_listing_page_is_a_value_error(body, reason):
    with pytest.raises(ValueError, match=reason):
        parse_list_objects_v2(body)


def test_an_app_is_listed_when_enough_of_it_is_to_do():
    def app(files, populated):
        return reads.AppFileCount(uuid.uuid4(), files, populated)

    big_fresh, big_done, small, half = app(50_000, 0), app(50_000, 45_500), app(999, 0), app(2_000, 1_000)
    assert backfill.apps_to_list([big_fresh, big_done, small, half], 1000) == [big_fresh, half]
    assert backfill.apps_to_list([big_fresh], 0) == []


def test_the_ranges_between_listed_apps_cover_the_rest_of_the_partition():
    partition = AppIdRange.for_partition("3f")
    a, b = uuid.UUID("3f000000-0000-4000-8000-000000000001"), uuid.UUID("3f800000-0000-4000-8000-000000000000")
    ranges = backfill.ranges_between(partition, [a, b])
    assert [(r.first.int, r.last.int) for r in ranges] == [
        (partition.first.int, a.int - 1),
        (a.int + 1, b.int - 1),
        (b.int + 1, partition.last.int),
    ]
    assert backfill.ranges_between(partition, [partition.first, partition.last]) == [
        AppIdRange("3f", uuid.UUID(int=partition.first.int + 1), uuid.UUID(int=partition.last.int - 1))
    ]
    assert backfill.ranges_between(partition, []) == [partition]


# An app of three listing pages, so that a listing can fail after its first.
THREE_PAGES = seed.DatasetSpec(
    apps=1, files=2100, missing_ratio=0.03, multipart_ratio=0.02, prepopulated_ratio=0.0, seed=23
)


@pytest.fixture
def three_pages(conn, s3_client, bucket) -> tuple[str, list[seed.SeededFile]]:
    files = seed.plan_dataset(THREE_PAGES)
    seed.upload_objects(s3_client, bucket, files)
    seed.insert_files(conn, s3_client, bucket, files)
    return partition_of(files[0]), files


def test_a_listing_that_fails_part_way_counts_each_file_once(
    conn, s3_endpoint, s3_client, bucket, three_pages, monkeypatch
):
    """The files of the pages read are settled by the listing, the others HEADed: each counted once,
    a file whose listed metadata was malformed included."""
    key, files = three_pages
    first_page = sorted(f.key for f in files if f.in_s3)[: listing.LIST_PAGE_SIZE]
    spoiled = first_page[7]
    list_prefix = listing.list_prefix

    def spoiling(store, prefix):
        for page in list_prefix(store, prefix):
            yield dataclasses.replace(
                page,
                objects=[
                    ListedObject(o.key, 'garbage "etag', o.last_modified) if o.key == spoiled else o
                    for o in page.objects
                ],
            )

    monkeypatch.setattr(listing, "list_prefix", spoiling)
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(FaultRule("internal_error", method="GET", after_requests=1))  # the first page only
        with ObjectStore(S3Settings(bucket, endpoint_url=proxy.url, max_retries=1)) as store:
            report = backfill.backfill_partition(conn, store, key, LIST_EVERY_APP, LOG)
    counts = report.counts
    assert counts.apps_listed == 0
    assert counts.processed == len(files)
    assert counts.malformed_object_metadata == 1
    assert counts.successful == sum(f.in_s3 for f in files) - 1
    assert counts.missing == sum(not f.in_s3 for f in files)
    assert len(new_attr_triples(conn)) == counts.successful


def test_a_refresh_whose_listing_fails_part_way_checks_each_file_once(
    conn, s3_endpoint, s3_client, bucket, three_pages
):
    key, files = three_pages
    with ObjectStore(S3Settings(bucket, endpoint_url=s3_endpoint)) as store:
        backfill.backfill_partition(conn, store, key, TaskSettings(list_threshold=1), LOG)
    present = sorted((f for f in files if f.in_s3), key=lambda f: f.key)
    rewritten = present[3::400]  # some in the page that is listed, some after it
    for file in rewritten:
        s3_client.put_object(Bucket=bucket, Key=file.key, Body=b"rewritten in place")
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(FaultRule("internal_error", method="GET", after_requests=1))
        with ObjectStore(S3Settings(bucket, endpoint_url=proxy.url, max_retries=1)) as store:
            report = refresh.refresh_partition(conn, store, key, LIST_EVERY_APP, LOG)
    counts = report.counts
    assert counts.apps_listed == 0
    assert counts.checked == len(present)
    assert counts.refreshed == len(rewritten)
    assert counts.unchanged == len(present) - len(rewritten)
    assert counts.missing == counts.failed == 0
    for file in rewritten:
        etag, _ = head_values(s3_client, bucket, file.key)
        assert new_attr_triples(conn)[(file.app_id, file.entity_id)][HASH.attr_id][0] == etag
