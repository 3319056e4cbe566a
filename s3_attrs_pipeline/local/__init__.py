"""A local stand-in for production: embedded PostgreSQL with InstantDB's tables, moto's S3 server,
and a seeded data set. Used by `make demo`, `make ui` and the tests; never by a real backfill."""
