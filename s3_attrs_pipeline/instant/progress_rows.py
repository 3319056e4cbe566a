"""The migration's progress in InstantDB's `config` table: every read and write of those rows.

Each partition's state has a row of its own (`.../partition/<key>`), written only by the worker that
holds the partition's lock, in the transaction of the batch whose progress it records: its status,
the counts of its latest run, and its `total-*` counts over every run. A batch records it at most
once a second (`RECORD_INTERVAL_S`, the caller's pace), the partition's end always.

The totals row (`s3-attrs-migration-status`, as the REPL migration kept it, and read as it read it)
is derived from the partition rows: summed again when a partition ends (at most once a second per
run) and when a run ends, never by every write transaction. Many workers adding to one row queued
on its lock and rewrote a growing JSON value per batch; reading the partition rows instead, nothing
is lost when a process dies between two sums. `read_progress` and the stats sum the partition rows
themselves, so they are as current as those rows.

Totals kept by a version that added every batch to the totals row (before the partition rows held
totals) are carried over once, into a row of their own, when the totals are first summed again.
"""

import datetime
import uuid

import psycopg
from psycopg.types.json import Json

from s3_attrs_pipeline.counts import TOTALLED, FileCounts, config_key
from s3_attrs_pipeline.instant.reads import PartitionCoverage, count_files

PROGRESS_CONFIG_KEY = "s3-attrs-migration-status"
PARTITION_PROGRESS_KEY_PREFIX = PROGRESS_CONFIG_KEY + "/partition/"
CARRIED_OVER_KEY = PROGRESS_CONFIG_KEY + "/carried-over"  # totals of runs before partition rows held them
TOTAL_KEYS = tuple(f"total-{config_key(name)}" for name in TOTALLED)
# In the totals row (written by _SUM_TOTALS): its totals are sums of the partition rows.
_SUMMED_MARK = "totals-summed-from-partitions"
RECORD_INTERVAL_S = 1.0  # a partition's row is written at most this often while the partition runs

# The partition's row: its new state, its `total-*` counts added to (a row of its own, so its lock is
# the partition worker's alone).
_RECORD_PARTITION = """
INSERT INTO config AS c (k, v) VALUES (%(key)s, (%(state)s::jsonb || %(added)s::jsonb)::json)
ON CONFLICT (k) DO UPDATE SET v = (
  excluded.v::jsonb || (SELECT coalesce(jsonb_object_agg(a.key, coalesce((c.v->>a.key)::bigint, 0) + a.value::bigint),
                                        '{}'::jsonb)
                        FROM jsonb_each(%(added)s::jsonb) a)
)::json
"""

_PARTITION_STATES = """
SELECT substr(k, length(%(prefix)s) + 1), v FROM config WHERE starts_with(k, %(prefix)s)
"""
_STATES_OF_PARTITIONS = "SELECT substr(k, length(%(prefix)s) + 1), v FROM config WHERE k = ANY(%(keys)s::text[])"

# Taken before summing, so that two runs ending at once sum one after the other, the second seeing
# the first's partition rows: under READ COMMITTED a statement sees what committed before it began.
_CREATE_TOTALS_ROW = "INSERT INTO config (k, v) VALUES (%(key)s, '{}'::json) ON CONFLICT (k) DO NOTHING"
_LOCK_TOTALS_ROW = "SELECT v FROM config WHERE k = %(key)s FOR UPDATE"

