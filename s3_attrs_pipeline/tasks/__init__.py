"""What a run does to one partition: the backfill and the refresh, and what they share. No Dagster here."""
