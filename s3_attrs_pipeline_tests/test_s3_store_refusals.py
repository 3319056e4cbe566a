"""S3 refusing every request mid-run (issue 14): credentials that expire, a wrong key, clock or
region, through moto's S3 server and the fault proxy; and credentials that botocore refreshes
mid-run, against a moto server that checks every signature."""

import datetime
import json
import re
import time

import boto3
import dagster as dg
import pytest

from s3_attrs_pipeline import cli
from s3_attrs_pipeline.cli import dagster_runs
from s3_attrs_pipeline.instant.file_attrs import json_text
from s3_attrs_pipeline.local import s3_server, seed
from s3_attrs_pipeline.s3.store import (
    HEAD_REFUSALS_IN_A_ROW,
    REFUSED_APPS_IN_A_ROW,
    ObjectStore,
    S3AccessError,
    S3Refused,
    S3Settings,
)
from s3_attrs_pipeline.tasks import backfill
from s3_attrs_pipeline.tasks.task import PartitionFailed, TaskSettings
from s3_attrs_pipeline_tests.fault_proxy import FaultProxy, FaultRule
from s3_attrs_pipeline_tests.helpers import head_values, new_attr_triples, partition_of, partitions_of

LOG = dg.get_dagster_logger()
EXPIRED = {"status": 400, "code": "ExpiredToken", "message": "The provided token has expired."}
# One app of 400 files: one partition, HEADed (below list_threshold) or listed in one page.
ONE_APP = seed.DatasetSpec(apps=1, files=400, missing_ratio=0.05, multipart_ratio=0.05, prepopulated_ratio=0.05)


@pytest.fixture
def one_app(conn, s3_client, bucket) -> tuple[str, list[seed.SeededFile]]:
    files = seed.plan_dataset(ONE_APP)
    seed.upload_objects(s3_client, bucket, files)
    seed.insert_files(conn, s3_client, bucket, files)
    return partition_of(files[0]), files


def _assert_written_right(conn, s3_client, bucket, files) -> int:
    """Every file with triples has both, with its object's ETag and Last-Modified; returns how many
    the run wrote."""
    written = new_attr_triples(conn)
    by_id = {(f.app_id, f.entity_id): f for f in files}
    for file_id, attrs in written.items():
        assert len(attrs) == 2, f"file {file_id} has {len(attrs)} of its 2 triples"
        values = sorted((values[0] for values in attrs.values()), key=str)
        etag, last_modified = head_values(s3_client, bucket, by_id[file_id].key)
        assert values == sorted([etag, last_modified], key=str)
    return len(written) - sum(f.prepopulated for f in files)


def test_credentials_expiring_mid_run_stop_the_partition_within_a_batch(conn, s3_endpoint, s3_client, bucket, one_app):
    key, files = one_app
    settings = TaskSettings()
    good_requests = 1 + 120  # HEAD bucket, then 120 HEADs: two batches' worth and some
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(FaultRule("s3_error", after_requests=good_requests, **EXPIRED))
        with ObjectStore(S3Settings(bucket, endpoint_url=proxy.url)) as store:
            with pytest.raises(S3Refused) as refused:
                backfill.backfill_partition(conn, store, key, settings, LOG)
            window = 2 * max(settings.batch_size, store.settings.max_in_flight)
        refusals = proxy.stats()["s3_error"]
    message = str(refused.value)
    assert re.match(
        r"S3 refused \d+ HEAD requests in a row \(the last, for s3://.+, with 400\) and HEAD bucket too", message
    )
    assert "the session credentials expired: refresh them" in message and "rerun the failed partitions" in message
    # The requests already in flight when the credentials expired, and a HEAD bucket for every three of
    # them refused in a row: none of the HEADs queued behind them was sent.
    in_flight = store.settings.max_in_flight
    assert HEAD_REFUSALS_IN_A_ROW < refusals <= in_flight + in_flight // HEAD_REFUSALS_IN_A_ROW + 1 < window
    written = _assert_written_right(conn, s3_client, bucket, files)
    assert settings.batch_size <= written < sum(f.in_s3 and not f.prepopulated for f in files)


