"""The end-to-end strategies: the pipeline as an operator runs it, in processes of its own.

- cli-run:     `python -m s3_attrs_pipeline.cli run --quiet` (what the `s3-attrs` console script runs),
               timed from process start to exit: Python's imports, Dagster's run overhead and the
               planning are all inside. DAGSTER_HOME holds the repository's dagster.yaml (PostgreSQL
               storage in a fresh database), as the README tells an operator to set it up; its schema is
               created before the timer starts, as an operator's instance exists before a backfill.
- ui-backfill: `dagster dev` on the repository's workspace.yaml and dagster.yaml (PostgreSQL storage,
               QueuedRunCoordinator), then the GraphQL mutation the UI's "Materialize → All" dialog
               sends for `files_s3_attrs`, polled until every partition has a status; timed from the
               launch to the poll that saw the last partition's status.

Each runs in the benchmark's usual fresh strategy process (strategies.child_main), which starts the
pipeline's processes in a process group of their own and makes itself their subreaper: whatever
they leave behind (code servers, run workers) is re-parented to it, so it can end and reap every
one of them, and their CPU time and peak RSS reach it through RUSAGE_CHILDREN.
"""

import contextlib
import ctypes
import json
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import psycopg

from benchlib.services import LOOPBACK, free_port

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
ASSET = "files_s3_attrs"
# The backfill's statuses after which it launches nothing more (dagster BulkActionStatus).
_BACKFILL_DONE = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}


class _Stop(Exception):
    """Raised in the strategy process by SIGTERM (the benchmark ending it on Ctrl-C or an error), so the
    `finally` that ends the pipeline's processes runs instead of the process just dying."""


def _raise_stop(signum, frame):
    raise _Stop(f"signal {signum}")


def _prepare_strategy_process() -> None:
    signal.signal(signal.SIGTERM, _raise_stop)
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _child_preexec() -> None:
    """In the pipeline's top process, before exec: SIGTERM it if the strategy process dies (even by
    SIGKILL), and undo the strategy process's ignored SIGINT (an ignored signal stays ignored across
    exec, and `dagster dev` maps SIGTERM to whatever SIGINT does: it would ignore both)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _children_usage() -> tuple[float, float]:
    """(CPU seconds, peak RSS MiB of the largest one) of every descendant reaped so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


class ProcessTree:
    """One command in a new process group (its own session), and everything it starts. `stop()` ends the
    leader (gracefully first: `dagster dev` then stops its webserver and daemon itself), then the rest
    of the group, then any descendant that left the group, and reaps them all."""

    def __init__(self, command: list[str], *, cwd: pathlib.Path, env: dict, log_path: pathlib.Path):
        self.log_path = log_path
        self.stop_s = 0.0
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_child_preexec,
            )

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, grace_s: float = 30.0) -> None:
        # A SIGTERM now (the benchmark ending us) must not cut the stopping short.
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        started = time.monotonic()
        try:
            self._stop(grace_s)
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.stop_s = time.monotonic() - started

    def _stop(self, grace_s: float) -> None:
        leader = self.process
        if leader.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                leader.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                leader.wait(grace_s)
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            # The group (the leader's pid) outlives the leader while any member lives.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(leader.pid, sig)
            if leader.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    leader.wait(wait_s)
            # Descendants that started a session of their own, re-parented to this (subreaper) process.
            rest = psutil.Process().children(recursive=True)
            for child in rest:
                with contextlib.suppress(psutil.Error):
                    child.send_signal(sig)
            _, alive = psutil.wait_procs(rest, timeout=wait_s)
            if not alive and leader.poll() is not None:
                break
        _reap_orphans()


def _reap_orphans() -> None:
    """Reap every exited child (re-parented orphans included): their rusage then counts in RUSAGE_CHILDREN."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def pipeline_env(cfg: dict, dagster_home: pathlib.Path) -> dict:
    """The environment an operator gives the pipeline: the database, the bucket, the S3 endpoint (through
    the delay proxy when there is one) and credentials, a DAGSTER_HOME. Inherited S3_ATTRS_* and
    INSTANT_* settings are dropped so a run measures the defaults, except the partition width and
    partitions per run the benchmark was given; PYTHONPATH puts this checkout first, so every process (the CLI, dagster dev's
    code server, its run workers) runs the code the benchmark's header names."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("S3_ATTRS_", "INSTANT_", "DAGSTER_")) and k != "PYTHONPATH"
    }
    env.update(
        {
            "INSTANT_DATABASE_URL": cfg["database_url"],
            "INSTANT_S3_BUCKET": cfg["bucket"],
            "AWS_ENDPOINT_URL": cfg["endpoint_url"],
            "AWS_ACCESS_KEY_ID": cfg["access_key"],
            "AWS_SECRET_ACCESS_KEY": cfg["secret_key"],
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "DAGSTER_HOME": str(dagster_home),
            "S3_ATTRS_PARTITION_WIDTH": str(cfg["partition_width"]),
            "S3_ATTRS_PARTITIONS_PER_RUN": str(cfg.get("partitions_per_run", 0)),
            "PYTHONPATH": cfg["repo_root"]
            + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
        }
    )
    return env


