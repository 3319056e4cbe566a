"""What every partition a run works at once obeys: the run's stop, the pause of its commits while the
run hands events to Dagster, the operator's control (pause, ceilings) and the replication gate. No
Dagster here.

A run stops when it is told to (the UI's Terminate, Ctrl-C, SIGTERM) or when one partition meets a
wall the others would meet too (S3 refusing the credentials, the failure threshold). Every wait of a
worker (a HEAD's answer, a listing page, replication catching up) looks at the stop at least every
STOP_POLL_S, and a batch whose statements ran is committed only if the run is not stopping: a stop
ends a partition within a batch, its batch in progress rolled back.

Why commits pause. The run reports its progress by handing Dagster an event per partition, from the
one thread that runs its step; while Dagster stores it, that thread is Dagster's. An interrupt that
arrives then is raised by Dagster before it hands the thread back, and Dagster records the run ended
without the step ever running again. So while the step hands events over, the workers' commits wait
(their statements go on): if the step is never resumed they wait for good, and nothing is committed
once Dagster shows the run ended. A commit waits a few milliseconds a partition (Dagster stores an
event in ~12 ms).
"""

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import psycopg

from s3_attrs_pipeline.instant.replication import Log, ReplicationGate, ReplicationLimits
from s3_attrs_pipeline.tasks.operator_gate import OperatorGate

STOP_POLL_S = 0.2  # how often a waiting worker looks at the stop
TOTALS_INTERVAL_S = 1.0  # a run sums the progress totals at most this often as its partitions end

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)


class _Pending(Protocol[_T_co]):
    """A request in flight (the store's PendingHead, a concurrent.futures.Future)."""

    def result(self, timeout: float | None = None) -> _T_co: ...


class Stopped(Exception):
    """The run is stopping: the partition ends where it is, its batch in progress not committed."""


class RunControl:
    """Shared by the workers of one run, and by the thread that hands the run's events to Dagster."""

    def __init__(
        self,
        replication: ReplicationLimits,
        log: Log,
        *,
        on_waiting: Callable[[str | None], None] = lambda text: None,
        on_paused: Callable[[str | None], None] = lambda text: None,
    ):
        self._stop = threading.Event()
        self.stop_reason: str | None = None
        self._on_stop: list[Callable[[], None]] = []
        self._turns = threading.Condition()
        self._paused = False  # the step is handing events to Dagster: no commit may begin
        self._committing = 0
        self._totals_at = -TOTALS_INTERVAL_S
        self.replication = ReplicationGate(replication, log, sleep=self.sleep, on_waiting=on_waiting)
        self.operator = OperatorGate(log, sleep=self.sleep, on_waiting=on_paused)

    # The stop

    def stop(self, reason: str) -> None:
        """Stop the run: the first reason given is the one reported."""
        with self._turns:
            if self.stop_reason is None:
                self.stop_reason = reason
            self._stop.set()
            self._turns.notify_all()
            callbacks, self._on_stop = self._on_stop, []
        for callback in callbacks:
            callback()

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call `callback` once, when the run stops (at once if it has)."""
        with self._turns:
            if not self._stop.is_set():
                self._on_stop.append(callback)
                return
        callback()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def check(self) -> None:
        """Raise Stopped if the run is stopping."""
        if self._stop.is_set():
            raise Stopped(self.stop_reason)

    def sleep(self, seconds: float) -> None:
        """Sleep, unless the run stops meanwhile: then raise Stopped at once."""
        if self._stop.wait(seconds):
            raise Stopped(self.stop_reason)

    def result(self, pending: _Pending[_T]) -> _T:
        """The result of a request in flight, or Stopped as soon as the run stops."""
        while True:
            try:
                return pending.result(timeout=STOP_POLL_S)
            except TimeoutError:  # concurrent.futures' too
                self.check()

    def totals_due(self) -> bool:
        """Whether a partition ending now sums the run's progress totals: not if another did within
        TOTALS_INTERVAL_S (the run's end sums them in any case). True marks them summed now."""
        with self._turns:
            now = time.monotonic()
            if now - self._totals_at < TOTALS_INTERVAL_S:
                return False
            self._totals_at = now
            return True

    # Commits

    @contextlib.contextmanager
    def write(self, conn: psycopg.Connection) -> Iterator[float]:
        """One write transaction of a partition: first a wait while the operator's pause holds, and
        one for replication (outside it), whose seconds it yields; then the caller's statements,
        committed only if the run is not stopping (else rolled back, raising Stopped) and not while the
        step hands events to Dagster."""
        self.check()
        self.operator.before_work(conn)
        waited = self.replication.before_write(conn)
        with self._transaction(conn, while_stopping=False):
            yield waited

    @contextlib.contextmanager
    def bookkeeping(self, conn: psycopg.Connection) -> Iterator[None]:
        """A transaction that records where a partition got to: after the operator's pause and a wait
        for replication unless the run is stopping (a stop must not wait on either), and committed also
        while the run stops (it records the stop), but never while the step hands events to Dagster."""
        try:
            if not self.stopping:
                self.operator.before_work(conn)
                self.replication.before_write(conn)
        except Stopped:
            pass  # the run stopped during the wait: record where the partition got to all the same
        with self._transaction(conn, while_stopping=True):
            yield

    @contextlib.contextmanager
    def _transaction(self, conn: psycopg.Connection, *, while_stopping: bool) -> Iterator[None]:
        committing = False
        try:
            with conn.transaction():
                yield
                with self._turns:
                    while self._paused:
                        self._turns.wait()
                    if self._stop.is_set() and not while_stopping:
                        raise Stopped(self.stop_reason)
                    self._committing += 1
                    committing = True
        finally:
            if committing:
                with self._turns:
                    self._committing -= 1
                    self._turns.notify_all()

    def pause_commits(self) -> None:
        """Before the step hands events to Dagster: wait for the commits under way, and let no other
        begin until `resume_commits`."""
        with self._turns:
            self._paused = True
            while self._committing:
                self._turns.wait()

    def resume_commits(self) -> None:
        with self._turns:
            self._paused = False
            self._turns.notify_all()

    @contextlib.contextmanager
    def commits_paused(self) -> Iterator[None]:
        """`pause_commits` for the block, around the step's yields. A generator closed at one of them
        (GeneratorExit: Dagster ended the step while it held the thread, and will not run it again)
        stops the run and leaves the commits paused for good; any other exception stops the run and
        resumes them, so that the partitions can record where they stopped."""
        try:
            self.pause_commits()
            yield
        except GeneratorExit:
            self.stop("the run ended while it handed its events to Dagster")
            raise
        except BaseException:
            self.stop("the run was interrupted")
            self.resume_commits()
            raise
        self.resume_commits()
