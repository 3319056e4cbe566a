"""`s3-attrs backfill`: the backfill the UI launches, asked for through the webserver's GraphQL API and
run by the daemon on the repository's dagster.yaml; with --wait, followed to its end, its exit status
the backfill's."""

import re
import subprocess
import sys

import dagster as dg

from s3_attrs_pipeline.cli import daemon_backfill
from s3_attrs_pipeline_tests.conftest import REPO_ROOT
from s3_attrs_pipeline_tests.fault_proxy import FaultRule
from s3_attrs_pipeline_tests.helpers import assert_every_file_right, partition_of, partitions_of

BACKFILL_TIMEOUT_S = 240  # a backfill of the seeded files takes under a minute, daemon loops of 1 s


def _s3_attrs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "s3_attrs_pipeline.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=BACKFILL_TIMEOUT_S,
    )


def test_backfill_launches_the_uis_backfill_and_waits_for_its_end(
    conn, s3_client, bucket, seeded_files, fault_proxy, daemon, webserver, monkeypatch
):
    failing = partitions_of(seeded_files)[0]
    # Every object request of the failing partition's apps answers 500, through all retries.
    apps = "|".join(sorted({str(f.app_id) for f in seeded_files if partition_of(f) == failing}))
    fault_proxy.add_rule(FaultRule("internal_error", key_pattern=f"/{bucket}/({apps})/"))

    first = _s3_attrs("backfill", "--wait", "--webserver", webserver)
    assert first.returncode == 1, first.stdout + first.stderr
    launched = re.search(r"backfill (\w+) of files_s3_attrs \(256 partitions\) launched: (\S+)", first.stdout)
    assert launched, first.stdout
    backfill_id = launched[1]
    assert launched[2] == f"{webserver}/runs/b/{backfill_id}?tab=partitions"
    assert f"backfill {backfill_id} · failed · partitions 255/256 materialized, 0 in progress, 1 failed" in (
        first.stdout
    )
    assert f"backfill {backfill_id} ended: failed" in first.stdout
    assert f"failed partitions (rerun with --partition; their runs' logs say why): {failing}\n" in first.stdout
    with dg.DagsterInstance.get() as instance:
        (run,) = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
        assert run.tags["s3-attrs/launched-by"] == "cli"

    fault_proxy.clear_rules()
    monkeypatch.setenv("DAGSTER_WEBSERVER_URL", webserver)
    second = _s3_attrs("backfill", "--wait", "--partition", failing)
    assert second.returncode == 0, second.stdout + second.stderr
    worked = sum(1 for f in seeded_files if partition_of(f) == failing and not f.prepopulated)
    assert f"succeeded · partitions 1/1 materialized, 0 in progress, 0 failed · files {worked:,}" in (second.stdout)
    assert "ended: succeeded" in second.stdout
    assert_every_file_right(conn, s3_client, bucket, seeded_files)


def test_backfill_without_wait_prints_its_page_and_returns(seeded_files, daemon, webserver):
    launched = _s3_attrs("backfill", "--refresh", "--partition", "00", "--webserver", webserver + "/")
    assert launched.returncode == 0, launched.stdout + launched.stderr
    backfill_id = re.search(r"backfill (\w+) of files_s3_attrs_refresh \(1 partitions\) launched", launched.stdout)[1]
    assert f"{webserver}/runs/b/{backfill_id}?tab=partitions" in launched.stdout
    # The backfill is the daemon's: it goes on without this process.
    assert daemon_backfill.progress(webserver, backfill_id).targeted == 1


def test_an_unreachable_webserver_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DAGSTER_WEBSERVER_URL", "http://127.0.0.1:9")
    done = _s3_attrs("backfill")
    assert done.returncode == 1
    assert "cannot reach the Dagster webserver at http://127.0.0.1:9" in done.stderr
    assert "set DAGSTER_WEBSERVER_URL or --webserver" in done.stderr
