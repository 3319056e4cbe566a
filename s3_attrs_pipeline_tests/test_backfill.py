"""The whole backfill through Dagster, against embedded PostgreSQL and moto's S3 server over HTTP."""

import re
import time

import dagster as dg
import pytest

from s3_attrs_pipeline.defs.config import RunConfig
from s3_attrs_pipeline.defs.resources import resources_from_env
from s3_attrs_pipeline.instant import progress_rows
from s3_attrs_pipeline.instant.file_attrs import HASH, LAST_MODIFIED
from s3_attrs_pipeline.s3.store import ObjectStore, S3Settings
from s3_attrs_pipeline.tasks import backfill
from s3_attrs_pipeline.tasks.task import PartitionFailed, TaskSettings
from s3_attrs_pipeline_tests.conftest import BOTH_SCHEMAS
from s3_attrs_pipeline_tests.fault_proxy import FaultProxy, FaultRule
from s3_attrs_pipeline_tests.helpers import (
    all_triples,
    code_location_assets,
    head_values,
    location_triples,
    new_attr_triples,
    partition_of,
    partitions_of,
    swept_locations,
)


def _materialize(partition_key: str, instance: dg.DagsterInstance, **config) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [code_location_assets()[0]],
        partition_key=partition_key,
        instance=instance,
        resources=resources_from_env(),
        run_config=dg.RunConfig(ops={"files_s3_attrs": RunConfig(**config)}),
        raise_on_error=False,
    )


def _materialize_all(files, instance, **config) -> dict[str, dict]:
    metadata = {}
    for key in partitions_of(files):
        result = _materialize(key, instance, **config)
        assert result.success, f"partition {key} failed"
        event = result.asset_materializations_for_node("files_s3_attrs")[0]
        metadata[key] = {name: value.value for name, value in event.metadata.items()}
    return metadata


def _in_partition(triples: dict, key: str) -> dict:
    return {file: attrs for file, attrs in triples.items() if file[0].hex.startswith(key)}


def _sum(metadata: dict, name: str) -> int:
    return sum(m[name] for m in metadata.values())


@BOTH_SCHEMAS
def test_full_run_writes_what_head_returns(conn, s3_client, bucket, seeded_files):
    locations_before = location_triples(conn)
    with dg.instance_for_test() as instance:
        metadata = _materialize_all(seeded_files, instance)

    written = new_attr_triples(conn)
    for file in seeded_files:
        if not file.in_s3:
            assert (file.app_id, file.entity_id) not in written, "a missing object got triples"
            continue
        etag, last_modified_ms = head_values(s3_client, bucket, file.key)
        triples = written[(file.app_id, file.entity_id)]
        hash_value, hash_md5, pg_hash_md5, *hash_flags, hash_type = triples[HASH.attr_id]
        lm_value, lm_md5, pg_lm_md5, *lm_flags, lm_type = triples[LAST_MODIFIED.attr_id]
        assert (hash_value, lm_value) == (etag, last_modified_ms)
        assert (hash_md5, lm_md5) == (pg_hash_md5, pg_lm_md5)
        assert hash_flags == lm_flags == [True, False, False, True, False]  # ea eav av ave vae
        assert (hash_type, lm_type) == ("string", "number")
        assert ("-" in hash_value) == file.multipart

    in_s3 = [f for f in seeded_files if f.in_s3]
    prepopulated = [f for f in seeded_files if f.prepopulated]
    assert len(written) == len(in_s3)
    assert _sum(metadata, "missing") == len(seeded_files) - len(in_s3)
    assert _sum(metadata, "successful") == len(in_s3) - len(prepopulated)
    assert _sum(metadata, "already_populated") == len(prepopulated)
    assert _sum(metadata, "failed") == 0
    assert location_triples(conn) == locations_before
    assert swept_locations(conn) == 0

    state = progress_rows.read_progress(conn)
    assert state["total-successful"] == len(in_s3) - len(prepopulated)
    assert state["total-missing"] == len(seeded_files) - len(in_s3)
    assert state["total-processed"] == len(seeded_files) - len(prepopulated)
    assert state["total-failed"] == 0
    assert {k for k, v in state["partitions"].items() if v["status"] == "completed"} == set(partitions_of(seeded_files))


@BOTH_SCHEMAS
def test_second_run_writes_nothing(conn, bucket, seeded_files):
    with dg.instance_for_test() as instance:
        _materialize_all(seeded_files, instance)
        before = all_triples(conn)
        metadata = _materialize_all(seeded_files, instance)
        assert all_triples(conn) == before
        assert all("nothing_to_do" in m for m in metadata.values()) and _sum(metadata, "successful") == 0
        metadata = _materialize_all(seeded_files, instance, every_partition=True)
    assert all_triples(conn) == before
    assert _sum(metadata, "successful") == 0
    assert _sum(metadata, "already_populated") == sum(f.in_s3 for f in seeded_files)


