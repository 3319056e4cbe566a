"""Whether InstantDB hears of the pipeline's writes, as it hears of its own server's.

InstantDB's invalidator follows the WAL one Postgres transaction at a time and drops every
transaction that wrote triples without a `transactions` row: live queries, sync subscriptions and
webhooks then never learn of it. The server's own writes hold one such row, for the one app they
write, and (for apps with the entity log) set the transaction-local settings that make today's
triggers on `triples` emit the touched entities as `update_ents` messages.
"""

import enum
import uuid

import psycopg


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


_SET_ENTITY_LOG = """
SELECT set_config('instant.wal_msg_app_id', %(app_id)s, true),
       set_config('instant.wal_msg_log_to_table', %(log_to_table)s, true)
"""


def before_writing(conn: psycopg.Connection, app_id: uuid.UUID, level: LiveUpdates, to_table: bool) -> None:
    """First in a transaction about to write `app_id`'s triples, as InstantDB's server begins one: the
    entity log's settings (at `entities`; the triggers of each statement on triples read them), then
    the `transactions` row that makes InstantDB read the transaction.

    Inserting that row first also takes the app's row lock (its foreign key) before any row the write
    locks: the order in which a delete of the app cascades to its triples, so the two cannot deadlock."""
    if level is LiveUpdates.ENTITIES:
        conn.execute(_SET_ENTITY_LOG, {"app_id": str(app_id), "log_to_table": "true" if to_table else "false"})
    if level is not LiveUpdates.OFF:
        conn.execute("INSERT INTO transactions (app_id) VALUES (%s)", (app_id,))
