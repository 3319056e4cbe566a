import os

import dagster as dg

from s3_attrs_pipeline.instant.app_id_ranges import MAX_PARTITION_WIDTH, partition_keys

PARTITION_WIDTH_ENV = "S3_ATTRS_PARTITION_WIDTH"
DEFAULT_PARTITION_WIDTH = 2


def partition_width_from_env() -> int:
    raw = os.environ.get(PARTITION_WIDTH_ENV, str(DEFAULT_PARTITION_WIDTH))
    try:
        width = int(raw)
    except ValueError:
        width = 0
    if not 1 <= width <= MAX_PARTITION_WIDTH:
        raise ValueError(f"{PARTITION_WIDTH_ENV}={raw!r}: the partition width must be 1 to {MAX_PARTITION_WIDTH} hex digits")
    return width


PARTITION_WIDTH = partition_width_from_env()

# One partition per app-id prefix: `00`..`ff` with the default width of 2.
app_id_prefix_partitions = dg.StaticPartitionsDefinition(partition_keys(PARTITION_WIDTH))


# A run over a range of partitions (what a single-run backfill launches) carries these tags.
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def range_tags(keys: list[str]) -> dict[str, str]:
    """The tags of one run over every partition from the first of `keys` to the last."""
    return {RANGE_START_TAG: min(keys), RANGE_END_TAG: max(keys)}
