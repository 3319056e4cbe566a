"""Verification, the checks of files_s3_attrs, the condition that runs them after a backfill and the daily
healing schedule, on the real parts."""

import datetime
import threading
import uuid

import dagster as dg

from s3_attrs_pipeline.definitions import defs
from s3_attrs_pipeline.defs.assets import FILES_S3_ATTRS
from s3_attrs_pipeline.defs.checks import CHECK_KEYS, CHECK_SPECS, VERIFY_AFTER_BACKFILL, verify_files_s3_attrs
from s3_attrs_pipeline.defs.resources import InstantDatabaseResource, resources_from_env
from s3_attrs_pipeline.defs.schedules import HEAL_TAG, daily_reverification
from s3_attrs_pipeline.defs.sensors import verify_after_backfill
from s3_attrs_pipeline.instant.app_id_ranges import partition_of_app
from s3_attrs_pipeline.instant.file_attrs import HASH, LAST_MODIFIED, json_text, value_md5
from s3_attrs_pipeline.local import seed
from s3_attrs_pipeline.s3.store import ObjectStore, S3Settings
from s3_attrs_pipeline.tasks import backfill
from s3_attrs_pipeline.tasks.task import TaskSettings
from s3_attrs_pipeline.verification import verify
from s3_attrs_pipeline_tests.helpers import PARTITION_WIDTH, code_location_assets, partitions_of


def test_definitions_load_with_the_checks_on_the_asset_they_judge():
    loaded = defs()
    dg.Definitions.validate_loadable(loaded)
    graph = loaded.resolve_asset_graph()
    assert graph.get_check_keys_for_assets({FILES_S3_ATTRS}) == set(CHECK_KEYS)
    assert {key.name for key in CHECK_KEYS} == {"completeness", "consistency", "well_formed", "app_queries_use_indexes"}


def _backfill_all(conn, endpoint, bucket, files):
    with ObjectStore(S3Settings(bucket, endpoint_url=endpoint)) as store:
        for key in partitions_of(files):
            backfill.backfill_partition(conn, store, key, TaskSettings(), dg.get_dagster_logger())


def _verify(conn, endpoint, bucket, sample_size=1000):
    with ObjectStore(S3Settings(bucket, endpoint_url=endpoint)) as store:
        return verify(conn, store, 2, sample_size)


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def _run_checks(sample_size=1000) -> dg.ExecuteInProcessResult:
    with dg.instance_for_test() as instance:
        return dg.materialize(
            [code_location_assets()[0], verify_files_s3_attrs],
            selection=dg.AssetSelection.checks(*CHECK_KEYS),
            instance=instance,
            resources=resources_from_env(),
            run_config=dg.RunConfig(ops={"verify_files_s3_attrs": {"config": {"sample_size": sample_size}}}),
        )


def _check_metadata(result: dg.ExecuteInProcessResult) -> dict:
    return {name: value for e in result.get_asset_check_evaluations() for name, value in e.metadata.items()}


def test_a_clean_backfill_verifies_and_passes_every_check(conn, s3_endpoint, bucket, seeded_files):
    _backfill_all(conn, s3_endpoint, bucket, seeded_files)
    report = _verify(conn, s3_endpoint, bucket)
    in_s3 = sum(f.in_s3 for f in seeded_files)
    assert (report.total_files, report.with_hash, report.with_last_modified, report.with_both) == (
        len(seeded_files),
        in_s3,
        in_s3,
        in_s3,
    )
    assert report.with_neither == report.known_missing == len(seeded_files) - in_s3
    assert report.remaining == 0 and report.partitions_with_gaps == []
    assert report.sample_size == in_s3 and report.consistent and report.well_formed

    result = _run_checks()
    assert _checks(result) == {
        "completeness": True,
        "consistency": True,
        "well_formed": True,
        "app_queries_use_indexes": True,
    }
    assert not result.get_asset_materialization_events(), "running the checks materializes nothing"
    metadata = _check_metadata(result)
    assert metadata["total_files"].value == len(seeded_files)
    assert metadata["known_missing"].value == len(seeded_files) - in_s3
    assert isinstance(metadata["gaps_by_partition"], dg.TableMetadataValue)


def _populated(files):
    return [f for f in files if f.in_s3]


