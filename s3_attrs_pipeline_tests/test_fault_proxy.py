"""FaultProxy between boto3 and moto's S3 server: plain forwarding, and what botocore sees of each fault."""

import http.client
import io
import socket
import threading
import time
import urllib.parse

import boto3
import botocore.config
import botocore.exceptions
import pytest

from s3_attrs_pipeline_tests.fault_proxy import MALFORMED_ETAG, MALFORMED_LAST_MODIFIED, FaultProxy, FaultRule

# botocore's retries "max_attempts" counts retries, not attempts (it adds one); "total_max_attempts"
# counts attempts, so 1 means a single request per call and a fault reaches the test unretried.
SINGLE_ATTEMPT = {"mode": "standard", "total_max_attempts": 1}


@pytest.fixture
def proxy(s3_endpoint):
    with FaultProxy(s3_endpoint, seed=1234) as running:
        yield running


@pytest.fixture
def ready_bucket(s3_client, bucket) -> str:
    s3_client.create_bucket(Bucket=bucket)
    return bucket


def proxied_client(proxy: FaultProxy, retries: dict = SINGLE_ATTEMPT):
    config = botocore.config.Config(retries=retries, read_timeout=1, connect_timeout=1)
    return boto3.client("s3", endpoint_url=proxy.url, config=config)


def proxy_address(proxy: FaultProxy) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(proxy.url)
    return parts.hostname, parts.port


def test_forwards_put_head_get_and_list_unchanged(proxy, s3_client, ready_bucket):
    client = proxied_client(proxy)
    client.put_object(Bucket=ready_bucket, Key="dir/bytes.txt", Body=b"from bytes")
    client.put_object(Bucket=ready_bucket, Key="dir/file.txt", Body=io.BytesIO(b"from a file object" * 100))

    via_proxy = client.head_object(Bucket=ready_bucket, Key="dir/file.txt")
    direct = s3_client.head_object(Bucket=ready_bucket, Key="dir/file.txt")
    assert via_proxy["ETag"] == direct["ETag"]
    assert via_proxy["LastModified"] == direct["LastModified"]
    assert via_proxy["ContentLength"] == direct["ContentLength"] == len(b"from a file object" * 100)

    assert client.get_object(Bucket=ready_bucket, Key="dir/bytes.txt")["Body"].read() == b"from bytes"
    assert s3_client.get_object(Bucket=ready_bucket, Key="dir/file.txt")["Body"].read() == b"from a file object" * 100
    listed = client.list_objects_v2(Bucket=ready_bucket, Prefix="dir/")
    assert [entry["Key"] for entry in listed["Contents"]] == ["dir/bytes.txt", "dir/file.txt"]

    stats = proxy.stats()
    assert stats["requests"] == stats["forwarded"] == 5
    assert all(stats[kind] == 0 for kind in ("slowdown", "internal_error", "access_denied", "reset", "stall"))


def test_forwards_multipart_upload(proxy, s3_client, ready_bucket):
    client = proxied_client(proxy)
    parts = [b"a" * 5000, b"b" * 3000]
    upload_id = client.create_multipart_upload(Bucket=ready_bucket, Key="big.bin")["UploadId"]
    uploaded = [
        {
            "PartNumber": number,
            "ETag": client.upload_part(
                Bucket=ready_bucket, Key="big.bin", UploadId=upload_id, PartNumber=number, Body=data
            )["ETag"],
        }
        for number, data in enumerate(parts, start=1)
    ]
    client.complete_multipart_upload(
        Bucket=ready_bucket, Key="big.bin", UploadId=upload_id, MultipartUpload={"Parts": uploaded}
    )

    stored = s3_client.get_object(Bucket=ready_bucket, Key="big.bin")
    assert stored["Body"].read() == b"".join(parts)
    assert stored["ETag"].strip('"').endswith("-2")
    assert client.head_object(Bucket=ready_bucket, Key="big.bin")["ETag"] == stored["ETag"]


