"""One bucket, read with HEAD object and ListObjectsV2: retries, throttling, and every answer turned
into metadata, a miss, a failure or a stop."""

import dataclasses
import datetime
import functools
import logging
import os
import queue
import re
import threading
import urllib.parse
from collections.abc import Sequence

import boto3
import botocore.config
import botocore.exceptions
import botocore.session
import botocore.utils

from s3_attrs_pipeline.s3.endpoint import resolve_head_target
from s3_attrs_pipeline.s3.head import SignedHead
from s3_attrs_pipeline.s3.listing import ListedObject, ListPage, SignedListing
from s3_attrs_pipeline.s3.object_metadata import MalformedObjectMetadata, ObjectMetadata, object_metadata_from_headers
from s3_attrs_pipeline.s3.rate_limit import AdaptiveRateLimiter, backoff_delay
from s3_attrs_pipeline.settings import setting

logger = logging.getLogger(__name__)

_EXPIRED_CREDENTIALS = (
    "the session credentials expired: refresh them (e.g. `aws sso login`, or assume the role again) "
    "and rerun the failed partitions"
)
_WRONG_KEY = (
    "the access key id or its secret is wrong: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
    "(or the profile) and rerun the failed partitions"
)
_WRONG_REGION = "the request went to another region than the bucket's: set AWS_REGION to the bucket's region"
_NOT_ALLOWED = (
    "the IAM policy must allow s3:GetObject on the bucket's objects and s3:ListBucket on the bucket "
    "(README, Least privilege)"
)
# What to do about an answer that every further request would get too, so that asking further is
# futile, by S3's error code; a HEAD answer has no body to name one, and its code is the bare status.
REFUSAL_ADVICE = {
    "ExpiredToken": _EXPIRED_CREDENTIALS,
    "TokenRefreshRequired": _EXPIRED_CREDENTIALS,
    "InvalidToken": _EXPIRED_CREDENTIALS,
    "400": (
        "S3 names no reason (an answer to a HEAD has no body), and the usual cause is that "
        + _EXPIRED_CREDENTIALS
        + "; if they are fresh, check that AWS_REGION is the bucket's region"
    ),
    "InvalidAccessKeyId": _WRONG_KEY,
    "SignatureDoesNotMatch": _WRONG_KEY,
    "RequestTimeTooSkewed": (
        "this machine's clock differs from S3's by more than 15 minutes: fix the clock (NTP) and rerun the failed "
        "partitions"
    ),
    "AuthorizationHeaderMalformed": _WRONG_REGION,
    "PermanentRedirect": _WRONG_REGION,
    "IllegalLocationConstraint": _WRONG_REGION,
    "301": _WRONG_REGION,
    "AccessDenied": _NOT_ALLOWED,
    "403": (
        "S3 names no reason (an answer to a HEAD has no body): " + _NOT_ALLOWED + "; or else the access key id or "
        "its secret is wrong, or this machine's clock is more than 15 minutes off"
    ),
    "AllAccessDisabled": "all access to this bucket has been disabled: ask its owner (or AWS support)",
    "NoSuchBucket": "the bucket does not exist: check INSTANT_S3_BUCKET (and AWS_ENDPOINT_URL)",
}
# A single object may refuse a HEAD on its own (an object encrypted with a customer-provided key
# answers 400 to a HEAD without that key; an object's ACL or a bucket policy's condition, 403): that
# file's failure. This many refusals in a row make the store ask HEAD bucket whether S3 refuses the
# bucket too (expired or wrong credentials, a skewed clock): then every request would be refused, and
# the run stops.
HEAD_REFUSALS_IN_A_ROW = 3
# Refusals in a row for objects of this many apps, while the bucket answers, are a policy that does
# not allow s3:GetObject at all: a stop too.
REFUSED_APPS_IN_A_ROW = 3
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
# A HEAD error has no body, so its code is the bare status.
_THROTTLING_CODES = {"503", "SlowDown", "429", "Throttling", "ThrottlingException", "RequestLimitExceeded"}
_RETRYABLE_CODES = _THROTTLING_CODES | {"500", "502", "504", "InternalError", "ServiceUnavailable", "RequestTimeout"}
_NETWORK_ERRORS = (
    botocore.exceptions.ConnectionError,  # resets, refused, endpoint unreachable, connect timeouts
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.IncompleteReadError,
)


