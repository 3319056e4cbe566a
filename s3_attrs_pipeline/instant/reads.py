"""What the pipeline reads of `$files`: the files still to do, per-app and per-partition counts,
malformed triples, and samples of populated files. Every statement is parameterised; the
streaming ones are index probes whatever the table's size."""

import dataclasses
import json
import time
import uuid
from collections.abc import Iterator, Sequence

import psycopg
from psycopg import sql

from s3_attrs_pipeline.instant.app_id_ranges import EVERY_APP, AppIdRange, sixteenths
from s3_attrs_pipeline.instant.file_attrs import HASH, LAST_MODIFIED, LOCATION_ID, json_text


@dataclasses.dataclass(frozen=True)
class PendingFile:
    """A `$files` entity with a `location-id` and no `hash` yet."""

    app_id: uuid.UUID
    entity_id: uuid.UUID
    location_value_json: str  # the location-id triple's value, exactly as Postgres prints it

    @property
    def location_value(self) -> object:
        return json.loads(self.location_value_json)


# A page is the next `limit` location-id triples of the range in `ave` index order (app_id,
# attr_id, value), each with whether it lacks `hash`; the keyset moves past the last row scanned,
# done or not. Filtering inside the ordered LIMIT would let the planner choose a bitmap scan and a
# sort of the rest of the partition for every page; this way a page costs `limit` index entries
# and `limit` probes, whatever the partition's size. `hash` is probed per row through `ea_index`,
# as a subquery the planner cannot turn into an anti join (one that merges on app_id alone).
# The attr is matched with IS NOT DISTINCT FROM (attr ids are never null: it is `=`), which no index
# takes as a condition: with `=`, `triples_created_at_idx` (app_id, attr_id, created_at) looks as
# cheap as `ea_index` to a planner whose statistics predate the backfill (an app with no `hash` yet),
# and PostgreSQL takes it, reading every `hash` triple of the app at each probe: quadratic in the
# app's size (186 buffers a file on 100,000 files, against 3 through `ea_index`).
LACKS_HASH = sql.SQL("""
  (SELECT 1 FROM triples h
   WHERE h.app_id = l.app_id AND h.entity_id = l.entity_id AND h.attr_id IS NOT DISTINCT FROM %(hash_attr)s
     AND h.ea
   LIMIT 1) IS NULL
""")
_PENDING_FILES = """
SELECT l.app_id, l.entity_id, l.value::text, {lacks_hash}
FROM (
  SELECT t.app_id, t.entity_id, t.attr_id, t.value
  FROM triples t
  WHERE t.attr_id = %(location_attr)s AND t.ave AND {after} AND t.app_id <= %(last_app)s
  ORDER BY t.app_id, t.attr_id, t.value
  LIMIT %(limit)s
) l
ORDER BY l.app_id, l.attr_id, l.value
"""
_FIRST_PAGE = sql.SQL(_PENDING_FILES).format(lacks_hash=LACKS_HASH, after=sql.SQL("t.app_id >= %(first_app)s"))
_NEXT_PAGE = sql.SQL(_PENDING_FILES).format(
    lacks_hash=LACKS_HASH,
    after=sql.SQL("(t.app_id, t.attr_id, t.value) > (%(after_app)s, %(location_attr)s, %(after_value)s::jsonb)"),
)


