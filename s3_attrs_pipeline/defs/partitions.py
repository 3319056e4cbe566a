"""The assets' partitions, one per app-id prefix, and the tags of a run over a range of them."""

import dagster as dg

from s3_attrs_pipeline.instant.app_id_ranges import partition_keys


def app_id_prefix_partitions(width: int) -> dg.StaticPartitionsDefinition:
    """One partition per app-id prefix of `width` hex digits: `00`..`ff` for 2."""
    return dg.StaticPartitionsDefinition(partition_keys(width))


# A run over a range of partitions (what a single-run backfill launches) carries these tags.
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def range_tags(keys: list[str]) -> dict[str, str]:
    """The tags of one run over every partition from the first of `keys` to the last."""
    return {RANGE_START_TAG: min(keys), RANGE_END_TAG: max(keys)}
