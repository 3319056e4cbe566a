"""Refresh: keep `hash` and `lastModified` true after the backfill.

A re-upload to an existing path gives the file a new object under a new location-id and rewrites
its `location-id` triple in place; an object may also be rewritten under its key. The values the
backfill wrote then describe an object that is gone or changed. A refresh re-reads the metadata of
the files that have values (a listing for dense apps, HEADs for the others, as the backfill
chooses) and rewrites the two triples where they differ from the object the file's current
location-id names, as InstantDB rewrites a cardinality-one attr. An unchanged file is not written
(no new row version); a file whose object is gone keeps its values and is counted missing.

Like backfill.py, this knows nothing of Dagster.
"""

import dataclasses
import time

import psycopg

from s3_attrs_pipeline.backfill import (
    BackfillSettings,
    FileProblem,
    FilesDone,
    Log,
    ProblemLog,
    apps_to_list,
    listed_pages,
    no_progress,
    ranges_between,
)
from s3_attrs_pipeline.counts import RefreshCounts
from s3_attrs_pipeline.instant import catalog, live_updates, partition_locks, reads, writes
from s3_attrs_pipeline.instant.app_id_ranges import AppIdRange
from s3_attrs_pipeline.instant.object_keys import InvalidLocationId, object_key
from s3_attrs_pipeline.instant.replication import ReplicationGate
from s3_attrs_pipeline.s3 import listing
from s3_attrs_pipeline.s3.store import ListingFailed, ObjectStore


@dataclasses.dataclass
class RefreshReport:
    partition_key: str
    counts: RefreshCounts = RefreshCounts()
    concurrent_run: bool = False
    duration_s: float = 0.0
    problems: list[FileProblem] = dataclasses.field(default_factory=list)  # the first of each kind
    replication_wait_s: float = 0.0  # spent waiting for replication to catch up before writing


class RefreshFailed(RuntimeError):
    """Some files could not be read from S3 after their retries; the others were refreshed."""

    def __init__(self, report: RefreshReport):
        self.report = report
        super().__init__(
            f"partition {report.partition_key}: {report.counts.failed} of {report.counts.checked} files failed in "
            "S3 after their retries; rerun the refresh of the partition to retry them"
        )


def refresh_partition(
    conn: psycopg.Connection,
    store: ObjectStore,
    partition_key: str,
    settings: BackfillSettings,
    log: Log,
    on_files: FilesDone = no_progress,
) -> RefreshReport:
    report = RefreshReport(partition_key)
    catalog.ensure_file_attrs(conn)
    store.check_bucket()
    if not partition_locks.try_lock_partition(conn, partition_key):
        report.concurrent_run = True
        log.warning(f"partition {partition_key} is being backfilled or refreshed by another run; this run leaves it")
        return report
    started = time.monotonic()
    try:
        _refresh_locked_partition(
            conn, store, AppIdRange.for_partition(partition_key), report, settings, log, _Reporter(report, on_files)
        )
    finally:
        partition_locks.unlock_partition(conn, partition_key)
        report.duration_s = time.monotonic() - started
    counts = report.counts
    log.info(
        f"S3 attrs refresh of partition {partition_key}: checked={counts.checked} unchanged={counts.unchanged} "
        f"refreshed={counts.refreshed} missing={counts.missing} failed={counts.failed} "
        f"in {report.duration_s:.1f}s"
    )
    if counts.failed:
        raise RefreshFailed(report)
    return report


