"""The Dagster wiring: partitions, resources and assets over the backfill."""
