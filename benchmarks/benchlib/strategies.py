"""The measured strategies. Each runs in a fresh child process of its own (spawned), so its peak RSS,
CPU time and database round trips are its own; it sends one result dict back to the benchmark. S3
requests are counted by the benchmark from the server's log (services.RequestLog).

- pipeline:      s3_attrs_pipeline.tasks.backfill.backfill_partition over every partition (or `partitions`),
                 with `list_threshold` (0: HEAD only; 1000: the default, LIST for big apps), in one
                 process or in `parallel` worker processes taking partitions from a queue.
- pipeline with without_s3: the same with list_threshold 0 and a store whose submit_head answers at
                 once (no S3): the database side of the HEAD path alone.
- naive:         like the old REPL migration: per file one HEAD, then one autocommit INSERT per triple.
- boto3-ceiling: head_object over the same keys from `threads` threads doing nothing else.
- store-window:  the pipeline's ObjectStore.submit_head over the keys through a sliding window as
                 backfill._head_range keeps it (2 x max(batch_size, max_in_flight)), without the database.
- cli-run, ui-backfill: the pipeline end to end, as an operator runs it (`s3-attrs run`, and a backfill
                 launched in `dagster dev`'s UI), in processes of their own: benchlib/endtoend.py.
"""

import collections
import concurrent.futures
import re
import time
import traceback
import uuid

from benchlib import counting, endtoend

_FAKE_ETAG = "0123456789abcdef0123456789abcdef"
# This process's (main thread's) time blocked on S3: waiting for a HEAD's future, for the next page of
# a listing, inside check_bucket.
_STORE_SECONDS = {"head_wait": 0.0, "list_wait": 0.0, "check_bucket": 0.0}
_LISTED_APPS: list[dict] = []  # per app read by backfill._list_app: files, seconds, whether the listing held
_FAKE_LAST_MODIFIED_MS = 1_700_000_000_000


class _Window:
    """What the measured section did: wall time, and the counters' and CPU's growth over it."""

    def start(self) -> None:
        self._db = counting.db_counts()
        self._db_seconds = counting.db_seconds()
        self._store = dict(_STORE_SECONDS)
        self._cpu = counting.cpu_seconds()
        self._t0 = time.perf_counter()

    def stop(self) -> dict:
        elapsed = time.perf_counter() - self._t0
        return {
            "elapsed_s": elapsed,
            "db": _delta(counting.db_counts(), self._db),
            "db_seconds": _delta(counting.db_seconds(), self._db_seconds),
            "store_seconds": _delta(dict(_STORE_SECONDS), self._store),
            "cpu_s": counting.cpu_seconds() - self._cpu,
        }


def _delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


class TimeUp(Exception):
    """Raised through backfill_partition at a progress message once the strategy's time is up: a big
    partition can take minutes, so a time cap checked only between partitions would overrun."""

    def __init__(self, counts: dict):
        super().__init__("time is up")
        self.counts = counts


# backfill._ProgressLog's message, at most every 10 s and after a batch was written
_PROGRESS = re.compile(
    r"Processed batch (\d+) of partition \S+: processed=(\d+) successful=(\d+) "
    r"missing=(\d+) failed=(\d+)"
)


class _QuietLog:
    """The pipeline's Log: counts messages, keeps a few warnings and errors, prints nothing. Past
    `deadline` it stops the partition at its next progress message (TimeUp, with the counts so far)."""

    def __init__(self, deadline: float | None = None):
        self.counts = {"info": 0, "warning": 0, "error": 0}
        self.examples: list[str] = []
        self.deadline = deadline

    def _keep(self, level: str, msg: str) -> None:
        self.counts[level] += 1
        if level != "info" and len(self.examples) < 5:
            self.examples.append(f"{level}: {msg[:200]}")

    def info(self, msg: str) -> None:
        self._keep("info", msg)
        if self.deadline is not None and time.monotonic() > self.deadline:
            progress = _PROGRESS.match(msg)
            if progress:
                batches, processed, successful, missing, failed = map(int, progress.groups())
                raise TimeUp(
                    {
                        "batches": batches,
                        "processed": processed,
                        "successful": successful,
                        "missing": missing,
                        "failed": failed,
                    }
                )

    def warning(self, msg: str) -> None:
        self._keep("warning", msg)

    def error(self, msg: str) -> None:
        self._keep("error", msg)


