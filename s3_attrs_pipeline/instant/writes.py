"""What the pipeline writes to `triples`: both new triples of a file, as InstantDB encodes them, for
files that still have the location S3 was asked about; their removal from files deleted meanwhile;
and, for a rollback, their deletion.

Each write runs inside its caller's transaction, so that the caller can record the progress that
follows from it in the same one: a batch is recorded whole or not at all.

A write checks that each file still has the location-id S3 was asked about, and locks that
`location-id` row (FOR KEY SHARE) until it commits: a delete of the file (or a re-upload, which
rewrites the row) waits for the write, and a write that meets a file deleted first writes nothing
for it. A delete whose statement began before the write committed still misses the new triples
(its snapshot predates them), leaving `hash` and `lastModified` on an entity without a location-id:
`remove_orphaned_values` takes those away, and the checks count them.
"""

import dataclasses
import uuid
from collections.abc import Callable, Sequence
from typing import TypeVar

import psycopg
from psycopg import sql

from s3_attrs_pipeline.instant.file_attrs import (
    HASH,
    LAST_MODIFIED,
    LOCATION_ID,
    NEW_ATTRS,
    json_text,
    md5_of_json_text,
)
from s3_attrs_pipeline.instant.reads import LACKS_HASH, PendingFile


@dataclasses.dataclass(frozen=True)
class FileObjectAttrs:
    """The values to write for one file: its object's ETag (unquoted) and Last-Modified in epoch ms."""

    file: PendingFile
    hash: str
    last_modified_ms: int


@dataclasses.dataclass(frozen=True)
class WriteOutcome:
    written: int  # files that got their triples from this write
    already_populated: int  # files some other writer populated first
    vanished: int  # files deleted, or given another location, since they were read
    last_written: uuid.UUID | None = None  # one of the files written, to show where a run got to


_TRIPLE_ROWS = sql.SQL(
    "SELECT app_id, entity_id, {attr}::uuid, {value}, {md5}, {ea}, {eav}, {av}, {ave}, {vae}, "
    "{checked_type}::checked_data_type FROM {source}"
)

_INSERT = sql.SQL("""WITH located AS ({located})
INSERT INTO triples (app_id, entity_id, attr_id, value, value_md5, ea, eav, av, ave, vae, checked_data_type)
{hash_rows}
UNION ALL
{last_modified_rows}
{on_conflict}
RETURNING entity_id""")


def _new_triple_rows(name: str, source: str = "located") -> sql.Composed:
    """One new triple per row of `source`, from its `<name>_value` and `<name>_md5` columns and the
    attr's id, type and flags (parameters `<name>_attr`, `<name>_type`, `<name>_ea`, ...)."""
    return _TRIPLE_ROWS.format(
        source=sql.Identifier(source),
        attr=sql.Placeholder(f"{name}_attr"),
        value=sql.Identifier(f"{name}_value"),
        md5=sql.Identifier(f"{name}_md5"),
        checked_type=sql.Placeholder(f"{name}_type"),
        **{flag: sql.Placeholder(f"{name}_{flag}") for flag in ("ea", "eav", "av", "ave", "vae")},
    )


# The row lock a write takes on each location-id row it relies on, when it may (see the module's doc):
# NOWAIT, so that a write never waits on a row while holding others (a delete of several files locks
# their rows in its own order). A batch meeting a file being deleted or moved right now fails with
# LockNotAvailable, rolled back whole; it is written again a moment later (`retried_when_busy`).
_KEY_SHARE = sql.SQL("\nFOR KEY SHARE OF l NOWAIT")
_NO_LOCK = sql.SQL("")


@dataclasses.dataclass(frozen=True)
class _Statements:
    """A write's statement, with and without ON CONFLICT DO NOTHING, with and without the row lock."""

    variants: dict[tuple[bool, bool], sql.Composed]

    def __call__(self, *, on_conflict: bool = False, lock: bool = True) -> sql.Composed:
        return self.variants[(on_conflict, lock)]


def _insert_from(located: sql.SQL, **parts: sql.Composable) -> _Statements:
    """The INSERT of both new triples for each row of `located` (one row per file, checked once
    against its location-id; `{lock}` in it the row lock, its other fields `parts`), returning the
    files written. Built from this module's constant text only; every value is a parameter."""

    def insert(on_conflict: bool, lock: bool) -> sql.Composed:
        return _INSERT.format(
            located=located.format(lock=_KEY_SHARE if lock else _NO_LOCK, **parts),
            hash_rows=_new_triple_rows("hash"),
            last_modified_rows=_new_triple_rows("last_modified"),
            on_conflict=sql.SQL("ON CONFLICT DO NOTHING" if on_conflict else ""),
        )

    return _Statements(
        {(conflict, lock): insert(conflict, lock) for conflict in (False, True) for lock in (False, True)}
    )


