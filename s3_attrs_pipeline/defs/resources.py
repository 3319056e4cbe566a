"""Resources for the InstantDB database and the file bucket, configured from the environment and
checked before any work starts. Their defaults and descriptions are the core's settings'."""

import contextlib
import re
from collections.abc import Iterator

import dagster as dg
import psycopg
from pydantic import Field

from s3_attrs_pipeline.instant.connection import SessionLimits, connect, validate_database_url
from s3_attrs_pipeline.runs.range_run import NoListener
from s3_attrs_pipeline.s3.store import ObjectStore, S3Settings, validate_bucket_name
from s3_attrs_pipeline.settings import setting_help


class InstantDatabaseResource(dg.ConfigurableResource):
    """The InstantDB Postgres database the triples are written to."""

    url: str = Field(description="libpq URL of the InstantDB database (INSTANT_DATABASE_URL).")
    statement_timeout_ms: int = Field(
        SessionLimits.statement_timeout_ms, description=setting_help(SessionLimits, "statement_timeout_ms")
    )
    lock_timeout_ms: int = Field(
        SessionLimits.lock_timeout_ms, description=setting_help(SessionLimits, "lock_timeout_ms")
    )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Values from dg.EnvVar are only known now: check them before any work starts.
        validate_database_url(self.url)

    @contextlib.contextmanager
    def connect(self) -> Iterator[psycopg.Connection]:
        limits = SessionLimits(statement_timeout_ms=self.statement_timeout_ms, lock_timeout_ms=self.lock_timeout_ms)
        with connect(self.url, limits) as conn:
            yield conn


class FileBucketResource(dg.ConfigurableResource):
    """The S3 bucket holding InstantDB's file objects. Credentials come from the standard AWS chain."""

    bucket: str = Field(description=setting_help(S3Settings, "bucket"))
    endpoint_url: str | None = Field(S3Settings.endpoint_url, description=setting_help(S3Settings, "endpoint_url"))
    region_name: str | None = Field(S3Settings.region_name, description=setting_help(S3Settings, "region_name"))
    max_in_flight: int = Field(S3Settings.max_in_flight, description=setting_help(S3Settings, "max_in_flight"))
    max_retries: int = Field(S3Settings.max_retries, description=setting_help(S3Settings, "max_retries"))

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
    """AWS_ENDPOINT_URL, region and credentials are read by boto3 itself, like any AWS client. A run's
    progress is heard by nobody but its log, unless the CLI gives its display as `run_progress`."""
    return {
        "instant_db": InstantDatabaseResource(url=dg.EnvVar("INSTANT_DATABASE_URL")),
        "file_bucket": FileBucketResource(bucket=dg.EnvVar("INSTANT_S3_BUCKET")),
        "run_progress": dg.ResourceDefinition.hardcoded_resource(NoListener(), "Hears a run's progress: nobody."),
    }


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources=resources_from_env())