def test_checks_fail_on_planted_inconsistencies(conn, s3_endpoint, bucket, seeded_files):
    _backfill_all(conn, s3_endpoint, bucket, seeded_files)
    half_written, wrong_etag, wrong_encoding = _populated(seeded_files)[:3]
    conn.execute(
        "DELETE FROM triples WHERE app_id = %s AND entity_id = %s AND attr_id = %s",
        (half_written.app_id, half_written.entity_id, LAST_MODIFIED.attr_id),
    )
    conn.execute(
        "UPDATE triples SET value = %s::jsonb, value_md5 = %s WHERE app_id = %s AND entity_id = %s AND attr_id = %s",
        (
            json_text("0123456789abcdef0123456789abcdef"),
            value_md5("0123456789abcdef0123456789abcdef"),
            wrong_etag.app_id,
            wrong_etag.entity_id,
            HASH.attr_id,
        ),
    )
    conn.execute(
        "UPDATE triples SET value_md5 = 'not-an-md5' WHERE app_id = %s AND entity_id = %s AND attr_id = %s",
        (wrong_encoding.app_id, wrong_encoding.entity_id, LAST_MODIFIED.attr_id),
    )
    report = _verify(conn, s3_endpoint, bucket)
    assert report.only_one == 1
    assert report.sample_hash_mismatches == 1
    assert report.sample_stale == 1  # the wrong ETag; the half-written file has no lastModified to sample
    assert report.malformed.encodings == 1
    assert [m.entity_id for m in report.mismatches] == [str(wrong_etag.entity_id)]
    assert report.complete  # every file still has its hash

    assert _checks(_run_checks()) == {
        "completeness": True,
        "consistency": False,
        "well_formed": False,
        "app_queries_use_indexes": True,
    }


def test_a_non_positive_last_modified_is_malformed(conn, s3_endpoint, bucket, seeded_files):
    _backfill_all(conn, s3_endpoint, bucket, seeded_files)
    file = _populated(seeded_files)[0]
    conn.execute(
        "UPDATE triples SET value = '-5'::jsonb, value_md5 = %s WHERE app_id = %s AND entity_id = %s AND attr_id = %s",
        (value_md5(-5), file.app_id, file.entity_id, LAST_MODIFIED.attr_id),
    )
    report = _verify(conn, s3_endpoint, bucket, sample_size=0)
    assert report.malformed.last_modified_values == 1 and not report.well_formed


def _add_files(conn, s3_client, bucket, app_ids, count_each=3):
    """Files uploaded after the backfill: objects and triples, no hash yet."""
    files = [
        seed.SeededFile(app_id, uuid.uuid4(), str(uuid.uuid4()), f"late/{i}.txt", True, False, False)
        for app_id in app_ids
        for i in range(count_each)
    ]
    seed.upload_objects(s3_client, bucket, files)
    seed.insert_files(conn, s3_client, bucket, files)
    return files


def _schedule_requests(instant_db_url) -> list[dg.RunRequest]:
    context = dg.build_schedule_context(
        resources={"instant_db": InstantDatabaseResource(url=instant_db_url)},
        scheduled_execution_time=datetime.datetime(2026, 11, 24, 4, tzinfo=datetime.UTC),
    )
    return list(daily_reverification(context))


def test_new_files_make_the_schedule_heal_exactly_their_partitions(
    conn, instant_db_url, s3_endpoint, s3_client, bucket, seeded_files
):
    _backfill_all(conn, s3_endpoint, bucket, seeded_files)
    assert [(r.asset_selection, r.asset_check_keys) for r in _schedule_requests(instant_db_url)] == [([], CHECK_KEYS)]

    existing_app = seeded_files[0].app_id
    new_app = uuid.UUID("c0ffee00-0000-4000-8000-000000000001")
    _add_files(conn, s3_client, bucket, [existing_app, new_app])
    [request] = _schedule_requests(instant_db_url)
    # One run over the range from the first partition with a gap to the last; its plan works only those.
    gaps = sorted({partition_of_app(existing_app, PARTITION_WIDTH), "c0"})
    assert request.partition_key_range == dg.PartitionKeyRange(gaps[0], gaps[-1])
    assert request.asset_selection == [FILES_S3_ATTRS] and request.asset_check_keys == []
    assert HEAL_TAG in request.tags
    assert _verify(conn, s3_endpoint, bucket, sample_size=0).remaining == 6

    _backfill_all(
        conn,
        s3_endpoint,
        bucket,
        [f for f in seeded_files if f.app_id == existing_app]
        + [seed.SeededFile(new_app, uuid.uuid4(), "x", "x", True, False, False)],
    )
    assert [(r.asset_selection, r.asset_check_keys) for r in _schedule_requests(instant_db_url)] == [([], CHECK_KEYS)]


