"""List a key prefix (ListObjectsV2, 1,000 keys a request) and read each object's metadata from it.

A listing gives the same ETag as a HEAD. Its LastModified (ISO 8601) may carry milliseconds that a
HEAD's Last-Modified (an HTTP date) cannot, so it is cut to whole seconds: `lastModified` must not
depend on which way it was read. A LastModified that is no time makes that one file malformed.

The request is a hand-signed GET, its XML read with ElementTree.

boto3 spends ~130 µs of CPU per listed key: its XML parser walks the response shape member by
member, and dateutil parses every LastModified. Over a listing of millions of keys that is minutes
of CPU in the process that also writes the triples. This reads a page at ~20 µs a key: the same
request (SigV4 from `sigv4`, to the URL and region the store's boto3 client would use), its
answer parsed with the C parser behind ElementTree, LastModified kept as the text S3 sent.

Answers follow boto3's contract where the store's retry loop and error mapping look at them: a
non-2xx answer raises botocore's ClientError with S3's error code (the bare status when the body
names none), network faults raise botocore's exceptions. An answer that is not a listing raises
ValueError, as botocore's parser does.
"""

import dataclasses
import datetime
import queue
import threading
import urllib.parse
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import botocore.exceptions
import urllib3

from s3_attrs_pipeline.s3.endpoint import HeadTarget, tls_context
from s3_attrs_pipeline.s3.object_metadata import MalformedObjectMetadata, ObjectMetadata, parse_etag
from s3_attrs_pipeline.s3.sigv4 import SigV4Signer, canonical_query, host_header

LIST_PAGE_SIZE = 1000  # S3's maximum
STOP_POLL_S = 0.2  # how often a consumer waiting for a prefetched page is asked whether to go on
_USER_AGENT = "s3-attrs-pipeline (signed ListObjectsV2)"


@dataclasses.dataclass(frozen=True)
class ListedObject:
    key: str
    etag: str | None
    last_modified: str | None  # ISO 8601, as the listing gives it: 2024-05-01T12:00:00.000Z


@dataclasses.dataclass(frozen=True)
class ListPage:
    objects: list[ListedObject]
    continuation: str | None  # the token of the next page; None on the last one
    retries: int = 0  # of the request that got it
    throttled: int = 0  # answers of S3 that told that request to slow down

    @classmethod
    def of(cls, objects: list[ListedObject], truncated: bool, next_token: str | None) -> "ListPage":
        """The page as a ListObjectsV2 answer describes it (ValueError if it says more follows but not
        how to ask for it)."""
        if truncated and not next_token:
            raise ValueError("the listing is truncated but gives no NextContinuationToken")
        return cls(objects, next_token if truncated else None)


def _decoded(value: str | None, url_encoded: bool) -> str | None:
    # encoding-type=url: S3 escapes keys as a form would (botocore decodes them the same way).
    return urllib.parse.unquote_plus(value) if url_encoded and value is not None else value


