"""Verification, its asset checks, the backfill sensor and the daily healing schedule, on the real parts."""

import datetime
import time
import uuid

import dagster as dg
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from dagster._core.storage.tags import BACKFILL_ID_TAG
from dagster._core.test_utils import create_run_for_test

from s3_attrs_pipeline import backfill
from s3_attrs_pipeline.definitions import defs
from s3_attrs_pipeline.defs.assets import files_s3_attrs
from s3_attrs_pipeline.defs.automation import HEAL_TAG, daily_reverification, verify_after_backfill
from s3_attrs_pipeline.defs.resources import InstantDatabaseResource, resources_from_env
from s3_attrs_pipeline.defs.verification import s3_attrs_verification
from s3_attrs_pipeline.instant.file_attrs import HASH, LAST_MODIFIED, json_text, value_md5
from s3_attrs_pipeline.local import seed
from s3_attrs_pipeline.s3.object_metadata import ObjectStore, S3Settings
from s3_attrs_pipeline.verification import verify


def test_definitions_load():
    dg.Definitions.validate_loadable(defs)


def _backfill_all(conn, endpoint, bucket, files):
    with ObjectStore(S3Settings(bucket, endpoint_url=endpoint)) as store:
        for key in sorted({f.app_id.hex[:2] for f in files}):
            backfill.backfill_partition(conn, store, key, backfill.BackfillSettings(), dg.get_dagster_logger())


def _verify(conn, endpoint, bucket, sample_size=1000):
    with ObjectStore(S3Settings(bucket, endpoint_url=endpoint)) as store:
        return verify(conn, store, 2, sample_size)


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def _materialize_verification(sample_size=1000) -> dg.ExecuteInProcessResult:
    with dg.instance_for_test() as instance:
        return dg.materialize(
            [s3_attrs_verification, files_s3_attrs],
            selection=[s3_attrs_verification],
            instance=instance,
            resources=resources_from_env(),
            run_config=dg.RunConfig(ops={"s3_attrs_verification": {"config": {"sample_size": sample_size}}}),
        )


def test_a_clean_backfill_verifies_and_passes_every_check(conn, s3_endpoint, bucket, seeded_files):
    _backfill_all(conn, s3_endpoint, bucket, seeded_files)
    report = _verify(conn, s3_endpoint, bucket)
    in_s3 = sum(f.in_s3 for f in seeded_files)
    assert (report.total_files, report.with_hash, report.with_last_modified, report.with_both) == (
        len(seeded_files), in_s3, in_s3, in_s3,
    )
    assert report.with_neither == report.known_missing == len(seeded_files) - in_s3
    assert report.remaining == 0 and report.partitions_with_gaps == []
    assert report.sample_size == in_s3 and report.consistent and report.well_formed

    result = _materialize_verification()
    assert _checks(result) == {"completeness": True, "consistency": True, "well_formed": True}
    metadata = result.asset_materializations_for_node("s3_attrs_verification")[0].metadata
    assert metadata["total_files"].value == len(seeded_files)
    assert metadata["known_missing_in_s3"].value == len(seeded_files) - in_s3
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
        (json_text("0123456789abcdef0123456789abcdef"), value_md5("0123456789abcdef0123456789abcdef"),
         wrong_etag.app_id, wrong_etag.entity_id, HASH.attr_id),
    )
    conn.execute(
        "UPDATE triples SET value_md5 = 'not-an-md5' WHERE app_id = %s AND entity_id = %s AND attr_id = %s",
        (wrong_encoding.app_id, wrong_encoding.entity_id, LAST_MODIFIED.attr_id),
    )
    report = _verify(conn, s3_endpoint, bucket)
    assert report.only_one == 1
    assert report.sample_hash_mismatches == 1
    assert report.malformed.encodings == 1
    assert [m.entity_id for m in report.mismatches] == [str(wrong_etag.entity_id)]
    assert report.complete  # every file still has its hash

    assert _checks(_materialize_verification()) == {"completeness": True, "consistency": False, "well_formed": False}


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
        scheduled_execution_time=datetime.datetime(2026, 11, 24, 4, tzinfo=datetime.timezone.utc),
    )
    return list(daily_reverification(context))


