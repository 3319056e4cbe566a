"""The apps a task reads with a listing rather than a HEAD per file, and how far a listing got.

Both tasks choose the same way (the backfill by the files it has to do, the refresh by the files
with values), read a listing the same way (a page at a time, made ready to write), and after a
listing that failed part way HEAD only the files past the last key it read, so that each file is
counted once.
"""

import dataclasses
import uuid
from collections.abc import Callable, Iterator

from s3_attrs_pipeline.instant import reads, writes
from s3_attrs_pipeline.instant.app_id_ranges import AppIdRange
from s3_attrs_pipeline.instant.object_keys import location_id_of_key
from s3_attrs_pipeline.s3 import listing
from s3_attrs_pipeline.s3.object_metadata import MalformedObjectMetadata
from s3_attrs_pipeline.s3.store import ObjectStore

# A listing reads every key under the app's prefix, done or not, at ~10x a HEAD's rate: it pays
# only while the files to do are a good share of the app.
LISTED_APP_MIN_PENDING_SHARE = 10


def apps_to_list(
    apps: list[reads.AppFileCount],
    list_threshold: int,
    to_do: Callable[[reads.AppFileCount], int] = lambda app: app.pending,
) -> list[reads.AppFileCount]:
    """The apps whose objects are read with ListObjectsV2 rather than one HEAD per file: those with
    at least `list_threshold` files `to_do` (by default the files lacking `hash`), a tenth of the app."""
    if list_threshold <= 0:
        return []
    return [
        app for app in apps if to_do(app) >= list_threshold and to_do(app) * LISTED_APP_MIN_PENDING_SHARE >= app.files
    ]


def ranges_between(app_ids: AppIdRange, excluded: list[uuid.UUID]) -> list[AppIdRange]:
    """`app_ids` without the (sorted) `excluded` apps, as the ranges left between them."""
    ranges = []
    first = app_ids.first.int
    for app_id in excluded:
        if app_id.int > first:
            ranges.append(AppIdRange(app_ids.key, uuid.UUID(int=first), uuid.UUID(int=app_id.int - 1)))
        first = app_id.int + 1
    if first <= app_ids.last.int:
        ranges.append(AppIdRange(app_ids.key, uuid.UUID(int=first), app_ids.last))
    return ranges


@dataclasses.dataclass(frozen=True)
class ListedPage:
    attrs: writes.ListedAttrs  # the listed objects' values, by location-id
    malformed: dict[str, tuple[str, str]]  # location-id: (key, why its metadata cannot be written)
    last_key: str | None  # of the page's objects, whatever they are: the listing is in key order
    retries: int  # of the request that got the page
    throttled: int  # its answers that told it to slow down


def listed_pages(store: ObjectStore, app_id: uuid.UUID) -> Iterator[ListedPage]:
    """The app's listing, a page at a time, each made ready to write. Keys that are not where a
    location-id of this app puts its object are left out."""
    for page in listing.list_prefix(store, f"{app_id}/"):
        found, malformed = [], {}
        for listed in page.objects:
            location_id = location_id_of_key(app_id, listed.key)
            if location_id is None:
                continue
            try:
                metadata = listing.metadata_of(listed)
            except MalformedObjectMetadata as error:
                malformed[location_id] = (listed.key, str(error))
            else:
                found.append((location_id, metadata.hash, metadata.last_modified_ms))
        last_key = page.objects[-1].key if page.objects else None
        yield ListedPage(writes.ListedAttrs.of(app_id, found), malformed, last_key, page.retries, page.throttled)


ALL_LISTED = object()  # how far a listing that covered the whole app got


def listed_up_to(key: str, listed: object) -> bool:
    """Whether the object `key` was in the part of its app's listing that was read: all of it
    (ALL_LISTED), or the keys up to `listed` (S3 lists in the byte order of the keys' UTF-8)."""
    return listed is ALL_LISTED or (listed is not None and key.encode() <= listed.encode())
