"""The checks that judge `files_s3_attrs` as a whole: complete, consistent with S3, well formed, and
serving the queries it exists for.

One verification (`verification.verify`) feeds the three, each carrying the figures it judged by
under the verification report's own field names. They run by themselves once a backfill of the
asset has ended, whether or not every partition succeeded (see VERIFY_AFTER_BACKFILL: the sensor in
sensors.py evaluates it), and from the daily schedule in schedules.py.
"""

import dataclasses
from collections.abc import Iterator

import dagster as dg
from pydantic import Field

from s3_attrs_pipeline import alerts, deployment, environment
from s3_attrs_pipeline.defs.assets import FILES_S3_ATTRS
from s3_attrs_pipeline.defs.metadata import numbers, table
from s3_attrs_pipeline.defs.resources import FileBucketResource, InstantDatabaseResource
from s3_attrs_pipeline.instant.reads import QueryPlan
from s3_attrs_pipeline.verification import PartitionGap, SampleMismatch, VerificationReport, verify

# Once any partition was materialized since the checks were last requested, and no partition is in a
# run or a backfill in progress: after every backfill, one verification, also when some partitions
# failed. A request is known one tick late (`newly_requested`), so partitions materialized in that
# tick may postdate what the requested run reads: then the request does not count as handling them.
# (`since_last_handled()` would also count the checks' own run ending, and let such partitions go.)
_REQUESTED_AND_NOTHING_SINCE = (
    (dg.AutomationCondition.newly_requested() & ~dg.AutomationCondition.any_deps_updated())
    | dg.AutomationCondition.initial_evaluation()
).with_label("checks requested, nothing materialized since")
VERIFY_AFTER_BACKFILL = (
    dg.AutomationCondition.any_deps_updated().since(_REQUESTED_AND_NOTHING_SINCE)
    & ~dg.AutomationCondition.any_deps_in_progress()
).with_label("materialized since the checks were requested, and nothing in progress")


class VerificationConfig(dg.Config):
    sample_size: int = Field(100, description="Populated files re-HEADed in S3 to compare stored and actual values.")


def _spec(name: str, description: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        name, asset=FILES_S3_ATTRS, description=description, automation_condition=VERIFY_AFTER_BACKFILL
    )


CHECK_SPECS = [
    _spec(
        "completeness",
        "Every file has hash and lastModified, except those whose object is known to be missing or whose data is "
        "known to be invalid.",
    ),
    _spec(
        "consistency",
        "A random sample of populated files has the ETag and Last-Modified S3 reports now, and no hash or "
        "lastModified is left on a file deleted while they were written (orphaned_values).",
    ),
    _spec(
        "well_formed",
        "hash is a non-empty string, lastModified a positive integer of ms, both or neither per file, and every "
        "triple is encoded as InstantDB writes it.",
    ),
    _spec(
        "app_queries_use_indexes",
        "For one app, the queries hash and lastModified exist for (files by hash, files newest first, files "
        "modified after a time) are answered from an index of triples, on this database's schema.",
    ),
]


def _check_results(report: VerificationReport) -> list[dg.AssetCheckResult]:
    malformed = dataclasses.asdict(report.malformed)
    gaps = {"gaps_by_partition": table(PartitionGap, report.partitions_with_gaps)}
    mismatches = {"mismatches": table(SampleMismatch, report.mismatches)} if report.mismatches else {}
    return [
        dg.AssetCheckResult(
            asset_key=FILES_S3_ATTRS,
            check_name="completeness",
            passed=report.complete,
            metadata=numbers(
                total_files=report.total_files,
                with_hash=report.with_hash,
                with_last_modified=report.with_last_modified,
                with_both=report.with_both,
                with_neither=report.with_neither,
                known_missing=report.known_missing,
                known_invalid=report.known_invalid,
                remaining=report.remaining,
                partitions_with_gaps=len(report.partitions_with_gaps),
            )
            | gaps,
        ),
        dg.AssetCheckResult(
            asset_key=FILES_S3_ATTRS,
            check_name="consistency",
            passed=report.consistent,
            metadata=numbers(
                sample_size=report.sample_size,
                sample_hash_mismatches=report.sample_hash_mismatches,
                sample_last_modified_mismatches=report.sample_last_modified_mismatches,
                sample_missing_now=report.sample_missing_now,
                sample_unreadable=report.sample_unreadable,
                sample_stale=report.sample_stale,
                orphaned_values=report.orphaned_values,
            )
            | mismatches,
        ),
        dg.AssetCheckResult(
            asset_key=FILES_S3_ATTRS,
            check_name="well_formed",
            passed=report.well_formed,
            metadata=numbers(only_one=report.only_one, **{f"malformed_{name}": n for name, n in malformed.items()}),
        ),
        dg.AssetCheckResult(
            asset_key=FILES_S3_ATTRS,
            check_name="app_queries_use_indexes",
            passed=report.app_queries_use_indexes,
            metadata={
                **{
                    plan.query: dg.MetadataValue.text(plan.index or "no index: scans triples")
                    for plan in report.app_query_plans
                },
                "plans": table(QueryPlan, report.app_query_plans),
            },
        ),
    ]


@dg.multi_asset_check(
    specs=CHECK_SPECS,
    name="verify_files_s3_attrs",
    # Dagster plans an asset's checks into every run of it, the runs of a backfill included
    # (whatever their automation condition); those runs skip them (see below), which needs optional outputs.
    can_subset=True,
    description="Coverage from the database (overall and by partition), malformed triples, and a random sample of "
    "populated files re-HEADed in S3.",
)
def verify_files_s3_attrs(
    context: dg.AssetCheckExecutionContext,
    config: VerificationConfig,
    instant_db: InstantDatabaseResource,
    file_bucket: FileBucketResource,
) -> Iterator[dg.AssetCheckResult]:
    run = context.op_execution_context
    if run.has_partition_key or run.has_partition_key_range:
        # One partition's run cannot judge the whole asset, and a verification per partition would
        # scan every file's triples 256 times a backfill: the checks run once it has ended.
        context.log.info("the checks of files_s3_attrs run once the backfill has ended, not in a run of partitions")
        return
    with instant_db.connect() as conn, file_bucket.open_store() as store:
        width = deployment.current(environment.read()).partition_width
        report = verify(conn, store, width, config.sample_size)
    context.log.info(
        f"{report.with_both} of {report.total_files} files populated, {report.known_missing} known missing in S3, "
        f"{report.remaining} remaining in {len(report.partitions_with_gaps)} partitions; sample of "
        f"{report.sample_size}: {report.sample_hash_mismatches} hash and {report.sample_last_modified_mismatches} "
        f"lastModified mismatches, {report.sample_missing_now} missing now"
    )
    results = _check_results(report)
    yield from results
    # After the results are stored: a webhook that refuses the alert fails the step, and the checks stand.
    webhook = alerts.webhook_url(environment.read())
    failed = [result.check_name for result in results if not result.passed]
    if webhook and failed:
        alerts.post(
            webhook,
            f"s3-attrs: checks of files_s3_attrs failed: {', '.join(failed)} (run {run.run_id}); "
            f"{report.remaining} files remaining in {len(report.partitions_with_gaps)} partitions, "
            f"{report.sample_hash_mismatches + report.sample_last_modified_mismatches} sample mismatches, "
            f"{report.orphaned_values} orphaned values",
        )


CHECK_KEYS = [spec.key for spec in CHECK_SPECS]