_SUM_TOTALS = """
UPDATE config SET v = (
  (SELECT jsonb_object_agg(t.key, t.total) FROM (
     SELECT k.key, coalesce(sum((p.v->>k.key)::bigint), 0) AS total
     FROM unnest(%(total_keys)s::text[]) AS k(key)
     LEFT JOIN config p ON starts_with(p.k, %(prefix)s) OR p.k = %(carried)s
     GROUP BY k.key) t)
  || jsonb_build_object(
       'completed', (SELECT count(*) FROM config p
                     WHERE starts_with(p.k, %(prefix)s) AND p.v->>'status' = 'completed') >= %(partition_count)s,
       %(summed_mark)s::text, true,
       'updated-at', %(now)s::text)
)::json
WHERE k = %(key)s
"""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def record_progress(
    conn: psycopg.Connection,
    partition_key: str,
    status: str,
    counts: FileCounts,
    *,
    added: FileCounts = FileCounts(),
    last_entity_id: uuid.UUID | None = None,
) -> None:
    """Set the partition's state (its `status` and its run's `counts` so far) and add `added` (what
    was done since it was last recorded) to its totals, in the caller's transaction."""
    conn.execute(_RECORD_PARTITION, _partition_row(partition_key, status, counts, added, last_entity_id))


def record_empty_partitions(conn: psycopg.Connection, partition_keys: list[str]) -> None:
    """Record partitions that hold no file as completed with nothing done, in the caller's transaction:
    what a run of each would record, without the run, in one statement for all of them."""
    with conn.cursor() as cursor:
        cursor.executemany(
            _RECORD_PARTITION,
            [_partition_row(key, "completed", FileCounts(), FileCounts(), None) for key in partition_keys],
        )


def _partition_row(
    partition_key: str, status: str, counts: FileCounts, added: FileCounts, last_entity_id: uuid.UUID | None
) -> dict:
    """The parameters of _RECORD_PARTITION."""
    state = {"status": status} | counts.as_config() | {"updated-at": _now()}
    if last_entity_id is not None:
        state["last-entity-id"] = str(last_entity_id)
    added_totals = {key: getattr(added, name) for name, key in zip(TOTALLED, TOTAL_KEYS, strict=True)}
    return {"key": PARTITION_PROGRESS_KEY_PREFIX + partition_key, "state": Json(state), "added": Json(added_totals)}


def record_totals(conn: psycopg.Connection, partition_count: int) -> None:
    """Sum the partition rows into the totals row, and whether all `partition_count` partitions are
    completed, in the caller's transaction; the totals row's lock is held until it ends."""
    conn.execute(_CREATE_TOTALS_ROW, {"key": PROGRESS_CONFIG_KEY})
    stored = conn.execute(_LOCK_TOTALS_ROW, {"key": PROGRESS_CONFIG_KEY}).fetchone()[0]
    if stored and not stored.get(_SUMMED_MARK):
        _carry_over(conn, stored)
    conn.execute(
        _SUM_TOTALS,
        {
            "key": PROGRESS_CONFIG_KEY,
            "prefix": PARTITION_PROGRESS_KEY_PREFIX,
            "carried": CARRIED_OVER_KEY,
            "partition_count": partition_count,
            "now": _now(),
            "total_keys": list(TOTAL_KEYS),
            "summed_mark": _SUMMED_MARK,
        },
    )


def _carry_over(conn: psycopg.Connection, stored: dict) -> None:
    """Keep the totals of runs made by a version that added them to the totals row alone: its partition
    rows hold no totals, so the sum would drop them."""
    carried = {key: stored.get(key, 0) for key in TOTAL_KEYS}
    conn.execute(
        "INSERT INTO config (k, v) VALUES (%s, %s) ON CONFLICT (k) DO NOTHING", (CARRIED_OVER_KEY, Json(carried))
    )


def read_totals_row(conn: psycopg.Connection) -> dict:
    """The totals row as stored ({} before any run): what the REPL migration's stats read."""
    return _config_value(conn, PROGRESS_CONFIG_KEY) or {}


def _config_value(conn: psycopg.Connection, key: str) -> dict | None:
    row = conn.execute("SELECT v FROM config WHERE k = %s", (key,)).fetchone()
    return row[0] if row is not None else None