def _stub_definitions(run_partition) -> dg.Definitions:
    """files_s3_attrs and its checks, with the checks' own automation condition, over a stub body: the
    condition is judged on what Dagster records of real runs, not on what the asset does."""

    @dg.asset(name=FILES_S3_ATTRS.path[-1], partitions_def=dg.StaticPartitionsDefinition(["00", "01", "02"]))
    def stub(context: dg.AssetExecutionContext) -> None:
        run_partition(context.partition_key)

    specs = [
        dg.AssetCheckSpec(spec.name, asset=stub, automation_condition=spec.automation_condition) for spec in CHECK_SPECS
    ]

    @dg.multi_asset_check(specs=specs)
    def stub_checks():
        for spec in specs:
            yield dg.AssetCheckResult(asset_key=stub.key, check_name=spec.name, passed=True)

    return dg.Definitions(assets=[stub], asset_checks=[stub_checks])


def _run_stub_checks(stub_defs: dg.Definitions, instance: dg.DagsterInstance) -> None:
    (stub_checks,) = stub_defs.asset_checks
    stub = stub_defs.resolve_assets_def(FILES_S3_ATTRS)
    result = dg.materialize([stub, stub_checks], selection=dg.AssetSelection.checks_for_assets(stub), instance=instance)
    assert len(result.get_asset_check_evaluations()) == len(CHECK_SPECS)


def test_the_checks_and_their_sensor_use_the_after_a_backfill_condition():
    assert all(spec.automation_condition == VERIFY_AFTER_BACKFILL for spec in CHECK_SPECS)
    loaded = defs()
    assert verify_after_backfill.asset_selection.resolve_checks(loaded.resolve_asset_graph()) == set(CHECK_KEYS)


def test_the_checks_run_once_after_runs_that_partly_failed_and_not_while_one_is_in_progress():
    every_check = {spec.name for spec in CHECK_SPECS}
    started, release = threading.Event(), threading.Event()

    def run_partition(key: str) -> None:
        if key == "01":
            started.set()
            assert release.wait(60), "the test never released the running partition"
        if key == "02":
            raise RuntimeError("S3 failed after its retries")

    stub_defs = _stub_definitions(run_partition)
    stub = stub_defs.resolve_assets_def(FILES_S3_ATTRS)

    def materialize(key: str) -> bool:
        return dg.materialize([stub], partition_key=key, instance=instance, raise_on_error=False).success

    def requested() -> set[str]:
        nonlocal cursor
        result = dg.evaluate_automation_conditions(defs=stub_defs, instance=instance, cursor=cursor)
        cursor = result.cursor
        names = {r.key.name for r in result.results if r.key in CHECK_KEYS and r.true_subset.size}
        assert result.total_requested == len(names), "something else than the checks was requested"
        return names

    cursor = None
    with dg.instance_for_test() as instance:
        assert requested() == set()
        assert materialize("00")
        running = threading.Thread(target=materialize, args=("01",))
        running.start()
        try:
            assert started.wait(60)
            assert requested() == set(), "the checks ran while a partition was still in progress"
        finally:
            release.set()
            running.join()
        assert not materialize("02")
        assert requested() == every_check

        # A run that ends before the next evaluation, while the requested checks are under way, is not
        # judged by them: the checks are requested again.
        assert materialize("00")
        _run_stub_checks(stub_defs, instance)
        assert requested() == every_check, "a partition materialized during the checks' run was never judged"
        _run_stub_checks(stub_defs, instance)
        assert requested() == set(), "the checks were requested twice for one batch of runs"
        assert requested() == set()

        assert materialize("01")
        assert requested() == every_check