_HEADED_LOCATED = sql.SQL("""
  SELECT f.* FROM unnest(%(app_ids)s::uuid[], %(entity_ids)s::uuid[], %(location_values)s::jsonb[],
                         %(hash_values)s::jsonb[], %(hash_md5s)s::text[],
                         %(last_modified_values)s::jsonb[], %(last_modified_md5s)s::text[])
       AS f(app_id, entity_id, location_value, hash_value, hash_md5, last_modified_value, last_modified_md5)
  -- Write only for files that still have the location we asked S3 about: a file deleted or moved
  -- since it was read gets nothing; one deleted or moved from now on waits for this write.
  JOIN triples l ON l.app_id = f.app_id AND l.entity_id = f.entity_id AND l.attr_id = %(location_attr)s
                AND l.ea AND l.value = f.location_value{lock}
""")
_INSERT_TRIPLES = _insert_from(_HEADED_LOCATED)

_STILL_LOCATED = """
SELECT l.entity_id FROM triples l
JOIN unnest(%(app_ids)s::uuid[], %(entity_ids)s::uuid[], %(location_values)s::jsonb[])
     AS f(app_id, entity_id, location_value)
  ON l.app_id = f.app_id AND l.entity_id = f.entity_id AND l.value = f.location_value
WHERE l.attr_id = %(location_attr)s AND l.ea
"""

# One page of an app's listing, as values by location-id, joined to the app's files at those
# locations inside the statement that writes them: one `ave` probe per listed key (`{lock}` in it).
# The join is the check that each file still has that location. OFFSET 0 keeps the probe a subquery
# of its own: flattened into a join, the planner (which expects few of the app's files to lack
# `hash`) compares every listed key with every file of the app, 1,000 x the app's files a page.
_LISTED_AT = """
SELECT l.app_id, l.entity_id, f.hash_value, f.hash_md5, f.last_modified_value, f.last_modified_md5
FROM unnest(%(location_values)s::jsonb[], %(hash_values)s::jsonb[], %(hash_md5s)s::text[],
            %(last_modified_values)s::jsonb[], %(last_modified_md5s)s::text[])
     AS f(location_value, hash_value, hash_md5, last_modified_value, last_modified_md5)
CROSS JOIN LATERAL (
  SELECT l.app_id, l.entity_id FROM triples l
  WHERE l.app_id = %(app_id)s AND l.attr_id = %(location_attr)s AND l.ave AND l.ea AND l.value = f.location_value
  OFFSET 0{lock}
) l"""
# The listing strategy's write: those of the files that lack `hash`.
_LISTED_LOCATED = sql.SQL(_LISTED_AT + "\nWHERE {lacks_hash}")
LISTED_LOCATED = _LISTED_LOCATED.format(lacks_hash=LACKS_HASH, lock=_NO_LOCK)  # the join, as EXPLAIN shows it
_INSERT_LISTED_TRIPLES = _insert_from(_LISTED_LOCATED, lacks_hash=LACKS_HASH)


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


def _file_params(files: Sequence[PendingFile]) -> dict:
    return {
        "app_ids": [f.app_id for f in files],
        "entity_ids": [f.entity_id for f in files],
        "location_values": [f.location_value_json for f in files],
        "location_attr": LOCATION_ID.attr_id,
    }


@dataclasses.dataclass(frozen=True)
class ListedAttrs:
    """One listing page's values for an app's files, by location-id, encoded for the statement: built
    where the page is read, so that the thread writing pages only writes."""

    params: dict

    @property
    def locations(self) -> int:
        return len(self.params["location_values"])

    @property
    def app_id(self) -> uuid.UUID:
        return self.params["app_id"]

    @classmethod
    def of(cls, app_id: uuid.UUID, listed: Sequence[tuple[str, str, int]]) -> "ListedAttrs":
        """From (location-id, hash, lastModified ms) of each listed object."""
        params = {
            "app_id": app_id,
            "location_attr": LOCATION_ID.attr_id,
            "location_values": [json_text(location_id) for location_id, _, _ in listed],
        }
        return cls(params | _new_value_params([h for _, h, _ in listed], [m for _, _, m in listed]))