def test_forwards_a_chunked_request_body(proxy, s3_client, ready_bucket):
    # boto3 sends Content-Length over plain HTTP, so a raw client exercises Transfer-Encoding: chunked.
    presigned = proxied_client(proxy).generate_presigned_url(
        "put_object", Params={"Bucket": ready_bucket, "Key": "chunked.txt"}
    )
    target = urllib.parse.urlsplit(presigned)
    connection = http.client.HTTPConnection(*proxy_address(proxy), timeout=5)
    connection.request(
        "PUT", f"{target.path}?{target.query}", body=iter([b"first,", b"second,", b"third"]), encode_chunked=True
    )
    response = connection.getresponse()
    response.read()
    connection.close()

    assert response.status == 200
    assert s3_client.get_object(Bucket=ready_bucket, Key="chunked.txt")["Body"].read() == b"first,second,third"


ERROR_FAULTS = [
    # kind, status, code botocore reads from the XML body
    ("slowdown", 503, "SlowDown"),
    ("internal_error", 500, "InternalError"),
    ("access_denied", 403, "AccessDenied"),
]


@pytest.mark.parametrize("kind, status, body_code", ERROR_FAULTS)
def test_error_faults_as_botocore_reports_them(proxy, s3_client, ready_bucket, kind, status, body_code):
    s3_client.put_object(Bucket=ready_bucket, Key="object", Body=b"payload")
    client = proxied_client(proxy)
    proxy.add_rule(FaultRule(kind))

    # A HEAD error has no body, so botocore can only use the status code as the error code.
    with pytest.raises(botocore.exceptions.ClientError) as head_error:
        client.head_object(Bucket=ready_bucket, Key="object")
    assert head_error.value.response["Error"]["Code"] == str(status)
    assert head_error.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert head_error.value.response["ResponseMetadata"]["HTTPHeaders"]["x-amz-request-id"]

    with pytest.raises(botocore.exceptions.ClientError) as get_error:
        client.get_object(Bucket=ready_bucket, Key="object")
    assert get_error.value.response["Error"]["Code"] == body_code
    metadata = get_error.value.response["ResponseMetadata"]
    assert metadata["HTTPStatusCode"] == status
    assert metadata["RequestId"] == metadata["HTTPHeaders"]["x-amz-request-id"]

    assert proxy.stats()[kind] == 2
    assert proxy.stats()["forwarded"] == 0


def test_an_s3_error_rule_answers_its_status_and_code_after_the_requests_it_lets_by(proxy, s3_client, ready_bucket):
    s3_client.put_object(Bucket=ready_bucket, Key="object", Body=b"payload")
    client = proxied_client(proxy)
    proxy.add_rule(
        FaultRule(
            "s3_error", status=400, code="ExpiredToken", message="The provided token has expired.", after_requests=2
        )
    )
    client.head_object(Bucket=ready_bucket, Key="object")
    client.get_object(Bucket=ready_bucket, Key="object")

    with pytest.raises(botocore.exceptions.ClientError) as head_error:
        client.head_object(Bucket=ready_bucket, Key="object")
    assert head_error.value.response["Error"]["Code"] == "400"  # a HEAD answer has no body to name it
    with pytest.raises(botocore.exceptions.ClientError) as get_error:
        client.get_object(Bucket=ready_bucket, Key="object")
    assert get_error.value.response["Error"] == {"Code": "ExpiredToken", "Message": "The provided token has expired."}
    assert get_error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    stats = proxy.stats()
    # botocore follows a HEAD object's 400 with a HEAD bucket, looking for a region to redirect to.
    assert stats["forwarded"] == 2 and stats["s3_error"] == stats["requests"] - 2 >= 2


def test_error_responses_are_framed_so_the_connection_stays_usable(proxy, ready_bucket):
    proxy.add_rule(FaultRule("slowdown"))
    connection = http.client.HTTPConnection(*proxy_address(proxy), timeout=5)
    try:
        connection.request("GET", f"/{ready_bucket}/anything")
        error = connection.getresponse()
        body = error.read()
        assert error.status == 503
        assert int(error.getheader("Content-Length")) == len(body)
        assert b"<Code>SlowDown</Code><Message>Please reduce your request rate.</Message>" in body
        assert error.getheader("x-amz-request-id")

        connection.request("HEAD", f"/{ready_bucket}/anything")
        head_error = connection.getresponse()
        assert head_error.read() == b""
        assert head_error.status == 503
        assert head_error.getheader("Content-Length") == "0"
        assert head_error.getheader("x-amz-request-id")
        assert head_error.getheader("x-amz-error-code") == "SlowDown"
    finally:
        connection.close()
    assert proxy.stats()["requests"] == 2


