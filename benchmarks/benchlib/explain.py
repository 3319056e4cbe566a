"""EXPLAIN (ANALYZE, BUFFERS) of the pipeline's per-partition queries, as the pipeline sends them.

Every plan is taken on a session from `instant.connection.connect`, so with the pipeline's session settings;
these include `plan_cache_mode = force_custom_plan`: psycopg prepares a query after five executions
on a connection, and PostgreSQL then still plans each execution for its values (a custom plan),
never a generic plan. `custom_plans_forced` checks exactly that (pg_prepared_statements counts the
plans of each kind), so generic plans are not explained any more.

The queries:
- `_APP_FILE_COUNTS`: the grouped count per app that starts every partition run;
- `_FIRST_PAGE` / `_NEXT_PAGE`: the keyset pages of the HEAD path;
- `_LISTED_LOCATED`: the LIST path's join of one listing page (1,000 location ids of one app) to the
  app's files lacking `hash`, which the page's INSERT writes from.

Each plan also gets a bound: the files it may touch by the issue's floor ("its cost grows with the
partition's files, not with the table"): the partition's files, or for the listing's join the
listing page's. The cost check asks that the buffers it touched stay within a few per such file,
whatever the size of `triples`: a plan whose cost follows the table fails it, as does `Seq Scan on
triples`. A page of the HEAD path returns `limit` files; its buffers per file returned are shown too:
when they follow the partition rather than the page, streaming a partition costs its size squared.
"""

import dataclasses
import re

import psycopg
from psycopg import sql

from s3_attrs_pipeline.instant import connection, reads, writes
from s3_attrs_pipeline.instant.app_id_ranges import AppIdRange
from s3_attrs_pipeline.instant.file_attrs import HASH, LAST_MODIFIED, LOCATION_ID
from s3_attrs_pipeline.instant.object_keys import object_key

SEQ_SCAN = "Seq Scan on triples"
BUFFERS_PER_FILE = 12  # index leaf + heap page of the location triple, the hash probe's index descent...
BUFFERS_FIXED = 64  # descents of the indexes, catalog pages
_BUFFERS = re.compile(r"Buffers: shared(?: hit=(\d+))?(?: read=(\d+))?(?: dirtied=(\d+))?(?: written=(\d+))?")
_EXECUTION = re.compile(r"Execution Time: ([\d.]+) ms")


@dataclasses.dataclass(frozen=True)
class Plan:
    title: str
    text: str
    bound_files: int = 0  # the files this query may touch: the partition's, or the listing page's
    table_triples: int = 0
    returns: int | None = None  # a page's limit

    @property
    def seq_scan(self) -> bool:
        return SEQ_SCAN in self.text

    @property
    def buffers(self) -> int:
        """Shared buffers the whole plan touched (its top node's, which include its children's)."""
        match = _BUFFERS.search(self.text)
        return sum(int(match.group(i) or 0) for i in (1, 2)) if match else 0

    @property
    def execution_ms(self) -> float:
        match = _EXECUTION.search(self.text)
        return float(match.group(1)) if match else 0.0

    @property
    def cost_bounded(self) -> bool:
        return self.buffers <= BUFFERS_PER_FILE * self.bound_files + BUFFERS_FIXED


def _params(app_ids: AppIdRange, limit: int | None = None) -> dict:
    params = {
        "location_attr": LOCATION_ID.attr_id,
        "hash_attr": HASH.attr_id,
        "first_app": app_ids.first,
        "last_app": app_ids.last,
    }
    if limit is not None:
        params["limit"] = limit
    return params


def partition_files(conn: psycopg.Connection, partition_key: str) -> int:
    app_ids = AppIdRange.for_partition(partition_key)
    return conn.execute(
        "SELECT count(*) FROM triples WHERE attr_id = %s AND ave AND app_id BETWEEN %s AND %s",
        (LOCATION_ID.attr_id, app_ids.first, app_ids.last),
    ).fetchone()[0]