def read_progress(conn: psycopg.Connection) -> dict:
    """The totals (summed from the partition rows, as current as they are), the stored `completed`, and
    every partition's state under `partitions`; {} before any run."""
    stored = read_totals_row(conn)
    states = dict(conn.execute(_PARTITION_STATES, {"prefix": PARTITION_PROGRESS_KEY_PREFIX}).fetchall())
    if not stored and not states:
        return {}
    carried = _config_value(conn, CARRIED_OVER_KEY)
    if carried is not None:
        sources = [carried, *states.values()]
    elif stored and not stored.get(_SUMMED_MARK):
        sources = [stored, *states.values()]  # not carried over yet: the stored totals are the earlier runs'
    else:
        sources = list(states.values())
    totals = {key: sum(source.get(key, 0) for source in sources) for key in TOTAL_KEYS}
    return totals | {"completed": stored.get("completed", False), "partitions": states}


def read_partition_progress(conn: psycopg.Connection, partition_keys: list[str]) -> dict:
    """The state of these partitions only, shaped as `read_progress`'s answer (`partitions`): what a
    run's plan reads, by the rows' keys, whatever else the table holds."""
    params = {
        "prefix": PARTITION_PROGRESS_KEY_PREFIX,
        "keys": [PARTITION_PROGRESS_KEY_PREFIX + key for key in partition_keys],
    }
    return {"partitions": dict(conn.execute(_STATES_OF_PARTITIONS, params).fetchall())}


def processed_files(conn: psycopg.Connection, partition_keys: list[str]) -> int:
    """Files these partitions' rows count processed, over every run."""
    states = read_partition_progress(conn, partition_keys)["partitions"].values()
    return sum(state.get(f"total-{config_key('processed')}", 0) for state in states)


def reset_progress(conn: psycopg.Connection) -> None:
    conn.execute(
        "DELETE FROM config WHERE k = %(key)s OR starts_with(k, %(prefix)s)",
        {"key": PROGRESS_CONFIG_KEY, "prefix": PROGRESS_CONFIG_KEY + "/"},
    )


def partition_counts(progress: dict, partition_key: str) -> FileCounts:
    """The counts of the partition's latest run, from `read_progress`'s answer."""
    return FileCounts.from_config(progress.get("partitions", {}).get(partition_key, {}))


def known_missing(progress: dict, partition_key: str) -> int:
    """Objects the partition's latest run found missing in S3."""
    return partition_counts(progress, partition_key).missing


def known_invalid(progress: dict, partition_key: str) -> int:
    """Files the partition's latest run could not fill from bad data: invalid location ids, malformed metadata."""
    counts = partition_counts(progress, partition_key)
    return counts.invalid_location_id + counts.malformed_object_metadata


def unexplained_gap(coverage: PartitionCoverage | None, progress: dict, partition_key: str) -> int:
    """Files lacking `hash` beyond those known to be unfillable: new uploads, or failures."""
    lacking = coverage.lacking_hash if coverage else 0
    return max(0, lacking - known_missing(progress, partition_key) - known_invalid(progress, partition_key))


def partitions_with_work(
    partition_keys: list[str], coverage: dict[str, PartitionCoverage], progress: dict
) -> list[str]:
    """The partitions worth a run: never completed, or with an unexplained gap."""
    states = progress.get("partitions", {})
    return [
        key
        for key in partition_keys
        if states.get(key, {}).get("status") != "completed" or unexplained_gap(coverage.get(key), progress, key)
    ]


STATS_ORDER = (
    "total-files",
    "processed-files",
    "remaining-files",
    "completion-percentage",
    *TOTAL_KEYS,
    "completed",
)


def migration_stats(conn: psycopg.Connection) -> dict:
    """The REPL migration's stats: counts from the triples, totals from the config row."""
    files = count_files(conn)
    progress = read_progress(conn)
    stats = {
        "total-files": files.files,
        "processed-files": files.with_hash,
        "remaining-files": files.files - files.with_hash,
        "completion-percentage": round(100 * files.with_hash / files.files, 2) if files.files else 100.0,
    }
    stats |= {key: progress.get(key, 0) for key in TOTAL_KEYS}
    return stats | {"completed": progress.get("completed", False)}