class _TimedFuture(concurrent.futures.Future):
    """A store's future whose result() adds the time it blocked to _STORE_SECONDS["head_wait"]."""

    def result(self, timeout=None):
        started = time.perf_counter()
        try:
            return super().result(timeout)
        finally:
            _STORE_SECONDS["head_wait"] += time.perf_counter() - started


def _install_timers() -> None:
    """Time the waits for listing pages, and each listed app, without changing what the pipeline does:
    backfill calls `listing.prefetched` and `_list_app` through their modules at call time."""
    from s3_attrs_pipeline.s3 import listing
    from s3_attrs_pipeline.tasks import backfill

    if getattr(listing.prefetched, "bench_timed", False):
        return
    prefetched, list_app = listing.prefetched, backfill._list_app

    def timed_prefetched(pages, *args, **kwargs):
        inner = prefetched(pages, *args, **kwargs)
        try:
            while True:
                started = time.perf_counter()
                try:
                    page = next(inner)
                except StopIteration:
                    return
                finally:
                    _STORE_SECONDS["list_wait"] += time.perf_counter() - started
                yield page
        finally:
            inner.close()

    def timed_list_app(conn, store, app, *args, **kwargs):
        started = time.perf_counter()
        held = list_app(conn, store, app, *args, **kwargs)
        _LISTED_APPS.append(
            {
                "app_id": str(app.app_id),
                "files": app.pending,
                "seconds": time.perf_counter() - started,
                "listed": held is backfill.ALL_LISTED,
            }
        )
        return held

    timed_prefetched.bench_timed = True
    listing.prefetched = timed_prefetched
    backfill._list_app = timed_list_app


def _make_store(cfg: dict, *, without_s3: bool = False):
    from s3_attrs_pipeline.s3.store import ObjectStore, S3Settings

    settings = S3Settings(cfg["bucket"], endpoint_url=cfg["endpoint_url"], max_in_flight=cfg["max_in_flight"])

    class TimedStore(ObjectStore):
        """The pipeline's store, unchanged, except that the time spent waiting for it is added up."""

        def submit_head(self, key):
            future = super().submit_head(key)
            future.__class__ = _TimedFuture  # same object, same state: only result() is timed
            return future

        def check_bucket(self):
            started = time.perf_counter()
            try:
                return super().check_bucket()
            finally:
                _STORE_SECONDS["check_bucket"] += time.perf_counter() - started

    if not without_s3:
        return TimedStore(settings)

    from s3_attrs_pipeline.s3.object_metadata import ObjectMetadata
    from s3_attrs_pipeline.s3.store import HeadOutcome

    metadata = ObjectMetadata(_FAKE_ETAG, _FAKE_LAST_MODIFIED_MS)

    class StoreWithoutS3(TimedStore):
        """Answers every HEAD at once with fixed metadata; only the bucket check goes to S3."""

        def submit_head(self, key):
            future = concurrent.futures.Future()
            future.set_result(HeadOutcome(key, metadata=metadata))
            return future

    return StoreWithoutS3(settings)


def _client_requests(store) -> int | None:
    """The store's own count of the requests it sent (ObjectStore.requests_sent), where it has one."""
    return getattr(store, "requests_sent", None)


_REPORT_FIELDS = (
    "processed",
    "successful",
    "missing",
    "failed",
    "invalid_location_id",
    "malformed_object_metadata",
    "already_populated",
    "vanished_during_run",
    "s3_retries",
    "batches",
    "apps_listed",
)


def _run_partition(conn, store, key: str, settings, log) -> dict:
    from s3_attrs_pipeline.tasks.backfill import backfill_partition
    from s3_attrs_pipeline.tasks.task import PartitionFailed

    round_trips_before = sum(counting.db_counts().values())
    counts_at_cap = None
    try:
        report = backfill_partition(conn, store, key, settings, log)
        failed_partition = 0
    except PartitionFailed as error:
        report, failed_partition = error.report, 1
    except TimeUp as time_up:
        report, failed_partition, counts_at_cap = None, 0, time_up.counts
    summary = {field: getattr(report.counts, field) if report else 0 for field in _REPORT_FIELDS}
    if counts_at_cap is not None:
        summary |= counts_at_cap
        summary["capped"] = 1
    summary["failed_partitions"] = failed_partition
    summary["partitions"] = 1
    # (batches, round trips) of this partition: the report splits fixed per-partition cost from per-batch cost
    summary["shape"] = [(summary["batches"], sum(counting.db_counts().values()) - round_trips_before)]
    return summary


