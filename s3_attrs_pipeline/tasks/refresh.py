"""Refresh: keep `hash` and `lastModified` true after the backfill.

A re-upload to an existing path gives the file a new object under a new location-id and rewrites
its `location-id` triple in place; an object may also be rewritten under its key. The values the
backfill wrote then describe an object that is gone or changed. A refresh re-reads the metadata of
the files that have values (a listing for dense apps, HEADs for the others, as the backfill
chooses) and rewrites the two triples where they differ from the object the file's current
location-id names, as InstantDB rewrites a cardinality-one attr. An unchanged file is not written
(no new row version); a file whose object is gone keeps its values and is counted missing.

Like backfill.py, this knows nothing of Dagster; the caller owns the partition's report. Beside it,
its plan of a range of partitions.
"""

import time

import psycopg

from s3_attrs_pipeline.counts import RefreshCounts
from s3_attrs_pipeline.instant import live_updates, reads, writes
from s3_attrs_pipeline.instant.app_id_ranges import AppIdRange
from s3_attrs_pipeline.instant.object_keys import InvalidLocationId, object_key
from s3_attrs_pipeline.s3 import listing
from s3_attrs_pipeline.s3.store import ListingFailed, ObjectStore
from s3_attrs_pipeline.tasks.control import RunControl
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