def test_reset_fault_is_a_connection_reset(proxy, s3_client, ready_bucket):
    s3_client.put_object(Bucket=ready_bucket, Key="object", Body=b"payload")
    client = proxied_client(proxy)
    proxy.add_rule(FaultRule("reset", duration_s=1.0))

    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        client.head_object(Bucket=ready_bucket, Key="object")

    # RST rather than FIN: the raw socket sees ECONNRESET instead of an orderly end of stream.
    with socket.create_connection(proxy_address(proxy), timeout=5) as raw:
        raw.sendall(f"HEAD /{ready_bucket}/object HTTP/1.1\r\nHost: proxy\r\n\r\n".encode())
        with pytest.raises(ConnectionResetError):
            raw.recv(1024)
    assert proxy.stats()["reset"] == 2

    proxy.clear_rules()
    assert client.head_object(Bucket=ready_bucket, Key="object")["ContentLength"] == len(b"payload")


def test_stall_fault_runs_into_the_client_read_timeout(proxy, s3_client, ready_bucket):
    s3_client.put_object(Bucket=ready_bucket, Key="object", Body=b"payload")
    proxy.add_rule(FaultRule("stall", stall_s=3))

    started = time.monotonic()
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        proxied_client(proxy).head_object(Bucket=ready_bucket, Key="object")
    assert time.monotonic() - started < 2.5  # the client's 1 s read timeout, not the 3 s stall
    assert proxy.stats()["stall"] == 1


def test_stop_returns_promptly_during_a_stall_and_with_idle_keep_alive_connections(s3_endpoint, ready_bucket):
    proxy = FaultProxy(s3_endpoint).start()
    address = proxy_address(proxy)
    keep_alive_client = proxied_client(proxy)
    keep_alive_client.list_objects_v2(Bucket=ready_bucket)  # leaves a pooled connection open on the proxy
    proxy.add_rule(FaultRule("stall", stall_s=30))
    stalled = socket.create_connection(address, timeout=5)
    try:
        stalled.sendall(f"HEAD /{ready_bucket}/object HTTP/1.1\r\nHost: proxy\r\n\r\n".encode())
        deadline = time.monotonic() + 5
        while proxy.stats()["stall"] == 0:
            assert time.monotonic() < deadline, "the stall never started"
            time.sleep(0.01)

        started = time.monotonic()
        proxy.stop()
        assert time.monotonic() - started < 2.0
        assert stalled.recv(1024) == b""  # closed without an answer
    finally:
        stalled.close()
        proxy.stop()  # a no-op once stopped; here for when an assertion above failed first
    # Had stop() left the pooled connection's handler running, it would have answered this request.
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        keep_alive_client.list_objects_v2(Bucket=ready_bucket)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=1).close()


