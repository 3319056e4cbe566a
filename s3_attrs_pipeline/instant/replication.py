"""Yield to replication: before each write transaction, wait while replication lags too far.

InstantDB's invalidator reads the WAL through a logical replication slot; a slot that falls behind
holds WAL on the primary's disk, and a streaming replica that falls behind serves stale reads.
A backfill writes far faster than the app does, so before each of its write transactions the
`ReplicationGate` measures both and, when either is past its limit, waits (polling, with backoff)
until they catch up, saying what it waits for and adding the time to `waited_s`.

What the role needs: `pg_replication_slots`, `pg_current_wal_insert_lsn()` and `pg_wal_lsn_diff()` are
open to every role. `pg_stat_replication` shows a role the lag of only its own walsenders unless
it is a member of `pg_read_all_stats` (or `pg_monitor`, which includes it); without that the gate
warns once and watches the slots alone. A role that may not read the views at all (a revoked
grant) makes it warn once and write without waiting.
"""

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Protocol

import psycopg

from s3_attrs_pipeline.settings import setting

MAX_LAG_MB_ENV = "S3_ATTRS_MAX_REPLICATION_LAG_MB"
MAX_REPLAY_LAG_S_ENV = "S3_ATTRS_MAX_REPLAY_LAG_S"
WATCH_SLOTS_ENV = "S3_ATTRS_REPLICATION_WATCH_SLOTS"
IGNORE_SLOTS_ENV = "S3_ATTRS_REPLICATION_IGNORE_SLOTS"
CHECK_INTERVAL_MS_ENV = "S3_ATTRS_REPLICATION_CHECK_INTERVAL_MS"

_BYTES_PER_MB = 1024 * 1024  # PostgreSQL's MB


class Log(Protocol):
    def info(self, msg: str) -> None: ...
    def warning(self, msg: str) -> None: ...


# While it waits, the gate says so again this often, with the figures of the moment.
WAITING_LOG_INTERVAL_S = 60.0


@dataclasses.dataclass(frozen=True)
class ReplicationLimits:
    """How far replication may lag before the pipeline waits for it."""

    max_lag_mb: float = setting(
        256,
        help="Before each write transaction, wait while a logical replication slot (InstantDB's invalidator reads "
        "through one) lags the WAL inserted so far by more than this many MB; 0 does not watch slots.",
        env=MAX_LAG_MB_ENV,
        config="max_replication_lag_mb",
        cli="--max-replication-lag-mb",
    )
    max_replay_lag_s: float = setting(
        30,
        help="Before each write transaction, wait while a streaming replica replays the WAL more than this many "
        "seconds behind (pg_stat_replication.replay_lag); 0 does not watch replicas.",
        env=MAX_REPLAY_LAG_S_ENV,
    )
    watch_slots: tuple[str, ...] = setting(
        (),
        help="Watch only these replication slots (comma-separated in the environment); empty watches every logical "
        "slot and every streaming replica. A replica without a slot goes by its application_name.",
        env=WATCH_SLOTS_ENV,
        config="replication_watch_slots",
    )
    ignore_slots: tuple[str, ...] = setting(
        (),
        help="Never wait for these replication slots (comma-separated in the environment), e.g. an abandoned slot "
        "that nothing consumes.",
        env=IGNORE_SLOTS_ENV,
        config="replication_ignore_slots",
    )
    check_interval_ms: int = setting(
        1000,
        help="Measure replication at most this often per run: write transactions within this many ms of a "
        "measurement that found it keeping up write without asking again. A slot may then lag up to the WAL "
        "written in one interval past max_replication_lag_mb (at most ~18 MB a second on 2 CPUs); 0 measures "
        "before every write transaction.",
        env=CHECK_INTERVAL_MS_ENV,
        config="replication_check_interval_ms",
    )
    poll_initial_s: float = 1.0  # the first wait before measuring again; it doubles up to poll_max_s
    poll_max_s: float = 30.0

    def __post_init__(self):
        for name in ("max_lag_mb", "max_replay_lag_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (not watched) or more, not {getattr(self, name)}")
        if self.check_interval_ms < 0:
            raise ValueError(f"check_interval_ms must be 0 (before every write) or more, not {self.check_interval_ms}")
        if not 0 < self.poll_initial_s <= self.poll_max_s:
            raise ValueError(
                f"poll_initial_s ({self.poll_initial_s}) must be above 0 and at most poll_max_s ({self.poll_max_s})"
            )
        for name in ("watch_slots", "ignore_slots"):
            names = getattr(self, name)
            if isinstance(names, str) or not all(isinstance(slot, str) for slot in names):
                raise ValueError(f"{name} must be a sequence of slot names, not {names!r}")
            object.__setattr__(self, name, tuple(names))

    def watches(self, name: str | None) -> bool:
        if name in self.ignore_slots:
            return False
        return not self.watch_slots or name in self.watch_slots