def test_a_few_refused_heads_are_failed_files_not_a_stop(conn, s3_endpoint, s3_client, bucket, one_app):
    """An object encrypted with a customer-provided key answers 400 to a plain HEAD; others answer."""
    key, files = one_app
    # Far apart in the order they are HEADed (by location-id): never in a row.
    refused = sorted((f for f in files if f.in_s3 and not f.prepopulated), key=lambda f: f.location_id)[10::100]
    assert len(refused) >= HEAD_REFUSALS_IN_A_ROW
    with FaultProxy(s3_endpoint) as proxy:
        for file in refused:
            proxy.add_rule(FaultRule("s3_error", method="HEAD", key_pattern=re.escape(file.key), status=400))
        with (
            ObjectStore(S3Settings(bucket, endpoint_url=proxy.url)) as store,
            pytest.raises(PartitionFailed) as failed,
        ):
            backfill.backfill_partition(conn, store, key, TaskSettings(), LOG)
    assert failed.value.report.counts.failed == len(refused)
    assert {p.entity_id for p in failed.value.report.problems if p.reason.startswith("failed")} == {
        str(f.entity_id) for f in refused
    }
    written = _assert_written_right(conn, s3_client, bucket, files)
    assert written == sum(f.in_s3 and not f.prepopulated for f in files) - len(refused)


def test_objects_encrypted_with_a_customer_key_in_a_row_are_failed_files_not_a_stop(
    conn, s3_endpoint, s3_client, bucket, one_app
):
    """SSE-C objects answer 400 to a HEAD without their key. Several in a row make the store ask HEAD
    bucket, which S3 answers: so they are those files' failures, and the partition's other files are
    written."""
    key, files = one_app
    in_head_order = sorted((f for f in files if f.in_s3 and not f.prepopulated), key=lambda f: json_text(f.location_id))
    refused = in_head_order[10 : 10 + 2 * HEAD_REFUSALS_IN_A_ROW]
    with FaultProxy(s3_endpoint) as proxy:
        for file in refused:
            proxy.add_rule(FaultRule("s3_error", method="HEAD", key_pattern=re.escape(file.key), status=400))
        # One request at a time: the refused HEADs come in a row.
        with ObjectStore(S3Settings(bucket, endpoint_url=proxy.url, max_in_flight=1)) as store:
            with pytest.raises(PartitionFailed) as failed:
                backfill.backfill_partition(conn, store, key, TaskSettings(), LOG)
            # HEAD bucket, a HEAD per file to do, and a HEAD bucket after each three refused in a row.
            headed = sum(not f.prepopulated for f in files)
            assert store.requests_sent == 1 + headed + len(refused) // HEAD_REFUSALS_IN_A_ROW
    assert failed.value.report.counts.failed == len(refused)
    reasons = {p.entity_id: p.reason for p in failed.value.report.problems if p.reason.startswith("failed")}
    assert set(reasons) == {str(f.entity_id) for f in refused}
    assert all("S3 refused the HEAD with 400" in reason for reason in reasons.values())
    assert _assert_written_right(conn, s3_client, bucket, files) == (
        sum(f.in_s3 and not f.prepopulated for f in files) - len(refused)
    )


