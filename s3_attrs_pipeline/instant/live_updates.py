"""Whether InstantDB hears of the pipeline's writes, as it hears of its own server's.

InstantDB's invalidator follows the WAL one Postgres transaction at a time and drops every
transaction that wrote triples without a `transactions` row: live queries, sync subscriptions and
webhooks then never learn of it. The server's own writes hold one such row, for the one app they
write, and (for apps with the entity log) set the transaction-local settings that make today's
triggers on `triples` emit the touched entities as `update_ents` messages.
"""

import enum
import os
import uuid

import psycopg

LIVE_UPDATES_ENV = "S3_ATTRS_LIVE_UPDATES"
LOG_TO_TABLE_ENV = "S3_ATTRS_WAL_MSG_LOG_TO_TABLE"


class LiveUpdates(enum.StrEnum):
    # Raw inserts and nothing else, like the REPL migration: InstantDB does not hear of them.
    OFF = "off"
    # Each transaction writes one app's triples and holds a `transactions` row of that app.
    QUERIES = "queries"
    # As QUERIES, and the triggers emit each written file as an entity message (sync, webhooks).
    ENTITIES = "entities"

    @property
    def one_app_per_transaction(self) -> bool:
        return self is not LiveUpdates.OFF


DEFAULT_LIVE_UPDATES = LiveUpdates.QUERIES


def live_updates_level(value: str | None = None) -> LiveUpdates:
    """`value`, else S3_ATTRS_LIVE_UPDATES, else `queries`; ValueError naming where a bad value came from."""
    source, raw = ("live_updates", value) if value else (LIVE_UPDATES_ENV, os.environ.get(LIVE_UPDATES_ENV))
    if not raw:
        return DEFAULT_LIVE_UPDATES
    try:
        return LiveUpdates(raw.strip().lower())
    except ValueError:
        choices = ", ".join(level.value for level in LiveUpdates)
        raise ValueError(f"{source}={raw!r} is not a live-updates level (one of {choices})") from None


def log_to_table(value: bool | None = None) -> bool:
    """`value`, else S3_ATTRS_WAL_MSG_LOG_TO_TABLE (true/false), else false."""
    if value is not None:
        return value
    raw = os.environ.get(LOG_TO_TABLE_ENV, "").strip().lower()
    if raw in ("", "false", "0", "no"):
        return False
    if raw in ("true", "1", "yes"):
        return True
    raise ValueError(f"{LOG_TO_TABLE_ENV}={raw!r} is not true or false")


_SET_ENTITY_LOG = """
SELECT set_config('instant.wal_msg_app_id', %(app_id)s, true),
       set_config('instant.wal_msg_log_to_table', %(log_to_table)s, true)
"""


def before_writing(conn: psycopg.Connection, app_id: uuid.UUID, level: LiveUpdates, to_table: bool) -> None:
    """In a transaction about to write `app_id`'s triples, before the first: what must precede them."""
    if level is LiveUpdates.ENTITIES:
        # Read by the triggers of each statement on triples, so set before the inserts.
        conn.execute(_SET_ENTITY_LOG, {"app_id": str(app_id), "log_to_table": "true" if to_table else "false"})


def after_writing(conn: psycopg.Connection, app_id: uuid.UUID, level: LiveUpdates, written: int) -> None:
    """In the same transaction, once its triples are written: the `transactions` row that makes
    InstantDB read them. None for a transaction that wrote nothing."""
    if level is not LiveUpdates.OFF and written:
        conn.execute("INSERT INTO transactions (app_id) VALUES (%s)", (app_id,))
