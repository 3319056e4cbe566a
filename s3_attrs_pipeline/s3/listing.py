"""List a key prefix (ListObjectsV2, 1,000 keys a request) and read each object's metadata from it.

A listing gives the same ETag as a HEAD. Its LastModified (ISO 8601) may carry milliseconds that a
HEAD's Last-Modified (an HTTP date) cannot, so it is cut to whole seconds: `lastModified` must not
depend on which way it was read. A LastModified that is no time makes that one file malformed.
"""

import datetime
import queue
import threading
from collections.abc import Iterator

from s3_attrs_pipeline.s3.object_metadata import MalformedObjectMetadata, ObjectMetadata, ObjectStore, parse_etag
from s3_attrs_pipeline.s3.signed_listing import ListedObject

LIST_PAGE_SIZE = 1000  # S3's maximum


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


def list_prefix(store: ObjectStore, prefix: str) -> Iterator[list[ListedObject]]:
    """Every object under `prefix`, a page at a time, in key order."""
    continuation = None
    while True:
        page = store.list_page(prefix, LIST_PAGE_SIZE, continuation)
        yield page.objects
        continuation = page.continuation
        if continuation is None:
            return


def prefetched(pages: Iterator[list[ListedObject]], depth: int = 2) -> Iterator[list[ListedObject]]:
    """`pages`, produced by a thread that stays up to `depth` pages ahead of the consumer, so that
    S3 answers the next page while the caller writes this one. An error in the producer is raised
    to the consumer; a consumer that stops early stops the producer."""
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
            item = handoff.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stopped.set()
        # A producer inside a slow request ends on its own once that request returns.
        producer.join(timeout=1.0)
