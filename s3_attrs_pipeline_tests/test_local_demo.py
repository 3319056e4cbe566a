"""`make demo` as a new user tries it (issue 18): the demo, `make demo-stop`, the demo again. The S3
server keeps its objects in memory, so the second start uploads them again with new Last-Modified
times; the demo must still end green, its checks passed."""

import os
import subprocess
import sys

import pytest

from s3_attrs_pipeline_tests.conftest import REPO_ROOT

CHECKS_PASSED = (
    "checks of files_s3_attrs: completeness passed, consistency passed, well_formed passed, "
    "app_queries_use_indexes passed"
)

pytestmark = pytest.mark.daemon


def _demo(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "s3_attrs_pipeline.cli", "demo", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_demo_is_green_however_often_it_is_stopped_and_started(tmp_path):
    # The demo's own services and settings, nothing of the test session's.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INSTANT_", "AWS_", "DAGSTER_", "S3_ATTRS_"))}
    env["S3_ATTRS_DEMO_DIR"] = str(tmp_path / "demo")
    try:
        first = _demo(env)
        assert first.returncode == 0, first.stdout + first.stderr
        assert CHECKS_PASSED in first.stdout
        stopped = _demo(env, "--stop")
        assert stopped.returncode == 0 and "stopped the S3 server" in stopped.stdout, stopped.stdout + stopped.stderr
        again = _demo(env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "the S3 server started afresh" in again.stdout
        assert CHECKS_PASSED in again.stdout
        assert "refreshed" in again.stdout  # the refresh rewrote the Last-Modified values that changed
    finally:
        _demo(env, "--stop")
