"""`s3-attrs`: the operator's command line for the backfill. The options of `run` and `refresh` are
made from the settings' declarations (settings.py), as the runs' Dagster config is."""

import argparse
import concurrent.futures
import enum
import getpass
import json
import sys
import time
from collections.abc import Mapping

import psycopg

from s3_attrs_pipeline import deployment, environment
from s3_attrs_pipeline.counts import FileCounts, RefreshCounts
from s3_attrs_pipeline.instant import progress_rows, writes
from s3_attrs_pipeline.instant.catalog import CatalogMismatch
from s3_attrs_pipeline.instant.connection import DatabaseUrlError, connect, validate_database_url
from s3_attrs_pipeline.instant.replication import ReplicationLimits
from s3_attrs_pipeline.runs.range_run import RangeSettings
from s3_attrs_pipeline.s3.store import validate_bucket_name
from s3_attrs_pipeline.settings import Declared, declared, resolve
from s3_attrs_pipeline.tasks.task import PartitionTask, Plan, TaskSettings, first_line

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # as a shell reports a command Ctrl-C ended
SUMMARY_COUNTS = (
    "processed",
    "successful",
    "missing",
    "failed",
    "invalid_location_id",
    "malformed_object_metadata",
    "already_populated",
    "s3_retries",
    "s3_throttled",
)
REFRESH_SUMMARY_COUNTS = ("checked", "unchanged", "refreshed", "missing", "failed", "s3_retries", "s3_throttled")


class SetupError(Exception):
    """The environment does not say where the database or bucket is."""


FOLLOW_POLL_S = 2.0  # how often `backfill --wait` asks the webserver
FOLLOW_LINE_EVERY_S = 10.0  # at most, off a terminal

# A run's plan reads every file of its range (a second of the database's CPU at 1,000,000 files): the
# CLI's own plan, which finds whether a run is due at all, reads the two halves of the range at once.
PLAN_CONNECTIONS = 2

# The settings `run` and `refresh` take options for: those of a run's Dagster config.
RUN_SETTINGS = (TaskSettings, RangeSettings, ReplicationLimits)


def _database_url(environ: Mapping[str, str]) -> str:
    try:
        return validate_database_url(environ.get(environment.DATABASE_URL))
    except DatabaseUrlError as error:
        raise SetupError(str(error)) from None


def _check_bucket_env(environ: Mapping[str, str]) -> None:
    try:
        validate_bucket_name(environ.get(environment.BUCKET))
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
    with connect(_database_url(environment.read())) as conn:
        stats = progress_rows.migration_stats(conn)
    if as_json:
        print(json.dumps(stats))
        return
    for name in progress_rows.STATS_ORDER:
        print(f"{name:>32}: {stats[name]}")


def cmd_stats(args: argparse.Namespace) -> int:
    print_stats(args.json)
    return 0


def _partition_keys(args: argparse.Namespace, environ: Mapping[str, str]) -> list[str]:
    """--partition's keys, checked, or every key: a run's plan finds those with work itself."""
    try:
        shape = deployment.current(environ)
    except ValueError as error:
        raise SetupError(str(error)) from None
    unknown = sorted(set(args.partition or []) - set(shape.partition_keys))
    if unknown:
        raise SetupError(f"unknown partition keys {', '.join(unknown)} (keys are {shape.partition_width} hex digits)")
    return args.partition or shape.partition_keys


def _given(args: argparse.Namespace) -> dict:
    """The run settings given as options, by their config names; SetupError naming an option whose value
    is not one."""
    given = {}
    for settings_class in RUN_SETTINGS:
        for setting in declared(settings_class):
            value = getattr(args, setting.name, None) if setting.cli else None
            if value is None:
                continue
            try:
                given[setting.given_as] = setting.coerce(value, setting.cli)
            except ValueError as error:
                raise SetupError(str(error)) from None
    return given


def _materialize(args: argparse.Namespace, asset_name: str, task: PartitionTask, counts_type, summary: tuple) -> int:
    """Materialize `asset_name`'s partitions: one run per range of neighbouring keys asked for (one run
    for all of them by default; none when each shows materialized and none has work), a progress
    display while they run, then the summary; the exit status."""
    environ = environment.read()
    keys = _partition_keys(args, environ)
    # Planned while Dagster is imported and its instance opened (~1.5 s): both are needed to know
    # that no run is due. Only an instance of DAGSTER_HOME can show partitions materialized.
    with concurrent.futures.ThreadPoolExecutor(PLAN_CONNECTIONS) as pool:
        planning = None
        if not args.every_partition and environ.get(environment.DAGSTER_HOME):
            halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
            planning = [pool.submit(_plan, environ, task, half) for half in halves if half]
        return _run_ranges(args, environ, keys, asset_name, planning, counts_type, summary)


