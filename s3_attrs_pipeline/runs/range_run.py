"""One run over a range of partitions: plan which have work from one read of the database, work those
`partitions_at_once` at a time, each on a connection of its own, and hand every partition's outcome
back as it ends, so that a failed partition neither stops nor fails the others.

A run per partition costs seconds of orchestration each, and most partitions of a real database
hold nothing to do: the plan lets them cost one shared query instead. A run drives a task
(tasks/task.PartitionTask: the backfill or the refresh) without knowing which. No Dagster here: the
assets (defs/range_materialization.py) and the CLI drive it.
"""

import contextlib
import dataclasses
import enum
import itertools
import queue
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

import psycopg

from s3_attrs_pipeline.instant.catalog import CatalogMismatch
from s3_attrs_pipeline.instant.operator_control import OperatorControl
from s3_attrs_pipeline.s3.store import ObjectStore, S3AccessError, StoreStopped
from s3_attrs_pipeline.settings import setting
from s3_attrs_pipeline.tasks.control import RunControl, Stopped
from s3_attrs_pipeline.tasks.operator_gate import CONTROL_POLL_S
from s3_attrs_pipeline.tasks.task import (
    Log,
    PartitionFailed,
    PartitionReport,
    PartitionTask,
    Plan,
    TaskSettings,
    first_line,
)

RUN_PROGRESS_LOG_INTERVAL_S = 30.0
# The workers' lines (a file missing in S3, a wait for replication) are written at most this often,
# those of each second together: every entry is an event the run's storage writes in the run's one
# thread (~5 ms), and a run with 1% of its files missing has thousands of such lines.
LOG_LINES_INTERVAL_S = 1.0


@dataclasses.dataclass(frozen=True)
class RangeSettings:
    """How a run works its range of partitions."""

    partitions_at_once: int = setting(
        8,
        help="Partitions worked at once in a run, each on a database connection of its own. They share the S3 "
        "requests in flight (max_in_flight): more mostly overlaps database round trips.",
        cli="--parallel",
    )
    every_partition: bool = setting(
        False, help="Work every partition of the range, also those the plan finds nothing to do in.", cli="--all"
    )
    max_failed_share: float = setting(
        0.5,
        help="The failure threshold: the run stops when more than this share of the files it tried so far failed "
        "in S3 (after their retries), once it tried failure_threshold_files; 1 never stops.",
        cli="--max-failed-share",
    )
    failure_threshold_files: int = setting(
        1000, help="Files a run tries before its failure threshold is judged.", cli="--failure-threshold-files"
    )

    def __post_init__(self):
        if self.partitions_at_once < 1:
            raise ValueError(f"partitions_at_once must be at least 1, not {self.partitions_at_once}")
        if not 0 < self.max_failed_share <= 1:
            raise ValueError(f"max_failed_share must be more than 0 and at most 1, not {self.max_failed_share}")
        if self.failure_threshold_files < 1:
            raise ValueError(f"failure_threshold_files must be at least 1, not {self.failure_threshold_files}")

    def threshold_text(self) -> str:
        return (
            f"stop when more than {self.max_failed_share:.0%} of the files tried failed in S3, "
            f"from {self.failure_threshold_files:,} files tried"
        )


class TooManyFailures(RuntimeError):
    """More than the failure threshold's share of the files tried failed in S3: the run stops."""


class _FailureThreshold:
    """Counts the files every partition of the run tried, from any worker thread."""

    def __init__(self, settings: RangeSettings):
        self._settings = settings
        self._lock = threading.Lock()
        self._tried = self._failed = 0

    def add(self, tried: int, failed: int) -> None:
        """Raises TooManyFailures, in the worker that crossed the threshold and in every one after."""
        with self._lock:
            self._tried += tried
            self._failed += failed
            tried, failed = self._tried, self._failed
        settings = self._settings
        if tried >= settings.failure_threshold_files and failed > settings.max_failed_share * tried:
            raise TooManyFailures(
                f"{failed} of the {tried} files tried failed in S3, more than {settings.max_failed_share:.0%} of the "
                f"files tried: the run stopped at its failure threshold ({settings.threshold_text()}); see the "
                "failed files in the run's log"
            )