def _add(total: dict, part: dict) -> None:
    for k, v in part.items():
        total[k] = total.get(k, [] if isinstance(v, list) else 0) + v


def _settings(cfg: dict, without_s3: bool):
    from s3_attrs_pipeline.instant.app_id_ranges import partition_keys
    from s3_attrs_pipeline.tasks.task import TaskSettings

    return TaskSettings(
        batch_size=cfg["batch_size"],
        partition_count=len(partition_keys(cfg["partition_width"])),
        list_threshold=0 if without_s3 else cfg["list_threshold"],
    )


def _pipeline_inline(cfg: dict, keys: list[str], without_s3: bool) -> dict:
    _install_timers()
    conn = counting.counting_connect(cfg["database_url"])
    store = _make_store(cfg, without_s3=without_s3)
    settings = _settings(cfg, without_s3)
    totals: dict = {}
    window = _Window()
    deadline = time.monotonic() + cfg["max_seconds"]
    log = _QuietLog(deadline)
    capped = False
    window.start()
    for key in keys:
        if time.monotonic() > deadline:
            capped = True
            break
        part = _run_partition(conn, store, key, settings, log)
        _add(totals, part)
        if part.get("capped"):
            capped = True
            break
    result = window.stop()
    client_requests = _client_requests(store)
    store.close()
    conn.close()
    return result | {
        "files": totals.get("processed", 0),
        "batches": totals.get("batches", 0),
        "report": totals,
        "capped": capped,
        "log": log.counts,
        "log_examples": log.examples,
        "listed_apps": list(_LISTED_APPS),
        "client_requests": client_requests,
        "workers": [],
    }


def _pipeline_worker(cfg: dict, without_s3: bool, tasks, results, barrier) -> None:
    counting.die_with_parent()
    try:
        _install_timers()
        conn = counting.counting_connect(cfg["database_url"])
        store = _make_store(cfg, without_s3=without_s3)
        settings = _settings(cfg, without_s3)
        window = _Window()
        barrier.wait(120)
        log = _QuietLog(time.monotonic() + cfg["max_seconds"])
        window.start()
        while (key := tasks.get()) is not None:
            results.put(("partition", _run_partition(conn, store, key, settings, log)))
        measured = window.stop()
        client_requests = _client_requests(store)
        store.close()
        conn.close()
        results.put(
            (
                "worker",
                measured
                | {
                    "peak_rss_mib": counting.peak_rss_mib(),
                    "log": log.counts,
                    "cpu_total_s": counting.cpu_seconds(),
                    "client_requests": client_requests,
                    "listed_apps": list(_LISTED_APPS),
                    "log_examples": log.examples,
                },
            )
        )
    except BaseException:
        results.put(("error", traceback.format_exc()))
        raise


def _pipeline_parallel(cfg: dict, keys: list[str], without_s3: bool, processes: int) -> dict:
    import multiprocessing
    import queue as queue_module

    context = multiprocessing.get_context("spawn")
    tasks, results = context.Queue(), context.Queue()
    barrier = context.Barrier(processes + 1)
    workers = [
        context.Process(
            target=_pipeline_worker,
            args=(cfg, without_s3, tasks, results, barrier),
            name=f"pipeline-worker-{n}",
            daemon=True,
        )
        for n in range(processes)
    ]
    for worker in workers:
        worker.start()
    barrier.wait(120)
    deadline = time.monotonic() + cfg["max_seconds"]
    hard_deadline = deadline + cfg["grace_seconds"]
    window = _Window()
    window.start()
    pending = iter(keys)
    outstanding, capped, totals = 0, False, {}
    for key in pending:
        tasks.put(key)
        outstanding += 1
        if outstanding == processes:
            break
    while outstanding:
        try:
            kind, payload = results.get(timeout=max(1.0, hard_deadline - time.monotonic()))
        except queue_module.Empty:
            raise RuntimeError("pipeline workers did not finish in time") from None
        if kind == "error":
            raise RuntimeError(f"a pipeline worker failed:\n{payload}")
        outstanding -= 1
        _add(totals, payload)
        capped = capped or bool(payload.get("capped"))
        if time.monotonic() > deadline:
            capped = capped or next(pending, None) is not None
            continue
        key = next(pending, None)
        if key is not None:
            tasks.put(key)
            outstanding += 1
    measured = window.stop()
    for _ in workers:
        tasks.put(None)
    worker_results = []
    while len(worker_results) < processes:
        kind, payload = results.get(timeout=60)
        if kind == "error":
            raise RuntimeError(f"a pipeline worker failed:\n{payload}")
        if kind == "worker":
            worker_results.append(payload)
    for worker in workers:
        worker.join(10)
    log_counts: dict = {}
    for worker_result in worker_results:
        _add(log_counts, worker_result["log"])
    client = [w["client_requests"] for w in worker_results]
    return measured | {
        "db": counting.merge_counts(measured["db"], *(w["db"] for w in worker_results)),
        "db_seconds": counting.merge_counts(measured["db_seconds"], *(w["db_seconds"] for w in worker_results)),
        "store_seconds": counting.merge_counts(
            measured["store_seconds"], *(w["store_seconds"] for w in worker_results)
        ),
        "cpu_s": measured["cpu_s"] + sum(w["cpu_s"] for w in worker_results),
        "files": totals.get("processed", 0),
        "batches": totals.get("batches", 0),
        "report": totals,
        "capped": capped,
        "log": log_counts,
        "log_examples": [e for w in worker_results for e in w["log_examples"]][:5],
        "listed_apps": [a for w in worker_results for a in w["listed_apps"]],
        "client_requests": None if None in client else sum(client),
        "workers": [
            {"peak_rss_mib": w["peak_rss_mib"], "cpu_s": w["cpu_s"], "cpu_total_s": w["cpu_total_s"]}
            for w in worker_results
        ],
    }