def _plan(environ: Mapping[str, str], task: PartitionTask, keys: list[str]) -> Plan:
    with connect(_database_url(environ)) as conn:
        return task.plan(conn, keys)


def _run_ranges(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    keys: list[str],
    asset_name: str,
    planning: list[concurrent.futures.Future] | None,
    counts_type,
    summary: tuple,
) -> int:
    from s3_attrs_pipeline.cli import dagster_runs
    from s3_attrs_pipeline.cli.display import ProgressDisplay
    from s3_attrs_pipeline.defs.config import RunConfig

    config = RunConfig(
        **{name: value.value if isinstance(value, enum.Enum) else value for name, value in _given(args).items()}
    )
    try:
        _, range_settings = config.settings(environ, len(keys))
    except ValueError as error:
        raise SetupError(str(error)) from None
    display = ProgressDisplay(
        sys.stdout, counts_type, summary, live=sys.stdout.isatty(), quiet=args.quiet, verbose=args.verbose
    )
    run_errors = []
    interrupted = False
    instance = dagster_runs.dagster_instance(environ)
    plan = None
    if planning is not None:
        halves = [half.result() for half in planning]
        plan = Plan.of(keys, [key for half in halves for key in half.with_work], sum(h.files_to_do for h in halves))
    if (
        plan is not None
        and not plan.with_work
        and not range_settings.every_partition
        and dagster_runs.shown_materialized(instance, keys, environ, asset_name=asset_name)
    ):
        # A run would only materialize each partition again, at ~25 ms of Dagster each.
        display.planned(plan)
        print(display.finish([], range_settings))
        print(f"no run launched: no partition has work, and each shows {asset_name} materialized in Dagster")
        return 0
    ranges = dagster_runs.contiguous_ranges(keys)
    for number, partition_range in enumerate(ranges, 1):
        failed_before = len(display.failed)
        run = dagster_runs.materialize_range(
            instance,
            partition_range,
            environ,
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
                "worked again by the next run"
                + (f"; {len(ranges) - number} runs not launched" if number < len(ranges) else "")
            )
            break
        if not run.success and len(display.failed) == failed_before:  # it failed before any partition did
            run_errors.append(f"run {run.run_id}: {run.error}")
        stopped = display.stopped_by()
        if stopped is not None and number < len(ranges):
            # Credentials, the bucket, the catalog or the failure threshold: the next run would meet it too.
            run_errors.append(f"stopped launching runs ({len(ranges) - number} not launched): {stopped}")
            break
    print(display.finish(run_errors, range_settings))
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if display.failed or run_errors else 0


def _check_run_settings(args: argparse.Namespace) -> None:
    """Before any run: the database and the bucket named (the settings are checked as the runs are made)."""
    environ = environment.read()
    _database_url(environ)
    _check_bucket_env(environ)


def cmd_run(args: argparse.Namespace) -> int:
    _check_run_settings(args)
    from s3_attrs_pipeline.tasks.backfill import BACKFILL

    return _materialize(args, "files_s3_attrs", BACKFILL, FileCounts, SUMMARY_COUNTS)


def cmd_refresh(args: argparse.Namespace) -> int:
    _check_run_settings(args)
    from s3_attrs_pipeline.tasks.refresh import REFRESH

    return _materialize(args, "files_s3_attrs_refresh", REFRESH, RefreshCounts, REFRESH_SUMMARY_COUNTS)


def cmd_backfill(args: argparse.Namespace) -> int:
    """Launch the daemon backfill the UI launches; with --wait, follow it to its end."""
    from s3_attrs_pipeline.cli import daemon_backfill

    environ = environment.read()
    keys = _partition_keys(args, environ)
    given = {s.given_as: getattr(args, s.name) for s in declared(daemon_backfill.BackfillSettings)}
    try:
        webserver = resolve(daemon_backfill.BackfillSettings, given, environ).webserver_url
    except ValueError as error:
        raise SetupError(str(error)) from None
    asset_name = "files_s3_attrs_refresh" if args.refresh else "files_s3_attrs"
    try:
        backfill_id = daemon_backfill.launch(webserver, asset_name, keys, {"s3-attrs/launched-by": "cli"})
        print(
            f"backfill {backfill_id} of {asset_name} ({len(keys)} partitions) launched: "
            f"{daemon_backfill.backfill_page(webserver, backfill_id)}",
            flush=True,
        )
        if not args.wait:
            return 0
        return _follow(webserver, backfill_id, asset_name, keys, environ)
    except daemon_backfill.WebserverError as error:
        print(f"s3-attrs: {error}", file=sys.stderr)
        return EXIT_FAILED


