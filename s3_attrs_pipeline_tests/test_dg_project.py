"""The repository is a `dg` project: its definitions load through `dg`, and the product uses only
Dagster's public API."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from s3_attrs_pipeline_tests.conftest import REPO_ROOT

PRODUCT = REPO_ROOT / "s3_attrs_pipeline"
VENV_BIN = pathlib.Path(sys.executable).parent


def _dg(args: list[str], dagster_home: pathlib.Path) -> subprocess.CompletedProcess:
    # A DAGSTER_HOME of its own: the repository's dagster.yaml (PostgreSQL storage) is for deployments.
    env = os.environ | {"DAGSTER_HOME": str(dagster_home), "VIRTUAL_ENV": str(VENV_BIN.parent)}
    return subprocess.run(
        [str(VENV_BIN / "dg"), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.daemon
def test_dg_check_defs_passes_and_lists_the_asset_with_its_checks(tmp_path):
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    checked = _dg(["check", "defs"], tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr

    listed = _dg(["list", "defs", "--json"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    definitions = json.loads(listed.stdout)
    assert sorted(asset["asset_key"] for asset in definitions["assets"]) == ["files_s3_attrs", "files_s3_attrs_refresh"]
    assert sorted((check["asset_key"], check["name"]) for check in definitions["asset_checks"]) == [
        ("files_s3_attrs", "app_queries_use_indexes"),
        ("files_s3_attrs", "completeness"),
        ("files_s3_attrs", "consistency"),
        ("files_s3_attrs", "well_formed"),
    ]
    assert sorted(sensor["name"] for sensor in definitions["sensors"]) == [
        "alert_on_failed_run",
        "verify_after_backfill",
    ]
    assert "operator_control" in [job["name"] for job in definitions["jobs"]]
    assert sorted(schedule["name"] for schedule in definitions["schedules"]) == [
        "daily_reverification",
        "weekly_refresh",
    ]


def test_the_product_uses_only_public_dagster_apis():
    private = [
        f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}"
        for path in sorted(PRODUCT.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "dagster._" in line or "dagster_graphql" in line
    ]
    assert private == []


def test_a_backfill_is_one_run_unless_partitions_per_run_splits_it(monkeypatch):
    from s3_attrs_pipeline_tests.helpers import code_location_assets

    monkeypatch.delenv("S3_ATTRS_PARTITIONS_PER_RUN", raising=False)
    assert all(asset.backfill_policy.max_partitions_per_run is None for asset in code_location_assets())
    monkeypatch.setenv("S3_ATTRS_PARTITIONS_PER_RUN", "64")
    assert all(asset.backfill_policy.max_partitions_per_run == 64 for asset in code_location_assets())
    monkeypatch.setenv("S3_ATTRS_PARTITIONS_PER_RUN", "-1")
    with pytest.raises(ValueError, match="S3_ATTRS_PARTITIONS_PER_RUN=-1"):
        code_location_assets()
    monkeypatch.setenv("S3_ATTRS_PARTITIONS_PER_RUN", "many")
    with pytest.raises(ValueError, match="S3_ATTRS_PARTITIONS_PER_RUN"):
        code_location_assets()


@pytest.mark.daemon
def test_dg_check_defs_passes_with_backfills_split_into_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("S3_ATTRS_PARTITIONS_PER_RUN", "64")
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    checked = _dg(["check", "defs"], tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
