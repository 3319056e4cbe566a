-- What InstantDB's schema of today (migration 73 and later) adds to postgres-grants.sql.
-- psql -v role=s3attrs -f docs/postgres-grants-current.sql <instant database>

-- The statement-level triggers on triples run as the role that writes: every insert records the
-- size of what it wrote.
GRANT INSERT ON triples_size_updates TO :role;
GRANT USAGE ON SEQUENCE triples_size_updates_id_seq TO :role;

-- live_updates entities with wal_msg_log_to_table: the triggers log entity messages to this table.
GRANT INSERT ON wal_logs TO :role;

-- Waiting for replication needs nothing more on today's schema than postgres-grants.sql says.
