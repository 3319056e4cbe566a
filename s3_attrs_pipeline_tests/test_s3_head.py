"""The signed HEAD (s3/head.py) against botocore's signer, moto's S3 server (also with
signature checking on), a recording HTTP server, and the fault proxy: it must send what boto3
sends and report every answer and fault exactly as the boto3 path did."""

import contextlib
import datetime
import http.server
import ipaddress
import json
import os
import ssl
import threading
import time
import urllib.parse
from unittest import mock

import boto3
import botocore.auth
import botocore.awsrequest
import botocore.config
import botocore.credentials
import pytest

from s3_attrs_pipeline.local import s3_server
from s3_attrs_pipeline.s3 import endpoint, head
from s3_attrs_pipeline.s3 import store as object_store
from s3_attrs_pipeline.s3.endpoint import prepare_head_object
from s3_attrs_pipeline.s3.object_metadata import object_metadata_from_headers
from s3_attrs_pipeline.s3.sigv4 import SigV4Signer, encode_key, host_header
from s3_attrs_pipeline.s3.store import HEAD_REFUSALS_IN_A_ROW, ObjectStore, S3AccessError, S3Settings
from s3_attrs_pipeline_tests.fault_proxy import FaultProxy, FaultRule

SPECIAL_KEYS = [
    "plain/key.txt",
    "with space/and  two  spaces .txt",
    "plus+sign/a+b=c.txt",
    "tilde~/~x~",
    "unicode/日本語 ファイル.txt",
    "emoji/😀 ü é.bin",
    "percent/100%25 and %41.txt",
    "query?and#hash&x=1;y",
    "double//slash",
    "trailing/slash/",
    "/leading-slash",
    "punctuation/'\"<>|\\^`{}[]*()!$,:@",
]


def _expected_metadata(s3_client, bucket, key):
    return object_metadata_from_headers(
        s3_client.head_object(Bucket=bucket, Key=key)["ResponseMetadata"]["HTTPHeaders"]
    )


# --- signing: the same Authorization header as botocore's S3SigV4Auth -------------------------


def _botocore_authorization(url: str, credentials, region: str, when: datetime.datetime, method: str = "HEAD") -> dict:
    request = botocore.awsrequest.AWSRequest(method, url)
    with mock.patch("botocore.auth.get_current_datetime", return_value=when):
        botocore.auth.S3SigV4Auth(credentials, "s3", region).add_auth(request)
    return {name.lower(): value for name, value in request.headers.items()}


@pytest.mark.parametrize("key", SPECIAL_KEYS)
@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzE+/token=="])
@pytest.mark.parametrize(
    ("base_url", "region"),
    [
        ("http://127.0.0.1:9000/files", "us-east-1"),
        ("https://files.s3.eu-west-1.amazonaws.com", "eu-west-1"),
        ("https://s3.amazonaws.com/files.with.dots", "us-east-1"),
        ("https://[::1]:8443/files", "ap-southeast-2"),
    ],
)
def test_signature_is_botocores(key, token, base_url, region):
    credentials = botocore.credentials.ReadOnlyCredentials("AKIDEXAMPLE", "wJalr XUtn/FEMI+K7MDENG~bPxRfiCY", token)
    when = datetime.datetime(2026, 3, 1, 23, 59, 58)
    url = f"{base_url}/{encode_key(key)}"
    expected = _botocore_authorization(url, credentials, region, when)

    path = urllib.parse.urlsplit(url).path
    signed = SigV4Signer(host_header(url), region).headers("HEAD", path, credentials, when.strftime("%Y%m%dT%H%M%SZ"))

    assert signed["authorization"] == expected["authorization"]
    for name in ("x-amz-date", "x-amz-content-sha256", "x-amz-security-token"):
        assert signed.get(name) == expected.get(name)


def test_signing_key_follows_new_secrets_and_days():
    """The derived key is cached: a rotated secret or the next day must not reuse it."""
    signer = SigV4Signer("s3.amazonaws.com", "us-east-1")
    url = "https://s3.amazonaws.com/files/a"
    for secret, when in [
        ("first", datetime.datetime(2026, 3, 1, 23, 59, 59)),
        ("first", datetime.datetime(2026, 3, 2, 0, 0, 1)),
        ("second", datetime.datetime(2026, 3, 2, 0, 0, 2)),
        ("first", datetime.datetime(2026, 3, 2, 0, 0, 3)),
    ]:
        credentials = botocore.credentials.ReadOnlyCredentials("AKID", secret, None)
        signed = signer.headers("HEAD", "/files/a", credentials, when.strftime("%Y%m%dT%H%M%SZ"))
        assert signed["authorization"] == _botocore_authorization(url, credentials, "us-east-1", when)["authorization"]