def _imported_from(env: dict, cwd: str) -> str:
    """Where the pipeline's processes import s3_attrs_pipeline from (checked once, not timed)."""
    out = subprocess.run(
        [sys.executable, "-c", "import s3_attrs_pipeline; print(s3_attrs_pipeline.__file__)"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip() or out.stderr.strip()[-300:]


def files_with_hash(database_url: str) -> int:
    """Files that have a `hash` triple: after a run minus before it is what the run wrote."""
    from s3_attrs_pipeline.instant.file_attrs import HASH

    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM triples WHERE attr_id = %s AND ea", (HASH.attr_id,)).fetchone()[0]


_CONFIG_WRITES = """
SELECT n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables WHERE relname = 'config' AND schemaname = 'public'
"""


def config_writes(database_url: str) -> dict[str, int]:
    """Rows of InstantDB's `config` table inserted, updated and deleted so far (the progress rows'
    bookkeeping). A backend's counts reach these views when its transaction ends (at most a second
    later) or when it exits: read after the pipeline's processes ended, they are complete."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        inserted, updated, deleted = conn.execute(_CONFIG_WRITES).fetchone()
    return {"inserted": inserted, "updated": updated, "deleted": deleted}


def _config_writes_since(cfg: dict, before: dict[str, int]) -> dict[str, int]:
    time.sleep(1.5)  # the ended backends' counts are flushed as they exit
    after = config_writes(cfg["database_url"])
    return {kind: after[kind] - before[kind] for kind in after}


def _dagster_runs(dagster_postgres_url: str) -> int:
    """Dagster runs in the instance's storage: the CLI's cost in runs."""
    with psycopg.connect(dagster_postgres_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM runs").fetchone()[0]


def _instance_home(cfg: dict, work: pathlib.Path) -> tuple[pathlib.Path, dict]:
    """A DAGSTER_HOME with the repository's dagster.yaml, and the environment that points at it."""
    home = work / "dagster_home"
    home.mkdir(parents=True)
    shutil.copyfile(pathlib.Path(cfg["repo_root"]) / "dagster.yaml", home / "dagster.yaml")  # as shipped
    env = pipeline_env(cfg, home)
    # dagster-postgres speaks psycopg2 (as the demo's .demo/env sets it)
    env["DAGSTER_POSTGRES_URL"] = cfg["dagster_postgres_url"].replace("postgresql://", "postgresql+psycopg2://", 1)
    return home, env


def _base_result(cfg: dict, written: int, elapsed: float, capped: bool, cpu_before: float) -> dict:
    cpu, peak = _children_usage()
    return {
        "files": written,  # files written (their hash and lastModified), not files looked at
        "elapsed_s": elapsed,
        "batches": None,
        "db": {},
        "db_seconds": {},
        "store_seconds": {},
        "cpu_s": cpu - cpu_before,  # the pipeline's processes, every one (reaped)
        "capped": capped,
        "workers": [],
        "tree": {"cpu_s": cpu - cpu_before, "peak_rss_mib": peak},
        "client_requests": None,  # no store in this process to ask: rclone's log counts them
    }


_SUMMARY_PARTITIONS = re.compile(r"(\d+) of (\d+) done: (\d+) worked, (\d+) with nothing to do, (\d+) failed")
_SUMMARY_COUNT = re.compile(r"^([a-z_]+)\s+([\d,]+)$")


def _parse_summary(output: str) -> dict:
    """The CLI's summary table (`partitions  N of N done: W worked, E with nothing to do, F failed`, then
    a row per count): only for the row's notes, the files written are counted in the database."""
    report: dict = {}
    for line in output.splitlines():
        partitions = _SUMMARY_PARTITIONS.search(line)
        if partitions:
            _, report["partitions"], report["worked_partitions"], _, report["failed_partitions"] = map(
                int, partitions.groups()
            )
        count = _SUMMARY_COUNT.match(line.strip())
        if count:
            report[count.group(1)] = int(count.group(2).replace(",", ""))
    return report


def cli_run(cfg: dict) -> dict:
    """`s3-attrs run --quiet` in a subprocess, from its start to its exit."""
    _prepare_strategy_process()
    work = pathlib.Path(cfg["work_dir"])
    home, env = _instance_home(cfg, work)
    subprocess.run([sys.executable, "-c", "import dagster; dagster.DagsterInstance.get()"], env=env, check=True)
    imported = _imported_from(env, cfg["repo_root"])
    before = files_with_hash(cfg["database_url"])
    config_before = config_writes(cfg["database_url"])
    command = [sys.executable, "-m", "s3_attrs_pipeline.cli", "run", "--quiet"]
    cpu_before, _ = _children_usage()
    capped, tree, finished = False, None, False
    started = time.perf_counter()
    try:
        tree = ProcessTree(command, cwd=pathlib.Path(cfg["repo_root"]), env=env, log_path=work / "cli.log")
        try:
            exit_code = tree.process.wait(cfg["max_seconds"])
        except subprocess.TimeoutExpired:
            capped, exit_code = True, None
        elapsed = time.perf_counter() - started
        finished = True
    finally:
        if tree is not None:
            tree.stop(grace_s=10.0 if finished else 3.0)  # quickly when interrupted
    output = tree.log_path.read_text(errors="replace")
    written = files_with_hash(cfg["database_url"]) - before
    config = _config_writes_since(cfg, config_before)
    notes = [f"exit {exit_code}" if exit_code is not None else "killed at its time budget"]
    report = _parse_summary(output)
    if report.get("partitions") is not None:
        notes.append(f"{report['worked_partitions']} of {report['partitions']} partitions worked")
    runs = _dagster_runs(cfg["dagster_postgres_url"])
    notes.append(f"{runs} Dagster runs")
    if exit_code != 0:
        notes.append("output ends: " + " / ".join(tree.log_tail(5).splitlines()))
    result = _base_result(cfg, written, elapsed, capped, cpu_before)
    after = _after_the_run(cfg, env, work) if cfg.get("after_run") and finished and exit_code == 0 else {}
    return result | {
        "after_run": after,
        "report": report,
        "exit_code": exit_code,
        "dagster_runs": runs,
        "config_writes": config,
        "command": " ".join(command[1:]),
        "imported_from": imported,
        "output_tail": tree.log_tail(),
        "e2e_notes": notes,
    }


# With --after-run, what an operator runs after a backfill, each timed from process start to exit
# (their CPU then counts in the row's PostgreSQL and S3-server columns, not in files/s): the rerun that finds
# nothing to do, `s3-attrs stats`, and the database side of the four checks (verification.database_report,
# what the checks read; their S3 sample is apart). And the plan's reads for one partition against every
# partition's (EXPLAIN buffers of the plan's one count).
_CHECKS = (
    "import os, time, psycopg; from s3_attrs_pipeline.verification import database_report; "
    "c = psycopg.connect(os.environ['INSTANT_DATABASE_URL'], autocommit=True); t = time.perf_counter(); "
    "r = database_report(c, int(os.environ['S3_ATTRS_PARTITION_WIDTH'])); "
    "print(f'{time.perf_counter() - t:.3f} {r.total_files} {r.remaining}')"
)


def _timed(command: list[str], cfg: dict, env: dict) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cfg["repo_root"], env=env, capture_output=True, text=True, timeout=1800)
    return time.perf_counter() - started, done


def _plan_buffers(database_url: str, keys: list[str]) -> int:
    from s3_attrs_pipeline.instant import reads
    from s3_attrs_pipeline.instant.app_id_ranges import AppIdRange

    params = reads.entity_count_params(len(keys[0]), AppIdRange.spanning(keys))
    with psycopg.connect(database_url, autocommit=True) as conn:
        explain = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + reads._ENTITY_COUNTS_BY_PARTITION
        plan = conn.execute(explain, params).fetchone()[0][0]["Plan"]
    return plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]