def test_heads_refused_for_the_objects_of_several_apps_while_the_bucket_answers_stop_the_run(
    conn, s3_endpoint, s3_client, bucket, seeded_files, dagster_home, monkeypatch, capsys
):
    """A policy without s3:GetObject: HEAD bucket answers, every HEAD of an object is refused. The
    refusals come from the objects of apps after apps: the run stops, saying what the policy lacks."""
    keys = partitions_of(seeded_files)
    one_run = [key for key in dagster_runs.all_partition_keys() if keys[0] <= key <= keys[-1]]
    with FaultProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proxy.add_rule(FaultRule("access_denied", method="HEAD", key_pattern=f"^/{bucket}/.+"))
        status = cli.main(["run", "--parallel", "1"] + [arg for key in one_run for arg in ("--partition", key)])
        refused = proxy.stats()["access_denied"]
    out = capsys.readouterr().out
    assert status == cli.EXIT_FAILED
    assert f"objects of {REFUSED_APPS_IN_A_ROW} apps in a row" in out and "must allow s3:GetObject" in out
    assert f"partition {keys[REFUSED_APPS_IN_A_ROW]} STOPPED" not in out  # not started: only the summary names it
    # The first apps' HEADs, up to the third app's first refusal; no partition after it was started.
    first_apps = [
        f for f in seeded_files if partition_of(f) in keys[: REFUSED_APPS_IN_A_ROW - 1] and not f.prepopulated
    ]
    assert refused <= len(first_apps) + S3Settings("x").max_in_flight
    assert new_attr_triples(conn).keys() == {(f.app_id, f.entity_id) for f in seeded_files if f.prepopulated}


def test_an_expired_token_on_a_listing_is_named_and_stops_the_partition(conn, s3_endpoint, bucket, one_app):
    key, _ = one_app
    before = new_attr_triples(conn)
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(FaultRule("s3_error", method="GET", **EXPIRED))
        with ObjectStore(S3Settings(bucket, endpoint_url=proxy.url)) as store:
            with pytest.raises(S3Refused) as refused:
                backfill.backfill_partition(conn, store, key, TaskSettings(list_threshold=100), LOG)
            assert store.requests_sent == 2  # HEAD bucket, one listing: a refusal is not retried
    assert refused.value.code == "ExpiredToken"
    assert f"S3 answered ExpiredToken to listing s3://{bucket}/" in str(refused.value)
    assert "('The provided token has expired.'): " in str(refused.value)
    assert "the session credentials expired: refresh them" in str(refused.value)
    assert new_attr_triples(conn) == before


@pytest.mark.parametrize(
    ("status", "code", "advice"),
    [
        (400, "ExpiredToken", "the session credentials expired"),
        (400, "TokenRefreshRequired", "the session credentials expired"),
        (400, "InvalidToken", "the session credentials expired"),
        (403, "InvalidAccessKeyId", "the access key id or its secret is wrong"),
        (403, "SignatureDoesNotMatch", "the access key id or its secret is wrong"),
        (403, "RequestTimeTooSkewed", "fix the clock (NTP)"),
        (400, "AuthorizationHeaderMalformed", "set AWS_REGION to the bucket's region"),
        (301, "PermanentRedirect", "set AWS_REGION to the bucket's region"),
        (403, "AccessDenied", "must allow s3:GetObject on the bucket's objects and s3:ListBucket"),
        (400, "InvalidArgument", "S3's message says why"),  # any 400 is a refusal
    ],
)
def test_a_refused_listing_names_the_code_and_says_what_to_do(s3_endpoint, s3_client, bucket, status, code, advice):
    s3_client.create_bucket(Bucket=bucket)
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(FaultRule("s3_error", method="GET", status=status, code=code, message="S3 says no."))
        with ObjectStore(S3Settings(bucket, endpoint_url=proxy.url)) as store:
            store.check_bucket()
            with pytest.raises(S3Refused) as refused:
                store.list_page("app/", 1000)
            assert store.requests_sent == 2
    assert refused.value.code == code
    assert str(refused.value).startswith(f"S3 answered {code} to listing s3://{bucket}/app/ ('S3 says no.'): ")
    assert advice in refused.value.advice


