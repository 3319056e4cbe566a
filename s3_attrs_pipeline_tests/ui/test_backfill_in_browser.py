"""An operator's backfill, clicked through the real Dagster UI in headless Chromium.

The webserver and the daemon run as subprocesses on the test services (embedded PostgreSQL, moto's
S3 server over HTTP). In the browser: the asset page of files_s3_attrs, *Materialize…*, the
partition selection of the launch dialog, *Launch backfill*; once the daemon has run the backfill,
the backfill's page and one partition's materialization metadata, whose counts must be those in the
Dagster instance, in the progress row and in the triples. Screenshots go to the test's tmp dir and
to .ui-screenshots/ in the repository.
"""

import re
import shutil

import dagster as dg
import pytest
from dagster._core.execution.backfill import BULK_ACTION_TERMINAL_STATUSES, BulkActionStatus
from dagster._core.nux import get_has_seen_nux
from dagster._core.storage.tags import BACKFILL_ID_TAG

from s3_attrs_pipeline.defs.partitions import RANGE_END_TAG, RANGE_START_TAG
from s3_attrs_pipeline.instant import progress_rows
from s3_attrs_pipeline.instant.file_attrs import HASH
from s3_attrs_pipeline_tests.helpers import new_attr_triples, partitions_of, wait_for
from s3_attrs_pipeline_tests.ui.conftest import SCREENSHOT_DIR

pytestmark = pytest.mark.ui

FILES = dg.AssetKey("files_s3_attrs")
SHOWN_COUNTS = ("processed", "successful", "missing", "failed", "already_populated")
BACKFILL_TIMEOUT_S = 150


def _wait(condition, what: str, timeout_s: float = BACKFILL_TIMEOUT_S):
    return wait_for(condition, what, timeout_s)


def _screenshot(page, tmp_path, name: str):
    path = tmp_path / name
    page.screenshot(path=str(path))
    SCREENSHOT_DIR.mkdir(exist_ok=True)
    shutil.copyfile(path, SCREENSHOT_DIR / name)
    return path


def _expected_counts(seeded_files, key: str) -> dict[str, int]:
    """What a first run of the partition must report, from the seeded data set."""
    files = [f for f in seeded_files if f.app_id.hex.startswith(key)]
    todo = [f for f in files if not f.prepopulated]
    return {
        "processed": len(todo),
        "successful": sum(f.in_s3 for f in todo),
        "missing": sum(not f.in_s3 for f in todo),
        "failed": 0,
        "already_populated": len(files) - len(todo),
    }


def _metadata_shown(page) -> dict[str, int]:
    """The partition's materialization metadata as the UI shows it: key cell, value cell."""
    shown = {}
    for name in SHOWN_COUNTS:
        row = page.get_by_role("row").filter(has=page.get_by_role("cell", name=name, exact=True))
        value = row.get_by_role("cell").nth(1).inner_text().strip()
        shown[name] = int(value.replace(",", ""))
    return shown


