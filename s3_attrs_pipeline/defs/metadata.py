"""Dagster metadata from the pipeline's reports: numbers as numbers, lists of records as tables, and a
partition's materialization metadata."""

import dataclasses

import dagster as dg

from s3_attrs_pipeline.tasks.task import FileProblem, PartitionReport, PartitionTask


def table(record_type: type, records: list) -> dg.TableMetadataValue:
    """A table of `record_type` dataclass records, one column per field (also when there are none)."""
    columns = [field.name for field in dataclasses.fields(record_type)]
    return dg.MetadataValue.table(
        records=[dg.TableRecord(dataclasses.asdict(record)) for record in records],
        schema=dg.TableSchema(columns=[dg.TableColumn(name) for name in columns]),
    )


def numbers(**values: int | float) -> dict[str, dg.MetadataValue]:
    return {
        name: dg.MetadataValue.float(round(value, 3)) if isinstance(value, float) else dg.MetadataValue.int(value)
        for name, value in values.items()
    }


def partition_metadata(report: PartitionReport) -> dict[str, dg.MetadataValue]:
    """A partition's materialization metadata, whichever task worked it: its counts under their own names,
    its times, and the first problem files."""
    metadata = numbers(
        **dataclasses.asdict(report.counts),
        duration_seconds=float(report.duration_s),
        replication_wait_seconds=float(report.replication_wait_s),
        files_per_second=float(report.files_per_second),
    )
    if report.problems:
        metadata["problem_files"] = table(FileProblem, report.problems)
    return metadata


def nothing_to_do(task: PartitionTask) -> dict[str, dg.MetadataValue]:
    """The metadata of a partition the run's plan found nothing to do in."""
    return numbers(**dataclasses.asdict(task.counts_type())) | {
        "nothing_to_do": dg.MetadataValue.text(f"the run's plan found nothing for the {task.name} to do here")
    }