def _after_the_run(cfg: dict, env: dict, work: pathlib.Path) -> dict:
    from s3_attrs_pipeline.instant.app_id_ranges import partition_keys

    cli = [sys.executable, "-m", "s3_attrs_pipeline.cli"]
    rerun_s, rerun = _timed([*cli, "run", "--quiet"], cfg, env)
    (work / "rerun.log").write_text(rerun.stdout + rerun.stderr)
    stats_s, stats = _timed([*cli, "stats", "--json"], cfg, env)
    checks_s, checks = _timed([sys.executable, "-c", _CHECKS], cfg, env)
    keys = partition_keys(cfg["partition_width"])
    every, one = _plan_buffers(cfg["database_url"], keys), _plan_buffers(cfg["database_url"], [keys[len(keys) // 2]])
    queries_s, files, remaining = (float(v) for v in checks.stdout.split()) if checks.returncode == 0 else (0, 0, 0)
    return {
        "rerun_s": rerun_s,
        "rerun_exit": rerun.returncode,
        "rerun_report": _parse_summary(rerun.stdout + rerun.stderr),
        "stats_s": stats_s,
        "stats_exit": stats.returncode,
        "checks_s": checks_s,
        "checks_queries_s": queries_s,
        "checks_exit": checks.returncode,
        "checked_files": int(files),
        "remaining": int(remaining),
        "plan_buffers_every": every,
        "plan_buffers_one": one,
    }


# --- ui-backfill: dagster dev and the UI's GraphQL -----------------------------------------------

# What the UI's launch dialog sends (LAUNCH_PARTITION_BACKFILL_MUTATION of dagster-webserver's
# ui-core/src/instance/backfill/BackfillUtils.tsx, trimmed to the answers read here).
LAUNCH_BACKFILL = """
mutation LaunchPartitionBackfill($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on UnauthorizedError { message }
    ... on PartitionKeysNotFoundError { message }
  }
}"""
ASSET_PARTITIONS = """
query($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    __typename
    ... on AssetNode { partitionKeysByDimension { partitionKeys } }
  }
}"""
DAEMONS = "{ instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } } }"
PROGRESS = """
query($assetKey: AssetKeyInput!, $backfillId: String!) {
  assetNodeOrError(assetKey: $assetKey) {
    __typename
    ... on AssetNode { partitionStats { numMaterialized numMaterializing numFailed numPartitions } }
  }
  partitionBackfillOrError(backfillId: $backfillId) {
    __typename
    ... on PartitionBackfill { status }
  }
}"""
BACKFILL_RUNS = """
query($backfillId: String!) {
  runsOrError(filter: {tags: [{key: "dagster/backfill", value: $backfillId}]}) { __typename ... on Runs { count } }
}"""


class GraphQL:
    def __init__(self, url: str):
        self.url = url

    def __call__(self, query: str, variables: dict | None = None, timeout_s: float = 60.0) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            payload = json.load(answer)
        if payload.get("errors"):
            raise RuntimeError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]


def _wait_until(condition, what: str, tree: ProcessTree, deadline: float):
    """condition()'s first truthy value (polled every 0.5 s; errors count as not yet), while dagster dev
    lives and until `deadline`."""
    last_error = None
    while True:
        if tree.process.poll() is not None:
            raise RuntimeError(
                f"dagster dev exited ({tree.process.returncode}) while waiting for {what}; "
                f"its log ends:\n{tree.log_tail(30)}"
            )
        try:
            value = condition()
            if value:
                return value
        except (OSError, RuntimeError, KeyError, TypeError, ValueError) as error:
            last_error = error
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"waited too long for {what} (last error: {last_error}); dagster dev's log ends:\n{tree.log_tail(30)}"
            )
        time.sleep(0.5)


def _server_answers(base_url: str) -> bool:
    with urllib.request.urlopen(f"{base_url}/server_info", timeout=5) as answer:
        return answer.status == 200


def ui_backfill(cfg: dict) -> dict:
    """dagster dev, then "Materialize → All" of files_s3_attrs, as the UI sends it, until every partition
    is materialized or failed."""
    _prepare_strategy_process()
    work = pathlib.Path(cfg["work_dir"])
    repo = pathlib.Path(cfg["repo_root"])
    home, env = _instance_home(cfg, work)
    imported = _imported_from(env, cfg["repo_root"])
    before = files_with_hash(cfg["database_url"])
    config_before = config_writes(cfg["database_url"])
    port = free_port()
    base_url = f"http://{LOOPBACK}:{port}"
    graphql = GraphQL(f"{base_url}/graphql")
    command = [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-w",
        str(repo / "workspace.yaml"),
        "-h",
        LOOPBACK,
        "-p",
        str(port),
    ]
    asset_key = {"path": [ASSET]}
    cpu_before, _ = _children_usage()
    began = time.monotonic()
    tree, finished = None, False
    capped, polls, stats, backfill_status, first_started = False, 0, {}, None, None
    try:
        tree = ProcessTree(command, cwd=repo, env=env, log_path=work / "dagster-dev.log")
        ready_by = began + cfg["startup_seconds"]
        _wait_until(lambda: _server_answers(base_url), "the webserver", tree, ready_by)

        def partition_keys():
            node = graphql(ASSET_PARTITIONS, {"assetKey": asset_key})["assetNodeOrError"]
            return node.get("partitionKeysByDimension") and node["partitionKeysByDimension"][0]["partitionKeys"]

        keys = _wait_until(partition_keys, "the code location (files_s3_attrs' partitions)", tree, ready_by)

        def daemons_healthy():
            statuses = graphql(DAEMONS)["instance"]["daemonHealth"]["allDaemonStatuses"]
            return all(s["healthy"] for s in statuses if s["required"])

        # An operator sees "daemon not running" in the launch dialog until then; a backfill launched
        # earlier only waits in the queue, which would count against the run.
        _wait_until(daemons_healthy, "the daemons' heartbeats", tree, ready_by)
        startup_s = time.monotonic() - began

        # For one asset with a job of its own (the hidden asset job), the dialog sends the partition
        # names of its selection, "All" being every key, not allPartitions (which it sends only for
        # assets without a common job): LaunchAssetChoosePartitionsDialog.tsx, onLaunchAsBackfill.
        params = {
            "tags": [{"key": "dagster/from_ui", "value": "true"}],
            "assetSelection": [asset_key],
            "partitionNames": keys,
            "fromFailure": False,
        }
        launched = time.perf_counter()
        answer = graphql(LAUNCH_BACKFILL, {"backfillParams": params})["launchPartitionBackfill"]
        if answer["__typename"] != "LaunchBackfillSuccess":
            raise RuntimeError(f"launchPartitionBackfill answered {answer}")
        backfill_id = answer["backfillId"]
        deadline = launched + cfg["max_seconds"]
        while True:
            polled = time.perf_counter()
            data = graphql(PROGRESS, {"assetKey": asset_key, "backfillId": backfill_id})
            polls += 1
            stats = data["assetNodeOrError"].get("partitionStats") or {}
            backfill_status = (data["partitionBackfillOrError"] or {}).get("status")
            settled = stats.get("numMaterialized", 0) + stats.get("numFailed", 0)
            if first_started is None and settled + stats.get("numMaterializing", 0):
                first_started = polled - launched  # the backfill daemon and the run queue's share of the wait
            if not stats.get("numMaterializing") and (
                settled >= stats.get("numPartitions", len(keys)) or backfill_status in _BACKFILL_DONE
            ):
                # The last partition's status came between the previous poll and this one.
                elapsed = polled - launched
                break
            if time.perf_counter() > deadline:
                capped, elapsed = True, time.perf_counter() - launched
                break
            time.sleep(max(0.0, 1.0 - (time.perf_counter() - polled)))
        runs = graphql(BACKFILL_RUNS, {"backfillId": backfill_id})["runsOrError"].get("count")
        finished = True
    finally:
        if tree is not None:
            # dagster dev stops its webserver and daemon itself on SIGTERM; when interrupted, less patience.
            tree.stop(grace_s=30.0 if finished else 3.0)
    written = files_with_hash(cfg["database_url"]) - before
    config = _config_writes_since(cfg, config_before)
    materialized, failed = stats.get("numMaterialized", 0), stats.get("numFailed", 0)
    total = stats.get("numPartitions", len(keys))
    first = f"{first_started:.0f} s" if first_started is not None else "never"
    notes = [
        f"partitions materialized {materialized}, failed {failed}, of {total}",
        f"{runs} Dagster runs",
        f"first partition materializing after {first}",
        f"backfill {backfill_status}",
        f"dagster dev ready in {startup_s:.0f} s and stopped in {tree.stop_s:.0f} s (neither timed)",
    ]
    return _base_result(cfg, written, elapsed, capped, cpu_before) | {
        "report": {"failed_partitions": failed},
        "partitions": {
            "materialized": materialized,
            "failed": failed,
            "total": total,
            "materializing": stats.get("numMaterializing", 0),
        },
        "backfill_status": backfill_status,
        "config_writes": config,
        "dagster_runs": runs,
        "startup_s": startup_s,
        "first_partition_started_s": first_started,
        "polls": polls,
        "imported_from": imported,
        "output_tail": tree.log_tail() if tree else "",
        "e2e_notes": notes,
    }
