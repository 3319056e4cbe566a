"""The signed ListObjectsV2 (s3/listing.py) against botocore's signer and boto3's own
list_objects_v2 through moto's S3 server and the fault proxy: the same pages, the same errors."""

import datetime
import re
import urllib.parse

import botocore.credentials
import pytest

from s3_attrs_pipeline.s3 import listing
from s3_attrs_pipeline.s3 import store as object_store
from s3_attrs_pipeline.s3.sigv4 import SigV4Signer, canonical_query, host_header
from s3_attrs_pipeline.s3.store import ListingFailed, ObjectStore, S3AccessError, S3Settings
from s3_attrs_pipeline_tests.fault_proxy import FaultProxy, FaultRule
from s3_attrs_pipeline_tests.test_s3_head import SPECIAL_KEYS, _botocore_authorization


@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzE+/token=="])
@pytest.mark.parametrize(
    ("base_url", "region"),
    [
        ("http://127.0.0.1:9000/files", "us-east-1"),
        ("https://files.s3.eu-west-1.amazonaws.com", "eu-west-1"),
    ],
)
def test_a_signed_query_is_botocores(token, base_url, region):
    credentials = botocore.credentials.ReadOnlyCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCY", token)
    when = datetime.datetime(2026, 3, 1, 23, 59, 58)
    query = canonical_query(
        {
            "list-type": "2",
            "prefix": "app id/日本 ü+~*",
            "max-keys": "1000",
            "encoding-type": "url",
            "continuation-token": "1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=",
        }
    )
    path = urllib.parse.urlsplit(base_url).path or "/"
    url = f"{base_url.rstrip('/')}{'' if path != '/' else '/'}?{query}"
    expected = _botocore_authorization(url, credentials, region, when, method="GET")
    signed = SigV4Signer(host_header(base_url), region).headers(
        "GET", path, credentials, when.strftime("%Y%m%dT%H%M%SZ"), query=query
    )
    assert signed["authorization"] == expected["authorization"]


def _all_pages(store: ObjectStore, prefix: str, page_size: int) -> list:
    pages, continuation = [], None
    while True:
        page = store.list_page(prefix, page_size, continuation)
        pages.append(page.objects)
        continuation = page.continuation
        if continuation is None:
            return pages


@pytest.mark.parametrize("through_boto3", [False, True], ids=["signed", "boto3"])
def test_special_keys_list_like_boto3(s3_endpoint, s3_client, bucket, monkeypatch, through_boto3):
    s3_client.create_bucket(Bucket=bucket)
    for index, key in enumerate(SPECIAL_KEYS):
        s3_client.put_object(Bucket=bucket, Key=key, Body=b"x" * (index + 1))
    expected = {
        entry["Key"]: (entry["ETag"], entry["LastModified"])
        for entry in s3_client.list_objects_v2(Bucket=bucket)["Contents"]
    }
    if through_boto3:
        monkeypatch.setattr(object_store, "_why_not_signed_here", lambda client, target: "the test compares")
    with ObjectStore(S3Settings(bucket, endpoint_url=s3_endpoint)) as store:
        pages = _all_pages(store, "", page_size=3)
        assert (store._signed_listing is None) == through_boto3
    assert [len(page) for page in pages] == [3] * (len(SPECIAL_KEYS) // 3) + (
        [len(SPECIAL_KEYS) % 3] if len(SPECIAL_KEYS) % 3 else []
    )
    listed = [entry for page in pages for entry in page]
    assert [entry.key for entry in listed] == sorted(expected)
    for entry in listed:
        etag, last_modified = expected[entry.key]
        assert entry.etag == etag, entry.key
        assert datetime.datetime.fromisoformat(entry.last_modified) == last_modified, entry.key
        assert listing.metadata_of(entry).last_modified_ms == int(last_modified.timestamp()) * 1000


def _listing_outcome(proxy_url: str, bucket: str, *, through_boto3: bool, monkeypatch, **settings):
    with monkeypatch.context() as patch:
        if through_boto3:
            patch.setattr(object_store, "_why_not_signed_here", lambda client, target: "the test compares")
        with ObjectStore(S3Settings(bucket, endpoint_url=proxy_url, **settings)) as store:
            try:
                pages = list(listing.list_prefix(store, "app/"))
            except (ListingFailed, S3AccessError) as error:
                # The signed request's URL has the same query, in canonical order.
                return (
                    type(error).__name__,
                    re.sub(r'URL: "[^"]*"', "URL: <the listing's>", str(error)),
                    store.requests_sent,
                )
            return "pages", [[entry.key for entry in page.objects] for page in pages], store.requests_sent


@pytest.mark.parametrize(
    ("rule", "settings", "expected"),
    [
        (
            FaultRule("internal_error", method="GET"),
            {"max_retries": 2},
            "failed after 2 retries: S3 answered InternalError",
        ),
        (FaultRule("slowdown", method="GET"), {"max_retries": 1}, "failed after 1 retries: S3 answered SlowDown"),
        (FaultRule("reset", method="GET"), {"max_retries": 1}, "failed after 1 retries: ConnectionClosedError: "),
        (
            FaultRule("stall", method="GET", stall_s=3),
            {"max_retries": 1, "read_timeout_s": 0.3},
            "failed after 1 retries: ReadTimeoutError: Read timeout on endpoint URL",
        ),
        (FaultRule("access_denied", method="GET"), {}, "S3 answered AccessDenied to listing s3://"),
        (FaultRule("latency", method="GET", latency_s=0.05), {}, None),
    ],
    ids=lambda value: value.kind if isinstance(value, FaultRule) else "",
)
def test_listing_faults_are_reported_as_boto3_reported_them(
    s3_endpoint, s3_client, bucket, monkeypatch, rule, settings, expected
):
    s3_client.create_bucket(Bucket=bucket)
    for key in ("app/0/a", "app/1/b c+d", "app/2/ü"):
        s3_client.put_object(Bucket=bucket, Key=key, Body=b"x")
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(rule)
        results = {
            through_boto3: _listing_outcome(
                proxy.url, bucket, through_boto3=through_boto3, monkeypatch=monkeypatch, **settings
            )
            for through_boto3 in (False, True)
        }
    assert results[False] == results[True]
    kind, detail, requests_sent = results[False]
    if expected is None:
        assert (kind, detail) == ("pages", [["app/0/a", "app/1/b c+d", "app/2/ü"]])
    else:
        assert expected in detail
        assert requests_sent == settings.get("max_retries", 0) + 1
