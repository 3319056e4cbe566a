import dagster as dg
from pydantic import Field

from s3_attrs_pipeline.defs.assets import files_s3_attrs
from s3_attrs_pipeline.defs.metadata import numbers, table
from s3_attrs_pipeline.defs.partitions import PARTITION_WIDTH
from s3_attrs_pipeline.defs.resources import FileBucketResource, InstantDatabaseResource
from s3_attrs_pipeline.verification import PartitionGap, SampleMismatch, VerificationReport, verify

VERIFICATION_ASSET = "s3_attrs_verification"


class VerificationConfig(dg.Config):
    sample_size: int = Field(100, description="Populated files re-HEADed in S3 to compare stored and actual values.")


def _metadata(report: VerificationReport) -> dict[str, dg.MetadataValue]:
    metadata = numbers(
        total_files=report.total_files,
        with_hash=report.with_hash,
        with_last_modified=report.with_last_modified,
        with_both=report.with_both,
        with_neither=report.with_neither,
        with_only_one=report.only_one,
        known_missing_in_s3=report.known_missing,
        known_invalid=report.known_invalid,
        remaining=report.remaining,
        partitions_with_gaps=len(report.partitions_with_gaps),
        sample_size=report.sample_size,
        sample_hash_mismatches=report.sample_hash_mismatches,
        sample_last_modified_mismatches=report.sample_last_modified_mismatches,
        sample_missing_now=report.sample_missing_now,
        sample_unreadable=report.sample_unreadable,
        malformed_hash_values=report.malformed.hash_values,
        malformed_last_modified_values=report.malformed.last_modified_values,
        malformed_encodings=report.malformed.encodings,
    )
    metadata["gaps_by_partition"] = table(PartitionGap, report.partitions_with_gaps)
    if report.mismatches:
        metadata["sample_mismatches"] = table(SampleMismatch, report.mismatches)
    return metadata


def _check_results(report: VerificationReport) -> list[dg.AssetCheckResult]:
    return [
        dg.AssetCheckResult(
            check_name="completeness",
            passed=report.complete,
            metadata={
                **numbers(remaining=report.remaining, known_missing_in_s3=report.known_missing),
                "partitions_with_gaps": dg.MetadataValue.text(" ".join(report.gap_partition_keys) or "none"),
            },
        ),
        dg.AssetCheckResult(
            check_name="consistency",
            passed=report.consistent,
            metadata=numbers(
                sample_size=report.sample_size,
                hash_mismatches=report.sample_hash_mismatches,
                last_modified_mismatches=report.sample_last_modified_mismatches,
                missing_now=report.sample_missing_now,
            ),
        ),
        dg.AssetCheckResult(
            check_name="well_formed",
            passed=report.well_formed,
            metadata=numbers(
                with_only_one=report.only_one,
                malformed_hash_values=report.malformed.hash_values,
                malformed_last_modified_values=report.malformed.last_modified_values,
                malformed_encodings=report.malformed.encodings,
            ),
        ),
    ]


@dg.asset(
    name=VERIFICATION_ASSET,
    deps=[files_s3_attrs],
    group_name="instant_files",
    kinds={"postgres", "s3"},
    check_specs=[
        dg.AssetCheckSpec(
            "completeness", asset=VERIFICATION_ASSET,
            description="Every file has hash and lastModified, except those whose object is known to be missing.",
        ),
        dg.AssetCheckSpec(
            "consistency", asset=VERIFICATION_ASSET,
            description="A random sample of populated files has the ETag and Last-Modified S3 reports now.",
        ),
        dg.AssetCheckSpec(
            "well_formed", asset=VERIFICATION_ASSET,
            description="hash is a non-empty string, lastModified a positive integer of ms, both or neither per "
            "file, and every triple is encoded as InstantDB writes it.",
        ),
    ],
    description="Proof that files_s3_attrs is complete and right: coverage from the database (overall and by "
    "partition), malformed triples, and a random sample of populated files re-HEADed in S3.",
)
def s3_attrs_verification(
    context: dg.AssetExecutionContext,
    config: VerificationConfig,
    instant_db: InstantDatabaseResource,
    file_bucket: FileBucketResource,
) -> dg.MaterializeResult:
    with instant_db.connect() as conn, file_bucket.open_store() as store:
        report = verify(conn, store, PARTITION_WIDTH, config.sample_size)
    context.log.info(
        f"{report.with_both} of {report.total_files} files populated, {report.known_missing} known missing in S3, "
        f"{report.remaining} remaining in {len(report.partitions_with_gaps)} partitions; sample of "
        f"{report.sample_size}: {report.sample_hash_mismatches} hash and {report.sample_last_modified_mismatches} "
        f"lastModified mismatches, {report.sample_missing_now} missing now"
    )
    return dg.MaterializeResult(metadata=_metadata(report), check_results=_check_results(report))
