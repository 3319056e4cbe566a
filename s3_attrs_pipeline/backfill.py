"""Backfill one partition: read its files' objects from S3 (a listing for big apps, HEADs for the
rest) and write the triples batch by batch.

This module joins the InstantDB domain and S3 access; it knows nothing of Dagster, so the same
code runs under an asset, a test or a benchmark. `log` is any logger with info/warning/error.
The caller owns the partition's report: whatever ends the partition (a refusal, the run's stop, a
database error), the report holds what was done until then, as the progress row does.
"""

import collections
import dataclasses
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Protocol

import psycopg

from s3_attrs_pipeline.counts import FileCounts
from s3_attrs_pipeline.instant import catalog, live_updates, partition_locks, progress, reads, writes
from s3_attrs_pipeline.instant.app_id_ranges import AppIdRange
from s3_attrs_pipeline.instant.live_updates import DEFAULT_LIVE_UPDATES, LiveUpdates
from s3_attrs_pipeline.instant.object_keys import InvalidLocationId, location_id_of_key, object_key
from s3_attrs_pipeline.instant.replication import ReplicationLimits
from s3_attrs_pipeline.run_control import RunControl, Stopped
from s3_attrs_pipeline.s3 import listing
from s3_attrs_pipeline.s3.metadata import MalformedObjectMetadata, ObjectMetadata
from s3_attrs_pipeline.s3.store import HeadOutcome, ListingFailed, ObjectStore, StoreStopped

LOGGED_FILES_PER_KIND = 20  # per partition and kind of problem; the rest are only counted
PROGRESS_LOG_INTERVAL_S = 10.0


class Log(Protocol):
    def info(self, msg: str) -> None: ...
    def warning(self, msg: str) -> None: ...
    def error(self, msg: str) -> None: ...


class FilesDone(Protocol):
    """Told, as each batch is written, how many more files were done and how many of those failed."""

    def __call__(self, files: int, failed: int) -> None: ...


def no_progress(files: int, failed: int) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class FileProblem:
    app_id: str
    entity_id: str
    key: str | None
    reason: str


@dataclasses.dataclass
class PartitionReport:
    partition_key: str
    counts: FileCounts = FileCounts()
    left_to_another_run: bool = False  # another session held the partition's lock: this run did nothing
    duration_s: float = 0.0
    problems: list[FileProblem] = dataclasses.field(default_factory=list)
    replication_wait_s: float = 0.0  # spent waiting for replication to catch up before writing

    @property
    def files_per_second(self) -> float:
        return self.counts.processed / self.duration_s if self.duration_s > 0 else 0.0


class PartitionFailed(RuntimeError):
    """Some files failed in S3 after their retries; the others were done. A rerun retries them.

    Invalid location ids and malformed object metadata do not fail a partition: a rerun cannot mend
    them. They are logged, counted, and left out of the partition's gap like missing objects."""

    def __init__(self, report: PartitionReport):
        self.report = report
        super().__init__(
            f"partition {report.partition_key}: {report.counts.failed} of {report.counts.processed} files failed "
            "in S3 after their retries; rerun the partition to retry them"
        )


@dataclasses.dataclass(frozen=True)
class BackfillSettings:
    """How a partition is backfilled. The asset's config and the CLI's options take their defaults
    and descriptions from here."""

    batch_size: int = dataclasses.field(
        default=50, metadata={"help": "Files written per transaction (and read per page)."}
    )
    list_threshold: int = dataclasses.field(
        default=1000,
        metadata={
            "help": "An app is read with ListObjectsV2 (1,000 objects a request) instead of one HEAD per file when "
            "at least this many of its files lack the attrs and they are at least a tenth of its files; 0 never lists."
        },
    )
    live_updates: LiveUpdates = dataclasses.field(
        default=DEFAULT_LIVE_UPDATES,
        metadata={
            "help": "Whether InstantDB hears of the writes. queries: each transaction writes one app's triples "
            "with a `transactions` row of that app, so live queries see them; entities: also the entity "
            "messages sync subscriptions and webhooks consume (webhooks on $files fire for every file); off: "
            "raw inserts that InstantDB never hears of, like the REPL migration."
        },
    )
    wal_msg_log_to_table: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "At live_updates=entities, log the entity messages to the `wal_logs` table instead of the "
            "WAL (instant.wal_msg_log_to_table), as InstantDB does for apps so configured."
        },
    )
    replication: ReplicationLimits = dataclasses.field(
        default_factory=ReplicationLimits.from_env,
        metadata={"help": "How far replication may lag before each write transaction waits for it."},
    )
    partition_count: int = 256  # of the partitions definition: a partition's end recomputes `completed`

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {self.batch_size}")
        if self.list_threshold < 0:
            raise ValueError(f"list_threshold must be 0 (never list) or more, not {self.list_threshold}")
        if not isinstance(self.live_updates, LiveUpdates):
            levels = ", ".join(level.value for level in LiveUpdates)
            raise ValueError(f"live_updates must be one of {levels}, not {self.live_updates!r}")