class Ended(enum.StrEnum):
    """How a partition's work in a run ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # some files, or the whole partition, failed: the run fails naming it
    STOPPED = "stopped"  # the run stopped before the partition was finished (or started)
    LEFT = "left"  # another run was working on it: this run left it to that one


@dataclasses.dataclass(frozen=True)
class PartitionOutcome:
    partition_key: str
    report: PartitionReport  # what was done until it ended, however it ended
    ended: Ended = Ended.SUCCEEDED
    error: str | None = None  # why it failed or stopped
    retryable: bool = True  # False when a rerun would meet the same wall (settings, bucket, catalog)

    @property
    def succeeded(self) -> bool:
        return self.ended is Ended.SUCCEEDED


class Listener(Protocol):
    """Hears a run's progress, always in the thread that waits on `RangeWorkers`."""

    def planned(self, plan: Plan) -> None: ...
    def files_done(self, files: int, failed: int) -> None: ...
    def partition_done(self, outcome: PartitionOutcome) -> None: ...
    def waiting(self, text: str | None) -> None: ...  # what the run waits for (replication); None: no longer
    def paused(self, text: str | None) -> None: ...  # the operator's pause that holds the run; None: resumed
    def stopping(self, reason: str) -> None: ...


class NoListener:
    def planned(self, plan: Plan) -> None:
        pass

    def files_done(self, files: int, failed: int) -> None:
        pass

    def partition_done(self, outcome: PartitionOutcome) -> None:
        pass

    def waiting(self, text: str | None) -> None:
        pass

    def paused(self, text: str | None) -> None:
        pass

    def stopping(self, reason: str) -> None:
        pass


class _QueuedLog:
    """A worker's log: its lines travel to the waiting thread, which alone writes the run's log. Info
    lines (a partition's end, its progress) do not, unless `infos`: each line is an event the run's
    storage writes, ~5-10 ms of that one thread, and the partition's materialization carries the same
    numbers; the run logs its own progress instead (RUN_PROGRESS_LOG_INTERVAL_S). The replication
    gate's lines (what the run waits for) do."""

    def __init__(self, events: queue.Queue, *, infos: bool = False):
        self._events = events
        self._infos = infos

    def info(self, msg: str) -> None:
        if self._infos:
            self._events.put(("log", "info", msg))

    def warning(self, msg: str) -> None:
        self._events.put(("log", "warning", msg))

    def error(self, msg: str) -> None:
        self._events.put(("log", "error", msg))


