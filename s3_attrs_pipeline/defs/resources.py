"""Resources for the InstantDB database and the file bucket, configured from the environment."""

import contextlib
import re
from collections.abc import Iterator

import dagster as dg
import psycopg
from pydantic import Field

from s3_attrs_pipeline.instant import database as db
from s3_attrs_pipeline.s3.object_metadata import ObjectStore, S3Settings

_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")


def validate_bucket_name(bucket: str | None) -> str:
    if not bucket:
        raise ValueError("INSTANT_S3_BUCKET is not set: give the name of the bucket holding InstantDB's files")
    if not _BUCKET_NAME.fullmatch(bucket):
        raise ValueError(f"INSTANT_S3_BUCKET={bucket!r} is not a valid S3 bucket name")
    return bucket


class InstantDatabaseResource(dg.ConfigurableResource):
    """The InstantDB Postgres database the triples are written to."""

    url: str = Field(description="libpq URL of the InstantDB database (INSTANT_DATABASE_URL).")
    statement_timeout_ms: int = Field(30_000, description="No pipeline statement may run longer than this.")
    lock_timeout_ms: int = Field(5_000, description="No pipeline statement may wait for a lock longer than this.")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Values from dg.EnvVar are only known now: check them before any work starts.
        db.validate_database_url(self.url)

    @contextlib.contextmanager
    def connect(self) -> Iterator[psycopg.Connection]:
        limits = db.SessionLimits(statement_timeout_ms=self.statement_timeout_ms, lock_timeout_ms=self.lock_timeout_ms)
        with db.connect(self.url, limits) as conn:
            yield conn


class FileBucketResource(dg.ConfigurableResource):
    """The S3 bucket holding InstantDB's file objects. Credentials come from the standard AWS chain."""

    bucket: str = Field(description="Name of the bucket (INSTANT_S3_BUCKET).")
    endpoint_url: str | None = Field(
        None, description="S3 endpoint for S3-compatible stores; unset means AWS (or AWS_ENDPOINT_URL)."
    )
    region_name: str | None = Field(None, description="AWS region; unset means the AWS chain's default.")
    max_in_flight: int = Field(32, description="S3 requests in flight at once, per partition run.")
    max_retries: int = Field(3, description="Retries of a throttled, 5xx or network-failed request.")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        validate_bucket_name(self.bucket)
        if self.endpoint_url and not re.match(r"https?://[^/\s]+", self.endpoint_url):
            raise ValueError(f"S3 endpoint URL {self.endpoint_url!r} is not an http(s):// URL")
        if self.max_in_flight < 1 or self.max_retries < 0:
            raise ValueError("max_in_flight must be at least 1 and max_retries at least 0")

    @contextlib.contextmanager
    def open_store(self) -> Iterator[ObjectStore]:
        settings = S3Settings(
            bucket=self.bucket,
            endpoint_url=self.endpoint_url,
            region_name=self.region_name,
            max_in_flight=self.max_in_flight,
            max_retries=self.max_retries,
        )
        with ObjectStore(settings) as store:
            yield store


def resources_from_env() -> dict:
    """AWS_ENDPOINT_URL, region and credentials are read by boto3 itself, like any AWS client."""
    return {
        "instant_db": InstantDatabaseResource(url=dg.EnvVar("INSTANT_DATABASE_URL")),
        "file_bucket": FileBucketResource(bucket=dg.EnvVar("INSTANT_S3_BUCKET")),
    }