def iter_pending_batches(
    conn: psycopg.Connection, app_ids: AppIdRange, batch_size: int, *, with_hash: bool = False
) -> Iterator[list[PendingFile]]:
    """The range's files that still lack `hash` (or, `with_hash`, that have it), in key order, from
    pages of `batch_size` files scanned (a batch holds those of its page; empty ones are skipped)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, not {batch_size}")
    params = {
        "location_attr": LOCATION_ID.attr_id,
        "hash_attr": HASH.attr_id,
        "first_app": app_ids.first,
        "last_app": app_ids.last,
        "limit": batch_size,
    }
    query = _FIRST_PAGE
    while True:
        scanned = conn.execute(query, params).fetchall()
        batch = [
            PendingFile(app_id, entity, value)
            for app_id, entity, value, lacks_hash in scanned
            if lacks_hash != with_hash
        ]
        if batch:
            yield batch
        if len(scanned) < batch_size:
            return
        query = _NEXT_PAGE
        params["after_app"], _, params["after_value"], _ = scanned[-1]


_APP_FILE_COUNTS = sql.SQL("""
SELECT l.app_id, count(*), count(*) FILTER (WHERE NOT {lacks_hash})
FROM triples l
WHERE l.attr_id = %(location_attr)s AND l.ave AND l.app_id BETWEEN %(first_app)s AND %(last_app)s
GROUP BY l.app_id
ORDER BY l.app_id
""").format(lacks_hash=LACKS_HASH)


@dataclasses.dataclass(frozen=True)
class AppFileCount:
    app_id: uuid.UUID
    files: int  # with a location-id
    populated: int  # of them, with `hash`

    @property
    def pending(self) -> int:
        return self.files - self.populated


def app_file_counts(conn: psycopg.Connection, app_ids: AppIdRange) -> list[AppFileCount]:
    """Every app of the range that has files, in app id order, with how many already carry `hash`."""
    params = {
        "location_attr": LOCATION_ID.attr_id,
        "hash_attr": HASH.attr_id,
        "first_app": app_ids.first,
        "last_app": app_ids.last,
    }
    return [AppFileCount(*row) for row in conn.execute(_APP_FILE_COUNTS, params).fetchall()]


# Which of these location ids of an app are files lacking `hash` (the listing's malformed entries).
# One `ave` index probe per value.
_PENDING_AT_LOCATIONS = sql.SQL("""
SELECT l.app_id, l.entity_id, l.value::text
FROM triples l
WHERE l.app_id = %(app_id)s AND l.attr_id = %(location_attr)s AND l.ave AND l.value = ANY(%(values)s::jsonb[])
  AND {lacks_hash}
""").format(lacks_hash=LACKS_HASH)


def pending_files_at(conn: psycopg.Connection, app_id: uuid.UUID, location_ids: Sequence[str]) -> list[PendingFile]:
    """The app's files lacking `hash` whose location-id is one of `location_ids`."""
    if not location_ids:
        return []
    params = {
        "app_id": app_id,
        "location_attr": LOCATION_ID.attr_id,
        "hash_attr": HASH.attr_id,
        "values": [json_text(location_id) for location_id in location_ids],
    }
    return [PendingFile(*row) for row in conn.execute(_PENDING_AT_LOCATIONS, params).fetchall()]


# One pass over the range's `location-id`, `hash` and `lastModified` entries, grouped by entity:
# no join, so no plan can compare each file with every value of its app (joined on the attr with
# `=`, a planner whose statistics predate the backfill probed `triples_created_at_idx` (app_id,
# attr_id) for each file, reading every `hash` triple of the app: 137 buffers a file on a test world
# of 35,000 files, 18 s; probed per file through `ea_index` instead, 17M buffers at 1,000,000 files).
# Read in `ea_index` order (app_id, entity_id, attr_id) the entities stream into the aggregate.
_ENTITIES = """
SELECT t.app_id, bool_or(t.attr_id = %(location_attr)s) AS located, bool_or(t.attr_id = %(hash_attr)s) AS has_hash,
       bool_or(t.attr_id = %(last_modified_attr)s) AS has_last_modified
FROM triples t
WHERE t.ea AND t.app_id BETWEEN %(first_app)s AND %(last_app)s AND t.attr_id = ANY(%(attr_ids)s::uuid[])
GROUP BY t.app_id, t.entity_id
"""
# Both counts of a partition come from the one pass: its files' coverage, and its orphaned values
# (entities with `hash` but no `location-id`).
_ENTITY_COUNTS_BY_PARTITION = f"""
SELECT left(e.app_id::text, %(width)s), count(*) FILTER (WHERE e.located),
       count(*) FILTER (WHERE e.located AND e.has_hash), count(*) FILTER (WHERE e.located AND e.has_last_modified),
       count(*) FILTER (WHERE e.located AND e.has_hash AND e.has_last_modified),
       count(*) FILTER (WHERE e.has_hash AND NOT e.located)
FROM ({_ENTITIES}) e
GROUP BY 1
"""