def test_new_files_make_the_schedule_heal_exactly_their_partitions(
    conn, instant_db_url, s3_endpoint, s3_client, bucket, seeded_files
):
    _backfill_all(conn, s3_endpoint, bucket, seeded_files)
    assert [r.asset_selection for r in _schedule_requests(instant_db_url)] == [[s3_attrs_verification.key]]

    existing_app = seeded_files[0].app_id
    new_app = uuid.UUID("c0ffee00-0000-4000-8000-000000000001")
    _add_files(conn, s3_client, bucket, [existing_app, new_app])
    requests = _schedule_requests(instant_db_url)
    assert sorted(r.partition_key for r in requests) == sorted({existing_app.hex[:2], "c0"})
    assert all(r.asset_selection == [files_s3_attrs.key] for r in requests)
    assert len({r.tags[HEAL_TAG] for r in requests}) == 1
    assert _verify(conn, s3_endpoint, bucket, sample_size=0).remaining == 6

    _backfill_all(conn, s3_endpoint, bucket, [f for f in seeded_files if f.app_id == existing_app] + [
        seed.SeededFile(new_app, uuid.uuid4(), "x", "x", True, False, False)
    ])
    assert [r.asset_selection for r in _schedule_requests(instant_db_url)] == [[s3_attrs_verification.key]]


def _add_backfill(instance, status) -> str:
    backfill_id = uuid.uuid4().hex[:8]
    instance.add_backfill(
        PartitionBackfill(
            backfill_id, status=status, from_failure=False, tags={}, backfill_timestamp=time.time(),
            asset_selection=[files_s3_attrs.key],
        )
    )
    return backfill_id


def _sensor_run_keys(instance) -> list[str]:
    result = verify_after_backfill.evaluate_tick(dg.build_sensor_context(instance=instance))
    return [request.run_key for request in result.run_requests]


def test_the_sensor_fires_once_a_backfill_has_ended_and_not_before():
    with dg.instance_for_test() as instance:
        backfill_id = _add_backfill(instance, BulkActionStatus.REQUESTED)
        run = create_run_for_test(instance, status=dg.DagsterRunStatus.STARTED, tags={BACKFILL_ID_TAG: backfill_id})
        assert _sensor_run_keys(instance) == []

        # The daemon has launched every run, but one is still going.
        instance.update_backfill(instance.get_backfill(backfill_id).with_status(BulkActionStatus.COMPLETED_FAILED))
        assert _sensor_run_keys(instance) == []

        instance.report_run_failed(run)
        assert _sensor_run_keys(instance) == [f"backfill:{backfill_id}"]
        # Seen again on later ticks with the same run key, which Dagster requests only once.
        assert _sensor_run_keys(instance) == [f"backfill:{backfill_id}"]


def test_the_sensor_ignores_backfills_of_other_assets_and_waits_for_heal_batches():
    with dg.instance_for_test() as instance:
        other = uuid.uuid4().hex[:8]
        instance.add_backfill(
            PartitionBackfill(
                other, status=BulkActionStatus.COMPLETED_SUCCESS, from_failure=False, tags={},
                backfill_timestamp=time.time(), asset_selection=[dg.AssetKey("something_else")],
            )
        )
        create_run_for_test(instance, status=dg.DagsterRunStatus.SUCCESS, tags={BACKFILL_ID_TAG: other})
        heal_runs = [
            create_run_for_test(instance, status=dg.DagsterRunStatus.STARTED, tags={HEAL_TAG: "2026-11-24T04:00:00"})
            for _ in range(2)
        ]
        assert _sensor_run_keys(instance) == []
        instance.report_run_failed(heal_runs[0])
        assert _sensor_run_keys(instance) == []
        instance.report_run_failed(heal_runs[1])
        assert _sensor_run_keys(instance) == ["heal:2026-11-24T04:00:00"]
