"""Backfill one partition: read its files' objects from S3 (a listing for big apps, HEADs for the
rest) and write the triples batch by batch.

This module joins the InstantDB domain and S3 access; it knows nothing of Dagster, so the same
code runs under an asset, a test or a benchmark. `log` is any logger with info/warning/error.
"""

import collections
import dataclasses
import datetime
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Protocol

import psycopg

from s3_attrs_pipeline.instant import database as db
from s3_attrs_pipeline.instant.object_keys import InvalidLocationId, location_id_of_key, object_key
from s3_attrs_pipeline.instant.partitions import AppIdRange
from s3_attrs_pipeline.s3 import listing
from s3_attrs_pipeline.s3.object_metadata import (
    HeadOutcome,
    ListingFailed,
    MalformedObjectMetadata,
    ObjectMetadata,
    ObjectStore,
)

LOGGED_FILES_PER_KIND = 20  # per partition and kind of problem; the rest are only counted
PROGRESS_LOG_INTERVAL_S = 10.0


class Log(Protocol):
    def info(self, msg: str) -> None: ...
    def warning(self, msg: str) -> None: ...
    def error(self, msg: str) -> None: ...


@dataclasses.dataclass(frozen=True)
class FileProblem:
    app_id: str
    entity_id: str
    key: str | None
    reason: str