# --- where: the URL boto3's client would use --------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint_url", "region", "bucket", "config", "expected_base"),
    [
        ("http://127.0.0.1:9000", "us-east-1", "files", None, "http://127.0.0.1:9000/files"),
        (None, "eu-west-1", "files", None, "https://files.s3.eu-west-1.amazonaws.com"),
        (None, "eu-west-1", "files.with.dots", None, "https://s3.eu-west-1.amazonaws.com/files.with.dots"),
        (
            None,
            "eu-west-1",
            "files",
            botocore.config.Config(s3={"addressing_style": "path"}),
            "https://s3.eu-west-1.amazonaws.com/files",
        ),
    ],
)
def test_target_is_what_the_client_would_use(endpoint_url, region, bucket, config, expected_base):
    client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
    target = endpoint.resolve_head_target(client, bucket)
    assert (target.base_url, target.region, target.signable) == (expected_base, region, True)
    for key in SPECIAL_KEYS:
        url, _, _ = prepare_head_object(client, bucket, key)
        assert url == f"{target.base_url}/{encode_key(key)}", key


def test_boto3_takes_over_where_the_signed_head_cannot_follow(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    aws = boto3.client("s3", region_name="eu-west-1")
    assert "proxy" in object_store._why_not_signed_here(aws, endpoint.resolve_head_target(aws, "files"))
    monkeypatch.setenv("NO_PROXY", ".amazonaws.com")
    assert object_store._why_not_signed_here(aws, endpoint.resolve_head_target(aws, "files")) is None

    unsigned = boto3.client(
        "s3", region_name="eu-west-1", config=botocore.config.Config(signature_version=botocore.UNSIGNED)
    )
    assert "SigV4" in object_store._why_not_signed_here(unsigned, endpoint.resolve_head_target(unsigned, "files"))


# --- against moto --------------------------------------------------------------------------------


def test_special_keys_head_like_boto3(s3_endpoint, s3_client, bucket):
    s3_client.create_bucket(Bucket=bucket)
    for index, key in enumerate(SPECIAL_KEYS):
        s3_client.put_object(Bucket=bucket, Key=key, Body=b"x" * (index + 1))
    with ObjectStore(S3Settings(bucket, endpoint_url=s3_endpoint)) as store:
        for key in SPECIAL_KEYS:
            outcome = store.head(key)
            assert outcome.metadata == _expected_metadata(s3_client, bucket, key), key
            assert store.head(key + " missing").missing
        assert store._signed_head is not None, "the HEADs went through boto3"
        assert store.requests_sent == 2 * len(SPECIAL_KEYS)


def test_session_token_is_sent_and_accepted(s3_endpoint, s3_client, bucket, monkeypatch, fresh_aws_session):
    s3_client.create_bucket(Bucket=bucket)
    s3_client.put_object(Bucket=bucket, Key="a/b", Body=b"x")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session/token+==")
    with ObjectStore(S3Settings(bucket, endpoint_url=s3_endpoint)) as store:
        assert store.head("a/b").metadata == _expected_metadata(s3_client, bucket, "a/b")

    with _RecordingServer() as server, ObjectStore(S3Settings("files", endpoint_url=server.url)) as store:
        assert store.head("a b/c+d").metadata is not None
    (request,) = server.requests
    assert request.headers["x-amz-security-token"] == "session/token+=="
    assert "x-amz-security-token" in request.headers["authorization"]
    credentials = botocore.credentials.ReadOnlyCredentials("testing", "testing", "session/token+==")
    when = datetime.datetime.strptime(request.headers["x-amz-date"], "%Y%m%dT%H%M%SZ")
    expected = _botocore_authorization(server.url + request.path, credentials, "us-east-1", when)
    assert request.headers["authorization"] == expected["authorization"]


def test_no_credentials_is_an_access_error(s3_endpoint, bucket, monkeypatch, tmp_path, fresh_aws_session):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with (
        ObjectStore(S3Settings(bucket, endpoint_url=s3_endpoint)) as store,
        pytest.raises(S3AccessError, match="no AWS credentials were found"),
    ):
        store.head("a/b")


@pytest.fixture(scope="module")
def checking_moto():
    """A moto server that checks signatures: an IAM user's key (created while the first requests
    are still unauthenticated), and a bucket of SPECIAL_KEYS made with it."""
    saved = dict(os.environ)
    os.environ.update(
        INITIAL_NO_AUTH_ACTION_COUNT="3",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        process, endpoint = s3_server.start_s3_server()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        iam.create_user(UserName="pipeline")
        iam.put_user_policy(
            UserName="pipeline",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
            ),
        )
        access_key = iam.create_access_key(UserName="pipeline")["AccessKey"]
        key_id, secret = access_key["AccessKeyId"], access_key["SecretAccessKey"]
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key_id, aws_secret_access_key=secret
        )
        client.create_bucket(Bucket="checked-files")
        for key in SPECIAL_KEYS:
            client.put_object(Bucket="checked-files", Key=key, Body=b"x")
        yield endpoint, key_id, secret, client
    finally:
        s3_server.stop_s3_server(process)