def pipeline(cfg: dict) -> dict:
    from s3_attrs_pipeline.instant.app_id_ranges import partition_keys

    keys = cfg.get("partitions") or partition_keys(cfg["partition_width"])
    without_s3 = cfg.get("without_s3", False)
    if cfg["parallel"] <= 1:
        return _pipeline_inline(cfg, keys, without_s3)
    return _pipeline_parallel(cfg, keys, without_s3, cfg["parallel"])


_NAIVE_INSERT = """
INSERT INTO triples (app_id, entity_id, attr_id, value, value_md5, ea, eav, av, ave, vae, checked_data_type)
VALUES (%s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s, %s, %s::checked_data_type)
ON CONFLICT DO NOTHING
"""
_NAIVE_PROGRESS = """
INSERT INTO config (k, v) VALUES ('s3-attrs-migration-status', %s::json)
ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v
"""


def naive(cfg: dict) -> dict:
    """The old REPL migration's shape: pages of 50 files; per file one HEAD, then one INSERT per triple."""
    import boto3
    import botocore.config
    import botocore.exceptions
    from psycopg.types.json import Json

    from s3_attrs_pipeline.instant import catalog, reads
    from s3_attrs_pipeline.instant.app_id_ranges import AppIdRange
    from s3_attrs_pipeline.instant.file_attrs import HASH, LAST_MODIFIED, json_text, value_md5
    from s3_attrs_pipeline.instant.object_keys import InvalidLocationId, object_key
    from s3_attrs_pipeline.s3.object_metadata import MalformedObjectMetadata, object_metadata_from_headers

    conn = counting.counting_connect(cfg["database_url"])
    client = boto3.client(
        "s3", endpoint_url=cfg["endpoint_url"], config=botocore.config.Config(retries={"mode": "standard"})
    )
    catalog.ensure_file_attrs(conn)
    client.head_bucket(Bucket=cfg["bucket"])  # connection and service model ready before the clock starts
    every_app = AppIdRange("all", uuid.UUID(int=0), uuid.UUID(int=2**128 - 1))
    totals = {"processed": 0, "successful": 0, "missing": 0, "failed": 0}
    batches, capped = 0, False
    deadline = time.monotonic() + cfg["max_seconds"]
    window = _Window()
    window.start()
    for batch in reads.iter_pending_batches(conn, every_app, cfg["batch_size"]):
        for file in batch:
            totals["processed"] += 1
            try:
                key = object_key(file.app_id, file.location_value)
                headers = client.head_object(Bucket=cfg["bucket"], Key=key)["ResponseMetadata"]["HTTPHeaders"]
                metadata = object_metadata_from_headers(headers)
            except botocore.exceptions.ClientError as error:
                code = str(error.response.get("Error", {}).get("Code", ""))
                totals["missing" if code in ("404", "NoSuchKey", "NotFound") else "failed"] += 1
                continue
            except (InvalidLocationId, MalformedObjectMetadata):
                totals["failed"] += 1
                continue
            for spec, value in ((HASH, metadata.hash), (LAST_MODIFIED, metadata.last_modified_ms)):
                flags = spec.triple_flags
                conn.execute(
                    _NAIVE_INSERT,
                    (
                        file.app_id,
                        file.entity_id,
                        spec.attr_id,
                        json_text(value),
                        value_md5(value),
                        flags["ea"],
                        flags["eav"],
                        flags["av"],
                        flags["ave"],
                        flags["vae"],
                        spec.checked_data_type,
                    ),
                )
            totals["successful"] += 1
        conn.execute(_NAIVE_PROGRESS, (Json({**totals, "last-entity-id": str(batch[-1].entity_id)}),))
        batches += 1
        if time.monotonic() > deadline:
            capped = True
            break
    result = window.stop()
    conn.close()
    return result | {
        "files": totals["processed"],
        "batches": batches,
        "report": totals,
        "capped": capped,
        "workers": [],
    }