@dataclasses.dataclass
class PartitionReport:
    partition_key: str
    processed: int = 0
    successful: int = 0
    missing: int = 0
    failed: int = 0
    invalid: int = 0  # location-id that cannot name an object
    malformed: int = 0  # object whose ETag or Last-Modified is not what S3 sends
    already_populated: int = 0
    vanished: int = 0
    s3_retries: int = 0
    s3_throttled: int = 0  # responses that told us to slow down
    concurrent_run: bool = False  # another run held the partition: this one did nothing
    apps_listed: int = 0  # apps whose objects were read from a listing rather than HEADs
    batches: int = 0
    duration_s: float = 0.0
    problems: list[FileProblem] = dataclasses.field(default_factory=list)

    @property
    def files_per_second(self) -> float:
        return self.processed / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def errors(self) -> int:
        """Files not written for a reason other than a missing object."""
        return self.failed + self.invalid + self.malformed

    def as_progress_state(self, status: str) -> dict:
        return {
            "status": status,
            "processed": self.processed,
            "successful": self.successful,
            "missing": self.missing,
            "failed": self.failed,
            "invalid": self.invalid,
            "malformed": self.malformed,
            "already-populated": self.already_populated,
            "updated-at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }


class PartitionFailed(RuntimeError):
    """Some files failed in S3 after their retries; the others were done. A rerun retries them.

    Invalid location ids and malformed object metadata do not fail a partition: a rerun cannot mend
    them. They are logged, counted, and left out of the partition's gap like missing objects."""

    def __init__(self, report: PartitionReport):
        self.report = report
        super().__init__(
            f"partition {report.partition_key}: {report.failed} of {report.processed} files failed in S3 after "
            f"their retries; rerun the partition to retry them"
        )


@dataclasses.dataclass(frozen=True)
class BackfillSettings:
    batch_size: int = 50
    partition_count: int = 256
    # An app is listed instead of HEADed when at least this many of its files lack `hash`
    # and they are at least 1/LISTED_APP_MIN_PENDING_SHARE of its files; 0 never lists.
    list_threshold: int = 1000

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {self.batch_size}")
        if self.list_threshold < 0:
            raise ValueError(f"list_threshold must be 0 (never list) or more, not {self.list_threshold}")


# A listing reads every key under the app's prefix, done or not, at ~10x a HEAD's rate: it pays
# only while the files to do are a good share of the app.
LISTED_APP_MIN_PENDING_SHARE = 10


def apps_to_list(apps: list[db.AppFileCount], list_threshold: int) -> list[db.AppFileCount]:
    """The apps whose objects are read with ListObjectsV2 rather than one HEAD per file."""
    if list_threshold <= 0:
        return []
    return [
        app
        for app in apps
        if app.pending >= list_threshold and app.pending * LISTED_APP_MIN_PENDING_SHARE >= app.files
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


class _ProblemLog:
    """Logs the first few problems of each kind by name and keeps them for the report."""

    def __init__(self, log: Log, report: PartitionReport):
        self._log = log
        self._report = report
        self._logged: dict[str, int] = {}

    def __call__(self, kind: str, file: db.PendingFile, key: str | None, reason: str, *, level: str) -> None:
        count = self._logged.get(kind, 0)
        self._logged[kind] = count + 1
        if count >= LOGGED_FILES_PER_KIND:
            return
        problem = FileProblem(str(file.app_id), str(file.entity_id), key, f"{kind}: {reason}")
        self._report.problems.append(problem)
        suffix = " (further ones are only counted)" if count + 1 == LOGGED_FILES_PER_KIND else ""
        getattr(self._log, level)(
            f"{kind} file app={file.app_id} entity={file.entity_id} key={key!r}: {reason}{suffix}"
        )


class _BatchWriter:
    """Collects what was found for each file, then writes a batch of them, with the progress that
    follows from it, in one transaction."""

    def __init__(self, conn: psycopg.Connection, report: PartitionReport, problem: _ProblemLog):
        self._conn = conn
        self._report = report
        self._problem = problem
        self._new_batch()

    def _new_batch(self) -> None:
        self._to_write: list[db.FileObjectAttrs] = []
        self._counts = dict(processed=0, missing=0, failed=0, invalid=0, malformed=0, s3_retries=0)
        self._last_file: db.PendingFile | None = None

    def __len__(self) -> int:
        return self._counts["processed"]

    def _count(self, file: db.PendingFile, kind: str | None) -> None:
        self._counts["processed"] += 1
        if kind:
            self._counts[kind] += 1
        self._last_file = file

    def found(self, file: db.PendingFile, metadata: ObjectMetadata) -> None:
        self._to_write.append(db.FileObjectAttrs(file, metadata.hash, metadata.last_modified_ms))
        self._count(file, None)

    def missing(self, file: db.PendingFile, key: str, reason: str) -> None:
        self._count(file, "missing")
        self._problem("missing", file, key, reason, level="warning")

    def invalid(self, file: db.PendingFile, reason: str) -> None:
        self._count(file, "invalid")
        self._problem("invalid", file, None, reason, level="warning")

    def malformed(self, file: db.PendingFile, key: str, reason: str) -> None:
        self._count(file, "malformed")
        self._problem("malformed", file, key, reason, level="warning")

    def failed(self, file: db.PendingFile, key: str, reason: str) -> None:
        self._count(file, "failed")
        self._problem("failed", file, key, reason, level="error")

    def head_outcome(self, file: db.PendingFile, key: str, outcome: HeadOutcome) -> None:
        self._counts["s3_retries"] += outcome.retries
        if outcome.metadata is not None:
            self.found(file, outcome.metadata)
        elif outcome.missing:
            self.missing(file, key, "no such object in S3 (404)")
        elif outcome.malformed:
            self.malformed(file, key, outcome.failure)
        else:
            self.failed(file, key, outcome.failure)

    def flush(self, listed: db.ListedAttrs | None = None) -> None:
        """Write the batch, with the progress that follows from it, in one transaction. With `listed`
        (a listing page: only its malformed files may be counted so far) the files it writes are
        counted as processed as they are written."""
        if listed is not None and not listed.locations:
            listed = None
        if not self._counts["processed"] and listed is None:
            return
        if listed is not None and self._to_write:
            raise RuntimeError("a listing page is written on its own, not with HEADed files")
        counts, last_file = self._counts, self._last_file
        counted = dataclasses.replace(
            self._report,
            batches=self._report.batches + 1,
            **{name: getattr(self._report, name) + counts[name] for name in counts},
        )
        found_by_listing = listed is not None

        def progress_after(outcome: db.BatchWriteOutcome) -> db.ProgressUpdate:
            state = _with_write(counted, outcome, found_by_listing).as_progress_state("running")
            last_entity_id = outcome.last_written or (last_file.entity_id if last_file else None)
            return db.ProgressUpdate(
                self._report.partition_key,
                (state | {"last-entity-id": str(last_entity_id)}) if last_entity_id else state,
                processed=counts["processed"] + (outcome.written if found_by_listing else 0),
                successful=outcome.written,
                failed=counts["failed"] + counts["invalid"] + counts["malformed"],
                missing=counts["missing"],
            )

        if listed is not None:
            outcome = db.write_listed_attrs(self._conn, listed, progress_after)
        else:
            outcome = db.write_file_attrs(self._conn, self._to_write, progress_after)
        done = _with_write(counted, outcome, found_by_listing)
        for field in dataclasses.fields(PartitionReport):
            setattr(self._report, field.name, getattr(done, field.name))
        self._new_batch()


def _with_write(report: PartitionReport, outcome: db.BatchWriteOutcome, found_by_listing: bool) -> PartitionReport:
    return dataclasses.replace(
        report,
        processed=report.processed + (outcome.written if found_by_listing else 0),
        successful=report.successful + outcome.written,
        already_populated=report.already_populated + outcome.already_populated,
        vanished=report.vanished + outcome.vanished,
    )


def backfill_partition(
    conn: psycopg.Connection,
    store: ObjectStore,
    partition_key: str,
    settings: BackfillSettings,
    log: Log,
) -> PartitionReport:
    """Backfill every file of the partition that lacks `hash`; raise PartitionFailed at the end if
    any could not be done. S3AccessError stops at once; database errors propagate."""
    app_ids = AppIdRange.for_partition(partition_key)
    report = PartitionReport(partition_key)
    db.ensure_file_attrs(conn)
    store.check_bucket()
    if not db.try_lock_partition(conn, partition_key):
        report.concurrent_run = True
        log.warning(
            f"partition {partition_key} is being backfilled by another run right now; this run leaves it to that one"
        )
        return report
    try:
        return _backfill_locked_partition(conn, store, app_ids, report, settings, log)
    finally:
        db.unlock_partition(conn, partition_key)


def _backfill_locked_partition(
    conn: psycopg.Connection,
    store: ObjectStore,
    app_ids: AppIdRange,
    report: PartitionReport,
    settings: BackfillSettings,
    log: Log,
) -> PartitionReport:
    partition_key = report.partition_key
    started = time.monotonic()
    apps = db.app_file_counts(conn, app_ids)
    report.already_populated = sum(app.populated for app in apps)
    listed = apps_to_list(apps, settings.list_threshold)
    log.info(
        f"Starting S3 attrs backfill of partition {partition_key} (apps {app_ids.first}..{app_ids.last}): "
        f"{sum(app.pending for app in apps)} files to do in {sum(1 for app in apps if app.pending)} apps, "
        f"{report.already_populated} already populated; "
        f"{len(listed)} apps listed (ListObjectsV2), the others HEADed per file"
    )
    writer = _BatchWriter(conn, report, _ProblemLog(log, report))
    progress_log = _ProgressLog(log, report, started)
    status = "failed"
    try:
        db.record_progress(conn, db.ProgressUpdate(partition_key, report.as_progress_state("running")))
        head_ranges = ranges_between(app_ids, [app.app_id for app in listed])
        for app in listed:
            if _list_app(conn, store, app, writer, progress_log, log):
                report.apps_listed += 1
            else:
                head_ranges.append(AppIdRange(partition_key, app.app_id, app.app_id))
        for app_range in head_ranges:
            _head_range(conn, store, app_range, writer, progress_log, settings)
        status = "failed" if report.failed else "completed"
    finally:
        report.duration_s = time.monotonic() - started
        report.s3_throttled = store.rate_limiter.throttle_events
        db.record_progress(
            conn,
            db.ProgressUpdate(
                partition_key, report.as_progress_state(status), partition_count=settings.partition_count
            ),
        )
    log.info(
        f"S3 attrs backfill of partition {partition_key} {status}: total-processed={report.processed} "
        f"total-successful={report.successful} missing={report.missing} total-failed={report.errors} "
        f"already-populated={report.already_populated} in {report.duration_s:.1f}s "
        f"({report.files_per_second:.0f} files/s)"
    )
    if report.failed:
        raise PartitionFailed(report)
    return report


class _ProgressLog:
    def __init__(self, log: Log, report: PartitionReport, started: float):
        self._log = log
        self._report = report
        self._started = started
        self._last = started

    def __call__(self) -> None:
        now = time.monotonic()
        self._report.duration_s = now - self._started
        if now - self._last < PROGRESS_LOG_INTERVAL_S:
            return
        self._last = now
        report = self._report
        self._log.info(
            f"Processed batch {report.batches} of partition {report.partition_key}: "
            f"total-processed={report.processed} successful={report.successful} missing={report.missing} "
            f"failed={report.failed} ({report.files_per_second:.0f} files/s)"
        )


def _head_range(
    conn: psycopg.Connection,
    store: ObjectStore,
    app_ids: AppIdRange,
    writer: _BatchWriter,
    progress_log: _ProgressLog,
    settings: BackfillSettings,
) -> None:
    """HEAD every file of the range that lacks `hash`. A sliding window keeps requests in flight
    while pages are read and batches written: no batch waits for its slowest HEAD before the next starts."""
    window: collections.deque[tuple[db.PendingFile, str | None, Future | InvalidLocationId]] = collections.deque()
    window_size = 2 * max(settings.batch_size, store.settings.max_in_flight)

    def settle_oldest() -> None:
        file, key, pending = window.popleft()
        if isinstance(pending, InvalidLocationId):
            writer.invalid(file, str(pending))
        else:
            writer.head_outcome(file, key, pending.result())
        if len(writer) >= settings.batch_size:
            writer.flush()
            progress_log()

    try:
        for page in db.iter_pending_batches(conn, app_ids, settings.batch_size):
            for file in page:
                try:
                    key = object_key(file.app_id, file.location_value)
                except InvalidLocationId as invalid:
                    window.append((file, None, invalid))
                else:
                    window.append((file, key, store.submit_head(key)))
            while len(window) > window_size:
                settle_oldest()
        while window:
            settle_oldest()
    finally:
        for _, _, pending in window:
            if isinstance(pending, Future):
                pending.cancel()
    writer.flush()
    progress_log()


@dataclasses.dataclass(frozen=True)
class _ListedPage:
    attrs: db.ListedAttrs  # the listed objects' values, by location-id
    malformed: dict[str, tuple[str, str]]  # location-id: (key, why its metadata cannot be written)


def _listed_pages(store: ObjectStore, app_id: uuid.UUID) -> Iterator[_ListedPage]:
    """The app's listing, a page at a time, each made ready to write. Keys that are not where a
    location-id of this app puts its object are left out."""
    for objects in listing.list_prefix(store, f"{app_id}/"):
        found, malformed = [], {}
        for listed in objects:
            location_id = location_id_of_key(app_id, listed.key)
            if location_id is None:
                continue
            try:
                metadata = listing.metadata_of(listed)
            except MalformedObjectMetadata as error:
                malformed[location_id] = (listed.key, str(error))
            else:
                found.append((location_id, metadata.hash, metadata.last_modified_ms))
        yield _ListedPage(db.ListedAttrs.of(app_id, found), malformed)


def _list_app(
    conn: psycopg.Connection,
    store: ObjectStore,
    app: db.AppFileCount,
    writer: _BatchWriter,
    progress_log: _ProgressLog,
    log: Log,
) -> bool:
    """Read the app's objects from a listing of `<app_id>/`, each page written to the app's files
    that lack `hash` at its locations; the files not listed are missing. False if the listing
    failed: the app's remaining files are then left to HEADs.

    A thread reads and encodes the next pages while this one writes: the writes, PostgreSQL's
    work, set the pace."""
    prefix = f"{app.app_id}/"
    malformed: set[uuid.UUID] = set()  # still lack `hash`, but are not missing
    try:
        for page in listing.prefetched(_listed_pages(store, app.app_id)):
            if page.malformed:
                for file in db.pending_files_at(conn, app.app_id, list(page.malformed)):
                    malformed.add(file.entity_id)
                    writer.malformed(file, *page.malformed[file.location_value])
            writer.flush(page.attrs)
            progress_log()
    except ListingFailed as error:
        writer.flush()
        log.warning(f"{error}; the app's remaining files are HEADed instead")
        return False
    unlisted_range = AppIdRange(str(app.app_id), app.app_id, app.app_id)
    for page in db.iter_pending_batches(conn, unlisted_range, listing.LIST_PAGE_SIZE):
        for file in page:
            if file.entity_id in malformed:
                continue
            try:
                key = object_key(file.app_id, file.location_value)
            except InvalidLocationId as invalid:
                writer.invalid(file, str(invalid))
            else:
                writer.missing(file, key, f"no such object in S3 (not in the listing of {prefix})")
        writer.flush()
        progress_log()
    return True


def known_missing(progress: dict, partition_key: str) -> int:
    """Objects the partition's latest run found missing in S3."""
    return progress.get("partitions", {}).get(partition_key, {}).get("missing", 0)


def known_invalid(progress: dict, partition_key: str) -> int:
    """Files the partition's latest run could not fill from bad data: invalid location ids, malformed metadata."""
    state = progress.get("partitions", {}).get(partition_key, {})
    return state.get("invalid", 0) + state.get("malformed", 0)


def unexplained_gap(coverage: db.PartitionCoverage | None, progress: dict, partition_key: str) -> int:
    """Files lacking `hash` beyond those known to be unfillable: new uploads, or failures."""
    lacking = coverage.lacking_hash if coverage else 0
    return max(0, lacking - known_missing(progress, partition_key) - known_invalid(progress, partition_key))


def partitions_with_work(
    partition_keys: list[str], coverage: dict[str, db.PartitionCoverage], progress: dict
) -> list[str]:
    """The partitions worth a run: never completed, or with an unexplained gap."""
    states = progress.get("partitions", {})
    return [
        key
        for key in partition_keys
        if states.get(key, {}).get("status") != "completed" or unexplained_gap(coverage.get(key), progress, key)
    ]