def test_signatures_pass_a_checking_server_and_a_wrong_secret_is_an_access_error(
    checking_moto, monkeypatch, fresh_aws_session
):
    endpoint, key_id, secret, client = checking_moto
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with ObjectStore(S3Settings("checked-files", endpoint_url=endpoint)) as store:
        store.check_bucket()
        for key in SPECIAL_KEYS:
            assert store.head(key).metadata == _expected_metadata(client, "checked-files", key), key
        assert store.head("not/there").missing

    object_store._shared_session.cache_clear()
    object_store._shared_botocore_session.cache_clear()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with ObjectStore(S3Settings("checked-files", endpoint_url=endpoint)) as store:
        # A refused HEAD is its file's failure, until S3 refuses HEAD bucket too.
        refused = [store.head(key) for key in SPECIAL_KEYS[: HEAD_REFUSALS_IN_A_ROW - 1]]
        assert all(outcome.failure.startswith("S3 refused the HEAD with 403") for outcome in refused)
        with pytest.raises(S3AccessError, match=r"S3 refused 3 HEAD requests in a row .* and HEAD bucket too"):
            store.head("plain/key.txt")
        assert store.requests_sent == HEAD_REFUSALS_IN_A_ROW + 1  # a refusal is not retried


# --- faults: reported exactly as the boto3 path reported them ----------------------------------


def _outcome(proxy_url: str, bucket: str, key: str, *, through_boto3: bool, monkeypatch, **settings):
    with monkeypatch.context() as patch:
        if through_boto3:
            patch.setattr(object_store, "_why_not_signed_here", lambda client, target: "the test compares")
        with ObjectStore(S3Settings(bucket, endpoint_url=proxy_url, **settings)) as store:
            try:
                outcome = store.head(key)
            except S3AccessError as error:
                return str(error), store.requests_sent
            assert (store._signed_head is None) == through_boto3
            return outcome, store.requests_sent


@pytest.mark.parametrize(
    ("rule", "settings"),
    [
        (FaultRule("internal_error", method="HEAD"), {"max_retries": 2}),
        (FaultRule("slowdown", method="HEAD"), {"max_retries": 1}),
        (FaultRule("reset", method="HEAD"), {"max_retries": 1}),
        (FaultRule("stall", method="HEAD", stall_s=3), {"max_retries": 1, "read_timeout_s": 0.3}),
        (FaultRule("access_denied", method="HEAD"), {}),
        (FaultRule("malformed_headers", method="HEAD"), {}),
        (FaultRule("latency", method="HEAD", latency_s=0.05), {}),
    ],
    ids=lambda value: value.kind if isinstance(value, FaultRule) else "",
)
def test_faults_are_reported_as_boto3_reported_them(s3_endpoint, s3_client, bucket, monkeypatch, rule, settings):
    key = "app/0/a key+with~special ü"
    s3_client.create_bucket(Bucket=bucket)
    s3_client.put_object(Bucket=bucket, Key=key, Body=b"x")
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(rule)
        results = {
            through_boto3: _outcome(
                proxy.url, bucket, key, through_boto3=through_boto3, monkeypatch=monkeypatch, **settings
            )
            for through_boto3 in (False, True)
        }
    outcome, requests_sent = results[False]
    if rule.kind == "malformed_headers":
        # boto3 itself choked on the Last-Modified ("unparseable response: ..."); the signed path's
        # answer reaches object_metadata_from_headers, which names the bad ETag. Both are malformed.
        boto3_outcome, _ = results[True]
        assert outcome.malformed and boto3_outcome.malformed and "ETag" in outcome.failure
        return
    assert results[False] == results[True]
    if rule.kind in ("internal_error", "slowdown", "reset", "stall"):
        assert requests_sent == settings["max_retries"] + 1 and outcome.retries == settings["max_retries"]
        expected = {
            "internal_error": "S3 answered 500 after 2 retries",
            "slowdown": "S3 answered 503 after 1 retries",
            "reset": "ConnectionClosedError: ",
            "stall": "ReadTimeoutError: Read timeout on endpoint URL",
        }
        assert outcome.failure.startswith(expected[rule.kind])
    elif rule.kind == "access_denied":
        assert outcome.failure.startswith("S3 refused the HEAD with 403") and requests_sent == 1
    else:
        assert outcome.metadata == _expected_metadata(s3_client, bucket, key)


