"""One run at a time on a partition, across processes and machines."""

import zlib

import psycopg

from s3_attrs_pipeline.instant.connection import APPLICATION_NAME

# Session-level advisory locks: released by Postgres when the session ends, however it ends.
_LOCK_NAMESPACE = zlib.crc32(APPLICATION_NAME.encode()) - 2**31  # any int4, fixed for this pipeline


def try_lock_partition(conn: psycopg.Connection, partition_key: str) -> bool:
    """Claim the partition for this session; False if another session holds it."""
    return conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (_LOCK_NAMESPACE, int(partition_key, 16))).fetchone()[0]


def unlock_partition(conn: psycopg.Connection, partition_key: str) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s, %s)", (_LOCK_NAMESPACE, int(partition_key, 16)))