def _table_triples(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM triples").fetchone()[0]


def middle_page_params(conn: psycopg.Connection, partition_key: str, batch_size: int) -> dict:
    """_NEXT_PAGE's parameters for the page after the middle of the partition (in the query's key order)."""
    app_ids = AppIdRange.for_partition(partition_key)
    count = partition_files(conn, partition_key)
    middle = conn.execute(
        """SELECT app_id, value::text FROM triples WHERE attr_id = %s AND ave AND app_id BETWEEN %s AND %s
           ORDER BY app_id, attr_id, value OFFSET %s LIMIT 1""",
        (LOCATION_ID.attr_id, app_ids.first, app_ids.last, max(0, count // 2)),
    ).fetchone()
    params = _params(app_ids, batch_size)
    if middle is not None:
        return params | {"after_app": middle[0], "after_value": middle[1]}
    return params | {"after_app": app_ids.first, "after_value": '""'}


def listing_page_params(conn: psycopg.Connection, app_id: str, page: int = 0, size: int = 1000) -> dict:
    """_LISTED_LOCATED's parameters for one page of the app's listing: `size` of its location ids in S3's
    key order (`<app>/<bin>/<location-id>`), with made-up values, as backfill._list_app writes them."""
    rows = conn.execute(
        "SELECT value #>> '{}' FROM triples WHERE app_id = %s AND attr_id = %s AND ave",
        (app_id, LOCATION_ID.attr_id),
    ).fetchall()
    import uuid

    app = uuid.UUID(app_id)
    keyed = sorted((object_key(app, location).encode(), location) for (location,) in rows)
    locations = [location for _, location in keyed[page * size : (page + 1) * size]]
    return writes.ListedAttrs.of(app, [(location, "0" * 32, 1_600_000_000_000) for location in locations]).params


def _explain(conn: psycopg.Connection, query, params: dict) -> str:
    statement = sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + (
        query if isinstance(query, sql.Composable) else sql.SQL(query)
    )
    rows = conn.execute(statement, params, prepare=False).fetchall()
    return "\n".join(row[0] for row in rows)


def custom_plans_forced(database_url: str, partition_key: str, batch_size: int) -> str:
    """Run _NEXT_PAGE seven times on a session from database.connect, letting psycopg prepare it as it
    does in the pipeline, and report how PostgreSQL planned the prepared statement's executions."""
    with connection.connect(database_url) as conn:
        mode = conn.execute("SHOW plan_cache_mode").fetchone()[0]
        params = middle_page_params(conn, partition_key, batch_size)
        for _ in range(7):
            conn.execute(reads._NEXT_PAGE, params).fetchall()
        row = conn.execute(
            "SELECT coalesce(sum(generic_plans), 0), coalesce(sum(custom_plans), 0) FROM pg_prepared_statements "
            "WHERE statement LIKE %s",
            ("%ORDER BY l.app_id, l.attr_id, l.value%",),
        ).fetchone()
    generic, custom = row
    verdict = "PASS" if mode == "force_custom_plan" and generic == 0 and custom > 0 else "FAIL"
    return (
        f"{verdict}: sessions of database.connect have plan_cache_mode = {mode}; after 7 executions of "
        f"_NEXT_PAGE (psycopg prepares from the 6th) the prepared statement had {custom} custom and "
        f"{generic} generic plans"
    )


def explain_fresh(
    database_url: str, largest: str, median: str, smallest: str, listed_app: str | None, batch_size: int, *, label: str
) -> list[Plan]:
    """The queries of a run's start, on data no run has touched yet."""
    with connection.connect(database_url) as conn:
        table = _table_triples(conn)
        largest_files = partition_files(conn, largest)
        median_files = partition_files(conn, median)
        smallest_files = partition_files(conn, smallest)
        plans = [
            Plan(
                f"{label}: _APP_FILE_COUNTS, largest partition {largest} ({largest_files} files)",
                _explain(conn, reads._APP_FILE_COUNTS, _params(AppIdRange.for_partition(largest))),
                largest_files,
                table,
            ),
            Plan(
                f"{label}: _APP_FILE_COUNTS, smallest partition with work {smallest} ({smallest_files} files)",
                _explain(conn, reads._APP_FILE_COUNTS, _params(AppIdRange.for_partition(smallest))),
                smallest_files,
                table,
            ),
            Plan(
                f"{label}: _FIRST_PAGE, partition {largest}, limit {batch_size}",
                _explain(conn, reads._FIRST_PAGE, _params(AppIdRange.for_partition(largest), batch_size)),
                largest_files,
                table,
                batch_size,
            ),
            Plan(
                f"{label}: _FIRST_PAGE, median partition with work {median} ({median_files} files), limit {batch_size}",
                _explain(conn, reads._FIRST_PAGE, _params(AppIdRange.for_partition(median), batch_size)),
                median_files,
                table,
                batch_size,
            ),
            Plan(
                f"{label}: _FIRST_PAGE, smallest partition with work {smallest}, limit {batch_size}",
                _explain(conn, reads._FIRST_PAGE, _params(AppIdRange.for_partition(smallest), batch_size)),
                smallest_files,
                table,
                batch_size,
            ),
            Plan(
                f"{label}: _NEXT_PAGE from the middle of partition {largest}",
                _explain(conn, reads._NEXT_PAGE, middle_page_params(conn, largest, batch_size)),
                largest_files,
                table,
                batch_size,
            ),
        ]
        if listed_app:
            params = listing_page_params(conn, listed_app)
            plans.append(
                Plan(
                    f"{label}: _LISTED_LOCATED (the join inside a listed page's INSERT), app {listed_app} (the largest "
                    f"listed), its first listing page ({len(params['location_values'])} location ids)",
                    _explain(conn, writes.LISTED_LOCATED, params),
                    len(params["location_values"]),
                    table,
                )
            )
    return plans


def explain_after_run(database_url: str, largest: str, listed_app: str | None, batch_size: int) -> list[Plan]:
    """After a complete run: what a rerun's queries cost (they walk the populated files), then the
    state halfway through the partition's run, rebuilt by removing the new triples of its second half
    again (statistics as the run left them). Changes the database."""
    plans = []
    with connection.connect(database_url) as conn:
        table = _table_triples(conn)
        files = partition_files(conn, largest)
        label = "after a complete run"
        plans.append(
            Plan(
                f"{label}: _APP_FILE_COUNTS, partition {largest} (a rerun's count)",
                _explain(conn, reads._APP_FILE_COUNTS, _params(AppIdRange.for_partition(largest))),
                files,
                table,
            )
        )
        plans.append(
            Plan(
                f"{label}: _FIRST_PAGE, partition {largest} (a rerun's first page walks the populated files)",
                _explain(conn, reads._FIRST_PAGE, _params(AppIdRange.for_partition(largest), batch_size)),
                files,
                table,
                batch_size,
            )
        )
        if listed_app:
            params = listing_page_params(conn, listed_app)
            plans.append(
                Plan(
                    f"{label}: _LISTED_LOCATED, app {listed_app}, first listing page (all populated)",
                    _explain(conn, writes.LISTED_LOCATED, params),
                    len(params["location_values"]),
                    table,
                )
            )
        following = middle_page_params(conn, largest, batch_size)
        with conn.transaction():
            deleted = conn.execute(
                """DELETE FROM triples h USING triples l
                   WHERE l.attr_id = %(location_attr)s AND l.ave
                     AND (l.app_id, l.attr_id, l.value) > (%(after_app)s, %(location_attr)s, %(after_value)s::jsonb)
                     AND l.app_id <= %(last_app)s
                     AND h.app_id = l.app_id AND h.entity_id = l.entity_id AND h.attr_id = ANY(%(new_attrs)s)""",
                following | {"new_attrs": [HASH.attr_id, LAST_MODIFIED.attr_id]},
            ).rowcount
        label = f"mid-run ({deleted} new triples of the partition's second half removed again, statistics as the run left them)"
        plans.append(
            Plan(
                f"{label}: _NEXT_PAGE after the middle of partition {largest}",
                _explain(conn, reads._NEXT_PAGE, following),
                files,
                table,
                batch_size,
            )
        )
        plans.append(
            Plan(
                f"mid-run: _APP_FILE_COUNTS, partition {largest}",
                _explain(conn, reads._APP_FILE_COUNTS, _params(AppIdRange.for_partition(largest))),
                files,
                table,
            )
        )
    return plans
