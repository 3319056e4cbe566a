"""`s3-attrs`: the operator's command line for the backfill."""

import argparse
import json
import os
import sys

import psycopg

from s3_attrs_pipeline.backfill import BackfillSettings
from s3_attrs_pipeline.counts import FileCounts, RefreshCounts
from s3_attrs_pipeline.instant import progress, writes
from s3_attrs_pipeline.instant.catalog import CatalogMismatch
from s3_attrs_pipeline.instant.connection import DatabaseUrlError, connect, validate_database_url
from s3_attrs_pipeline.instant.live_updates import (
    DEFAULT_LIVE_UPDATES,
    LIVE_UPDATES_ENV,
    LiveUpdates,
    live_updates_level,
)
from s3_attrs_pipeline.partition_range import RangeSettings
from s3_attrs_pipeline.s3.store import validate_bucket_name
from s3_attrs_pipeline.settings import setting_help

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # as a shell reports a command Ctrl-C ended
SUMMARY_COUNTS = (
    "processed", "successful", "missing", "failed", "invalid_location_id", "malformed_object_metadata",
    "already_populated", "s3_retries", "s3_throttled",
)
REFRESH_SUMMARY_COUNTS = ("checked", "unchanged", "refreshed", "missing", "failed", "s3_retries", "s3_throttled")


class SetupError(Exception):
    """The environment does not say where the database or bucket is."""


def _database_url() -> str:
    try:
        return validate_database_url(os.environ.get("INSTANT_DATABASE_URL"))
    except DatabaseUrlError as error:
        raise SetupError(str(error)) from None


def _check_bucket_env() -> None:
    try:
        validate_bucket_name(os.environ.get("INSTANT_S3_BUCKET"))
    except ValueError as error:
        raise SetupError(str(error)) from None


def _confirm(question: str, assume_yes: bool) -> bool:
    if assume_yes:
        return True
    if not sys.stdin.isatty():
        print(f"{question} Refusing without a terminal to ask on; pass --yes.", file=sys.stderr)
        return False
    return input(f"{question} Type 'yes' to go on: ").strip().lower() == "yes"


def print_stats(as_json: bool) -> None:
    with connect(_database_url()) as conn:
        stats = progress.migration_stats(conn)
    if as_json:
        print(json.dumps(stats))
        return
    for name in progress.STATS_ORDER:
        print(f"{name:>32}: {stats[name]}")


def cmd_stats(args: argparse.Namespace) -> int:
    print_stats(args.json)
    return 0


def _partition_keys(args: argparse.Namespace) -> list[str]:
    """--partition's keys, checked, or every key: a run's plan finds those with work itself."""
    from s3_attrs_pipeline import runs
    from s3_attrs_pipeline.defs.partitions import PARTITION_WIDTH

    every_key = runs.all_partition_keys()
    unknown = sorted(set(args.partition or []) - set(every_key))
    if unknown:
        raise SetupError(f"unknown partition keys {', '.join(unknown)} (keys are {PARTITION_WIDTH} hex digits)")
    return args.partition or every_key


def _materialize(args: argparse.Namespace, asset_name: str, counts_type, summary: tuple) -> int:
    """Materialize `asset_name`'s partitions: one run per range of neighbouring keys asked for (one run
    for all of them by default), a progress display while they run, then the summary; the exit status."""
    from s3_attrs_pipeline import runs
    from s3_attrs_pipeline.defs.assets import BackfillConfig
    from s3_attrs_pipeline.progress_display import ProgressDisplay

    keys = _partition_keys(args)
    config = BackfillConfig(
        batch_size=args.batch_size,
        list_threshold=args.list_threshold,
        live_updates=args.live_updates,
        partitions_at_once=args.parallel,
        every_partition=args.all,
        max_failed_share=args.max_failed_share,
        failure_threshold_files=args.failure_threshold_files,
    )
    display = ProgressDisplay(
        sys.stdout, counts_type, summary, live=sys.stdout.isatty(), quiet=args.quiet, verbose=args.verbose
    )
    run_errors = []
    interrupted = False
    instance = runs.dagster_instance()
    ranges = runs.contiguous_ranges(keys)
    for number, partition_range in enumerate(ranges, 1):
        failed_before = len(display.failed)
        run = runs.materialize_range(
            instance,
            partition_range,
            config=config,
            asset_name=asset_name,
            listener=display,
            log_level="INFO" if args.verbose else "CRITICAL",
            tags={"s3-attrs/launched-by": "cli"},
        )
        if run.interrupted:
            interrupted = True
            run_errors.append(
                f"run {run.run_id} was interrupted: the partitions it was working stopped within a batch and are "
                "worked again by the next run" + (f"; {len(ranges) - number} runs not launched" if number < len(ranges) else "")
            )
            break
        if not run.success and len(display.failed) == failed_before:  # it failed before any partition did
            run_errors.append(f"run {run.run_id}: {run.error}")
        stopped = display.stopped_by()
        if stopped is not None and number < len(ranges):
            # Credentials, the bucket, the catalog or the failure threshold: the next run would meet it too.
            run_errors.append(f"stopped launching runs ({len(ranges) - number} not launched): {stopped}")
            break
    print(display.finish(run_errors, config.range_settings()))
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if display.failed or run_errors else 0


def _check_run_settings(args: argparse.Namespace) -> None:
    _database_url()
    _check_bucket_env()
    try:
        live_updates_level(args.live_updates)
    except ValueError as error:
        raise SetupError(str(error)) from None
    try:
        RangeSettings(
            partitions_at_once=args.parallel,
            max_failed_share=args.max_failed_share,
            failure_threshold_files=args.failure_threshold_files,
        )
    except ValueError as error:
        raise SetupError(str(error)) from None


