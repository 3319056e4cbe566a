"""The counts of a backfill, from one batch to the CLI's summary, under one name each.

A field's name is its key in Dagster's materialization metadata and in the CLI's summary; the
progress rows in InstantDB's `config` table store it in kebab case (`already_populated` is
`already-populated`), as the REPL migration named its fields.
"""

import dataclasses
from typing import Self


class _Counts:
    """Adding up and reading back a frozen dataclass of int counts."""

    @classmethod
    def names(cls) -> list[str]:
        return [field.name for field in dataclasses.fields(cls)]

    def __add__(self, other: Self) -> Self:
        return type(self)(**{name: getattr(self, name) + getattr(other, name) for name in self.names()})


@dataclasses.dataclass(frozen=True)
class FileCounts(_Counts):
    # Every file a run tried, that is every file below but `already_populated` ones it found done.
    processed: int = 0
    successful: int = 0  # got both triples
    missing: int = 0  # no object in S3 (a 404, or absent from the app's listing)
    # S3 still failed after its retries (5xx, throttling, network): the partition fails and a rerun
    # retries them. Files that cannot be filled from bad data are counted apart, not here:
    failed: int = 0
    invalid_location_id: int = 0  # a location-id that cannot name an object
    malformed_object_metadata: int = 0  # an ETag or Last-Modified that is not what S3 sends
    already_populated: int = 0  # had `hash` already, before the run or from another writer during it
    vanished_during_run: int = 0  # deleted, or given another location, between read and write
    s3_retries: int = 0
    s3_throttled: int = 0  # S3 answers that told the run to slow down
    apps_listed: int = 0  # apps read with ListObjectsV2 rather than one HEAD per file
    batches: int = 0  # write transactions
    # files deleted while their values were written, whose hash and lastModified were removed
    orphaned_values_removed: int = 0

    @property
    def files(self) -> int:
        """The files the task tried: the backfill's `processed`."""
        return self.processed

    def as_config(self) -> dict[str, int]:
        return {config_key(name): getattr(self, name) for name in self.names()}

    @classmethod
    def from_config(cls, state: dict) -> "FileCounts":
        return cls(**{name: state.get(config_key(name), 0) for name in cls.names()})


def config_key(name: str) -> str:
    return name.replace("_", "-")


# The counts the totals row adds up over every partition, as `total-<name>` (the REPL migration's
# total-processed, total-successful, total-failed and total-missing, and the bad-data counts).
TOTALLED = ("processed", "successful", "failed", "missing", "invalid_location_id", "malformed_object_metadata")


@dataclasses.dataclass(frozen=True)
class RefreshCounts(_Counts):
    """The counts of a refresh, under the names of its metadata and summary."""

    checked: int = 0  # files with values whose object was looked for
    unchanged: int = 0  # their object is the one described: nothing written
    refreshed: int = 0  # hash or lastModified rewritten to describe the current object
    missing: int = 0  # no object at the current location-id: the values are kept
    failed: int = 0  # S3 still failed after its retries
    invalid_location_id: int = 0
    malformed_object_metadata: int = 0
    vanished_during_run: int = 0  # deleted, or given another location, between read and write
    apps_listed: int = 0
    s3_retries: int = 0
    s3_throttled: int = 0  # S3 answers that told the run to slow down

    @property
    def files(self) -> int:
        """The files the task tried: the refresh's `checked`."""
        return self.checked
