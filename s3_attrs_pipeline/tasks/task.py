"""What every task a run does to a partition shares, the backfill (backfill.py) and the refresh
(refresh.py) alike: its settings, its plan of a range, its report and its failure, the log it writes
to and the problem files it names, the lock that keeps two runs off one partition, and the protocol
by which a run (runs/range_run.py) drives a task without knowing which it is. No Dagster here."""

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Protocol

import psycopg

from s3_attrs_pipeline.counts import FileCounts, RefreshCounts
from s3_attrs_pipeline.instant import catalog, partition_locks, reads
from s3_attrs_pipeline.instant.live_updates import DEFAULT_LIVE_UPDATES, LiveUpdates
from s3_attrs_pipeline.instant.replication import ReplicationLimits
from s3_attrs_pipeline.s3.store import ObjectStore
from s3_attrs_pipeline.settings import setting

LOGGED_FILES_PER_KIND = 20  # per partition and kind of problem; the rest are only counted


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
class TaskSettings:
    """How a task works its partition."""

    batch_size: int = setting(50, help="Files written per transaction (and read per page).", cli="--batch-size")
    list_threshold: int = setting(
        1000,
        help="An app is read with ListObjectsV2 (1,000 objects a request) instead of one HEAD per file when at "
        "least this many of its files are to do and they are at least a tenth of its files; 0 never lists.",
        cli="--list-threshold",
    )
    live_updates: LiveUpdates = setting(
        DEFAULT_LIVE_UPDATES,
        help="Whether InstantDB hears of the writes. queries: each transaction writes one app's triples with a "
        "`transactions` row of that app, so live queries see them; entities: also the entity messages sync "
        "subscriptions and webhooks consume (webhooks on $files fire for every file); off: raw inserts that "
        "InstantDB never hears of, like the REPL migration.",
        env="S3_ATTRS_LIVE_UPDATES",
        cli="--live-updates",
    )
    wal_msg_log_to_table: bool = setting(
        False,
        help="At live_updates=entities, log the entity messages to the `wal_logs` table instead of the WAL "
        "(instant.wal_msg_log_to_table), as InstantDB does for apps so configured.",
        env="S3_ATTRS_WAL_MSG_LOG_TO_TABLE",
    )
    replication: ReplicationLimits = ReplicationLimits()  # its own settings, resolved beside these
    partition_count: int = 256  # of the partitions definition: a partition's end recomputes `completed`

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {self.batch_size}")
        if self.list_threshold < 0:
            raise ValueError(f"list_threshold must be 0 (never list) or more, not {self.list_threshold}")
        if not isinstance(self.live_updates, LiveUpdates):
            levels = ", ".join(level.value for level in LiveUpdates)
            raise ValueError(f"live_updates must be one of {levels}, not {self.live_updates!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which partitions of a run's range a task has work in."""

    with_work: list[str]  # in key order
    without_work: list[str]
    files_to_do: int  # in the partitions with work, for an ETA

    @property
    def partition_count(self) -> int:
        return len(self.with_work) + len(self.without_work)

    @classmethod
    def of(cls, keys: list[str], with_work: list[str], files_to_do: int) -> "Plan":
        """`keys` split into `with_work` (a subset, in key order) and the others."""
        worked = set(with_work)
        return cls(with_work, [key for key in keys if key not in worked], files_to_do)

    def every_partition(self) -> "Plan":
        """The plan with every partition worked, for an operator who wants them all redone."""
        return Plan(sorted(self.with_work + self.without_work), [], self.files_to_do)


@dataclasses.dataclass(frozen=True)
class FileProblem:
    app_id: str
    entity_id: str
    key: str | None
    reason: str


@dataclasses.dataclass
class PartitionReport:
    """What a task did to one partition: the caller's, so that it holds what was done until the
    partition ended, however it ended (a refusal, the run's stop, a database error)."""

    partition_key: str
    counts: FileCounts | RefreshCounts
    left_to_another_run: bool = False  # another session held the partition's lock: this run did nothing
    duration_s: float = 0.0
    problems: list[FileProblem] = dataclasses.field(default_factory=list)  # the first of each kind
    replication_wait_s: float = 0.0  # spent waiting for replication to catch up before writing

    @property
    def files_per_second(self) -> float:
        return self.counts.files / self.duration_s if self.duration_s > 0 else 0.0


class PartitionFailed(RuntimeError):
    """Some files failed in S3 after their retries; the others were done. A rerun retries them.

    Invalid location ids and malformed object metadata do not fail a partition: a rerun cannot mend
    them. They are logged, counted, and left out of the partition's gap like missing objects."""

    def __init__(self, task: str, report: PartitionReport):
        self.report = report
        super().__init__(
            f"partition {report.partition_key}: {report.counts.failed} of {report.counts.files} files failed in S3 "
            f"after their retries; rerun the {task} of the partition to retry them"
        )


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
        self._problems.append(FileProblem(str(file.app_id), str(file.entity_id), key, f"{kind}: {reason}"))
        suffix = " (further ones are only counted)" if count + 1 == LOGGED_FILES_PER_KIND else ""
        getattr(self._log, level)(
            f"{kind} file app={file.app_id} entity={file.entity_id} key={key!r}: {reason}{suffix}"
        )


@contextlib.contextmanager
def locked_partition(conn: psycopg.Connection, store: ObjectStore, report: PartitionReport, log: Log) -> Iterator[bool]:
    """Before a task touches a partition: the catalog made and checked, the bucket readable, and the
    partition's lock taken for the block (False, and `left_to_another_run`, when another session
    holds it: the task then leaves it to that one)."""
    key = report.partition_key
    catalog.ensure_file_attrs(conn)
    store.check_bucket()
    if not partition_locks.try_lock_partition(conn, key):
        report.left_to_another_run = True
        log.warning(f"partition {key} is being worked by another run right now; this run leaves it to that one")
        yield False
        return
    try:
        yield True
    finally:
        if not conn.closed and not conn.broken:  # a lost session's locks went with it
            partition_locks.unlock_partition(conn, key)


@dataclasses.dataclass(frozen=True)
class PartitionTask:
    """What a run does to each partition of its range: the backfill or the refresh."""

    name: str
    counts_type: type
    # (conn, store, partition key, settings, log, on_files=, report=, control=): works the partition
    # into `report`; raises PartitionFailed when some files failed, Stopped when the run stops.
    work: Callable
    plan: Callable[[psycopg.Connection, list[str]], Plan]  # which of these keys have work
    # (conn, control, settings): what the task records once a run's partitions have all ended
    run_ended: Callable | None = None

    def new_report(self, partition_key: str) -> PartitionReport:
        return PartitionReport(partition_key, self.counts_type())


def first_line(error: BaseException) -> str:
    """An error's first line, for a log line or a summary."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
