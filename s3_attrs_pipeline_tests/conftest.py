"""Real parts for every test: embedded PostgreSQL with InstantDB's tables, and moto's S3 server over HTTP.

The server and the S3 endpoint are started once per session; each test gets its own database
(cloned from a template that holds the schema) and its own bucket. The database has InstantDB's
schema of today; a test of the write or read path also runs on its schema at migration 72 with
`@BOTH_SCHEMAS`.
"""

import itertools
import os
import pathlib
import sys

import boto3
import psycopg
import pytest
import yaml

from s3_attrs_pipeline.cli import dagster_runs
from s3_attrs_pipeline.local import postgres, s3_server, seed
from s3_attrs_pipeline.s3 import store as object_store

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

_TEMPLATE_DBS = {schema: f"instant_template_{schema}" for schema in postgres.SCHEMA_FILES}
BOTH_SCHEMAS = pytest.mark.parametrize("instant_schema", sorted(postgres.SCHEMA_FILES), indirect=True)
_counter = itertools.count()

# boto3 in the tests and in the pipeline reads these; no real AWS account is ever involved.
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "S3_ATTRS_STEP_RETRIES": "0",
}


# The fixtures that bring up the real parts, and those that start Dagster's daemon: a test using one
# is in the tier it names.
_DB_FIXTURES = {"pg_server_url", "s3_endpoint"}
_DAEMON_FIXTURES = {"daemon"}


def pytest_collection_modifyitems(items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & _DB_FIXTURES:
            item.add_marker(pytest.mark.db)
        if fixtures & _DAEMON_FIXTURES:
            item.add_marker(pytest.mark.daemon)


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory) -> str:
    url = postgres.start_embedded_postgres(tmp_path_factory.mktemp("pg") / "pgdata", keep_running=False)
    for schema, template in _TEMPLATE_DBS.items():
        postgres.install_instant_schema(postgres.create_database(url, template), schema)
    return url


@pytest.fixture
def instant_schema(request) -> str:
    """The InstantDB schema of the test's database: today's, unless parametrized (BOTH_SCHEMAS)."""
    return getattr(request, "param", "current")


def template_of(schema: str) -> str:
    return _TEMPLATE_DBS[schema]


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    process, endpoint_url = s3_server.start_s3_server()
    yield endpoint_url
    s3_server.stop_s3_server(process)


@pytest.fixture(autouse=True)
def aws_env(monkeypatch):
    for name, value in _AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def instant_db_url(pg_server_url, instant_schema, monkeypatch) -> str:
    """A fresh InstantDB database (schema and system catalog, no files), also in INSTANT_DATABASE_URL."""
    name = f"instant_{os.getpid()}_{next(_counter)}"
    url = postgres.create_database(pg_server_url, name, template=template_of(instant_schema))
    monkeypatch.setenv("INSTANT_DATABASE_URL", url)
    yield url
    postgres.drop_database(pg_server_url, name)


@pytest.fixture
def bucket(s3_endpoint, monkeypatch) -> str:
    name = f"files-{os.getpid()}-{next(_counter)}"
    monkeypatch.setenv("INSTANT_S3_BUCKET", name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    return name


@pytest.fixture
def s3_client(s3_endpoint, aws_env):
    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def conn(instant_db_url):
    with psycopg.connect(instant_db_url, autocommit=True) as connection:
        yield connection


SMALL_DATASET = seed.DatasetSpec(apps=6, files=240, missing_ratio=0.05, multipart_ratio=0.05, prepopulated_ratio=0.05)


@pytest.fixture
def seeded_files(conn, s3_client, bucket) -> list[seed.SeededFile]:
    files = seed.plan_dataset(SMALL_DATASET)
    seed.upload_objects(s3_client, bucket, files)
    seed.insert_files(conn, s3_client, bucket, files)
    return files


@pytest.fixture
def dagster_home(tmp_path, pg_server_url, monkeypatch):
    """DAGSTER_HOME holding the project's dagster.yaml, its storage in a fresh PostgreSQL database.
    Only the run queue's polling interval is shortened, so tests wait less."""
    name = f"dagster_{os.getpid()}_{next(_counter)}"
    url = postgres.create_database(pg_server_url, name)
    home = tmp_path / "dagster_home"
    home.mkdir()
    config = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    config["run_coordinator"]["config"]["dequeue_interval_seconds"] = 1
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", url.replace("postgresql://", "postgresql+psycopg2://", 1))
    dagster_runs._instance.cache_clear()
    yield home
    dagster_runs._instance.cache_clear()
    from s3_attrs_pipeline_tests.helpers import stop_processes_naming

    stop_processes_naming(str(home))
    postgres.drop_database(pg_server_url, name)


@pytest.fixture
def fresh_aws_session():
    """The store's boto3 session caches the credentials it resolved: start and end with a new one."""
    object_store._shared_session.cache_clear()
    object_store._shared_botocore_session.cache_clear()
    yield
    object_store._shared_session.cache_clear()
    object_store._shared_botocore_session.cache_clear()


@pytest.fixture
def fault_proxy(s3_endpoint, bucket, monkeypatch):
    """Every S3 request of the pipeline goes through the proxy, the daemon's runs' included."""
    from s3_attrs_pipeline_tests.fault_proxy import FaultProxy

    with FaultProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy


@pytest.fixture
def daemon(dagster_home, fault_proxy, instant_db_url):
    """`dagster-daemon` on the repository's workspace and dagster.yaml, its loops every second."""
    from s3_attrs_pipeline_tests.helpers import start_fast_daemon, stop_process

    process = start_fast_daemon(REPO_ROOT / "workspace.yaml", dagster_home / "daemon.log")
    yield process
    stop_process(process)


@pytest.fixture
def webserver(dagster_home) -> str:
    """The URL of `dagster-webserver -w workspace.yaml` on a free port, once it answers."""
    from s3_attrs_pipeline_tests.helpers import answers, start_process, stop_process, wait_until_started

    port = s3_server.free_port()
    webserver_bin = pathlib.Path(sys.executable).with_name("dagster-webserver")
    process = start_process(
        [str(webserver_bin), "-w", str(REPO_ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        dagster_home / "webserver.log",
        REPO_ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_started(
            lambda: answers(f"{url}/server_info"), process, dagster_home / "webserver.log", "dagster-webserver"
        )
        yield url
    finally:
        stop_process(process)
