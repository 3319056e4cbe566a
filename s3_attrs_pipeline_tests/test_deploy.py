"""What deploy/ hands an operator is valid for the Dagster it runs: each instance config against
Dagster's instance schema, each run launcher's (and every other pluggable class's) config against
that class's own schema, and the image builds the package `make test` installs."""

import importlib
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml
from dagster._config import validate_config
from dagster._core.instance.config import dagster_instance_config
from dagster._serdes import ConfigurableClassData

from s3_attrs_pipeline_tests.conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
INSTANCE_CONFIGS = [REPO_ROOT / "dagster.yaml", DEPLOY / "ecs" / "dagster.yaml"]
# What a deployment's instance may change: where runs are launched and where their logs go.
PER_DEPLOYMENT = {"run_launcher", "compute_logs"}


def _pluggable_sections(config: dict) -> dict[str, dict]:
    """The sections of an instance config that name a class (module, class, config)."""
    found = {name: section for name, section in config.items() if isinstance(section, dict) and "class" in section}
    for name, section in config.get("storage", {}).items():
        if isinstance(section, dict) and "class" in section:
            found[f"storage.{name}"] = section
    return found


def _config_errors(section: dict) -> list[str]:
    # As the instance loads the class: `dagster.core` is the public name of `dagster._core`.
    data = ConfigurableClassData(section["module"], section["class"], "{}")
    cls = getattr(importlib.import_module(data.module_name), data.class_name)
    result = validate_config(cls.config_type(), section.get("config", {}))
    return [error.message for error in result.errors or []]


@pytest.mark.parametrize("path", INSTANCE_CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_an_instance_config_is_valid_with_each_of_its_classes(path: pathlib.Path, monkeypatch):
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", "postgresql+psycopg2://dagster@db.internal:5432/dagster")
    monkeypatch.setenv("DAGSTER_COMPUTE_LOGS_BUCKET", "compute-logs")
    config, _ = dagster_instance_config(str(path.parent), path.name)  # raises on a schema error
    for name, section in _pluggable_sections(config).items():
        assert _config_errors(section) == [], f"{path.name}: {name}"
    assert config["run_monitoring"]["enabled"] and config["run_retries"]["enabled"]
    assert config["run_retries"]["retry_on_asset_or_op_failure"] is False


def test_the_schema_checks_catch_a_misspelt_launcher_setting():
    section = yaml.safe_load((DEPLOY / "ecs" / "dagster.yaml").read_text())["run_launcher"]
    section["config"]["run_resource"] = section["config"].pop("run_resources")
    assert any("run_resource" in error for error in _config_errors(section))


def test_the_ecs_instance_is_the_repositorys_but_for_where_runs_go():
    ours = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    ecs = yaml.safe_load((DEPLOY / "ecs" / "dagster.yaml").read_text())
    assert ecs["run_launcher"]["class"] == "EcsRunLauncher"
    assert {k: v for k, v in ecs.items() if k not in PER_DEPLOYMENT} == {
        k: v for k, v in ours.items() if k not in PER_DEPLOYMENT
    }


def test_the_image_builds_the_package_make_test_installs(tmp_path):
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    base_images = re.findall(r"^FROM python:(\d+\.\d+)", dockerfile, re.MULTILINE)
    assert base_images and set(base_images) == {f"{sys.version_info.major}.{sys.version_info.minor}"}
    # The Dockerfile's first stage, without Docker: what it copies, built as it builds it.
    context = tmp_path / "src"
    context.mkdir()
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.MULTILINE):
        for source in sources.split():
            assert (REPO_ROOT / source).exists(), f"the Dockerfile copies {source}, which the repository lacks"
            copy = shutil.copytree if (REPO_ROOT / source).is_dir() else shutil.copyfile
            copy(REPO_ROOT / source, context / source)
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    for extra in re.findall(r"\.whl\)\[([a-z0-9_,-]+)\]", dockerfile):
        for name in extra.split(","):
            assert re.search(rf"^{name} = \[", pyproject, re.MULTILINE), f"no extra [{name}] in pyproject.toml"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        cwd=context,
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = REPO_ROOT / "s3_attrs_pipeline"
    expected = {str(p.relative_to(REPO_ROOT)) for p in package.rglob("*") if p.suffix in (".py", ".sql")}
    assert expected <= names, sorted(expected - names)
    assert not any(name.startswith("s3_attrs_pipeline_tests/") for name in names)


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower().replace("k8_s", "k8s")


def _snake_keys(value):
    return {_snake(k): _snake_keys(v) for k, v in value.items()} if isinstance(value, dict) else value


def test_the_helm_values_run_as_the_repositorys_instance_with_a_valid_k8s_launcher():
    from dagster_k8s import K8sRunLauncher

    values = yaml.safe_load((DEPLOY / "kubernetes" / "values.yaml").read_text())
    ours = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    daemon = values["dagsterDaemon"]
    assert _snake_keys(daemon["runMonitoring"]) == ours["run_monitoring"]
    assert _snake_keys(daemon["runRetries"]) == ours["run_retries"]
    assert _snake_keys({k: v for k, v in values["concurrency"].items() if k != "enabled"}) == ours["concurrency"]
    queued = _snake_keys(daemon["runCoordinator"]["config"]["queuedRunCoordinator"])
    assert queued == ours["run_coordinator"]["config"]

    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    # As the chart renders it: its own instance ConfigMap, secret names as a list, snake_case keys.
    config = {
        "instance_config_map": "dagster-instance",
        "env_secrets": [secret["name"] for secret in launcher["envSecrets"]],
        "run_k8s_config": {
            _snake(key): value for key, value in launcher["runK8sConfig"].items()
        },  # containerConfig: the Kubernetes container spec, as written
    }
    result = validate_config(K8sRunLauncher.config_type(), config)
    assert result.success, [error.message for error in result.errors]
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "s3_attrs_pipeline.definitions"]
    assert {"name": "S3_ATTRS_PARTITIONS_PER_RUN", "value": "64"} in deployment["env"]