def test_an_unreachable_endpoint_is_a_network_failure_like_boto3s(bucket, monkeypatch):
    endpoint = f"http://127.0.0.1:{s3_server.free_port()}"  # nothing listens there
    results = [
        _outcome(endpoint, bucket, "a/b", through_boto3=through_boto3, monkeypatch=monkeypatch, max_retries=1)
        for through_boto3 in (False, True)
    ]
    assert results[0] == results[1]
    outcome, requests_sent = results[0]
    assert outcome.failure.startswith("EndpointConnectionError: Could not connect to the endpoint URL")
    assert requests_sent == 2


# --- connections and credentials, seen by a recording server ----------------------------------


@contextlib.contextmanager
def _server_closing_each_connection(server):
    server.close_after_answer = True
    try:
        yield
    finally:
        server.close_after_answer = False


def test_connections_are_kept_alive_and_a_closed_one_is_not_reused():
    with _RecordingServer() as server, ObjectStore(S3Settings("files", endpoint_url=server.url)) as store:
        outcomes = [store.head(f"k{i}") for i in range(20)]
        assert all(o.metadata is not None for o in outcomes)

        # The server closes the idle connection after its answer, without saying so: the next
        # request must notice before sending, not fail and be retried.
        with _server_closing_each_connection(server):
            store.head("closing")
        server.wait_until_closed(server.requests[-1].connection)
        outcome = store.head("after-close")
        assert outcome.metadata is not None and outcome.retries == 0
        assert store.requests_sent == 22
    # Which connection carried each request (counting the server's connections would also count
    # strays: a client from an earlier test whose port this server got).
    connection_of = {request.path: request.connection for request in server.requests}
    assert {connection_of[f"/files/k{i}"] for i in range(20)} == {connection_of["/files/closing"]}
    assert connection_of["/files/after-close"] != connection_of["/files/closing"]


def test_refreshed_credentials_are_used():
    """Temporary credentials (instance role, web identity...) are refreshed by botocore; a long run
    must pick up the new ones."""
    issued = iter(range(1, 100))

    def refresh():
        number = next(issued)
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)  # always due
        return {
            "access_key": f"AKID{number}",
            "secret_key": f"secret{number}",
            "token": f"token{number}",
            "expiry_time": expiry.isoformat(),
        }

    credentials = botocore.credentials.RefreshableCredentials.create_from_metadata(refresh(), refresh, "test")
    with _RecordingServer() as server:
        target = endpoint.HeadTarget(server.url + "/files", "us-east-1", "s3v4")
        signed = head.SignedHead(target, credentials, max_connections=2, connect_timeout_s=1, read_timeout_s=1)
        with mock.patch.object(head, "_CREDENTIALS_REUSE_S", 0.0):
            signed.head_object(Key="a")
            signed.head_object(Key="b")
        signed.close()
    first, second = server.requests
    assert first.headers["x-amz-security-token"] != second.headers["x-amz-security-token"]
    assert "Credential=AKID" in second.headers["authorization"]
    assert first.headers["authorization"].split("/")[0] != second.headers["authorization"].split("/")[0]


