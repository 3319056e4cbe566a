"""How this code location defines its assets, for a deployment: how wide a partition is, how many
partitions a backfill's run holds, and how often Dagster retries a failed step. Environment only,
read when the definitions are loaded (by the UI's code server, a run's process, or a command), since
they shape the definitions themselves."""

import dataclasses
from collections.abc import Mapping

from s3_attrs_pipeline.instant.app_id_ranges import MAX_PARTITION_WIDTH, partition_keys
from s3_attrs_pipeline.settings import resolve, setting


@dataclasses.dataclass(frozen=True)
class DeploymentSettings:
    partition_width: int = setting(
        2,
        help="Hex digits of the app id per partition: 1 gives 16 partitions, 2 gives 256, 3 gives 4096. Choose it "
        "before the first backfill: partition keys name Dagster's partitions and the progress rows.",
        env="S3_ATTRS_PARTITION_WIDTH",
        config=None,
    )
    partitions_per_run: int = setting(
        0,
        help="Partitions per run of a backfill launched from the UI: 0 makes the "
        "whole backfill one run, in one process (pod); N makes it ceil(partitions / N) runs that the run queue "
        "launches as its limits allow, each a process (a pod on Kubernetes, a task on ECS). Each run costs a "
        "process start and a code-location load (about 1 s here), its own plan and database connections.",
        env="S3_ATTRS_PARTITIONS_PER_RUN",
        config=None,
    )
    step_retries: int = setting(
        2,
        help="How often Dagster retries a run's failed step by itself (30 s, then 60 s, with jitter), after a "
        "database restart or a throttling storm outlasting the per-request retries. Not after an unreadable "
        "bucket, refused credentials or a wrong catalog, which no retry mends; 0 never retries.",
        env="S3_ATTRS_STEP_RETRIES",
        config=None,
    )

    def __post_init__(self):
        if not 1 <= self.partition_width <= MAX_PARTITION_WIDTH:
            raise ValueError(
                f"S3_ATTRS_PARTITION_WIDTH={self.partition_width}: the partition width must be 1 to "
                f"{MAX_PARTITION_WIDTH} hex digits"
            )
        if self.partitions_per_run < 0:
            raise ValueError(
                f"S3_ATTRS_PARTITIONS_PER_RUN={self.partitions_per_run} must be 0 (one run) or a number of partitions"
            )
        if self.step_retries < 0:
            raise ValueError(f"S3_ATTRS_STEP_RETRIES={self.step_retries} must be 0 (never retry) or more")

    @property
    def partition_keys(self) -> list[str]:
        return partition_keys(self.partition_width)


def current(environ: Mapping[str, str]) -> DeploymentSettings:
    """The deployment's settings in `environ` (environment.read())."""
    return resolve(DeploymentSettings, {}, environ)