def test_a_head_bucket_refused_with_400_says_the_credentials_probably_expired(s3_endpoint, s3_client, bucket):
    s3_client.create_bucket(Bucket=bucket)
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(FaultRule("s3_error", method="HEAD", **EXPIRED))
        with (
            ObjectStore(S3Settings(bucket, endpoint_url=proxy.url)) as store,
            pytest.raises(S3AccessError) as refused,
        ):
            store.check_bucket()
    assert str(refused.value).startswith(f"S3 bucket {bucket!r} cannot be read: HEAD bucket answered 400: ")
    assert "an answer to a HEAD has no body" in str(refused.value)
    assert "the session credentials expired: refresh them" in str(refused.value)


# --- credentials that botocore refreshes mid-run ----------------------------------------------


@pytest.fixture
def checking_moto(monkeypatch):
    """A moto server that checks every signature and key, and an IAM client that may rotate keys
    (its user made while the first requests are still unauthenticated)."""
    with monkeypatch.context() as patch:
        patch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "3")
        process, endpoint = s3_server.start_s3_server()
    try:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
        iam.create_user(UserName="rotator")
        iam.put_user_policy(
            UserName="rotator",
            PolicyName="all",
            PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
            ),
        )
        rotator = iam.create_access_key(UserName="rotator")["AccessKey"]
        admin = {
            "endpoint_url": endpoint,
            "region_name": "us-east-1",
            "aws_access_key_id": rotator["AccessKeyId"],
            "aws_secret_access_key": rotator["SecretAccessKey"],
        }
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="pipeline")
        iam.put_user_policy(
            UserName="pipeline",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
            ),
        )
        yield endpoint, iam, boto3.client("s3", **admin)
    finally:
        s3_server.stop_s3_server(process)


# botocore refreshes temporary credentials 15 minutes before they expire: these are due this soon.
_DUE_IN_S = 0.2
# A key is deleted two rotations after it was issued, as AWS keeps refreshed-away session
# credentials valid until they expire: the store may sign with the previous key for _DUE_IN_S and
# the 1 s its signed HEAD reuses frozen credentials, well within a rotation.
_ROTATION_S = 2.0


def test_credentials_refreshed_mid_run_keep_the_requests_going(checking_moto, tmp_path, monkeypatch, fresh_aws_session):
    endpoint, iam, s3 = checking_moto
    s3.create_bucket(Bucket="rotating")
    keys = [f"app/{n}/object-{n}" for n in range(20)]
    for key in keys:
        s3.put_object(Bucket="rotating", Key=key, Body=key.encode())
    # The standard chain's credential_process: botocore wraps it in RefreshableCredentials.
    credentials_file = tmp_path / "credentials.json"
    config_file = tmp_path / "config"
    config_file.write_text(f"[profile rotating]\ncredential_process = cat {credentials_file}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_PROFILE", "rotating")

    issued: list[str] = []

    def rotate() -> None:
        if len(issued) >= 2:
            iam.delete_access_key(UserName="pipeline", AccessKeyId=issued[-2])
        new = iam.create_access_key(UserName="pipeline")["AccessKey"]
        issued.append(new["AccessKeyId"])
        due = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=15, seconds=_DUE_IN_S)
        credentials_file.write_text(
            json.dumps(
                {
                    "Version": 1,
                    "AccessKeyId": new["AccessKeyId"],
                    "SecretAccessKey": new["SecretAccessKey"],
                    "Expiration": due.isoformat(),
                }
            )
        )

    rotate()
    with ObjectStore(S3Settings("rotating", endpoint_url=endpoint, max_in_flight=4)) as store:
        store.check_bucket()
        requests = 0
        for _ in range(3):
            rotate()  # deletes the key issued two rotations ago
            until = time.monotonic() + _ROTATION_S
            while time.monotonic() < until:
                outcomes = store.head_many(keys)
                assert [outcome.failure for outcome in outcomes] == [None] * len(keys)
                assert [entry.key for entry in store.list_page("app/", 1000).objects] == sorted(keys)
                requests += len(keys) + 1
    # The last rotation's requests were signed with neither of the first two keys: both were deleted.
    assert len(issued) == 4 and requests > 100
