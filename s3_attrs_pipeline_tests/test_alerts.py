"""Failures heard of without opening the UI: a failed run (the sensor, evaluated by the daemon) and
a failed check post a Slack-compatible JSON body to the webhook of S3_ATTRS_ALERT_WEBHOOK_URL, here a
local HTTP receiver; nothing is posted while it is unset."""

import http.server
import json
import threading

import dagster as dg
import pytest
from dagster_graphql.test.utils import define_out_of_process_context

from s3_attrs_pipeline.alerts import AlertNotSent, post
from s3_attrs_pipeline.cli import dagster_runs
from s3_attrs_pipeline.local import s3_server
from s3_attrs_pipeline_tests.conftest import REPO_ROOT
from s3_attrs_pipeline_tests.fault_proxy import FaultRule
from s3_attrs_pipeline_tests.helpers import launch_backfill, partition_of, partitions_of, wait_for


class _Receiver(http.server.ThreadingHTTPServer):
    def __init__(self):
        self.bodies: list[dict] = []
        self.status = 200
        super().__init__(("127.0.0.1", s3_server.free_port()), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 -- http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append({"path": self.path, "type": self.headers["Content-Type"]} | body)
        self.send_response(self.server.status)
        self.end_headers()

    def log_message(self, format, *args):
        pass


@pytest.fixture
def receiver(monkeypatch):
    """A webhook on loopback, named in S3_ATTRS_ALERT_WEBHOOK_URL (before a daemon starts, if one does)."""
    server = _Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("S3_ATTRS_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{server.server_port}/hooks/T0/secret")
    yield server
    server.shutdown()
    server.server_close()


def test_failed_checks_are_posted(receiver, conn, bucket, seeded_files, dagster_home):
    # Nothing was backfilled: completeness fails.
    passed = dagster_runs.verify(dagster_runs.dagster_instance())
    assert passed["completeness"] is False
    (alert,) = receiver.bodies
    assert alert["path"] == "/hooks/T0/secret" and alert["type"] == "application/json"
    assert alert["text"].startswith("s3-attrs: checks of files_s3_attrs failed: completeness")
    remaining = sum(1 for f in seeded_files if not f.prepopulated)
    assert f"{remaining} files remaining in " in alert["text"]


def test_nothing_is_posted_without_a_webhook(conn, bucket, seeded_files, dagster_home, monkeypatch):
    monkeypatch.delenv("S3_ATTRS_ALERT_WEBHOOK_URL", raising=False)
    assert dagster_runs.verify(dagster_runs.dagster_instance())["completeness"] is False


def test_a_refused_alert_is_an_error_naming_the_webhooks_host_only(receiver):
    receiver.status = 404
    url = f"http://127.0.0.1:{receiver.server_port}/hooks/T0/secret"
    with pytest.raises(AlertNotSent) as refused:
        post(url, "hello")
    assert str(refused.value) == f"the webhook at 127.0.0.1:{receiver.server_port} answered HTTP 404"


def test_a_failed_backfill_run_is_posted_by_the_daemon(receiver, conn, bucket, seeded_files, fault_proxy, daemon):
    failing = partitions_of(seeded_files)[0]
    apps = "|".join(sorted({str(f.app_id) for f in seeded_files if partition_of(f) == failing}))
    fault_proxy.add_rule(FaultRule("internal_error", key_pattern=f"/{bucket}/({apps})/"))
    with (
        dg.DagsterInstance.get() as instance,
        define_out_of_process_context(str(REPO_ROOT / "workspace.yaml"), None, instance) as context,
    ):
        launch_backfill(context, [failing])
        # The sensor looks every 15 s once the daemon has the run's failure.
        alert = wait_for(
            lambda: next((b for b in receiver.bodies if "failed: " in b["text"] and "run " in b["text"]), None),
            "the failed run's alert",
            timeout_s=240,
        )
    (run,) = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
    assert alert["text"].startswith(f"s3-attrs: run {run.run_id} (partitions {failing}..{failing}) failed: ")