@dataclasses.dataclass(frozen=True)
class SlotLag:
    name: str
    active: bool  # a walsender is reading it; an inactive slot only holds WAL
    behind_bytes: int  # from its confirmed_flush_lsn (or restart_lsn) to the current WAL position


@dataclasses.dataclass(frozen=True)
class ReplicaLag:
    name: str  # its slot's name, else its application_name
    replay_lag_s: float | None  # None once it has caught up and is idle, or while hidden
    visible: bool  # False: the role may not see its figures (no pg_read_all_stats)


# Logical slots (invalidated ones excepted: they hold no WAL and never catch up), and the
# walsenders that are not serving a logical slot: streaming replicas. Both in one round trip. A slot's
# lag runs to the WAL inserted so far, written out or not: with asynchronous commit the written
# position trails it by what the WAL writer has yet to flush, up to a megabyte.
_LAG = """
SELECT 'slot' AS kind, slot_name::text, active,
       pg_wal_lsn_diff(pg_current_wal_insert_lsn(), coalesce(confirmed_flush_lsn, restart_lsn))::bigint,
       NULL::float8, true
FROM pg_replication_slots
WHERE %(slots)s AND slot_type = 'logical' AND wal_status IS DISTINCT FROM 'lost'
  AND coalesce(confirmed_flush_lsn, restart_lsn) IS NOT NULL
UNION ALL
SELECT 'replica', coalesce(slot.slot_name::text, nullif(replica.application_name, ''), 'pid ' || replica.pid), true,
       NULL, extract(epoch FROM replica.replay_lag)::float8, replica.state IS NOT NULL
FROM pg_stat_replication AS replica
LEFT JOIN pg_replication_slots AS slot ON slot.active_pid = replica.pid
WHERE %(replicas)s AND slot.slot_type IS DISTINCT FROM 'logical'
"""


def measure_replication_lag(
    conn: psycopg.Connection, limits: ReplicationLimits, *, slots: bool = True, replicas: bool = True
) -> tuple[list[SlotLag], list[ReplicaLag]]:
    """The lag of the logical slots and (or) streaming replicas `limits` watches, in one query.
    Raises psycopg's InsufficientPrivilege if the role may not read the views."""
    rows = conn.execute(_LAG, {"slots": slots, "replicas": replicas}).fetchall()
    slot_lags, replica_lags = [], []
    for kind, name, active, behind_bytes, replay_lag_s, visible in rows:
        if not limits.watches(name):
            continue
        if kind == "slot":
            slot_lags.append(SlotLag(name, active, behind_bytes))
        else:
            replica_lags.append(ReplicaLag(name, replay_lag_s, visible))
    return slot_lags, replica_lags


