"""A run over a range of partitions: its plan, its workers, its stop. No Dagster here."""
