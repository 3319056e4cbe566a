"""Backfill one partition: stream its files, HEAD their objects, write the triples batch by batch.

This module joins the InstantDB domain and S3 access; it knows nothing of Dagster, so the same
code runs under an asset, a test or a benchmark. `log` is any logger with info/warning/error.
"""

import dataclasses
import datetime
import time
from typing import Protocol

import psycopg

from s3_attrs_pipeline.instant import database as db
from s3_attrs_pipeline.instant.object_keys import InvalidLocationId, object_key
from s3_attrs_pipeline.instant.partitions import AppIdRange
from s3_attrs_pipeline.s3.object_metadata import ObjectStore

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

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {self.batch_size}")


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
    report.already_populated = db.count_populated_files(conn, app_ids)
    log.info(
        f"Starting S3 attrs backfill of partition {partition_key} (apps {app_ids.first}..{app_ids.last}); "
        f"{report.already_populated} files already populated"
    )
    problem = _ProblemLog(log, report)
    status = "failed"
    last_progress_log = started
    try:
        db.record_progress(conn, db.ProgressUpdate(partition_key, report.as_progress_state("running")))
        for batch in db.iter_pending_batches(conn, app_ids, settings.batch_size):
            _backfill_batch(conn, store, batch, report, problem)
            report.duration_s = time.monotonic() - started
            if time.monotonic() - last_progress_log >= PROGRESS_LOG_INTERVAL_S:
                last_progress_log = time.monotonic()
                log.info(
                    f"Processed batch {report.batches} of partition {partition_key}: "
                    f"total-processed={report.processed} successful={report.successful} missing={report.missing} "
                    f"failed={report.failed} ({report.files_per_second:.0f} files/s)"
                )
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


def _backfill_batch(
    conn: psycopg.Connection,
    store: ObjectStore,
    batch: list[db.PendingFile],
    report: PartitionReport,
    problem: _ProblemLog,
) -> None:
    located: list[tuple[db.PendingFile, str]] = []
    invalid = 0
    for file in batch:
        try:
            located.append((file, object_key(file.app_id, file.location_value)))
        except InvalidLocationId as error:
            invalid += 1
            problem("invalid", file, None, str(error), level="warning")

    to_write: list[db.FileObjectAttrs] = []
    missing = failed = malformed = retries = 0
    for (file, key), outcome in zip(located, store.head_many([key for _, key in located])):
        retries += outcome.retries
        if outcome.metadata is not None:
            to_write.append(db.FileObjectAttrs(file, outcome.metadata.hash, outcome.metadata.last_modified_ms))
        elif outcome.missing:
            missing += 1
            problem("missing", file, key, "no such object in S3 (404)", level="warning")
        elif outcome.malformed:
            malformed += 1
            problem("malformed", file, key, outcome.failure, level="warning")
        else:
            failed += 1
            problem("failed", file, key, outcome.failure, level="error")

    counted = dataclasses.replace(
        report,
        batches=report.batches + 1,
        processed=report.processed + len(batch),
        missing=report.missing + missing,
        failed=report.failed + failed,
        invalid=report.invalid + invalid,
        malformed=report.malformed + malformed,
        s3_retries=report.s3_retries + retries,
    )

    def progress_after(outcome: db.BatchWriteOutcome) -> db.ProgressUpdate:
        state = _with_write(counted, outcome).as_progress_state("running")
        return db.ProgressUpdate(
            report.partition_key,
            state | {"last-entity-id": str(batch[-1].entity_id)},
            processed=len(batch),
            successful=outcome.written,
            failed=failed + invalid + malformed,
            missing=missing,
        )

    done = _with_write(counted, db.write_file_attrs(conn, to_write, progress_after))
    for field in dataclasses.fields(PartitionReport):
        setattr(report, field.name, getattr(done, field.name))


def _with_write(report: PartitionReport, outcome: db.BatchWriteOutcome) -> PartitionReport:
    return dataclasses.replace(
        report,
        successful=report.successful + outcome.written,
        already_populated=report.already_populated + outcome.already_populated,
        vanished=report.vanished + outcome.vanished,
    )


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
