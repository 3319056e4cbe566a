"""Queries and S3 look-ups the end-to-end tests assert with, and the Dagster daemon they start."""

import contextlib
import email.utils
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

from s3_attrs_pipeline.instant.app_id_ranges import partition_of_app
from s3_attrs_pipeline.instant.file_attrs import HASH, LAST_MODIFIED, LOCATION_ID

NEW_ATTR_IDS = (HASH.attr_id, LAST_MODIFIED.attr_id)


def new_attr_triples(conn) -> dict[tuple[uuid.UUID, uuid.UUID], dict[uuid.UUID, tuple]]:
    """{(app_id, entity_id): {attr_id: (value, value_md5, pg_md5, ea, eav, av, ave, vae, checked_data_type)}}."""
    rows = conn.execute(
        """SELECT app_id, entity_id, attr_id, value, value_md5, md5(value::text), ea, eav, av, ave, vae,
                  checked_data_type::text
           FROM triples WHERE attr_id = ANY(%s)""",
        (list(NEW_ATTR_IDS),),
    ).fetchall()
    by_file: dict = {}
    for app_id, entity_id, attr_id, *rest in rows:
        assert attr_id not in by_file.setdefault((app_id, entity_id), {}), "two triples of one attr for one file"
        by_file[(app_id, entity_id)][attr_id] = tuple(rest)
    return by_file


def all_triples(conn) -> set[tuple]:
    return set(
        conn.execute(
            "SELECT app_id, entity_id, attr_id, value::text, value_md5, ea, eav, av, ave, vae, created_at FROM triples"
        ).fetchall()
    )


def location_triples(conn) -> set[tuple]:
    return set(
        conn.execute(
            "SELECT app_id, entity_id, value::text, created_at FROM triples WHERE attr_id = %s", (LOCATION_ID.attr_id,)
        ).fetchall()
    )


def swept_locations(conn) -> int:
    return conn.execute("SELECT count(*) FROM app_files_to_sweep").fetchone()[0]


def head_values(s3_client, bucket: str, key: str) -> tuple[str, int]:
    """(ETag without quotes, Last-Modified in epoch ms) as a HEAD returns them now."""
    headers = s3_client.head_object(Bucket=bucket, Key=key)["ResponseMetadata"]["HTTPHeaders"]
    last_modified = email.utils.parsedate_to_datetime(headers["last-modified"])
    return headers["etag"].strip('"'), int(last_modified.timestamp() * 1000)


def assert_every_file_right(conn, s3_client, bucket, files) -> None:
    """Every file whose object is in S3 has its object's ETag and Last-Modified, once; no other file has any."""
    written = new_attr_triples(conn)
    assert len(written) == sum(f.in_s3 for f in files)
    for file in files:
        if file.in_s3:
            etag, last_modified = head_values(s3_client, bucket, file.key)
            values = [v[0] for v in written[(file.app_id, file.entity_id)].values()]
            assert sorted(values, key=str) == sorted([etag, last_modified], key=str)


def wait_for(condition, what: str, timeout_s: float):
    """condition()'s first truthy value, polled every second; TimeoutError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise TimeoutError(f"waited {timeout_s:.0f}s for {what}")


# The backfill daemon sleeps a hard-coded 30 s between iterations; a test cannot wait that long twice.
_FAST_DAEMON = (
    "import sys, dagster._daemon.controller as controller; controller.DEFAULT_DAEMON_INTERVAL_SECONDS = 1; "
    "from dagster._daemon.cli import main; sys.argv[0] = 'dagster-daemon'; sys.exit(main())"
)


def start_process(args: list[str], log: pathlib.Path, cwd: pathlib.Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            args,
            cwd=cwd,
            start_new_session=True,  # its own process group: its code server and run workers stop with it
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def start_fast_daemon(workspace: pathlib.Path, log: pathlib.Path) -> subprocess.Popen:
    """`dagster-daemon run` whose daemons loop every second instead of every 30 s."""
    return start_process([sys.executable, "-c", _FAST_DAEMON, "run", "-w", str(workspace)], log, workspace.parent)


def stop_processes_naming(text: str) -> list[int]:
    """Stop every process whose command line names `text` (a test's DAGSTER_HOME): the code servers a
    webserver, a daemon or a GraphQL context started and left behind when it was stopped (they run
    in process groups of their own). SIGTERM, then SIGKILL after 10 s; the pids it stopped."""
    found = []
    for cmdline in pathlib.Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # it ended meanwhile
            continue
    found = [pid for pid in found if pid != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(pathlib.Path(f"/proc/{pid}").exists() for pid in found):
            time.sleep(0.1)
    return found


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def wait_until_started(
    condition, process: subprocess.Popen, log: pathlib.Path, what: str, timeout_s: float = 90
) -> None:
    """Until condition() holds; an error with the end of the process's log if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited; its log ends:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for {what}; its log ends:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_process(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# What the UI sends for a run's "Terminate".
TERMINATE_RUN = """
mutation($runId: String!) {
  terminateRun(runId: $runId) {
    __typename
    ... on TerminateRunFailure { message }
    ... on PythonError { message stack }
  }
}"""


def launch(context, query, variables, field) -> str:
    """Send a backfill mutation through Dagster's GraphQL, as the UI does; the new backfill's id."""
    from dagster_graphql.test.utils import execute_dagster_graphql

    result = execute_dagster_graphql(context, query, variables).data[field]
    assert result["__typename"] == "LaunchBackfillSuccess", result
    return result["backfillId"]


def launch_backfill(context, partition_keys: list[str], asset: str = "files_s3_attrs") -> str:
    """What the UI's "Materialize…" dialog sends for the asset's partitions (every key by name); the
    new backfill's id."""
    from s3_attrs_pipeline.cli.daemon_backfill import LAUNCH_BACKFILL, backfill_params

    params = backfill_params(asset, partition_keys, {"dagster/from_ui": "true"})
    return launch(context, LAUNCH_BACKFILL, {"params": params}, "launchPartitionBackfill")


def terminate(context, run_id: str) -> None:
    """The UI's Terminate of a run."""
    from dagster_graphql.test.utils import execute_dagster_graphql

    result = execute_dagster_graphql(context, TERMINATE_RUN, {"runId": run_id}).data["terminateRun"]
    assert result["__typename"] == "TerminateRunSuccess", result


def code_location_assets():
    """`files_s3_attrs` and `files_s3_attrs_refresh` as the code location defines them with today's
    environment (the test's settings included)."""
    from s3_attrs_pipeline import deployment, environment
    from s3_attrs_pipeline.defs.assets import partitioned_assets

    return partitioned_assets(deployment.current(environment.read()))


# The tests' partitions are the default width's: 256, `00`..`ff`.
PARTITION_WIDTH = 2


def partition_of(file) -> str:
    """The key of the partition that holds `file` (a seeded file, or anything with an app_id)."""
    return partition_of_app(file.app_id, PARTITION_WIDTH)


def partitions_of(files) -> list[str]:
    """The keys of the partitions that hold `files`, in order."""
    return sorted({partition_of(file) for file in files})