def parse_list_objects_v2(body: bytes) -> ListPage:
    """The objects and next continuation token of a ListObjectsV2 answer (ValueError if it is none)."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as error:
        raise ValueError(f"the listing is not XML: {error}") from None
    namespace = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    if root.tag != f"{namespace}ListBucketResult":
        raise ValueError(f"the answer is a {root.tag!r}, not a ListBucketResult")
    url_encoded = root.findtext(f"{namespace}EncodingType") == "url"
    objects = []
    for entry in root.iterfind(f"{namespace}Contents"):
        key = _decoded(entry.findtext(f"{namespace}Key"), url_encoded)
        if not key:
            raise ValueError("the listing has an entry without a Key")
        objects.append(
            ListedObject(key, entry.findtext(f"{namespace}ETag"), entry.findtext(f"{namespace}LastModified"))
        )
    truncated = root.findtext(f"{namespace}IsTruncated") == "true"
    return ListPage.of(objects, truncated, root.findtext(f"{namespace}NextContinuationToken"))


def _client_error(status: int, reason: str, headers: dict, body: bytes) -> botocore.exceptions.ClientError:
    """The ClientError botocore raises for an S3 error answer: the code and message from its XML body,
    else the bare status."""
    code, message = str(status), reason
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        root = None
    if root is not None:
        code = root.findtext("Code") or code
        message = root.findtext("Message") or message
    error = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers},
    }
    return botocore.exceptions.ClientError(error, "ListObjectsV2")


class SignedListing:
    """`list_objects_v2` for one bucket, hand-signed. Thread-safe."""

    def __init__(
        self,
        target: HeadTarget,
        credentials,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        verify: bool | str = True,
    ):
        parts = urllib.parse.urlsplit(target.base_url)
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._path = parts.path or "/"  # path style: /<bucket>; virtual-hosted: /
        self._credentials = credentials
        self._signer = SigV4Signer(host_header(target.base_url), target.region)
        self._http = urllib3.PoolManager(
            num_pools=1,
            maxsize=2,  # a listing is sequential; a second connection covers a prefetch overlap
            retries=False,  # the store's own retry loop decides
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            ssl_context=tls_context(verify) if parts.scheme == "https" else None,
        )

    def close(self) -> None:
        self._http.clear()

    # boto3's parameter names, so that the store calls either the same way
    def list_objects_v2(
        self,
        Prefix: str,
        MaxKeys: int,
        ContinuationToken: str | None = None,  # noqa: N803
    ) -> ListPage:
        if self._credentials is None:
            raise botocore.exceptions.NoCredentialsError()
        params = {"list-type": "2", "prefix": Prefix, "max-keys": str(MaxKeys), "encoding-type": "url"}
        if ContinuationToken:
            params["continuation-token"] = ContinuationToken
        query = canonical_query(params)
        headers = self._signer.headers("GET", self._path, self._credentials.get_frozen_credentials(), query=query)
        headers["user-agent"] = _USER_AGENT
        url = f"{self._origin}{self._path}?{query}"
        response = self._get(url, headers)
        if response.status >= 300:
            raise _client_error(response.status, response.reason or "", dict(response.headers), response.data)
        return parse_list_objects_v2(response.data)

    def _get(self, url: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        """The whole answer; network faults as botocore's URLLib3Session reports them."""
        try:
            return self._http.request("GET", url, headers=headers, redirect=False)
        except urllib3.exceptions.SSLError as error:
            raise botocore.exceptions.SSLError(endpoint_url=url, error=error) from error
        except urllib3.exceptions.NewConnectionError as error:
            raise botocore.exceptions.EndpointConnectionError(endpoint_url=url, error=error) from error
        except urllib3.exceptions.ConnectTimeoutError as error:
            raise botocore.exceptions.ConnectTimeoutError(endpoint_url=url, error=error) from error
        except urllib3.exceptions.ReadTimeoutError as error:
            raise botocore.exceptions.ReadTimeoutError(endpoint_url=url, error=error) from error
        except urllib3.exceptions.ProtocolError as error:  # resets, connections closed mid-answer
            raise botocore.exceptions.ConnectionClosedError(endpoint_url=url, error=error) from error


class PageSource(Protocol):
    """What lists a bucket a page at a time: the ObjectStore, with its retries and error mapping."""

    def list_page(self, prefix: str, page_size: int, continuation: str | None = None) -> ListPage: ...


_Page = TypeVar("_Page")


def metadata_of(listed: ListedObject) -> ObjectMetadata:
    if listed.last_modified is None:
        raise MalformedObjectMetadata("the listing gives no LastModified")
    try:
        instant = datetime.datetime.fromisoformat(listed.last_modified)
    except ValueError:
        raise MalformedObjectMetadata(f"LastModified {listed.last_modified[:80]!r} is not an ISO 8601 time") from None
    if instant.tzinfo is None:
        raise MalformedObjectMetadata(f"LastModified {listed.last_modified[:80]!r} has no time zone")
    seconds = int(instant.timestamp() // 1)
    if seconds <= 0:
        raise MalformedObjectMetadata(f"LastModified {listed.last_modified[:80]!r} is not after 1970")
    return ObjectMetadata(parse_etag(listed.etag), seconds * 1000)


def list_prefix(store: PageSource, prefix: str) -> Iterator[ListPage]:
    """Every object under `prefix`, a page at a time, in key order."""
    continuation = None
    while True:
        page = store.list_page(prefix, LIST_PAGE_SIZE, continuation)
        yield page
        continuation = page.continuation
        if continuation is None:
            return


def prefetched(pages: Iterator[_Page], depth: int = 2, *, check: Callable[[], None] = lambda: None) -> Iterator[_Page]:
    """`pages`, produced by a thread that stays up to `depth` pages ahead of the consumer, so that
    S3 answers the next page while the caller writes this one. An error in the producer is raised
    to the consumer; a consumer that stops early stops the producer. While the consumer waits for a
    page, `check()` is called every STOP_POLL_S: what it raises ends the wait."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stopped = threading.Event()
    end = object()

    def offer(item) -> bool:
        while not stopped.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for page in pages:
                if not offer(page):
                    return
        except BaseException as error:  # handed to the consumer, which raises it
            offer(error)
            return
        offer(end)

    producer = threading.Thread(target=produce, name="s3-list", daemon=True)
    producer.start()
    try:
        while True:
            try:
                item = handoff.get(timeout=STOP_POLL_S)
            except queue.Empty:
                check()
                continue
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stopped.set()
        # A producer inside a slow request ends on its own once that request returns.
        producer.join(timeout=1.0)
