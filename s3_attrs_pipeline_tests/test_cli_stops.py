"""A run that cannot usefully go on stops and says why (issue 14), through `s3-attrs run`, moto's S3
server and the fault proxy: credentials that expire mid-run stop it before another partition starts,
and a run whose files mostly fail in S3 stops at the failure threshold."""

import re

import dagster as dg

from s3_attrs_pipeline import cli
from s3_attrs_pipeline.cli import dagster_runs
from s3_attrs_pipeline.counts import FileCounts
from s3_attrs_pipeline.instant import progress_rows
from s3_attrs_pipeline_tests.fault_proxy import FaultProxy, FaultRule
from s3_attrs_pipeline_tests.helpers import head_values, new_attr_triples, partition_of, partitions_of

FILES = dg.AssetKey("files_s3_attrs")

EXPIRED = {"status": 400, "code": "ExpiredToken", "message": "The provided token has expired."}


def _run(keys, *options) -> int:
    args = ["run", "--parallel", "1", *options]
    for key in keys:
        args += ["--partition", key]
    return cli.main(args)


def _assert_written_right(conn, s3_client, bucket, files) -> set:
    """Every file with triples has its object's ETag and Last-Modified; the partitions written to."""
    by_id = {(f.app_id, f.entity_id): f for f in files}
    written = new_attr_triples(conn)
    for file_id, attrs in written.items():
        etag, last_modified = head_values(s3_client, bucket, by_id[file_id].key)
        assert sorted((v[0] for v in attrs.values()), key=str) == sorted([etag, last_modified], key=str)
    return {partition_of(by_id[file_id]) for file_id in written if not by_id[file_id].prepopulated}


def _summary(out: str) -> FileCounts:
    """The counts of `s3-attrs run`'s summary table."""
    rows = dict(re.findall(r"^(\w+) +([\d,]+)$", out, re.MULTILINE))
    return FileCounts(**{name: int(rows[name].replace(",", "")) for name in cli.SUMMARY_COUNTS})


def _dagster_counts(instance: dg.DagsterInstance) -> FileCounts:
    """The counts of every run in the instance: its partitions' materializations, and its failure."""
    names = cli.SUMMARY_COUNTS
    total = FileCounts()
    for record in instance.fetch_materializations(FILES, limit=1000).records:
        metadata = record.asset_materialization.metadata
        total += FileCounts(**{name: metadata[name].value for name in names})
    for run in instance.get_runs():
        for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
            metadata = entry.dagster_event.step_failure_data.user_failure_data.metadata
            total += FileCounts(**{name: metadata[name].value for name in names})
    return total


def _assert_counts_agree(out: str, conn, instance) -> FileCounts:
    """The CLI's summary, Dagster's metadata and the progress rows count the same files, to the file."""
    rows = progress_rows.read_progress(conn)["partitions"].values()
    in_rows = sum((FileCounts.from_config(state) for state in rows), FileCounts())
    in_rows = FileCounts(**{name: getattr(in_rows, name) for name in cli.SUMMARY_COUNTS})
    assert _summary(out) == _dagster_counts(instance) == in_rows
    return in_rows


def test_credentials_expiring_mid_run_stop_the_cli_run(
    conn, s3_endpoint, s3_client, bucket, seeded_files, dagster_home, monkeypatch, capsys
):
    keys = partitions_of(seeded_files)  # not neighbours: one run each, one after the other
    first = sum(1 for f in seeded_files if partition_of(f) == keys[0] and not f.prepopulated)
    with FaultProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        # HEAD bucket and the first partition's HEADs pass; then every request answers 400 ExpiredToken.
        proxy.add_rule(FaultRule("s3_error", after_requests=1 + first + 5, **EXPIRED))
        assert _run(keys) == cli.EXIT_FAILED
        refused = proxy.stats()["s3_error"]
    out = capsys.readouterr().out
    assert "expired" in out and "refresh" in out
    assert "stopped launching" in out
    # The second partition's run stopped within a batch window; no partition after it was started.
    assert refused <= 2 * 50
    instance = dagster_runs.dagster_instance()
    assert len(instance.get_runs()) == 2
    assert instance.get_materialized_partitions(dg.AssetKey("files_s3_attrs")) == {keys[0]}
    states = progress_rows.read_progress(conn)["partitions"]
    assert set(states) == {keys[0], keys[1]}
    assert _assert_written_right(conn, s3_client, bucket, seeded_files) <= {keys[0], keys[1]}
    counts = _assert_counts_agree(out, conn, instance)
    assert counts.successful == len(new_attr_triples(conn)) - sum(f.prepopulated for f in seeded_files)


def test_a_run_whose_files_mostly_fail_stops_at_the_threshold(
    conn, s3_endpoint, s3_client, bucket, seeded_files, dagster_home, monkeypatch, capsys
):
    keys = partitions_of(seeded_files)
    neighbours = [k for k in dagster_runs.all_partition_keys() if keys[0] <= k <= keys[-1]]
    with FaultProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proxy.add_rule(FaultRule("internal_error", method="HEAD", key_pattern=f"/{bucket}/.+"))
        status = cli.main(
            ["run", "--parallel", "1", "--max-failed-share", "0.5", "--failure-threshold-files", "20"]
            + [arg for key in neighbours for arg in ("--partition", key)]
        )
    assert status == cli.EXIT_FAILED
    out = capsys.readouterr().out
    assert "more than 50% of the" in out and "failure threshold" in out
    # One partition tried, the threshold met inside it, the others never started.
    states = progress_rows.read_progress(conn)["partitions"]
    assert {key for key in states if key in keys} == {keys[0]}
    assert _assert_written_right(conn, s3_client, bucket, seeded_files) == set()
    # The failures that tripped the threshold are counted: in the summary, the metadata, the rows.
    counts = _assert_counts_agree(out, conn, dagster_runs.dagster_instance())
    assert counts.failed >= 20 and counts.failed == counts.processed
    assert f"({counts.processed:,} files, " in out  # the status line's count of the files done


def test_throttling_is_counted_in_the_partition_it_slowed(
    conn, s3_endpoint, s3_client, bucket, seeded_files, dagster_home, monkeypatch, capsys
):
    keys = partitions_of(seeded_files)
    throttled, spared = keys[0], keys[1]
    apps = "|".join(sorted({str(f.app_id) for f in seeded_files if partition_of(f) == throttled}))
    with FaultProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proxy.add_rule(FaultRule("slowdown", rate=0.3, method="HEAD", key_pattern=f"/{bucket}/({apps})/"))
        assert _run([throttled, spared], "--parallel", "2") == 0
        slowed = proxy.stats()["slowdown"]
    out = capsys.readouterr().out
    instance = dagster_runs.dagster_instance()
    latest = {
        r.partition_key: r.asset_materialization.metadata
        for r in instance.fetch_materializations(FILES, limit=10).records
    }
    assert latest[throttled]["s3_throttled"].value == slowed > 0
    assert latest[spared]["s3_throttled"].value == 0
    assert _assert_counts_agree(out, conn, instance).s3_throttled == slowed