class RangeWorkers:
    """Works `keys` (the plan's partitions with work), `partitions_at_once` at a time, from the moment
    it is made, so the caller can do other things meanwhile (hand Dagster the partitions without
    work); `wait()` gives each partition's outcome as it ends. `control` is the run's: stopping it
    (the caller does on an interrupt) ends every partition within a batch. An S3 refusal, a wrong
    catalog or the failure threshold stop the run the same way: the partitions not yet started end
    stopped, with that reason, without being tried.

    Leaving the `with` block stops the workers and waits for them, unless it is left by GeneratorExit
    (the run's step will never run again): then the workers are left to the process's end, their
    commits paused (see run_control)."""

    def __init__(
        self,
        keys: list[str],
        *,
        task: PartitionTask,
        connect: Callable[[], AbstractContextManager[psycopg.Connection]],
        store: ObjectStore,
        settings: TaskSettings,
        log: Log,
        listener: Listener,
        range_settings: RangeSettings = RangeSettings(),
    ):
        self._keys = keys
        self._log = log
        self._listener = listener
        self._todo: queue.SimpleQueue[str] = queue.SimpleQueue()
        for key in keys:
            self._todo.put(key)
        self._events: queue.Queue = queue.Queue()
        self.control = RunControl(
            settings.replication,
            _QueuedLog(self._events, infos=True),
            on_waiting=lambda text: self._events.put(("waiting", text)),
            on_paused=lambda text: self._events.put(("paused", text)),
        )
        self.control.on_stop(store.stop)
        self.control.operator.on_change(lambda control: _obey(store, control))
        self.control.on_stop(lambda: self._events.put(("stopping",)))
        self._work = (task, connect, store, settings)
        self._threshold = _FailureThreshold(range_settings)
        if keys:  # the operator's control as it is, before a worker takes a partition
            with connect() as conn:
                self.control.operator.refresh(conn)
        self._threads = [
            threading.Thread(target=self._worker, args=(n,), name=f"partition-worker-{n}", daemon=True)
            for n in range(min(range_settings.partitions_at_once, len(keys)))
        ]
        self._finished_keys: set[str] = set()
        self._leaving = threading.Lock()
        self._working = len(self._threads)
        self._workers_ended = 0
        self._unexpected: BaseException | None = None
        self.finished = not self._threads
        self._files = self._failed_files = 0
        self._started = self._logged = time.monotonic()
        self._waiting_for: str | None = None
        self._lines: list[tuple[str, str]] = []  # the workers' log lines not yet written: (level, line)
        self._lines_written = time.monotonic()
        for thread in self._threads:
            thread.start()

    def __enter__(self) -> "RangeWorkers":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is GeneratorExit:
            self.control.stop("the run ended while it handed its events to Dagster")
            return
        if any(thread.is_alive() for thread in self._threads):
            self.control.stop("the run was interrupted" if exc_type is not None else "the run ended")
        self.join()
        self._write_lines()

    def join(self) -> None:
        """Wait for the workers to end (after a stop, each ends within a batch)."""
        for thread in self._threads:
            thread.join()

    def _worker(self, number: int) -> None:
        task, connect, store, settings = self._work
        events, log, control = self._events, _QueuedLog(self._events), self.control

        def on_files(files: int, failed: int) -> None:
            events.put(("files", files, failed))
            self._threshold.add(files, failed)

        left = False
        try:
            with contextlib.ExitStack() as connection:
                conn = None

                def connected() -> psycopg.Connection:
                    nonlocal conn
                    if conn is None or conn.closed or conn.broken:
                        connection.close()
                        conn = connection.enter_context(connect())
                    return conn

                while not control.stopping and self._may_start(number):
                    try:
                        key = self._todo.get_nowait()
                    except queue.Empty:
                        break
                    outcome = _work_one(task, connected(), store, key, settings, log, on_files, control)
                    if not outcome.retryable:
                        control.stop(outcome.error)  # before any worker takes another partition
                    events.put(("outcome", outcome))
                left = True
                if self._leave() and task.run_ended is not None:
                    task.run_ended(connected(), control, settings)
        except BaseException as error:  # ends this worker; the waiting thread raises it (or names it)
            if not left:
                self._leave()
            events.put(("worker_failed", error))
        finally:
            events.put(("worker_done",))

    def _may_start(self, number: int) -> bool:
        """Before worker `number` takes a partition: wait while the operator allows fewer partitions at
        once than this worker's number (a lowered limit takes effect as partitions end; the other
        workers' gates read the control). False when there is nothing left to take, or the run stops."""
        while not self.control.operator.allows(number):
            if self._todo.empty():
                return False
            try:
                self.control.sleep(CONTROL_POLL_S)
            except Stopped:
                return False
        return True

    def _leave(self) -> bool:
        """A worker takes no more partitions: whether it is the run's last."""
        with self._leaving:
            self._working -= 1
            return self._working == 0

    def wait(self, timeout: float) -> list[PartitionOutcome]:
        """The outcomes of the partitions that ended since the last call: at once if some did, else
        once one does or `timeout` passes. Meanwhile the workers' log lines (each second's together)
        and progress reach the log and the listener, in this thread. Once every worker has ended, the
        partitions never started end stopped, and `finished` is set."""
        ended: list[PartitionOutcome] = []
        block = True
        if self._lines:  # written within LOG_LINES_INTERVAL_S whatever the caller's timeout
            timeout = max(0.0, min(timeout, self._lines_written + LOG_LINES_INTERVAL_S - time.monotonic()))
        while not self.finished:
            try:
                event = self._events.get(timeout=timeout) if block else self._events.get_nowait()
            except queue.Empty:
                break
            block = False
            self._handle(event, ended)
        if self.finished or time.monotonic() - self._lines_written >= LOG_LINES_INTERVAL_S:
            self._write_lines()
        self._log_progress()
        if self._unexpected is not None and self.finished:
            unexpected, self._unexpected = self._unexpected, None
            raise unexpected
        return ended

    def _handle(self, event: tuple, ended: list[PartitionOutcome]) -> None:
        kind = event[0]
        if kind == "log":
            self._lines.append((event[1], event[2]))
        elif kind == "files":
            self._files, self._failed_files = self._files + event[1], self._failed_files + event[2]
            self._listener.files_done(event[1], event[2])
        elif kind == "waiting":
            self._waiting_for = event[1]
            self._listener.waiting(event[1])
        elif kind == "paused":
            self._listener.paused(event[1])
        elif kind == "stopping":
            self._listener.stopping(self.control.stop_reason)
        elif kind == "outcome":
            outcome = event[1]
            self._finished_keys.add(outcome.partition_key)
            self._listener.partition_done(outcome)
            ended.append(outcome)
        elif kind == "worker_failed":
            if not isinstance(event[1], psycopg.Error):
                self._unexpected = self._unexpected or event[1]
            self.control.stop(f"a worker could not go on: {first_line(event[1])}")
        else:
            self._workers_ended += 1
            if self._workers_ended == len(self._threads):
                ended.extend(self._never_started())
                self.finished = True

    def _never_started(self) -> list[PartitionOutcome]:
        task = self._work[0]
        outcomes = [
            PartitionOutcome(key, task.new_report(key), Ended.STOPPED, f"not started: {self.control.stop_reason}")
            for key in self._keys
            if key not in self._finished_keys
        ]
        for outcome in outcomes:
            self._listener.partition_done(outcome)
        return outcomes

    def _write_lines(self) -> None:
        """The workers' lines since the last call, each run of lines of one level as one entry."""
        self._lines_written = time.monotonic()
        lines, self._lines = self._lines, []
        for level, group in itertools.groupby(lines, key=lambda line: line[0]):
            getattr(self._log, level)("\n".join(line for _, line in group))

    def _log_progress(self) -> None:
        now = time.monotonic()
        if now - self._logged < RUN_PROGRESS_LOG_INTERVAL_S:
            return
        self._logged = now
        waiting = f"; waiting for replication: {self._waiting_for}" if self._waiting_for else ""
        self._log.info(
            f"{len(self._finished_keys)} of {len(self._keys)} partitions with work done, {self._files} files "
            f"({self._files / (now - self._started):.0f} files/s), {self._failed_files} failed in S3{waiting}"
        )


