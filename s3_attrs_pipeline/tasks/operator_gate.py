"""A run's side of the operator's control row (instant/operator_control.py): read at most every
CONTROL_POLL_S by whichever partition passes the gate, before each write transaction and before a
partition starts. While the row says paused, every partition waits at the gate, outside any
transaction, and the run's store (told by `on_change`, as of a new ceiling) sends no request once
those on the wire are answered. A lower partitions-at-once holds the run's workers above it
(range_run) as their partitions end.
"""

import threading
import time
from collections.abc import Callable

import psycopg

from s3_attrs_pipeline.instant.operator_control import OperatorControl, read_control
from s3_attrs_pipeline.instant.replication import WAITING_LOG_INTERVAL_S, Log

CONTROL_POLL_S = 2.0  # a resume (or a new ceiling) reaches a run within about this


class OperatorGate:
    """Shared by the partitions of one run. `sleep` is the run's (it raises when the run stops), so a
    paused run still stops within STOP_POLL_S when told."""

    def __init__(
        self,
        log: Log,
        *,
        sleep: Callable[[float], None],
        on_waiting: Callable[[str | None], None] = lambda text: None,
    ):
        self._log = log
        self._sleep = sleep
        self._on_waiting = on_waiting
        self._lock = threading.Lock()
        self._read_at = -float("inf")
        self._listeners: list[Callable[[OperatorControl], None]] = []
        self.current = OperatorControl()
        self.paused_s = 0.0  # wall time the run spent paused

    def on_change(self, callback: Callable[[OperatorControl], None]) -> None:
        self._listeners.append(callback)

    def before_work(self, conn: psycopg.Connection) -> None:
        """Return at once unless the control is due a read and says paused: then wait for a resume."""
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raise RuntimeError("the operator's gate is passed outside transactions: a pause would hold a snapshot")
        if not self._due() and not self.current.paused:
            return
        with self._lock:
            if self._refresh(conn).paused:
                self._wait_paused(conn)

    def allows(self, worker_number: int) -> bool:
        """Whether the run's worker `worker_number` (from 0) may start a partition now."""
        limit = self.current.partitions_at_once
        return limit is None or worker_number < limit

    def refresh(self, conn: psycopg.Connection) -> OperatorControl:
        """The control, read again if it is due."""
        with self._lock:
            return self._refresh(conn)

    def _due(self) -> bool:
        return time.monotonic() - self._read_at >= CONTROL_POLL_S

    def _refresh(self, conn: psycopg.Connection) -> OperatorControl:
        if not self._due():
            return self.current
        control = read_control(conn)
        self._read_at = time.monotonic()
        if control != self.current:
            changed = (control.max_rps, control.partitions_at_once) != (
                self.current.max_rps,
                self.current.partitions_at_once,
            )
            self.current = control
            if changed and not control.paused:
                self._log.info(f"operator control: {control.describe()}")
            for listener in self._listeners:
                listener(control)
        return control

    def _wait_paused(self, conn: psycopg.Connection) -> None:
        started = last_said = time.monotonic()
        self._say(f"{self.current.describe()}; every partition holds until `s3-attrs resume`")
        try:
            while self.current.paused:
                self._sleep(CONTROL_POLL_S)
                self._refresh(conn)
                now = time.monotonic()
                if self.current.paused and now - last_said >= WAITING_LOG_INTERVAL_S:
                    last_said = now
                    self._say(f"still {self.current.describe()} ({now - started:.0f}s so far)")
        finally:
            self.paused_s += time.monotonic() - started
            self._on_waiting(None)
        self._log.info(f"resumed after {time.monotonic() - started:.0f}s paused: {self.current.describe()}")

    def _say(self, text: str) -> None:
        self._log.info(text)
        self._on_waiting(text)
