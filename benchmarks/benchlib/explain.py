"""EXPLAIN (ANALYZE, BUFFERS) of the pipeline's partition-streaming query, as the pipeline sends it.

psycopg sends the query with bound parameters, so PostgreSQL plans it for the values given (a
custom plan); after five executions on one connection psycopg prepares it, and PostgreSQL may then
switch to a generic plan that does not know the values. Both are shown.
"""

import dataclasses
import re

import psycopg
from psycopg import sql

from s3_attrs_pipeline.instant import database as db
from s3_attrs_pipeline.instant.file_attrs import HASH, LAST_MODIFIED, LOCATION_ID
from s3_attrs_pipeline.instant.partitions import AppIdRange

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")
SEQ_SCAN = "Seq Scan on triples"


@dataclasses.dataclass(frozen=True)
class Plan:
    title: str
    text: str

    @property
    def seq_scan(self) -> bool:
        return SEQ_SCAN in self.text


def pending_query_params(conn: psycopg.Connection, partition_key: str, batch_size: int) -> tuple[dict, dict]:
    """Parameters of the first page of `partition_key`, and of a page from the middle of it."""
    app_ids = AppIdRange.for_partition(partition_key)
    first = {
        "location_attr": LOCATION_ID.attr_id,
        "hash_attr": HASH.attr_id,
        "first_app": app_ids.first,
        "last_app": app_ids.last,
        "limit": batch_size,
    }
    count = conn.execute(
        "SELECT count(*) FROM triples WHERE attr_id = %s AND ave AND app_id BETWEEN %s AND %s",
        (LOCATION_ID.attr_id, app_ids.first, app_ids.last),
    ).fetchone()[0]
    middle = conn.execute(
        """SELECT app_id, value::text FROM triples WHERE attr_id = %s AND ave AND app_id BETWEEN %s AND %s
           ORDER BY app_id, attr_id, value OFFSET %s LIMIT 1""",
        (LOCATION_ID.attr_id, app_ids.first, app_ids.last, max(0, count // 2)),
    ).fetchone()
    following = dict(first)
    if middle is not None:
        following |= {"after_app": middle[0], "after_value": middle[1]}
    else:
        following |= {"after_app": app_ids.first, "after_value": '""'}
    return first, following


def _explain_custom(conn: psycopg.Connection, query: sql.Composable, params: dict) -> str:
    rows = conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + query, params, prepare=False).fetchall()
    return "\n".join(row[0] for row in rows)


def _explain_generic(conn: psycopg.Connection, query: sql.Composable, params: dict) -> str:
    names: list[str] = []

    def placeholder(match: re.Match) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    text = _PLACEHOLDER.sub(placeholder, query.as_string(conn)).replace("%%", "%")
    conn.execute("DEALLOCATE ALL")
    conn.execute(f"PREPARE bench_pending AS {text}", prepare=False)
    try:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        arguments = sql.SQL(", ").join(sql.Literal(params[name]) for name in names)
        rows = conn.execute(
            sql.SQL("EXPLAIN (ANALYZE, BUFFERS) EXECUTE bench_pending ({})").format(arguments), prepare=False
        ).fetchall()
    finally:
        conn.execute("RESET plan_cache_mode")
        conn.execute("DEALLOCATE bench_pending")
    return "\n".join(row[0] for row in rows)


def explain_pending_query(database_url: str, partition_key: str, batch_size: int, *, label: str) -> list[Plan]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        first, following = pending_query_params(conn, partition_key, batch_size)
        shown = {k: str(v) for k, v in following.items() if k in ("first_app", "last_app", "after_app", "after_value", "limit")}
        plans = [
            Plan(f"{label}: _FIRST_PAGE, partition {partition_key}, custom plan (bound values)",
                 _explain_custom(conn, db._FIRST_PAGE, first)),
            Plan(f"{label}: _FIRST_PAGE, same values, generic plan", _explain_generic(conn, db._FIRST_PAGE, first)),
            Plan(f"{label}: _NEXT_PAGE from the middle of partition {partition_key}, custom plan; params {shown}",
                 _explain_custom(conn, db._NEXT_PAGE, following)),
            Plan(f"{label}: _NEXT_PAGE, same values, generic plan (what a prepared statement may switch to)",
                 _explain_generic(conn, db._NEXT_PAGE, following)),
        ]
    return plans


def explain_first_page(database_url: str, partition_key: str, batch_size: int, *, label: str) -> Plan:
    with psycopg.connect(database_url, autocommit=True) as conn:
        first, _ = pending_query_params(conn, partition_key, batch_size)
        return Plan(f"{label}: _FIRST_PAGE, partition {partition_key}, custom plan", _explain_custom(conn, db._FIRST_PAGE, first))


def explain_mid_run(database_url: str, partition_key: str, batch_size: int, *, label: str) -> list[Plan]:
    """The state halfway through a partition's run, rebuilt from a completed run: the second half of the
    partition (in the query's key order) loses its new triples again, statistics stay as the run left
    them. Then the page that follows the middle is what the run would read next. Changes the database."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        _, following = pending_query_params(conn, partition_key, batch_size)
        deleted = conn.execute(
            """DELETE FROM triples h USING triples l
               WHERE l.attr_id = %(location_attr)s AND l.ave
                 AND (l.app_id, l.attr_id, l.value) > (%(after_app)s, %(location_attr)s, %(after_value)s::jsonb)
                 AND l.app_id <= %(last_app)s
                 AND h.app_id = l.app_id AND h.entity_id = l.entity_id AND h.attr_id = ANY(%(new_attrs)s)""",
            following | {"new_attrs": [HASH.attr_id, LAST_MODIFIED.attr_id]},
        ).rowcount
        note = f"{deleted} triples of the second half removed again"
        return [
            Plan(f"{label} ({note}): _NEXT_PAGE after the middle, custom plan", _explain_custom(conn, db._NEXT_PAGE, following)),
            Plan(f"{label}: _NEXT_PAGE after the middle, generic plan", _explain_generic(conn, db._NEXT_PAGE, following)),
        ]