def _files_processed(environ: Mapping[str, str], keys: list[str]) -> int | None:
    """Files the partitions' rows count processed over every run; None without the database's URL."""
    if not environ.get(environment.DATABASE_URL):
        return None
    with connect(_database_url(environ)) as conn:
        return progress_rows.processed_files(conn, keys)


def _follow(webserver: str, backfill_id: str, asset_name: str, keys: list[str], environ: Mapping[str, str]) -> int:
    """Poll the backfill until it ends: a status line (redrawn on a terminal, else when it changes, at
    most every FOLLOW_LINE_EVERY_S), then how it ended; the exit status."""
    from s3_attrs_pipeline.cli import daemon_backfill

    # The refresh keeps no partition rows: its files show in its runs' logs only.
    files_before = _files_processed(environ, keys) if asset_name == "files_s3_attrs" else None
    live, started, shown, shown_at = sys.stdout.isatty(), time.monotonic(), "", 0.0
    try:
        while True:
            now = daemon_backfill.progress(webserver, backfill_id)
            files = None if files_before is None else _files_processed(environ, keys) - files_before
            line = (
                f"backfill {backfill_id} · {now.shown_status} · partitions {now.materialized}/{now.targeted} "
                f"materialized, {now.in_progress} in progress, {now.failed} failed"
                + ("" if files is None else f" · files {files:,}")
                + f" · {time.monotonic() - started:.0f}s"
            )
            if live:
                print("\r\033[K" + line, end="", flush=True)
            elif line.split(" · ")[:-1] != shown.split(" · ")[:-1] and (
                now.ended or time.monotonic() - shown_at >= FOLLOW_LINE_EVERY_S
            ):
                print(line, flush=True)
                shown, shown_at = line, time.monotonic()
            if now.ended:
                break
            time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        print(
            f"\nstopped following backfill {backfill_id}; it goes on: "
            f"{daemon_backfill.backfill_page(webserver, backfill_id)}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if live:
        print()
    failed = daemon_backfill.failed_partitions(webserver, asset_name, keys) if now.failed else []
    print(f"backfill {backfill_id} ended: {now.shown_status}, after {time.monotonic() - started:.0f}s")
    if failed:
        print(f"failed partitions (rerun with --partition; their runs' logs say why): {' '.join(failed)}")
    return 0 if now.succeeded else EXIT_FAILED


def _operator_name(args: argparse.Namespace) -> str:
    return args.by or getpass.getuser()


def _set_control(args: argparse.Namespace, **changes) -> int:
    """Write the operator's control row; print it and when runs obey it."""
    from s3_attrs_pipeline.instant import operator_control
    from s3_attrs_pipeline.tasks.operator_gate import CONTROL_POLL_S

    with connect(_database_url(environment.read())) as conn:
        try:
            control = operator_control.set_control(conn, set_by=_operator_name(args), reason=args.reason, **changes)
        except ValueError as error:
            raise SetupError(str(error)) from None
    obeyed = "hold within {}s (their requests on the wire are answered)" if control.paused else "follow within {}s"
    print(f"{control.describe()}\nrunning backfills and refreshes {obeyed.format(f'{CONTROL_POLL_S:g}')}")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    return _set_control(args, paused=True)


def cmd_resume(args: argparse.Namespace) -> int:
    return _set_control(args, paused=False)


def cmd_throttle(args: argparse.Namespace) -> int:
    from s3_attrs_pipeline.instant import operator_control

    if args.rps is None and args.parallel is None:
        raise SetupError("throttle needs --rps or --parallel (0 lifts a limit)")
    return _set_control(args, **operator_control.changes(max_rps=args.rps, partitions_at_once=args.parallel))


def cmd_control(args: argparse.Namespace) -> int:
    from s3_attrs_pipeline.instant import operator_control

    with connect(_database_url(environment.read())) as conn:
        control = operator_control.read_control(conn)
    print(json.dumps(control.as_row()) if args.json else control.describe())
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    url = _database_url(environment.read())
    rows = f"config rows {progress_rows.PROGRESS_CONFIG_KEY!r} and {progress_rows.PARTITION_PROGRESS_KEY_PREFIX}*"
    if not _confirm(f"Clear the progress state ({rows})?", args.yes):
        return EXIT_FAILED
    with connect(url) as conn:
        progress_rows.reset_progress(conn)
    print("progress state cleared")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    url = _database_url(environment.read())
    if not _confirm(
        "Delete every $files.hash and $files.lastModified triple in every app, and the progress state?", args.yes
    ):
        return EXIT_FAILED
    with connect(url) as conn:
        deleted = writes.delete_new_attr_triples(conn)
        progress_rows.reset_progress(conn)
    print(f"deleted {deleted} hash and lastModified triples; progress state cleared")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from s3_attrs_pipeline.local import demo

    root = demo.demo_dir(environment.read())
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
    from s3_attrs_pipeline.cli import dagster_runs

    environ = environment.read()
    passed = dagster_runs.verify(dagster_runs.dagster_instance(environ), environ)
    print(
        "checks of files_s3_attrs: "
        + ", ".join(f"{name} {'passed' if ok else 'FAILED'}" for name, ok in passed.items())
    )
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

    for name, handler, text in (
        ("run", cmd_run, "backfill: one Dagster run over the partitions, working those with files to do"),
        (
            "refresh",
            cmd_refresh,
            "rewrite hash and lastModified where the file's object changed since (one run "
            "over the partitions, working those with values)",
        ),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("--partition", action="append", metavar="KEY", help="a partition key, e.g. 3f; repeatable")
        for settings_class in RUN_SETTINGS:
            for setting in declared(settings_class):
                if setting.cli:
                    _add_option(command, setting)
        output = command.add_mutually_exclusive_group()
        output.add_argument("--quiet", action="store_true", help="no progress display: failures and the summary")
        output.add_argument(
            "--verbose", action="store_true", help="also the run's log on stderr, with every problem file it names"
        )
        command.set_defaults(handler=handler)

    backfill = commands.add_parser(
        "backfill",
        help="launch the backfill the UI launches (the daemon plans it; runs as dagster.yaml launches them), "
        "through the Dagster webserver; prints its id and page",
    )
    backfill.add_argument("--partition", action="append", metavar="KEY", help="a partition key, e.g. 3f; repeatable")
    backfill.add_argument("--refresh", action="store_true", help="backfill files_s3_attrs_refresh instead")
    backfill.add_argument("--wait", action="store_true", help="follow it to its end; exit 1 unless it succeeded")
    from s3_attrs_pipeline.cli.daemon_backfill import BackfillSettings

    for setting in declared(BackfillSettings):
        _add_option(backfill, setting)
    backfill.set_defaults(handler=cmd_backfill)

    for name, handler, text in (
        ("pause", cmd_pause, "hold every running backfill and refresh (no transaction, no S3 request) until resume"),
        ("resume", cmd_resume, "let paused backfills and refreshes go on"),
        ("throttle", cmd_throttle, "cap S3 requests per second and partitions at once of every running run"),
    ):
        command = commands.add_parser(name, help=text)
        if name == "throttle":
            command.add_argument(
                "--rps", type=_number(float), help="S3 requests per second per run at most; 0 lifts it"
            )
            command.add_argument(
                "--parallel",
                type=_number(int),
                help="partitions at once per run at most (as partitions end); 0 lifts it",
            )
        command.add_argument("--reason", help="why, shown in the runs' logs and by `s3-attrs control`")
        command.add_argument("--by", help="who (default: this user's login name)")
        command.set_defaults(handler=handler)
    control = commands.add_parser("control", help="show the pause and the limits every run obeys")
    control.add_argument("--json", action="store_true", help="print one JSON object")
    control.set_defaults(handler=cmd_control)

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


def _number(kind: type):
    """An option's value of `kind`, argparse naming the option when it is not one."""

    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def _add_option(command: argparse.ArgumentParser, setting: Declared) -> None:
    """The option of a declared setting: a flag for a yes/no one, else a value (checked when the run is
    made, naming the option when it is not one)."""
    if setting.type is bool:
        command.add_argument(
            setting.cli, dest=setting.name, action="store_const", const=True, default=None, help=setting.describe()
        )
        return
    choices = None
    if isinstance(setting.type, type) and issubclass(setting.type, enum.Enum):
        choices = [str(member.value) for member in setting.type]
    command.add_argument(
        setting.cli,
        dest=setting.name,
        default=None,
        choices=choices,
        metavar=None if choices else "VALUE",
        help=setting.describe(),
    )


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
        print(f"s3-attrs: cannot reach the InstantDB database: {first_line(error)}", file=sys.stderr)
        return EXIT_FAILED
    except psycopg.errors.InsufficientPrivilege as error:
        print(
            f"s3-attrs: the database role lacks a privilege: {first_line(error)} (see docs/postgres-grants.sql)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except CatalogMismatch as error:
        print(f"s3-attrs: {error}", file=sys.stderr)
        return EXIT_FAILED
