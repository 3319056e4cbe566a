"""The real Dagster UI (webserver and daemon as subprocesses) on the test services, and headless Chromium.

These tests need Chromium and Playwright, which `make test` does not install, so they are collected
only under `make test-ui`, which installs both and sets S3_ATTRS_UI_TESTS=1.
"""

import os
import shutil

import dagster as dg
import pytest
from dagster._daemon.controller import all_daemons_live

from s3_attrs_pipeline_tests.conftest import REPO_ROOT
from s3_attrs_pipeline_tests.helpers import start_fast_daemon, stop_process, wait_until_started

if os.environ.get("S3_ATTRS_UI_TESTS") != "1":
    collect_ignore_glob = ["test_*.py"]

CHROMIUM = os.environ.get("S3_ATTRS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT_DIR = REPO_ROOT / ".ui-screenshots"


@pytest.fixture
def services(instant_db_url, bucket, seeded_files, dagster_home):
    """InstantDB with the seeded files, the bucket, and a PostgreSQL-backed DAGSTER_HOME, all in os.environ,
    which the webserver and the daemon inherit."""
    return seeded_files


@pytest.fixture
def daemon(services, dagster_home):
    process = start_fast_daemon(REPO_ROOT / "workspace.yaml", dagster_home / "daemon.log")
    try:
        # Until every daemon has sent a heartbeat, the UI warns that the backfill daemon is not running.
        with dg.DagsterInstance.get() as instance:
            wait_until_started(
                lambda: all_daemons_live(instance), process, dagster_home / "daemon.log", "the daemons' heartbeats"
            )
        yield process
    finally:
        stop_process(process)


@pytest.fixture
def browser():
    # Collected only when asked for (S3_ATTRS_UI_TESTS=1), so a missing browser is an error, not a skip.
    try:
        import playwright.sync_api as playwright_api
    except ImportError:
        pytest.fail("Playwright is not installed in this venv (make test-ui installs it)")
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM} (make test-ui installs Debian's chromium)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.ui_test_failed = report.failed
    return report


@pytest.fixture
def page(browser, tmp_path, request):
    """A browser tab; when the test fails, what it showed last is saved as failure-<test>.png."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    if getattr(request.node, "ui_test_failed", False):
        name = f"failure-{request.node.name}.png"
        page.screenshot(path=str(tmp_path / name))
        SCREENSHOT_DIR.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / name, SCREENSHOT_DIR / name)
    context.close()
