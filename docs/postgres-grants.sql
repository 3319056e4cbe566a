-- Least privilege for the pipeline's database role. Replace s3attrs with your role's name.
-- psql -v role=s3attrs -f docs/postgres-grants.sql <instant database>
-- On InstantDB's schema of today (migration 73 and later), also run postgres-grants-current.sql.

GRANT USAGE ON SCHEMA public TO :role;

-- Backfill, verification and stats: read the catalog and the triples, add the two attrs once,
-- insert hash/lastModified triples (RETURNING needs SELECT), keep the progress row.
GRANT SELECT, INSERT ON attrs, idents, triples TO :role;
GRANT SELECT, INSERT, UPDATE ON config TO :role;
-- A write locks the location-id row of each file it writes (SELECT ... FOR KEY SHARE) until it
-- commits, so that a delete of the file waits for it rather than leaving hash and lastModified on a
-- deleted file. Postgres lets a role lock rows only with UPDATE on some column of the table: this
-- one, which the pipeline never updates (and InstantDB's triggers ignore).
GRANT UPDATE (created_at) ON triples TO :role;

-- live_updates queries/entities (the default): one `transactions` row per write transaction, as
-- InstantDB's server writes, so that InstantDB tells live queries. Not needed at live_updates off.
GRANT INSERT ON transactions TO :role;

-- Waiting for replication before each write transaction (S3_ATTRS_MAX_REPLICATION_LAG_MB,
-- S3_ATTRS_MAX_REPLAY_LAG_S) needs no grant for the logical slots: pg_replication_slots,
-- pg_current_wal_insert_lsn() and pg_wal_lsn_diff() are open to every role. Streaming replicas' replay lag
-- in pg_stat_replication is shown only to members of pg_read_all_stats (pg_monitor includes it);
-- without it the pipeline warns once and watches the slots alone. To watch replicas too:
--   GRANT pg_read_all_stats TO :role;
-- (It lets the role read every statistics view, with other sessions' queries: grant it knowingly.)

-- Values left on a file deleted while they were written (the `consistency` check's orphaned_values)
-- are removed by the next backfill of the partition (the daily heal runs it) only if the role may
-- delete: see postgres-grants-heal.sql. Without it the run warns and the check stays red.

-- `s3-attrs reset` also needs:      GRANT DELETE ON config TO :role;
-- `s3-attrs rollback` also needs:   GRANT DELETE ON triples, config TO :role;
-- Give those to a separate operator role: with DELETE on triples a role could delete
-- location-id triples, and InstantDB would then delete the S3 objects.