def test_a_hold_keeps_requests_until_released_then_forwards_them(proxy, s3_client, ready_bucket):
    s3_client.put_object(Bucket=ready_bucket, Key="held/object", Body=b"payload")
    client = proxied_client(proxy)
    proxy.add_rule(FaultRule("hold", key_pattern="/held/"))
    answers = []
    heads = [
        threading.Thread(target=lambda: answers.append(client.head_object(Bucket=ready_bucket, Key="held/object")))
        for _ in range(2)
    ]
    for head in heads:
        head.start()
    deadline = time.monotonic() + 10
    while len(proxy.held_paths()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.held_paths() == [f"/{ready_bucket}/held/object"] * 2 and answers == []
    client.head_bucket(Bucket=ready_bucket)  # other requests pass
    proxy.release_held()
    for head in heads:
        head.join(10)
    assert [answer["ContentLength"] for answer in answers] == [7, 7] and proxy.held_paths() == []


def test_malformed_headers_fault(proxy, s3_client, ready_bucket):
    s3_client.put_object(Bucket=ready_bucket, Key="object", Body=b"payload")
    client = proxied_client(proxy)
    proxy.add_rule(FaultRule("malformed_headers"))

    # A presigned URL, because moto answers unsigned requests to a private bucket with 403.
    presigned = urllib.parse.urlsplit(
        client.generate_presigned_url("head_object", Params={"Bucket": ready_bucket, "Key": "object"})
    )
    connection = http.client.HTTPConnection(*proxy_address(proxy), timeout=5)
    try:
        connection.request("HEAD", f"{presigned.path}?{presigned.query}")
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    assert response.status == 200
    assert response.getheader("ETag") == MALFORMED_ETAG
    assert response.getheader("Last-Modified") == MALFORMED_LAST_MODIFIED
    assert response.getheader("Content-Length") == str(len(b"payload"))

    # botocore does not wrap the unparsable timestamp in one of its own exceptions.
    with pytest.raises(ValueError, match="not a date"):
        client.head_object(Bucket=ready_bucket, Key="object")
    assert proxy.stats()["malformed_headers"] == proxy.stats()["forwarded"] == 2


def test_latency_rules_add_up_and_then_forward(proxy, s3_client, ready_bucket):
    s3_client.put_object(Bucket=ready_bucket, Key="object", Body=b"payload")
    client = proxied_client(proxy)
    client.head_object(Bucket=ready_bucket, Key="object")  # connection set up outside the timing
    proxy.add_rule(FaultRule("latency", latency_s=0.25))
    proxy.add_rule(FaultRule("latency", latency_s=0.25, method="HEAD"))
    proxy.add_rule(FaultRule("latency", latency_s=5.0, method="GET"))  # must not apply to a HEAD

    started = time.monotonic()
    head = client.head_object(Bucket=ready_bucket, Key="object")
    elapsed = time.monotonic() - started

    assert 0.5 <= elapsed < 0.95
    assert head["ContentLength"] == len(b"payload")
    stats = proxy.stats()
    assert (stats["latency"], stats["forwarded"], stats["requests"]) == (1, 2, 2)


def test_rate_injects_roughly_that_share_of_faults(proxy, s3_client, ready_bucket):
    s3_client.put_object(Bucket=ready_bucket, Key="object", Body=b"payload")
    client = proxied_client(proxy)
    proxy.add_rule(FaultRule("slowdown", rate=0.3))

    failures = 0
    for _ in range(200):
        try:
            client.head_object(Bucket=ready_bucket, Key="object")
        except botocore.exceptions.ClientError as error:
            assert error.response["Error"]["Code"] == "503"
            failures += 1

    assert 40 <= failures <= 80
    stats = proxy.stats()
    assert stats["slowdown"] == failures
    assert stats["forwarded"] == 200 - failures


def test_same_seed_injects_faults_into_the_same_requests(s3_endpoint, s3_client, ready_bucket):
    s3_client.put_object(Bucket=ready_bucket, Key="object", Body=b"payload")

    def failing_requests(seed: int) -> list[int]:
        with FaultProxy(s3_endpoint, seed=seed) as proxy:
            proxy.add_rule(FaultRule("internal_error", rate=0.5))
            client = proxied_client(proxy)
            failed = []
            for index in range(30):
                try:
                    client.head_object(Bucket=ready_bucket, Key="object")
                except botocore.exceptions.ClientError:
                    failed.append(index)
            return failed

    assert failing_requests(7) == failing_requests(7)
    assert failing_requests(7) != failing_requests(8)


def test_key_pattern_and_method_restrict_the_fault(proxy, s3_client, ready_bucket):
    for key in ("bad dir/one", "good/one"):
        s3_client.put_object(Bucket=ready_bucket, Key=key, Body=b"payload")
    client = proxied_client(proxy)
    # The space arrives percent-encoded; the pattern is matched against the decoded path.
    proxy.add_rule(FaultRule("access_denied", key_pattern=r"/bad dir/", method="HEAD"))

    with pytest.raises(botocore.exceptions.ClientError) as denied:
        client.head_object(Bucket=ready_bucket, Key="bad dir/one")
    assert denied.value.response["Error"]["Code"] == "403"
    assert client.head_object(Bucket=ready_bucket, Key="good/one")["ContentLength"] == len(b"payload")
    assert client.get_object(Bucket=ready_bucket, Key="bad dir/one")["Body"].read() == b"payload"
    assert proxy.stats()["access_denied"] == 1


def test_first_matching_rule_wins(proxy, s3_client, ready_bucket):
    s3_client.put_object(Bucket=ready_bucket, Key="object", Body=b"payload")
    proxy.add_rule(FaultRule("slowdown", rate=0.0))  # matches but its dice never hit: not the winner
    proxy.add_rule(FaultRule("internal_error"))
    proxy.add_rule(FaultRule("access_denied"))

    with pytest.raises(botocore.exceptions.ClientError) as error:
        proxied_client(proxy).get_object(Bucket=ready_bucket, Key="object")
    assert error.value.response["Error"]["Code"] == "InternalError"
    assert (proxy.stats()["slowdown"], proxy.stats()["access_denied"]) == (0, 0)


def test_rule_with_duration_expires(proxy, s3_client, ready_bucket):
    s3_client.put_object(Bucket=ready_bucket, Key="object", Body=b"payload")
    client = proxied_client(proxy)
    proxy.add_rule(FaultRule("slowdown", duration_s=0.5))

    with pytest.raises(botocore.exceptions.ClientError):
        client.head_object(Bucket=ready_bucket, Key="object")
    time.sleep(0.6)
    assert client.head_object(Bucket=ready_bucket, Key="object")["ContentLength"] == len(b"payload")
    assert proxy.stats()["slowdown"] == 1


def test_stats_and_request_times_count_every_request(proxy, s3_client, ready_bucket):
    s3_client.put_object(Bucket=ready_bucket, Key="object", Body=b"payload")
    client = proxied_client(proxy)
    proxy.add_rule(FaultRule("internal_error", method="GET"))

    before = time.monotonic()
    for _ in range(5):
        client.head_object(Bucket=ready_bucket, Key="object")
    for _ in range(3):
        with pytest.raises(botocore.exceptions.ClientError):
            client.get_object(Bucket=ready_bucket, Key="object")
    after = time.monotonic()

    stats = proxy.stats()
    assert (stats["requests"], stats["forwarded"], stats["internal_error"]) == (8, 5, 3)
    times = proxy.request_times()
    assert len(times) == 8
    assert times == sorted(times)
    assert before <= times[0] and times[-1] <= after


def test_stats_are_consistent_under_concurrent_clients(proxy, s3_client, ready_bucket):
    s3_client.put_object(Bucket=ready_bucket, Key="object", Body=b"payload")
    proxy.add_rule(FaultRule("slowdown", rate=0.5))

    failures = []

    def head_many():
        client = proxied_client(proxy)
        for _ in range(25):
            try:
                client.head_object(Bucket=ready_bucket, Key="object")
            except botocore.exceptions.ClientError as error:
                failures.append(error.response["Error"]["Code"])

    threads = [threading.Thread(target=head_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    stats = proxy.stats()
    assert stats["requests"] == len(proxy.request_times()) == 100
    assert stats["slowdown"] == len(failures) == failures.count("503")
    assert stats["forwarded"] == 100 - len(failures)
    assert 0 < len(failures) < 100


def test_retries_max_attempts_counts_retries_not_attempts(proxy, s3_client, ready_bucket):
    s3_client.put_object(Bucket=ready_bucket, Key="object", Body=b"payload")
    proxy.add_rule(FaultRule("internal_error"))
    client = proxied_client(proxy, retries={"mode": "standard", "max_attempts": 1})

    with pytest.raises(botocore.exceptions.ClientError):
        client.head_object(Bucket=ready_bucket, Key="object")
    assert proxy.stats()["requests"] == 2


@pytest.mark.parametrize("mode", ["standard", "adaptive"])
def test_head_slowdown_is_retried_as_a_transient_error(proxy, s3_client, ready_bucket, mode):
    s3_client.put_object(Bucket=ready_bucket, Key="object", Body=b"payload")
    proxy.add_rule(FaultRule("slowdown"))
    client = proxied_client(proxy, retries={"mode": mode, "total_max_attempts": 4})

    started = time.monotonic()
    with pytest.raises(botocore.exceptions.ClientError) as error:
        client.head_object(Bucket=ready_bucket, Key="object")
    assert error.value.response["Error"]["Code"] == "503"
    assert proxy.stats()["requests"] == 4
    # Backoff for a non-throttling error is rand() * 0.05 s * 2**i, at most 0.35 s for three retries;
    # a throttling error would start at rand() * 1 s.
    assert time.monotonic() - started < 2.0