_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")


def validate_bucket_name(bucket: str | None) -> str:
    if not bucket:
        raise ValueError("INSTANT_S3_BUCKET is not set: give the name of the bucket holding InstantDB's files")
    if not _BUCKET_NAME.fullmatch(bucket):
        raise ValueError(f"INSTANT_S3_BUCKET={bucket!r} is not a valid S3 bucket name")
    return bucket


class S3AccessError(RuntimeError):
    """The bucket cannot be read at all (access denied, no such bucket, no credentials)."""


class S3Refused(S3AccessError):
    """S3 refused a request as it would refuse every other: expired or wrong credentials, a skewed
    clock, a wrong region, a policy that does not allow it. `code` is S3's error code, or the bare
    status of an answer without a body (HEAD)."""

    def __init__(self, what: str, code: str, *, advice: str | None = None):
        self.code = code
        self.advice = advice or REFUSAL_ADVICE.get(code) or "S3's message says why"
        super().__init__(f"{what}: {self.advice}")


def _refused(error: Exception) -> bool:
    """Whether S3's answer is a refusal that every further request would get: a code of
    REFUSAL_ADVICE, or any 400 (S3 answers a request signed with expired credentials so)."""
    if not isinstance(error, botocore.exceptions.ClientError):
        return False
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return _error_code(error) in REFUSAL_ADVICE or status == 400


def _said(error: botocore.exceptions.ClientError) -> str:
    """S3's message, where its answer had a body to hold one, to follow what it was asked."""
    code, message = _error_code(error), error.response.get("Error", {}).get("Message")
    return f" ({message!r})" if message and not code.isdigit() else ""


class ListingFailed(RuntimeError):
    """A listing request still failed after its retries (or S3 sent a page that cannot be parsed)."""


class StoreStopped(RuntimeError):
    """The store was stopped (its run is stopping): no further request is sent."""


class PendingHead:
    """A HEAD handed to the store's threads: `result()` waits for its HeadOutcome.

    What a concurrent.futures.Future gives a HEAD, for a fifth of its cost: a Future makes a
    Condition (and its RLock) and ThreadPoolExecutor.submit a work item and a semaphore check, 8% of
    a production-shaped run's samples; this is one lock, held until the outcome is set."""

    __slots__ = ("key", "_outcome", "_error", "_done", "cancelled")

    def __init__(self, key: str):
        self.key = key
        self._outcome: HeadOutcome | None = None
        self._error: BaseException | None = None
        self.cancelled = False
        self._done = threading.Lock()
        self._done.acquire()

    def result(self, timeout: float | None = None) -> "HeadOutcome":
        """The outcome, or the error the HEAD raised; TimeoutError if it is not done within `timeout`."""
        if not self._done.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(f"HEAD {self.key} is not done yet")
        self._done.release()
        if self._error is not None:
            raise self._error
        return self._outcome

    def cancel(self) -> None:
        """Not sent if it has not been yet: its result is then StoreStopped."""
        self.cancelled = True

    def _settle(self, outcome: "HeadOutcome | None", error: BaseException | None) -> None:
        self._outcome, self._error = outcome, error
        self._done.release()


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """The bucket and how hard to ask it."""

    bucket: str = setting(help="Name of the bucket (INSTANT_S3_BUCKET).", config=None)
    endpoint_url: str | None = setting(
        None, help="S3 endpoint for S3-compatible stores; unset means AWS (or AWS_ENDPOINT_URL).", config=None
    )
    region_name: str | None = setting(None, help="AWS region; unset means the AWS chain's default.", config=None)
    max_in_flight: int = setting(
        64,
        help="S3 requests in flight at once, per run: shared by the partitions it works at once (partitions_at_once).",
        config=None,
    )
    max_retries: int = setting(3, help="Retries of a throttled, 5xx or network-failed request.", config=None)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 20.0


