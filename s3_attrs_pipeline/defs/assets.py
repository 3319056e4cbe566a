"""The two partitioned assets: `files_s3_attrs`, the backfill of `hash` and `lastModified`, and
`files_s3_attrs_refresh`, which keeps them true. A partition is the apps whose id starts with its key.

They are made when the definitions load, from the deployment's settings (deployment.py): how wide a
partition is and how often a failed step is retried shape the definitions themselves.
"""

import warnings

import dagster as dg

from s3_attrs_pipeline import deployment, environment
from s3_attrs_pipeline.defs.config import RunConfig
from s3_attrs_pipeline.defs.partitions import app_id_prefix_partitions
from s3_attrs_pipeline.defs.range_materialization import materialize_partitions
from s3_attrs_pipeline.defs.resources import FileBucketResource, InstantDatabaseResource
from s3_attrs_pipeline.runs.range_run import Listener
from s3_attrs_pipeline.tasks.backfill import BACKFILL
from s3_attrs_pipeline.tasks.refresh import REFRESH

FILES_S3_ATTRS = dg.AssetKey("files_s3_attrs")
FILES_S3_ATTRS_REFRESH = dg.AssetKey("files_s3_attrs_refresh")
POOL = "instant_s3_attrs"  # dagster.yaml's limit on the runs of both assets in progress at once


def _step_retry_policy(retries: int) -> dg.RetryPolicy | None:
    # A run's step is retried in the same run after whole-step failures (database restarts, a throttling
    # storm outlasting the per-request retries); an unreadable bucket or a wrong catalog is not (the
    # step's failure says allow_retries=False).
    if retries <= 0:
        return None
    return dg.RetryPolicy(max_retries=retries, delay=30, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


def partitioned_assets(settings: deployment.DeploymentSettings) -> tuple[dg.AssetsDefinition, dg.AssetsDefinition]:
    """`files_s3_attrs` and `files_s3_attrs_refresh`, partitioned and retried as `settings` say."""
    # The backfill policy is what makes a UI backfill one run, or a few; Dagster marks the parameter beta.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=dg.BetaWarning, message="Parameter `backfill_policy`")
        return _partitioned_assets(settings)


def _partitioned_assets(settings: deployment.DeploymentSettings) -> tuple[dg.AssetsDefinition, dg.AssetsDefinition]:
    shape = {
        "partitions_def": app_id_prefix_partitions(settings.partition_width),
        # A backfill of many partitions is one run, or runs of `partitions_per_run` each: a run's plan
        # skips its partitions with nothing to do, and each partition is still materialized, or failed,
        # on its own; the partitions' locks keep two runs off one partition.
        "backfill_policy": (
            dg.BackfillPolicy.multi_run(settings.partitions_per_run)
            if settings.partitions_per_run
            else dg.BackfillPolicy.single_run()
        ),
        "output_required": False,
        "group_name": "instant_files",
        "kinds": {"postgres", "s3"},
        "pool": POOL,
        "retry_policy": _step_retry_policy(settings.step_retries),
    }

    @dg.asset(
        key=FILES_S3_ATTRS,
        description=(
            "`hash` (S3 ETag) and `lastModified` (epoch ms) triples of every InstantDB `$files` entity whose app id "
            "starts with the partition key. A run plans its partitions from one read of the database, then HEADs "
            "(or lists) the objects of the files that still lack them and writes both triples per file, batch by "
            "batch, several partitions at once; each partition is materialized as it ends. Missing objects are "
            "counted, not written; a partition whose files fail after retries fails alone and reruns alone."
        ),
        **shape,
    )
    def files_s3_attrs(
        context: dg.AssetExecutionContext,
        config: RunConfig,
        instant_db: InstantDatabaseResource,
        file_bucket: FileBucketResource,
        run_progress: dg.ResourceParam[Listener],
    ):
        yield from materialize_partitions(context, config, instant_db, file_bucket, run_progress, BACKFILL)

    @dg.asset(
        key=FILES_S3_ATTRS_REFRESH,
        deps=[FILES_S3_ATTRS],
        description=(
            "The refresh of files_s3_attrs: re-reads the S3 metadata of the partition's files that have `hash` "
            "(a listing for dense apps, HEADs for the others) and rewrites `hash` and `lastModified` where they no "
            "longer describe the object the file's current location-id names (a re-upload, an object rewritten). "
            "Unchanged files are not written; a file whose object is gone keeps its values and is counted missing."
        ),
        **shape,
    )
    def files_s3_attrs_refresh(
        context: dg.AssetExecutionContext,
        config: RunConfig,
        instant_db: InstantDatabaseResource,
        file_bucket: FileBucketResource,
        run_progress: dg.ResourceParam[Listener],
    ):
        yield from materialize_partitions(context, config, instant_db, file_bucket, run_progress, REFRESH)

    return files_s3_attrs, files_s3_attrs_refresh


@dg.definitions
def assets() -> dg.Definitions:
    return dg.Definitions(assets=list(partitioned_assets(deployment.current(environment.read()))))