def _self_signed_certificate(directory, name: str) -> tuple[str, str]:
    """A certificate for 127.0.0.1 that is its own CA, and its key: (certificate path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certificate_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(certificate_path), str(key_path)


def test_https_is_verified_with_the_ca_bundle_boto3_uses(tmp_path, monkeypatch, fresh_aws_session):
    certificate, key = _self_signed_certificate(tmp_path, "server")
    stranger, _ = _self_signed_certificate(tmp_path, "stranger")
    with _RecordingServer(tls=(certificate, key)) as server:
        monkeypatch.setenv("AWS_CA_BUNDLE", certificate)
        with ObjectStore(S3Settings("files", endpoint_url=server.url)) as store:
            assert store.head("a b/c").metadata is not None
            assert store._signed_head is not None and server.url.startswith("https://")

        object_store._shared_session.cache_clear()
        object_store._shared_botocore_session.cache_clear()
        monkeypatch.setenv("AWS_CA_BUNDLE", stranger)
        results = [
            _outcome(server.url, "files", "a b/c", through_boto3=through_boto3, monkeypatch=monkeypatch, max_retries=0)
            for through_boto3 in (False, True)
        ]
    for outcome, _ in results:
        assert outcome.failure.startswith(f"SSLError: SSL validation failed for {server.url}/files/a%20b/c")
        assert "CERTIFICATE_VERIFY_FAILED" in outcome.failure


class _Request:
    def __init__(self, path: str, headers: dict[str, str], connection: int):
        self.path, self.headers, self.connection = path, headers, connection


class _RecordingServer:
    """Answers every HEAD with an object's headers (and a Content-Length, but no body, as S3 does),
    keeps connections alive unless told otherwise, and records requests and connections."""

    def __init__(self, tls: tuple[str, str] | None = None):
        self.requests: list[_Request] = []
        self.connections = 0
        self.closed: set[int] = set()  # numbers of the connections the server has shut down
        self._numbers: dict = {}  # socket -> its connection number
        self.close_after_answer = False
        self._lock = threading.Condition()
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with recorder._lock:
                    recorder.connections += 1
                    self.connection_number = recorder.connections
                    recorder._numbers[self.request] = self.connection_number  # for shutdown_request

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                close = recorder.close_after_answer  # read before answering: the test resets it after
                with recorder._lock:
                    recorder.requests.append(
                        _Request(self.path, {k.lower(): v for k, v in self.headers.items()}, self.connection_number)
                    )
                self.send_response(200)
                self.send_header("ETag", '"0cc175b9c0f1b6a831c399e269772661"')
                self.send_header("Last-Modified", "Tue, 03 Mar 2026 10:00:00 GMT")
                self.send_header("Content-Length", "5")
                self.end_headers()
                self.close_connection = close

        class Server(http.server.ThreadingHTTPServer):
            def shutdown_request(self, request):
                super().shutdown_request(request)  # the socket is closed only now: the client sees it
                with recorder._lock:
                    recorder.closed.add(recorder._numbers.pop(request, 0))
                    recorder._lock.notify_all()

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    def wait_until_closed(self, connection: int) -> None:
        with self._lock:
            assert self._lock.wait_for(lambda: connection in self.closed, timeout=5)

    def __enter__(self) -> "_RecordingServer":
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_a_stopped_store_sends_none_of_its_queued_heads_and_settles_every_one(s3_endpoint, s3_client, bucket):
    s3_client.create_bucket(Bucket=bucket)
    s3_client.put_object(Bucket=bucket, Key="object", Body=b"payload")
    proxy = FaultProxy(s3_endpoint).start()
    try:
        with ObjectStore(S3Settings(bucket, endpoint_url=proxy.url, max_in_flight=2)) as store:
            store.check_bucket()
            proxy.add_rule(FaultRule("latency", method="HEAD", latency_s=3))
            pending = [store.submit_head("object") for _ in range(20)]
            deadline = time.monotonic() + 5
            while proxy.stats()["requests"] < 1 + 2:  # HEAD bucket, then one HEAD per thread
                assert time.monotonic() < deadline, "the HEADs were not sent"
                time.sleep(0.01)
            store.stop()  # while both threads wait out their HEAD's latency
            for head in pending[2:]:
                with pytest.raises(object_store.StoreStopped):
                    head.result(timeout=5)
            assert all(head.result(timeout=10).metadata is not None for head in pending[:2])  # on the wire
            assert proxy.stats()["requests"] == 1 + 2
        with pytest.raises(object_store.StoreStopped):
            store.submit_head("object").result(timeout=1)  # a closed store sends nothing
    finally:
        proxy.stop()
