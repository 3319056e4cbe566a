"""Counting what a measured process sends to PostgreSQL (round trips, and the wall time of each), and
its own peak RSS and CPU.

The counters live in the measured process itself, so they see exactly what the code under test
sends, transaction commands included. S3 requests are not counted here but by the server
(services.RequestLog, from rclone's log): the pipeline's HEADs bypass botocore.
"""

import collections
import contextlib
import ctypes
import re
import resource
import signal
import threading
import time

import psycopg
from psycopg import pq

# --- PostgreSQL: every statement a cursor executes, and every BEGIN/COMMIT/SAVEPOINT ------------

_db_lock = threading.Lock()
_db_counts: collections.Counter = collections.Counter()
_db_seconds: collections.Counter = collections.Counter()  # wall time per statement label, round trip included
_label_cache: dict[object, str] = {}
_WHITESPACE = re.compile(r"\s+")


def _label(query, conn) -> str:
    key = query if isinstance(query, (str, bytes)) else id(query)
    label = _label_cache.get(key)
    if label is None:
        if isinstance(query, bytes):
            text = query.decode("utf-8", "replace")
        elif isinstance(query, str):
            text = query
        else:  # psycopg.sql.Composable
            text = query.as_string(conn)
        text = _WHITESPACE.sub(" ", text).strip()
        label = text if len(text) <= 60 else text[:57] + "..."
        if len(_label_cache) < 10_000:
            _label_cache[key] = label
    return label


def _count_db(label: str, n: int = 1, seconds: float = 0.0) -> None:
    with _db_lock:
        _db_counts[label] += n
        _db_seconds[label] += seconds


class CountingCursor(psycopg.Cursor):
    def execute(self, query, params=None, **kwargs):
        label = _label(query, self.connection)
        started = time.perf_counter()
        try:
            return super().execute(query, params, **kwargs)
        finally:
            _count_db(label, 1, time.perf_counter() - started)

    def executemany(self, query, params_seq, **kwargs):
        params_seq = list(params_seq)
        _count_db(_label(query, self.connection), len(params_seq))
        return super().executemany(query, params_seq, **kwargs)

    def copy(self, statement, params=None, **kwargs):
        _count_db(_label(statement, self.connection))
        return super().copy(statement, params, **kwargs)


class CountingConnection(psycopg.Connection):
    """A psycopg connection that also counts the commands it sends itself (BEGIN, COMMIT, SAVEPOINT...).

    `_exec_command` is psycopg's internal path for those; if a psycopg release renames it, only the
    transaction commands stop being counted (the report then shows no BEGIN/COMMIT rows)."""

    def _exec_command(self, command, result_format=pq.Format.TEXT):
        return _timed(super()._exec_command(command, result_format=result_format), _label(command, self))


def _timed(generator, label: str):
    started = time.perf_counter()
    try:
        return (yield from generator)
    finally:
        _count_db(label, 1, time.perf_counter() - started)


def counting_connect(
    url: str, *, statement_timeout_ms: int = 30_000, lock_timeout_ms: int = 5_000
) -> psycopg.Connection:
    """Like s3_attrs_pipeline.instant.connection.connect (autocommit, same session settings, custom plans
    forced), but counting. `session_settings_differ` checks that the two still agree."""
    return CountingConnection.connect(
        url,
        autocommit=True,
        connect_timeout=10,
        application_name="s3-attrs-pipeline",
        options=(
            f"-c statement_timeout={statement_timeout_ms} -c lock_timeout={lock_timeout_ms} "
            "-c plan_cache_mode=force_custom_plan"
        ),
        cursor_factory=CountingCursor,
    )


_SESSION_SETTINGS = (
    "SELECT current_setting('statement_timeout'), current_setting('lock_timeout'), "
    "current_setting('plan_cache_mode'), current_setting('application_name')"
)


def session_settings_differ(url: str) -> str | None:
    """None if a counting connection's session has the settings of one from instant.connection.connect; else what differs."""
    from s3_attrs_pipeline.instant import connection

    with connection.connect(url) as pipeline_conn, counting_connect(url) as counting_conn:
        want = pipeline_conn.execute(_SESSION_SETTINGS).fetchone()
        have = counting_conn.execute(_SESSION_SETTINGS).fetchone()
    return None if want == have else f"instant.connection.connect gives {want}, the benchmark's connection {have}"


def db_counts() -> dict[str, int]:
    with _db_lock:
        return dict(_db_counts)


def db_seconds() -> dict[str, float]:
    with _db_lock:
        return dict(_db_seconds)


def merge_counts(*counts: dict[str, int]) -> dict[str, int]:
    total: collections.Counter = collections.Counter()
    for count in counts:
        total.update(count)
    return dict(total)


# --- the process itself -------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's own peak RSS: VmHWM, the high-water mark of its address space. Not ru_maxrss: a
    spawned child is forked (vfork) from the benchmark and exec'd, and Linux carries the pre-exec
    high-water mark, the benchmark's own peak (hundreds of MiB at 1M files), into the child's ru_maxrss."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (even by SIGKILL); leave Ctrl-C to the parent."""
    with contextlib.suppress(OSError):  # not Linux: the benchmark stops its children itself
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
