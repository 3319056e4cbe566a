"""Least privilege and secrets, through the real parts."""

import pathlib

import dagster as dg
import psycopg
import pytest
from dagster._serdes import serialize_value
from psycopg import sql

from s3_attrs_pipeline import cli
from s3_attrs_pipeline.defs.checks import CHECK_KEYS, verify_files_s3_attrs
from s3_attrs_pipeline.defs.resources import resources_from_env
from s3_attrs_pipeline_tests.conftest import BOTH_SCHEMAS, REPO_ROOT
from s3_attrs_pipeline_tests.helpers import code_location_assets, new_attr_triples, partitions_of

DB_PASSWORD = "db-pw-5ecret-7731"
AWS_SECRET = "aws-5ecret-key-9924"


GRANTS = {"72": ["postgres-grants.sql"], "current": ["postgres-grants.sql", "postgres-grants-current.sql"]}


def _grant_least_privilege(conn, role: str, schema: str) -> None:
    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    for name in GRANTS[schema]:
        conn.execute((REPO_ROOT / "docs" / name).read_text().replace(":role", role))


def _restricted_url(instant_db_url: str, role: str) -> str:
    return instant_db_url.replace("postgresql://postgres", f"postgresql://{role}", 1)


def _materialize_all(files) -> list[dg.ExecuteInProcessResult]:
    results = []
    with dg.instance_for_test() as instance:
        for key in partitions_of(files):
            results.append(
                dg.materialize(
                    [code_location_assets()[0]],
                    partition_key=key,
                    instance=instance,
                    resources=resources_from_env(),
                    raise_on_error=False,
                )
            )
        results.append(
            dg.materialize(
                [code_location_assets()[0], verify_files_s3_attrs],
                selection=dg.AssetSelection.checks(*CHECK_KEYS),
                instance=instance,
                resources=resources_from_env(),
                raise_on_error=False,
            )
        )
    return results


@BOTH_SCHEMAS
def test_the_whole_pipeline_runs_with_only_the_documented_grants(
    conn, instant_db_url, instant_schema, bucket, seeded_files, monkeypatch, capsys
):
    role = f"s3attrs_{conn.info.dbname}"[:60]
    _grant_least_privilege(conn, role, instant_schema)
    monkeypatch.setenv("INSTANT_DATABASE_URL", _restricted_url(instant_db_url, role))
    with (
        psycopg.connect(_restricted_url(instant_db_url, role)) as restricted,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        restricted.execute("DELETE FROM triples")

    results = _materialize_all(seeded_files)
    assert all(result.success for result in results)
    assert len(new_attr_triples(conn)) == sum(f.in_s3 for f in seeded_files)
    assert cli.main(["stats", "--json"]) == 0
    # Rollback needs DELETE on triples, which the backfill role does not have: a clear refusal.
    assert cli.main(["rollback", "--yes"]) == cli.EXIT_FAILED
    assert "permission denied" in capsys.readouterr().err
    assert len(new_attr_triples(conn)) == sum(f.in_s3 for f in seeded_files)


def _everything_dagster_recorded(instance: dg.DagsterInstance) -> str:
    texts = []
    for run in instance.get_runs():
        texts.append(serialize_value(run))
        texts += [serialize_value(entry) for entry in instance.all_logs(run.run_id)]
    return "\n".join(texts)


@pytest.mark.parametrize("bucket_exists", [True, False])
def test_no_secret_reaches_logs_metadata_or_errors(
    instant_db_url, bucket, seeded_files, monkeypatch, capfd, tmp_path, bucket_exists
):
    monkeypatch.setenv("INSTANT_DATABASE_URL", instant_db_url.replace("postgres:@", f"postgres:{DB_PASSWORD}@", 1))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    if not bucket_exists:
        monkeypatch.setenv("INSTANT_S3_BUCKET", "no-such-bucket-for-secrets")
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        for key in partitions_of(seeded_files)[:2]:
            result = dg.materialize(
                [code_location_assets()[0]],
                partition_key=key,
                instance=instance,
                resources=resources_from_env(),
                raise_on_error=False,
            )
            assert result.success == bucket_exists
        recorded = _everything_dagster_recorded(instance)
    compute_logs = "\n".join(
        p.read_text(errors="replace")
        for p in pathlib.Path(tmp_path).rglob("*")
        if p.is_file() and p.suffix in (".out", ".err", ".log", ".txt")
    )
    # A database that cannot be reached: the error names the host, never the password.
    monkeypatch.setenv("INSTANT_DATABASE_URL", f"postgresql://u:{DB_PASSWORD}@127.0.0.1:1/db?connect_timeout=2")
    assert cli.main(["stats"]) == cli.EXIT_FAILED
    printed = capfd.readouterr()
    for secret in (DB_PASSWORD, AWS_SECRET):
        assert secret not in recorded
        assert secret not in compute_logs
        assert secret not in printed.out + printed.err
    assert "files_s3_attrs" in recorded  # the search did look at the runs' events
