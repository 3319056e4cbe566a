"""The SQL that reads `$files` from an InstantDB database and writes the two new attrs' triples.

Every statement is parameterised. Reads run outside transactions (autocommit) so that no snapshot
is held while S3 is being asked; each batch's writes are one short transaction.
"""

import dataclasses
import functools
import json
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence

import psycopg
from psycopg import sql
from psycopg.types.json import Json

from s3_attrs_pipeline.instant.file_attrs import (
    FILES_ETYPE,
    HASH,
    LAST_MODIFIED,
    LOCATION_ID,
    NEW_ATTRS,
    SYSTEM_CATALOG_APP_ID,
    AttrSpec,
    json_text,
    md5_of_json_text,
)
from s3_attrs_pipeline.instant.partitions import AppIdRange

PROGRESS_CONFIG_KEY = "s3-attrs-migration-status"  # the totals; each partition's state is under .../partition/<key>
PARTITION_PROGRESS_KEY_PREFIX = PROGRESS_CONFIG_KEY + "/partition/"
APPLICATION_NAME = "s3-attrs-pipeline"


class DatabaseUrlError(ValueError):
    """INSTANT_DATABASE_URL is missing or not a libpq connection string."""


class CatalogMismatch(RuntimeError):
    """The system catalog's `$files` attrs are missing or not what InstantDB defines."""


@dataclasses.dataclass(frozen=True)
class SessionLimits:
    """Guards for a live database: no statement or lock wait may run longer than these."""

    statement_timeout_ms: int = 30_000
    lock_timeout_ms: int = 5_000
    connect_timeout_s: int = 10


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
            "-c plan_cache_mode=force_custom_plan"
        ),
    )


# --- the system catalog -------------------------------------------------------------------------

_INSERT_ATTR = """
INSERT INTO attrs (id, app_id, value_type, cardinality, is_unique, is_indexed, forward_ident,
                   checked_data_type, is_required, etype, label)
VALUES (%(id)s, %(app_id)s, 'blob', 'one', %(is_unique)s, %(is_indexed)s, %(ident_id)s,
        %(checked_data_type)s::checked_data_type, %(is_required)s, %(etype)s, %(label)s)
ON CONFLICT DO NOTHING
"""

_INSERT_IDENT = """
INSERT INTO idents (id, app_id, attr_id, etype, label)
VALUES (%(ident_id)s, %(app_id)s, %(id)s, %(etype)s, %(label)s)
ON CONFLICT DO NOTHING
"""

_SELECT_ATTR = """
SELECT a.id, a.value_type, a.cardinality, a.is_unique, a.is_indexed, a.checked_data_type::text,
       a.forward_ident, i.id IS NOT NULL AS has_ident
FROM attrs a LEFT JOIN idents i ON i.id = a.forward_ident AND i.attr_id = a.id
WHERE a.app_id = %(app_id)s AND a.etype = %(etype)s AND a.label = %(label)s
"""


def _attr_params(spec: AttrSpec) -> dict:
    return {
        "id": spec.attr_id,
        "ident_id": spec.ident_id,
        "app_id": SYSTEM_CATALOG_APP_ID,
        "etype": FILES_ETYPE,
        "label": spec.label,
        "is_unique": spec.is_unique,
        "is_indexed": spec.is_indexed,
        "checked_data_type": spec.checked_data_type,
        "is_required": spec.is_required,
    }


def _check_attr(conn: psycopg.Connection, spec: AttrSpec, *, check_type: bool, require_ident: bool = True) -> None:
    row = conn.execute(_SELECT_ATTR, _attr_params(spec)).fetchone()
    where = f"attrs row {FILES_ETYPE}.{spec.label} of the system catalog app {SYSTEM_CATALOG_APP_ID}"
    if row is None:
        raise CatalogMismatch(f"{where} does not exist")
    attr_id, value_type, cardinality, is_unique, is_indexed, checked_data_type, forward_ident, has_ident = row
    expected = {
        "id": spec.attr_id,
        "value_type": "blob",
        "cardinality": "one",
        "is_unique": spec.is_unique,
        "is_indexed": spec.is_indexed,
        "forward_ident": spec.ident_id,
    }
    actual = {
        "id": attr_id,
        "value_type": value_type,
        "cardinality": cardinality,
        "is_unique": is_unique,
        "is_indexed": is_indexed,
        "forward_ident": forward_ident,
    }
    if check_type:
        expected["checked_data_type"] = spec.checked_data_type
        actual["checked_data_type"] = checked_data_type
    wrong = [f"{name} is {actual[name]!r}, expected {value!r}" for name, value in expected.items() if actual[name] != value]
    if require_ident and not has_ident:
        wrong.append(f"its ident {spec.ident_id} is missing")
    if wrong:
        raise CatalogMismatch(f"{where} is not as InstantDB defines it: " + "; ".join(wrong))