@dataclasses.dataclass(frozen=True)
class HeadOutcome:
    """What one HEAD found: metadata, a missing object, or why it failed after its retries."""

    key: str
    metadata: ObjectMetadata | None = None
    missing: bool = False
    failure: str | None = None
    malformed: bool = False
    retries: int = 0
    throttled: int = 0  # answers of S3 that told this request to slow down


@dataclasses.dataclass(frozen=True)
class _Answer:
    """A request's last answer: the response, or the error once retrying is futile or spent."""

    response: object | None
    error: Exception | None
    retries: int
    throttled: int


def _error_code(error: botocore.exceptions.ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _failure(error: Exception) -> str:
    """What went wrong with a request whose retries are spent, for a log line."""
    if isinstance(error, botocore.exceptions.ClientError):
        return f"S3 answered {_error_code(error) or 'an error'}"
    return f"{type(error).__name__}: {error}"


@functools.cache
def _shared_botocore_session() -> botocore.session.Session:
    # Its loader caches the parsed service models: a client per partition then costs milliseconds.
    return botocore.session.get_session()


@functools.cache
def _shared_session() -> boto3.session.Session:
    return boto3.session.Session(botocore_session=_shared_botocore_session())


def _tls_verification() -> bool | str:
    """What botocore verifies https endpoints with: AWS_CA_BUNDLE or ca_bundle, else REQUESTS_CA_BUNDLE,
    else True (its default bundle)."""
    return _shared_botocore_session().get_config_variable("ca_bundle") or os.environ.get("REQUESTS_CA_BUNDLE", True)


def _iso_text(instant: datetime.datetime | None) -> str | None:
    return instant.isoformat() if instant is not None else None


def _boto3_list_page(client, bucket: str, **params) -> ListPage:
    """SignedListing's answer, from boto3's list_objects_v2 (where the signed one cannot be sent)."""
    response = client.list_objects_v2(Bucket=bucket, **params)
    objects = [
        ListedObject(entry["Key"], entry.get("ETag"), _iso_text(entry.get("LastModified")))
        for entry in response.get("Contents", [])
    ]
    return ListPage.of(objects, bool(response.get("IsTruncated")), response.get("NextContinuationToken"))


def _why_not_signed_here(client, target) -> str | None:
    """Why the signed requests cannot send what the client would, if they cannot: they speak SigV4
    straight to the endpoint, with server-verified TLS only."""
    if not target.signable:
        return f"the client signs with {target.signature_version!r}, not SigV4"
    config = client.meta.config
    proxies = config.proxies or botocore.utils.get_environ_proxies(client.meta.endpoint_url)
    if proxies.get(urllib.parse.urlsplit(target.base_url).scheme):
        return "an HTTP proxy is configured"
    if config.client_cert:
        return "a TLS client certificate is configured"
    return None


class ObjectStore:
    """One bucket, HEADed with at most `max_in_flight` requests at once.

    Retries are this class's own, not botocore's: throttling (503, SlowDown), other 5xx, resets
    and timeouts are retried `max_retries` times with exponential backoff and full jitter, and
    every throttle slows the whole store down through one AdaptiveRateLimiter.

    HEAD object, the one request per file, goes through SignedHead (head.py): the request
    boto3 would send, built at a tenth of the CPU; ListObjectsV2 through SignedListing
    (listing.py), parsed at a sixth of boto3's. HEAD bucket, once per store, stays on the
    boto3 client. `requests_sent` counts the attempts of every kind, retries included.
    """

    def __init__(self, settings: S3Settings):
        self.settings = settings
        config = botocore.config.Config(
            max_pool_connections=settings.max_in_flight,
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.read_timeout_s,
            retries={"mode": "standard", "total_max_attempts": 1},
        )
        self._client = _shared_session().client(
            "s3", endpoint_url=settings.endpoint_url, region_name=settings.region_name, config=config
        )
        self._heads: queue.SimpleQueue[PendingHead | None] = queue.SimpleQueue()
        self._head_threads: list[threading.Thread] = []
        self._closed = False
        self.rate_limiter = AdaptiveRateLimiter()
        self.requests_sent = 0
        self._requests_sent_lock = threading.Lock()
        # Set up at the first HEAD, after check_bucket: a region redirect it followed is known by then.
        self._head_object = None
        self._list_objects = None
        self._request_setup_lock = threading.Lock()
        self._signed_head: SignedHead | None = None
        self._signed_listing: SignedListing | None = None
        self._access_error: S3AccessError | None = None  # once S3 refuses us, queued HEADs are not sent
        self._refused_in_a_row = 0  # HEADs S3 refused since it last answered one otherwise
        self._refused_apps: set[str] = set()  # the apps of their objects
        self._head_refusals_lock = threading.Lock()
        self._bucket_checked = False
        self._stopped = threading.Event()

    def stop(self) -> None:
        """Send no further request: the queued HEADs are dropped, a request between its retries gives
        up, and each call raises StoreStopped. Requests on the wire end by themselves."""
        self._stopped.set()  # the HEAD threads settle what is queued with StoreStopped

    def close(self) -> None:
        # A stopped run does not wait for requests on the wire: their answers are not wanted.
        self._end_head_threads(wait=not self._stopped.is_set())
        if self._signed_head is not None:
            self._signed_head.close()
        if self._signed_listing is not None:
            self._signed_listing.close()
        self._client.close()

    def __enter__(self) -> "ObjectStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _request(self, operation, **params) -> _Answer:
        """The response, or the last error once retrying is futile or spent. Errors other than S3's
        answers and network faults propagate; StoreStopped once the store is stopped."""
        retries = throttled = 0
        while True:
            if self._stopped.is_set() or not self.rate_limiter.acquire(self._stopped):
                raise StoreStopped("the store was stopped: its run is stopping")
            with self._requests_sent_lock:
                self.requests_sent += 1
            try:
                response = operation(**params)
            except botocore.exceptions.ClientError as error:
                code = _error_code(error)
                if code in _THROTTLING_CODES:
                    self.rate_limiter.throttled()
                    throttled += 1
                last_error, retryable = error, code in _RETRYABLE_CODES
            except _NETWORK_ERRORS as error:
                last_error, retryable = error, True
            else:
                self.rate_limiter.succeeded()
                return _Answer(response, None, retries, throttled)
            if not retryable or retries >= self.settings.max_retries:
                return _Answer(None, last_error, retries, throttled)
            retries += 1
            self._stopped.wait(backoff_delay(retries))

    def check_bucket(self) -> None:
        """Fail fast, before any file is read, if the bucket is missing or unreadable. Asked once per
        store: a store that backfills many partitions pays one HEAD bucket, and access lost later
        shows on the next object request as an S3AccessError all the same."""
        if self._bucket_checked:
            return
        self._head_bucket()
        self._bucket_checked = True

    def _head_bucket(self) -> None:
        """HEAD bucket: returns if S3 answers it, else raises what it means."""
        bucket = self.settings.bucket
        try:
            answer = self._request(self._client.head_bucket, Bucket=bucket)
        except botocore.exceptions.NoCredentialsError:
            raise S3AccessError("no AWS credentials were found (environment, config files or instance role)") from None
        error, retries = answer.error, answer.retries
        if error is None:
            return
        code = _error_code(error) if isinstance(error, botocore.exceptions.ClientError) else type(error).__name__
        if code in _MISSING_CODES or code == "NoSuchBucket":
            raise S3AccessError(f"S3 bucket {bucket!r} does not exist (HEAD bucket answered {code})")
        if _refused(error):
            raise S3Refused(f"S3 bucket {bucket!r} cannot be read: HEAD bucket answered {code}{_said(error)}", code)
        raise S3AccessError(f"S3 bucket {bucket!r} did not answer HEAD bucket after {retries} retries: {code}")

    def _set_up_requests(self) -> None:
        """HEAD object and ListObjectsV2 for this bucket: hand-signed, or boto3's own where that could
        not send what boto3 would (a proxy, a client certificate, a signature other than SigV4)."""
        with self._request_setup_lock:
            if self._head_object is not None:
                return
            target = resolve_head_target(self._client, self.settings.bucket)
            reason = _why_not_signed_here(self._client, target)
            if reason is not None:
                logger.warning("S3 requests go through boto3, several times slower: %s", reason)
                self._list_objects = functools.partial(_boto3_list_page, self._client, self.settings.bucket)
                self._head_object = functools.partial(self._client.head_object, Bucket=self.settings.bucket)
                return
            credentials = _shared_session().get_credentials()  # the client's own: one botocore session
            connection = {
                "connect_timeout_s": self.settings.connect_timeout_s,
                "read_timeout_s": self.settings.read_timeout_s,
                "verify": _tls_verification(),
            }
            self._signed_listing = SignedListing(target, credentials, **connection)
            self._signed_head = SignedHead(
                target, credentials, max_connections=self.settings.max_in_flight, **connection
            )
            self._list_objects = self._signed_listing.list_objects_v2
            self._head_object = self._signed_head.head_object

    def _head_operation(self):
        if self._head_object is None:
            self._set_up_requests()
        return self._head_object

    def _list_operation(self):
        if self._list_objects is None:
            self._set_up_requests()
        return self._list_objects

    def list_page(self, prefix: str, page_size: int, continuation: str | None = None) -> ListPage:
        """One page of ListObjectsV2 under `prefix`. S3AccessError if S3 refuses to list the bucket;
        ListingFailed once the retries are spent or if the page cannot be parsed."""
        params = {"Prefix": prefix, "MaxKeys": page_size}
        if continuation:
            params["ContinuationToken"] = continuation
        where = f"s3://{self.settings.bucket}/{prefix}"
        try:
            answer = self._request(self._list_operation(), **params)
        except ValueError as unparseable:
            raise ListingFailed(f"listing {where} sent an unparseable page: {unparseable}") from None
        error = answer.error
        if error is None:
            return dataclasses.replace(answer.response, retries=answer.retries, throttled=answer.throttled)
        if _refused(error):
            raise S3Refused(f"S3 answered {_error_code(error)} to listing {where}{_said(error)}", _error_code(error))
        raise ListingFailed(f"listing {where} failed after {answer.retries} retries: {_failure(error)}")

    def head(self, key: str) -> HeadOutcome:
        """What a HEAD of `key` finds. S3Refused when S3 refuses it as it would refuse every request
        (see HEAD_REFUSALS_IN_A_ROW); a refusal of this object alone is its failure."""
        try:
            answer = self._request(self._head_operation(), Key=key)
        except botocore.exceptions.NoCredentialsError:
            raise S3AccessError("no AWS credentials were found (environment, config files or instance role)") from None
        except ValueError as error:
            # boto3's head_object (the fallback) could not parse a header (a Last-Modified that is no date).
            return HeadOutcome(key, failure=f"unparseable response: {error}", malformed=True)
        error, retries, throttled = answer.error, answer.retries, answer.throttled
        if error is not None and _refused(error):
            return self._refused_head(key, _error_code(error), retries, throttled)
        if error is None or isinstance(error, botocore.exceptions.ClientError):  # S3 answered, not refusing
            with self._head_refusals_lock:
                self._refused_in_a_row, self._refused_apps = 0, set()
        if error is None:
            try:
                metadata = object_metadata_from_headers(answer.response["ResponseMetadata"].get("HTTPHeaders", {}))
            except MalformedObjectMetadata as malformed:
                return HeadOutcome(key, failure=str(malformed), malformed=True, retries=retries, throttled=throttled)
            return HeadOutcome(key, metadata=metadata, retries=retries, throttled=throttled)
        if isinstance(error, botocore.exceptions.ClientError) and _error_code(error) in _MISSING_CODES:
            return HeadOutcome(key, missing=True, retries=retries, throttled=throttled)
        suffix = f" after {retries} retries" if retries else ""
        return HeadOutcome(key, failure=_failure(error) + suffix, retries=retries, throttled=throttled)

    def _refused_head(self, key: str, code: str, retries: int, throttled: int) -> HeadOutcome:
        """A HEAD S3 refused: that file's failure, unless S3 refuses the bucket too, or refuses the
        objects of REFUSED_APPS_IN_A_ROW apps in a row: then S3Refused."""
        with self._head_refusals_lock:
            self._refused_in_a_row += 1
            self._refused_apps.add(key.split("/", 1)[0])
            in_a_row, apps = self._refused_in_a_row, len(self._refused_apps)
        where = f"s3://{self.settings.bucket}/{key}"
        if in_a_row % HEAD_REFUSALS_IN_A_ROW == 0:
            try:
                self._head_bucket()
            except S3Refused as refused:
                raise S3Refused(
                    f"S3 refused {in_a_row} HEAD requests in a row (the last, for {where}, with {code}) and "
                    f"HEAD bucket too (with {refused.code})",
                    refused.code,
                ) from None
        if apps >= REFUSED_APPS_IN_A_ROW:
            raise S3Refused(
                f"S3 refused HEAD object for {in_a_row} objects of {apps} apps in a row (the last, for {where}, "
                f"with {code}) while it answers HEAD bucket",
                code,
                advice=_NOT_ALLOWED,
            )
        return HeadOutcome(
            key,
            failure=f"S3 refused the HEAD with {code} (a HEAD answer names no reason)",
            retries=retries,
            throttled=throttled,
        )

    def submit_head(self, key: str) -> PendingHead:
        """HEAD `key` on the store's threads, `max_in_flight` of them; the result is its HeadOutcome."""
        head = PendingHead(key)
        if self._closed:
            head._settle(None, StoreStopped("the store is closed"))
            return head
        if not self._head_threads:
            self._start_head_threads()
        self._heads.put(head)
        return head

    def _start_head_threads(self) -> None:
        with self._request_setup_lock:
            if self._head_threads:
                return
            threads = [
                threading.Thread(target=self._head_thread, name=f"s3-head-{n}", daemon=True)
                for n in range(self.settings.max_in_flight)
            ]
            for thread in threads:
                thread.start()
            self._head_threads = threads

    def _head_thread(self) -> None:
        while (head := self._heads.get()) is not None:
            if head.cancelled or self._stopped.is_set() or self._closed:  # closing sends nothing queued
                head._settle(None, StoreStopped("the store was stopped: its run is stopping"))
                continue
            try:
                outcome = self._head_unless_refused(head.key)
            except BaseException as error:  # the caller's result() raises it
                head._settle(None, error)
            else:
                head._settle(outcome, None)

    def _end_head_threads(self, *, wait: bool) -> None:
        """The threads end once they have settled the HEADs queued before (StoreStopped once stopped)."""
        self._closed = True
        for _ in self._head_threads:
            self._heads.put(None)
        if wait:
            for thread in self._head_threads:
                thread.join()

    def _head_unless_refused(self, key: str) -> HeadOutcome:
        if self._access_error is not None:
            raise self._access_error
        try:
            return self.head(key)
        except S3AccessError as error:
            self._access_error = error
            raise

    def head_many(self, keys: Sequence[str]) -> list[HeadOutcome]:
        """HEAD every key, `max_in_flight` at a time; outcomes in the order of `keys`. An S3AccessError
        cancels the requests not yet sent."""
        pending = [self.submit_head(key) for key in keys]
        try:
            return [head.result() for head in pending]
        except S3AccessError:
            for head in pending:
                head.cancel()
            raise