class _CrashAfter:
    """The real store, but the process 'dies' (an exception) when asked for HEAD number `heads`."""

    def __init__(self, store: ObjectStore, heads: int):
        self._store, self._left = store, heads

    @property
    def rate_limiter(self):
        return self._store.rate_limiter

    @property
    def settings(self):
        return self._store.settings

    def check_bucket(self):
        self._store.check_bucket()

    def submit_head(self, key):
        self._left -= 1
        if self._left < 0:
            raise KeyboardInterrupt("killed mid-partition")
        return self._store.submit_head(key)


@BOTH_SCHEMAS
def test_a_run_resumed_after_a_crash_finishes_the_rest(conn, s3_endpoint, bucket, seeded_files):
    key = max(partitions_of(seeded_files), key=lambda k: sum(partition_of(f) == k for f in seeded_files))
    files = [f for f in seeded_files if partition_of(f) == key]
    settings = TaskSettings(batch_size=10)
    log = dg.get_dagster_logger()
    # A window of 2 x 10 files: a crash at the 40th HEAD comes after at least two batches were written.
    assert len(files) > 40
    with ObjectStore(S3Settings(bucket, endpoint_url=s3_endpoint, max_in_flight=4)) as store:
        with pytest.raises(KeyboardInterrupt):
            backfill.backfill_partition(conn, _CrashAfter(store, 40), key, settings, log)
        partial = _in_partition(new_attr_triples(conn), key)
        assert all(len(attrs) == 2 for attrs in partial.values()), "a file was half written"
        assert 0 < len(partial) < sum(f.in_s3 for f in files)
        assert progress_rows.read_progress(conn)["total-successful"] == len(partial) - sum(
            f.prepopulated for f in files
        )

        report = backfill.backfill_partition(conn, store, key, settings, log)
    done = _in_partition(new_attr_triples(conn), key)
    assert {(f.app_id, f.entity_id) for f in files if f.in_s3} == set(done)
    assert report.counts.successful == len(done) - len(partial)
    assert progress_rows.read_progress(conn)["total-successful"] == len(done) - sum(f.prepopulated for f in files)


@BOTH_SCHEMAS
def test_failed_files_fail_the_partition_after_the_rest_is_done(conn, s3_endpoint, bucket, seeded_files):
    key = max(partitions_of(seeded_files), key=lambda k: sum(partition_of(f) == k for f in seeded_files))
    files = [f for f in seeded_files if partition_of(f) == key and f.in_s3 and not f.prepopulated]
    failing = {files[0].key, files[-1].key}
    with FaultProxy(s3_endpoint) as proxy:
        for failing_key in failing:
            proxy.add_rule(FaultRule("internal_error", key_pattern=re.escape(failing_key)))
        settings = S3Settings(bucket, endpoint_url=proxy.url, max_retries=2)
        with ObjectStore(settings) as store, pytest.raises(PartitionFailed, match="2 of") as raised:
            backfill.backfill_partition(conn, store, key, TaskSettings(batch_size=7), dg.get_dagster_logger())
        assert proxy.stats()["internal_error"] == 2 * 3  # each failing key: one try and two retries
    report = raised.value.report
    assert report.counts.failed == 2 and report.counts.successful == len(files) - 2
    assert {p.key for p in report.problems if p.reason.startswith("failed")} == failing
    assert all("S3 answered 500 after 2 retries" in p.reason for p in report.problems if p.key in failing)
    assert progress_rows.read_progress(conn)["partitions"][key]["status"] == "failed"
    assert (
        len(_in_partition(new_attr_triples(conn), key))
        == sum(f.in_s3 for f in seeded_files if partition_of(f) == key) - 2
    )


@BOTH_SCHEMAS
def test_a_missing_bucket_stops_the_partition_at_once(conn, seeded_files, monkeypatch):
    monkeypatch.setenv("INSTANT_S3_BUCKET", "no-such-bucket-here")
    before = all_triples(conn)
    started = time.monotonic()
    with dg.instance_for_test() as instance:
        result = _materialize(partitions_of(seeded_files)[0], instance)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data
    assert "S3 bucket 'no-such-bucket-here' does not exist" in failure.user_failure_data.description
    assert time.monotonic() - started < 20
    assert all_triples(conn) == before


@BOTH_SCHEMAS
def test_one_store_asks_for_the_bucket_once_across_partitions(conn, s3_endpoint, bucket, seeded_files):
    keys = partitions_of(seeded_files)
    to_do = sum(not f.prepopulated for f in seeded_files)
    with ObjectStore(S3Settings(bucket, endpoint_url=s3_endpoint)) as store:
        for key in keys:
            backfill.backfill_partition(conn, store, key, TaskSettings(list_threshold=0), dg.get_dagster_logger())
        assert store.requests_sent == to_do + 1  # a HEAD per file to do, and one HEAD bucket