# A listing reads every key under the app's prefix, done or not, at ~10x a HEAD's rate: it pays
# only while the files to do are a good share of the app.
LISTED_APP_MIN_PENDING_SHARE = 10


def apps_to_list(
    apps: list[reads.AppFileCount], list_threshold: int, to_do: Callable[[reads.AppFileCount], int] = lambda a: a.pending
) -> list[reads.AppFileCount]:
    """The apps whose objects are read with ListObjectsV2 rather than one HEAD per file: those with
    at least `list_threshold` files `to_do` (by default the files lacking `hash`), a tenth of the app."""
    if list_threshold <= 0:
        return []
    return [
        app
        for app in apps
        if to_do(app) >= list_threshold and to_do(app) * LISTED_APP_MIN_PENDING_SHARE >= app.files
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


class ProblemLog:
    """Logs the first few problem files of each kind by name and keeps them in `problems`."""

    def __init__(self, log: Log, problems: list[FileProblem]):
        self._log = log
        self._problems = problems
        self._logged: dict[str, int] = {}

    def __call__(self, kind: str, file: reads.PendingFile, key: str | None, reason: str, *, level: str) -> None:
        count = self._logged.get(kind, 0)
        self._logged[kind] = count + 1
        if count >= LOGGED_FILES_PER_KIND:
            return
        problem = FileProblem(str(file.app_id), str(file.entity_id), key, f"{kind}: {reason}")
        self._problems.append(problem)
        suffix = " (further ones are only counted)" if count + 1 == LOGGED_FILES_PER_KIND else ""
        getattr(self._log, level)(
            f"{kind} file app={file.app_id} entity={file.entity_id} key={key!r}: {reason}{suffix}"
        )


class _BatchWriter:
    """Collects what was found for each file, then writes a batch of them, with the progress that
    follows from it, in one transaction."""

    def __init__(
        self,
        conn: psycopg.Connection,
        report: PartitionReport,
        problem: ProblemLog,
        settings: BackfillSettings,
        control: RunControl,
        on_files: "FilesDone",
    ):
        self._conn = conn
        self._report = report
        self._problem = problem
        self._settings = settings
        self._control = control
        self._on_files = on_files
        self._new_batch()

    def _new_batch(self) -> None:
        self._to_write: list[writes.FileObjectAttrs] = []
        self._counts = FileCounts()
        self._last_file: reads.PendingFile | None = None

    def __len__(self) -> int:
        return self._counts.processed

    def _count(self, file: reads.PendingFile, **counts: int) -> None:
        self._counts += FileCounts(processed=1, **counts)
        self._last_file = file

    def found(self, file: reads.PendingFile, metadata: ObjectMetadata) -> None:
        if (
            self._settings.live_updates.one_app_per_transaction
            and self._to_write
            and self._to_write[0].file.app_id != file.app_id
        ):
            self.flush()  # InstantDB reads a transaction as one app's
        self._to_write.append(writes.FileObjectAttrs(file, metadata.hash, metadata.last_modified_ms))
        self._count(file)

    def missing(self, file: reads.PendingFile, key: str, reason: str) -> None:
        self._count(file, missing=1)
        self._problem("missing", file, key, reason, level="warning")

    def invalid(self, file: reads.PendingFile, reason: str) -> None:
        self._count(file, invalid_location_id=1)
        self._problem("invalid", file, None, reason, level="warning")

    def malformed(self, file: reads.PendingFile, key: str, reason: str) -> None:
        self._count(file, malformed_object_metadata=1)
        self._problem("malformed", file, key, reason, level="warning")

    def failed(self, file: reads.PendingFile, key: str, reason: str) -> None:
        self._count(file, failed=1)
        self._problem("failed", file, key, reason, level="error")

    def requests(self, retries: int, throttled: int) -> None:
        """Counts the retries and throttled answers of S3 requests made for the batch."""
        self._counts += FileCounts(s3_retries=retries, s3_throttled=throttled)

    def head_outcome(self, file: reads.PendingFile, key: str, outcome: HeadOutcome) -> None:
        self.requests(outcome.retries, outcome.throttled)
        if outcome.metadata is not None:
            self.found(file, outcome.metadata)
        elif outcome.missing:
            self.missing(file, key, "no such object in S3 (404)")
        elif outcome.malformed:
            self.malformed(file, key, outcome.failure)
        else:
            self.failed(file, key, outcome.failure)

    def flush(self, listed: writes.ListedAttrs | None = None) -> None:
        """Write the batch and the progress that follows from it in one transaction. With `listed`
        (a listing page: only its malformed files may be counted so far) the files it writes are
        counted as processed as they are written."""
        if listed is not None and not listed.locations:
            listed = None
        if self._counts == FileCounts() and listed is None:
            return
        if listed is not None and self._to_write:
            raise RuntimeError("a listing page is written on its own, not with HEADed files")
        batch, last_file, report = self._counts, self._last_file, self._report
        level, to_table = self._settings.live_updates, self._settings.wal_msg_log_to_table
        app_id = listed.app_id if listed is not None else (self._to_write[0].file.app_id if self._to_write else None)

        def attempt(on_conflict: bool) -> FileCounts:
            with self._control.write(self._conn) as waited:
                report.replication_wait_s += waited
                if app_id is not None:
                    live_updates.before_writing(self._conn, app_id, level, to_table)
                if listed is not None:
                    outcome = writes.write_listed_attrs(self._conn, listed, on_conflict=on_conflict)
                else:
                    outcome = writes.write_file_attrs(self._conn, self._to_write, on_conflict=on_conflict)
                if app_id is not None:
                    live_updates.after_writing(self._conn, app_id, level, outcome.written)
                written = batch + _counts_of(outcome, found_by_listing=listed is not None)
                last_entity_id = outcome.last_written or (last_file.entity_id if last_file else None)
                progress.record_progress(
                    self._conn, report.partition_key, "running", report.counts + written,
                    added=written, last_entity_id=last_entity_id,
                )
            return written

        done = writes.retried_on_conflict(attempt)
        report.counts += done
        self._on_files(done.processed, done.failed)
        self._new_batch()


def _counts_of(outcome: writes.WriteOutcome, *, found_by_listing: bool) -> FileCounts:
    """What a write adds to its batch's counts. A listing's files are processed as they are written."""
    return FileCounts(
        processed=outcome.written if found_by_listing else 0,
        successful=outcome.written,
        already_populated=outcome.already_populated,
        vanished_during_run=outcome.vanished,
        batches=1,
    )


def backfill_partition(
    conn: psycopg.Connection,
    store: ObjectStore,
    partition_key: str,
    settings: BackfillSettings,
    log: Log,
    on_files: FilesDone = no_progress,
    *,
    report: PartitionReport | None = None,
    control: RunControl | None = None,
) -> PartitionReport:
    """Backfill every file of the partition that lacks `hash` into `report` (a new one if not given),
    and return it; raise PartitionFailed at the end if any could not be done. S3AccessError stops at
    once, Stopped when `control`'s run stops; database errors propagate. A partition another session
    holds is left to it (`left_to_another_run`)."""
    report = report if report is not None else PartitionReport(partition_key)
    control = control if control is not None else RunControl(settings.replication, log)
    catalog.ensure_file_attrs(conn)
    store.check_bucket()
    if not partition_locks.try_lock_partition(conn, partition_key):
        report.left_to_another_run = True
        log.warning(
            f"partition {partition_key} is being worked by another run right now; this run leaves it to that one"
        )
        return report
    try:
        _backfill_locked_partition(conn, store, AppIdRange.for_partition(partition_key), report, settings, log,
                                   on_files, control)
    finally:
        if not conn.closed and not conn.broken:
            partition_locks.unlock_partition(conn, partition_key)
    if report.counts.failed:
        raise PartitionFailed(report)
    return report


def _backfill_locked_partition(
    conn: psycopg.Connection,
    store: ObjectStore,
    app_ids: AppIdRange,
    report: PartitionReport,
    settings: BackfillSettings,
    log: Log,
    on_files: FilesDone,
    control: RunControl,
) -> None:
    partition_key = report.partition_key
    started = time.monotonic()
    apps = reads.app_file_counts(conn, app_ids)
    already_populated = sum(app.populated for app in apps)
    report.counts += FileCounts(already_populated=already_populated)
    listed = apps_to_list(apps, settings.list_threshold)
    # One line per partition, at its end: in a run of hundreds of partitions each log line is an
    # event the run's storage writes.
    plan = (
        f"{sum(app.pending for app in apps)} files to do in {sum(1 for app in apps if app.pending)} apps, "
        f"{len(listed)} of them listed (ListObjectsV2), the others HEADed per file"
    )
    writer = _BatchWriter(conn, report, ProblemLog(log, report.problems), settings, control, on_files)
    progress_log = _ProgressLog(log, report, started)
    try:
        removed = remove_orphaned_values(conn, app_ids, settings, control, log)
        report.counts += FileCounts(orphaned_values_removed=removed)
        head_ranges = [(app_range, None) for app_range in ranges_between(app_ids, [app.app_id for app in listed])]
        for app in listed:
            reached = _list_app(conn, store, app, writer, progress_log, log, control)
            if reached is _ALL_LISTED:
                report.counts += FileCounts(apps_listed=1)
            else:
                head_ranges.append((AppIdRange(partition_key, app.app_id, app.app_id), reached))
        for app_range, after_key in head_ranges:
            _head_range(conn, store, app_range, writer, progress_log, settings, control, after_key=after_key)
    except BaseException as error:
        status = "stopped" if isinstance(error, (Stopped, StoreStopped)) else "failed"
        report.duration_s = time.monotonic() - started
        record_partition_end(conn, control, partition_key, status, report.counts, settings, error=error)
        raise
    status = "failed" if report.counts.failed else "completed"
    report.duration_s = time.monotonic() - started
    record_partition_end(conn, control, partition_key, status, report.counts, settings)
    counts = report.counts
    log.info(
        f"S3 attrs backfill of partition {partition_key} {status} ({plan}): processed={counts.processed} "
        f"successful={counts.successful} missing={counts.missing} failed={counts.failed} "
        f"invalid_location_id={counts.invalid_location_id} "
        f"malformed_object_metadata={counts.malformed_object_metadata} "
        f"already_populated={counts.already_populated} in {report.duration_s:.1f}s "
        f"({report.files_per_second:.0f} files/s)"
    )


def record_partition_end(
    conn: psycopg.Connection,
    control: RunControl,
    partition_key: str,
    status: str,
    counts: FileCounts,
    settings: BackfillSettings,
    *,
    error: BaseException | None = None,
) -> None:
    """Record how the partition ended (`status`: completed, failed or stopped) and its counts. While
    `error` ends the partition, a connection that cannot record it is noted on `error` rather than
    hiding it."""
    if conn.closed or conn.broken:
        if error is not None:
            error.add_note(f"partition {partition_key}'s end was not recorded: its database connection was lost")
        return
    try:
        with control.bookkeeping(conn):
            progress.record_progress(conn, partition_key, status, counts, partition_count=settings.partition_count)
    except psycopg.Error as failed:
        if error is None:
            raise
        error.add_note(f"partition {partition_key}'s end was not recorded: {failed}")


def remove_orphaned_values(
    conn: psycopg.Connection, app_ids: AppIdRange, settings: BackfillSettings, control: RunControl, log: Log
) -> int:
    """Delete the `hash` and `lastModified` triples of the range's entities that have no `location-id`
    (a file deleted while its values were being written: see writes.remove_orphaned_values), one app
    per transaction, as InstantDB hears of any write. Returns how many files were mended; a role that
    may not delete is warned of and mends nothing."""
    apps = reads.apps_with_orphaned_values(conn, app_ids)
    if not apps:
        return 0
    if not reads.may_delete_triples(conn):
        log.warning(
            f"{sum(apps.values())} files in partition {app_ids.key} have hash or lastModified but no location-id "
            "(deleted while they were written); the role may not delete triples, so they stay: grant it DELETE on "
            "triples (docs/postgres-grants-heal.sql) and run the partition again"
        )
        return 0
    mended = 0
    for app_id in apps:
        with control.write(conn):
            live_updates.before_writing(conn, app_id, settings.live_updates, settings.wal_msg_log_to_table)
            removed = writes.remove_orphaned_values(conn, app_id)
            live_updates.after_writing(conn, app_id, settings.live_updates, removed)
        mended += removed
    log.warning(f"removed the hash and lastModified of {mended} files of partition {app_ids.key} that have no location-id")
    return mended


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
        report, counts = self._report, self._report.counts
        self._log.info(
            f"Processed batch {counts.batches} of partition {report.partition_key}: "
            f"processed={counts.processed} successful={counts.successful} missing={counts.missing} "
            f"failed={counts.failed} ({report.files_per_second:.0f} files/s)"
        )


def _head_range(
    conn: psycopg.Connection,
    store: ObjectStore,
    app_ids: AppIdRange,
    writer: _BatchWriter,
    progress_log: _ProgressLog,
    settings: BackfillSettings,
    control: RunControl,
    *,
    after_key: str | None = None,
) -> None:
    """HEAD every file of the range that lacks `hash` (whose key is past `after_key`, where the app's
    listing got that far). A sliding window keeps requests in flight while pages are read and batches written:
    no batch waits for its slowest HEAD before the next starts."""
    window: collections.deque[tuple[reads.PendingFile, str | None, Future | InvalidLocationId]] = collections.deque()
    window_size = 2 * max(settings.batch_size, store.settings.max_in_flight)

    def settle_oldest() -> None:
        file, key, pending = window.popleft()
        if isinstance(pending, InvalidLocationId):
            writer.invalid(file, str(pending))
        else:
            writer.head_outcome(file, key, control.result(pending))
        if len(writer) >= settings.batch_size:
            writer.flush()
            progress_log()

    try:
        for page in reads.iter_pending_batches(conn, app_ids, settings.batch_size):
            control.check()
            for file in page:
                try:
                    key = object_key(file.app_id, file.location_value)
                except InvalidLocationId as invalid:
                    window.append((file, None, invalid))
                else:
                    if listed_up_to(key, after_key):
                        continue  # the app's listing settled it
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


_ALL_LISTED = object()  # _list_app's answer when the listing covered the whole app


def listed_up_to(key: str, listed: object) -> bool:
    """Whether the object `key` was in the part of its app's listing that was read: all of it
    (_ALL_LISTED), or the keys up to `listed` (S3 lists in the byte order of the keys' UTF-8)."""
    return listed is _ALL_LISTED or (listed is not None and key.encode() <= listed.encode())


def _list_app(
    conn: psycopg.Connection,
    store: ObjectStore,
    app: reads.AppFileCount,
    writer: _BatchWriter,
    progress_log: _ProgressLog,
    log: Log,
    control: RunControl,
) -> object:
    """Read the app's objects from a listing of `<app_id>/`, each page written to the app's files
    that lack `hash` at its locations; the files not listed are missing. Returns _ALL_LISTED, or,
    when the listing failed, the last key it got to (None for none): the files past it are left to
    HEADs, and each file is counted once.

    A thread reads and encodes the next pages while this one writes: the writes, PostgreSQL's
    work, set the pace."""
    prefix = f"{app.app_id}/"
    malformed: set[uuid.UUID] = set()  # still lack `hash`, but are not missing
    listed: object = None
    try:
        for page in listing.prefetched(listed_pages(store, app.app_id), check=control.check):
            writer.requests(page.retries, page.throttled)
            if page.malformed:
                for file in reads.pending_files_at(conn, app.app_id, list(page.malformed)):
                    malformed.add(file.entity_id)
                    writer.malformed(file, *page.malformed[file.location_value])
            writer.flush(page.attrs)
            listed = page.last_key if page.last_key is not None else listed
            progress_log()
        listed = _ALL_LISTED
    except ListingFailed as error:
        writer.flush()
        log.warning(f"{error}; the app's files past {listed or 'the start'} of its listing are HEADed instead")
    unlisted_range = AppIdRange(str(app.app_id), app.app_id, app.app_id)
    for page in reads.iter_pending_batches(conn, unlisted_range, listing.LIST_PAGE_SIZE):
        control.check()
        for file in page:
            if file.entity_id in malformed:
                continue
            try:
                key = object_key(file.app_id, file.location_value)
            except InvalidLocationId as invalid:
                if listed is _ALL_LISTED:  # else the HEADs meet it
                    writer.invalid(file, str(invalid))
                continue
            if listed_up_to(key, listed):
                writer.missing(file, key, f"no such object in S3 (not in the listing of {prefix})")
        writer.flush()
        progress_log()
    return listed
