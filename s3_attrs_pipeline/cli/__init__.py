"""`s3-attrs`: the operator's command line (commands.py), what it shows of a run (display.py), and the
Dagster runs it makes in its own process (dagster_runs.py)."""

from s3_attrs_pipeline.cli.commands import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    REFRESH_SUMMARY_COUNTS,
    SUMMARY_COUNTS,
    main,
)

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_USAGE", "REFRESH_SUMMARY_COUNTS", "SUMMARY_COUNTS", "main"]
