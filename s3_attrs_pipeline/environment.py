"""The process's environment, read in this one place, when a command or a run starts: never when a
module is imported, so what a test or an operator sets before starting one is what it sees. Settings
name their own variables (settings.py); these are the ones that are not settings of a run."""

import os
from collections.abc import Mapping

DATABASE_URL = "INSTANT_DATABASE_URL"  # the InstantDB database (its resource reads it through dg.EnvVar)
BUCKET = "INSTANT_S3_BUCKET"  # the bucket of InstantDB's files (likewise)
DAGSTER_HOME = "DAGSTER_HOME"  # the Dagster instance the CLI records its runs in
DEMO_DIR = "S3_ATTRS_DEMO_DIR"  # where `s3-attrs demo` keeps its services (default .demo)


def read() -> Mapping[str, str]:
    """The environment as it is now."""
    return dict(os.environ)


def update(values: Mapping[str, str]) -> None:
    """Set variables for what this process starts next (the demo points its commands at its services)."""
    os.environ.update(values)