def write_file_attrs(
    conn: psycopg.Connection, files: Sequence[FileObjectAttrs], *, on_conflict: bool = False, lock: bool = True
) -> WriteOutcome:
    """Write both triples of every file that still has the location it was read with, in the
    caller's transaction, holding its location-id row (`lock`: see the module's doc) until it commits.
    Without `on_conflict`, a file that got `hash` meanwhile raises UniqueViolation (see
    `retried_on_conflict`); with `lock`, one being deleted or moved right now LockNotAvailable (see
    `retried_when_busy`)."""
    if not files:
        return WriteOutcome(0, 0, 0)
    params = _file_params([f.file for f in files]) | _new_value_params(
        [f.hash for f in files], [f.last_modified_ms for f in files]
    )
    statement = _INSERT_TRIPLES(on_conflict=on_conflict, lock=lock)
    inserted = {row[0] for row in conn.execute(statement, params).fetchall()}
    unwritten = [f.file for f in files if f.file.entity_id not in inserted]
    vanished = len(unwritten) - len(_still_located(conn, unwritten)) if unwritten else 0
    return WriteOutcome(len(inserted), len(unwritten) - vanished, vanished)


def _still_located(conn: psycopg.Connection, files: Sequence[PendingFile]) -> set[uuid.UUID]:
    return {row[0] for row in conn.execute(_STILL_LOCATED, _file_params(files)).fetchall()}


def write_listed_attrs(
    conn: psycopg.Connection, listed: ListedAttrs, *, on_conflict: bool = False, lock: bool = True
) -> WriteOutcome:
    """Write both triples of every file of the app that lacks `hash` and sits at a listed location, in
    the caller's transaction, as `write_file_attrs` does. A file populated meanwhile by another writer
    is left as it is and not counted: the listing's files are only known as they are written."""
    statement = _INSERT_LISTED_TRIPLES(on_conflict=on_conflict, lock=lock)
    written = {row[0] for row in conn.execute(statement, listed.params).fetchall()}
    return WriteOutcome(len(written), 0, 0, next(iter(written), None))


_Written = TypeVar("_Written")


def app_deleted(error: psycopg.Error) -> bool:
    """Whether a write failed because its app is gone: deleted while its files were being written (the
    foreign key of the `transactions` row, or of a triple, to `apps`)."""
    detail = error.diag.message_detail or ""
    return isinstance(error, psycopg.errors.ForeignKeyViolation) and 'table "apps"' in detail


def retried_when_busy(attempt: Callable[[], _Written], sleep: Callable[[float], None]) -> _Written:
    """`attempt()`, again after a short `sleep` while it meets a file being deleted or moved right now
    (LockNotAvailable: its transaction rolled back whole); LockNotAvailable if the file stays busy."""
    for delay in _BUSY_RETRY_DELAYS_S:
        try:
            return attempt()
        except psycopg.errors.LockNotAvailable:
            sleep(delay)
    return attempt()


# A delete or a re-upload commits in milliseconds: these waits outlast any but a stuck transaction.
_BUSY_RETRY_DELAYS_S = (0.05, 0.2, 0.5, 1.0, 2.0)


def retried_on_conflict(attempt: Callable[[bool], _Written]) -> _Written:
    """`attempt(False)`, or `attempt(True)` if that raised UniqueViolation. Each attempt must be a
    transaction of its own, the failed one rolled back whole.

    A plain insert costs ~20% less than ON CONFLICT's speculative one. The files were read as
    lacking `hash`, so a conflict means another writer (or a lone `lastModified`) got there first:
    rare, and then the batch is written again with ON CONFLICT DO NOTHING."""
    try:
        return attempt(False)
    except psycopg.errors.UniqueViolation:
        return attempt(True)


# --- refresh: rewriting values that no longer describe the file's current object -------------------