@dataclasses.dataclass(frozen=True)
class PartitionCoverage:
    """How many of a partition's files (those with a location-id) carry the new attrs."""

    partition_key: str
    files: int
    with_hash: int
    with_last_modified: int
    with_both: int

    @property
    def lacking_hash(self) -> int:
        return self.files - self.with_hash


def entity_count_params(width: int, app_ids: AppIdRange) -> dict:
    """The parameters of a count over the range's entities (_ENTITY_COUNTS_BY_PARTITION): also what an
    EXPLAIN of it takes."""
    return {
        "width": width,
        "first_app": app_ids.first,
        "last_app": app_ids.last,
        "location_attr": LOCATION_ID.attr_id,
        "hash_attr": HASH.attr_id,
        "last_modified_attr": LAST_MODIFIED.attr_id,
        "attr_ids": [LOCATION_ID.attr_id, HASH.attr_id, LAST_MODIFIED.attr_id],
    }


def _rows_by_sixteenth(conn: psycopg.Connection, query: str, width: int, app_ids: AppIdRange) -> list[tuple]:
    """`query`'s rows over the range, a statement per sixteenth of the apps."""
    return [
        row
        for piece in sixteenths(app_ids)
        for row in conn.execute(query, entity_count_params(width, piece)).fetchall()
    ]


@dataclasses.dataclass(frozen=True)
class EntityCounts:
    """A range's files by partition (those with any), and its files whose `hash` outlived their
    `location-id` (deleted while their values were written; see writes.py), an entity an app's
    queries would show as a file, by partition (those with any)."""

    coverage: dict[str, PartitionCoverage]
    orphaned_values: dict[str, int]


def entity_counts_by_partition(conn: psycopg.Connection, width: int, app_ids: AppIdRange = EVERY_APP) -> EntityCounts:
    """The coverage and orphaned values of every partition of the range (keyed by the app id's first
    `width` hex digits), in one pass over its entries: a statement per sixteenth of the apps."""
    counts = EntityCounts({}, {})
    for key, files, with_hash, with_last_modified, with_both, orphaned in _rows_by_sixteenth(
        conn, _ENTITY_COUNTS_BY_PARTITION, width, app_ids
    ):
        if files:
            counts.coverage[key] = PartitionCoverage(key, files, with_hash, with_last_modified, with_both)
        if orphaned:
            counts.orphaned_values[key] = orphaned
    return counts


def coverage_by_partition(
    conn: psycopg.Connection, width: int, app_ids: AppIdRange = EVERY_APP
) -> dict[str, PartitionCoverage]:
    """Coverage of every partition of the range that has files (see entity_counts_by_partition)."""
    return entity_counts_by_partition(conn, width, app_ids).coverage


_APPS_WITH_ORPHANED_VALUES = """
SELECT t.app_id, count(DISTINCT t.entity_id)
FROM triples t
WHERE t.attr_id = ANY(%(attr_ids)s::uuid[]) AND t.ave AND t.ea AND t.app_id BETWEEN %(first_app)s AND %(last_app)s
  AND (SELECT 1 FROM triples l
       WHERE l.app_id = t.app_id AND l.entity_id = t.entity_id AND l.attr_id IS NOT DISTINCT FROM %(location_attr)s
         AND l.ea
       LIMIT 1) IS NULL
GROUP BY t.app_id
ORDER BY t.app_id
"""


