"""Connecting to the InstantDB database: the URL checked before use, and session guards fit for a
live database. Reads run outside transactions (autocommit) so that no snapshot is held while S3
is being asked; each write is one short transaction its caller opens."""

import dataclasses

import psycopg

from s3_attrs_pipeline.settings import setting

APPLICATION_NAME = "s3-attrs-pipeline"
# A session's partition lock lives as long as the session. When the machine running it is lost (a node
# gone, a network cut), the server only learns so from TCP: with the kernel's defaults after two
# hours. Probing an idle connection after 30 s, every 10 s, and giving up after 3 unanswered probes
# (or 60 s of unacknowledged data) ends such a session, and frees its locks, within about a minute.
# The server probes the client (tcp_keepalives_*, which free the locks); libpq probes the server, so
# that the pipeline also notices a lost database. Unix-socket sessions need neither.
KEEPALIVE_IDLE_S = 30
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_COUNT = 3
_UNACKNOWLEDGED_MS = (KEEPALIVE_IDLE_S + KEEPALIVE_INTERVAL_S * KEEPALIVE_COUNT) * 1000


class DatabaseUrlError(ValueError):
    """INSTANT_DATABASE_URL is missing or not a libpq connection string."""


@dataclasses.dataclass(frozen=True)
class SessionLimits:
    """Guards for a live database: no statement or lock wait may run longer than these."""

    statement_timeout_ms: int = setting(30_000, help="No pipeline statement may run longer than this.", config=None)
    lock_timeout_ms: int = setting(
        5_000, help="No pipeline statement may wait for a lock longer than this.", config=None
    )
    connect_timeout_s: int = setting(10, help="How long to wait for the database to accept a connection.", config=None)


def validate_database_url(url: str | None) -> str:
    if not url or not url.strip():
        raise DatabaseUrlError("INSTANT_DATABASE_URL is not set: give the libpq URL of the InstantDB database")
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        # libpq's own message quotes the string, password and all: keep it out of logs.
        raise DatabaseUrlError(
            "INSTANT_DATABASE_URL is not a valid libpq connection string "
            "(expected postgresql://user:password@host:port/dbname)"
        ) from None
    return url


def connect(url: str, limits: SessionLimits = SessionLimits()) -> psycopg.Connection:
    """An autocommit connection whose session carries `limits`."""
    return psycopg.connect(
        validate_database_url(url),
        autocommit=True,
        connect_timeout=limits.connect_timeout_s,
        application_name=APPLICATION_NAME,
        # A generic plan of the keyset query cannot see where the page starts and may scan the
        # rest of the partition per page; bound values keep every page an index range.
        options=(
            f"-c statement_timeout={limits.statement_timeout_ms} -c lock_timeout={limits.lock_timeout_ms} "
            "-c plan_cache_mode=force_custom_plan "
            f"-c tcp_keepalives_idle={KEEPALIVE_IDLE_S} -c tcp_keepalives_interval={KEEPALIVE_INTERVAL_S} "
            f"-c tcp_keepalives_count={KEEPALIVE_COUNT} -c tcp_user_timeout={_UNACKNOWLEDGED_MS}"
        ),
        keepalives=1,
        keepalives_idle=KEEPALIVE_IDLE_S,
        keepalives_interval=KEEPALIVE_INTERVAL_S,
        keepalives_count=KEEPALIVE_COUNT,
        tcp_user_timeout=_UNACKNOWLEDGED_MS,
    )
