-- The role of `s3-attrs refresh` (and the files_s3_attrs_refresh asset). The backfill's role stays
-- insert-only: give this one to the refresh alone. Replace s3refresh with its name.
-- psql -v role=s3refresh -f docs/postgres-grants-refresh.sql <instant database>
-- On InstantDB's schema of today (migration 73 and later), also run postgres-grants-current.sql
-- and postgres-grants-refresh-current.sql.

GRANT USAGE ON SCHEMA public TO :role;

-- Read the catalog, the files and their values; add the two attrs if missing (as the backfill).
GRANT SELECT, INSERT ON attrs, idents, triples TO :role;
-- Rewrite a hash or lastModified in place, as InstantDB rewrites a cardinality-one attr (INSERT ...
-- ON CONFLICT DO UPDATE SET value, value_md5): those two columns and nothing else. Postgres cannot
-- limit it to the two attrs' rows; the refresh's statement only ever names them.
GRANT UPDATE (value, value_md5) ON triples TO :role;

-- The operator's control (s3-attrs pause, throttle): the row `s3-attrs-control`, read every few
-- seconds. Without it the refresh fails at its start ("permission denied for table config"), rather
-- than run on unpaused.
GRANT SELECT ON config TO :role;

-- live_updates queries/entities: the `transactions` row of each write transaction.
GRANT INSERT ON transactions TO :role;

-- Waiting for replication before each write: as postgres-grants.sql says (nothing for the slots;
-- pg_read_all_stats to see streaming replicas' replay lag).