def ensure_file_attrs(conn: psycopg.Connection) -> None:
    """Create `$files.hash` and `$files.lastModified` (attrs and idents) if missing, then check the
    catalog rows this pipeline relies on. Safe to run from many processes at once."""
    _check_attr(conn, LOCATION_ID, check_type=False)
    if not _new_attrs_exist(conn):
        _create_new_attrs(conn)
    for spec in NEW_ATTRS:
        _check_attr(conn, spec, check_type=True)


_COUNT_NEW_ATTRS = """
SELECT count(*) FROM attrs a JOIN idents i ON i.id = a.forward_ident AND i.attr_id = a.id
WHERE a.id = ANY(%(ids)s) AND a.app_id = %(app_id)s
"""


def _new_attrs_exist(conn: psycopg.Connection) -> bool:
    params = {"ids": [spec.attr_id for spec in NEW_ATTRS], "app_id": SYSTEM_CATALOG_APP_ID}
    return conn.execute(_COUNT_NEW_ATTRS, params).fetchone()[0] == len(NEW_ATTRS)


def _create_new_attrs(conn: psycopg.Connection) -> None:
    with conn.transaction():
        for spec in NEW_ATTRS:
            params = _attr_params(spec)
            conn.execute(_INSERT_ATTR, params)
            # Checked before the ident goes in: an attr of this label with another id would make the
            # ident insert fail with a bare foreign-key error.
            _check_attr(conn, spec, check_type=True, require_ident=False)
            conn.execute(_INSERT_IDENT, params)


# --- one run per partition at a time ---

# Session-level advisory locks: released by Postgres when the session ends, however it ends.
_LOCK_NAMESPACE = zlib.crc32(APPLICATION_NAME.encode()) - 2**31  # any int4, fixed for this pipeline


def try_lock_partition(conn: psycopg.Connection, partition_key: str) -> bool:
    """Claim the partition for this session; False if another session holds it."""
    return conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (_LOCK_NAMESPACE, int(partition_key, 16))).fetchone()[0]


def unlock_partition(conn: psycopg.Connection, partition_key: str) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s, %s)", (_LOCK_NAMESPACE, int(partition_key, 16)))


# --- reading the files to backfill --------------------------------------------------------------


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
_LACKS_HASH = """
  (SELECT 1 FROM triples h
   WHERE h.app_id = l.app_id AND h.entity_id = l.entity_id AND h.attr_id = %(hash_attr)s AND h.ea
   LIMIT 1) IS NULL
"""
_PENDING_FILES = """
SELECT l.app_id, l.entity_id, l.value::text, """ + _LACKS_HASH + """
FROM (
  SELECT t.app_id, t.entity_id, t.attr_id, t.value
  FROM triples t
  WHERE t.attr_id = %(location_attr)s AND t.ave AND {after} AND t.app_id <= %(last_app)s
  ORDER BY t.app_id, t.attr_id, t.value
  LIMIT %(limit)s
) l
ORDER BY l.app_id, l.attr_id, l.value
"""
_FIRST_PAGE = sql.SQL(_PENDING_FILES).format(after=sql.SQL("t.app_id >= %(first_app)s"))
_NEXT_PAGE = sql.SQL(_PENDING_FILES).format(
    after=sql.SQL("(t.app_id, t.attr_id, t.value) > (%(after_app)s, %(location_attr)s, %(after_value)s::jsonb)")
)