# For each located file (one row per file still at the location S3 was asked about, with the values
# its object has now), compare with the stored values and rewrite those that differ, as InstantDB
# rewrites a cardinality-one attr: ON CONFLICT on the `ea` index, only when value_md5 changed, so an
# unchanged triple gets no new row version. Answers (files compared, files rewritten).
_REFRESH = sql.SQL("""WITH located AS ({located}),
compared AS (
  SELECT f.*, h.value_md5 AS stored_hash_md5, m.value_md5 AS stored_last_modified_md5
  FROM located f
  JOIN triples h ON h.app_id = f.app_id AND h.entity_id = f.entity_id AND h.attr_id = %(hash_attr)s AND h.ea
  LEFT JOIN triples m ON m.app_id = f.app_id AND m.entity_id = f.entity_id AND m.attr_id = %(last_modified_attr)s
                     AND m.ea
),
changed AS (
  SELECT * FROM compared
  WHERE stored_hash_md5 <> hash_md5 OR stored_last_modified_md5 IS DISTINCT FROM last_modified_md5
),
written AS (
  INSERT INTO triples (app_id, entity_id, attr_id, value, value_md5, ea, eav, av, ave, vae, checked_data_type)
  {hash_rows}
  UNION ALL
  {last_modified_rows}
  ON CONFLICT (app_id, entity_id, attr_id) WHERE ea
  DO UPDATE SET value = excluded.value, value_md5 = excluded.value_md5
  WHERE triples.value_md5 IS DISTINCT FROM excluded.value_md5
  RETURNING entity_id
)
SELECT (SELECT count(*) FROM compared), (SELECT count(DISTINCT entity_id) FROM written)""")


def _refresh_from(located: sql.SQL) -> _Statements:
    """The refresh of each row of `located` (`{lock}` in it the row lock), with and without the lock."""

    def refresh(lock: bool) -> sql.Composed:
        return _REFRESH.format(
            located=located.format(lock=_KEY_SHARE if lock else _NO_LOCK),
            hash_rows=_new_triple_rows("hash", "changed"),
            last_modified_rows=_new_triple_rows("last_modified", "changed"),
        )

    # A rewrite is written once, whatever conflicts: ON CONFLICT ... DO UPDATE is the statement itself.
    return _Statements({(conflict, lock): refresh(lock) for conflict in (False, True) for lock in (False, True)})


_REFRESH_HEADED = _refresh_from(_HEADED_LOCATED)
# The refresh compares every file at the listed locations, whatever its values.
_REFRESH_LISTED = _refresh_from(sql.SQL(_LISTED_AT))


@dataclasses.dataclass(frozen=True)
class RefreshOutcome:
    compared: int  # files still at the location the values were read for
    rewritten: int  # of them, files whose hash or lastModified was rewritten


def refresh_file_attrs(
    conn: psycopg.Connection, files: Sequence[FileObjectAttrs], *, lock: bool = True
) -> RefreshOutcome:
    """Rewrite the two triples of each file still at its location whose values differ from `files`',
    in the caller's transaction (`lock` as `write_file_attrs`)."""
    if not files:
        return RefreshOutcome(0, 0)
    params = _file_params([f.file for f in files]) | _new_value_params(
        [f.hash for f in files], [f.last_modified_ms for f in files]
    )
    return RefreshOutcome(*conn.execute(_REFRESH_HEADED(lock=lock), params).fetchone())


def refresh_listed_attrs(conn: psycopg.Connection, listed: ListedAttrs, *, lock: bool = True) -> RefreshOutcome:
    """The same for the files of an app at a listing page's locations."""
    return RefreshOutcome(*conn.execute(_REFRESH_LISTED(lock=lock), listed.params).fetchone())


# The values of the app's entities that have no location-id: files deleted while their values were
# written. One `ave` index range of the app per attr, a location-id probe per row through `ea_index`
# (IS NOT DISTINCT FROM: see reads.LACKS_HASH).
_REMOVE_ORPHANED_VALUES = """
WITH removed AS (
  DELETE FROM triples t
  WHERE t.app_id = %(app_id)s AND t.attr_id = ANY(%(attr_ids)s::uuid[]) AND t.ave AND t.ea
    AND (SELECT 1 FROM triples l
         WHERE l.app_id = t.app_id AND l.entity_id = t.entity_id AND l.attr_id IS NOT DISTINCT FROM %(location_attr)s
           AND l.ea
         LIMIT 1) IS NULL
  RETURNING t.entity_id
)
SELECT count(DISTINCT entity_id) FROM removed
"""


def remove_orphaned_values(conn: psycopg.Connection, app_id: uuid.UUID) -> int:
    """Delete the `hash` and `lastModified` triples of the app's entities that have no `location-id`,
    in the caller's transaction; how many entities had some. Never touches another attr."""
    params = {"app_id": app_id, "attr_ids": [spec.attr_id for spec in NEW_ATTRS], "location_attr": LOCATION_ID.attr_id}
    return conn.execute(_REMOVE_ORPHANED_VALUES, params).fetchone()[0]


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