def test_operator_launches_a_backfill_in_the_ui_and_reads_the_counts(
    conn, seeded_files, webserver, daemon, page, tmp_path
):
    from playwright.sync_api import expect

    partitions = partitions_of(seeded_files)[:3]
    # The partition whose metadata the test reads: the one with the most objects missing in S3.
    shown_key = max(partitions, key=lambda key: _expected_counts(seeded_files, key)["missing"])
    expected = _expected_counts(seeded_files, shown_key)
    assert expected["missing"] > 0 and expected["successful"] > 0, "the seed no longer gives a telling partition"

    # Asset page, Materialize…, pick the partitions in the launch dialog.
    page.goto(f"{webserver}/assets/files_s3_attrs")
    # A fresh instance greets its first visitor with a newsletter dialog, which may open late, over
    # another dialog; an operator skips it. Wait for it, so that it cannot close the partition list.
    with dg.DagsterInstance.get() as instance:
        if instance.nux_enabled and not get_has_seen_nux():
            page.get_by_role("button", name="Skip").click(timeout=90_000)
            page.get_by_text("Join the Dagster community").wait_for(state="hidden")
    page.get_by_role("button", name="Materialize…").click(timeout=90_000)  # the code location may still load
    dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize files_s3_attrs")
    dialog.get_by_text("Select a partition or create one").click()
    for key in partitions:
        page.get_by_placeholder("Filter partitions").fill(key)
        # A row's accessible name is the key twice (label and tooltip).
        page.get_by_role("menuitem", name=re.compile(rf"^{key}(\s+{key})?$")).click()
    dialog.get_by_text("Launch runs to materialize files_s3_attrs").click()  # closes the partition list
    page.get_by_placeholder("Filter partitions").wait_for(state="hidden")
    dialog.get_by_text(f"{len(partitions)} partitions", exact=True).wait_for()
    for key in partitions:  # the selection, as chips
        dialog.get_by_text(key, exact=True).first.wait_for()
    assert not dialog.get_by_text("daemon is not running").is_visible()
    _screenshot(page, tmp_path, "01-launch-backfill-dialog.png")
    dialog.get_by_role("button", name="Launch backfill").click()

    toast = page.get_by_text(re.compile(r"Created backfill \w+"))
    backfill_id = re.search(r"Created backfill (\w+)", toast.inner_text()).group(1)
    page.get_by_role("link", name="View", exact=True).click()  # the toast's link to the backfill's page
    page.wait_for_url(f"**/runs/b/{backfill_id}**")

    with dg.DagsterInstance.get() as instance:
        backfill = _wait(
            lambda: (b := instance.get_backfill(backfill_id)) and b.status in BULK_ACTION_TERMINAL_STATUSES and b,
            f"backfill {backfill_id}",
        )
        runs = instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
        # A run per range of neighbouring keys selected (the asset's backfill policy is a single run).
        spans = {
            (
                run.tags.get(RANGE_START_TAG, run.tags.get("dagster/partition")),
                run.tags.get(RANGE_END_TAG, run.tags.get("dagster/partition")),
            ): run.status
            for run in runs
        }
        assert spans == {(key, key): dg.DagsterRunStatus.SUCCESS for key in partitions}
        assert backfill.status == BulkActionStatus.COMPLETED_SUCCESS
        assert instance.get_materialized_partitions(FILES) == set(partitions)
        (record,) = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=FILES, asset_partitions=[shown_key]), limit=5
        ).records
        in_instance = {name: record.asset_materialization.metadata[name].value for name in SHOWN_COUNTS}

    # The backfill's page, reloaded: its status and progress.
    page.reload()
    page.get_by_text("Partition selection").wait_for()
    expect(page.locator("body")).to_contain_text(re.compile(r"Status\s*Succeeded"))
    expect(page.locator("body")).to_contain_text("100% completed")
    _screenshot(page, tmp_path, "02-backfill-page.png")

    # The partition's page: Partitions tab, filter by name, click the partition.
    page.goto(f"{webserver}/assets/files_s3_attrs")
    page.get_by_role("tab", name="Partitions").click()
    page.get_by_placeholder("Filter by name…").fill(shown_key)
    page.get_by_text(shown_key, exact=True).first.click()
    page.get_by_text("Latest materialization").wait_for()
    page.get_by_role("cell", name="processed", exact=True).wait_for()
    shown = _metadata_shown(page)
    screenshot = _screenshot(page, tmp_path, f"03-partition-{shown_key}-metadata.png")

    state = progress_rows.read_progress(conn)["partitions"][shown_key]
    in_progress_row = {name: state[name.replace("_", "-")] for name in SHOWN_COUNTS}
    triples = new_attr_triples(conn)
    with_hash = sum(HASH.attr_id in attrs for (app_id, _), attrs in triples.items() if app_id.hex.startswith(shown_key))
    assert shown == in_instance == in_progress_row == expected, screenshot
    assert state["status"] == "completed"
    assert with_hash == expected["successful"] + expected["already_populated"]