def _refresh_locked_partition(
    conn: psycopg.Connection,
    store: ObjectStore,
    app_ids: AppIdRange,
    report: RefreshReport,
    settings: BackfillSettings,
    log: Log,
    reporter: "_Reporter",
) -> None:
    # An app dense in files with values, rather than in files lacking them, is listed here.
    apps = reads.app_file_counts(conn, app_ids)
    listed = apps_to_list(apps, settings.list_threshold, to_do=lambda app: app.populated)
    head_ranges = ranges_between(app_ids, [app.app_id for app in listed])
    replication = ReplicationGate(conn, settings.replication, log)
    for app in listed:
        if _refresh_listed_app(conn, store, app.app_id, app.populated, report, settings, replication, log, reporter):
            report.counts += RefreshCounts(apps_listed=1)
        else:
            head_ranges.append(AppIdRange(app_ids.key, app.app_id, app.app_id))
    problem = ProblemLog(log, report.problems)
    for app_range in head_ranges:
        for page in reads.iter_pending_batches(conn, app_range, settings.batch_size, with_hash=True):
            _refresh_headed_page(conn, store, page, report, settings, replication, problem)
            reporter()
    report.replication_wait_s = replication.waited_s


def _write(conn, app_id, settings: BackfillSettings, replication: ReplicationGate, refresh) -> writes.RefreshOutcome:
    """One transaction: one app's rewrites, as live_updates says InstantDB must see them; first, a
    wait for replication if it lags."""
    replication.before_write()
    with conn.transaction():
        live_updates.before_writing(conn, app_id, settings.live_updates, settings.wal_msg_log_to_table)
        outcome = refresh()
        live_updates.after_writing(conn, app_id, settings.live_updates, outcome.rewritten)
    return outcome


def _refresh_headed_page(
    conn, store, page, report: RefreshReport, settings, replication: ReplicationGate, problem: ProblemLog
) -> None:
    keyed, found = [], {}
    for file in page:
        try:
            keyed.append((file, object_key(file.app_id, file.location_value)))
        except InvalidLocationId as invalid:
            report.counts += RefreshCounts(checked=1, invalid_location_id=1)
            problem("invalid", file, None, str(invalid), level="warning")
    for (file, key), outcome in zip(keyed, store.head_many([key for _, key in keyed])):
        report.counts += RefreshCounts(checked=1, s3_retries=outcome.retries)
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
        outcome = _write(conn, app_id, settings, replication, lambda: writes.refresh_file_attrs(conn, files))
        # A file moved or deleted since it was read is compared with nothing: it is neither.
        report.counts += RefreshCounts(
            unchanged=outcome.compared - outcome.rewritten,
            refreshed=outcome.rewritten,
            vanished_during_run=len(files) - outcome.compared,
        )


def _refresh_listed_app(
    conn,
    store,
    app_id,
    populated: int,
    report: RefreshReport,
    settings,
    replication: ReplicationGate,
    log: Log,
    reporter: "_Reporter",
) -> bool:
    """False if the listing failed: the app is then HEADed instead, from the start (a rewrite is
    idempotent)."""
    compared = malformed = 0
    try:
        for page in listing.prefetched(listed_pages(store, app_id)):
            malformed += len(page.malformed)
            if page.attrs.locations:
                outcome = _write(
                    conn, app_id, settings, replication, lambda: writes.refresh_listed_attrs(conn, page.attrs)
                )
                compared += outcome.compared
                report.counts += RefreshCounts(
                    checked=outcome.compared,
                    unchanged=outcome.compared - outcome.rewritten,
                    refreshed=outcome.rewritten,
                )
                reporter()
    except ListingFailed as error:
        log.warning(f"{error}; the app's files are HEADed instead")
        return False
    # Populated files the listing did not hold (or held with malformed metadata): their values stay.
    unlisted = max(0, populated - compared)
    missing = max(0, unlisted - malformed)
    report.counts += RefreshCounts(
        checked=unlisted, missing=missing, malformed_object_metadata=unlisted - missing
    )
    reporter()
    return True


class _Reporter:
    """Tells `on_files` what the report's counts gained since it was last called."""

    def __init__(self, report: RefreshReport, on_files: FilesDone):
        self._report = report
        self._on_files = on_files
        self._told = RefreshCounts()

    def __call__(self) -> None:
        counts = self._report.counts
        self._on_files(counts.checked - self._told.checked, counts.failed - self._told.failed)
        self._told = counts
