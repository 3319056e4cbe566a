"""The migration's progress in InstantDB's `config` table: every read and write of those rows.

The totals live in one row (`s3-attrs-migration-status`, as the REPL migration kept them), added to
under the row lock that ON CONFLICT DO UPDATE takes, so concurrent partitions each count their own.
Each partition's state has a row of its own (`.../partition/<key>`): a batch rewrites a few hundred
bytes, not a map of every partition. Writes run in the caller's transaction, beside the triples
whose progress they record.
"""

import datetime
import uuid

import psycopg
from psycopg.types.json import Json

from s3_attrs_pipeline.counts import TOTALLED, FileCounts, config_key
from s3_attrs_pipeline.instant.reads import PartitionCoverage, count_files

PROGRESS_CONFIG_KEY = "s3-attrs-migration-status"
PARTITION_PROGRESS_KEY_PREFIX = PROGRESS_CONFIG_KEY + "/partition/"
_TOTAL_KEYS = {name: f"total-{config_key(name)}" for name in TOTALLED}  # in the totals row

# `config.v` is json, so the sums go through jsonb: each key of `added` is added to the stored value.
_ADD_TO_TOTALS = """
INSERT INTO config AS c (k, v) VALUES (%(key)s, %(initial)s::json)
ON CONFLICT (k) DO UPDATE SET v = (
  c.v::jsonb || (SELECT jsonb_object_agg(a.key, coalesce((c.v->>a.key)::bigint, 0) + a.value::bigint)
                 FROM jsonb_each(%(added)s::jsonb) a)
)::json
"""

_SET_PARTITION_STATE = """
INSERT INTO config AS c (k, v) VALUES (%(key)s, %(state)s::json)
ON CONFLICT (k) DO UPDATE SET v = excluded.v
"""

_PARTITION_STATES = """
SELECT substr(k, length(%(prefix)s) + 1), v FROM config WHERE starts_with(k, %(prefix)s)
"""

_RECOMPUTE_COMPLETED = """
UPDATE config SET v = jsonb_set(v::jsonb, '{completed}', to_jsonb(
  (SELECT count(*) FROM config p WHERE starts_with(p.k, %(prefix)s) AND p.v->>'status' = 'completed')
  >= %(partition_count)s))::json
WHERE k = %(key)s
"""


def record_progress(
    conn: psycopg.Connection,
    partition_key: str,
    status: str,
    counts: FileCounts,
    *,
    added: FileCounts = FileCounts(),
    last_entity_id: uuid.UUID | None = None,
    partition_count: int | None = None,
) -> None:
    """Set the partition's state (its `status` and its run's `counts` so far) and add `added` to the
    totals, in the caller's transaction. `partition_count`, given when a partition ends, recomputes
    whether every partition is completed."""
    _add_to_totals(conn, added)
    conn.execute(_SET_PARTITION_STATE, _partition_state(partition_key, status, counts, last_entity_id))
    if partition_count is not None:
        _recompute_completed(conn, partition_count)


def record_empty_partitions(conn: psycopg.Connection, partition_keys: list[str], partition_count: int) -> None:
    """Record partitions that hold no file as completed with nothing done, in the caller's transaction:
    what a run of each would record, without the run, in three statements for all of them."""
    _add_to_totals(conn, FileCounts())  # nothing to add: the totals row exists after it, as after a run
    with conn.cursor() as cursor:
        cursor.executemany(
            _SET_PARTITION_STATE, [_partition_state(key, "completed", FileCounts(), None) for key in partition_keys]
        )
    _recompute_completed(conn, partition_count)


def _add_to_totals(conn: psycopg.Connection, added: FileCounts) -> None:
    added_totals = {key: getattr(added, name) for name, key in _TOTAL_KEYS.items()}
    conn.execute(
        _ADD_TO_TOTALS,
        {"key": PROGRESS_CONFIG_KEY, "initial": Json(added_totals | {"completed": False}), "added": Json(added_totals)},
    )


def _partition_state(partition_key: str, status: str, counts: FileCounts, last_entity_id: uuid.UUID | None) -> dict:
    """The parameters of _SET_PARTITION_STATE."""
    state = {"status": status} | counts.as_config()
    state["updated-at"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    if last_entity_id is not None:
        state["last-entity-id"] = str(last_entity_id)
    return {"key": PARTITION_PROGRESS_KEY_PREFIX + partition_key, "state": Json(state)}


def _recompute_completed(conn: psycopg.Connection, partition_count: int) -> None:
    conn.execute(
        _RECOMPUTE_COMPLETED,
        {"key": PROGRESS_CONFIG_KEY, "prefix": PARTITION_PROGRESS_KEY_PREFIX, "partition_count": partition_count},
    )


def read_progress(conn: psycopg.Connection) -> dict:
    """The totals row as stored, with every partition's state under `partitions`; {} before any run."""
    row = conn.execute("SELECT v FROM config WHERE k = %s", (PROGRESS_CONFIG_KEY,)).fetchone()
    if row is None:
        return {}
    states = conn.execute(_PARTITION_STATES, {"prefix": PARTITION_PROGRESS_KEY_PREFIX}).fetchall()
    return row[0] | {"partitions": dict(states)}


def reset_progress(conn: psycopg.Connection) -> None:
    conn.execute(
        "DELETE FROM config WHERE k = %(key)s OR starts_with(k, %(prefix)s)",
        {"key": PROGRESS_CONFIG_KEY, "prefix": PARTITION_PROGRESS_KEY_PREFIX},
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
    *_TOTAL_KEYS.values(),
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
    stats |= {key: progress.get(key, 0) for key in _TOTAL_KEYS.values()}
    return stats | {"completed": progress.get("completed", False)}