def apps_with_orphaned_values(conn: psycopg.Connection, app_ids: AppIdRange) -> dict[uuid.UUID, int]:
    """The range's apps with entities that have `hash` or `lastModified` but no `location-id`: how many each."""
    params = {
        "attr_ids": [HASH.attr_id, LAST_MODIFIED.attr_id],
        "location_attr": LOCATION_ID.attr_id,
        "first_app": app_ids.first,
        "last_app": app_ids.last,
    }
    return dict(conn.execute(_APPS_WITH_ORPHANED_VALUES, params).fetchall())


def may_delete_triples(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT has_table_privilege('triples', 'DELETE')").fetchone()[0]


# Values a reader of the triples would trip over: wrong JSON type, empty or non-positive values,
# fractional milliseconds, a value_md5 that is not md5(value::text), flags other than InstantDB's.
_MALFORMED_NEW_TRIPLES = """
SELECT
  count(*) FILTER (WHERE attr_id = %(hash_attr)s AND (jsonb_typeof(value) <> 'string' OR value = '""'::jsonb)),
  count(*) FILTER (WHERE attr_id = %(last_modified_attr)s AND (jsonb_typeof(value) <> 'number'
                   OR CASE WHEN jsonb_typeof(value) = 'number'
                           THEN (value #>> '{}')::numeric <= 0 OR (value #>> '{}')::numeric %% 1 <> 0 END)),
  count(*) FILTER (WHERE value_md5 <> md5(value::text) OR NOT ea OR eav OR av OR NOT ave OR vae
                   OR checked_data_type IS DISTINCT FROM
                      (CASE WHEN attr_id = %(hash_attr)s THEN 'string' ELSE 'number' END)::checked_data_type)
FROM triples WHERE attr_id IN (%(hash_attr)s, %(last_modified_attr)s)
"""


@dataclasses.dataclass(frozen=True)
class MalformedTriples:
    hash_values: int
    last_modified_values: int
    encodings: int  # value_md5, flags or checked_data_type not as InstantDB writes them


def malformed_new_triples(conn: psycopg.Connection) -> MalformedTriples:
    params = {"hash_attr": HASH.attr_id, "last_modified_attr": LAST_MODIFIED.attr_id}
    return MalformedTriples(*conn.execute(_MALFORMED_NEW_TRIPLES, params).fetchone())


# Block sampling keeps this cheap on a table of any size; `percent` is chosen by the caller so that
# the sample holds enough populated files. Each sampled file's other values are probed through its own
# entries (`ea_index`), as in _ENTITIES.
_SAMPLE_POPULATED = """
SELECT h.app_id, h.entity_id, l.value::text, h.value #>> '{}', m.value
FROM triples h TABLESAMPLE SYSTEM (%(percent)s)
CROSS JOIN LATERAL (
  SELECT m.value FROM triples m
  WHERE m.app_id = h.app_id AND m.entity_id = h.entity_id AND m.attr_id IS NOT DISTINCT FROM %(last_modified_attr)s
    AND m.ea
  LIMIT 1) m
CROSS JOIN LATERAL (
  SELECT l.value FROM triples l
  WHERE l.app_id = h.app_id AND l.entity_id = h.entity_id AND l.attr_id IS NOT DISTINCT FROM %(location_attr)s
    AND l.ea
  LIMIT 1) l
WHERE h.attr_id = %(hash_attr)s AND h.ea
ORDER BY random()
LIMIT %(limit)s
"""


@dataclasses.dataclass(frozen=True)
class PopulatedFile:
    file: PendingFile
    hash: object
    last_modified: object


def sample_populated_files(conn: psycopg.Connection, size: int, populated: int) -> list[PopulatedFile]:
    """About `size` random files that have both attrs, out of `populated` such files."""
    percent = 100.0 if populated <= 0 else min(100.0, 100.0 * 4 * size / populated)
    params = {
        "percent": percent,
        "limit": size,
        "hash_attr": HASH.attr_id,
        "last_modified_attr": LAST_MODIFIED.attr_id,
        "location_attr": LOCATION_ID.attr_id,
    }
    rows = conn.execute(_SAMPLE_POPULATED, params).fetchall()
    return [PopulatedFile(PendingFile(app_id, entity_id, location), h, m) for app_id, entity_id, location, h, m in rows]


@dataclasses.dataclass(frozen=True)
class FileCount:
    files: int  # with a location-id
    with_hash: int


def count_files(conn: psycopg.Connection) -> FileCount:
    """Every file of every app, and how many carry `hash` (the coverage of the whole database)."""
    coverage = coverage_by_partition(conn, 1).values()
    return FileCount(sum(part.files for part in coverage), sum(part.with_hash for part in coverage))


# The queries `hash` and `lastModified` exist for, in the shape InstantDB gives them for one app:
# files with a hash, files newest first, files modified after a time (a typed number index).
APP_QUERIES = {
    "files by hash": """
SELECT entity_id FROM triples
WHERE app_id = %(app_id)s AND attr_id = %(hash_attr)s AND ave AND value = %(hash)s::jsonb
""",
    "files ordered by lastModified desc": """
SELECT entity_id FROM triples
WHERE app_id = %(app_id)s AND attr_id = %(last_modified_attr)s AND ave AND checked_data_type = 'number'
ORDER BY triples_extract_number_value(value) DESC
LIMIT 100
""",
    "files with lastModified > T": """
SELECT entity_id FROM triples
WHERE app_id = %(app_id)s AND attr_id = %(last_modified_attr)s AND ave AND checked_data_type = 'number'
  AND triples_extract_number_value(value) > %(after)s
""",
}

_A_DAY_MS = 86_400_000
_A_POPULATED_FILE = sql.SQL("""
SELECT h.app_id, h.value::text
FROM triples h
WHERE h.attr_id = %(hash_attr)s AND h.ea {of_app}
LIMIT 1
""")


@dataclasses.dataclass(frozen=True)
class QueryPlan:
    query: str  # what an app asks, in words
    app_id: str
    index: str  # the index the plan reads, or "" when it scans the table
    plan: str


def app_query_plans(conn: psycopg.Connection, app_id: uuid.UUID | None = None) -> list[QueryPlan]:
    """EXPLAIN of each of APP_QUERIES for `app_id`, or the app of one populated file ([] when it has
    none), asking for the hash of one of its files and for its files modified in the last day. A
    plan that still scans `triples` has no index to use (see `explain_preferring_indexes`)."""
    params = {"hash_attr": HASH.attr_id, "last_modified_attr": LAST_MODIFIED.attr_id, "app_id": app_id}
    of_app = sql.SQL("AND h.app_id = %(app_id)s") if app_id else sql.SQL("")
    row = conn.execute(_A_POPULATED_FILE.format(of_app=of_app), params).fetchone()
    if row is None:
        return []
    app_id, hash_json = row
    params |= {"app_id": app_id, "hash": hash_json, "after": time.time() * 1000 - _A_DAY_MS}
    plans = []
    for name, query in APP_QUERIES.items():
        lines = explain_preferring_indexes(conn, sql.SQL(query), params)
        scans_triples = any("Seq Scan on triples" in line for line in lines)
        index = (
            ""
            if scans_triples
            else next((line.split(" using ", 1)[1].split(" on ", 1)[0] for line in lines if " using " in line), "")
        )
        plans.append(QueryPlan(name, str(app_id), index, "\n".join(lines)))
    return plans


def explain_preferring_indexes(conn: psycopg.Connection, query: sql.Composable, params: dict) -> list[str]:
    """EXPLAIN's lines for `query`, with sequential and bitmap scans priced out: the plan then shows
    which index serves the query's shape however small the tables are, or a scan where none does."""
    with conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")
        conn.execute("SET LOCAL enable_bitmapscan = off")
        return [row[0] for row in conn.execute(sql.SQL("EXPLAIN ") + query, params, prepare=False)]
