-- What InstantDB's schema of today adds to postgres-grants-refresh.sql, beside
-- postgres-grants-current.sql. psql -v role=s3refresh -f docs/postgres-grants-refresh-current.sql <db>

-- The statement-level trigger after every UPDATE of triples inserts the locations that the
-- statement took away into app_files_to_sweep, and Postgres checks the privilege even when, as for
-- a rewrite of hash or lastModified, there are none. The refresh never names a location-id triple;
-- still, this is a role that could queue objects for deletion: keep it to the refresh.
GRANT INSERT ON app_files_to_sweep TO :role;
