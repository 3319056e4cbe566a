"""The backfill of one partition: read its files' objects from S3 (a listing for big apps, HEADs for
the rest) and write the triples batch by batch; and its plan of a range of partitions.

This module joins the InstantDB domain and S3 access; it knows nothing of Dagster, so the same
code runs under an asset, a test or a benchmark. The caller owns the partition's report: whatever
ends the partition (a refusal, the run's stop, a database error), the report holds what was done
until then, as the progress row does.
"""

import collections
import time
import uuid

import psycopg

from s3_attrs_pipeline.counts import FileCounts
from s3_attrs_pipeline.instant import live_updates, progress_rows, reads, writes
from s3_attrs_pipeline.instant.app_id_ranges import AppIdRange
from s3_attrs_pipeline.instant.object_keys import InvalidLocationId, object_key
from s3_attrs_pipeline.s3 import listing
from s3_attrs_pipeline.s3.object_metadata import ObjectMetadata
from s3_attrs_pipeline.s3.store import HeadOutcome, ListingFailed, ObjectStore, PendingHead, StoreStopped
from s3_attrs_pipeline.tasks.control import RunControl, Stopped
from s3_attrs_pipeline.tasks.listed_apps import ALL_LISTED, apps_to_list, listed_pages, listed_up_to, ranges_between
from s3_attrs_pipeline.tasks.task import (
    FilesDone,
    Log,
    PartitionFailed,
    PartitionReport,
    PartitionTask,
    Plan,
    ProblemLog,
    TaskSettings,
    locked_partition,
    no_progress,
)

PROGRESS_LOG_INTERVAL_S = 10.0