def iter_pending_batches(
    conn: psycopg.Connection, app_ids: AppIdRange, batch_size: int
) -> Iterator[list[PendingFile]]:
    """The range's files that still lack `hash`, in key order, from pages of `batch_size` files
    scanned (a batch holds those of its page that lack `hash`; empty ones are skipped)."""
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
        batch = [PendingFile(app_id, entity, value) for app_id, entity, value, lacks_hash in scanned if lacks_hash]
        if batch:
            yield batch
        if len(scanned) < batch_size:
            return
        query = _NEXT_PAGE
        params["after_app"], _, params["after_value"], _ = scanned[-1]


_APP_FILE_COUNTS = """
SELECT l.app_id, count(*), count(*) FILTER (WHERE NOT """ + _LACKS_HASH + """)
FROM triples l
WHERE l.attr_id = %(location_attr)s AND l.ave AND l.app_id BETWEEN %(first_app)s AND %(last_app)s
GROUP BY l.app_id
ORDER BY l.app_id
"""


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
_PENDING_AT_LOCATIONS = """
SELECT l.app_id, l.entity_id, l.value::text
FROM triples l
WHERE l.app_id = %(app_id)s AND l.attr_id = %(location_attr)s AND l.ave AND l.value = ANY(%(values)s::jsonb[])
  AND """ + _LACKS_HASH + """
"""


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


