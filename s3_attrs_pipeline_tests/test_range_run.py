"""A run over a range of partitions (partition_range), against embedded PostgreSQL and moto's S3
server: its plan, several partitions at once, a failure kept to its partition, and an S3 refusal
that stops the run; and the CLI's progress display."""

import contextlib
import io
import logging
import threading

import psycopg
import pytest

from s3_attrs_pipeline.cli import dagster_runs
from s3_attrs_pipeline.cli.display import ProgressDisplay
from s3_attrs_pipeline.counts import FileCounts
from s3_attrs_pipeline.instant import progress_rows
from s3_attrs_pipeline.instant.app_id_ranges import partition_keys
from s3_attrs_pipeline.runs import range_run
from s3_attrs_pipeline.s3.store import ObjectStore, S3Settings
from s3_attrs_pipeline.tasks import backfill, refresh
from s3_attrs_pipeline.tasks.task import PartitionReport, Plan, TaskSettings
from s3_attrs_pipeline_tests.conftest import BOTH_SCHEMAS
from s3_attrs_pipeline_tests.fault_proxy import FaultProxy, FaultRule
from s3_attrs_pipeline_tests.helpers import new_attr_triples, partition_of, partitions_of

LOG = logging.getLogger("test_range_run")


class Heard:
    def __init__(self):
        self.plans, self.files, self.outcomes = [], 0, []

    def planned(self, plan):
        self.plans.append(plan)

    def files_done(self, files, failed):
        self.files += files

    def partition_done(self, outcome):
        self.outcomes.append(outcome)

    def waiting(self, text):
        pass

    def stopping(self, reason):
        pass


def _work(url, bucket, keys, listener, endpoint=None, at_once=3):
    @contextlib.contextmanager
    def connect():
        with psycopg.connect(url, autocommit=True) as conn:
            yield conn

    with (
        ObjectStore(S3Settings(bucket=bucket, endpoint_url=endpoint, max_retries=0)) as store,
        (
            range_run.RangeWorkers(
                keys,
                task=backfill.BACKFILL,
                connect=connect,
                store=store,
                settings=TaskSettings(),
                log=LOG,
                listener=listener,
                range_settings=range_run.RangeSettings(partitions_at_once=at_once),
            )
        ) as work,
    ):
        outcomes = []
        while not work.finished:
            outcomes += work.wait(timeout=1)
        return outcomes


@BOTH_SCHEMAS
def test_the_plan_works_only_partitions_with_files_and_records_the_empty_ones(conn, seeded_files):
    keys = partition_keys(2)
    with_files = partitions_of(seeded_files)
    plan = backfill.BACKFILL.plan(conn, keys)
    assert plan.with_work == with_files
    assert set(plan.without_work) == set(keys) - set(with_files)
    assert plan.files_to_do == sum(not f.prepopulated for f in seeded_files)
    states = progress_rows.read_progress(conn)["partitions"]
    assert {key for key, state in states.items() if state["status"] == "completed"} == set(plan.without_work)
    assert refresh.REFRESH.plan(conn, keys).with_work == sorted(
        {partition_of(f) for f in seeded_files if f.prepopulated}
    )


@BOTH_SCHEMAS
def test_two_runs_on_disjoint_ranges_at_once_leave_the_totals_row_the_sum_of_the_partitions(
    instant_db_url, conn, bucket, seeded_files, s3_endpoint
):
    keys = partitions_of(seeded_files)
    halves = [keys[0::2], keys[1::2]]
    results: list = []
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(FaultRule("latency", latency_s=0.01, method="HEAD"))  # the two runs overlap
        runs = [
            threading.Thread(
                target=lambda half=half: results.append(_work(instant_db_url, bucket, half, Heard(), proxy.url))
            )
            for half in halves
        ]
        for run in runs:
            run.start()
        for run in runs:
            run.join(120)
    assert sorted(o.partition_key for outcomes in results for o in outcomes if o.succeeded) == keys
    written = len(new_attr_triples(conn)) - sum(f.prepopulated for f in seeded_files)
    state = progress_rows.read_progress(conn)
    stored = progress_rows.read_totals_row(conn)
    assert state["total-successful"] == written > 0
    assert sum(s["total-successful"] for s in state["partitions"].values()) == written
    # Each run summed the rows as it ended, the later one after the earlier one's partitions committed.
    assert {key: stored[key] for key in progress_rows.TOTAL_KEYS} == {
        key: state[key] for key in progress_rows.TOTAL_KEYS
    }


@BOTH_SCHEMAS
def test_partitions_at_once_each_fail_alone(instant_db_url, conn, bucket, seeded_files, s3_endpoint):
    keys = partitions_of(seeded_files)
    failing = keys[1]
    apps = "|".join(sorted({str(f.app_id) for f in seeded_files if partition_of(f) == failing}))
    heard = Heard()
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(FaultRule("internal_error", key_pattern=f"/{bucket}/({apps})/"))
        outcomes = _work(instant_db_url, bucket, keys, heard, endpoint=proxy.url)
    assert sorted(o.partition_key for o in outcomes) == keys
    assert {o.partition_key for o in outcomes if not o.succeeded} == {failing}
    failed = next(o for o in outcomes if not o.succeeded)
    assert failed.retryable and "failed in S3" in failed.error and failed.report.counts.failed > 0
    assert heard.outcomes == outcomes
    done = {(f.app_id, f.entity_id) for f in seeded_files if f.in_s3 and partition_of(f) != failing}
    assert done <= new_attr_triples(conn).keys()
    assert heard.files == sum(o.report.counts.processed for o in outcomes)