class ReplicationGate:
    """Passed before each write transaction of a run, by every partition the run works at once: it
    returns at once while replication keeps up, else waits until it does.

    One gate serves a whole run. It measures on the connection of the partition asking (outside any
    transaction), one partition at a time: while one waits for replication, the others queue behind
    it rather than each polling the server, and what it cannot see is warned of once per run. A
    measurement that finds replication keeping up lets every write transaction of the next
    `check_interval_ms` go without one. So a slot lags at most the limit, plus the WAL the run writes
    in one interval, plus one write transaction per partition worked at once: each began within an
    interval of a measurement that found the lag within the limit.

    `sleep(seconds)` is how the gate waits between measurements: the run's, which ends the wait
    (raising) when the run is told to stop. `on_waiting(text)` hears what lags as the wait begins and
    again every WAITING_LOG_INTERVAL_S, and `on_waiting(None)` when it ends; `log` hears the same in
    whole sentences. One query per pass while the lag is fine (0.2-0.4 ms with a local server).
    """

    def __init__(
        self,
        limits: ReplicationLimits,
        log: Log,
        *,
        sleep: Callable[[float], None] = time.sleep,
        on_waiting: Callable[[str | None], None] = lambda text: None,
    ):
        self._limits = limits
        self._log = log
        self._sleep = sleep
        self._on_waiting = on_waiting
        self._lock = threading.Lock()
        self._watch_slots = limits.max_lag_mb > 0
        self._watch_replicas = limits.max_replay_lag_s > 0
        self._waits = 0  # wait episodes so far: a caller that queued behind one waited too
        self._interval_s = limits.check_interval_ms / 1000
        self._kept_up_at = -float("inf")  # when a measurement last found replication keeping up
        self.measurements = 0
        self.waited_s = 0.0  # wall time the run spent waiting, however many partitions waited

    def before_write(self, conn: psycopg.Connection) -> float:
        """Wait while replication lags; the seconds this caller was held (0.0 when it was not).
        Outside any transaction: a wait must hold no snapshot."""
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raise RuntimeError("the replication gate is passed outside transactions: a wait would hold a snapshot")
        if not (self._watch_slots or self._watch_replicas) or self._kept_up():
            return 0.0
        asked = time.monotonic()
        waits_before = self._waits
        with self._lock:
            if not self._kept_up():  # else another caller measured while this one queued
                behind = self._behind(conn)
                if behind:
                    self._wait(conn, behind)
                self._kept_up_at = time.monotonic()
        return time.monotonic() - asked if self._waits != waits_before else 0.0

    def _kept_up(self) -> bool:
        return time.monotonic() - self._kept_up_at < self._interval_s

    def _wait(self, conn: psycopg.Connection, behind: list[str]) -> None:
        self._waits += 1
        started = last_said = time.monotonic()
        self._say("waiting for replication: ", behind)
        delay = self._limits.poll_initial_s
        try:
            while behind:
                self._sleep(delay)
                delay = min(2 * delay, self._limits.poll_max_s)
                behind = self._behind(conn)
                now = time.monotonic()
                if behind and now - last_said >= WAITING_LOG_INTERVAL_S:
                    last_said = now
                    self._say(f"still waiting for replication after {now - started:.0f}s: ", behind)
        finally:
            waited = time.monotonic() - started
            self.waited_s += waited
            self._on_waiting(None)
        self._log.info(f"replication caught up after {waited:.1f}s of waiting; writing again")

    def _say(self, prefix: str, behind: list[str]) -> None:
        """The log says it whole; the waiting hears what lags (the CLI says it waits for replication)."""
        self._log.info(prefix + "; ".join(behind))
        self._on_waiting("; ".join(behind))

    def _behind(self, conn: psycopg.Connection) -> list[str]:
        """What lags past its limit, in words; empty when nothing does (or nothing can be watched)."""
        if not (self._watch_slots or self._watch_replicas):
            return []
        self.measurements += 1
        try:
            slots, replicas = measure_replication_lag(
                conn, self._limits, slots=self._watch_slots, replicas=self._watch_replicas
            )
        except psycopg.errors.InsufficientPrivilege as error:
            self._watch_slots = self._watch_replicas = False
            self._log.warning(
                f"cannot watch replication lag ({str(error).strip()}): the role must be able to read "
                "pg_replication_slots and pg_stat_replication (docs/postgres-grants.sql); writing without "
                "waiting for replication"
            )
            return []
        hidden = sum(not replica.visible for replica in replicas)
        if hidden:
            self._watch_replicas = False
            self._log.warning(
                f"cannot see how far {hidden} streaming replica(s) lag: only members of pg_read_all_stats "
                "(or pg_monitor) see pg_stat_replication's lag columns (docs/postgres-grants.sql); watching "
                "the replication slots only"
            )
        limit_bytes = self._limits.max_lag_mb * _BYTES_PER_MB
        behind = [
            f"slot {slot.name}{'' if slot.active else ' (inactive: nothing reads it)'} is "
            f"{slot.behind_bytes / _BYTES_PER_MB:.1f} MB behind (limit {self._limits.max_lag_mb:g} MB)"
            for slot in slots
            if slot.behind_bytes > limit_bytes
        ]
        behind += [
            f"replica {replica.name} replays {replica.replay_lag_s:.1f}s behind "
            f"(limit {self._limits.max_replay_lag_s:g}s)"
            for replica in replicas
            if replica.visible
            and replica.replay_lag_s is not None
            and replica.replay_lag_s > self._limits.max_replay_lag_s
        ]
        return behind