def boto3_ceiling(cfg: dict) -> dict:
    """The raw HEAD rate of boto3 from one Python process: `threads` threads, one shared client, nothing else."""
    import concurrent.futures

    import boto3
    import botocore.config
    import botocore.exceptions

    from benchlib.dataset import load_keys

    keys = load_keys(cfg["keys_path"])
    threads = cfg["threads"]
    client = boto3.client(
        "s3",
        endpoint_url=cfg["endpoint_url"],
        config=botocore.config.Config(max_pool_connections=threads, retries={"mode": "standard"}),
    )
    client.head_bucket(Bucket=cfg["bucket"])
    bucket = cfg["bucket"]
    deadline = time.monotonic() + cfg["max_seconds"]

    def work(offset: int) -> tuple[int, int]:
        done = missing = 0
        for key in keys[offset::threads]:
            if done % 64 == 0 and time.monotonic() > deadline:
                break
            try:
                client.head_object(Bucket=bucket, Key=key)
            except botocore.exceptions.ClientError:
                missing += 1
            done += 1
        return done, missing

    window = _Window()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        window.start()
        outcomes = list(pool.map(work, range(threads)))
        result = window.stop()
    files = sum(done for done, _ in outcomes)
    return result | {
        "files": files,
        "batches": None,
        "report": {"missing": sum(m for _, m in outcomes)},
        "capped": files < len(keys),
        "workers": [],
    }


def store_window(cfg: dict) -> dict:
    """The pipeline's S3 layer alone: every key through ObjectStore.submit_head, in a sliding window as
    backfill._head_range keeps it, outcomes taken in order."""
    from benchlib.dataset import load_keys

    keys = load_keys(cfg["keys_path"])
    store = _make_store(cfg)
    store.check_bucket()
    window_size = 2 * max(cfg["batch_size"], cfg["max_in_flight"])
    deadline = time.monotonic() + cfg["max_seconds"]
    done = missing = failed = 0
    pending: collections.deque = collections.deque()

    def settle() -> None:
        nonlocal done, missing, failed
        outcome = pending.popleft().result()
        done += 1
        missing += bool(outcome.missing)
        failed += outcome.metadata is None and not outcome.missing

    window = _Window()
    window.start()
    for index, key in enumerate(keys):
        pending.append(store.submit_head(key))
        while len(pending) > window_size:
            settle()
        if index % 1000 == 0 and time.monotonic() > deadline:
            break
    while pending:
        settle()
    result = window.stop()
    client_requests = _client_requests(store)
    store.close()
    return result | {
        "files": done,
        "batches": None,
        "report": {"missing": missing, "failed": failed},
        "capped": done < len(keys),
        "client_requests": client_requests,
        "workers": [],
    }


STRATEGIES = {
    "pipeline": pipeline,
    "naive": naive,
    "boto3-ceiling": boto3_ceiling,
    "store-window": store_window,
    "cli-run": endtoend.cli_run,
    "ui-backfill": endtoend.ui_backfill,
}


def child_main(strategy: str, cfg: dict, results, started) -> None:
    """Entry point of a strategy's child process."""
    counting.die_with_parent()
    try:
        started.set()
        result = STRATEGIES[strategy](cfg)
        result["peak_rss_mib"] = counting.peak_rss_mib()
        result["cpu_total_s"] = (
            counting.cpu_seconds()
            + sum(w.get("cpu_total_s", 0) for w in result["workers"])
            + result.get("tree", {}).get("cpu_s", 0.0)
        )  # the end-to-end rows' subprocesses
        results.put(("ok", result))
    except BaseException:
        results.put(("error", traceback.format_exc()))