def cmd_run(args: argparse.Namespace) -> int:
    _check_run_settings(args)
    return _materialize(args, "files_s3_attrs", FileCounts, SUMMARY_COUNTS)


def cmd_refresh(args: argparse.Namespace) -> int:
    _check_run_settings(args)
    return _materialize(args, "files_s3_attrs_refresh", RefreshCounts, REFRESH_SUMMARY_COUNTS)


def cmd_reset(args: argparse.Namespace) -> int:
    url = _database_url()
    rows = f"config rows {progress.PROGRESS_CONFIG_KEY!r} and {progress.PARTITION_PROGRESS_KEY_PREFIX}*"
    if not _confirm(f"Clear the progress state ({rows})?", args.yes):
        return EXIT_FAILED
    with connect(url) as conn:
        progress.reset_progress(conn)
    print("progress state cleared")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    url = _database_url()
    if not _confirm(
        "Delete every $files.hash and $files.lastModified triple in every app, and the progress state?", args.yes
    ):
        return EXIT_FAILED
    with connect(url) as conn:
        deleted = writes.delete_new_attr_triples(conn)
        progress.reset_progress(conn)
    print(f"deleted {deleted} hash and lastModified triples; progress state cleared")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from s3_attrs_pipeline.local import demo

    root = demo.demo_dir()
    if args.stop:
        demo.stop_services(root)
        return 0
    services = demo.start_services(root)
    print(f"services ready; `source {root / 'env'}` to use them from a shell")
    status = 0
    if services.reuploaded:
        print(
            "the S3 server started afresh and its objects were uploaded again, with new Last-Modified times: "
            "the refresh rewrites the values they changed"
        )
        status = main(["refresh"])
    if args.services_only or status != 0:
        return status
    status = main(["run"])
    main(["stats"])
    if status == 0:
        status = _verify()
    return status


def _verify() -> int:
    from s3_attrs_pipeline import runs

    passed = runs.verify(runs.dagster_instance())
    print("checks of files_s3_attrs: " + ", ".join(f"{name} {'passed' if ok else 'FAILED'}" for name, ok in passed.items()))
    return 0 if passed and all(passed.values()) else EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s3-attrs",
        description="Backfill InstantDB's $files hash and lastModified from S3. "
        "Reads INSTANT_DATABASE_URL, INSTANT_S3_BUCKET and the standard AWS variables.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    stats = commands.add_parser("stats", help="counts from the triples and totals from the progress row")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(handler=cmd_stats)

    for name, handler, text, all_help in (
        ("run", cmd_run, "backfill: one Dagster run over the partitions, working those with files to do",
         setting_help(RangeSettings, "every_partition")),
        ("refresh", cmd_refresh, "rewrite hash and lastModified where the file's object changed since (one run "
         "over the partitions, working those with values)", setting_help(RangeSettings, "every_partition")),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("--partition", action="append", metavar="KEY", help="a partition key, e.g. 3f; repeatable")
        for setting in ("batch_size", "list_threshold"):
            default = getattr(BackfillSettings, setting)
            command.add_argument(
                "--" + setting.replace("_", "-"), type=int, default=default,
                help=f"{setting_help(BackfillSettings, setting)} (default {default})",
            )
        command.add_argument(
            "--live-updates", choices=[level.value for level in LiveUpdates], default=None,
            help=f"{setting_help(BackfillSettings, 'live_updates')} (default: {LIVE_UPDATES_ENV}, else "
            f"{DEFAULT_LIVE_UPDATES})",
        )
        command.add_argument("--all", action="store_true", help=all_help)
        command.add_argument(
            "--parallel", type=int, default=RangeSettings.partitions_at_once,
            help=f"{setting_help(RangeSettings, 'partitions_at_once')} (default {RangeSettings.partitions_at_once})",
        )
        command.add_argument(
            "--max-failed-share", type=float, default=RangeSettings.max_failed_share,
            help=f"{setting_help(RangeSettings, 'max_failed_share')} (default {RangeSettings.max_failed_share})",
        )
        command.add_argument(
            "--failure-threshold-files", type=int, default=RangeSettings.failure_threshold_files,
            help=f"{setting_help(RangeSettings, 'failure_threshold_files')} "
            f"(default {RangeSettings.failure_threshold_files})",
        )
        output = command.add_mutually_exclusive_group()
        output.add_argument("--quiet", action="store_true", help="no progress display: failures and the summary")
        output.add_argument(
            "--verbose", action="store_true", help="also the run's log on stderr, with every problem file it names"
        )
        command.set_defaults(handler=handler)

    for name, handler, text in (
        ("reset", cmd_reset, "clear the progress state in the config row"),
        ("rollback", cmd_rollback, "delete every hash and lastModified triple and clear the progress state"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        command.set_defaults(handler=handler)

    demo = commands.add_parser("demo", help="embedded PostgreSQL + local S3, seeded, backfilled, stats printed")
    demo.add_argument("--services-only", action="store_true", help="start and seed the services, then return")
    demo.add_argument("--stop", action="store_true", help="stop the demo's background services")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:  # between runs, or before one began: nothing was being written
        print("s3-attrs: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SetupError as error:
        print(f"s3-attrs: {error}", file=sys.stderr)
        return EXIT_USAGE
    except psycopg.OperationalError as error:
        print(f"s3-attrs: cannot reach the InstantDB database: {_first_line(error)}", file=sys.stderr)
        return EXIT_FAILED
    except psycopg.errors.InsufficientPrivilege as error:
        print(
            f"s3-attrs: the database role lacks a privilege: {_first_line(error)} (see docs/postgres-grants.sql)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except CatalogMismatch as error:
        print(f"s3-attrs: {error}", file=sys.stderr)
        return EXIT_FAILED


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