_COVERAGE_BY_PARTITION = """
SELECT left(l.app_id::text, %(width)s), count(*), count(h.entity_id), count(m.entity_id),
       count(*) FILTER (WHERE h.entity_id IS NOT NULL AND m.entity_id IS NOT NULL)
FROM triples l
LEFT JOIN triples h ON h.app_id = l.app_id AND h.entity_id = l.entity_id AND h.attr_id = %(hash_attr)s AND h.ea
LEFT JOIN triples m ON m.app_id = l.app_id AND m.entity_id = l.entity_id AND m.attr_id = %(last_modified_attr)s AND m.ea
WHERE l.attr_id = %(location_attr)s AND l.ea
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


def coverage_by_partition(conn: psycopg.Connection, width: int) -> dict[str, PartitionCoverage]:
    """Coverage of every partition that has files, keyed by partition (the app id's first `width` hex digits)."""
    params = {
        "width": width,
        "location_attr": LOCATION_ID.attr_id,
        "hash_attr": HASH.attr_id,
        "last_modified_attr": LAST_MODIFIED.attr_id,
    }
    return {row[0]: PartitionCoverage(*row) for row in conn.execute(_COVERAGE_BY_PARTITION, params).fetchall()}


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
# the sample holds enough populated files.
_SAMPLE_POPULATED = """
SELECT h.app_id, h.entity_id, l.value::text, h.value #>> '{}', m.value
FROM triples h TABLESAMPLE SYSTEM (%(percent)s)
JOIN triples m ON m.app_id = h.app_id AND m.entity_id = h.entity_id AND m.attr_id = %(last_modified_attr)s AND m.ea
JOIN triples l ON l.app_id = h.app_id AND l.entity_id = h.entity_id AND l.attr_id = %(location_attr)s AND l.ea
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


# --- writing ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FileObjectAttrs:
    """The values to write for one file: its object's ETag (unquoted) and Last-Modified in epoch ms."""

    file: PendingFile
    hash: str
    last_modified_ms: int


def _new_triple_rows(name: str) -> str:
    return (
        f"SELECT app_id, entity_id, %({name}_attr)s::uuid, {name}_value, {name}_md5, %({name}_ea)s, "
        f"%({name}_eav)s, %({name}_av)s, %({name}_ave)s, %({name}_vae)s, %({name}_type)s::checked_data_type "
        "FROM located"
    )


@dataclasses.dataclass(frozen=True)
class _TriplesInsert:
    plain: sql.Composed
    on_conflict: sql.Composed  # the same with ON CONFLICT DO NOTHING


def _insert_from(located: str) -> _TriplesInsert:
    """The INSERT of both new triples for each row of `located` (one row per file, checked once
    against its location-id), returning the files written. The statement is built from this
    module's constant text only; every value is a parameter."""
    text = (
        f"WITH located AS ({located})\n"
        "INSERT INTO triples\n"
        "  (app_id, entity_id, attr_id, value, value_md5, ea, eav, av, ave, vae, checked_data_type)\n"
        f"{_new_triple_rows('hash')}\nUNION ALL\n{_new_triple_rows('last_modified')}\n"
        "{on_conflict}\nRETURNING entity_id"
    )
    return _TriplesInsert(
        sql.SQL(text).format(on_conflict=sql.SQL("")),
        sql.SQL(text).format(on_conflict=sql.SQL("ON CONFLICT DO NOTHING")),
    )


_INSERT_TRIPLES = _insert_from("""
  SELECT f.* FROM unnest(%(app_ids)s::uuid[], %(entity_ids)s::uuid[], %(location_values)s::jsonb[],
                         %(hash_values)s::jsonb[], %(hash_md5s)s::text[],
                         %(last_modified_values)s::jsonb[], %(last_modified_md5s)s::text[])
       AS f(app_id, entity_id, location_value, hash_value, hash_md5, last_modified_value, last_modified_md5)
  -- Write only for files that still have the location we asked S3 about: a file deleted or moved
  -- since it was read gets nothing.
  WHERE EXISTS (
    SELECT 1 FROM triples l
    WHERE l.app_id = f.app_id AND l.entity_id = f.entity_id AND l.attr_id = %(location_attr)s
      AND l.ea AND l.value = f.location_value)
""")

_STILL_LOCATED = """
SELECT l.entity_id FROM triples l
JOIN unnest(%(app_ids)s::uuid[], %(entity_ids)s::uuid[], %(location_values)s::jsonb[]) AS f(app_id, entity_id, location_value)
  ON l.app_id = f.app_id AND l.entity_id = f.entity_id AND l.value = f.location_value
WHERE l.attr_id = %(location_attr)s AND l.ea
"""


def _insert_params(files: Sequence[FileObjectAttrs]) -> dict:
    return {
        "app_ids": [attrs.file.app_id for attrs in files],
        "entity_ids": [attrs.file.entity_id for attrs in files],
        "location_values": [attrs.file.location_value_json for attrs in files],
        "location_attr": LOCATION_ID.attr_id,
    } | _new_value_params([attrs.hash for attrs in files], [attrs.last_modified_ms for attrs in files])


def _new_value_params(hashes: Sequence[str], last_modified_ms: Sequence[int]) -> dict:
    """The new triples' values, value_md5s, attr ids, types and flags, as `_new_triple_rows` takes them."""
    params: dict = {}
    for name, spec, values in (("hash", HASH, hashes), ("last_modified", LAST_MODIFIED, last_modified_ms)):
        texts = [json_text(value) for value in values]
        params[f"{name}_values"] = texts
        params[f"{name}_md5s"] = [md5_of_json_text(text) for text in texts]
        params[f"{name}_attr"] = spec.attr_id
        params[f"{name}_type"] = spec.checked_data_type
        params |= {f"{name}_{flag}": on for flag, on in spec.triple_flags.items()}
    return params


# The listing strategy's write: one page of an app's listing, as values by location-id, joined to
# the app's files at those locations that lack `hash` inside the statement that writes them (one
# `ave` probe per listed key). The join is the check that each file still has that location.
_LISTED_LOCATED = """
SELECT l.app_id, l.entity_id, f.hash_value, f.hash_md5, f.last_modified_value, f.last_modified_md5
FROM unnest(%(location_values)s::jsonb[], %(hash_values)s::jsonb[], %(hash_md5s)s::text[],
            %(last_modified_values)s::jsonb[], %(last_modified_md5s)s::text[])
     AS f(location_value, hash_value, hash_md5, last_modified_value, last_modified_md5)
JOIN triples l ON l.app_id = %(app_id)s AND l.attr_id = %(location_attr)s AND l.ave AND l.ea
              AND l.value = f.location_value
WHERE """ + _LACKS_HASH
_INSERT_LISTED_TRIPLES = _insert_from(_LISTED_LOCATED)


@dataclasses.dataclass(frozen=True)
class ListedAttrs:
    """One listing page's values for an app's files, by location-id, encoded for the statement: built
    where the page is read, so that the thread writing pages only writes."""

    params: dict

    @property
    def locations(self) -> int:
        return len(self.params["location_values"])

    @classmethod
    def of(cls, app_id: uuid.UUID, listed: Sequence[tuple[str, str, int]]) -> "ListedAttrs":
        """From (location-id, hash, lastModified ms) of each listed object."""
        params = {
            "app_id": app_id,
            "location_attr": LOCATION_ID.attr_id,
            "location_values": [json_text(location_id) for location_id, _, _ in listed],
        }
        return cls(params | _new_value_params([h for _, h, _ in listed], [m for _, _, m in listed]))


@dataclasses.dataclass(frozen=True)
class BatchWriteOutcome:
    written: int  # files that got their triples from this write
    already_populated: int  # files some other writer populated first
    vanished: int  # files deleted, or given another location, since they were read
    last_written: uuid.UUID | None = None  # one of the files written, to show where a run got to


def write_file_attrs(
    conn: psycopg.Connection,
    files: Sequence[FileObjectAttrs],
    progress_after: Callable[[BatchWriteOutcome], "ProgressUpdate"],
) -> BatchWriteOutcome:
    """Write both triples of every file, and the progress that follows from what was written, in
    one transaction: a batch is recorded whole or not at all."""
    write = functools.partial(_write_file_attrs, conn, files, progress_after)
    return _plain_then_on_conflict(write, _INSERT_TRIPLES)


def _plain_then_on_conflict(
    write: Callable[[sql.Composed], BatchWriteOutcome], insert: _TriplesInsert
) -> BatchWriteOutcome:
    # A plain insert costs ~20% less than ON CONFLICT's speculative one. The files were read as
    # lacking `hash`, so a conflict means another writer (or a lone `lastModified`) got there first:
    # rare, and then the batch is written again with ON CONFLICT DO NOTHING.
    try:
        return write(insert.plain)
    except psycopg.errors.UniqueViolation:
        return write(insert.on_conflict)


def _write_file_attrs(
    conn: psycopg.Connection,
    files: Sequence[FileObjectAttrs],
    progress_after: Callable[[BatchWriteOutcome], "ProgressUpdate"],
    insert: sql.Composed,
) -> BatchWriteOutcome:
    with conn.transaction():
        inserted = {row[0] for row in conn.execute(insert, _insert_params(files)).fetchall()} if files else set()
        unwritten = [f.file for f in files if f.file.entity_id not in inserted]
        vanished = len(unwritten) - len(_still_located(conn, unwritten)) if unwritten else 0
        outcome = BatchWriteOutcome(len(inserted), len(unwritten) - vanished, vanished)
        _record_progress_in_transaction(conn, progress_after(outcome))
    return outcome


def _still_located(conn: psycopg.Connection, files: Sequence[PendingFile]) -> set[uuid.UUID]:
    params = {
        "app_ids": [f.app_id for f in files],
        "entity_ids": [f.entity_id for f in files],
        "location_values": [f.location_value_json for f in files],
        "location_attr": LOCATION_ID.attr_id,
    }
    return {row[0] for row in conn.execute(_STILL_LOCATED, params).fetchall()}


def write_listed_attrs(
    conn: psycopg.Connection,
    listed: ListedAttrs,
    progress_after: Callable[[BatchWriteOutcome], "ProgressUpdate"],
) -> BatchWriteOutcome:
    """Write both triples of every file of the app that lacks `hash` and sits at a listed location,
    and the progress that follows, in one transaction. A file populated meanwhile by another writer
    is left as it is and not counted: the listing's files are only known as they are written."""
    write = functools.partial(_write_listed_attrs, conn, listed, progress_after)
    return _plain_then_on_conflict(write, _INSERT_LISTED_TRIPLES)


def _write_listed_attrs(
    conn: psycopg.Connection,
    listed: ListedAttrs,
    progress_after: Callable[[BatchWriteOutcome], "ProgressUpdate"],
    insert: sql.Composed,
) -> BatchWriteOutcome:
    with conn.transaction():
        written = {row[0] for row in conn.execute(insert, listed.params).fetchall()}
        outcome = BatchWriteOutcome(len(written), 0, 0, next(iter(written), None))
        _record_progress_in_transaction(conn, progress_after(outcome))
    return outcome


# --- progress in the config row -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProgressUpdate:
    """Increments to the migration's totals, and the latest state of one partition."""

    partition_key: str
    partition_state: dict
    processed: int = 0
    successful: int = 0
    failed: int = 0
    missing: int = 0
    partition_count: int | None = None  # given when a partition ends: recompute `completed`


# The totals live in one row, added to under the row lock that ON CONFLICT DO UPDATE takes, so
# concurrent partitions each count their own; `config.v` is json, so the sums go through jsonb.
# Each partition's state has a row of its own: a batch rewrites a few hundred bytes, not a map of
# every partition.
_ADD_TO_TOTALS = """
INSERT INTO config AS c (k, v) VALUES (%(key)s, %(initial)s::json)
ON CONFLICT (k) DO UPDATE SET v = (
  c.v::jsonb || jsonb_build_object(
    'total-processed', coalesce((c.v->>'total-processed')::bigint, 0) + %(processed)s,
    'total-successful', coalesce((c.v->>'total-successful')::bigint, 0) + %(successful)s,
    'total-failed', coalesce((c.v->>'total-failed')::bigint, 0) + %(failed)s,
    'total-missing', coalesce((c.v->>'total-missing')::bigint, 0) + %(missing)s)
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

def record_progress(conn: psycopg.Connection, update: ProgressUpdate) -> None:
    with conn.transaction():
        _record_progress_in_transaction(conn, update)


def _record_progress_in_transaction(conn: psycopg.Connection, update: ProgressUpdate) -> None:
    totals = {
        "processed": update.processed,
        "successful": update.successful,
        "failed": update.failed,
        "missing": update.missing,
    }
    initial = {f"total-{name}": value for name, value in totals.items()} | {"completed": False}
    conn.execute(_ADD_TO_TOTALS, {"key": PROGRESS_CONFIG_KEY, "initial": Json(initial)} | totals)
    conn.execute(
        _SET_PARTITION_STATE,
        {"key": PARTITION_PROGRESS_KEY_PREFIX + update.partition_key, "state": Json(update.partition_state)},
    )
    if update.partition_count is not None:
        conn.execute(
            _RECOMPUTE_COMPLETED,
            {
                "key": PROGRESS_CONFIG_KEY,
                "prefix": PARTITION_PROGRESS_KEY_PREFIX,
                "partition_count": update.partition_count,
            },
        )


def read_progress(conn: psycopg.Connection) -> dict:
    """The totals row, with every partition's state under `partitions`; {} before any run."""
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


# --- operator queries ---------------------------------------------------------------------------

_FILE_COUNTS = """
SELECT count(*), count(h.entity_id)
FROM triples l
LEFT JOIN triples h ON h.app_id = l.app_id AND h.entity_id = l.entity_id AND h.attr_id = %(hash_attr)s AND h.ea
WHERE l.attr_id = %(location_attr)s AND l.ea
"""


def migration_stats(conn: psycopg.Connection) -> dict:
    """The old migration's stats: counts from the triples, totals from the config row."""
    total, processed = conn.execute(
        _FILE_COUNTS, {"hash_attr": HASH.attr_id, "location_attr": LOCATION_ID.attr_id}
    ).fetchone()
    progress = read_progress(conn)
    return {
        "total-files": total,
        "processed-files": processed,
        "remaining-files": total - processed,
        "completion-percentage": round(100 * processed / total, 2) if total else 100.0,
        "total-processed": progress.get("total-processed", 0),
        "total-successful": progress.get("total-successful", 0),
        "total-failed": progress.get("total-failed", 0),
        "total-missing": progress.get("total-missing", 0),
        "completed": progress.get("completed", False),
    }


_DELETE_NEW_ATTR_TRIPLES = """
DELETE FROM triples
WHERE attr_id = ANY(%(attr_ids)s)
  AND ctid = ANY(ARRAY(SELECT ctid FROM triples WHERE attr_id = ANY(%(attr_ids)s) LIMIT %(limit)s))
"""


def delete_new_attr_triples(conn: psycopg.Connection, chunk_size: int = 5_000) -> int:
    """Delete every `hash` and `lastModified` triple, `chunk_size` rows a transaction so that no
    lock is held for long. Returns how many were deleted."""
    attr_ids = [spec.attr_id for spec in NEW_ATTRS]
    deleted = 0
    while True:
        with conn.transaction():
            count = conn.execute(_DELETE_NEW_ATTR_TRIPLES, {"attr_ids": attr_ids, "limit": chunk_size}).rowcount
        deleted += count
        if count == 0:
            return deleted