def _obey(store: ObjectStore, control: OperatorControl) -> None:
    """The operator's control, in the run's store: its ceiling, and no request sent while paused."""
    store.rate_limiter.set_ceiling(control.max_rps)
    store.rate_limiter.hold(control.paused)


def _work_one(
    task: PartitionTask, conn, store, key: str, settings: TaskSettings, log: Log, on_files, control: RunControl
) -> PartitionOutcome:
    report = task.new_report(key)
    try:
        control.operator.before_work(conn)  # a paused run starts no partition: not one S3 request
        task.work(conn, store, key, settings, log, on_files=on_files, report=report, control=control)
    except PartitionFailed as failed:
        return PartitionOutcome(key, report, Ended.FAILED, str(failed))
    except (Stopped, StoreStopped):
        return PartitionOutcome(key, report, Ended.STOPPED, f"stopped: {control.stop_reason}")
    except (S3AccessError, CatalogMismatch, TooManyFailures) as error:
        log.error(f"partition {key}: {error}")
        return PartitionOutcome(key, report, Ended.FAILED, str(error), retryable=False)
    except psycopg.Error as error:
        log.error(f"partition {key}: database error: {first_line(error)}")
        return PartitionOutcome(key, report, Ended.FAILED, f"database error: {first_line(error)}")
    if report.left_to_another_run:
        return PartitionOutcome(key, report, Ended.LEFT)
    return PartitionOutcome(key, report)
