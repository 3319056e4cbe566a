"""Backfill InstantDB's `$files.hash` and `$files.lastModified` from S3, as Dagster assets."""