def refresh_partition(
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
    """Refresh the partition's files that have values into `report` (a new one if not given), and
    return it; PartitionFailed at the end if some could not be read."""
    report = report if report is not None else REFRESH.new_report(partition_key)
    control = control if control is not None else RunControl(settings.replication, log)
    started = time.monotonic()
    with locked_partition(conn, store, report, log) as locked:
        if not locked:
            return report
        try:
            _refresh_locked_partition(
                conn,
                store,
                AppIdRange.for_partition(partition_key),
                report,
                settings,
                log,
                _Reporter(report, on_files),
                control,
            )
        finally:
            report.duration_s = time.monotonic() - started
    counts = report.counts
    log.info(
        f"S3 attrs refresh of partition {partition_key}: checked={counts.checked} unchanged={counts.unchanged} "
        f"refreshed={counts.refreshed} missing={counts.missing} failed={counts.failed} "
        f"in {report.duration_s:.1f}s"
    )
    if counts.failed:
        raise PartitionFailed(REFRESH.name, report)
    return report


def _refresh_locked_partition(
    conn: psycopg.Connection,
    store: ObjectStore,
    app_ids: AppIdRange,
    report: PartitionReport,
    settings: TaskSettings,
    log: Log,
    reporter: "_Reporter",
    control: RunControl,
) -> None:
    # An app dense in files with values, rather than in files lacking them, is listed here.
    apps = reads.app_file_counts(conn, app_ids)
    listed = apps_to_list(apps, settings.list_threshold, to_do=lambda app: app.populated)
    head_ranges = [(app_range, None) for app_range in ranges_between(app_ids, [app.app_id for app in listed])]
    for app in listed:
        reached = _refresh_listed_app(conn, store, app, report, settings, control, log, reporter)
        if reached is ALL_LISTED:
            report.counts += RefreshCounts(apps_listed=1)
        else:
            head_ranges.append((AppIdRange(app_ids.key, app.app_id, app.app_id), reached))
    problem = ProblemLog(log, report.problems)
    for app_range, after_key in head_ranges:
        for page in reads.iter_pending_batches(conn, app_range, settings.batch_size, with_hash=True):
            _refresh_headed_page(conn, store, page, report, settings, control, problem, after_key)
            reporter()


def _write(conn, app_id, settings: TaskSettings, control: RunControl, report: PartitionReport, refresh):
    """One transaction: one app's rewrites (`refresh(lock)`), as live_updates says InstantDB must see
    them; first, a wait for replication if it lags. Again a moment later if it meets a file being
    deleted or moved right now."""
    lock = settings.live_updates.one_app_per_transaction  # locked where the `transactions` row comes first

    def attempt():
        with control.write(conn) as waited:
            report.replication_wait_s += waited
            live_updates.before_writing(conn, app_id, settings.live_updates, settings.wal_msg_log_to_table)
            return refresh(lock)

    try:
        return writes.retried_when_busy(attempt, control.sleep)
    except psycopg.errors.ForeignKeyViolation as error:
        if not writes.app_deleted(error):
            raise
        return writes.RefreshOutcome(0, 0)  # the app was deleted meanwhile: its files compared with nothing


def _refresh_headed_page(
    conn,
    store,
    page,
    report: PartitionReport,
    settings,
    control: RunControl,
    problem: ProblemLog,
    after_key: str | None,
) -> None:
    """HEAD the page's files (those past `after_key`, where their app's listing got that far) and
    rewrite the values that changed."""
    keyed, found = [], {}
    control.check()
    for file in page:
        try:
            key = object_key(file.app_id, file.location_value)
        except InvalidLocationId as invalid:
            report.counts += RefreshCounts(checked=1, invalid_location_id=1)
            problem("invalid", file, None, str(invalid), level="warning")
            continue
        if not listed_up_to(key, after_key):
            keyed.append((file, key, store.submit_head(key)))
    try:
        outcomes = [(file, key, control.result(future)) for file, key, future in keyed]
    finally:
        for _, _, future in keyed:
            future.cancel()
    for file, key, outcome in outcomes:
        report.counts += RefreshCounts(checked=1, s3_retries=outcome.retries, s3_throttled=outcome.throttled)
        if outcome.metadata is not None:
            found.setdefault(file.app_id, []).append(
                writes.FileObjectAttrs(file, outcome.metadata.hash, outcome.metadata.last_modified_ms)
            )
        elif outcome.missing:
            report.counts += RefreshCounts(missing=1)
            problem("missing", file, key, "no such object in S3 (404); its values are kept", level="warning")
        elif outcome.malformed:
            report.counts += RefreshCounts(malformed_object_metadata=1)
            problem("malformed", file, key, outcome.failure, level="warning")
        else:
            report.counts += RefreshCounts(failed=1)
            problem("failed", file, key, outcome.failure, level="error")
    for app_id, files in found.items():
        outcome = _write(
            conn,
            app_id,
            settings,
            control,
            report,
            lambda lock, files=files: writes.refresh_file_attrs(conn, files, lock=lock),
        )
        # A file moved or deleted since it was read is compared with nothing: it is neither.
        report.counts += RefreshCounts(
            unchanged=outcome.compared - outcome.rewritten,
            refreshed=outcome.rewritten,
            vanished_during_run=len(files) - outcome.compared,
        )


def _refresh_listed_app(
    conn,
    store,
    app: reads.AppFileCount,
    report: PartitionReport,
    settings,
    control: RunControl,
    log: Log,
    reporter: "_Reporter",
) -> object:
    """Refresh the app's files from a listing of it. Returns ALL_LISTED, or, when the listing failed,
    the last key it got to (None for none): the files past it are HEADed instead, each file counted
    once (a rewrite is idempotent)."""
    app_id = app.app_id
    compared = malformed = 0
    listed: object = None
    try:
        for page in listing.prefetched(listed_pages(store, app_id), check=control.check):
            report.counts += RefreshCounts(s3_retries=page.retries, s3_throttled=page.throttled)
            malformed += len(page.malformed)
            if page.attrs.locations:
                outcome = _write(
                    conn,
                    app_id,
                    settings,
                    control,
                    report,
                    lambda lock, page=page: writes.refresh_listed_attrs(conn, page.attrs, lock=lock),
                )
                compared += outcome.compared
                report.counts += RefreshCounts(
                    checked=outcome.compared,
                    unchanged=outcome.compared - outcome.rewritten,
                    refreshed=outcome.rewritten,
                )
                reporter()
            listed = page.last_key if page.last_key is not None else listed
        listed = ALL_LISTED
    except ListingFailed as error:
        log.warning(f"{error}; the app's files past {listed or 'the start'} of its listing are HEADed instead")
    # Files with values the part of the listing read did not hold (or held with malformed metadata):
    # their values stay.
    populated = app.populated if listed is ALL_LISTED else _populated_up_to(conn, app_id, listed)
    unlisted = max(0, populated - compared)
    missing = max(0, unlisted - malformed)
    report.counts += RefreshCounts(checked=unlisted, missing=missing, malformed_object_metadata=unlisted - missing)
    reporter()
    return listed


def _populated_up_to(conn, app_id, listed: str | None) -> int:
    """How many of the app's files with values have a key up to `listed`, the last key a listing that
    failed part way read."""
    if listed is None:
        return 0
    count = 0
    for page in reads.iter_pending_batches(
        conn, AppIdRange(str(app_id), app_id, app_id), listing.LIST_PAGE_SIZE, with_hash=True
    ):
        for file in page:
            try:
                key = object_key(file.app_id, file.location_value)
            except InvalidLocationId:
                continue  # never listed: the HEADs count it
            count += listed_up_to(key, listed)
    return count


class _Reporter:
    """Tells `on_files` what the report's counts gained since it was last called."""

    def __init__(self, report: PartitionReport, on_files: FilesDone):
        self._report = report
        self._on_files = on_files
        self._told = RefreshCounts()

    def __call__(self) -> None:
        counts = self._report.counts
        self._on_files(counts.checked - self._told.checked, counts.failed - self._told.failed)
        self._told = counts


def plan(conn: psycopg.Connection, keys: list[str]) -> Plan:
    """Work: partitions with files that have values."""
    coverage = reads.coverage_by_partition(conn, len(keys[0]), AppIdRange.spanning(keys))
    with_work = [key for key in keys if key in coverage and coverage[key].with_hash]
    return Plan.of(keys, with_work, sum(coverage[key].with_hash for key in with_work))


REFRESH = PartitionTask("refresh", RefreshCounts, refresh_partition, plan)
