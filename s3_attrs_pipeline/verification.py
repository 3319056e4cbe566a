"""Proof that the backfill is complete and right: counts from the database, and a random sample of
populated files re-HEADed in S3. No Dagster here."""

import dataclasses

import psycopg

from s3_attrs_pipeline.instant import progress_rows, reads
from s3_attrs_pipeline.instant.app_id_ranges import partition_keys
from s3_attrs_pipeline.instant.object_keys import InvalidLocationId, object_key
from s3_attrs_pipeline.s3.store import ObjectStore

MISMATCH_EXAMPLES = 20


@dataclasses.dataclass(frozen=True)
class PartitionGap:
    partition_key: str
    files: int
    with_hash: int
    lacking_hash: int
    known_missing: int
    known_invalid: int
    gap: int  # lacking hash and not known to be missing in S3 or invalid


@dataclasses.dataclass(frozen=True)
class SampleMismatch:
    app_id: str
    entity_id: str
    key: str
    stored: str
    actual: str


@dataclasses.dataclass
class VerificationReport:
    total_files: int = 0
    with_hash: int = 0
    with_last_modified: int = 0
    with_both: int = 0
    with_neither: int = 0
    only_one: int = 0  # files with hash or lastModified but not both
    known_missing: int = 0
    known_invalid: int = 0  # invalid location id or malformed object metadata in the latest run
    remaining: int = 0  # files lacking hash that are not known to be missing or invalid
    partitions_with_gaps: list[PartitionGap] = dataclasses.field(default_factory=list)
    # Files with hash and no location-id: deleted while their values were written (instant/writes.py);
    # an app would see each as a file. A backfill of the partition removes them.
    orphaned_values: int = 0
    orphaned_values_by_partition: dict[str, int] = dataclasses.field(default_factory=dict)
    malformed: reads.MalformedTriples = reads.MalformedTriples(0, 0, 0)
    sample_size: int = 0
    sample_hash_mismatches: int = 0
    sample_last_modified_mismatches: int = 0
    sample_missing_now: int = 0
    sample_unreadable: int = 0  # HEAD failed after retries: neither proof nor disproof
    # Sampled files whose values describe another object than their location-id's now (a re-upload,
    # a rewrite, a deletion): what `s3-attrs refresh` mends.
    sample_stale: int = 0
    mismatches: list[SampleMismatch] = dataclasses.field(default_factory=list)
    # For one app, how the database answers the queries the new attrs exist for (reads.APP_QUERIES).
    app_query_plans: list[reads.QueryPlan] = dataclasses.field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.remaining == 0

    @property
    def consistent(self) -> bool:
        return (
            self.sample_hash_mismatches == 0
            and self.sample_last_modified_mismatches == 0
            and self.sample_missing_now == 0
            and self.orphaned_values == 0
        )

    @property
    def well_formed(self) -> bool:
        return self.only_one == 0 and self.malformed == reads.MalformedTriples(0, 0, 0)

    @property
    def app_queries_use_indexes(self) -> bool:
        return all(plan.index for plan in self.app_query_plans)

    @property
    def gap_partition_keys(self) -> list[str]:
        return [gap.partition_key for gap in self.partitions_with_gaps]

    @property
    def partitions_to_heal(self) -> list[str]:
        """What a backfill of these partitions would mend: gaps, and values left on deleted files."""
        return sorted(set(self.gap_partition_keys) | set(self.orphaned_values_by_partition))


def database_report(conn: psycopg.Connection, partition_width: int) -> VerificationReport:
    """Everything the database alone can tell: coverage, gaps by partition, malformed triples."""
    counts = reads.entity_counts_by_partition(conn, partition_width)
    coverage = counts.coverage
    state = progress_rows.read_progress(conn)
    report = VerificationReport()
    for key in partition_keys(partition_width):
        part = coverage.get(key)
        if part is None:
            continue
        report.total_files += part.files
        report.with_hash += part.with_hash
        report.with_last_modified += part.with_last_modified
        report.with_both += part.with_both
        report.with_neither += part.files - part.with_hash - part.with_last_modified + part.with_both
        missing = min(progress_rows.known_missing(state, key), part.lacking_hash)
        invalid = min(progress_rows.known_invalid(state, key), part.lacking_hash - missing)
        report.known_missing += missing
        report.known_invalid += invalid
        gap = progress_rows.unexplained_gap(part, state, key)
        report.remaining += gap
        if gap:
            report.partitions_with_gaps.append(
                PartitionGap(key, part.files, part.with_hash, part.lacking_hash, missing, invalid, gap)
            )
    report.only_one = report.with_hash + report.with_last_modified - 2 * report.with_both
    report.orphaned_values_by_partition = counts.orphaned_values
    report.orphaned_values = sum(report.orphaned_values_by_partition.values())
    report.malformed = reads.malformed_new_triples(conn)
    report.app_query_plans = reads.app_query_plans(conn)
    return report


def verify(conn: psycopg.Connection, store: ObjectStore, partition_width: int, sample_size: int) -> VerificationReport:
    report = database_report(conn, partition_width)
    if sample_size <= 0 or report.with_both == 0:
        return report
    store.check_bucket()
    sample = reads.sample_populated_files(conn, sample_size, report.with_both)
    keyed = []
    for populated in sample:
        try:
            keyed.append((populated, object_key(populated.file.app_id, populated.file.location_value)))
        except InvalidLocationId:
            report.sample_unreadable += 1  # a populated file whose location is invalid: counted, not HEADed
    report.sample_size = len(sample)
    for (populated, key), outcome in zip(keyed, store.head_many([key for _, key in keyed]), strict=True):
        if outcome.missing:
            report.sample_missing_now += 1
            report.sample_stale += 1
            _note(report, populated, key, "an object", "404")
        elif outcome.metadata is None:
            report.sample_unreadable += 1
        else:
            if (populated.hash, populated.last_modified) != (outcome.metadata.hash, outcome.metadata.last_modified_ms):
                report.sample_stale += 1
            if populated.hash != outcome.metadata.hash:
                report.sample_hash_mismatches += 1
                _note(report, populated, key, f"hash {populated.hash!r}", f"ETag {outcome.metadata.hash!r}")
            if populated.last_modified != outcome.metadata.last_modified_ms:
                report.sample_last_modified_mismatches += 1
                _note(
                    report,
                    populated,
                    key,
                    f"lastModified {populated.last_modified!r}",
                    f"Last-Modified {outcome.metadata.last_modified_ms}",
                )
    return report


def _note(report: VerificationReport, populated: reads.PopulatedFile, key: str, stored: str, actual: str) -> None:
    if len(report.mismatches) < MISMATCH_EXAMPLES:
        report.mismatches.append(
            SampleMismatch(str(populated.file.app_id), str(populated.file.entity_id), key, stored, actual)
        )