def test_an_s3_refusal_stops_the_run(instant_db_url, conn, seeded_files, s3_endpoint):
    keys = partitions_of(seeded_files)
    before = new_attr_triples(conn)
    outcomes = _work(instant_db_url, "no-such-bucket-here", keys, Heard(), endpoint=s3_endpoint, at_once=1)
    assert not outcomes[0].succeeded and not outcomes[0].retryable and "does not exist" in outcomes[0].error
    assert all(o.error.startswith("not started: ") and "does not exist" in o.error for o in outcomes[1:])
    assert len(outcomes) == len(keys) and new_attr_triples(conn) == before


def test_neighbouring_keys_make_one_run():
    keys = dagster_runs.all_partition_keys()
    assert dagster_runs.contiguous_ranges([keys[5], keys[3], keys[4], keys[9]]) == [
        [keys[3], keys[4], keys[5]],
        [keys[9]],
    ]
    assert dagster_runs.contiguous_ranges(keys) == [keys]


def _outcome(key, counts=FileCounts(), error=None):
    report = PartitionReport(key, counts)
    ended = range_run.Ended.FAILED if error else range_run.Ended.SUCCEEDED
    return range_run.PartitionOutcome(key, report, ended, error)


def test_the_display_counts_partitions_files_and_failures():
    out = io.StringIO()
    display = ProgressDisplay(out, FileCounts, ("processed", "missing"), live=True)
    display.planned(Plan(["01", "02"], ["00", "03"], files_to_do=100))
    display.files_done(40, 0)
    display.partition_done(_outcome("01", FileCounts(processed=40, missing=2)))
    display.files_done(10, 10)
    display.partition_done(_outcome("02", FileCounts(processed=10, failed=10), error="10 of 10 files failed"))
    status = display.status()
    assert "partitions 4/4" in status and "files 50/100" in status and "failed partitions 1, files 10" in status
    assert "ETA" in status and "files/s" in status
    drawn = out.getvalue()
    assert "2 of 4 partitions have work (100 files); 2 have nothing to do" in drawn
    assert "\r\x1b[2K" in drawn and "partition 02 FAILED: 10 of 10 files failed" in drawn
    summary = display.finish([], range_run.RangeSettings())
    assert "4 of 4 done: 2 worked, 2 with nothing to do, 1 failed" in summary
    assert summary.splitlines()[1].split() == ["processed", "50"]
    assert summary.splitlines()[-1] == "failed partitions (rerun with --partition): 02"


def test_the_display_is_plain_lines_off_a_terminal_and_a_retry_reworks_failed_partitions():
    out = io.StringIO()
    display = ProgressDisplay(out, FileCounts, ("processed",), live=False)
    display.planned(Plan(["01"], ["00"], files_to_do=10))
    display.partition_done(_outcome("01", FileCounts(processed=10, failed=10), error="failed"))
    display.planned(Plan(["01"], ["00"], files_to_do=10))  # the step's retry
    display.partition_done(_outcome("01", FileCounts(processed=10)))
    assert "\r" not in out.getvalue() and "partitions 1/2" in out.getvalue()
    assert "2 of 2 done: 1 worked, 1 with nothing to do, 0 failed" in display.finish([], range_run.RangeSettings())


def test_the_failure_threshold_is_judged_from_enough_files_and_then_on_every_batch():
    threshold = range_run._FailureThreshold(range_run.RangeSettings(max_failed_share=0.5, failure_threshold_files=100))
    threshold.add(60, 60)  # all failed, but too few files tried to judge
    with pytest.raises(range_run.TooManyFailures, match=r"60 of the 100 files tried failed in S3, more than 50%"):
        threshold.add(40, 0)  # 60 of 100: more than half
    with pytest.raises(range_run.TooManyFailures):
        threshold.add(0, 0)  # every worker's next batch hears it too
    half = range_run._FailureThreshold(range_run.RangeSettings(max_failed_share=0.5))
    half.add(1000, 500)  # exactly half is not more than half
    lenient = range_run._FailureThreshold(range_run.RangeSettings(max_failed_share=1.0))
    lenient.add(5000, 5000)  # 1 never stops


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"partitions_at_once": 0}, "partitions_at_once must be at least 1"),
        ({"max_failed_share": 0}, "max_failed_share must be more than 0 and at most 1"),
        ({"max_failed_share": 1.5}, "max_failed_share must be more than 0 and at most 1"),
        ({"failure_threshold_files": 0}, "failure_threshold_files must be at least 1"),
    ],
)
def test_range_settings_refuse_what_cannot_work(settings, message):
    with pytest.raises(ValueError, match=message):
        range_run.RangeSettings(**settings)