class _BatchWriter:
    """Collects what was found for each file, then writes a batch of them, with the progress that
    follows from it, in one transaction."""

    def __init__(
        self,
        conn: psycopg.Connection,
        report: PartitionReport,
        problem: ProblemLog,
        settings: TaskSettings,
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

        self.unrecorded = FileCounts()  # written, but not yet added to the partition's row
        self._recorded_at = -progress_rows.RECORD_INTERVAL_S  # the first batch is recorded

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
        # The location-id rows are locked where the `transactions` row comes first (see live_updates).
        lock = level.one_app_per_transaction

        def attempt(on_conflict: bool, app_gone: bool = False) -> tuple[FileCounts, bool]:
            with self._control.write(self._conn) as waited:
                report.replication_wait_s += waited
                if app_gone:  # deleted while its files were read: they vanished with it
                    outcome = writes.WriteOutcome(0, 0, len(self._to_write))
                else:
                    if app_id is not None:
                        live_updates.before_writing(self._conn, app_id, level, to_table)
                    outcome = (
                        writes.write_listed_attrs(self._conn, listed, on_conflict=on_conflict, lock=lock)
                        if listed is not None
                        else writes.write_file_attrs(self._conn, self._to_write, on_conflict=on_conflict, lock=lock)
                    )
                written = batch + _counts_of(outcome, found_by_listing=listed is not None)
                # The partition's row at most once a second: a batch of a one-file app takes
                # milliseconds, and each row version is WAL and a dead tuple.
                recorded = time.monotonic() - self._recorded_at >= progress_rows.RECORD_INTERVAL_S
                if recorded:
                    last_entity_id = outcome.last_written or (last_file.entity_id if last_file else None)
                    progress_rows.record_progress(
                        self._conn,
                        report.partition_key,
                        "running",
                        report.counts + written,
                        added=self.unrecorded + written,
                        last_entity_id=last_entity_id,
                    )
            return written, recorded

        try:
            done, recorded = writes.retried_when_busy(lambda: writes.retried_on_conflict(attempt), self._control.sleep)
        except psycopg.errors.ForeignKeyViolation as error:
            if not writes.app_deleted(error):
                raise
            done, recorded = attempt(on_conflict=False, app_gone=True)
        report.counts += done
        if recorded:
            self.unrecorded, self._recorded_at = FileCounts(), time.monotonic()
        else:
            self.unrecorded += done
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
    settings: TaskSettings,
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
    report = report if report is not None else BACKFILL.new_report(partition_key)
    control = control if control is not None else RunControl(settings.replication, log)
    with locked_partition(conn, store, report, log) as locked:
        if locked:
            _backfill_locked_partition(
                conn, store, AppIdRange.for_partition(partition_key), report, settings, log, on_files, control
            )
    if report.counts.failed:
        raise PartitionFailed(BACKFILL.name, report)
    return report


def _backfill_locked_partition(
    conn: psycopg.Connection,
    store: ObjectStore,
    app_ids: AppIdRange,
    report: PartitionReport,
    settings: TaskSettings,
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
            if reached is ALL_LISTED:
                report.counts += FileCounts(apps_listed=1)
            else:
                head_ranges.append((AppIdRange(partition_key, app.app_id, app.app_id), reached))
        for app_range, after_key in head_ranges:
            _head_range(conn, store, app_range, writer, progress_log, settings, control, after_key=after_key)
    except BaseException as error:
        status = "stopped" if isinstance(error, (Stopped, StoreStopped)) else "failed"
        report.duration_s = time.monotonic() - started
        record_partition_end(conn, control, partition_key, status, report.counts, writer.unrecorded, settings, error)
        raise
    status = "failed" if report.counts.failed else "completed"
    report.duration_s = time.monotonic() - started
    record_partition_end(conn, control, partition_key, status, report.counts, writer.unrecorded, settings)
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
    unrecorded: FileCounts,
    settings: TaskSettings,
    error: BaseException | None = None,
) -> None:
    """Record how the partition ended (`status`: completed, failed or stopped), its counts and what its
    row does not hold yet (`unrecorded`), and sum the totals if the run has not this past second.
    While `error` ends the partition, a connection that cannot record it is noted on `error` rather
    than hiding it."""
    if conn.closed or conn.broken:
        if error is not None:
            error.add_note(f"partition {partition_key}'s end was not recorded: its database connection was lost")
        return
    try:
        with control.bookkeeping(conn):
            progress_rows.record_progress(conn, partition_key, status, counts, added=unrecorded)
            if control.totals_due():
                progress_rows.record_totals(conn, settings.partition_count)
    except psycopg.Error as failed:
        if error is None:
            raise
        error.add_note(f"partition {partition_key}'s end was not recorded: {failed}")


def record_run_end(conn: psycopg.Connection, control: RunControl, settings: TaskSettings) -> None:
    """The totals row summed from the partition rows, as a run ends."""
    with control.bookkeeping(conn):
        progress_rows.record_totals(conn, settings.partition_count)


def remove_orphaned_values(
    conn: psycopg.Connection, app_ids: AppIdRange, settings: TaskSettings, control: RunControl, log: Log
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
        try:
            with control.write(conn):
                live_updates.before_writing(conn, app_id, settings.live_updates, settings.wal_msg_log_to_table)
                removed = writes.remove_orphaned_values(conn, app_id)
        except psycopg.errors.ForeignKeyViolation as error:
            if not writes.app_deleted(error):
                raise
            removed = 0  # the app was deleted meanwhile, its triples with it
        mended += removed
    log.warning(
        f"removed the hash and lastModified of {mended} files of partition {app_ids.key} that have no location-id"
    )
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
    settings: TaskSettings,
    control: RunControl,
    *,
    after_key: str | None = None,
) -> None:
    """HEAD every file of the range that lacks `hash` (whose key is past `after_key`, where the app's
    listing got that far). A sliding window keeps requests in flight while pages are read and batches written:
    no batch waits for its slowest HEAD before the next starts."""
    window: collections.deque[tuple[reads.PendingFile, str | None, PendingHead | InvalidLocationId]] = (
        collections.deque()
    )
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
            if isinstance(pending, PendingHead):
                pending.cancel()
    writer.flush()
    progress_log()


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
    that lack `hash` at its locations; the files not listed are missing. Returns ALL_LISTED, or,
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
        listed = ALL_LISTED
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
                if listed is ALL_LISTED:  # else the HEADs meet it
                    writer.invalid(file, str(invalid))
                continue
            if listed_up_to(key, listed):
                writer.missing(file, key, f"no such object in S3 (not in the listing of {prefix})")
        writer.flush()
        progress_log()
    return listed


def plan(conn: psycopg.Connection, keys: list[str]) -> Plan:
    """Work: partitions never completed that have files, with files lacking hash beyond those known
    unfillable, or with values on files deleted meanwhile. A partition with no file at all is
    recorded completed here, in one transaction."""
    width, app_ids = len(keys[0]), AppIdRange.spanning(keys)
    counts = reads.entity_counts_by_partition(conn, width, app_ids)
    coverage, orphaned = counts.coverage, counts.orphaned_values
    state = progress_rows.read_partition_progress(conn, keys)
    candidates = set(progress_rows.partitions_with_work(keys, coverage, state)) | set(orphaned)
    with_work = [key for key in keys if key in candidates and (key in coverage or key in orphaned)]
    never_done_empty = [key for key in keys if key in candidates and key not in coverage and key not in orphaned]
    if never_done_empty:
        with conn.transaction():
            progress_rows.record_empty_partitions(conn, never_done_empty)
            progress_rows.record_totals(conn, 16**width)
    return Plan.of(keys, with_work, sum(coverage[key].lacking_hash for key in with_work if key in coverage))


BACKFILL = PartitionTask("backfill", FileCounts, backfill_partition, plan, record_run_end)
